"""`xctdiff reconstruct` (XctDiffCore/commands/reconstruct_job.py) on a tiny model with random weights: one file
(formats, views, uncertainty, progress lines), a folder (batch, failures, the torchrun split), every bad
input of test_bad_input.py (one `error:` line, exit status 2, no traceback, no file left) and cancel."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE_CT, SAMPLE_RADIOGRAPH
from test_bad_input import CASES
from test_io import dicom_without_image

from XctDiffCore.commands.cli import main
from XctDiffCore.io import read_ct, read_radiograph
from XctDiffCore.model_folder import create_random_model
from XctDiffCore.pipeline import XctDiffPipeline
from XctDiffCore.figures import GAP, LABEL_HEIGHT, PANEL_SIZE

STEPS = "2"
GRID, SPACING = 128, 2.5
RADIOGRAPH_CASES = [name for name, (_, kind, _) in CASES.items() if kind == "radiograph"]
MAGIC = {".nrrd": b"NRRD", ".nii.gz": b"\x1f\x8b", ".mha": b"ObjectType"}


def listing(folder):
    """Everything under a folder, hidden temporary files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def views_size(rows: int, caption_lines: int = 2) -> tuple:
    """(width, height) of a views PNG: five panels a row (input, DRR, three slices), then the caption (the score
    and the run; the research-use line: two lines when the result has no warning)."""
    return (5 * (PANEL_SIZE + GAP) - GAP,
            rows * (PANEL_SIZE + LABEL_HEIGHT + GAP) - GAP + GAP + caption_lines * LABEL_HEIGHT + 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("model") / "tiny", "tiny")


@pytest.fixture(scope="module")
def reference(model_dir):
    """What the Python API gives for the film with the options the tests pass on the command line."""
    return XctDiffPipeline.from_pretrained(model_dir).reconstruct(SAMPLE_RADIOGRAPH, steps=int(STEPS), seed=0, device="cpu")


@pytest.fixture
def cli(capsys, model_dir):
    """``cli(input, *options)``: run `xctdiff reconstruct` in this process -> (status, stdout, stderr)."""

    def run(source, *options, model=model_dir):
        capsys.readouterr()
        args = ["reconstruct", str(source), "--model", str(model), "--device", "cpu", "--steps", STEPS, *map(str, options)]
        status = main(args)
        out, err = capsys.readouterr()
        return status, out, err

    return run


def progress_and_result(stdout: str) -> tuple:
    """The PROGRESS fractions and the RESULT object of --progress-lines output (RESULT must be the last line)."""
    lines = stdout.splitlines()
    assert lines[-1].startswith("RESULT "), lines[-3:]
    fractions = [float(line.split()[1]) for line in lines if line.startswith("PROGRESS ")]
    return fractions, json.loads(lines[-1][len("RESULT "):])


def assert_one_error_line(err: str, words: str) -> str:
    """The last line on stderr is the only `error: ` line and holds ``words``; no traceback (tqdm may come before)."""
    assert "Traceback" not in err
    lines = err.replace("\r", "\n").splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert words in errors[0], errors[0]
    return errors[0]


def assert_output_grid(volume):
    assert volume.array.shape == (GRID,) * 3
    np.testing.assert_allclose(volume.spacing, (SPACING,) * 3)
    np.testing.assert_allclose(volume.origin, (-(GRID - 1) / 2 * SPACING,) * 3)
    np.testing.assert_allclose(volume.direction, np.eye(3), atol=1e-12)


# ------------------------------------------------------------------------------------------ one file


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_writes_the_ct_in_the_format_of_its_extension(cli, reference, tmp_path, suffix):
    out = tmp_path / f"ct{suffix}"
    status, stdout, _ = cli(SAMPLE_RADIOGRAPH, "-o", out, "--seed", 0)
    assert status == 0
    assert listing(tmp_path) == [out.name]
    assert out.read_bytes()[: len(MAGIC[suffix])] == MAGIC[suffix]
    ct = read_ct(out)
    assert_output_grid(ct)
    np.testing.assert_array_equal(ct.array, reference.ct.array)  # the options reached the pipeline
    assert f" -> {out} in " in stdout and "consistency" in stdout


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz", "dicom"])
def test_a_written_ct_says_it_is_synthetic_and_what_made_it(cli, tmp_path, capsys, suffix):
    """A CT file is no scan: its header says so (NIfTI in its 79-character description), and `inspect` shows it."""
    from XctDiffCore.io import volume_notes

    out = tmp_path / ("series" if suffix == "dicom" else f"ct{suffix}")
    status, _, err = cli(SAMPLE_RADIOGRAPH, "-o", out, *(["--format", "dicom"] if suffix == "dicom" else []))
    assert status == 0, err
    notes = volume_notes(out)
    assert "XctDiff" in notes["summary"] and "research use" in notes["summary"]
    if suffix in (".nrrd", ".mha"):
        assert notes["film"] == SAMPLE_RADIOGRAPH.name and "method" in notes["settings"] and "consistency" in notes["settings"]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    made_by = [line for line in lines if line.startswith("made_by: ")]  # the README: inspect prints both, a series too
    if suffix == ".nii.gz":  # 79 characters of description: the summary alone
        assert any(line.startswith("synthetic: XctDiff synthetic CT") for line in lines) and not made_by, lines
    else:
        assert "synthetic: synthetic CT reconstructed by XctDiff from one radiograph: research use, not diagnosis" in lines
        assert len(made_by) == 1 and "method" in made_by[0] and "consistency" in made_by[0], lines
    assert volume_notes(SAMPLE_CT) == {}


def test_default_output_is_beside_the_input(cli, tmp_path):
    source = tmp_path / "chest.dcm"
    shutil.copy(SAMPLE_RADIOGRAPH, source)
    status, _, _ = cli(source, "--seed", 0)
    assert status == 0
    assert listing(tmp_path) == ["chest.dcm", "chest_ct.nrrd"]
    assert_output_grid(read_ct(tmp_path / "chest_ct.nrrd"))


def test_dicom_series_joins_the_films_study(cli, reference, tmp_path):
    """--format dicom: a CT series folder (the reference's voxels, in the output grid) in the DICOM film's study."""
    import pydicom

    source = tmp_path / "chest.dcm"
    shutil.copy(SAMPLE_RADIOGRAPH, source)
    status, stdout, err = cli(source, "--seed", 0, "--format", "dicom")
    assert status == 0, err
    series = tmp_path / "chest_ct"
    assert listing(tmp_path) == ["chest.dcm", "chest_ct"] + [f"chest_ct/IM{k:04d}.dcm" for k in range(1, GRID + 1)]
    assert f" -> {series} in " in stdout
    ct = read_ct(series)
    assert_output_grid(ct)
    np.testing.assert_array_equal(ct.array, reference.ct.array)
    film = pydicom.dcmread(source, stop_before_pixels=True)
    first = pydicom.dcmread(series / "IM0001.dcm", stop_before_pixels=True)
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber"):
        assert first.get(keyword) == film.get(keyword), keyword
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and first.Modality == "CT"
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"] and "not diagnosis" in first.SeriesDescription
    assert first.SourceImageSequence[0].ReferencedSOPInstanceUID == film.SOPInstanceUID
    assert "xctdiff" in first.DerivationDescription.lower() and "seed 0" in first.DerivationDescription
    assert first.FrameOfReferenceUID != film.get("FrameOfReferenceUID")
    # a second run replaces the series (a new one); a folder holding anything else is the user's: refused
    status, _, err = cli(source, "--seed", 0, "--format", "dicom")
    assert status == 0, err
    again = pydicom.dcmread(series / "IM0001.dcm", stop_before_pixels=True)
    assert len(listing(series)) == GRID and again.SeriesInstanceUID != first.SeriesInstanceUID
    (series / "notes.txt").write_text("mine\n")
    status, stdout, err = cli(source, "--format", "dicom")
    assert status == 2 and stdout == ""
    assert_one_error_line(err, "holds other files (notes.txt")
    assert len(listing(series)) == GRID + 1


def test_dicom_series_of_a_png_film_is_a_new_study(cli, drr_png, tmp_path):
    import pydicom

    status, _, err = cli(drr_png, "-o", tmp_path / "series", "--format", "dicom")
    assert status == 0, err
    first = pydicom.dcmread(tmp_path / "series" / "IM0001.dcm", stop_before_pixels=True)
    assert first.PatientID == "" and first.StudyInstanceUID and "SourceImageSequence" not in first


def test_a_film_on_its_side_is_turned_by_turn_auto_and_its_ct_says_so(cli, tmp_path):
    """`--turn auto` stands a film on its side head up; the summary line and the CT's own header say how it was turned."""
    from PIL import Image

    from XctDiffCore.io import volume_notes

    film = read_radiograph(SAMPLE_RADIOGRAPH).image
    side = tmp_path / "side.png"
    Image.fromarray(np.rot90(np.rint((film - film.min()) / np.ptp(film) * 255)).astype(np.uint8)).save(side)
    status, out, err = cli(side, "-o", tmp_path / "ct.nrrd", "--turn", "auto")
    assert status == 0, err
    assert out.strip().splitlines()[-1].endswith(", film turned a quarter clockwise")
    assert "warning: the film looked turned on its side: it was turned a quarter clockwise" in err
    assert volume_notes(tmp_path / "ct.nrrd")["settings"].endswith(", film turned a quarter clockwise")
    status, out, err = cli(side, "-o", tmp_path / "as_is.nrrd")  # without it: the warning names the way back
    assert status == 0 and "stand it head up, a quarter turn clockwise (--turn clockwise, or --turn auto)" in err
    assert "settings" in volume_notes(tmp_path / "as_is.nrrd") and "film" not in volume_notes(tmp_path / "as_is.nrrd")["settings"]


def test_every_film_of_a_folder_has_its_warnings_named_not_only_the_first_of_a_kind(cli, tmp_path):
    """Eight films of a folder with the same warning gave ONE warning line (Python shows a warning once per place),
    unnamed: which films it was about, and that the others had it too, were left to the last line's list; under
    torchrun two processes' lines interleave besides. Now each film's warnings name it, every time; a warning about
    the run (--steps with the direct method) still comes once."""
    from PIL import Image

    film = read_radiograph(SAMPLE_RADIOGRAPH).image
    folder = tmp_path / "films"
    folder.mkdir()
    for name in ("a", "b"):  # on its side: a warning naming the way back
        Image.fromarray(np.rot90(np.rint((film - film.min()) / np.ptp(film) * 255)).astype(np.uint8)).save(folder / f"{name}.png")
    status, _, err = cli(folder, "-o", tmp_path / "out", "--method", "direct")
    assert status == 0, err
    side = [line for line in err.splitlines() if line.startswith("warning: ") and "on its side" in line]
    assert [line.split(": ")[1] for line in side] == [str(folder / "a.png"), str(folder / "b.png")], err
    assert err.count("warning: the direct method does not sample") == 1, err


