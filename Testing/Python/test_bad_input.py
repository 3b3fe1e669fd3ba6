"""Every bad input gives one readable XctDiffError: through the API, and through `xctdiff inspect`
as a single `error: ...` line on stderr with exit status 2 and no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLE_CT, synthetic_chest

from XctDiffCore.errors import XctDiffError
from XctDiffCore.io import read_ct, read_radiograph, write_image_png, write_radiograph_nrrd, write_volume
from XctDiffCore.volume import Volume


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def write_png(path, pixels):
    from PIL import Image

    Image.fromarray(pixels).save(path)
    return path


def write_nrrd(path, array_zyx, **header):
    """Written with pynrrd so that the header can hold what SimpleITK itself would refuse to write."""
    import nrrd

    nrrd.write(str(path), np.ascontiguousarray(array_zyx), header, index_order="C")
    return path


def write_truncated_dicom(path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.Modality = "CR"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(64 * 64, dtype=np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])  # cut inside the pixel data
    return path


def write_dicom_film(path, rows, cols, **tags):
    """An 8-bit DX film of ``rows`` x ``cols`` pixels; ``tags``: further attributes (RescaleSlope=...)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = (np.arange(rows * cols) % 251).astype(np.uint8).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_detached(folder, name, header_lines, data_name, data: bytes = None, link_to=None):
    """A detached header ``name`` in ``folder`` naming ``data_name``; writes ``data`` there, or makes it a link."""
    folder.mkdir(parents=True, exist_ok=True)
    if link_to is not None:
        (folder / data_name).symlink_to(link_to)
    elif data is not None:
        (folder / data_name).write_bytes(data)
    (folder / name).write_text("".join(line + "\n" for line in header_lines), encoding="ascii")
    return folder / name


def nhdr(d, sizes, data_file, **kwargs):
    lines = ["NRRD0004", "type: uint8", f"dimension: {len(sizes)}", "sizes: " + " ".join(map(str, sizes)),
             "encoding: raw", f"data file: {data_file}"]
    return write_detached(d / "header", "film.nhdr", lines, data_file, **kwargs)


def outside_file(d, size):
    """A file beside the header's folder, not in it (what a header must not reach)."""
    path = d / "secret.raw"
    path.write_bytes(bytes(range(256)) * (size // 256 + 1))
    return path


def write_nifti(path, array_zyx):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(array_zyx, np.float32)), str(path))
    return path


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def small_ct():
    return synthetic_chest((8, 40, 40)).astype(np.int16)


