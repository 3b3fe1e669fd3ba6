"""The DICOM CT series writer (XctDiffCore/dicom_series.py): exact round trip through the engine's DICOM reader
(voxels and LPS geometry, an oblique direction too), and atomicity: a write that fails half way leaves no
folder, no temporary folder, and an earlier series untouched. The CLI's side: test_reconstruct_cli.py."""
from __future__ import annotations

import numpy as np
import pytest

from XctDiffCore.dicom_series import write_dicom_series
from XctDiffCore.errors import XctDiffError
from XctDiffCore.io import read_ct
from XctDiffCore.volume import Volume


def volume(seed: int = 0, direction=None) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.integers(-1024, 3071, size=(7, 9, 11)).astype(np.int16)
    return Volume(array, (0.7, 0.9, 2.5), (-12.0, 30.5, 100.0), np.eye(3) if direction is None else direction)


def rotation_about_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("direction", [None, rotation_about_z(30.0)], ids=["axial", "oblique"])
def test_round_trip_keeps_voxels_and_geometry(tmp_path, direction):
    original = volume(direction=direction)
    folder = write_dicom_series(original, tmp_path / "series")
    back = read_ct(folder)
    np.testing.assert_array_equal(back.array, original.array)
    np.testing.assert_allclose(back.spacing, original.spacing, atol=1e-5)
    np.testing.assert_allclose(back.origin, original.origin, atol=1e-3)
    np.testing.assert_allclose(back.direction, original.direction, atol=1e-5)


def test_float_voxels_are_rounded_to_whole_hu(tmp_path):
    original = volume()
    shifted = original.with_array(original.array.astype(np.float32) + 0.4)
    np.testing.assert_array_equal(read_ct(write_dicom_series(shifted, tmp_path / "s")).array, original.array)


def test_a_failed_write_leaves_nothing_and_keeps_the_earlier_series(tmp_path, monkeypatch):
    from pydicom.dataset import Dataset

    folder = write_dicom_series(volume(0), tmp_path / "series")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    save_as, calls = Dataset.save_as, []

    def failing_save_as(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return save_as(self, *args, **kwargs)

    monkeypatch.setattr(Dataset, "save_as", failing_save_as)
    with pytest.raises(XctDiffError, match="cannot write .*series: No space left on device"):
        write_dicom_series(volume(1), folder)
    assert [p.name for p in tmp_path.iterdir()] == ["series"]  # no hidden temporary folder
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_non_finite_voxels_are_refused(tmp_path):
    bad = volume().with_array(np.full((7, 9, 11), np.nan, dtype=np.float32))
    with pytest.raises(XctDiffError, match="non-finite"):
        write_dicom_series(bad, tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


def test_a_latin1_films_names_are_copied_as_text(tmp_path):
    """The series is UTF-8 (ISO_IR 192): a film's names in another character set are re-encoded, not copied as bytes."""
    import pydicom
    from conftest import SAMPLE_RADIOGRAPH

    film = pydicom.dcmread(SAMPLE_RADIOGRAPH)
    film.SpecificCharacterSet = "ISO_IR 100"
    film.PatientName, film.StudyDescription = "Müller^Jürgen", "Thorax p.a. Übersicht"
    film.save_as(tmp_path / "latin1.dcm")
    assert b"M\xfcller" in (tmp_path / "latin1.dcm").read_bytes()
    folder = write_dicom_series(volume(), tmp_path / "series", source=tmp_path / "latin1.dcm")
    first = folder / "IM0001.dcm"
    assert b"M\xc3\xbcller" in first.read_bytes()
    written = pydicom.dcmread(first)
    assert (str(written.PatientName), written.StudyDescription) == ("Müller^Jürgen", "Thorax p.a. Übersicht")
    assert written.StudyInstanceUID == film.StudyInstanceUID