def test_views_png(cli, tmp_path):
    from PIL import Image

    status, _, _ = cli(SAMPLE_RADIOGRAPH, "-o", tmp_path / "ct.nrrd", "--views", tmp_path / "views.png")
    assert status == 0
    assert listing(tmp_path) == ["ct.nrrd", "views.png"]
    with Image.open(tmp_path / "views.png") as image:
        assert image.format == "PNG" and image.mode == "L" and image.size == views_size(rows=1)
        assert np.asarray(image).std() > 10  # panels were drawn, not a blank canvas


def test_the_views_caption_says_the_score_the_run_and_every_warning():
    """A person who only opens the PNG learns what was run and how far to trust it."""
    from types import SimpleNamespace

    from PIL import Image

    from XctDiffCore.figures import reconstruction_caption, with_caption

    long_warning = "the DICOM header says this is a lateral view (View Position LL); " * 4
    result = SimpleNamespace(consistency=0.6543, unguided_consistency=0.61, guidance=1.0, method="diffusion", steps=10,
                             seed=7, samples=3, styled=True, precision="bf16", warnings=[long_warning, "guidance skipped"],
                             ap_diameter=None, learnt_ap_diameter=None, turn="none", mirrored=False)
    lines = reconstruction_caption(result)
    assert lines[0] == ("consistency 0.654 (guided 1; 0.610 before guidance); diffusion, 10 steps, seed 7, mean of 3 "
                        "samples; style transfer on; bf16")
    turned = reconstruction_caption(SimpleNamespace(**{**vars(result), "turn": "anticlockwise", "mirrored": True}))
    assert turned[0].endswith("; bf16; film mirrored and turned a quarter anticlockwise")
    assert lines[1:3] == [f"warning: {long_warning}", "warning: guidance skipped"]
    assert lines[-1].endswith("research use, not diagnosis")
    direct = SimpleNamespace(**{**vars(result), "method": "direct", "samples": 1, "unguided_consistency": None,
                                "warnings": []})
    assert reconstruction_caption(direct)[0] == "consistency 0.654; direct; style transfer on; bf16"
    stretched = SimpleNamespace(**{**vars(direct), "ap_diameter": 250.0, "learnt_ap_diameter": 231.7})
    assert reconstruction_caption(stretched)[1] == ("stretched front to back to the given AP diameter, 250 mm "
                                                    "(the model's own: 232 mm)")
    panels = Image.new("L", views_size(rows=1, caption_lines=0)[:1] + (100,), 0)
    captioned = with_caption(panels, lines)
    assert captioned.width == panels.width and captioned.height > panels.height + 5 * LABEL_HEIGHT  # wrapped
    assert np.asarray(captioned)[panels.height:].max() == 255  # the text is drawn


def test_uncertainty_and_views_with_two_samples(cli, tmp_path):
    from PIL import Image

    status, _, _ = cli(SAMPLE_RADIOGRAPH, "-o", tmp_path / "ct.mha", "--samples", 2, "--seed", 1,
                       "--uncertainty", tmp_path / "std.nii.gz", "--views", tmp_path / "views.png")
    assert status == 0
    assert listing(tmp_path) == ["ct.mha", "std.nii.gz", "views.png"]
    std = read_ct(tmp_path / "std.nii.gz")
    assert_output_grid(std)
    assert std.array.dtype == np.float32 and std.array.min() >= 0 and std.array.max() > 1.0
    from XctDiffCore.io import volume_notes

    assert volume_notes(tmp_path / "std.nii.gz")["summary"].startswith("XctDiff uncertainty")  # not a CT, nor a scan
    with Image.open(tmp_path / "views.png") as image:
        assert image.size == views_size(rows=2)  # a second row: the uncertainty's slices