# name -> (builder(tmp_path) -> path, read as, words the message must contain)
CASES = {
    "missing path": (lambda d: d / "nothere.png", "radiograph", "not found"),
    "missing CT": (lambda d: d / "nothere.nrrd", "ct", "not found"),
    "empty file": (lambda d: write_bytes(d / "empty.png", b""), "radiograph", "empty"),
    "empty CT": (lambda d: write_bytes(d / "empty.nii.gz", b""), "ct", "empty"),
    "text named .png": (lambda d: write_bytes(d / "t.png", b"hello\n"), "radiograph", "not a readable image"),
    "truncated DICOM": (lambda d: write_truncated_dicom(d / "cut.dcm"), "radiograph", "cannot read"),
    "3D volume as radiograph": (lambda d: SAMPLE_CT, "radiograph", "3D volume"),
    "2D image as CT": (lambda d: write_png(d / "film.png", np.full((64, 64), 9, np.uint8)), "ct", "2D image"),
    "2D NRRD as CT": (lambda d: write_nrrd(d / "film.nrrd", np.ones((64, 64), np.float32)), "ct", "2D image"),
    "under 32x32": (lambda d: write_png(d / "small.png", np.full((20, 40), 9, np.uint8)), "radiograph", "32x32"),
    "NaN pixels": (lambda d: write_png(d / "nan.tif", np.full((64, 64), np.nan, np.float32)), "radiograph", "NaN"),
    "Inf pixels": (
        lambda d: write_nrrd(d / "inf.nrrd", np.where(np.eye(64) > 0, np.inf, 1.0).astype(np.float32)),
        "radiograph",
        "infinite",
    ),
    "NaN voxels": (
        lambda d: write_nrrd(d / "nan_ct.nrrd", np.where(small_ct() > 0, np.nan, 0).astype(np.float32)),
        "ct",
        "NaN",
    ),
    "zero spacing": (
        lambda d: write_nrrd(d / "zero.nrrd", small_ct(), space="left-posterior-superior", **{"space directions": np.diag([1.0, 0.0, 2.0])}),
        "ct",
        "spacing must be positive",
    ),
    "negative spacing": (lambda d: write_nrrd(d / "neg.nrrd", small_ct(), spacings=[1.0, -2.0, 1.0]), "ct", "spacing must be positive"),
    # ITK's NIfTI reader turns NaN and Inf into 0 (water): checked on the file's own bytes.
    "NaN voxels in NIfTI": (lambda d: write_nifti(d / "nan_ct.nii.gz", np.where(small_ct() > 0, np.nan, 0)), "ct", "NaN"),
    "Inf pixels in NIfTI": (lambda d: write_nifti(d / "inf.nii", np.where(np.eye(64) > 0, np.inf, 1.0)), "radiograph",
                            "infinite"),
    "CT .npz with text spacing": (lambda d: write_npz(d / "ct.npz", ct=small_ct(), spacing=np.array(["a", "b", "c"]),
                                                      origin=np.zeros(3)), "ct", "not numbers"),
    "a device, not a file": (lambda d: Path(os.devnull), "radiograph", "not a regular file"),
    # Sizes that the square padding of the preprocessing would blow up (32 x 100000: 40 GB), refused from the
    # header. Just over the limit here: without the check they would cost 0.4 GB, not 40.
    "strip PNG": (
        lambda d: write_png(d / "strip.png", np.zeros((32, 10_001), np.uint8)), "radiograph", "maximum 10000 pixels a side"
    ),
    "strip NRRD": (
        lambda d: write_nrrd(d / "strip.nrrd", np.zeros((10_001, 40), np.uint8)), "radiograph", "maximum 10000 pixels a side"
    ),
    "strip DICOM": (lambda d: write_dicom_film(d / "strip.dcm", 40, 10_001), "radiograph", "maximum 10000 pixels a side"),
    "2-component NRRD": (
        lambda d: write_nrrd(d / "vector.nrrd", np.ones((64, 64, 2), np.float32), kinds=["vector", "domain", "domain"]),
        "radiograph",
        "2 values per pixel",
    ),
    # A rescale beyond float32: one error line, no numpy RuntimeWarning before it.
    "DICOM rescale 1e300": (lambda d: write_dicom_film(d / "huge.dcm", 64, 64, RescaleSlope=1e300, RescaleIntercept=0),
                            "radiograph", "infinite"),
    # Detached headers may only read data files in their own folder.
    "NHDR reading /etc/passwd": (lambda d: nhdr(d, (8, 8, 4), "/etc/passwd"), "ct", "outside the header's folder"),
    "NHDR reading ../": (lambda d: outside_file(d, 64 * 64) and nhdr(d, (64, 64), "../secret.raw"), "radiograph",
                         "outside the header's folder"),
    "NHDR through a link out": (lambda d: nhdr(d, (64, 64), "film.raw", link_to=outside_file(d, 64 * 64)), "radiograph",
                                "outside the header's folder"),
    "MetaImage reading /etc/passwd": (
        lambda d: write_detached(d / "header", "ct.mhd", ["ObjectType = Image", "NDims = 3", "DimSize = 8 8 4",
                                                          "ElementType = MET_UCHAR", "ElementDataFile = /etc/passwd"], "x"),
        "ct",
        "outside the header's folder",
    ),
}
# Good files read as the wrong kind: with --as auto they are read as what they are.
WRONG_KIND = {"3D volume as radiograph", "2D image as CT", "2D NRRD as CT"}


@pytest.mark.parametrize("case", list(CASES))
def test_api_raises_one_readable_sentence(tmp_path, case):
    build, kind, words = CASES[case]
    path = build(tmp_path)
    reader = read_ct if kind == "ct" else read_radiograph
    with pytest.raises(XctDiffError) as info:
        reader(path)
    message = str(info.value)
    assert words in message and str(path.name) in message
    assert "\n" not in message and len(message) < 300


