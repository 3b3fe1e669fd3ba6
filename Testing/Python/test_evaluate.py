"""`xctdiff evaluate` (XctDiffCore/evaluation.py) on a tiny model with random weights and a datalist made
by `xctdiff prepare` from three synthetic chests: the four outputs, one row per case and method
(xctdiff, direct, mean_ct), numbers that match an independent computation, seeds seed + i."""
from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_chest

from XctDiffCore.cli import main
from XctDiffCore.evaluation import CSV_COLUMNS, METRICS, evaluate
from XctDiffCore.io import Radiograph, write_volume
from XctDiffCore.metrics import psnr, window01
from XctDiffCore.model_folder import create_random_model
from XctDiffCore.pipeline import XctDiffPipeline
from XctDiffCore.views import GAP, LABEL_HEIGHT, PANEL_SIZE
from XctDiffCore.volume import Volume

STEPS, SAMPLES, SEED = 2, 2, 10
METHODS = ("xctdiff", "direct", "mean_ct")


@pytest.fixture(scope="module")
def no_lpips(tmp_path_factory):
    """An empty weights cache: LPIPS is left out (with one warning), the run stays fast and the same everywhere."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XCTDIFF_CACHE", str(tmp_path_factory.mktemp("empty-cache")))
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("model") / "tiny", "tiny", mean_ct=True)


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory):
    """Three synthetic chests of different sizes and spacings, as a user's CT files."""
    folder = tmp_path_factory.mktemp("cts")
    for i, (shape, spacing) in enumerate([((48, 64, 64), (5.0, 5.0, 4.0)), ((40, 60, 70), (4.5, 5.0, 5.0)),
                                          ((50, 64, 60), (5.0, 4.5, 4.0))]):
        ct = synthetic_chest(shape, seed=i).astype(np.int16)
        write_volume(Volume(ct, spacing), folder / f"chest{i}.nrrd")
    return folder