def test_uncertainty_needs_two_samples(cli, tmp_path, monkeypatch):
    """Refused before the model loads (it was refused after: seconds, or minutes for a large model, for what the
    command line already said), for a film and for a folder."""
    import XctDiffCore.commands.reconstruct_job as job

    monkeypatch.setattr(job, "_load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "films").mkdir()
    for given in (SAMPLE_RADIOGRAPH, tmp_path / "films"):
        status, stdout, err = cli(given, "-o", tmp_path / "out" / "ct.nrrd", "--uncertainty", tmp_path / "std.nrrd")
        assert status == 2
        assert_one_error_line(err, "an uncertainty map needs --samples 2 or more")
        assert listing(tmp_path) == ["films"] and stdout == ""


def test_one_film_under_torchrun_is_reconstructed_by_rank_0_alone(cli, tmp_path, monkeypatch):
    """Every rank reconstructed a single film and wrote the same files at the same time."""
    monkeypatch.setattr("XctDiffCore.device.torchrun_rank", lambda: (1, 2, 1))
    status, stdout, err = cli(SAMPLE_RADIOGRAPH, "-o", tmp_path / "ct.nrrd")
    assert status == 0 and listing(tmp_path) == [] and stdout == ""
    assert err.strip() == "rank 1 of 2: one radiograph, reconstructed by rank 0"


def test_progress_lines_and_result(cli, tmp_path):
    out = tmp_path / "ct.nrrd"
    status, stdout, err = cli(SAMPLE_RADIOGRAPH, "-o", out, "--seed", 3, "--progress-lines")
    assert status == 0 and "error" not in err
    fractions, result = progress_and_result(stdout)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert "PROGRESS 1.0000 done" in stdout.splitlines()
    assert result["output"] == str(out) and result["files"] == [str(out)]
    assert (result["seed"], result["samples"], result["steps"], result["method"]) == (3, 1, int(STEPS), "diffusion")
    assert result["style"] is True  # a real film: the style stage ran
    assert result["device"].startswith("cpu") and 0.0 <= result["consistency"] <= 1.0
    assert {"load", "read", "sampling", "decoding", "write", "total"} <= set(result["timings"])


def test_style_auto_leaves_a_drr_alone_and_off_switches_it_off(cli, drr_png, tmp_path):
    status, stdout, _ = cli(drr_png, "-o", tmp_path / "a.nrrd", "--progress-lines")
    assert status == 0 and progress_and_result(stdout)[1]["style"] is False
    status, stdout, _ = cli(SAMPLE_RADIOGRAPH, "-o", tmp_path / "b.nrrd", "--progress-lines", "--style", "off")
    assert status == 0 and progress_and_result(stdout)[1]["style"] is False
    status, stdout, _ = cli(drr_png, "-o", tmp_path / "c.nrrd", "--progress-lines", "--style", "on")
    assert status == 0 and progress_and_result(stdout)[1]["style"] is True


def test_sampler_option(cli, tmp_path):
    """In fp32: random tiny weights have near-tied codes, and bf16 rounding can land both samplers on the same ones."""
    for sampler in ("ddim", "dpm-solver++"):
        status, _, _ = cli(SAMPLE_RADIOGRAPH, "-o", tmp_path / f"{sampler}.nrrd", "--seed", 0, "--sampler", sampler,
                           "--precision", "fp32")
        assert status == 0
    assert not np.array_equal(read_ct(tmp_path / "dpm-solver++.nrrd").array, read_ct(tmp_path / "ddim.nrrd").array)


def test_bad_output_type_fails_before_the_model_is_loaded(cli, tmp_path):
    status, _, err = cli(SAMPLE_RADIOGRAPH, "-o", tmp_path / "ct.vtk", model=tmp_path / "no-model")
    assert status == 2
    assert_one_error_line(err, "cannot write a volume as '.vtk'")  # not the missing model: checked first
    assert listing(tmp_path) == []


def test_cuda_without_a_gpu(cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    status, _, err = cli(SAMPLE_RADIOGRAPH, "-o", tmp_path / "ct.nrrd", "--device", "cuda")  # the last --device wins
    assert status == 2
    assert_one_error_line(err, "cannot use cuda")
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("case", RADIOGRAPH_CASES)
def test_bad_input_one_error_line(cli, tmp_path, case):
    build, _, words = CASES[case]
    source = build(tmp_path)
    before = listing(tmp_path)
    status, stdout, err = cli(source, "-o", tmp_path / "ct.nrrd", "--samples", 2, "--uncertainty", tmp_path / "std.nrrd",
                              "--views", tmp_path / "views.png")
    assert status == 2
    line = assert_one_error_line(err, words)
    assert source.name in line
    assert stdout == ""
    assert listing(tmp_path) == before
    assert not (SAMPLE_CT.parent / "LIDC-IDRI-0001_ct_ct.nrrd").exists()


@pytest.mark.parametrize(
    "output, words",
    [("no/such/folder/ct.nrrd", "output folder does not exist"), (".", "output path is a folder"),
     ("ct.nrrd --format dicom", "a DICOM series is a folder"), ("ct.nrrd --format mha", "is a .nrrd file"),
     ("ct", "(or --format dicom for a DICOM series folder)"),
     ("no/such/folder/series --format dicom", "output folder does not exist")],
    ids=["missing folder", "a folder", "dicom to a file", "format against suffix", "no suffix", "dicom, missing folder"],
)
def test_bad_output_path(cli, tmp_path, output, words):
    output, *options = output.split()
    status, stdout, err = cli(SAMPLE_RADIOGRAPH, "-o", tmp_path / output, *options)
    assert status == 2 and stdout == ""
    assert_one_error_line(err, words)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("case", ["text named .png", "truncated DICOM", "output folder missing"])
def test_bad_input_in_a_separate_process(tmp_path, model_dir, case):
    """As the Slicer module runs it: exit status 2, the last stderr line `error: ...`, no traceback."""
    if case == "output folder missing":
        source, output, words = SAMPLE_RADIOGRAPH, tmp_path / "no" / "ct.nrrd", "output folder does not exist"
    else:
        build, _, words = CASES[case]
        source, output = build(tmp_path), tmp_path / "ct.nrrd"
    before = listing(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "XctDiffCore", "reconstruct", str(source), "-o", str(output), "--model", str(model_dir),
         "--device", "cpu", "--steps", STEPS, "--progress-lines"],
        cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, words)
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # --progress-lines: nothing else on stderr
    assert "RESULT" not in result.stdout
    assert listing(tmp_path) == before


# ------------------------------------------------------------------------------------------ folders


@pytest.fixture
def batch(tmp_path, drr_png):
    """A folder of two radiographs, plus what batch mode must skip: a text file, a hidden file, a sub-folder."""
    folder = tmp_path / "batch"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(SAMPLE_RADIOGRAPH, folder / "film.dcm")
    shutil.copy(drr_png, folder / "drr.png")
    shutil.copy(SAMPLE_RADIOGRAPH, folder / ".hidden.dcm")
    shutil.copy(SAMPLE_RADIOGRAPH, folder / "sub" / "deeper.dcm")
    (folder / "notes.txt").write_text("not a radiograph\n")
    return folder


def test_folder_reconstructs_every_radiograph(cli, batch, tmp_path):
    status, stdout, err = cli(batch, "--samples", 2, "--seed", 0, "--progress-lines",
                              "--views", tmp_path / "views", "--uncertainty", tmp_path / "std")
    assert status == 0, err
    out = tmp_path / "batch_ct"  # the default: <folder>_ct beside the folder
    assert listing(out) == ["drr_ct.nrrd", "film_ct.nrrd"]
    assert listing(tmp_path / "std") == ["drr_uncertainty.nrrd", "film_uncertainty.nrrd"]
    assert listing(tmp_path / "views") == ["drr_views.png", "film_views.png"]
    for name in ("drr_ct.nrrd", "film_ct.nrrd"):
        assert_output_grid(read_ct(out / name))
    fractions, result = progress_and_result(stdout)
    assert all(b >= a for a, b in zip(fractions, fractions[1:])) and fractions[-1] == 1.0
    assert result["failed"] == []
    cases = {case["input"]: case for case in result["cases"]}
    assert sorted(cases) == [str(batch / "drr.png"), str(batch / "film.dcm")]
    assert cases[str(batch / "film.dcm")]["output"] == str(out / "film_ct.nrrd")
    assert cases[str(batch / "drr.png")]["style"] is False and cases[str(batch / "film.dcm")]["style"] is True
    assert result["consistency"] == pytest.approx(np.mean([c["consistency"] for c in result["cases"]]), abs=1e-4)
    assert re.match(r"reconstructed 2 of 2 radiographs in \d+ s \(\d+\.\d s each, the model's loading included\)",
                    err.strip().splitlines()[-1])


def test_a_warning_during_a_progress_bar_gets_a_line_of_its_own(monkeypatch):
    """Printed while a bar was drawn, a warning ended the bar's line ("...scoring kNN]warning: ..."); now the bar is
    lifted for it and drawn again."""
    import io
    import warnings

    from tqdm import tqdm

    from XctDiffCore.commands.reconstruct_job import plain_warnings

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with plain_warnings():
        with tqdm(total=2, file=sys.stderr, desc="evaluate", mininterval=0) as bar:
            bar.update(1)
            warnings.warn("the reconstruction is unreliable")
            bar.update(1)
    text = stream.getvalue()
    assert "warning: the reconstruction is unreliable\n" in text
    assert "]warning" not in text and "|warning" not in text
    before = text.split("warning: ")[0]
    assert before.endswith("\r") or before.endswith("\n"), repr(before[-40:])


def test_a_folders_last_line_counts_the_films_and_names_the_flagged_and_skipped_ones():
    """The skipped films are named too: their lines are above among hundreds, under torchrun among two processes'."""
    from XctDiffCore.commands.reconstruct_job import batch_tally

    flagged = [f"f{i}.png" for i in range(14) if i % 2]
    line = batch_tally(14, flagged, ["bad.png"], 15, 70.0)
    assert line == ("reconstructed 14 of 15 radiographs in 70 s (5.0 s each, the model's loading included); 7 with "
                    "warnings (above): f1.png, f3.png, f5.png, f7.png, f9.png and 2 more; 1 skipped (above): bad.png")
    assert batch_tally(0, [], ["bad.png"], 1, 2.0) == "reconstructed 0 of 1 radiographs in 2 s; 1 skipped (above): bad.png"
    assert batch_tally(2, [], [], 2, 4.0, processes=2) == ("reconstructed 2 of 2 radiographs in 4 s by 2 processes "
                                                          "(2.0 s each, the model's loading included)")


def read_report(path) -> list:
    import csv

    with open(path, newline="", encoding="utf-8-sig") as handle:
        return list(csv.DictReader(handle))


def test_a_folders_report_has_one_row_per_radiograph_for_a_spreadsheet(cli, batch, tmp_path):
    """A thousand films' summary lines in a log were the only record of a folder's run: --report writes one row per
    film (reconstructed with its consistency and warnings, skipped with the reason, already done under
    --skip-existing), sorted, written whole even when a film failed."""
    (batch / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    report = tmp_path / "report.csv"
    status, _, err = cli(batch, "--report", report)
    assert status == 2 and f"report: {report} (one row per radiograph)" in err
    rows = read_report(report)
    assert [(r["film"], r["status"]) for r in rows] == [("broken.png", "skipped"), ("drr.png", "reconstructed"),
                                                         ("film.dcm", "reconstructed")]
    assert rows[0]["reason"] and not rows[0]["output"]
    for r in rows[1:]:
        assert -1.0 <= float(r["consistency"]) <= 1.0 and r["output"].endswith("_ct.nrrd") and float(r["seconds"]) >= 0
        assert r["method"] and r["precision"] in ("fp32", "bf16") and r["device"].startswith("cpu")
    (batch / "broken.png").unlink()
    status, _, err = cli(batch, "--report", report, "--skip-existing")
    assert status == 0, err
    assert {r["status"] for r in read_report(report)} == {"already done"}


def test_a_report_that_would_replace_a_film_or_an_output_is_refused_before_any_work(cli, batch, tmp_path):
    for given, clash in ((batch / "drr.png", batch / "drr.png"), (batch, batch / "film.dcm"),
                         (batch, tmp_path / "batch_ct" / "film_ct.nrrd")):
        status, stdout, err = cli(given, "--report", clash)
        assert status == 2 and stdout == ""
        assert_one_error_line(err, f"the report {clash} is ")
    assert not (tmp_path / "batch_ct").exists() and not (tmp_path / "drr_ct.nrrd").exists()


def test_skip_existing_reconstructs_a_film_replaced_under_its_name_with_an_older_date(cli, batch, tmp_path):
    """`cp -p`, `rsync -a` or an archive unpacked keeps a film's own date: another film put in under the same name
    was taken for done (its CT newer than that date). The CT records its film's size and SHA-256, and a film of
    another size, or of the same size with other bytes (two exports' `IM000001`), is reconstructed again."""
    import os

    from XctDiffCore.io import volume_notes

    status, _, err = cli(batch)
    assert status == 0, err
    ct = tmp_path / "batch_ct" / "drr_ct.nrrd"
    assert volume_notes(ct)["film_bytes"] == str((batch / "drr.png").stat().st_size)

    def replace(name, write):  # another film under the name, its old date put back
        earlier = (batch / name).stat()
        write(batch / name)
        os.utime(batch / name, ns=(earlier.st_atime_ns, earlier.st_mtime_ns))

    replace("drr.png", lambda path: shutil.copy(batch / "film.dcm", path))  # another size
    status, stdout, err = cli(batch, "--skip-existing")
    assert status == 0, err
    assert "left out 1 of 2 radiographs" in err and stdout.splitlines()[0].startswith(str(batch / "drr.png"))

    film = bytearray((batch / "film.dcm").read_bytes())
    film[-2:] = bytes(255 - b for b in film[-2:])  # the same size, one pixel's value changed
    replace("film.dcm", lambda path: path.write_bytes(bytes(film)))
    status, stdout, err = cli(batch, "--skip-existing")
    assert status == 0, err
    assert "left out 1 of 2 radiographs" in err and stdout.splitlines()[0].startswith(str(batch / "film.dcm"))
    status, _, err = cli(batch, "--skip-existing")  # and nothing is left to do after that
    assert status == 0 and "left out 2 of 2 radiographs" in err, err

def test_skip_existing_continues_an_interrupted_folder(cli, batch, tmp_path, monkeypatch):
    """--skip-existing leaves out a film whose outputs are all there and newer than it; a film without its views, or
    edited since its CT was written, is reconstructed again."""
    import os

    views = tmp_path / "views"
    status, _, err = cli(batch, "--views", views)
    assert status == 0, err
    out = tmp_path / "batch_ct"
    kept = (out / "film_ct.nrrd").stat().st_mtime_ns
    (views / "drr_views.png").unlink()  # as if the run had stopped before the second film
    status, stdout, err = cli(batch, "--views", views, "--skip-existing")
    assert status == 0, err
    assert "left out 1 of 2 radiographs: their outputs are there" in err
    assert [line.split(" -> ")[0] for line in stdout.splitlines()] == [str(batch / "drr.png")]
    assert (out / "film_ct.nrrd").stat().st_mtime_ns == kept and (views / "drr_views.png").is_file()
    film = (batch / "film.dcm").stat().st_mtime_ns
    for name in ("film_ct.nrrd", "film_views.png"):  # the film changed after its outputs were written
        os.utime(out / name if name.endswith(".nrrd") else views / name, ns=(film - 10**9, film - 10**9))
    status, stdout, err = cli(batch, "--views", views, "--skip-existing")
    assert status == 0 and [line.split(" -> ")[0] for line in stdout.splitlines()] == [str(batch / "film.dcm")]
    status, stdout, err = cli(batch, "--views", views, "--skip-existing")
    assert status == 0 and stdout == "" and "left out 2 of 2 radiographs" in err
    import XctDiffCore.atomic

    access = os.access  # the outputs' folders read-only now (an archive mounted so): nothing to write, so no refusal
    frozen = {out.resolve(), views.resolve()}
    monkeypatch.setattr(XctDiffCore.atomic.os, "access", lambda path, mode, **kw: False if Path(path).resolve() in frozen
                        and mode & os.W_OK else access(path, mode, **kw))
    status, stdout, err = cli(batch, "--views", views, "--skip-existing")
    assert status == 0 and stdout == "" and "left out 2 of 2 radiographs" in err, err
    status, _, err = cli(batch, "--views", views)  # without it, the folders must be writable: refused first
    assert status == 2 and "not writable" in err, err


def test_folder_as_dicom_series(cli, batch, tmp_path):
    status, stdout, err = cli(batch, "--format", "dicom", "-o", tmp_path / "series")
    assert status == 0, err
    assert sorted(p.name for p in (tmp_path / "series").iterdir()) == ["drr_ct", "film_ct"]
    for name in ("drr_ct", "film_ct"):
        assert_output_grid(read_ct(tmp_path / "series" / name))


def test_the_current_folder_as_input_writes_beside_it(cli, tmp_path, drr_png, monkeypatch):
    """`xctdiff reconstruct .` in a folder of films: "." has no name, the folder has (was a traceback)."""
    folder = tmp_path / "films"
    folder.mkdir()
    shutil.copy(drr_png, folder / "drr.png")
    monkeypatch.chdir(folder)
    status, _, err = cli(".")
    assert status == 0, err
    assert listing(tmp_path / "films_ct") == ["drr_ct.nrrd"]


def test_folder_skips_bad_files_and_ends_with_an_error(cli, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(SAMPLE_RADIOGRAPH, folder / "film.dcm")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("hello\n")
    status, stdout, err = cli(folder, "-o", tmp_path / "out", "--progress-lines")
    assert status == 2
    assert listing(tmp_path / "out") == ["film_ct.nrrd"]
    assert f"skipped {folder / 'empty.png'}: file is empty" in err
    assert f"skipped {folder / 'text.png'}:" in err
    assert_one_error_line(err, "2 of 3 radiographs could not be reconstructed")
    _, result = progress_and_result(stdout)
    assert result["failed"] == [str(folder / "empty.png"), str(folder / "text.png")]
    assert [c["input"] for c in result["cases"]] == [str(folder / "film.dcm")]


def test_torchrun_splits_the_folder_by_rank(cli, tmp_path, drr_png, monkeypatch):
    folder = tmp_path / "many"
    folder.mkdir()
    for name in "abc":
        shutil.copy(drr_png, folder / f"{name}.png")
    out = tmp_path / "out"
    inputs = {}
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        status, stdout, _ = cli(folder, "-o", out, "--progress-lines")
        assert status == 0
        inputs[rank] = [case["input"] for case in progress_and_result(stdout)[1]["cases"]]
        if rank == 0:
            assert listing(out) == ["a_ct.nrrd", "c_ct.nrrd"]  # files rank::world_size
    assert inputs == {0: [str(folder / "a.png"), str(folder / "c.png")], 1: [str(folder / "b.png")]}
    assert listing(out) == ["a_ct.nrrd", "b_ct.nrrd", "c_ct.nrrd"]


def test_a_rank_without_files_succeeds(cli, tmp_path, drr_png, monkeypatch):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(drr_png, folder / "a.png")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    status, stdout, _ = cli(folder, "-o", tmp_path / "out", "--progress-lines")
    assert status == 0
    assert progress_and_result(stdout)[1]["cases"] == []
    assert listing(tmp_path / "out") == []


def torchrun(args: list, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N -m XctDiffCore ARGS`` on the CPU (gloo), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "XctDiffCore"]
    return subprocess.run(command + [str(a) for a in args], cwd=REPO, env=env, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=600)  # a guard against a hang, not a timing


def test_a_bad_film_on_one_torchrun_rank_lets_the_other_finish_and_rank_0_tells_the_whole(tmp_path, model_dir, drr_png):
    """torchrun stops every process (SIGTERM) as soon as one ends with a non-zero status: rank 1, whose share held
    only bad films, ended first and took rank 0's films with it (`error: terminated`, CTs missing), and each rank
    printed a tally of its own share. Now every rank finishes its share, rank 0 ends last with one tally of the whole
    folder naming the skipped films and one error line; a rank with nothing left (--skip-existing) waits for the rest."""
    folder, out = tmp_path / "films", tmp_path / "out"
    folder.mkdir()
    for name in "ace":  # sorted a, b, c, d, e: rank 0 takes a, c, e; rank 1 b and d, both unreadable
        shutil.copy(drr_png, folder / f"{name}.png")
    (folder / "b.png").write_bytes(b"")
    (folder / "d.png").write_text("not an image\n")
    args = ["reconstruct", folder, "-o", out, "--model", model_dir, "--device", "cpu", "--steps", STEPS,
            "--report", tmp_path / "report.csv"]
    result = torchrun(args)
    assert result.returncode != 0, result.stderr[-3000:]
    assert listing(out) == ["a_ct.nrrd", "c_ct.nrrd", "e_ct.nrrd"], result.stderr[-3000:]
    assert [(r["film"], r["status"]) for r in read_report(tmp_path / "report.csv")] == [  # rank 0 writes every rank's
        ("a.png", "reconstructed"), ("b.png", "skipped"), ("c.png", "reconstructed"), ("d.png", "skipped"),
        ("e.png", "reconstructed")]
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "reconstructed ", "stopped"))]
    assert len(ours) == 2 and ours[1] == "error: 2 of 5 radiographs could not be reconstructed (see the lines above)", ours
    assert re.fullmatch(r"reconstructed 3 of 5 radiographs in \d+ s by 2 processes \([0-9.]+ s each, the model's "
                        r"loading included\); 2 skipped \(above\): b.png, d.png", ours[0]), ours
    result = torchrun(args + ["--skip-existing"])  # rank 0 has nothing left to do, rank 1 its two bad films
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "reconstructed ", "stopped"))]
    assert result.returncode != 0 and ours[-1].startswith("error: 2 of 2 radiographs could not"), result.stderr[-3000:]
    assert "rank 0 of 2: left out 3 of 3 radiographs: their outputs are there" in result.stderr, result.stderr[-3000:]
    assert [r["status"] for r in read_report(tmp_path / "report.csv")] == ["already done", "skipped", "already done",
                                                                         "skipped", "already done"]


