"""`xctdiff evaluate` (XctDiffCore/evaluation/reconstructions.py) on a tiny model with random weights and a datalist made
by `xctdiff prepare` from three synthetic chests: the four outputs, one row per case and method
(xctdiff, direct, knn, mean_ct), numbers (bone and lung Dice too) that match an independent computation,
seeds seed + i, the per-case table, a lung and a bone row per case in the figure; the kNN baseline
on a datalist whose training set holds copies of the validation patients."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import check_refused_while_held, synthetic_chest

from XctDiffCore.commands.cli import main
from XctDiffCore.evaluation.reconstructions import CSV_COLUMNS, METRICS, datalist_cases, datalist_training, drr_thumbnail, evaluate, knn_ct
from XctDiffCore.io import Radiograph, write_volume
from XctDiffCore.layout import HU_MAX, HU_MIN
from XctDiffCore.metrics import psnr, window01
from XctDiffCore.model_folder import create_random_model
from XctDiffCore.pipeline import XctDiffPipeline
from XctDiffCore.figures import GAP, LABEL_HEIGHT, PANEL_SIZE
from XctDiffCore.volume import Volume

STEPS, SAMPLES, SEED = 2, 2, 10
METHODS = ("xctdiff", "direct", "knn", "mean_ct")  # a datalist: k = 1, its single training patient
FOLDER_METHODS = ("xctdiff", "direct", "mean_ct")  # a CT folder has no training set: no kNN


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


def training_cts(datalist):
    """patient -> CT in HU of the datalist's training entries."""
    cts = {}
    for entry in json.loads(datalist.read_text())["training"]:
        with np.load(datalist.parent / entry["image"]) as npz:
            cts[entry["patient"]] = npz["ct"]
    return cts


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


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
    assert "| kNN, k=1 nearest training CTs by DRR |" in stdout  # k = 3 asked, one training patient
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
        assert 0.0 <= float(row["bone_dice"]) <= 1.0 and 0.0 <= float(row["lung_dice"]) <= 1.0
        if row["method"] in ("knn", "mean_ct"):
            assert row["consistency"] == "" and row["seconds"] == ""
        else:
            assert 0.0 <= float(row["consistency"]) <= 1.0 and float(row["seconds"]) > 0.0
        assert (row["neighbours"] != "") == (row["method"] == "knn")


def test_dice_columns_match_an_independent_computation(rows, datalist):
    mean = np.clip(training_mean(datalist), HU_MIN, HU_MAX)
    for name, truth, _ in validation_cases(datalist):
        (row,) = [r for r in rows if r["case"] == name and r["method"] == "mean_ct"]
        assert float(row["bone_dice"]) == pytest.approx(dice(mean > 200, truth > 200), abs=1e-4)
        lung = lambda hu: (hu > -1000) & (hu < -400)  # noqa: E731
        assert float(row["lung_dice"]) == pytest.approx(dice(lung(mean), lung(truth)), abs=1e-4)
        assert 0.0 < float(row["lung_dice"]) < 1.0 and 0.0 < float(row["bone_dice"]) < 1.0


def test_knn_with_one_training_patient_is_that_ct(rows, datalist):
    ((patient, ct),) = training_cts(datalist).items()
    for name, truth, _ in validation_cases(datalist):
        (row,) = [r for r in rows if r["case"] == name and r["method"] == "knn"]
        assert row["neighbours"] == patient
        assert float(row["psnr"]) == pytest.approx(psnr(window01(ct), window01(truth)), rel=1e-4)
        assert float(row["bone_dice"]) == pytest.approx(dice(ct > 200, truth > 200), abs=1e-4)


def test_mean_ct_baseline_matches_an_independent_computation(rows, datalist):
    mean = training_mean(datalist)
    for name, truth, _ in validation_cases(datalist):
        (row,) = [r for r in rows if r["case"] == name and r["method"] == "mean_ct"]
        assert float(row["psnr"]) == pytest.approx(psnr(window01(mean), window01(truth)), rel=1e-4)


def test_the_mean_ct_is_the_patients_and_a_mixed_list_has_its_own_mean_beside(datalist):
    """Mixes (`prepare --mix`) are no patients: the mean CT averages the patients, as kNN draws from them; the
    whole list's mean, a different and on the shared data stronger lookup, is scored beside it."""
    from XctDiffCore.evaluation.reconstructions import datalist_mean_ct

    data = json.loads(datalist.read_text())
    mixed = datalist.parent / "datalist_mixed.json"
    mix = {**data["validation"][0], "patient": "mix0", "mix": {"a": "x", "b": "y", "alpha": 0.5}}
    mixed.write_text(json.dumps({**data, "training": data["training"] + [mix]}))
    patients = training_mean(datalist)
    with np.load(datalist.parent / mix["image"]) as npz:
        whole = (patients + npz["ct"].astype(np.float64)) / 2
    np.testing.assert_allclose(datalist_mean_ct(mixed, 128, patients_only=True), patients, atol=0.01)
    np.testing.assert_allclose(datalist_mean_ct(mixed, 128), whole, atol=0.01)


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
    assert summary["model"] == "random" and summary["cases"] == 2 and summary["knn"] == 1
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
    assert "consistency" not in summary["summary"]["knn"]
    # a random model learns nothing: the mean of similar chests beats it by far
    assert summary["summary"]["mean_ct"]["psnr"]["mean"] > summary["summary"]["xctdiff"]["psnr"]["mean"] + 10


