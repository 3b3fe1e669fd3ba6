"""Every bad input gives one readable XctDiffError: through the API, and through `xctdiff inspect`
as a single `error: ...` line on stderr with exit status 2 and no traceback."""
from __future__ import annotations

import subprocess
import sys

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