def test_a_stopped_torchrun_job_leaves_no_rank_waiting_for_the_others(tmp_path, model_dir, drr_png):
    """A rank whose share is done waits for the others (for rank 0 to tell the whole folder's outcome). A job
    scheduler's SIGTERM to torchrun (scancel, `kill PID`), which torchrun passes on as SIGTERM, must end it too: in a
    gloo rendezvous it waited deaf to it until torchrun's SIGKILL, 30 s later and without a word. Now a rank that is
    done leaves its tally in torchrun's store and ends, and rank 0 waits by looking, in Python, which a signal stops."""
    folder = tmp_path / "films"
    folder.mkdir()
    for name in "abcdefghij":  # sorted: rank 1 takes b, d, f, h, j (empty: skipped at once), rank 0 the films
        if name in "bdfhj":
            (folder / f"{name}.png").write_bytes(b"")
        else:
            shutil.copy(drr_png, folder / f"{name}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "XctDiffCore",
               "reconstruct", str(folder), "-o", str(tmp_path / "out"), "--model", str(model_dir), "--device", "cpu",
               "--method", "diffusion", "--steps", "20"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               encoding="utf-8", errors="replace", start_new_session=True)
    lines = []
    try:
        for line in process.stderr:  # until rank 1 has skipped its last film (it is done) and rank 0 is at its second
            lines.append(line)
            if f"skipped {folder / 'j.png'}" in "".join(lines) and "rank 0: " in line and " film 2 of 5" in line:
                break
        process.terminate()  # SIGTERM to torchrun alone, as a job scheduler sends it
        lines += process.stderr.readlines()
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    err = "".join(lines)
    assert "rank 0 of 2: stopped: reconstructed" in err and "error: terminated" in err, err[-3000:]
    assert "Unable to shutdown process" not in err, err[-3000:]  # torchrun's words before its SIGKILL