def test_summary_md_is_the_table_then_the_cases(evaluated, rows):
    text = (evaluated[3] / "summary.md").read_text(encoding="utf-8")
    assert "Model `random` seed0, 2 cases from `datalist.json`, 2 sample(s), 2 ddim steps, model grid 32^3, scored on 128^3" in text
    assert "kNN with k = 1 of 1 training patient(s)" in text and "bone: HU > 200, lung: -1000 < HU < -400" in text
    means, cases = text.split("Per case:")
    lines = [line.split("|")[1:-1] for line in means.splitlines() if line.startswith("|")]
    assert [c.strip() for c in lines[0]] == ["method", "PSNR (dB)", "SSIM", "PSNR slices (dB)", "SSIM slices", "LPIPS",
                                             "bone Dice", "lung Dice", "lung Dice in body"]
    assert [line[0].strip() for line in lines[2:]] == ["XctDiff", "direct (no diffusion)", "kNN, k=1 nearest training CTs by DRR",
                                                       "mean training CT"]
    assert all(line[5] == "  " and all("±" in c for c in line[6:9]) for line in lines[2:])  # LPIPS empty, Dice there
    lines = [line.split("|")[1:-1] for line in cases.splitlines() if line.startswith("|")]
    assert [c.strip() for c in lines[0]] == ["case", "method", "PSNR (dB)", "SSIM", "bone Dice", "lung Dice", "lung Dice in body",
                                            "LPIPS", "notes"]
    assert len(lines) == 2 + len(rows)
    for line, row in zip(lines[2:], rows):
        assert (line[0].strip(), line[1].strip()) == (row["case"], row["method"])
        assert float(line[2]) == pytest.approx(float(row["psnr"]), abs=0.01)
        assert float(line[4]) == pytest.approx(float(row["bone_dice"]), abs=0.001)
        assert float(line[5]) == pytest.approx(float(row["lung_dice"]), abs=0.001)
        assert float(line[6]) == pytest.approx(float(row["lung_dice_body"]), abs=0.001)
        assert line[7] == "  "


def test_the_report_says_what_made_it(evaluated, datalist, model_dir):
    """A summary read months later, or beside another model's, said the model and the K used but not how to make it
    again: no command, date, device, steps, samples or seed. Now summary.md and summary.json say them all."""
    text = (evaluated[3] / "summary.md").read_text(encoding="utf-8")
    data = json.loads((evaluated[3] / "summary.json").read_text())
    assert (data["model"], data["version"], data["device"]) == ("random", "seed0", "cpu")
    assert (data["steps"], data["sampler"], data["samples"], data["seed"]) == (STEPS, "ddim", SAMPLES, SEED)
    assert data["case_names"] == [name for name, _, _ in validation_cases(datalist)]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", data["date"]) and f"Made on {data['date']}" in text
    assert f"\n    {data['command']}\n" in text  # an indented Markdown code line
    words = shlex.split(data["command"])
    options = dict(zip(words[2::2], words[3::2]))
    assert words[:2] == ["xctdiff", "evaluate"] and Path(options["--model"]) == Path(model_dir).resolve()
    assert Path(options["--data"]) == datalist.resolve() and options["--out"] == str(evaluated[3])
    assert [options[o] for o in ("--steps", "--samples", "--seed", "--knn", "--device")] == ["2", "2", "10", "3", "cpu"]


def test_the_summary_records_which_weights_it_measured(evaluated, model_dir):
    """summary.json named the model's id and version only: `export --metrics` of it could not tell a re-export of
    new weights under the same id and version. Now each stage's weights file, its SHA-256 (the manifest's) and its
    float16 digest (what export compares: test_training's export tests); the style stage, unused here, is left out."""
    weights = json.loads((evaluated[3] / "summary.json").read_text())["weights"]
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert set(weights) == set(manifest["stages"]) - {"style"}
    assert set(weights) >= {"autoencoder", "encoder", "diffusion"}
    for stage, record in weights.items():
        assert record["file"] == manifest["stages"][stage]["weights"]
        assert record["sha256"] == manifest["sha256"][record["file"]] and len(record["float16_sha256"]) == 64


def test_knn_over_every_training_patient_says_it_is_the_mean_ct(evaluated):
    """--knn 3 on a list of one training patient gave a kNN row equal to the mean CT's, without a word."""
    assert ("kNN with k = 1 is the one training patient of datalist.json (--knn 3 asks for more than there are): the "
            "same CT as the mean training CT, so its row repeats that baseline") in evaluated[2]


def test_a_datalist_without_training_patients_says_that_knn_is_left_out(no_lpips, model_dir, datalist, tmp_path):
    data = json.loads(datalist.read_text())
    for entry in data["validation"]:
        entry["image"], entry["xray"] = (str(datalist.parent / entry[k]) for k in ("image", "xray"))
    data["training"] = []
    path = tmp_path / "validation_only.json"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="validation_only.json has no training patients: the kNN baseline is left out"):
        summary = evaluate(model_dir, path, tmp_path / "eval", steps=1, device="cpu", max_cases=1, progress=False)
    assert "knn" not in summary