@pytest.fixture(scope="module")
def datalist(ct_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    assert main(["prepare", str(ct_folder), "--out", str(out), "--val-fraction", "0.67", "--seed", "0"]) == 0
    path = out / "datalist.json"
    data = json.loads(path.read_text())
    assert len(data["training"]) == 1 and len(data["validation"]) == 2
    return path


@pytest.fixture(scope="module")
def evaluated(no_lpips, model_dir, datalist, tmp_path_factory):
    """`xctdiff evaluate` run once: (exit status, stdout, stderr, output folder)."""
    out = tmp_path_factory.mktemp("evaluation") / "eval"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(["evaluate", "--model", str(model_dir), "--data", str(datalist), "--out", str(out),
                       "--steps", str(STEPS), "--samples", str(SAMPLES), "--seed", str(SEED), "--device", "cpu"])
    return status, stdout.getvalue(), stderr.getvalue(), out


@pytest.fixture(scope="module")
def rows(evaluated):
    with open(evaluated[3] / "metrics.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def validation_cases(datalist):
    """(name, CT in HU, input DRR) of the datalist's validation cases, in the order evaluate takes them."""
    entries = json.loads(datalist.read_text())["validation"]
    cases = []
    for entry in entries:
        with np.load(datalist.parent / entry["image"]) as npz:
            ct = npz["ct"]
        cases.append((Path(entry["image"]).stem, ct, np.load(datalist.parent / entry["xray"])))
    return cases


def training_mean(datalist):
    total = []
    for entry in json.loads(datalist.read_text())["training"]:
        with np.load(datalist.parent / entry["image"]) as npz:
            total.append(npz["ct"].astype(np.float64))
    return np.mean(total, axis=0)


# ------------------------------------------------------------------------------------------ outputs


def test_writes_the_four_outputs(evaluated):
    status, stdout, stderr, out = evaluated
    assert status == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["figure.png", "metrics.csv", "summary.json", "summary.md"]
    assert f"wrote {out}/metrics.csv, summary.md, summary.json, figure.png" in stdout
    assert "| XctDiff |" in stdout and "| mean training CT |" in stdout  # the table, printed too
    assert "warning: LPIPS weights not found" in stderr and "Traceback" not in stderr


def test_one_row_per_case_and_method(evaluated, rows, datalist):
    with open(evaluated[3] / "metrics.csv", encoding="utf-8") as f:
        assert f.readline().strip() == ",".join(CSV_COLUMNS)
    names = [name for name, _, _ in validation_cases(datalist)]
    assert [(r["case"], r["method"]) for r in rows] == [(n, m) for n in names for m in METHODS]
    for row in rows:
        assert 0.0 < float(row["psnr"]) < 100.0 and -1.0 <= float(row["ssim"]) <= 1.0
        assert 0.0 < float(row["psnr_slices"]) <= 100.0 and -1.0 <= float(row["ssim_slices"]) <= 1.0
        assert row["lpips"] == ""  # no weights in the cache
        if row["method"] == "mean_ct":
            assert row["consistency"] == "" and row["seconds"] == ""
        else:
            assert 0.0 <= float(row["consistency"]) <= 1.0 and float(row["seconds"]) > 0.0


def test_mean_ct_baseline_matches_an_independent_computation(rows, datalist):
    mean = training_mean(datalist)
    for name, truth, _ in validation_cases(datalist):
        (row,) = [r for r in rows if r["case"] == name and r["method"] == "mean_ct"]
        assert float(row["psnr"]) == pytest.approx(psnr(window01(mean), window01(truth)), rel=1e-4)


def test_case_i_is_sampled_with_seed_plus_i(rows, datalist, model_dir):
    pipe = XctDiffPipeline.from_pretrained(model_dir)
    name, truth, drr = validation_cases(datalist)[1]
    radiograph = Radiograph(drr.astype(np.float32), None, True, name)
    mine = pipe.reconstruct(radiograph, steps=STEPS, samples=SAMPLES, seed=SEED + 1, device="cpu", style="off")
    direct = pipe.reconstruct(radiograph, device="cpu", style="off", method="direct")
    scored = {r["method"]: r for r in rows if r["case"] == name}
    assert float(scored["xctdiff"]["psnr"]) == pytest.approx(psnr(window01(mine.ct.array), window01(truth)), rel=1e-4)
    assert float(scored["xctdiff"]["consistency"]) == pytest.approx(mine.consistency, rel=1e-4, abs=1e-6)
    assert float(scored["direct"]["psnr"]) == pytest.approx(psnr(window01(direct.ct.array), window01(truth)), rel=1e-4)
    other = pipe.reconstruct(radiograph, steps=STEPS, samples=SAMPLES, seed=SEED, device="cpu", style="off")
    assert psnr(window01(other.ct.array), window01(truth)) != pytest.approx(float(scored["xctdiff"]["psnr"]), rel=1e-4)


def test_summary_json_is_the_mean_and_std_over_cases(evaluated, rows):
    summary = json.loads((evaluated[3] / "summary.json").read_text())
    assert summary["model"] == "random" and summary["cases"] == 2
    assert list(summary["summary"]) == list(METHODS)
    for method in METHODS:
        values = np.array([float(r["psnr"]) for r in rows if r["method"] == method])
        entry = summary["summary"][method]["psnr"]
        assert entry["n"] == 2
        assert entry["mean"] == pytest.approx(values.mean(), rel=1e-4)
        assert entry["std"] == pytest.approx(values.std(ddof=0), rel=1e-3, abs=1e-4)
        assert set(summary["summary"][method]) >= set(METRICS) - {"lpips"}
        assert "lpips" not in summary["summary"][method]
    assert "consistency" in summary["summary"]["xctdiff"] and "consistency" not in summary["summary"]["mean_ct"]
    # a random model learns nothing: the mean of similar chests beats it by far
    assert summary["summary"]["mean_ct"]["psnr"]["mean"] > summary["summary"]["xctdiff"]["psnr"]["mean"] + 10


def test_summary_md_is_the_table(evaluated):
    text = (evaluated[3] / "summary.md").read_text(encoding="utf-8")
    assert "Model `random` seed0, 2 cases from `datalist.json`, 2 sample(s), 2 ddim steps, model grid 32^3, scored on 128^3" in text
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == "| method | PSNR (dB) | SSIM | PSNR slices (dB) | SSIM slices | LPIPS |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["XctDiff", "direct (no diffusion)", "mean training CT"]
    assert all(line.rstrip().endswith("|  |") for line in lines[2:])  # the LPIPS cell is empty


def test_figure_has_a_row_per_case(evaluated):
    from PIL import Image

    with Image.open(evaluated[3] / "figure.png") as image:
        # input, truth, XctDiff, direct, mean CT, XctDiff std: six panels; two cases: two rows
        assert image.size == (6 * (PANEL_SIZE + GAP) - GAP, 2 * (PANEL_SIZE + LABEL_HEIGHT + GAP) - GAP)
        assert np.asarray(image).std() > 10


# ------------------------------------------------------------------------------------------ CT folders


def test_augmented_variants_are_cases_only_when_asked(datalist, tmp_path):
    from XctDiffCore.evaluation import datalist_cases

    data = json.loads(datalist.read_text())
    variants = [{**entry, "aug": 1, "image": entry["image"]} for entry in data["validation"]]
    data["validation"] = [{**entry, "aug": 0} for entry in data["validation"]] + variants
    for section in ("training", "validation"):
        for entry in data[section]:
            entry["image"], entry["xray"] = (str(datalist.parent / entry[k]) for k in ("image", "xray"))
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(data))
    assert len(datalist_cases(path, 32)) == 2
    assert len(datalist_cases(path, 32, augmented=True)) == 4
    assert len(datalist_cases(path, 32, max_cases=3, augmented=True)) == 3


def test_ct_folder_uses_the_models_mean_ct(no_lpips, model_dir, ct_folder, tmp_path):
    summary = evaluate(model_dir, ct_folder, tmp_path / "eval", steps=1, samples=1, device="cpu", max_cases=1, progress=False)
    assert list(summary) == list(METHODS)  # the model folder has a mean_ct.npy
    with open(tmp_path / "eval" / "metrics.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [(r["case"], r["method"]) for r in table] == [("chest0", m) for m in METHODS]
    assert float(table[2]["psnr"]) < 30  # the random mean CT is noise, unlike the datalist's mean


def test_ct_folder_without_a_mean_ct_leaves_that_baseline_out(no_lpips, ct_folder, tmp_path):
    model = create_random_model(tmp_path / "bare", "tiny", with_style=False)
    summary = evaluate(model, ct_folder / "chest1.nrrd", tmp_path / "eval", steps=1, device="cpu", progress=False)
    assert list(summary) == ["xctdiff", "direct"]
    with open(tmp_path / "eval" / "metrics.csv", newline="", encoding="utf-8") as f:
        assert [(r["case"], r["method"]) for r in csv.DictReader(f)] == [("chest1", "xctdiff"), ("chest1", "direct")]


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: ["--data", str(d / "absent.json")], "evaluation data not found"),
        (lambda d: ["--max-cases", "0"], "--max-cases must be at least 1"),
        (lambda d: ["--out", str(d / "no" / "such" / "eval")], "output folder does not exist"),
        (lambda d: ["--data", str(empty_datalist(d))], "has no validation entries"),
    ],
    ids=["missing data", "max-cases 0", "missing output folder", "no validation entries"],
)
def test_errors(model_dir, datalist, tmp_path, capsys, change, words):
    argv = ["evaluate", "--model", str(model_dir), "--data", str(datalist), "--out", str(tmp_path / "eval"), "--device", "cpu",
            *change(tmp_path)]
    capsys.readouterr()
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and words in last and "Traceback" not in stderr


def empty_datalist(folder):
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": [], "validation": []}))
    return path
