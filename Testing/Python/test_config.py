"""Configs: bundled ones load and validate, YAML/JSON round trips, clear errors for bad keys and values."""
from __future__ import annotations

import dataclasses

import pytest

from XctDiffCore.config import (
    AugmentConfig,
    Config,
    bundled_config_names,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from XctDiffCore.errors import XctDiffError


def test_bundled_configs_are_tiny_preview_small_paper():
    assert {"tiny", "preview", "small", "paper"} <= set(bundled_config_names())


def test_preview_config_is_coarse_and_has_no_adversarial_term():
    c = load_config("preview")
    assert (c.data.volume_size, c.latent_size(), c.data.xray_size) == (64, 16, 64)
    assert c.autoencoder.loss.disc_start > c.autoencoder.optim.max_steps


def test_cpu_config_trains_the_papers_grid_on_patches():
    c = load_config("cpu")
    assert (c.data.volume_size, c.latent_size(), c.autoencoder.model.latent_channels) == (128, 32, 8)
    assert c.autoencoder.model.codebook_size == 8192 and c.autoencoder.model.super_resolution
    assert c.autoencoder.patch_size == 64 and c.autoencoder.augment.enabled
    assert c.autoencoder.loss.disc_start < c.autoencoder.optim.max_steps  # the critics do join
    assert c.autoencoder.loss.perceptual_weight > 0
    assert c.encoder.augment.bank == c.diffusion.augment.bank > 0  # one bank for both radiograph stages


def test_augment_magnitudes_are_zero_unless_enabled():
    off = AugmentConfig(enabled=False, max_rotation_deg=7.0).magnitudes()
    assert off["max_rotation_deg"] == 0.0 and off["elastic_grid"] == AugmentConfig().elastic_grid
    assert AugmentConfig(enabled=True, max_rotation_deg=7.0).magnitudes()["max_rotation_deg"] == 7.0
    assert "enabled" not in off and "bank" not in off  # the bank is not a warp magnitude


def test_paper_config_has_the_papers_numbers():
    c = load_config("paper")
    assert c.data.volume_size == 128
    assert c.autoencoder.model.latent_channels == 8 and c.autoencoder.model.codebook_size == 8192
    assert (c.autoencoder.optim.batch_size, c.autoencoder.optim.lr) == (1, 2e-4)
    assert (c.encoder.optim.batch_size, c.encoder.optim.lr) == (16, 1e-4)
    assert (c.diffusion.optim.batch_size, c.diffusion.optim.lr) == (8, 1e-4)
    assert (c.diffusion.schedule.num_train_steps, c.diffusion.schedule.beta_start, c.diffusion.schedule.beta_end) == (
        1000,
        0.0015,
        0.0125,
    )


@pytest.mark.parametrize("name", ["tiny", "preview", "small", "paper"])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, name, suffix):
    config = load_config(name)
    path = save_config(config, tmp_path / f"copy{suffix}")
    again = load_config(path)
    assert again == config
    assert isinstance(again.autoencoder.model.channels, tuple)
    assert config_from_dict(config_to_dict(config)) == config


def test_unknown_key_names_the_dotted_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("autoencoder:\n  model:\n    chanels: [8, 16]\n")
    with pytest.raises(XctDiffError, match=r"unknown config key autoencoder\.model\.chanels"):
        load_config(path)