def test_a_patient_the_model_was_trained_on_is_flagged_as_training_fit(no_lpips, model_dir, datalist, tmp_path, capsys):
    """A validation patient that is also in the model's training list (its manifest's, which `xctdiff inspect` counts)
    was scored as an unseen one: the bundled model scored its own training patients with no word. Now one warning
    line, a line in summary.md, the case's notes in the per-case table and metrics.csv, and summary.json's list."""
    model = Path(shutil.copytree(model_dir, tmp_path / "model"))
    manifest = json.loads((model / "manifest.json").read_text())
    validation = json.loads(datalist.read_text())["validation"]
    manifest["training"] = {"training_patients": ["someone_else", validation[1]["patient"]]}
    (model / "manifest.json").write_text(json.dumps(manifest))
    out, seen, unseen = tmp_path / "eval", Path(validation[1]["image"]).stem, Path(validation[0]["image"]).stem
    assert main(["evaluate", "--model", str(model), "--data", str(datalist), "--out", str(out), "--steps", "1",
                 "--knn", "0", "--device", "cpu"]) == 0
    assert (f"1 of the 2 cases is a patient the model was trained on ({seen}): its scores are training fit, not what "
            "it does on new patients") in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["training_fit"] == [seen]
    text = (out / "summary.md").read_text(encoding="utf-8")
    assert f"**Training fit:** 1 of the 2 cases ({seen}) are patients the model was trained on" in text
    notes = {line.split("|")[1].strip(): line.split("|")[-2] for line in text.split("Per case:")[1].splitlines()
             if line.startswith("| ") and line.split("|")[-2].strip()}
    assert "training fit" in notes[seen] and "training fit" not in notes.get(unseen, "")
    with open(out / "metrics.csv", newline="", encoding="utf-8") as f:
        flagged = {(row["case"], "training fit" in row["notes"]) for row in csv.DictReader(f)}
    assert flagged == {(seen, True), (unseen, False)}


def test_a_datalist_without_patient_ids_still_finds_the_training_patients():
    """A hand-made datalist with no 'patient' names each case by its image, `<id>_aug<k>`: still that patient."""
    from XctDiffCore.evaluation.reconstructions import Case, case_notes

    chest = synthetic_chest((128,) * 3)
    cases = [Case("lidc_idri_0293_aug0", np.zeros((8, 8)), chest, "lidc_idri_0293_aug0"),
             Case("lidc_idri_0350_aug0", np.zeros((8, 8)), chest, "lidc_idri_0350_aug0")]
    assert case_notes(cases, {"lidc_idri_0293"}) == {"lidc_idri_0293_aug0": ["training fit"], "lidc_idri_0350_aug0": []}
    assert case_notes(cases, None) == {"lidc_idri_0293_aug0": [], "lidc_idri_0350_aug0": []}  # not recorded: no claim


def test_a_scan_of_thick_slices_in_a_ct_folder_is_flagged_as_low_resolution():
    """A CT of 4 mm slices (the shared data's class-B cip_ct64_copdgene) was scored like a 1 mm chest, without a word."""
    from XctDiffCore.evaluation.reconstructions import Case, case_notes, notes_markdown, warn_about_cases

    chest = synthetic_chest((128,) * 3)
    cases = [Case("thick", np.zeros((8, 8)), chest, "thick", (0.7, 0.7, 4.0)),
             Case("thin", np.zeros((8, 8)), chest, "thin", (0.7, 0.7, 2.5)), Case("listed", np.zeros((8, 8)), chest)]
    notes = case_notes(cases, None)
    assert notes == {"thick": ["low resolution: 4.0 mm voxels (coarser than 3 mm)"], "thin": [], "listed": []}
    with pytest.warns(UserWarning, match=re.escape("1 of the 3 cases is a scan of low resolution (thick: 4.0 mm voxels "
                                                   "(coarser than 3 mm)): a blurred truth scores")):
        warn_about_cases(notes)
    assert "**Low resolution:** thick: scans of voxels coarser than 3 mm" in notes_markdown(notes)


def test_a_datalist_of_another_grid_says_it_is_scored_stretched(tmp_path):
    """`xctdiff prepare --size 64` (64^3 of 2.5 mm, 160 mm across): the bundled model was scored on it brought to 128^3,
    a chest stretched twice over, without a word (the mean CT beat the model). Small models trained on such lists
    are scored on them too, so it is a warning, not a refusal."""
    np.savez(tmp_path / "small_aug0.npz", ct=np.rint(synthetic_chest((64,) * 3)).astype(np.int16))
    np.save(tmp_path / "small_aug0.npy", np.full((64, 64), 0.5, dtype=np.float32))
    entry = {"image": "small_aug0.npz", "xray": "small_aug0.npy", "patient": "small", "aug": 0}
    path = tmp_path / "small.json"
    path.write_text(json.dumps({"settings": {"size": 64}, "training": [], "validation": [entry]}))
    with pytest.warns(UserWarning, match=re.escape(
            "small.json are 64^3 (`xctdiff prepare --size 64`: 160 mm across), not the pipeline's 128^3 of 2.5 mm "
            "(320 mm): they are scored brought to 128^3, stretched, which compares only with a model trained on such CTs")):
        (case,) = datalist_cases(path, 32)
    assert case.truth_hu.shape == (32,) * 3