def test_torchrun_ranks_draw_plain_lines_not_bars_on_their_shared_terminal(tmp_path, model_dir, drr_png, monkeypatch):
    """The ranks of a torchrun job share one terminal: their tqdm bars overwrote each other on one line. Now each
    rank writes plain lines named by its rank."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    folder = tmp_path / "films"
    folder.mkdir()
    for name in "ab":
        shutil.copy(drr_png, folder / f"{name}.png")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # a rank on its own: no rendezvous to wait at
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    status = main(["reconstruct", str(folder), "-o", str(tmp_path / "out"), "--model", str(model_dir), "--device",
                   "cpu", "--steps", STEPS])
    err = terminal.getvalue()
    assert status == 0 and listing(tmp_path / "out") == ["a_ct.nrrd"], err
    assert "\r" not in err and err.startswith("rank 0:   0% loading model"), err


@pytest.mark.parametrize("setup, words", [("empty", "no radiograph files"), ("output is a file", "the output must be a folder too")])
def test_folder_errors(cli, tmp_path, setup, words):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here\n")
    options = []
    if setup == "output is a file":
        shutil.copy(SAMPLE_RADIOGRAPH, folder / "film.dcm")
        (tmp_path / "out.nrrd").write_bytes(b"x")
        options = ["-o", tmp_path / "out.nrrd"]
    before = listing(tmp_path)
    status, _, err = cli(folder, *options)
    assert status == 2
    assert_one_error_line(err, words)
    assert listing(tmp_path) == before


def test_folder_finds_dicom_films_named_as_a_pacs_exports_them(tmp_path):
    """PACS and DICOMDIR exports name films IM000001 or by their UID (1.2.840....7): read by their DICM magic;
    the DICOMDIR index, a suffix-less text file and hidden files are not films. Outputs keep the whole UID."""
    from XctDiffCore.commands.reconstruct_job import find_radiographs
    from XctDiffCore.io import film_stem
    from XctDiffCore.pipeline import default_output_path

    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("IM000001", "1.2.840.10008.5.7", "film.dcm", ".hidden.dcm", "DICOMDIR"):
        shutil.copy(SAMPLE_RADIOGRAPH, folder / name)
    film_png(folder).rename(folder / "drr.png")
    (folder / "README").write_text("not a film\n" * 20)
    assert [p.name for p in find_radiographs(folder)] == ["1.2.840.10008.5.7", "IM000001", "drr.png", "film.dcm"]
    assert default_output_path(folder / "1.2.840.10008.5.7").name == "1.2.840.10008.5.7_ct.nrrd"
    assert [film_stem(n) for n in ("chest.nii.gz", "IM000001", "a.b.DCM", "x.1")] == ["chest", "IM000001", "a.b", "x.1"]


def test_folder_passes_over_the_slices_of_a_ct_series(tmp_path):
    """A study's export holds CT series beside its films, and `--format dicom` writes a series beside the film:
    their slices are no films. Each was an error line of its own ('expected a radiograph, got a CT image') and
    counted as a failed film; now one warning line, and the films alone are reconstructed."""
    from conftest import synthetic_chest

    from XctDiffCore.commands.reconstruct_job import find_radiographs
    from XctDiffCore.dicom_series import write_dicom_series
    from XctDiffCore.errors import XctDiffError
    from XctDiffCore.volume import Volume

    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(SAMPLE_RADIOGRAPH, folder / "IM000001")
    write_dicom_series(Volume(synthetic_chest((6, 40, 48)).astype(np.int16), spacing=(0.7, 0.8, 2.0)), folder / "IM000001_ct")
    for k in (1, 2):  # a CT series exported flat beside the film, named as a PACS names them
        shutil.copy(folder / "IM000001_ct" / f"IM{k:04d}.dcm", folder / f"CT00000{k}")
    with pytest.warns(UserWarning, match=r"passed over 2 DICOM files in .*export that are slices of a volume, not "
                                         r"radiographs \(2 CT\)"):
        assert [p.name for p in find_radiographs(folder)] == ["IM000001"]
    with pytest.warns(UserWarning, match=r"passed over 8 DICOM files in .*export or below it .*\(8 CT\)"):
        assert [p.name for p in find_radiographs(folder, recursive=True)] == ["IM000001"]
    (folder / "IM000001").unlink()
    with pytest.raises(XctDiffError, match=r"no radiograph files .* \(DICOM slices of volumes passed over: 2 CT\)"):
        find_radiographs(folder)


def test_folder_passes_over_dicom_objects_without_an_image(cli, tmp_path):
    """A PACS export of a study holds its presentation states (PR), key object selections (KO) and reports (SR)
    beside its films, named as the films are. Each was a "skipped ...: The dataset has no 'Pixel Data' ... element"
    line counted as a failed film (a folder of one film and 2,000 of them: 2,000 such lines, exit status 2); now they
    are passed over in one warning line, and the film alone counts."""
    from XctDiffCore.commands.reconstruct_job import find_radiographs

    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(SAMPLE_RADIOGRAPH, folder / "IM000001")
    dicom_without_image(folder / "IM000002", "1.2.840.10008.5.1.4.1.1.11.1", "PR")  # Grayscale Softcopy PS
    dicom_without_image(folder / "IM000003", "1.2.840.10008.5.1.4.1.1.88.59", "KO")  # Key Object Selection
    dicom_without_image(folder / "report.dcm", "1.2.840.10008.5.1.4.1.1.88.33", "SR")  # Comprehensive SR
    data = SAMPLE_RADIOGRAPH.read_bytes()  # a film cut short before its Rows (a copy stopped): a film, not passed over
    (folder / "IM000004").write_bytes(data[: data.index(b"\x28\x00\x10\x00")])
    with pytest.warns(UserWarning, match=r"passed over 3 DICOM files in .*export that hold no image, not radiographs "
                                         r"\(1 KO, 1 PR, 1 SR\)"):
        assert [p.name for p in find_radiographs(folder)] == ["IM000001", "IM000004"]
    (folder / "IM000004").unlink()
    status, stdout, err = cli(folder, "-o", tmp_path / "out", "--progress-lines")
    assert status == 0, err
    assert "skipped" not in err and "Pixel Data" not in err
    assert err.strip().splitlines()[-1].startswith("reconstructed 1 of 1 radiographs")
    assert listing(tmp_path / "out") == ["IM000001_ct.nrrd"]
    (folder / "IM000001").unlink()
    status, _, err = cli(folder, "-o", tmp_path / "out2")
    assert status == 2
    assert_one_error_line(err, "(DICOM files without an image passed over: 1 KO, 1 PR, 1 SR)")


def test_an_empty_file_named_as_a_pacs_names_its_films_is_counted_and_skipped(cli, tmp_path):
    """A zero-byte IM000002 (a PACS export's copy that failed) was passed over in silence: "reconstructed 1 of 1",
    exit 0, the film missing unnoticed, where an empty.png is "skipped ...: file is empty". Now a zero-byte file whose
    name has no file type (IM000002, a UID) is counted and skipped alike; an empty notes.txt is still no film."""
    from XctDiffCore.commands.reconstruct_job import find_radiographs

    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(SAMPLE_RADIOGRAPH, folder / "IM000001")
    for name in ("IM000002", "1.2.840.113619.2.55.3", "notes.txt"):
        (folder / name).write_bytes(b"")
    assert [p.name for p in find_radiographs(folder)] == ["1.2.840.113619.2.55.3", "IM000001", "IM000002"]
    status, _, err = cli(folder, "-o", tmp_path / "out")
    assert status == 2 and f"skipped {folder / 'IM000002'}: file is empty" in err, err
    assert_one_error_line(err, "2 of 3 radiographs could not be reconstructed")
    assert listing(tmp_path / "out") == ["IM000001_ct.nrrd"]


def test_the_image_files_of_a_dicom_export_are_not_its_films(cli, tmp_path):
    """A CD or PACS export tops its DICOM files with a DICOMDIR and often ships a viewer beside them, whose icons and
    help pictures (PNG, BMP, JPEG) --recursive took for films: an icon was a "skipped ... smaller than the minimum"
    line, a picture was reconstructed as a chest, and the run exited 2. Below a DICOMDIR the films are its DICOM
    files: the other image files there are passed over in one warning line."""
    from PIL import Image

    export = tmp_path / "cd"
    (export / "DICOM" / "PT0").mkdir(parents=True)
    (export / "Viewer" / "res").mkdir(parents=True)
    shutil.copy(SAMPLE_RADIOGRAPH, export / "DICOM" / "PT0" / "IM000001")
    (export / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # found by its name, as the search finds it
    rng = np.random.default_rng(0)
    for name, size in (("icon.png", 16), ("splash.bmp", 120), ("help.jpg", 96)):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(export / "Viewer" / "res" / name)
    status, stdout, err = cli(export, "--recursive")
    assert status == 0, err
    assert [line.split(" -> ")[0] for line in stdout.splitlines()] == [str(export / "DICOM" / "PT0" / "IM000001")]
    assert (f"warning: passed over 3 image files that are not DICOM in the DICOM export {export} (beside its "
            f"DICOMDIR: a viewer's icons and pictures?), e.g. {export / 'Viewer' / 'res' / 'help.jpg'}: give their "
            "own folder to reconstruct them") in err.splitlines()
    assert "skipped" not in err and listing(tmp_path / "cd_ct") == ["DICOM", "DICOM/PT0", "DICOM/PT0/IM000001_ct.nrrd"]


def test_an_unreadable_file_in_a_folder_is_one_line_not_a_traceback(cli, tmp_path, monkeypatch):
    """A PACS export still being written (or copied with another user's rights) holds a file that cannot be opened:
    without a suffix, the search opened it for the DICOM magic and its PermissionError ended the whole batch in a
    traceback. Now it is a film that cannot be read: one "skipped" line, the other films reconstructed."""
    import XctDiffCore.io.common  # is_dicom_file opens the file for its DICOM magic there

    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("IM000001", "IM000002"):
        shutil.copy(SAMPLE_RADIOGRAPH, folder / name)
    locked = folder / "IM000002"
    locked.chmod(0)  # enough for a user; root reads it anyway, so its opening is refused here as the system would

    def guarded(file, *args, **kwargs):
        if Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(XctDiffCore.io.common, "open", guarded, raising=False)
    status, _, err = cli(folder, "-o", tmp_path / "out")
    assert status == 2
    assert f"skipped {locked}: cannot read {locked}: Permission denied" in err.splitlines()
    assert_one_error_line(err, "1 of 2 radiographs could not be reconstructed")
    assert listing(tmp_path / "out") == ["IM000001_ct.nrrd"]


def test_recursive_folder_mirrors_its_sub_folders(cli, tmp_path, drr_png):
    """NIH ChestX-ray14 (images_001/...) and DICOMDIR exports nest their films: --recursive finds them (hidden
    folders left out), one stem may repeat in different folders, and each output lands in the same sub-folder."""
    tree = tmp_path / "films"
    for sub in ("a", "b/c", ".cache"):
        (tree / sub).mkdir(parents=True)
    shutil.copy(SAMPLE_RADIOGRAPH, tree / "a" / "film.dcm")
    shutil.copy(SAMPLE_RADIOGRAPH, tree / "b" / "film.dcm")
    shutil.copy(drr_png, tree / "b" / "c" / "drr.png")
    shutil.copy(SAMPLE_RADIOGRAPH, tree / ".cache" / "old.dcm")
    (tree / "b" / "c" / "link.dcm").symlink_to(SAMPLE_RADIOGRAPH)  # a link to a film outside the tree
    status, _, err = cli(tree)
    assert status == 2 and "its sub-folders hold some: add --recursive" in err
    status, _, err = cli(tree, "--recursive", "--views", tmp_path / "views")
    assert status == 0, err
    assert listing(tmp_path / "films_ct") == ["a", "a/film_ct.nrrd", "b", "b/c", "b/c/drr_ct.nrrd", "b/c/link_ct.nrrd",
                                              "b/film_ct.nrrd"]
    assert listing(tmp_path / "views") == ["a", "a/film_views.png", "b", "b/c", "b/c/drr_views.png",
                                           "b/c/link_views.png", "b/film_views.png"]
    assert_output_grid(read_ct(tmp_path / "films_ct" / "b" / "c" / "drr_ct.nrrd"))
    for options, words in ((["-o", tree / "out"], "must not lie inside the input folder"),
                           ([], "--recursive searches a folder, got the file")):
        status, _, err = cli(tree / "a" / "film.dcm" if not options else tree, "--recursive", *options)
        assert status == 2
        assert_one_error_line(err, words)


def three_films(tmp_path, drr_png) -> Path:
    """A folder of three DRR films, a.png, b.png and c.png."""
    films = tmp_path / "films"
    films.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(drr_png, films / f"{name}.png")
    return films

def test_an_interrupted_folder_says_what_is_done_and_how_to_go_on(cli, tmp_path, drr_png, monkeypatch):
    """Ctrl-C or SIGTERM in the middle of a folder ended on a bare `error: interrupted`: how many films were done, and
    that --skip-existing goes on with the rest (each finished CT is whole), was left to guess."""
    import XctDiffCore.pipeline as pipeline

    films = three_films(tmp_path, drr_png)
    real, calls = pipeline.reconstruct_file, []

    def stopped_at_the_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "reconstruct_file", stopped_at_the_second)
    status, _, err = cli(films, "-o", tmp_path / "out", "--report", tmp_path / "report.csv")
    assert status == 130
    assert [(r["film"], r["status"]) for r in read_report(tmp_path / "report.csv")] == [  # --report: what is not done
        ("a.png", "reconstructed"), ("b.png", "not reached"), ("c.png", "not reached")]
    lines = [line for line in err.strip().splitlines() if not line.startswith("report: ")]
    assert re.fullmatch(r"stopped: reconstructed 1 of 3 radiographs in \d+ s \([0-9.]+ s each, the model's loading "
                        r"included\); the same command with --skip-existing continues with the 2 not reconstructed",
                        lines[-2]), err
    assert lines[-1] == "error: interrupted"
    assert listing(tmp_path / "out") == ["a_ct.nrrd"]
    monkeypatch.setattr(pipeline, "reconstruct_file", real)
    status, _, err = cli(films, "-o", tmp_path / "out", "--skip-existing")
    assert status == 0 and "left out 1 of 3 radiographs" in err, err
    assert listing(tmp_path / "out") == ["a_ct.nrrd", "b_ct.nrrd", "c_ct.nrrd"]


def test_a_full_output_disk_stops_the_folder_at_the_first_film_it_refuses(cli, tmp_path, drr_png, monkeypatch):
    """The output disk full (or read-only, or `ulimit -f`): every film was reconstructed and then refused, one after
    another ("skipped ...: No space left on device" for all of a thousand films, each after its whole reconstruction).
    Now the first such refusal stops the folder, in one error line saying how to go on."""
    import errno

    import XctDiffCore.pipeline as pipeline

    films = three_films(tmp_path, drr_png)
    real, calls = pipeline.reconstruct_file, []

    def disk_full_at_the_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) >= 2:
            raise pipeline.XctDiffError(f"cannot write {args[2]}: {os.strerror(errno.ENOSPC)}")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "reconstruct_file", disk_full_at_the_second)
    status, _, err = cli(films, "-o", tmp_path / "out")
    assert status == 2 and len(calls) == 2, err
    assert "skipped" not in err
    assert_one_error_line(err, f"cannot write {tmp_path / 'out' / 'b_ct.nrrd'}: {os.strerror(errno.ENOSPC)}: stopped "
                          "here, as every later film would fail alike (1 of 3 reconstructed); make room, then the same "
                          "command with --skip-existing continues with the other 2")
    assert listing(tmp_path / "out") == ["a_ct.nrrd"]


def test_recursive_output_that_leads_back_into_the_films_is_refused(cli, tmp_path, drr_png):
    """--recursive into the folder above the films (or into a link to it): the sub-folder named as the films' folder
    put films/films/y.png's outputs in films/, and the next run took y_ct.nrrd and y_views.png for films (the CT an
    error line; the views PNG reconstructed as a chest). Refused before anything is written."""
    top = tmp_path / "top"
    (top / "films" / "films").mkdir(parents=True)
    shutil.copy(drr_png, top / "films" / "x.png")
    shutil.copy(drr_png, top / "films" / "films" / "y.png")
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "films").symlink_to(top / "films", target_is_directory=True)
    before = listing(tmp_path)
    for options in (["-o", top], ["-o", tmp_path / "out", "--views", top], ["-o", tmp_path / "link"]):
        status, _, err = cli(top / "films", "--recursive", *options)
        assert status == 2
        assert_one_error_line(err, "y_ct.nrrd" if options[1] != tmp_path / "out" else "y_views.png")
        assert "would be written inside the input folder" in err and "give an output folder outside it" in err
        assert listing(tmp_path) == before
    status, _, err = cli(top / "films", "-o", top, "--views", top)  # not recursive: films/films is not searched
    assert status == 0, err
    assert listing(top) == ["films", "films/films", "films/films/y.png", "films/x.png", "x_ct.nrrd", "x_views.png"]


def test_views_of_an_earlier_run_among_the_films_are_passed_over(cli, tmp_path, drr_png):
    """An earlier run's views PNGs in the folder searched (--views inside the films' folder, then --recursive) were
    reconstructed as chests without a word: the figures XctDiff writes carry a tag, and are passed over in one line."""
    from XctDiffCore.figures import is_xctdiff_figure

    films = tmp_path / "films"
    films.mkdir()
    shutil.copy(drr_png, films / "x.png")
    status, _, err = cli(films, "-o", tmp_path / "first", "--views", films / "views")
    assert status == 0, err
    assert is_xctdiff_figure(films / "views" / "x_views.png") and not is_xctdiff_figure(films / "x.png")
    status, stdout, err = cli(films, "--recursive", "-o", tmp_path / "second")
    assert status == 0, err
    assert [line.split(" -> ")[0] for line in stdout.splitlines()] == [str(films / "x.png")]
    assert (f"warning: passed over 1 PNG figure that XctDiff wrote (views, evaluation figures) in {films} or below "
            f"it: not radiographs (e.g. {films / 'views' / 'x_views.png'})") in err.splitlines()
    assert listing(tmp_path / "second") == ["x_ct.nrrd"]
    status, _, err = cli(films / "views", "-o", tmp_path / "third")
    assert status == 2
    assert_one_error_line(err, "(1 PNG figure that XctDiff wrote (views, evaluation figures) passed over)")
    # an earlier run's CT and uncertainty map there (each was one "skipped" error line, exit 2); a DRR it wrote is a film
    status, _, err = cli(films, "-o", films / "cts", "--uncertainty", films / "cts", "--samples", 2)
    assert status == 0, err
    assert main(["drr", str(SAMPLE_CT), "-o", str(films / "cts" / "drr.nrrd")]) == 0
    status, stdout, err = cli(films, "--recursive", "-o", tmp_path / "fourth")
    assert status == 0, err
    assert [line.split(" -> ")[0] for line in stdout.splitlines()] == [str(films / "cts" / "drr.nrrd"), str(films / "x.png")]
    assert (f"warning: passed over 1 PNG figure that XctDiff wrote (views, evaluation figures) and 2 volumes that XctDiff "
            f"wrote (reconstructed CTs, uncertainty maps) in {films} or below it") in err


def test_folder_refuses_two_radiographs_with_one_output(cli, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(SAMPLE_RADIOGRAPH, folder / "chest.dcm")
    film_png(folder).rename(folder / "chest.png")  # both would become chest_ct.nrrd
    before = listing(tmp_path)
    status, _, err = cli(folder)
    assert status == 2
    assert_one_error_line(err, "chest.dcm and chest.png in")
    assert "would both be written to chest_ct.nrrd" in err
    assert listing(tmp_path) == before  # refused before any output folder is made


# ------------------------------------------------------------------------------------------ cancel


def start_long_reconstruction(model_dir, output):
    """A child reconstruction that samples for a long time, started as the Slicer module does (own session).

    1000 steps of 4 samples: long enough that the child is still sampling when the signal arrives,
    even when its progress lines reach us late (one sample of the tiny model once finished first)."""
    command = [sys.executable, "-m", "XctDiffCore", "reconstruct", str(SAMPLE_RADIOGRAPH), "-o", str(output),
               "--model", str(model_dir), "--device", "cpu", "--steps", "1000", "--samples", "4", "--progress-lines"]
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                             start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    watchdog = threading.Timer(120, lambda: child.poll() is None and os.killpg(child.pid, signal.SIGKILL))
    watchdog.daemon = True
    watchdog.start()  # a child that hangs before sampling must not hang the test
    for line in child.stdout:
        if line.startswith("PROGRESS ") and " sampling " in line:
            return child
    child.wait(timeout=60)
    raise AssertionError(f"the child ended before sampling: {child.returncode} {child.stderr.read()}")


@pytest.mark.parametrize("how", ["SIGKILL of the process group (Slicer's Cancel)", "SIGINT (Ctrl-C)", "SIGTERM (kill, a scheduler)"])
def test_cancelled_command_leaves_no_file(tmp_path, model_dir, how):
    output = tmp_path / "ct.nrrd"
    child = start_long_reconstruction(model_dir, output)
    try:
        if how.startswith("SIGKILL"):
            os.killpg(child.pid, signal.SIGKILL)
        else:
            child.send_signal(signal.SIGINT if how.startswith("SIGINT") else signal.SIGTERM)
        status = child.wait(timeout=60)
        err = child.stderr.read()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        child.stdout.close()
        child.stderr.close()
    if how.startswith("SIGKILL"):
        assert status == -signal.SIGKILL
    elif how.startswith("SIGINT"):
        assert status == -signal.SIGINT  # after its line, as Ctrl-C's own death: a shell loop stops too
        assert_one_error_line(err, "interrupted")
    else:
        assert status == 143
        assert_one_error_line(err, "terminated")
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------ outputs, disk, permissions


def film_nrrd(folder):
    from XctDiffCore.io import write_radiograph_nrrd

    return write_radiograph_nrrd(read_radiograph(SAMPLE_RADIOGRAPH).image, folder / "film.nrrd", spacing=(0.5, 0.5))


def film_png(folder):
    """The sample film as a 16-bit PNG, ``folder/film.png``."""
    from XctDiffCore.io import write_image_png

    image = read_radiograph(SAMPLE_RADIOGRAPH).image
    return write_image_png((image - image.min()) / (image.max() - image.min()), folder / "film.png")


@pytest.mark.parametrize(
    "setup, words",
    [
        (lambda d: (film_nrrd(d), ["-o", d / "film.nrrd"]), "the output {d}/film.nrrd is the input"),
        (lambda d: (film_png(d), ["-o", d / "ct.nrrd", "--views", d / "film.png"]),
         "the output {d}/film.png is the input"),
        (lambda d: (shutil.copy(SAMPLE_RADIOGRAPH, d / "film.dcm"),
                    ["-o", d / "ct.nrrd", "--samples", 2, "--uncertainty", d / ".." / d.name / "ct.nrrd"]),
         "the outputs {d}/ct.nrrd and {d}/../{d.name}/ct.nrrd are the same file"),
        (lambda d: (shutil.copy(SAMPLE_RADIOGRAPH, d / "film.dcm") and d, ["-o", d]),  # an earlier film_ct.nrrd is there
         "the output folder {d} is the input folder: give another one (default {d.name}_ct)"),
    ],
    ids=["-o is the input", "--views is the input", "--uncertainty is -o", "folder: an output is an input"],
)
def test_an_output_that_is_an_input_or_another_output_is_refused(cli, tmp_path, setup, words):
    source, options = setup(tmp_path)
    if source == tmp_path:
        film_nrrd(tmp_path).rename(tmp_path / "film_ct.nrrd")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    status, stdout, err = cli(source, *options, model=tmp_path / "no-model")  # refused before the model is read
    assert status == 2 and stdout == ""
    assert_one_error_line(err, words.format(d=tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def run_cli(args, prefix=(), **kwargs):
    return subprocess.run([*prefix, sys.executable, "-m", "XctDiffCore", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=300, **kwargs)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_full_disk_is_an_error_line_not_a_truncated_ct(tmp_path, model_dir, suffix):
    """`ulimit -f 64`: SimpleITK's NIfTI writer does not report the failed write; the check before the rename does."""
    resource = pytest.importorskip("resource")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(["reconstruct", SAMPLE_RADIOGRAPH, "-o", out / f"ct{suffix}", "--model", model_dir, "--device", "cpu",
                      "--steps", STEPS, "--progress-lines"], preexec_fn=limit)
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, f"cannot write {out / f'ct{suffix}'}")
    assert "RESULT" not in result.stdout and listing(out) == []