@pytest.mark.parametrize("case", list(CASES))
def test_cli_inspect_prints_one_error_line(tmp_path, case):
    build, kind, words = CASES[case]
    path = build(tmp_path)
    for as_kind in [kind] if case in WRONG_KIND else [kind, "auto"]:
        result = subprocess.run(
            [sys.executable, "-m", "XctDiffCore", "inspect", str(path), "--as", as_kind],
            cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
        )
        assert result.returncode == 2, (as_kind, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (as_kind, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
        if as_kind == kind:
            assert words in lines[0]


@pytest.mark.parametrize(
    "write",
    [
        lambda out: write_volume(Volume(small_ct(), (1.0, 1.0, 2.5)), out / "ct.nrrd"),
        lambda out: write_image_png(np.zeros((40, 40)), out / "film.png"),
        lambda out: write_radiograph_nrrd(np.zeros((40, 40), np.float32), out / "drr.nrrd", spacing=(1.0, 1.0)),
    ],
    ids=["volume", "png", "nrrd"],
)
def test_output_in_missing_folder(tmp_path, write):
    with pytest.raises(XctDiffError, match="output folder does not exist"):
        write(tmp_path / "no" / "such" / "folder")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(XctDiffError, match="cannot write a volume"):
        write_volume(Volume(small_ct()), tmp_path / "ct.vtk")
    with pytest.raises(XctDiffError, match="NaN"):
        write_image_png(np.full((40, 40), np.nan), tmp_path / "film.png")
    assert list(tmp_path.iterdir()) == []


def test_detached_data_in_the_header_folder_is_read(tmp_path):
    """The check refuses only what leaves the folder: a data file beside the header (or below it) is fine."""
    pixels = (np.arange(64 * 48) % 251).astype(np.uint8)
    path = nhdr(tmp_path, (64, 48), "data/film.raw", data=None)
    (tmp_path / "header" / "data").mkdir()
    (tmp_path / "header" / "data" / "film.raw").write_bytes(pixels.tobytes())
    np.testing.assert_array_equal(read_radiograph(path).image, pixels.reshape(48, 64))


def test_a_library_warning_is_one_plain_line(tmp_path, monkeypatch, capsys):
    """Pillow's DecompressionBombWarning (a film near Pillow's pixel limit) as the engine's own `warning: ...` line."""
    from PIL import Image

    from XctDiffCore.commands.cli import main

    path = write_png(tmp_path / "film.png", np.full((64, 64), 9, np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 pixels: over the limit, under twice it
    assert main(["inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [err.strip()] and err.startswith("warning: Image size (4096 pixels) exceeds limit")
    assert "shape: 64 x 64" in out


def test_a_file_name_with_newlines_gives_one_error_line(tmp_path, capsys):
    from XctDiffCore.commands.cli import main

    path = tmp_path / "film\nerror: forged\r.png"
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\r" not in err
    assert err.startswith("error: file not found: ") and err.rstrip().endswith("film\\nerror: forged\\r.png")


# ------------------------------------------------------------------------------- resources, signals


def test_ct_spanning_more_than_a_body_is_refused_before_resampling(tmp_path, capsys):
    """A wrong spacing (110 mm for 1.1 mm) would make the 2.5 mm resampling grid enormous: one error line."""
    from XctDiffCore.commands.cli import main

    path = write_nrrd(tmp_path / "wide.nrrd", small_ct(), space="left-posterior-superior",
                      **{"space directions": np.diag([110.0, 1.0, 1.0]), "space origin": np.zeros(3)})
    assert main(["drr", str(path), "-o", str(tmp_path / "drr.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the CT spans 4290 x 39 x 7 mm") and "2000 mm" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.nrrd"]


def test_resampling_grid_is_bounded(monkeypatch):
    from XctDiffCore import preprocess

    monkeypatch.setattr(preprocess, "MAX_GRID_VOXELS", 500)
    with pytest.raises(XctDiffError, match="resampled to 2.5 mm that is 16 x 16 x 3 voxels, more than the 500"):
        preprocess.preprocess_ct(Volume(small_ct(), (1.0, 1.0, 1.0)))


def test_drr_refuses_to_overwrite_its_ct(tmp_path, capsys):
    from XctDiffCore.commands.cli import main

    path = write_volume(Volume(small_ct(), (2.5, 2.5, 2.5)), tmp_path / "ct.nrrd")
    before = path.read_bytes()
    assert main(["drr", str(path), "-o", str(tmp_path / "." / "ct.nrrd")]) == 2
    assert "is the input CT" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_closed_stdout_ends_quietly(tmp_path):
    """`xctdiff inspect film | head -1`: the reader goes away; no traceback, no 'Exception ignored'."""
    child = subprocess.Popen([sys.executable, "-m", "XctDiffCore", "inspect", str(SAMPLE_CT)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # before the child writes anything
    err = child.stderr.read().decode()
    child.stderr.close()
    assert child.wait(timeout=120) == 141 and err == ""


def test_interrupt_while_the_parser_is_built(monkeypatch, capsys):
    from XctDiffCore.commands import cli

    def interrupted(subparsers):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "COMMANDS", [interrupted])
    try:
        status = cli.main(["inspect", "x"])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt left main()")
    assert status == 130
    assert capsys.readouterr().err == "error: interrupted\n"


SIGTERM_MID_WRITE = """
import os, signal, sys, time
import nrrd
from XctDiffCore.commands.cli import main

def write(path, *args, **kwargs):  # a writer that gets SIGTERM half-way
    with open(path, "wb") as f:
        f.write(b"NRRD0004\\n")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

nrrd.write = write
sys.exit(main(["drr", sys.argv[1], "-o", sys.argv[2]]))
"""


def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path):
    """SIGTERM (a scheduler, `kill`) unwinds the command: the temporary file beside the target is removed."""
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, "-c", SIGTERM_MID_WRITE, str(SAMPLE_CT), str(out / "drr.nrrd")], cwd=REPO,
                            capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip() == "error: terminated" and list(out.iterdir()) == []


def test_a_film_much_longer_than_wide_is_refused_before_the_padding():
    from XctDiffCore.preprocess import preprocess_radiograph

    with pytest.raises(XctDiffError, match="40x400 pixels: a chest film is not more than 4 times longer than wide"):
        preprocess_radiograph(np.random.default_rng(0).random((40, 400)))


# ------------------------------------------------------------------------------- what a failed run leaves


def run_cli(*args, cwd=REPO):
    """The ``xctdiff`` program in a child process: (exit status, stderr lines)."""
    result = subprocess.run([sys.executable, "-m", "XctDiffCore", *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, encoding="utf-8", errors="replace", timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, [line for line in result.stderr.splitlines() if line.strip()]


def test_a_bad_option_value_is_one_error_line():
    """argparse's own refusals too: no usage block above the line."""
    status, lines = run_cli("reconstruct", "film.png", "--steps", "many")
    assert status == 2 and lines == ["error: argument --steps: invalid int value: 'many' (see `xctdiff reconstruct --help`)"]


def test_a_failed_run_takes_back_the_folders_it_made(tmp_path, capsys):
    """`prepare` makes --out, images/ and xrays/ before it reads the CTs; when none can be read, they go again."""
    from XctDiffCore.commands.cli import main

    junk = write_bytes(tmp_path / "ct.nrrd", b"not a CT\n")
    assert main(["prepare", str(junk), "--out", str(tmp_path / "new" / "data")]) == 2
    assert "none of the 1 CTs could be read" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]
    kept = tmp_path / "kept"  # an existing folder and what was in it stay
    (kept / "mine").mkdir(parents=True)
    assert main(["prepare", str(junk), "--out", str(kept)]) == 2
    assert sorted(p.name for p in kept.iterdir()) == ["mine"]


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    from XctDiffCore.commands.cli import main

    film = write_png(tmp_path / "film.png", np.full((64, 64), 9, np.uint8))
    assert main(["prepare", str(SAMPLE_CT), "--out", str(film / "data")]) == 2
    assert capsys.readouterr().err == f"error: cannot make the output folder {film / 'data'}: a file of that name is in the way\n"


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short", b"json"], ids=["empty", "truncated", "foreign"])
def test_a_broken_checkpoint_is_one_line(tmp_path, capsys, content):
    """`export` or `evaluate-autoencoder --run` of a run whose checkpoint is empty, cut short or another file."""
    import torch

    from XctDiffCore.commands.cli import main

    path = tmp_path / "run" / "autoencoder" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    if content == b"json":
        torch.save({"weights": torch.zeros(2)}, path)  # a torch file, not a checkpoint of `xctdiff train`
    else:
        path.write_bytes(content)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err
    assert ("not a checkpoint of `xctdiff train`" if content == b"json" else "cannot read the checkpoint") in err
    assert not (tmp_path / "model").exists()


def test_a_datalist_that_is_not_one_is_one_sentence(tmp_path):
    from XctDiffCore.datalist import load_entry_ct, load_entry_xray, read_datalist

    (tmp_path / "list.json").write_text("[1, 2, 3]")
    with pytest.raises(XctDiffError, match="is not a datalist of `xctdiff prepare`"):
        read_datalist(tmp_path / "list.json", "validation")
    with pytest.raises(XctDiffError, match="no such file .was the data set moved"):
        load_entry_ct(tmp_path / "gone.npz")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(XctDiffError, match="cannot read the datalist's radiograph .*objects.npy"):
        load_entry_xray(tmp_path / "objects.npy")
    np.savez(tmp_path / "no_ct.npz", drr=np.zeros(3))
    with pytest.raises(XctDiffError, match="no 'ct' array in it"):
        load_entry_ct(tmp_path / "no_ct.npz")


def test_weights_with_nan_are_refused_on_loading(tmp_path):
    """A diverged run, exported with correct SHA-256s, would write a CT of zeros and exit 0."""
    import torch
    from safetensors.torch import save

    from XctDiffCore.model_folder import _load_weights

    network = torch.nn.Linear(2, 2)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    state["bias"][0] = float("nan")
    with pytest.raises(XctDiffError, match=r"the encoder weights in enc.safetensors hold NaN or infinite values \(bias\)"):
        _load_weights(network, "encoder", Path("enc.safetensors"), save(state))


@pytest.mark.parametrize("args, words", [
    (["benchmark", "drr", "--batch", "0"], "--batch must be between 1 and 64 volumes, got 0"),
    (["benchmark", "drr", "--size", "100000"], "DRR size must be between 16 and 2048 pixels, got 100000"),
    (["standby", "--job-file", "JOB", "--idle-minutes", "nan"], "--idle-minutes must be a positive number of minutes"),
    (["standby", "--job-file", ".", "--idle-minutes", "1"], "--job-file names a folder"),
    (["standby", "--job-file", "JOB", "--parent-pid", "0"], "--parent-pid must be a process id, got 0"),
], ids=["batch 0", "DRR size", "idle NaN", "job file a folder", "parent pid 0"])
def test_benchmark_and_standby_settings_are_checked(tmp_path, capsys, args, words):
    from XctDiffCore.commands.cli import main

    args = [str(tmp_path / "job.json") if a == "JOB" else str(tmp_path) if a == "." else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err


def test_ctrl_c_before_the_command_line_is_imported_is_one_line(monkeypatch, capsys):
    """The `xctdiff` program's first lines catch a Ctrl-C that lands while the command line is still being
    imported (or while a network command restarts): a traceback of whatever import it hit, before."""
    import XctDiffCore.commands.cli as cli
    from XctDiffCore.commands import launcher

    def interrupted():
        raise KeyboardInterrupt

    deaths = []
    monkeypatch.setattr(cli, "entry_point", interrupted)
    monkeypatch.setattr(launcher, "die_interrupted", lambda: deaths.append(capsys.readouterr().err))
    assert launcher.entry_point() == 130  # where the process cannot die of SIGINT (not POSIX)
    assert deaths == ["error: interrupted\n"]  # it dies of it once its line is out


def test_ctrl_c_ends_the_program_as_sigint_would_so_that_a_shell_loop_stops(tmp_path):
    """An exit status of 130 reads to a shell as a Ctrl-C the program handled: `for f in ...; do xctdiff ...; done`
    went on to its next command (the next stage, the next patient). The program now ends as killed by SIGINT,
    after its one line, and the loop stops with it. Ctrl-C reaches the terminal's whole process group: here
    the shell's group gets it, once the command runs."""
    import signal
    import time

    running = tmp_path / "running"
    script = ("import sys, time\nsys.argv = ['xctdiff', 'inspect', sys.argv[1]]\n"
              "import XctDiffCore.commands.cli as cli\n"
              "def command(args):\n    open(args.path + '/running', 'w').close()\n    time.sleep(120)\n"
              "cli._run_undoing_empty_folders = command\n"
              "from XctDiffCore.commands.launcher import entry_point\nsys.exit(entry_point())\n")
    shell = subprocess.Popen(["bash", "-c", f'for i in 1 2; do "{sys.executable}" -c "$0" "{tmp_path}"; echo "went on $?"; done',
                              script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell ignores it
    try:
        deadline = time.monotonic() + 120
        while not running.is_file() and shell.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(shell.pid, signal.SIGINT)
        out, err = shell.communicate(timeout=60)
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.communicate()
    assert shell.returncode == -signal.SIGINT and out == "", (out, err)
    assert err == "error: interrupted\n"