def test_a_cropped_truth_is_flagged_as_no_whole_chest(no_lpips, model_dir, datalist, tmp_path, capsys):
    """A partial scan (a 100 mm slab) in the validation list was scored like a whole chest, without a word."""
    data = json.loads(datalist.read_text())
    for entry in data["training"] + data["validation"]:
        entry["image"], entry["xray"] = (str(datalist.parent / entry[k]) for k in ("image", "xray"))
    ct = np.full((128,) * 3, -1024, dtype=np.int16)
    ct[40:80] = synthetic_chest((128,) * 3)[40:80]
    np.savez(tmp_path / "slab_aug0.npz", ct=ct)
    data["validation"][0] = {**data["validation"][0], "image": str(tmp_path / "slab_aug0.npz"), "patient": "slab"}
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model_dir), "--data", str(path), "--out", str(out), "--steps", "1",
                 "--knn", "0", "--device", "cpu", "--max-cases", "1"]) == 0
    assert ("1 of the 1 cases is no whole chest (slab_aug0: its body spans only 100 mm head to foot (a whole chest: "
            "200 or more)): the protocol scores whole chests") in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["not_whole_chest"] == {
        "slab_aug0": "not a whole chest: its body spans only 100 mm head to foot (a whole chest: 200 or more)"}
    assert "**Not whole chests:** slab_aug0" in (out / "summary.md").read_text(encoding="utf-8")


def test_figure_has_a_lung_and_a_bone_row_per_case(evaluated):
    from PIL import Image

    with Image.open(evaluated[3] / "figure.png") as image:
        # input, truth, XctDiff, direct, kNN, mean CT, XctDiff std: seven panels; two cases, two windows: four rows
        grid_height = 4 * (PANEL_SIZE + LABEL_HEIGHT + GAP) - GAP
        assert image.size[0] == 7 * (PANEL_SIZE + GAP) - GAP and image.size[1] > grid_height + 2 * LABEL_HEIGHT
        pixels = np.asarray(image).astype(float)
    assert pixels.std() > 10 and pixels[grid_height + GAP:].max() == 255  # the caption below the panels
    panel = lambda row, column: pixels[row * (PANEL_SIZE + LABEL_HEIGHT + GAP) + LABEL_HEIGHT:][:PANEL_SIZE,  # noqa: E731
                                       column * (PANEL_SIZE + GAP):][:, :PANEL_SIZE]
    lung, bone = panel(0, 1), panel(1, 1)  # the first case's truth in both windows
    assert lung.std() > 10 and bone.std() > 10
    assert lung.mean() > bone.mean() + 10  # soft tissue: bright in the lung window, dark in the bone window
    assert panel(1, 0).max() == 0 and panel(1, 6).max() == 0  # the bone row has no input and no std panel


def test_the_figure_names_its_windows_and_every_case_in_full(evaluated, datalist):
    """The lung rows were labelled only with the case's name, cut at 22 characters ("totalseg_aorta_crop_au"), and
    their window was in the README alone. Now a caption under the panels says both windows and every name in full."""
    from XctDiffCore.evaluation.reconstructions import figure_caption

    names = [name for name, _, _ in validation_cases(datalist)]
    figure = [(name, None, {}, None) for name in ["a_patient_with_a_long_name_aug0", *names]]
    lines = figure_caption(figure, "random seed0", {names[0]: ["training fit"]})
    assert lines == ["Mid-coronal slices, two rows per case: its input DRR, then each CT in a lung window (W 1500 / L -600); "
                     "below, a bone window (W 1800 / L 450).",
                     f"Cases, top to bottom: a_patient_with_a_long_name_aug0, {names[0]} (training fit), {names[1]}.",
                     "Model random seed0, xctdiff evaluate (summary.md: what made it)."]


# ------------------------------------------------------------------------------------------ kNN


@pytest.fixture
def leaky_datalist(datalist, tmp_path):
    """The datalist with a copy of each validation patient among the training patients ("copy-<id>"), and two
    entries kNN must skip: an augmented variant (aug 1) whose DRR equals the first validation DRR, first in the
    list, and a second un-augmented entry of a copied patient (same DRR, another CT)."""
    data = json.loads(datalist.read_text())
    for section in ("training", "validation"):
        for entry in data[section]:
            entry["image"], entry["xray"] = (str(datalist.parent / entry[k]) for k in ("image", "xray"))
    (original,), validation = data["training"], data["validation"]
    copies = [{**entry, "patient": f"copy-{entry['patient']}", "aug": 0} for entry in validation]
    data["training"] = [{**original, "xray": validation[0]["xray"], "patient": "variant", "aug": 1}, original, *copies,
                        {**copies[1], "image": original["image"]}]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(data))
    return path


def test_knn_candidates_are_one_unaugmented_entry_per_patient(leaky_datalist, datalist):
    training = datalist_training(leaky_datalist)
    validation = [entry["patient"] for entry in json.loads(datalist.read_text())["validation"]]
    assert [t.patient for t in training] == list(training_cts(datalist)) + [f"copy-{p}" for p in validation]


def test_knn_k1_returns_the_ct_whose_drr_is_the_input(leaky_datalist):
    training = datalist_training(leaky_datalist)
    for case in datalist_cases(leaky_datalist, 128):
        ct, neighbours = knn_ct(case.drr, training, 1, 128)
        assert neighbours == [f"copy-{case.name.removesuffix('_aug0')}"]
        assert np.array_equal(ct, case.truth_hu)  # the copy's CT, exactly