def test_unknown_section_is_an_error():
    with pytest.raises(XctDiffError, match="unknown config key styles"):
        config_from_dict({"styles": {}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"encoder": {"optim": {"lr": "fast"}}}, r"encoder\.optim\.lr must be a number"),
        ({"encoder": {"optim": {"batch_size": 2.5}}}, r"encoder\.optim\.batch_size must be an integer"),
        ({"autoencoder": {"model": {"channels": 16}}}, r"autoencoder\.model\.channels must be a list"),
        ({"autoencoder": {"optim": {"betas": [0.5]}}}, r"betas must have 2 entries"),
        ({"run": {"precision": "fp8"}}, r"run\.precision must be one of"),
        ({"diffusion": {"optim": {"batch_size": 0}}}, r"diffusion\.optim\.batch_size must be at least 1"),
        ({"data": ["x"]}, r"section data must be a mapping"),
        ({"diffusion": {"schedule": {"prediction": "x0"}}}, r"diffusion\.schedule\.prediction must be one of epsilon, v"),
        ({"encoder": {"image_weight": -1.0}}, r"encoder\.image_weight, encoder\.image_items and encoder\.bone_weight must be 0 or more"),
        ({"encoder": {"bone_weight": -1.0}}, r"encoder\.bone_weight must be 0 or more"),
        ({"diffusion": {"cond_noise": -0.1}}, r"diffusion\.cond_noise must be 0 or more"),
        ({"autoencoder": {"patch_size": 30}}, r"autoencoder\.patch_size must be 0 \(whole volumes\) or a multiple of 4"),
        ({"autoencoder": {"patch_size": 256}}, r"autoencoder\.patch_size must be 0"),
        ({"diffusion": {"augment": {"bank": -1}}}, r"diffusion\.augment\.bank must be 0 \(fresh variants\) or more"),
        ({"autoencoder": {"augment": {"bank": 4}}}, r"autoencoder\.augment\.bank must be 0"),
        ({"autoencoder": {"optim": {"ema_decay": 1.0}}}, r"autoencoder\.optim\.ema_decay must be in \[0, 1\)"),
        ({"coarse": {"optim": {"ema_decay": -0.5}}}, r"coarse\.optim\.ema_decay must be in \[0, 1\)"),
        ({"encoder": {"augment": {"bank": 4}, "image_weight": 0.5}}, r"encoder\.image_weight needs the warped CTs"),
        ({"style": {"loss": {"edge_sigma": -1.0}}}, r"style\.loss\.edge_sigma must be 0 or more"),
        ({"style": {"loss": {"critic_augment": ["colour"]}}}, r"style\.loss\.critic_augment may name translation, cutout"),
        # values torch refused with a traceback, or took and trained to NaN without a word
        ({"encoder": {"optim": {"lr": float("nan")}}}, r"encoder\.optim\.lr must be a finite number, got nan"),
        ({"autoencoder": {"optim": {"lr": float("inf")}}}, r"autoencoder\.optim\.lr must be a finite number, got inf"),
        ({"autoencoder": {"loss": {"l1_weight": -1.0}}}, r"autoencoder\.loss\.l1_weight must be 0 or more, got -1\.0"),
        ({"encoder": {"optim": {"weight_decay": -1.0}}}, r"encoder\.optim\.weight_decay, warmup_steps and grad_clip"),
        ({"encoder": {"optim": {"warmup_steps": -10}}}, r"encoder\.optim\.weight_decay, warmup_steps and grad_clip"),
        ({"autoencoder": {"optim": {"betas": [1.5, 0.9]}}}, r"autoencoder\.optim\.betas must lie in \[0, 1\)"),
        ({"data": {"num_workers": -1}}, r"data\.num_workers and data\.val_cases must be 0 or more"),
        ({"diffusion": {"optim": {"ema_decay": 1.5}}}, r"diffusion\.optim\.ema_decay must be in \[0, 1\)"),
        ({"diffusion": {"schedule": {"num_train_steps": 1}}}, r"diffusion\.schedule needs num_train_steps >= 2"),
        ({"diffusion": {"schedule": {"beta_start": 0.5, "beta_end": 0.1}}}, r"0 < beta_start < beta_end < 1"),
        ({"diffusion": {"optim": {"val_sample_steps": 0}}}, r"diffusion\.optim\.val_sample_steps must be between 1 and"),
        ({"autoencoder": {"model": {"codebook_size": 0}}}, r"autoencoder\.model\.codebook_size and latent_channels"),
        ({"encoder": {"film": {"max_noise": -0.1}}}, r"encoder\.film\.max_noise must be 0 or more"),
        ({"encoder": {"optim": {"lr": "1e-3"}}}, r"YAML wants a dot: write 1\.0e-3"),
    ],
)
def test_bad_values_are_one_sentence_errors(data, message):
    with pytest.raises(XctDiffError, match=message):
        config_from_dict(data)


