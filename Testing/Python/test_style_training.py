"""`xctdiff train style`: the tiny CycleGAN on synthetic domains learns, resumes bit-exactly and exports.

The two domains are made here, not taken from ../shared: phantom DRRs (the "DRR" side, a datalist
like `xctdiff prepare` writes) and the same phantoms with another intensity curve, blur and noise,
saved as 8-bit PNG films (the "real" side, read through read_radiograph + preprocess_radiograph).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from conftest import check_refused_while_held, synthetic_chest

from XctDiffCore.commands.cli import main
from XctDiffCore.config import load_config, save_config
from XctDiffCore.drr import drr_of_volume
from XctDiffCore.errors import XctDiffError
from XctDiffCore.io import read_radiograph, write_image_png
from XctDiffCore.style import apply_style, load_style_generator
from XctDiffCore.evaluation.style import (
    FEATURE_GROUPS,
    accuracy_by_feature_group,
    consistency_with_and_without_style,
    domain_accuracy,
    edge_preservation,
    evaluate_style,
    layout_agreement,
    nearest_drr,
    refuse_drrs_as_films,
    style_features,
)
from XctDiffCore.training import train
from XctDiffCore.io import find_real_radiographs
from XctDiffCore.training.style import RealRadiographs, split_real_files
from XctDiffCore.volume import Volume

STEPS = 24  # tiny config: 32 px, 8-channel generators


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two cores shared with other jobs: one intra-op thread is several times faster than two here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _real_looking(drr01: np.ndarray, rng) -> np.ndarray:
    """Another detector: a gamma curve (brighter), blur and noise."""
    from skimage.filters import gaussian

    return np.clip(gaussian(drr01, 1.0) ** 0.5 + rng.normal(0, 0.04, drr01.shape), 0, 1)


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("style_domains")
    (root / "xrays").mkdir()
    (root / "real").mkdir()
    entries = []
    for k in range(8):
        volume = Volume(synthetic_chest((48, 48, 48), seed=k), spacing=(2.5 + 0.3 * k,) * 3, origin=(0, 0, 0))
        np.save(root / "xrays" / f"p{k}.npy", drr_of_volume(volume, "parallel", size=32))
        entries.append({"image": f"images/p{k}.npz", "xray": f"xrays/p{k}.npy", "patient": f"p{k}"})
        film = _real_looking(drr_of_volume(volume, "parallel", size=64), np.random.default_rng(k))
        write_image_png(film, root / "real" / f"film{k}.png", bits=8)
    (root / "datalist.json").write_text(json.dumps({"training": entries[:6], "validation": entries[6:]}))
    return root


def _config(domains, steps: int, checkpoint_every: int):
    config = load_config("tiny")
    optim = dataclasses.replace(config.style.optim, max_steps=steps, log_every=4, val_every=steps, checkpoint_every=checkpoint_every)
    style = dataclasses.replace(config.style, real=(str(domains / "real"),), optim=optim)
    return dataclasses.replace(config, style=style)


def _log(run_dir) -> list[dict]:
    lines = (run_dir / "style" / "log.csv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:]]


@pytest.fixture(scope="module")
def straight(domains, tmp_path_factory):
    """One uninterrupted tiny run: the reference for resuming, and the model the evaluation uses."""
    run = tmp_path_factory.mktemp("style_run") / "straight"
    train("style", _config(domains, STEPS, STEPS), data=domains / "datalist.json", out=run)
    return run


def test_tiny_style_training_learns_resumes_and_exports(domains, straight, tmp_path):
    rows = [r for r in _log(straight) if r["train/cycle_real"]]
    cycle = [float(r["train/cycle_real"]) + float(r["train/cycle_drr"]) for r in rows]
    assert cycle[-1] < 0.6 * cycle[0], f"cycle loss did not fall: {cycle}"
    final = [r for r in _log(straight) if r.get("val/cycle_real")]
    assert final and int(final[-1]["step"]) == STEPS
    stage = straight / "style"
    assert {"checkpoint.pt", "style.safetensors", "style.json", "preview.png", "log.csv"} <= {p.name for p in stage.iterdir()}

    # Half the steps, then `xctdiff train style --resume` through the CLI: the same weights, bit for bit.
    halves = tmp_path / "halves"
    config_file = save_config(_config(domains, STEPS, STEPS // 2), tmp_path / "style.json")
    common = ["train", "style", "--config", str(config_file), "--data", str(domains / "datalist.json"), "--out", str(halves)]
    assert main(common + ["--max-steps", str(STEPS // 2)]) == 0
    assert main(common) == 2  # refuses to overwrite the run without --resume
    assert main(common + ["--resume"]) == 0
    a = torch.load(stage / "checkpoint.pt", weights_only=True)
    b = torch.load(halves / "style" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == STEPS
    for key, value in a["models"]["cyclegan"].items():
        assert torch.equal(value, b["models"]["cyclegan"][key]), key

    # The export is the checkpoint's real -> DRR generator, and it moves films towards the DRR look.
    generator, size = load_style_generator(stage)
    assert size == 32
    exported = {k: v for k, v in generator.state_dict().items()}
    for key, value in exported.items():
        assert torch.equal(value, a["models"]["cyclegan"][f"generators.real_to_drr.{key}"]), key
    films = RealRadiographs(find_real_radiographs([domains / "real"]), 32)
    real01 = np.stack([(films[i][0].numpy() + 1) / 2 for i in range(len(films))])
    drr01 = np.stack([np.load(domains / "xrays" / f"p{k}.npy") for k in range(8)])
    moved = apply_style(generator, real01)
    gap_before = abs(np.median(real01) - np.median(drr01))
    gap_after = abs(np.median(moved) - np.median(drr01))
    assert gap_after < 0.5 * gap_before, (gap_before, gap_after)


def test_real_files_are_found_and_split(domains, tmp_path):
    files = find_real_radiographs([domains / "real", str(domains / "real" / "film1.*")])
    assert len(files) == 8  # the glob's match is not counted twice
    train_files, val_files = split_real_files(files, val_cases=2, seed=0)
    assert len(val_files) == 2 and not set(train_files) & set(val_files) and len(train_files) == 6
    assert split_real_files(files, val_cases=2, seed=0) == (train_files, val_files)
    assert len(split_real_files(files[:2], val_cases=4, seed=0)[0]) == 1  # one is always left to train on
    (tmp_path / "empty").mkdir()
    with pytest.raises(XctDiffError, match="no real radiographs found"):
        find_real_radiographs([tmp_path / "empty"])
    with pytest.raises(XctDiffError, match="no real radiographs found"):
        find_real_radiographs([str(tmp_path / "*.jpeg")])
    with pytest.raises(XctDiffError, match="at least 2"):
        split_real_files(files[:1], val_cases=1, seed=0)


def test_missing_real_films_name_the_config_setting(domains, tmp_path, capsys, monkeypatch):
    """The README's `xctdiff train style --config paper ...` outside this repository's layout: every bundled config's
    style.real names the shared data from the working directory, so the one line must say which setting to change."""
    monkeypatch.chdir(tmp_path)  # no ../shared here
    out = tmp_path / "run"
    assert main(["train", "style", "--config", "tiny", "--data", str(domains / "datalist.json"), "--out", str(out),
                 "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no real radiographs found at '../shared/")
    assert "config's style.real" in err[0] and "copy of the config" in err[0]
    from XctDiffCore.config import CONFIG_DIR

    assert f"{CONFIG_DIR}/NAME.yaml" in err[0] and (CONFIG_DIR / "tiny.yaml").is_file()  # the file to copy, found
    assert not out.exists()  # the failed run took back the folders it made


def test_config_refuses_an_indivisible_image_size():
    config = load_config("tiny")
    model = dataclasses.replace(config.style.model, num_downsamples=6)  # 32 px is not a multiple of 64
    with pytest.raises(XctDiffError, match="style.model.num_downsamples"):
        dataclasses.replace(config, style=dataclasses.replace(config.style, model=model)).validate()


def _ct_datalist(root, count: int = 3, size: int = 32):
    """A datalist of CTs (as `xctdiff prepare` writes them, parallel geometry) for the warped DRR domain."""
    (root / "images").mkdir(parents=True)
    (root / "xrays").mkdir()
    entries = []
    for k in range(count):
        ct = synthetic_chest((size,) * 3, seed=k)
        np.savez(root / "images" / f"c{k}.npz", ct=ct.astype(np.int16), spacing=np.full(3, 10.0), origin=np.zeros(3))
        np.save(root / "xrays" / f"c{k}.npy", np.zeros((size, size), np.float32))  # not read when the DRRs are warped
        entries.append({"image": f"images/c{k}.npz", "xray": f"xrays/c{k}.npy", "patient": f"c{k}"})
    path = root / "datalist.json"
    path.write_text(json.dumps({"settings": {"geometry": "parallel"}, "training": entries, "validation": []}))
    return path


def _one_process():
    from XctDiffCore.training.common import Distributed

    return Distributed(0, 0, 1, torch.device("cpu"))


def test_warped_drrs_widen_the_drr_domain_the_same_way_every_time(tmp_path):
    from XctDiffCore.config import AugmentConfig
    from XctDiffCore.drr import make_geometry
    from XctDiffCore.training.data import PairDataset
    from XctDiffCore.training.style import warped_drrs
    from XctDiffCore.training.variants import random_pairs

    datalist = _ct_datalist(tmp_path)
    augment = AugmentConfig(enabled=True, max_rotation_deg=8.0, max_scale=0.12, elastic_mm=8.0).magnitudes()
    drrs = warped_drrs(tmp_path / "run", datalist, augment, 4, 32, 32, 0, _one_process())
    assert len(drrs) == 12 and drrs[0].shape == (1, 32, 32) and -1.0 <= float(drrs.images.min()) <= float(drrs.images.max()) <= 1.0
    still = {k: (v if k == "elastic_grid" else 0.0) for k, v in augment.items()}
    cts = PairDataset(datalist, "training", 32, 32)
    for k in range(3):  # each CT's first DRR is of the CT itself (on prepared data: the datalist's DRR); its warps differ
        plain = random_pairs(cts[k]["image"][None], torch.Generator(), make_geometry("parallel"), 32, still, None)[1][0]
        assert float((drrs[4 * k] - plain).abs().max()) < 1e-5
        assert all(float((drrs[4 * k + v] - plain).abs().mean()) > 1e-3 for v in (1, 2, 3))
    again = warped_drrs(tmp_path / "other", datalist, augment, 4, 32, 32, 0, _one_process())  # every rank, every remake
    assert torch.equal(again.images, drrs.images)
    assert not torch.equal(warped_drrs(tmp_path / "run", datalist, augment, 4, 32, 32, 1, _one_process()).images,
                           drrs.images)


def test_style_drrs_are_kept_in_the_run_made_in_slots_and_resumed_byte_for_byte(domains, tmp_path, capsys, monkeypatch):
    """The style stage's warped DRRs (6 min with the `cpu` config) were made again on every run and every --resume,
    --time-limit did not bound them, and a slot stopped in them kept nothing. Now they are a file of the run
    (RUN/style_drrs) made like the encoder's variant bank: kept one file each as they are made, stopped between
    two by --time-limit with a line saying --resume makes the rest, resumed to the same set byte for byte, and
    loaded, not made, by the runs after."""
    import XctDiffCore.training.variant_bank as variant_bank
    from XctDiffCore.training.common import StoppedBeforeTraining
    from XctDiffCore.training.style import DRRS_DIR, warped_drrs

    config = _config(domains, 2, 2)
    augment = dataclasses.replace(config.style.augment, enabled=True, bank=3)
    config = dataclasses.replace(config, style=dataclasses.replace(config.style, augment=augment))
    datalist = _ct_datalist(tmp_path / "data")
    train("style", config, data=datalist, out=tmp_path / "straight")
    (made,) = (tmp_path / "straight" / DRRS_DIR).iterdir()  # one share, the part files gone
    assert made.name.endswith("-0of1.pt")
    capsys.readouterr()

    slots = tmp_path / "slots"
    train("style", config, data=datalist, out=slots, time_limit=1e-6)  # a slot spent before the first DRR
    (parts,) = (slots / DRRS_DIR).iterdir()
    assert (f"style DRRs: stopped by --time-limit with 0 of 9 DRRs made (kept in {parts}); the same command with "
            "--resume makes the rest, then trains") in capsys.readouterr().err
    assert not (slots / "style").exists()  # no checkpoint, no empty stage folder; the run folder with the DRRs stays

    class Slot:
        """A deadline that says SIGTERM at its ``after + 1``-th question."""

        def __init__(self, after: int):
            self.asked, self.after = 0, after

        def due(self):
            self.asked += 1
            return "SIGTERM" if self.asked > self.after else None

        def agree(self, cause):
            return cause

    with pytest.raises(StoppedBeforeTraining, match=r"style DRRs: stopped by SIGTERM with 4 of 9 DRRs made"):
        warped_drrs(slots, datalist, config.style.augment.magnitudes(), 3, 32, 32, config.run.seed, _one_process(),
                    Slot(4))
    assert len(list(parts.glob("*.pt"))) == 4 and not [p for p in parts.iterdir() if ".tmp" in p.name]
    train("style", config, data=datalist, out=slots, resume=True)  # the 5 left, then the steps
    err = capsys.readouterr().err
    assert "style DRRs: making 3 warped DRRs of each of 3 training CTs (4 of 9 made before)" in err
    assert "style DRRs: 5 of 5 DRRs" in err  # progress lines (a log file's; a terminal gets a bar)
    (resumed,) = (slots / DRRS_DIR).iterdir()
    assert resumed.name == made.name and resumed.read_bytes() == made.read_bytes()
    a = torch.load(slots / "style" / "checkpoint.pt", weights_only=True)["models"]["cyclegan"]
    b = torch.load(tmp_path / "straight" / "style" / "checkpoint.pt", weights_only=True)["models"]["cyclegan"]
    assert all(torch.equal(value, b[key]) for key, value in a.items())

    def no_remake(*args, **kwargs):
        raise AssertionError("a warped DRR was made again")

    monkeypatch.setattr(variant_bank, "make_variant", no_remake)
    more = dataclasses.replace(config, style=dataclasses.replace(
        config.style, optim=dataclasses.replace(config.style.optim, max_steps=4)))
    train("style", more, data=datalist, out=slots, resume=True)  # the next slot loads them
    assert "style DRRs: making" not in capsys.readouterr().err

    # A finished stage resumed (a slot loop's last round; a run trained before the DRRs were kept) makes none: it
    # made them all (6 min with the `cpu` config) only to say that there is nothing to train.
    shutil.rmtree(slots / DRRS_DIR)
    train("style", more, data=datalist, out=slots, resume=True)
    assert "nothing to train" in capsys.readouterr().err and not (slots / DRRS_DIR).exists()


def test_style_drrs_under_torchrun_each_rank_makes_and_writes_its_own_share(tmp_path, monkeypatch):
    """Two ranks of a torchrun job (played one after the other here, without the barrier between them): each makes
    every other DRR into part files and a share of its own (no file written by both), and the set they load is the
    one a single process makes. A --resume on another number of processes made the whole set again (6 min with the
    `cpu` config) once the part files were gone, though it is the same set (every DRR seeded by its own (seed, CT,
    variant)): the shares of a job of another size are loaded."""
    import XctDiffCore.training.variant_bank as variant_bank
    from XctDiffCore.config import AugmentConfig
    from XctDiffCore.training.common import Distributed
    from XctDiffCore.training.style import DRRS_DIR, warped_drrs

    datalist = _ct_datalist(tmp_path / "data")
    augment = AugmentConfig(enabled=True, max_rotation_deg=8.0, max_scale=0.12, elastic_mm=8.0).magnitudes()
    alone = warped_drrs(tmp_path / "alone", datalist, augment, 3, 32, 32, 0, _one_process())
    run, cpu = tmp_path / "two", torch.device("cpu")
    with pytest.raises(XctDiffError, match="checkpoint not found"):  # rank 0's share is not there yet
        warped_drrs(run, datalist, augment, 3, 32, 32, 0, Distributed(1, 1, 2, cpu))
    (parts,) = (run / DRRS_DIR).glob("*.parts")
    tasks = [f"{i}-{v}.pt" for i in range(3) for v in range(3)]
    assert sorted(p.name for p in parts.iterdir()) == sorted(tasks[1::2])  # rank 1's half alone
    both = warped_drrs(run, datalist, augment, 3, 32, 32, 0, Distributed(0, 0, 2, cpu))
    assert torch.equal(both.images, alone.images)
    key = parts.name[: -len(".parts")]
    shares = sorted(p.name for p in (run / DRRS_DIR).iterdir())
    assert shares == [f"{key}-0of2.pt", f"{key}-1of2.pt"]

    def no_remake(*args, **kwargs):
        raise AssertionError("a warped DRR was made again")

    monkeypatch.setattr(variant_bank, "make_variant", no_remake)
    assert torch.equal(warped_drrs(run, datalist, augment, 3, 32, 32, 0, _one_process()).images, alone.images)
    for rank in (2, 1, 0):  # and a job of 3 loads the single process's
        three = warped_drrs(tmp_path / "alone", datalist, augment, 3, 32, 32, 0, Distributed(rank, rank, 3, cpu))
        assert torch.equal(three.images, alone.images)
    assert sorted(p.name for p in (run / DRRS_DIR).iterdir()) == shares  # nothing written
    assert [p.name[16:] for p in (tmp_path / "alone" / DRRS_DIR).iterdir()] == ["-0of1.pt"]


def test_style_drrs_follow_their_ct_files_and_say_what_else_the_folder_keeps(tmp_path, capsys):
    """The key covered the datalist file, not the CTs it names: `xctdiff prepare` run again into the same folder
    (a CT replaced, same names, the datalist byte for byte the same) got the old DRRs without a word, and a bank
    of other settings (or made before this change) stayed in the run folder unsaid. Now the CT files' content is
    in the key (the changed CT's DRRs are made again, the others' are the same), and the line that says a new set is
    made says what else the folder holds, how much, and that it is left there."""
    from XctDiffCore.config import AugmentConfig
    from XctDiffCore.drr import make_geometry
    from XctDiffCore.training.common import file_sha256
    from XctDiffCore.training.style import DRRS_DIR, warped_drrs
    from XctDiffCore.training.variant_bank import settings_key

    datalist = _ct_datalist(tmp_path / "data")
    augment = AugmentConfig(enabled=True, max_rotation_deg=8.0, max_scale=0.12, elastic_mm=8.0).magnitudes()
    run, folder = tmp_path / "run", tmp_path / "run" / DRRS_DIR
    first = warped_drrs(run, datalist, augment, 2, 32, 32, 0, _one_process())
    (share,) = folder.iterdir()
    listed = datalist.read_bytes()
    ct = synthetic_chest((32,) * 3, seed=7)  # CT c1 prepared again, into the same folder, under the same name
    np.savez(datalist.parent / "images" / "c1.npz", ct=ct.astype(np.int16), spacing=np.full(3, 10.0), origin=np.zeros(3))
    assert datalist.read_bytes() == listed
    capsys.readouterr()
    again = warped_drrs(run, datalist, augment, 2, 32, 32, 0, _one_process())
    err = capsys.readouterr().err
    assert "style DRRs: making 2 warped DRRs of each of 3 training CTs" in err
    assert torch.equal(again.images[:2], first.images[:2]) and torch.equal(again.images[4:], first.images[4:])
    assert not torch.equal(again.images[2:4], first.images[2:4])  # c1's
    assert (f"style DRRs: {folder} also holds 1 bank of other settings or other training CTs "
            f"({share.stat().st_size / 1e6:.1f} MB: {share.name[:16]}), left as it is: delete it if no run needs "
            "it") in err
    assert share.is_file() and len(list(folder.iterdir())) == 2

    # a set made by the version before this change (its key of the settings alone) is made again once, and says why
    before = settings_key({"style_drrs": True, "datalist": file_sha256(datalist), "augment": augment, "count": 3,
                           "seed": 0, "volume_size": 32, "xray_size": 32, "geometry": repr(make_geometry("parallel"))})
    shutil.copy(share, folder / f"{before}-0of1.pt")
    warped_drrs(run, datalist, augment, 3, 32, 32, 0, _one_process())
    err = capsys.readouterr().err
    assert ("style DRRs: its key now covers the training CT files' content, so the one made before is made again "
            f"once; {folder} also holds 3 banks of other settings or other training CTs (") in err
    warped_drrs(run, datalist, augment, 3, 32, 32, 0, _one_process())  # loaded: no line
    assert capsys.readouterr().err == ""


def test_a_first_run_that_fails_after_making_its_style_drrs_keeps_them(domains, tmp_path, capsys, monkeypatch):
    """A new run folder was removed whole when the stage failed before its first checkpoint (Ctrl-C during the first
    step, a GPU out of memory), with the warped DRRs made in it (6 min with the `cpu` config) that the next try would
    have loaded. Now the run folder and its DRRs stay (the empty stage folder goes), a Ctrl-C there says so (it said
    only "error: interrupted"), and the next try loads them."""
    import XctDiffCore.training.style as style
    from XctDiffCore.training.style import DRRS_DIR

    config = _config(domains, 2, 2)
    augment = dataclasses.replace(config.style.augment, enabled=True, bank=2)
    config = dataclasses.replace(config, style=dataclasses.replace(config.style, augment=augment))
    datalist, run = _ct_datalist(tmp_path / "data"), tmp_path / "run"
    build = style.build_cyclegan

    def interrupted(section):
        raise KeyboardInterrupt

    monkeypatch.setattr(style, "build_cyclegan", interrupted)
    with pytest.raises(KeyboardInterrupt) as stopped:
        train("style", config, data=datalist, out=run)
    # the command said only "error: interrupted"
    assert str(stopped.value) == (f"before the first step; style DRRs: the 6 DRRs are kept in {run / DRRS_DIR}: the "
                                  "same command (with --resume or without) loads them instead of making them again")
    assert [p.name.endswith("-0of1.pt") for p in (run / DRRS_DIR).iterdir()] == [True] and not (run / "style").exists()
    monkeypatch.setattr(style, "build_cyclegan", build)
    capsys.readouterr()
    train("style", config, data=datalist, out=run)
    assert "style DRRs: making" not in capsys.readouterr().err and (run / "style" / "checkpoint.pt").is_file()


def test_style_training_on_warped_drrs(domains, tmp_path):
    config = _config(domains, 2, 2)
    augment = dataclasses.replace(config.style.augment, enabled=True, bank=2)
    config = dataclasses.replace(config, style=dataclasses.replace(config.style, augment=augment))
    with pytest.raises(XctDiffError, match="style.augment warps the datalist's CTs, and one could not be read: .*; "
                       r"style.augment.enabled: false \(in a copy of the config\) trains on the datalist's DRRs alone"):
        train("style", config, data=domains / "datalist.json", out=tmp_path / "no_cts")  # DRRs alone: no CT to warp
    assert not (tmp_path / "no_cts" / "style").exists()  # refused before the run folder was made
    train("style", config, data=_ct_datalist(tmp_path / "data"), out=tmp_path / "run")
    assert (tmp_path / "run" / "style" / "style.safetensors").is_file()
    with pytest.raises(XctDiffError, match="style.augment.bank >= 1"):
        dataclasses.replace(config, style=dataclasses.replace(config.style, augment=dataclasses.replace(augment, bank=0))).validate()


def test_evaluate_style_writes_the_report(domains, straight, tmp_path, capsys):
    out = tmp_path / "eval"  # created when missing
    argv = ["evaluate-style", "--model", str(straight / "style" / "style.safetensors"), "--real", str(domains / "real"),
            "--drr", str(domains / "datalist.json"), "--out", str(out), "--folds", "4"]
    assert main(argv) == 0
    assert "| real vs DRR |" in capsys.readouterr().out
    result = json.loads((out / "style_eval.json").read_text(encoding="utf-8"))
    assert (result["n_real"], result["n_drr"], result["image_size"]) == (8, 8, 32)
    assert result["before"]["accuracy"] >= 0.75  # blur + gamma + noise are easy to spot
    assert len(result["before"]["folds"]) == 4 and 0.0 <= result["after"]["accuracy"] <= 1.0
    assert result["consistency"] is None and result["drr_change"] >= 0
    edges = result["edge_preservation"]
    assert len(edges["per_image"]) == 8 and -1 <= edges["min"] <= edges["median"] <= 1
    assert f"mean {edges['mean']:.3f}" in (out / "style_eval.md").read_text(encoding="utf-8")
    table = (out / "style_eval.md").read_text(encoding="utf-8")
    assert f"{100 * result['after']['accuracy']:.1f}%" in table
    assert "Data consistency of reconstructions with and without the transfer: not measured (`--model` named " in table
    assert set(result["after_by_feature"]) == {name for name, _ in FEATURE_GROUPS}
    assert f"intensity histogram {100 * result['after_by_feature']['intensity histogram']:.1f}%" in table
    figure = read_radiograph(out / "style_eval.png").image
    assert figure.shape[1] == 3 * 34 - 2 and figure.shape[0] > 6 * 34 - 2  # six rows of real | transferred | nearest DRR
    # The PNG said nothing of its columns, films or model (only style_eval.md did): a caption below the rows now.
    assert result["figure_caption"][0] == "Columns: real film | transferred | nearest DRR."
    assert result["figure_caption"][1].startswith("Films, top to bottom: film") and "xctdiff evaluate-style" in result["figure_caption"][2]
    assert figure[6 * 34 - 2 :].max() > 0.5  # the caption's text, white below the panels
    assert main(argv[:-2] + ["--folds", "1"]) == 2

    calls = []
    hooked = evaluate_style(straight / "style", [domains / "real"], domains / "datalist.json", tmp_path / "hook", folds=4,
                            consistency=lambda image: calls.append(image) or float(image.mean()))
    assert len(calls) == 16 and hooked["consistency"]["with_style"] != hooked["consistency"]["without_style"]
    assert hooked["consistency"]["layout"] is None and len(hooked["figure_columns"]) == 3  # a hook without DRRs
    assert "with style transfer" in (tmp_path / "hook" / "style_eval.md").read_text(encoding="utf-8")


def test_a_refused_style_evaluation_leaves_no_output_folder(domains, straight, tmp_path, capsys):
    argv = ["evaluate-style", "--model", str(straight / "style" / "style.safetensors"), "--real", str(tmp_path / "none"),
            "--drr", str(domains / "datalist.json"), "--out", str(tmp_path / "eval"), "--folds", "4"]
    capsys.readouterr()
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and not (tmp_path / "eval").exists()


def test_evaluate_style_with_fewer_films_than_folds_says_how_many_it_found(domains, straight, tmp_path, capsys):
    """Three films of one's own (no shared set) and the default 5 folds: the line said 'need at least 5 images of each
    kind', not that 3 films were found nor what to change."""
    films = tmp_path / "films"
    films.mkdir()
    for k in range(3):
        shutil.copy(domains / "real" / f"film{k}.png", films)
    assert main(["evaluate-style", "--model", str(straight / "style" / "style.safetensors"), "--real", str(films),
                 "--drr", str(domains / "datalist.json"), "--out", str(tmp_path / "eval")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: 5-fold cross-validation needs 5 images of each kind, found 3 real films and 8 DRRs: give more, or a "
        "smaller --folds (2 at least)")
    assert not (tmp_path / "eval").exists()


def test_evaluate_style_names_a_model_path_that_does_not_exist(domains, tmp_path, capsys):
    """The README's `--model Resources/Models/xctdiff-cpu` run from another folder: the path is missing, which the
    line must say (it said "no style weights at .../style.safetensors (train them ...)")."""
    missing = tmp_path / "Resources" / "Models" / "xctdiff-cpu"
    assert main(["evaluate-style", "--model", str(missing), "--real", str(domains / "real"), "--drr",
                 str(domains / "datalist.json"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: no such model folder or style file: {missing}"]
    assert not (tmp_path / "out").exists()


def test_a_style_evaluation_folder_being_written_is_refused_to_a_second_run(domains, straight, tmp_path, capsys):
    """Two evaluations into one --out wrote the same three files in turns: the second is refused in one line
    before it loads anything, the folder left as it was; once the first has ended, it runs."""
    out = tmp_path / "eval"
    argv = ["evaluate-style", "--model", str(straight / "style" / "style.safetensors"), "--real", str(domains / "real"),
            "--drr", str(domains / "datalist.json"), "--out", str(out), "--folds", "4"]
    check_refused_while_held(argv, out, "xctdiff evaluate-style", capsys)
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["style_eval.json", "style_eval.md", "style_eval.png"]


def test_style_training_inside_its_real_films_folder_does_not_read_its_preview(domains, tmp_path, monkeypatch):
    """The run folder inside style.real (searched to any depth): a --resume took the run's own style/preview.png
    for a ninth real film, and the split of the real films changed under the run. The run folder is passed over."""
    import shutil

    from XctDiffCore.training import style as style_stage

    shutil.copytree(domains / "real", tmp_path / "real")
    run = tmp_path / "real" / "run"
    config = _config(domains, 2, 2)
    config = dataclasses.replace(config, style=dataclasses.replace(config.style, real=(str(tmp_path / "real"),)))
    seen, split = [], style_stage.split_real_files
    monkeypatch.setattr(style_stage, "split_real_files", lambda files, *rest: seen.append(files) or split(files, *rest))
    train("style", config, data=domains / "datalist.json", out=run)
    assert (run / "style" / "preview.png").is_file()
    train("style", config, data=domains / "datalist.json", out=run, resume=True, max_steps=4)
    assert [sorted(p.name for p in files) for files in seen] == [[f"film{k}.png" for k in range(8)]] * 2


def test_a_style_evaluation_inside_its_real_films_folder_does_not_read_its_figure(domains, straight, tmp_path, capsys):
    """--out inside the --real folder (searched to any depth): the second run took the first's style_eval.png for a
    ninth real film. The output folder is passed over (also through a glob); --real inside --out is refused."""
    import shutil

    shutil.copytree(domains / "real", tmp_path / "real")
    out = tmp_path / "real" / "eval"
    model = str(straight / "style" / "style.safetensors")
    for real in (tmp_path / "real", tmp_path / "real", f"{tmp_path / 'real'}/**/*.png"):
        assert main(["evaluate-style", "--model", model, "--real", str(real), "--drr", str(domains / "datalist.json"),
                     "--out", str(out), "--folds", "4"]) == 0
        result = json.loads((out / "style_eval.json").read_text(encoding="utf-8"))
        assert result["n_real"] == 8 and all(Path(r["real"]).parent.name == "real" for r in result["figure_rows"])
    before = sorted(tmp_path.rglob("*"))
    for real, words in ((out, f"error: {out} is in the output folder {out}: a job does not read its own outputs"),
                        (f"{out}/*.png", f"error: the real films named are all in the output folder {out}")):
        capsys.readouterr()
        assert main(["evaluate-style", "--model", model, "--real", str(real), "--drr", str(domains / "datalist.json"),
                     "--out", str(out), "--folds", "4"]) == 2
        (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert error.startswith(words), error
    assert sorted(tmp_path.rglob("*")) == before


def test_figures_xctdiff_wrote_among_the_real_films_are_passed_over(domains, straight, tmp_path, capsys):
    """A views PNG of an earlier reconstruction among the real films was scored as a real film: passed over in one
    warning line; real films that are all figures are one error line."""
    import shutil

    from PIL import Image

    from XctDiffCore.figures import write_png

    shutil.copytree(domains / "real", tmp_path / "real")
    (tmp_path / "real" / "views").mkdir()
    write_png(Image.new("L", (64, 64), 128), tmp_path / "real" / "views" / "film0_views.png", kind="views")
    argv = ["evaluate-style", "--model", str(straight / "style" / "style.safetensors"), "--drr",
            str(domains / "datalist.json"), "--out", str(tmp_path / "eval"), "--folds", "4", "--real"]
    capsys.readouterr()
    assert main([*argv, str(tmp_path / "real")]) == 0
    assert json.loads((tmp_path / "eval" / "style_eval.json").read_text(encoding="utf-8"))["n_real"] == 8
    assert (f"warning: passed over 1 PNG figure that XctDiff wrote (views, evaluation figures) among the real films: "
            f"not radiographs (e.g. {tmp_path / 'real' / 'views' / 'film0_views.png'})") in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "real" / "views")]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert error.startswith("error: the real films named are all PNG figures that XctDiff wrote, e.g. "), error


def test_evaluate_style_with_a_model_folder_scores_reconstructions_both_ways(domains, tmp_path, capsys):
    from XctDiffCore.model_folder import create_random_model

    model = create_random_model(tmp_path / "model", "tiny")  # 32 px, with a style stage
    argv = ["evaluate-style", "--model", str(model), "--real", str(domains / "real"), "--drr", str(domains / "datalist.json"),
            "--out", str(tmp_path / "eval"), "--folds", "4", "--steps", "2", "--device", "cpu"]
    assert main(argv) == 0
    consistency = json.loads((tmp_path / "eval" / "style_eval.json").read_text(encoding="utf-8"))["consistency"]
    assert len(consistency["per_image"]["with_style"]) == len(consistency["per_image"]["without_style"]) == 8
    assert all(0.0 <= c <= 1.0 for c in consistency["per_image"]["with_style"] + consistency["per_image"]["without_style"])
    assert consistency["with_style"] != consistency["without_style"]
    layout = consistency["layout"]  # each reconstruction's DRR against the film as loaded
    assert len(layout["per_image"]["with_style"]) == len(layout["per_image"]["without_style"]) == 8
    assert all(-1.0 <= a <= 1.0 for a in layout["per_image"]["with_style"] + layout["per_image"]["without_style"])
    printed = capsys.readouterr().out
    assert "| with style transfer |" in printed and f"{layout['with_style']:.4f} |" in printed
    figure = read_radiograph(tmp_path / "eval" / "style_eval.png").image  # film | its CT's DRR | transfer | its CT's DRR | DRR
    assert figure.shape[1] == 5 * 34 - 2 and figure.shape[0] > 6 * 34 - 2  # and the caption below


def test_the_style_report_says_what_made_it(domains, tmp_path, capsys):
    """style_eval.md/.json named the model by the path given, and said neither the date, XctDiff's version, the
    device and precision of the transfer and of the reconstructions, nor the command; nothing said where the report
    went, and 2 x N reconstructions ran without a progress line. Now `xctdiff evaluate`'s "Made on ..." paragraph
    (reconstructions.made_on), the model's id and version, a progress bar and a 'wrote' line."""
    import shlex

    from XctDiffCore.model_folder import create_random_model

    model = create_random_model(tmp_path / "model", "tiny")  # 32 px, with a style stage
    manifest = json.loads((model / "manifest.json").read_text())
    out = tmp_path / "eval"
    assert main(["evaluate-style", "--model", str(model), "--real", str(domains / "real"), "--drr",
                 str(domains / "datalist.json"), "--out", str(out), "--max-images", "2", "--folds", "2", "--steps", "1",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "reconstructing the films transferred" in captured.err and "reconstructing the films as loaded" in captured.err
    assert captured.out.rstrip().endswith(f"wrote {out}/style_eval.md, style_eval.json, style_eval.png")
    result = json.loads((out / "style_eval.json").read_text(encoding="utf-8"))
    assert result["model"] == f"{manifest['id']} {manifest['version']} ({model.resolve()})"
    assert result["device"] == "cpu" and result["precision"] == "fp32"
    assert result["reconstructions"]["device"].startswith("cpu") and result["reconstructions"]["precision"] in ("fp32", "bf16")
    assert shlex.split(result["command"]) == ["xctdiff", "evaluate-style", "--model", str(model.resolve()), "--real",
                                              str(domains / "real"), "--drr", str(domains / "datalist.json"), "--out",
                                              str(out), "--max-images", "2", "--folds", "2", "--seed", "0", "--steps",
                                              "1", "--device", "cpu"]
    text = (out / "style_eval.md").read_text(encoding="utf-8")
    made = (f"Made on {result['date']} by XctDiff {result['xctdiff']} on cpu, fp32 (the transfer); "
            f"{result['reconstructions']['device']}, {result['reconstructions']['precision']} (the reconstructions)")
    assert made in text and f"\n    {result['command']}\n" in text and f"Model `{result['model']}`" in text


def test_a_style_output_folder_that_holds_the_model_or_the_drr_datalist_is_refused(domains, tmp_path, capsys):
    """`--out MODEL` wrote style_eval.* into the model folder, `--out DS` beside the DRR datalist: each is refused in
    one line before any work, nothing written."""
    from XctDiffCore.model_folder import create_random_model

    model = create_random_model(tmp_path / "model", "tiny")
    before = sorted(p.name for p in model.iterdir())
    (tmp_path / "ds").mkdir()
    datalist = Path(shutil.copy(domains / "datalist.json", tmp_path / "ds"))
    for out in (model, tmp_path / "ds"):
        assert main(["evaluate-style", "--model", str(model), "--real", str(domains / "real"), "--drr", str(datalist),
                     "--out", str(out), "--folds", "2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"is in the output folder {out}" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in model.iterdir()) == before and list((tmp_path / "ds").iterdir()) == [datalist]


def test_a_model_folder_without_a_style_stage_is_refused_in_one_line_before_loading_the_model(domains, tmp_path,
                                                                                            monkeypatch, capsys):
    """A model exported without `train style`: the line was the manifest's 'manifest.json lacks the style stage(s)',
    said after the whole model had been loaded for the consistency reconstructions (so were --folds 1 and an --out
    holding the model). Now the evaluation's own checks come first and the line says what to give instead."""
    from XctDiffCore.model_folder import create_random_model
    from XctDiffCore.pipeline import XctDiffPipeline

    model = create_random_model(tmp_path / "model", "tiny")
    loads = []
    monkeypatch.setattr(XctDiffPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    argv = ["evaluate-style", "--model", str(model), "--real", str(domains / "real"), "--drr", str(domains / "datalist.json"),
            "--out", str(tmp_path / "eval")]
    assert main(argv + ["--folds", "1"]) == 2 and "--folds must be at least 2" in capsys.readouterr().err
    manifest = json.loads((model / "manifest.json").read_text())
    del manifest["stages"]["style"]
    manifest["sha256"] = {name: digest for name, digest in manifest["sha256"].items() if not name.startswith("style.")}
    (model / "manifest.json").write_text(json.dumps(manifest))
    assert main(argv + ["--folds", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {model} has no style stage (its stages: {', '.join(manifest['stages'])}): nothing for evaluate-style to "
        "measure; train one (`xctdiff train style`) and export the run again, or give a run's RUN/style/style.safetensors"]
    assert loads == [] and not (tmp_path / "eval").exists()


def test_a_style_training_run_folder_is_evaluated_as_its_style_stage(domains, straight, tmp_path, capsys):
    """`--model RUN` of the run `xctdiff train style` wrote said 'no style weights at RUN/style.safetensors (train
    them with `xctdiff train style`)', which the user had done: the run's style stage is evaluated."""
    out = tmp_path / "eval"
    assert main(["evaluate-style", "--model", str(straight), "--real", str(domains / "real"), "--drr",
                 str(domains / "datalist.json"), "--out", str(out), "--folds", "2", "--max-images", "2"]) == 0, \
        capsys.readouterr().err
    result = json.loads((out / "style_eval.json").read_text(encoding="utf-8"))
    assert result["model"] == str((straight / "style").resolve()) and f"--model {straight / 'style'} " in result["command"]


def test_real_films_that_are_the_drrs_or_their_previews_are_refused(domains, tmp_path, capsys):
    """`--real DS` (the prepared folder: its xrays/NAME.png previews beside NAME.npy) was read as real films and the
    report compared the DRRs with themselves without a word; so was a glob of the .npy DRRs."""
    from XctDiffCore.model_folder import create_random_model

    model = create_random_model(tmp_path / "model", "tiny")
    ds = Path(shutil.copytree(domains, tmp_path / "ds", ignore=shutil.ignore_patterns("real")))
    for k in range(8):
        write_image_png(np.load(ds / "xrays" / f"p{k}.npy"), ds / "xrays" / f"p{k}.png", bits=8)  # prepare's previews
    for real, count in ((ds, 8), (ds / "xrays" / "p[0-3].npy", 4)):
        assert main(["evaluate-style", "--model", str(model / "style.safetensors"), "--real", str(real), "--drr",
                     str(ds / "datalist.json"), "--out", str(tmp_path / "eval"), "--folds", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {count} of the {count} real films named are DRRs of "
                                                   f"{ds / 'datalist.json'} or their PNG previews (e.g. {ds / 'xrays'}")
    assert not (tmp_path / "eval").exists()


def test_style_training_on_the_drrs_or_their_previews_as_real_films_is_refused(domains, tmp_path, capsys):
    """style.real naming the prepared folder (its xrays/NAME.png previews beside NAME.npy): `xctdiff train style`
    trained the CycleGAN to move the datalist's DRRs into the DRR style and exported it as the real-film transfer,
    without a word. Now evaluate-style's check, one line before any step, and no run folder left."""
    ds = Path(shutil.copytree(domains, tmp_path / "ds", ignore=shutil.ignore_patterns("real")))
    for k in range(8):
        write_image_png(np.load(ds / "xrays" / f"p{k}.npy"), ds / "xrays" / f"p{k}.png", bits=8)  # prepare's previews
    config = _config(domains, 2, 2)
    save_config(dataclasses.replace(config, style=dataclasses.replace(config.style, real=(str(ds),))),
                tmp_path / "style.yaml")
    out = tmp_path / "run"
    assert main(["train", "style", "--config", str(tmp_path / "style.yaml"), "--data", str(ds / "datalist.json"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: 8 of the 8 real films named are DRRs of {ds / 'datalist.json'} "
                                               f"or their PNG previews (e.g. {ds / 'xrays'}"), err
    assert "style.real" in err[0] and not out.exists()


def test_the_drrs_of_another_prepared_data_set_as_real_films_are_refused(domains, tmp_path, capsys):
    """`--real OTHER` (or style.real), the folder `xctdiff prepare` wrote for another data set than the datalist in
    use (its xrays/NAME.png previews and NAME.npy DRRs beside its datalist.json), was read as real films: the report
    compared DRRs with DRRs, the style stage learnt to move DRRs into the DRR style. Now one line, as for the DRRs
    of the datalist in use; a folder of films named xrays/ without a datalist.json beside it is read as before."""
    from XctDiffCore.model_folder import create_random_model

    other = Path(shutil.copytree(domains, tmp_path / "other", ignore=shutil.ignore_patterns("real")))
    for k in range(8):
        write_image_png(np.load(other / "xrays" / f"p{k}.npy"), other / "xrays" / f"p{k}.png", bits=8)
        (other / "xrays" / f"p{k}.npy").rename(other / "xrays" / f"q{k}.npy")  # not the --drr list's DRRs
    entries = [{"image": f"images/q{k}.npz", "xray": f"xrays/q{k}.npy", "patient": f"q{k}"} for k in range(8)]
    (other / "datalist.json").write_text(json.dumps({"training": entries[:6], "validation": entries[6:]}))
    model = create_random_model(tmp_path / "model", "tiny")
    assert main(["evaluate-style", "--model", str(model / "style.safetensors"), "--real", str(other), "--drr",
                 str(domains / "datalist.json"), "--out", str(tmp_path / "eval"), "--folds", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: 8 of the 8 real films named are DRRs of the data set "
                                               f"{other / 'datalist.json'} (the xrays/ `xctdiff prepare` wrote, e.g. "
                                               f"{other / 'xrays'}"), err
    assert "not real radiographs: the report would compare DRRs with DRRs" in err[0] and not (tmp_path / "eval").exists()

    config = _config(domains, 2, 2)
    save_config(dataclasses.replace(config, style=dataclasses.replace(config.style, real=(str(other / "xrays"),))),
                tmp_path / "style.yaml")
    assert main(["train", "style", "--config", str(tmp_path / "style.yaml"), "--data", str(domains / "datalist.json"),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"DRRs of the data set {other / 'datalist.json'}" in err[0] and "style.real" in err[0], err
    assert not (tmp_path / "run").exists()

    (other / "datalist.json").unlink()  # no data set: films that happen to lie in a folder named xrays
    assert refuse_drrs_as_films([other / "xrays" / "p0.png"], domains / "datalist.json", "") is None


def test_an_unreadable_film_among_the_real_ones_is_passed_over_with_one_warning(domains, straight, tmp_path, capsys):
    """One film cut short among many stopped the evaluation ('error: cannot read ... image file is truncated') and
    the user had to find and remove it by hand; it is now passed over with one warning naming it (as `reconstruct
    FOLDER` skips a bad film), and recorded in style_eval.json; with no readable film left it is one error line."""
    real = Path(shutil.copytree(domains / "real", tmp_path / "real"))
    (real / "film8.png").write_bytes((real / "film0.png").read_bytes()[:100])  # a copy cut short
    argv = ["evaluate-style", "--model", str(straight / "style" / "style.safetensors"), "--real", str(real),
            "--drr", str(domains / "datalist.json"), "--folds", "2"]
    assert main(argv + ["--out", str(tmp_path / "eval")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warned) == 1 and f"passed over 1 of the 9 real films, which could not be read: {real / 'film8.png'} (" \
        in warned[0] and "truncated" in warned[0], warned
    result = json.loads((tmp_path / "eval" / "style_eval.json").read_text(encoding="utf-8"))
    assert result["n_real"] == 8 and result["real_passed_over"][0]["file"] == str(real / "film8.png")
    assert all(row["real"] != str(real / "film8.png") for row in result["figure_rows"])
    assert f"Passed over 1 film(s) that could not be read: {real / 'film8.png'} (" in \
        (tmp_path / "eval" / "style_eval.md").read_text(encoding="utf-8")
    for film in real.glob("film[0-7].png"):
        film.write_bytes(b"not an image")
    assert main(argv + ["--out", str(tmp_path / "none")]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "reading the real films" not in line]
    assert len(err) == 1 and err[0].startswith("error: none of the 9 real films named could be read: "), err
    assert not (tmp_path / "none").exists()


def test_the_style_help_says_what_it_prints_and_in_what_units(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate-style", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("Prints a Markdown report", "balanced accuracy, in % (mean ± std over folds)", "50% = indistinguishable",
                  "intensity in [0, 1]", "correlation (-1 to 1)", "data consistency (0-1)",
                  "model and version, device, precision, date, command"):
        assert words in text


def test_domain_accuracy_is_calibrated():
    rng = np.random.default_rng(0)
    same = rng.normal(size=(120, 6))
    chance = domain_accuracy(same[:30], same[30:], folds=5)  # one source, unequal counts
    assert 0.3 < chance["accuracy"] < 0.7 and chance["counts"] == [30, 90]
    shifted = domain_accuracy(same[:30] + 3.0, same[30:], folds=5)
    assert shifted["accuracy"] > 0.95
    with pytest.raises(XctDiffError, match="at least 5"):
        domain_accuracy(same[:3], same[3:], folds=5)


def test_accuracy_by_feature_group_names_the_group_that_differs():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 80)), rng.normal(size=(40, 80))
    b[:, 48:64] += 3.0  # only the |Laplacian| histogram differs (texture, film grain)
    groups = accuracy_by_feature_group(a, b)
    assert list(groups) == [name for name, _ in FEATURE_GROUPS] and sum(w for _, w in FEATURE_GROUPS) == 80
    assert groups["|Laplacian| histogram"] > 0.95
    assert all(0.2 < value < 0.8 for name, value in groups.items() if name != "|Laplacian| histogram")


def test_style_features_see_blur_and_noise():
    rng = np.random.default_rng(0)
    images = rng.random((2, 32, 32)).astype(np.float32)
    from skimage.filters import gaussian

    blurred = gaussian(images[0], 2.0)[None].astype(np.float32)
    f = style_features(np.concatenate([images, blurred]))
    assert f.shape == (3, 80) and np.isfinite(f).all()
    np.testing.assert_allclose(f[:, :32].sum(1), 1.0, atol=1e-6)  # the intensity histogram
    assert np.abs(f[0] - f[1]).sum() < np.abs(f[0] - f[2]).sum()  # blur is a bigger change than another noise draw
    assert list(nearest_drr(images[::-1].copy(), images)) == [1, 0]


def test_consistency_hook_scores_both_versions():
    images = np.stack([np.full((4, 4), 0.2, np.float32), np.full((4, 4), 0.4, np.float32)])
    result = consistency_with_and_without_style(lambda image: float(image.mean()), images, images + 0.5)
    assert result["without_style"] == pytest.approx(0.3) and result["with_style"] == pytest.approx(0.8)
    assert result["per_image"]["with_style"] == pytest.approx([0.7, 0.9])
    assert consistency_with_and_without_style(lambda image: float(image[0, 0]), images, images[::-1])["with_not_worse"] == 0.5


def test_consistency_hook_with_drrs_measures_the_layout_against_the_film_as_loaded():
    films = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    smoothed = np.stack([gaussian_filter(f, 8) for f in films])
    # the "reconstruction" renders exactly what it was given: the transfer's smoothing wins the consistency
    # only when the score compares with the transfer's output; against the film as loaded it loses
    def score(image):
        return float(-np.abs(image - gaussian_filter(image, 8)).mean()), image

    result = consistency_with_and_without_style(score, films, smoothed)
    assert result["with_style"] > result["without_style"] and result["with_not_worse"] == 1.0
    assert result["layout"]["without_style"] == pytest.approx(1.0) and result["layout"]["with_style"] < 0.9
    assert consistency_with_and_without_style(lambda image: 0.5, films, smoothed)["layout"] is None  # no DRRs given
    _, drrs = consistency_with_and_without_style(score, films, smoothed, return_drrs=True)
    np.testing.assert_array_equal(drrs["with_style"], smoothed.astype(np.float32))


def test_layout_agreement_ignores_contrast_and_texture_but_not_where_things_are():
    y, x = np.mgrid[:128, :128] / 128.0
    lungs = np.exp(-((x - 0.3) ** 2 + (y - 0.5) ** 2) / 0.02) + np.exp(-((x - 0.7) ** 2 + (y - 0.5) ** 2) / 0.02)
    chest = lungs + 0.5 * y  # and an exposure gradient from top to bottom
    grain = 0.02 * np.random.default_rng(0).standard_normal(chest.shape)
    assert layout_agreement(chest, chest ** 3 + grain) > 0.95  # another contrast curve and film grain: the same layout
    assert layout_agreement(chest, chest[:, ::-1].copy()) > 0.95  # a symmetric layout, mirrored
    for axis in (0, 1):  # the lungs moved by 5 cm, down or sideways
        assert layout_agreement(chest, np.roll(chest, 20, axis=axis)) < layout_agreement(chest, chest ** 3 + grain) - 0.15
    assert layout_agreement(chest, np.zeros_like(chest)) == 0.0


def test_edge_preservation_is_measured_inside_the_lung_box():
    rng = np.random.default_rng(0)
    films = rng.random((2, 64, 64)).astype(np.float32)
    assert edge_preservation(films, 1 - films) == pytest.approx([1.0, 1.0])  # a negative keeps every edge
    scrambled = films.copy()
    scrambled[:, 10:52, 8:56] = rng.random((2, 42, 48))  # the lung fields redrawn, the border kept
    assert np.all(edge_preservation(films, scrambled) < 0.2)
    border_only = films.copy()
    border_only[:, :4] = 0  # a change outside the box does not count
    assert edge_preservation(films, border_only) == pytest.approx([1.0, 1.0])


def test_kermany_films_load_as_the_real_domain(shared_data):
    files = find_real_radiographs([shared_data / "cxr" / "kermany" / "train" / "NORMAL" / "*.jpeg"])[:2]
    images = RealRadiographs(files, 128)
    x = images[0]
    assert x.shape == (1, 128, 128) and x.dtype == torch.float32
    assert -1.0 <= x.min() < x.max() <= 1.0
    assert images[0] is x  # cached after the first read