def test_knn_k2_averages_the_two_nearest(leaky_datalist, datalist):
    training = datalist_training(leaky_datalist)
    (entry,) = json.loads(datalist.read_text())["training"]
    candidates = {entry["patient"]: (np.load(datalist.parent / entry["xray"]), training_cts(datalist)[entry["patient"]])}
    validation = validation_cases(datalist)
    candidates.update({f"copy-{name.removesuffix('_aug0')}": (drr, ct) for name, ct, drr in validation})
    for name, truth, drr in validation:
        me = f"copy-{name.removesuffix('_aug0')}"
        distances = {p: float(np.mean((d.astype(np.float64) - drr) ** 2)) for p, (d, _) in candidates.items() if p != me}
        assert len(set(distances.values())) == len(distances)  # no ties: the order is the distances'
        second = min(distances, key=distances.get)
        ct, neighbours = knn_ct(drr, training, 2, 128)
        assert neighbours == [me, second]
        expected = (np.clip(truth, HU_MIN, HU_MAX) + np.clip(candidates[second][1], HU_MIN, HU_MAX)) / 2.0
        assert np.abs(ct - expected).max() < 0.01
        assert np.abs(ct - np.clip(truth, HU_MIN, HU_MAX)).max() > 100  # not the case's own CT


def test_drrs_of_other_sizes_compare_at_128(datalist):
    (_, _, drr), *_ = validation_cases(datalist)
    assert drr.shape == (128, 128)
    assert np.allclose(drr_thumbnail(np.kron(drr, np.ones((2, 2), np.float32))), drr, atol=1e-6)


def test_knn_0_leaves_the_baseline_out(no_lpips, model_dir, datalist, tmp_path):
    summary = evaluate(model_dir, datalist, tmp_path / "eval", steps=1, device="cpu", max_cases=1, progress=False, knn=0)
    assert list(summary) == ["xctdiff", "direct", "mean_ct"]
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["knn"] is None
    text = (tmp_path / "eval" / "summary.md").read_text(encoding="utf-8")
    assert "no kNN" in text and "| knn |" not in text and "kNN, k=" not in text


def test_the_progress_bar_says_what_a_case_is_waiting_on(no_lpips, model_dir, datalist, tmp_path, capsys):
    """A case takes most of a minute on a CPU, nearly all of it scoring (3D SSIM, LPIPS of 384 slices per row): the
    bar said only `0/1 case`, so a newcomer could not tell a slow metric from a hung model."""
    evaluate(model_dir, datalist, tmp_path / "eval", steps=1, device="cpu", max_cases=1, progress=True)
    err = capsys.readouterr().err
    for words in ("reconstructing", "scoring xctdiff", "scoring direct", "kNN", "scoring kNN", "scoring mean CT"):
        assert f": {words}" in err, words


def test_the_reconstructions_warnings_are_one_line_not_one_per_case_and_method(no_lpips, model_dir, datalist, tmp_path):
    """A model with a reliability threshold flagged each validation DRR's reconstruction, case by case and method by
    method, as "not a frontal chest film": one line now counts them, the consistency of each is in metrics.csv."""
    import warnings

    from XctDiffCore.plausibility import PlausibilityWarning

    strict = tmp_path / "strict"
    shutil.copytree(model_dir, strict)
    manifest = json.loads((strict / "manifest.json").read_text(encoding="utf-8"))
    (strict / "manifest.json").write_text(json.dumps({**manifest, "min_consistency": 0.999}), encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(strict, datalist, tmp_path / "eval", steps=1, device="cpu", max_cases=2, progress=False, knn=0)
    assert not [w for w in caught if issubclass(w.category, PlausibilityWarning)]
    summaries = [str(w.message) for w in caught if "on the reconstructions scored" in str(w.message)]
    assert len(summaries) == 1 and int(summaries[0].split()[0]) >= 4, summaries  # each of 2 cases x 2 methods flagged
    assert "(each one's consistency is in metrics.csv), e.g. chest" in summaries[0]


def test_a_model_with_a_coarse_ct_is_also_scored_without_it(no_lpips, datalist, tmp_path):
    """The direct row is what ships (the blend); "decoder alone" beside it shows what the coarse CT adds."""
    model = create_random_model(tmp_path / "coarse", "tiny", with_coarse=True)
    summary = evaluate(model, datalist, tmp_path / "eval", steps=1, device="cpu", max_cases=1, progress=False, knn=0)
    assert list(summary) == ["xctdiff", "direct", "direct_decoder", "mean_ct"]
    assert summary["direct"]["psnr"]["mean"] != summary["direct_decoder"]["psnr"]["mean"]
    assert "| direct, decoder alone (no coarse CT) |" in (tmp_path / "eval" / "summary.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------ CT folders


def test_augmented_variants_are_cases_only_when_asked(datalist, tmp_path):
    from XctDiffCore.evaluation.reconstructions import datalist_cases

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
    assert list(summary) == list(FOLDER_METHODS)  # the model folder has a mean_ct.npy; no training set, no kNN
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["knn"] is None
    with open(tmp_path / "eval" / "metrics.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [(r["case"], r["method"]) for r in table] == [("chest0", m) for m in FOLDER_METHODS]
    assert float(table[2]["psnr"]) < 30  # the random mean CT is noise, unlike the datalist's mean


def test_ct_folder_without_a_mean_ct_leaves_that_baseline_out(no_lpips, ct_folder, tmp_path):
    model = create_random_model(tmp_path / "bare", "tiny", with_style=False)
    summary = evaluate(model, ct_folder / "chest1.nrrd", tmp_path / "eval", steps=1, device="cpu", progress=False)
    assert list(summary) == ["xctdiff", "direct"]
    with open(tmp_path / "eval" / "metrics.csv", newline="", encoding="utf-8") as f:
        assert [(r["case"], r["method"]) for r in csv.DictReader(f)] == [("chest1", "xctdiff"), ("chest1", "direct")]


def test_the_folders_above_out_are_made_and_a_refused_run_takes_them_back(no_lpips, model_dir, ct_folder, tmp_path, capsys):
    """The README's `xctdiff evaluate ... --out eval/lidc` ended `error: output folder does not exist: eval` where
    `prepare`, `train` and `export` make the folders above their --out."""
    argv = ["evaluate", "--model", str(model_dir), "--data", str(ct_folder / "chest1.nrrd"), "--steps", "1", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "eval" / "lidc")]) == 0, capsys.readouterr().err
    assert (tmp_path / "eval" / "lidc" / "summary.md").is_file()
    argv[2] = str(tmp_path / "no-model")
    assert main([*argv, "--out", str(tmp_path / "other" / "lidc")]) == 2
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: ["--data", str(d / "absent.json")], "evaluation data not found"),
        (lambda d: ["--max-cases", "0"], "--max-cases must be at least 1"),
        (lambda d: ["--data", str(empty_datalist(d))], "has no validation entries"),
        (lambda d: ["--knn", "-1"], "--knn must be 0 (off) or more, got -1"),
        (lambda d: ["--model", str(d)], "not a model folder"),
        (lambda d: ["--out", str(a_file(d))], "--out names a file, not a folder"),
        (lambda d: ["--data", str(only_variants(d))], "variants.json (1) is an augmented variant (aug > 0), which is scored only with --augmented"),
    ],
    ids=["missing data", "max-cases 0", "no validation entries", "knn negative", "not a model",
         "out is a file", "only variants"],
)
def test_errors(model_dir, datalist, tmp_path, capsys, change, words):
    """A refused evaluation says why in one line and leaves no output folder behind."""
    argv = ["evaluate", "--model", str(model_dir), "--data", str(datalist), "--out", str(tmp_path / "eval"), "--device", "cpu",
            *change(tmp_path)]
    capsys.readouterr()
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and words in last and "Traceback" not in stderr
    assert not (tmp_path / "eval").exists()