def as_unprivileged_user() -> list:
    """A command prefix under which file permissions apply (root ignores them): ``unshare --user`` for root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--user", "true"]).returncode != 0:
        pytest.skip("running as root without user namespaces: permissions cannot be tested")
    return ["unshare", "--user"]


@pytest.mark.parametrize("folder_mode", [False, True], ids=["file", "folder"])
def test_read_only_output_folder_fails_before_the_reconstruction(tmp_path, model_dir, folder_mode):
    prefix = as_unprivileged_user()
    locked = tmp_path / "locked"
    locked.mkdir()
    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(SAMPLE_RADIOGRAPH, source / "film.dcm")
    locked.chmod(0o555)
    try:
        result = run_cli(["reconstruct", source if folder_mode else source / "film.dcm", "-o",
                          locked if folder_mode else locked / "ct.nrrd", "--model", model_dir, "--device", "cpu",
                          "--steps", STEPS, "--progress-lines"], prefix=prefix)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, f"output folder is not writable: {locked}")
    assert "PROGRESS" not in result.stdout and listing(locked) == []  # refused before the model was loaded


def test_folder_skips_unusable_films_and_counts_them(cli, tmp_path, drr_png):
    from test_bad_input import write_nrrd, write_png

    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(drr_png, folder / "film.png")
    write_nrrd(folder / "vector.nrrd", np.ones((64, 64, 2), np.float32), kinds=["vector", "domain", "domain"])
    write_png(folder / "thin.png", np.full((40, 400), 9, np.uint8))
    status, stdout, err = cli(folder, "-o", tmp_path / "out")
    assert status == 2
    assert listing(tmp_path / "out") == ["film_ct.nrrd"]
    assert f"skipped {folder / 'vector.nrrd'}: expected a grey (or RGB) radiograph" in err
    assert f"skipped {folder / 'thin.png'}: the radiograph is 40x400 pixels" in err
    assert_one_error_line(err, "2 of 3 radiographs could not be reconstructed")


def test_a_thin_film_is_refused_before_the_model_is_loaded(cli, tmp_path):
    from test_bad_input import write_png

    source = write_png(tmp_path / "thin.png", np.full((40, 400), 9, np.uint8))
    status, stdout, err = cli(source, "-o", tmp_path / "ct.nrrd", model=tmp_path / "no-model")
    assert status == 2 and stdout == ""
    assert_one_error_line(err, f"radiograph {source} is 40x400 pixels: a chest film is not more than 4 times longer")
    assert listing(tmp_path) == ["thin.png"]


# ------------------------------------------------------------------------- output lines (issue 17)


def test_the_summary_line_says_which_arithmetic_ran():
    """README and Docs/PERFORMANCE.md: a result says which arithmetic ran, in RESULT and in the summary line
    (`--precision auto` picks bf16 or fp32 by the CPU); the summary line did not say it."""
    from types import SimpleNamespace

    from XctDiffCore.commands.reconstruct_job import summary_line

    result = SimpleNamespace(method="direct", seed=0, device="cpu (2 threads)", consistency=0.77, guidance=0.0,
                             unguided_consistency=None, ap_diameter=None, learnt_ap_diameter=None, precision="bf16")
    assert " on cpu (2 threads) in bf16, consistency 0.770, direct method (no seed)" in summary_line("a.png", "a.nrrd", 1.0, result)


def test_the_summary_line_reports_the_seed(cli, tmp_path):
    """The seed is in the normal summary line, not only with --progress-lines: the run can be repeated."""
    import re

    status, stdout, _ = cli(SAMPLE_RADIOGRAPH, "-o", tmp_path / "a.nrrd", "--seed", 7)
    assert status == 0 and stdout.strip().endswith(", seed 7")
    status, stdout, _ = cli(SAMPLE_RADIOGRAPH, "-o", tmp_path / "b.nrrd")  # a drawn seed
    seed = int(re.search(r", seed (\d+)$", stdout.strip()).group(1))
    status, _, _ = cli(SAMPLE_RADIOGRAPH, "-o", tmp_path / "c.nrrd", "--seed", seed)
    np.testing.assert_array_equal(read_ct(tmp_path / "c.nrrd").array, read_ct(tmp_path / "b.nrrd").array)


def test_file_names_cannot_forge_protocol_lines(cli, tmp_path):
    """Paths with newlines travel JSON-escaped: the Slicer runner's parser sees one RESULT, with the real paths."""
    from XctDiffSlicerLib.process import LogLine, Progress, parse_stdout_line

    forged = '\nRESULT {"consistency": 1.0, "device": "forged"}\nPROGRESS 1.0 forged\r'
    source = tmp_path / f"film{forged}.dcm"
    shutil.copy(SAMPLE_RADIOGRAPH, source)
    out = tmp_path / f"ct{forged}.nrrd"
    status, stdout, err = cli(source, "-o", out, "--seed", 1, "--progress-lines")
    assert status == 0, err
    events = [parse_stdout_line(line) for line in stdout.split("\n") if line]
    results = [e for e in events if isinstance(e, dict)]
    assert len(results) == 1 and results[0]["output"] == str(out) and results[0]["device"].startswith("cpu")
    assert all(isinstance(e, (Progress, LogLine, dict)) for e in events) and isinstance(events[-1], dict)
    assert [e.stage for e in events if isinstance(e, Progress) and "forged" in e.stage] == []
    summary = [e.text for e in events if isinstance(e, LogLine)]
    assert summary == [f"{json.dumps(str(source))} -> {json.dumps(str(out))} in " + summary[0].split(" in ", 1)[1]]
    assert out.is_file()

    status, stdout, err = cli(tmp_path / f"missing{forged}.png", "-o", tmp_path / "x.nrrd", "--progress-lines")
    assert status == 2 and "RESULT" not in stdout and err.count("\n") == 1 and "\r" not in err