def test_missing_keys_take_defaults():
    config = config_from_dict({"run": {"seed": 7}})
    assert config.run.seed == 7
    assert config.encoder == Config().encoder


def test_configs_by_name_and_path(tmp_path):
    with pytest.raises(XctDiffError, match="unknown config 'huge'"):
        load_config("huge")
    with pytest.raises(XctDiffError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    path = tmp_path / "mine.yaml"
    save_config(dataclasses.replace(Config(), run=dataclasses.replace(Config().run, seed=3)), path)
    assert load_config(str(path)).run.seed == 3


@pytest.mark.parametrize("text", ["", "# only a comment\n", "[]\n", "false\n"])
def test_an_empty_config_file_is_refused_not_read_as_the_papers_defaults(tmp_path, text):
    """An empty file gave the paper's full-size defaults (a 128³ model and two loader workers) and a run that
    never got past its first step on a CPU."""
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(XctDiffError, match="is empty: a config names its sections"):
        load_config(path)
    path.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(XctDiffError, match="is not a config: not a text file"):
        load_config(path)


def test_invalid_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run: [unclosed\n")
    with pytest.raises(XctDiffError, match="not valid YAML") as error:
        load_config(path)
    assert "\n" not in str(error.value) and "(line 2, column 1)" in str(error.value)  # one line, saying where


def test_a_key_given_twice_is_refused_not_the_last_one_taken(tmp_path):
    """A `style:` section appended to a copy of a bundled config (to name one's own films) replaced the whole section
    above it: the style networks and steps fell back to the defaults without a word. YAML forbids it; PyYAML allowed it."""
    from XctDiffCore.config import CONFIG_DIR

    path = tmp_path / "mine.yaml"
    path.write_text((CONFIG_DIR / "tiny.yaml").read_text(encoding="utf-8") + "style:\n  real: [/data/films]\n")
    with pytest.raises(XctDiffError, match=r"mine.yaml is not valid YAML: the key 'style' is given twice \(first on "
                                           r"line \d+\) \(line \d+, column 1\)$"):
        load_config(path)
    path.write_text("data:\n  volume_size: 32\n  volume_size: 64\n")
    with pytest.raises(XctDiffError, match=r"the key 'volume_size' is given twice \(first on line 2\) \(line 3"):
        load_config(path)
    path.write_text("base: &b {volume_size: 32}\ndata:\n  <<: *b\n  volume_size: 64\n")  # a merge, then an override
    with pytest.raises(XctDiffError, match="unknown config key base"):  # past the YAML: not taken for a duplicate
        load_config(path)


@pytest.mark.parametrize("command", [["train"], ["benchmark", "train"], ["benchmark", "pipeline"]])
def test_the_help_names_every_bundled_config(command, capsys):
    """`--config` takes any bundled name; the help named four of the five (not `cpu`, the bundled model's)."""
    from XctDiffCore.commands.cli import main

    with pytest.raises(SystemExit):
        main(command + ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert set(bundled_config_names()) >= {"tiny", "preview", "cpu", "small", "paper"}
    assert all(name in text for name in bundled_config_names()), text


def test_the_prepare_help_names_every_built_in_split(capsys):
    from XctDiffCore.commands.cli import main
    from XctDiffCore.prepare import SPLIT_DIR

    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    names = sorted(p.stem for p in SPLIT_DIR.glob("*.json"))
    assert "shared_whole_chest_fold2" in names and all(name in text for name in names), text