def only_variants(folder):
    """A datalist whose one validation entry is an augmented variant: it said 'has no validation entries'."""
    entry = {"image": "v_aug1.npz", "xray": "v_aug1.npy", "patient": "v", "aug": 1}
    (folder / "variants.json").write_text(json.dumps({"training": [], "validation": [entry]}))
    return folder / "variants.json"


def a_file(folder):
    path = folder / "taken.txt"
    path.write_text("not a folder")
    return path


def empty_datalist(folder):
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": [], "validation": []}))
    return path


def test_the_evaluation_loads_no_training_code(no_lpips, model_dir, datalist, tmp_path):
    """Evaluation is on the inference side (issue 16): a fresh process evaluates with the kNN baseline
    (which reads the datalist's training CTs), then lists what it imported."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, warnings; warnings.simplefilter('ignore')\n"
        "from XctDiffCore.commands.cli import main\n"
        f"status = main(['evaluate', '--model', {str(model_dir)!r}, '--data', {str(datalist)!r}, '--out', "
        f"{str(tmp_path / 'eval')!r}, '--steps', '1', '--device', 'cpu'])\n"
        "print(status, ' '.join(sorted(m for m in sys.modules if m.startswith('XctDiffCore'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    status, *loaded = done.stdout.splitlines()[-1].split()  # the last line: after the tables
    assert status == "0" and "XctDiffCore.evaluation.reconstructions" in loaded and "XctDiffCore.datalist" in loaded
    assert [m for m in loaded if m.startswith(("XctDiffCore.training", "XctDiffCore.training.losses", "XctDiffCore.augment"))] == []


# ------------------------------------------------------------------------------------------ long runs


def evaluate_argv(model_dir, datalist, out, *extra):
    """The `evaluated` fixture's command (the same settings), into ``out``."""
    return ["evaluate", "--model", str(model_dir), "--data", str(datalist), "--out", str(out), "--steps", str(STEPS),
            "--samples", str(SAMPLES), "--seed", str(SEED), "--device", "cpu", *extra]


def without_seconds(path):
    with open(path, newline="", encoding="utf-8") as f:
        return [{key: value for key, value in row.items() if key != "seconds"} for row in csv.DictReader(f)]


def test_an_interrupted_run_resumes_at_the_first_case_not_done(no_lpips, model_dir, datalist, evaluated, tmp_path,
                                                               monkeypatch, capsys):
    """Ctrl-C during the second case keeps the first in progress.npz and writes no output; --resume reconstructs
    only the second, and its outputs are the uninterrupted run's (the figure's first case included)."""
    out, seeds, real = tmp_path / "eval", [], XctDiffPipeline.reconstruct

    def reconstruct(self, radiograph, *args, stop_at=None, **kwargs):
        seeds.append(kwargs["seed"])
        if kwargs["seed"] == stop_at:
            raise KeyboardInterrupt
        return real(self, radiograph, *args, **kwargs)

    monkeypatch.setattr(XctDiffPipeline, "reconstruct", lambda *a, **k: reconstruct(*a, stop_at=SEED + 1, **k))
    assert main(evaluate_argv(model_dir, datalist, out)) == 130
    assert sorted(p.name for p in out.iterdir()) == ["progress.npz"]
    assert "1 of 2 cases kept" in capsys.readouterr().err
    seeds.clear()
    monkeypatch.setattr(XctDiffPipeline, "reconstruct", reconstruct)
    assert main(evaluate_argv(model_dir, datalist, out, "--resume")) == 0
    assert "1 of 2 cases done before, continuing" in capsys.readouterr().err
    assert set(seeds) == {SEED + 1}
    assert sorted(p.name for p in out.iterdir()) == ["figure.png", "metrics.csv", "summary.json", "summary.md"]
    reference = evaluated[3]
    assert without_seconds(out / "metrics.csv") == without_seconds(reference / "metrics.csv")
    assert (out / "figure.png").read_bytes() == (reference / "figure.png").read_bytes()
    assert without_run(out / "summary.json") == without_run(reference / "summary.json")