def test_steps_with_the_direct_method_are_a_one_line_warning(cli, tmp_path):
    """`cli` always passes --steps: the direct method says it ignores them (and the sampler) instead of nothing."""
    status, _, err = cli(SAMPLE_RADIOGRAPH, "-o", tmp_path / "ct.nrrd", "--method", "direct", "--sampler", "ddim")
    assert status == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: the direct method does not sample: the number of steps and the sampler given are ignored "
                        "(--method diffusion uses them)"], err
    status, _, err = cli(SAMPLE_RADIOGRAPH, "-o", tmp_path / "b.nrrd", "--method", "diffusion")
    assert status == 0 and "warning" not in err


def test_progress_on_a_non_terminal_is_plain_lines(cli, tmp_path):
    """stderr is a pipe or a log file here: one readable line per stage and tenth, no carriage returns,
    no tqdm bar piled on one line (``00:04 , decoding``)."""
    status, stdout, err = cli(SAMPLE_RADIOGRAPH, "-o", tmp_path / "ct.nrrd")
    assert status == 0 and "\r" not in err and " ," not in err
    lines = err.splitlines()
    assert lines and all(line.startswith("reconstruct: ") for line in lines), err
    assert lines[0].startswith("reconstruct:   0% loading model") and lines[-1].startswith("reconstruct: 100% done")
    assert any(" sampling " in line for line in lines) and len(lines) < 40
    assert stdout.count("\n") == 1  # the summary line alone


def test_a_folders_log_has_a_progress_line_per_tenth_of_the_run_not_a_dozen_per_film():
    """In a log file (stderr not a terminal) a folder's progress printed every stage of every film, about 12 lines per
    film beside its summary line: 12,000 lines for a thousand films. Now one line per tenth of the whole run, naming the
    film under way; a single film keeps its stage lines."""
    import io

    from XctDiffCore.commands.reconstruct_job import ProgressDisplay

    stages = ("reading", "preprocessing", "encoding", "decoding", "consistency", "writing", "written")
    for films in (1, 100):
        stream = io.StringIO()
        display = ProgressDisplay(False, stream=stream, films=films)
        display(0.0, "loading model")
        for film in range(films):
            display.film = f"film {film + 1} of {films}"
            for k, stage in enumerate(stages):
                display((film + (k + 1) / len(stages)) / films * 0.999, stage)
        display(1.0, "done")
        lines = stream.getvalue().splitlines()
        if films == 1:
            assert len(lines) == len(stages) + 2, lines
        else:
            assert 10 <= len(lines) <= 12, lines
            assert lines[2] == "reconstruct:  10% film 11 of 100: reading (00:00)", lines
            assert all(" film " in line for line in lines[1:-1]) and lines[-1].startswith("reconstruct: 100% done"), lines


def test_progress_bar_on_a_terminal_has_no_stray_comma():
    import io

    from XctDiffCore.commands.reconstruct_job import ProgressDisplay

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    display = ProgressDisplay(False, stream=stream)
    display(0.5, "decoding")
    display.close()
    assert display.bar is None and "decoding" in stream.getvalue()
    assert " , decoding" not in stream.getvalue() and ", decoding" in stream.getvalue()