def without_run(summary_json):
    """summary.json without what differs from one run to the next of the same settings (its --out and date)."""
    return {key: value for key, value in json.loads(summary_json.read_text()).items() if key not in ("command", "date")}


def test_resuming_with_other_settings_is_refused_in_one_line(no_lpips, model_dir, datalist, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    real = XctDiffPipeline.reconstruct

    def stop_at_the_second_case(self, radiograph, *args, **kwargs):
        if kwargs["seed"] == SEED + 1:
            raise KeyboardInterrupt
        return real(self, radiograph, *args, **kwargs)

    monkeypatch.setattr(XctDiffPipeline, "reconstruct", stop_at_the_second_case)
    assert main(evaluate_argv(model_dir, datalist, out)) == 130
    capsys.readouterr()
    assert main(evaluate_argv(model_dir, datalist, out, "--resume", "--knn", "0")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: cannot resume the evaluation") and "knn 3 -> 0" in last
    assert sorted(p.name for p in out.iterdir()) == ["progress.npz"]  # kept for the right command


def test_resuming_after_the_model_was_exported_again_in_place_is_refused_in_one_line(no_lpips, datalist, tmp_path,
                                                                                    monkeypatch, capsys):
    """The model folder exported again in place (same id and version, other weights) between the interrupted run
    and --resume: the report mixed the rows of two sets of weights without a word. Now refused, saying what to do;
    a run interrupted before its weights were recorded (older progress.npz) resumes as before."""
    model, out, real = tmp_path / "model", tmp_path / "eval", XctDiffPipeline.reconstruct
    create_random_model(model, "tiny", mean_ct=True)

    def stop_at_the_second_case(self, radiograph, *args, **kwargs):
        if kwargs["seed"] == SEED + 1:
            raise KeyboardInterrupt
        return real(self, radiograph, *args, **kwargs)

    monkeypatch.setattr(XctDiffPipeline, "reconstruct", stop_at_the_second_case)
    assert main(evaluate_argv(model, datalist, out)) == 130
    shutil.rmtree(model)
    create_random_model(model, "tiny", seed=1, mean_ct=True)  # other weights under the same id and version:
    manifest = json.loads((model / "manifest.json").read_text())
    (model / "manifest.json").write_text(json.dumps({**manifest, "version": "seed0"}))
    capsys.readouterr()
    assert main(evaluate_argv(model, datalist, out, "--resume")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot resume the evaluation in {out}: the model's weights changed since it began")
    assert "autoencoder, encoder, diffusion" in last and "another --out, or evaluate without --resume" in last
    assert sorted(p.name for p in out.iterdir()) == ["progress.npz"]  # kept: the old model may come back

    with np.load(out / "progress.npz", allow_pickle=False) as saved:  # as a run before the weights were recorded
        arrays = dict(saved)
    state = json.loads(str(arrays.pop("state")))
    assert set(state.pop("weights")) >= {"autoencoder", "encoder", "diffusion"}
    np.savez(out / "progress.npz", state=np.array(json.dumps(state)), **arrays)
    monkeypatch.setattr(XctDiffPipeline, "reconstruct", real)
    assert main(evaluate_argv(model, datalist, out, "--resume")) == 0
    assert "1 of 2 cases done before, continuing" in capsys.readouterr().err


def test_an_evaluation_folder_being_written_is_refused_to_a_second_run(no_lpips, model_dir, datalist, tmp_path, capsys):
    """A job submitted twice, or a --resume while the first still runs: the two scored the same cases and wrote
    progress.npz and the summary in turns. The second is refused in one line before it loads the model, the folder
    left as it was; once the first has ended, the folder is evaluated."""
    out = tmp_path / "eval"
    argv = evaluate_argv(model_dir, datalist, out, "--max-cases", "1", "--knn", "0")
    for extra in ([], ["--resume"]):
        check_refused_while_held(argv + extra, out, "xctdiff evaluate", capsys)
    assert main(argv + ["--resume"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["figure.png", "metrics.csv", "summary.json", "summary.md"]


def test_a_ct_folder_holding_the_output_folder_is_searched_without_it(no_lpips, model_dir, ct_folder, tmp_path,
                                                                      monkeypatch, capsys):
    """--out inside the CT folder searched: an interrupted run leaves progress.npz there, a CT by its suffix, and
    --resume read it back as a case (an error: not a CT). The output folder is passed over, whatever it holds; the
    CT folder inside --out (or --out itself) is refused in one line."""
    shutil.copytree(ct_folder, tmp_path / "cts")
    out = tmp_path / "cts" / "eval"
    argv = ["evaluate", "--model", str(model_dir), "--data", str(tmp_path / "cts"), "--out", str(out), "--steps", "1",
            "--device", "cpu"]
    real = XctDiffPipeline.reconstruct

    def stop_at_the_second_case(self, radiograph, *args, **kwargs):
        if kwargs["seed"] == 1:
            raise KeyboardInterrupt
        return real(self, radiograph, *args, **kwargs)

    monkeypatch.setattr(XctDiffPipeline, "reconstruct", stop_at_the_second_case)
    assert main(argv) == 130
    assert sorted(p.name for p in out.iterdir()) == ["progress.npz"]
    monkeypatch.setattr(XctDiffPipeline, "reconstruct", real)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    with open(out / "metrics.csv", newline="", encoding="utf-8") as f:
        assert sorted({r["case"] for r in csv.DictReader(f)}) == ["chest0", "chest1", "chest2"]
    before = sorted(tmp_path.rglob("*"))
    for data, named in ((out, out), (tmp_path / "cts", tmp_path / "cts")):
        capsys.readouterr()
        assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--out", str(named)]) == 2
        (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert error.startswith(f"error: {data} is in the output folder {named}: a job does not read its own "), error
    assert sorted(tmp_path.rglob("*")) == before


def test_an_output_folder_that_holds_the_model_or_the_datalist_is_refused(model_dir, datalist, tmp_path, monkeypatch,
                                                                         capsys):
    """`--out MODEL` wrote metrics.csv, summary.md/json and figure.png into the model folder (then a part of what
    export copies and inspect lists), `--out DS` beside the datalist: each is refused in one line, before the model
    is loaded (the check evaluate-autoencoder and evaluate-style share), and nothing is written."""
    model = Path(shutil.copytree(model_dir, tmp_path / "model"))
    data = Path(shutil.copytree(datalist.parent, tmp_path / "ds")) / datalist.name
    before = sorted(tmp_path.rglob("*"))
    loads = []
    monkeypatch.setattr(XctDiffPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    for out in (model, data.parent, tmp_path):
        capsys.readouterr()
        assert main(["evaluate", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"is in the output folder {out}" in err and len(err.splitlines()) == 1, err
    assert loads == [] and sorted(tmp_path.rglob("*")) == before


# ------------------------------------------------------------------------------------------ comparing evaluations


def shifted_copy(evaluation, folder, method, psnr_shift, drop_case=None):
    """A copy of an evaluation folder with ``method``'s PSNR raised by ``psnr_shift`` dB on every case (and, with
    ``drop_case``, that case's rows left out): a second model's run, without running one."""
    folder = Path(shutil.copytree(evaluation, folder))
    with open(folder / "metrics.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, [row for row in reader if row["case"] != drop_case]
    for row in rows:
        if row["method"] == method:
            row["psnr"] = str(float(row["psnr"]) + psnr_shift)
    with open(folder / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_two_evaluations_side_by_side_with_paired_differences(evaluated, tmp_path, capsys):
    """Two models' summaries had to be laid side by side by hand. `xctdiff evaluate-compare A B` puts each method's
    means of both in one table, then B - A per case on the cases both scored, and on how many B is better."""
    first = evaluated[3]
    second = shifted_copy(first, tmp_path / "model_b", "direct", 1.0)
    report = tmp_path / "comparison.md"
    capsys.readouterr()
    assert main(["evaluate-compare", str(first), str(second), "--out", str(report)]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and out == report.read_text(encoding="utf-8") + f"wrote {report}\n"
    assert "- **eval**: model `random seed0`, 2 cases, " in out and "- **model_b**: model `random seed0`" in out
    table = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in out.splitlines() if line.startswith("| ")}
    assert ("direct (no diffusion)", "eval") in table and ("direct (no diffusion)", "model_b") in table
    paired = out.split("Paired, on the 2 cases all scored")[1]
    direct = next(line for line in paired.splitlines() if line.startswith("| direct (no diffusion) | model_b"))
    assert [c.strip() for c in direct.split("|")[3:5]] == ["+1.00 ± 0.00", "+0.000 ± 0.000"] and "| 2 of 2 |" in direct
    mean_ct = next(line for line in paired.splitlines() if line.startswith("| mean training CT | model_b"))
    assert "+0.00 ± 0.00" in mean_ct and "| 0 of 2 |" in mean_ct


def test_evaluations_of_other_cases_are_compared_on_the_shared_ones_with_a_warning(evaluated, tmp_path, capsys):
    first = evaluated[3]
    case = json.loads((first / "summary.json").read_text())["case_names"][0]
    second = shifted_copy(first, tmp_path / "fewer", "direct", -0.5, drop_case=case)
    capsys.readouterr()
    assert main(["evaluate-compare", str(first), str(second)]) == 0
    out, err = capsys.readouterr()
    assert "warning: the evaluations scored different cases (2, 1; 1 shared): their means do not compare" in err
    assert "Paired, on the 1 cases all scored" in out and "-0.50 ± 0.00" in out


@pytest.mark.parametrize("kind, words", [
    ("empty", "is not a finished `xctdiff evaluate` folder: no summary.json and metrics.csv"),
    ("interrupted", "(it holds an interrupted run: finish it with `xctdiff evaluate ... --resume`)"),
    ("missing", "evaluation folder not found"),
])
def test_a_folder_that_is_no_finished_evaluation_is_one_line(evaluated, tmp_path, capsys, kind, words):
    folder = tmp_path / "eval"
    if kind != "missing":
        folder.mkdir()
    if kind == "interrupted":
        (folder / "progress.npz").write_bytes(b"")
    capsys.readouterr()
    assert main(["evaluate-compare", str(evaluated[3]), str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