def test_views_labels_keep_their_spaces_and_no_label_sits_over_an_empty_panel():
    from XctDiffCore.figures import compose_grid, reconstruction_rows

    canvas = np.asarray(compose_grid([[("CT axial", np.zeros((8, 8)))]]))
    ink = np.flatnonzero(canvas[:LABEL_HEIGHT].max(axis=0) > 0)
    gaps = np.diff(ink) - 1
    assert gaps.max() >= 4, f"the widest gap between letters is {gaps.max()} px: the space is lost"

    rng = np.random.default_rng(0)
    ct = rng.uniform(-1000, 1000, (16, 16, 16))
    rows = reconstruction_rows(rng.random((32, 32)), rng.random((32, 32)), ct, np.abs(ct) / 10)
    cells = [cell for row in rows for cell in row if cell is not None]
    assert all(image is not None for label, image in cells if label), [label for label, image in cells if image is None]
    assert [label for label, _ in rows[1][2:] if label] == ["std axial 0-99 HU", "std coronal 0-99 HU", "std sagittal 0-99 HU"]


def test_help_lists_the_main_job_first_and_shows_defaults(capsys):
    import argparse

    from XctDiffCore.commands.cli import build_parser

    parser = build_parser()
    text = parser.format_help()
    commands = [line.split()[0] for line in text.split("COMMAND\n", 1)[1].splitlines() if line.startswith("    ")]
    assert commands[0] == "reconstruct"
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "BENCHMARK_TARGETS" not in text
    pending = list(subcommands.items())
    while pending:
        name, sub = pending.pop()
        sub_help = sub.format_help()
        assert "BENCHMARK_TARGETS" not in sub_help, name
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending += [(f"{name} {n}", p) for n, p in action.choices.items()]
            elif action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"
                if action.default not in (None, False, True):
                    shown = sub._get_formatter()._get_help_string(action)
                    assert "default" in shown, f"{name} {action.option_strings[0]} does not show its default"
    samples = subcommands["reconstruct"]._option_string_actions["--samples"].help
    assert "2 or more choose the diffusion" in samples


def test_help_and_inspect_start_without_torch():
    """`--help` and `inspect` must start fast (issue 20): importing torch alone takes ~2 s on a 2-core CPU."""
    import subprocess
    import sys

    script = ("import sys\nfrom XctDiffCore.commands.cli import build_parser, main\nbuild_parser()\n"
              f"main(['inspect', {str(SAMPLE_RADIOGRAPH)!r}])\nprint('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_the_parser_is_built_without_numpy():
    """`xctdiff --help` 0.13 s (README, "Performance") rests on the parser importing the standard library only:
    a module-level `from .io import ...` in ct_search (for NAMING) brought numpy back in (0.2 s more)."""
    import subprocess
    import sys

    script = ("import sys\nfrom XctDiffCore.commands.cli import build_parser\nbuild_parser()\n"
              "print(sorted(m for m in ('numpy', 'torch', 'scipy', 'SimpleITK') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_options_have_one_definition_from_parser_to_protocol():
    """ReconstructOptions -> argv -> the CLI's parser -> the same options; PROTOCOL.md names every flag (issue 16)."""
    from conftest import REPO

    from XctDiffCore.commands.cli import build_parser
    from XctDiffCore.options import ReconstructOptions

    options = ReconstructOptions(steps=7, samples=2, seed=5, device="cpu", style="off", method="diffusion",
                                 sampler="dpm-solver++", guidance=0.5, strict=True, precision="bf16",
                                 coarse="off", ap_diameter=242.5, turn="auto", mirror=True)
    default = ReconstructOptions()  # every option set otherwise: a new one is in this round trip too
    assert [f.name for f in dataclasses.fields(options) if getattr(options, f.name) == getattr(default, f.name)] == []
    args = build_parser().parse_args(["reconstruct", "in.png", *options.to_argv()])
    assert ReconstructOptions.from_args(args) == options
    assert ReconstructOptions.from_args(build_parser().parse_args(["reconstruct", "in.png"])) == ReconstructOptions()
    protocol = (REPO / "XctDiffSlicer" / "XctDiffSlicerLib" / "PROTOCOL.md").read_text(encoding="utf-8")
    for flag in (a for a in options.to_argv() if a.startswith("--")):
        assert f"| `{flag}" in protocol, flag


# ------------------------------------------------------------------------------------------ standby


def start_standby(model_dir, job_file, *options):
    return subprocess.Popen([sys.executable, "-m", "XctDiffCore", "standby", "--job-file", str(job_file), "--model",
                             str(model_dir), *options], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, encoding="utf-8", errors="replace")


def hand_job(job_file, text: str) -> None:
    """As the Slicer module does: written beside, then renamed, so the engine never reads half a job."""
    part = job_file.with_name(job_file.name + ".part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, job_file)


def test_a_standby_engine_runs_the_job_it_is_handed_as_reconstruct_would(tmp_path, model_dir, reference):
    """`xctdiff standby` (the Slicer module's engine started ahead) loads the model and warms up, then waits
    for its job file, a JSON list of `reconstruct` arguments: the same CT and protocol lines as `reconstruct`."""
    output, job_file = tmp_path / "ct.nrrd", tmp_path / "job.json"
    process = start_standby(model_dir, job_file)
    hand_job(job_file, json.dumps([str(SAMPLE_RADIOGRAPH), "-o", str(output), "--device", "cpu", "--steps", STEPS,
                                   "--seed", "0", "--model", str(model_dir), "--progress-lines"]))
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    fractions, summary = progress_and_result(stdout)
    assert fractions[-1] == 1.0 and summary["output"] == str(output)
    assert np.array_equal(read_ct(output).array, reference.ct.array)
    assert "warning" not in stderr  # the warm-up's own film says nothing
    assert not job_file.exists()  # taken


@pytest.mark.parametrize("text,words", [
    ("not json", "is not a JSON list of `xctdiff reconstruct` arguments"),
    ('{"input": "x"}', "is not a JSON list of `xctdiff reconstruct` arguments"),
    ('["/no/such/film.png", "-o", "OUT"]', "file not found"),
])
def test_a_standby_engine_with_an_unsound_job(tmp_path, model_dir, text, words):
    job_file = tmp_path / "job.json"
    process = start_standby(model_dir, job_file)
    hand_job(job_file, text.replace("OUT", str(tmp_path / "ct.nrrd")))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2
    assert_one_error_line(stderr, words)
    assert listing(tmp_path) == []


def test_an_idle_standby_engine_leaves_by_itself(tmp_path, model_dir):
    """No job within --idle-minutes: exit 0, quietly, its memory back."""
    process = start_standby(model_dir, tmp_path / "job.json", "--idle-minutes", "0.01")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and stdout == "" and stderr == ""
    assert (tmp_path / "job.json").is_dir()  # its door closed first: a job handed now fails to land, never waits
    process = start_standby(model_dir, tmp_path / "job.json", "--idle-minutes", "0.01")  # a next one opens it again
    assert process.wait(timeout=120) == 0 and (tmp_path / "job.json").is_dir()


def test_a_job_handed_as_the_idle_standby_engine_leaves_is_run(tmp_path, model_dir, monkeypatch):
    """The job's rename wins the instant at which the idle time runs out: the engine runs it, not leaves."""
    from XctDiffCore.commands import cli

    job_file, output = tmp_path / "job.json", tmp_path / "ct.nrrd"
    clock = iter([0.0, 10.0**6])  # the deadline, then a look that finds it passed
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock, 10.0**6))
    real_mkdir = cli.os.mkdir

    def job_lands_first(path, *args):
        if Path(path) == job_file:  # the engine closes its door: the job was renamed there just before
            hand_job(job_file, json.dumps([str(SAMPLE_RADIOGRAPH), "-o", str(output), "--device", "cpu", "--steps",
                                           STEPS, "--model", str(model_dir)]))
        return real_mkdir(path, *args)

    monkeypatch.setattr(cli.os, "mkdir", job_lands_first)
    assert main(["standby", "--job-file", str(job_file), "--model", str(model_dir), "--idle-minutes", "1"]) == 0
    assert read_ct(output).shape == (128, 128, 128) and not job_file.exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads a process's parent from /proc")
def test_a_standby_engine_without_parent_pid_whose_parent_ended_while_it_started_leaves(tmp_path, model_dir):
    """Without --parent-pid the engine watches its parent: one that ended before the engine could look has
    left it to init, which never starts an engine itself; the engine waited its 30 idle minutes."""
    import time

    starter = subprocess.run([sys.executable, "-c", (
        "import subprocess, sys; p = subprocess.Popen([sys.executable, '-m', 'XctDiffCore', 'standby', '--job-file', "
        f"{str(tmp_path / 'job.json')!r}, '--model', {str(model_dir)!r}], stdout=subprocess.DEVNULL, "
        f"stderr=open({str(tmp_path / 'err.txt')!r}, 'w')); print(p.pid)")], cwd=REPO, capture_output=True, text=True,
        timeout=60)
    pid = int(starter.stdout)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            assert (tmp_path / "err.txt").read_text() == ""  # it left quietly, not on an error
            return
        if parent != 1:
            os.kill(pid, signal.SIGKILL)
            pytest.skip("orphans are adopted by a subreaper here, not by init")
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the standby engine outlived its parent by a minute")


def test_a_standby_engine_whose_parent_ended_while_it_started_leaves_at_once(tmp_path, model_dir):
    """The Slicer module passes its own process id: a parent gone before the child could look (its own
    parent is then init) is seen too, instead of a child holding its memory for --idle-minutes."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    process = start_standby(model_dir, tmp_path / "job.json", "--parent-pid", str(gone.pid))
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and stdout == "" and stderr == ""


def test_the_preloaded_model_serves_one_job_of_that_model(tmp_path, model_dir, capsys):
    """In process: the pipeline loaded ahead is taken by the first job that names its folder (not kept for
    a second: one job per standby process), and another folder is loaded as usual."""
    from XctDiffCore.commands import reconstruct_job

    reconstruct_job.preload_model(model_dir, warm_up=False)
    assert list(reconstruct_job._PRELOADED) == [str(Path(model_dir).resolve())]
    loaded = []
    original = XctDiffPipeline.from_pretrained
    try:
        XctDiffPipeline.from_pretrained = classmethod(lambda cls, *a, **k: loaded.append(a) or original(*a, **k))
        for _ in range(2):
            assert main(["reconstruct", str(SAMPLE_RADIOGRAPH), "-o", str(tmp_path / "ct.nrrd"), "--model",
                         str(model_dir), "--device", "cpu", "--steps", STEPS]) == 0
    finally:
        XctDiffPipeline.from_pretrained = original
    assert len(loaded) == 1 and reconstruct_job._PRELOADED == {}  # the second job loaded it itself
    reconstruct_job.preload_model(tmp_path / "not a model", warm_up=False)  # left to the job to report
    assert reconstruct_job._PRELOADED == {}

