"""Readers and writers: CT round trips with their geometry, DICOM series, npz, and every radiograph kind."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_CT, SAMPLE_RADIOGRAPH, synthetic_chest

from XctDiffCore.errors import XctDiffError
from XctDiffCore.io import (
    DRR_TAG_KEY,
    Radiograph,
    drr_tag_metadata,
    inspect_path,
    read_ct,
    read_radiograph,
    write_image_png,
    write_radiograph_nrrd,
    write_volume,
)
from XctDiffCore.volume import Volume


def rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def oblique_volume(dtype=np.int16) -> Volume:
    """A small anisotropic volume with a rotated, axis-flipped direction (det -1) and an odd origin."""
    array = synthetic_chest((12, 20, 16), seed=1).astype(dtype)
    direction = rotation(2, 25.0) @ np.diag([1.0, -1.0, 1.0])
    return Volume(array, spacing=(0.8, 1.1, 2.5), origin=(-12.5, 30.25, -101.0), direction=direction)


def grey_ramp(rows=48, cols=64, top=255) -> np.ndarray:
    """A left-right and top-bottom asymmetric test film: any flip or transpose shows."""
    r, c = np.mgrid[0:rows, 0:cols]
    return (r * 3 + c) / (rows * 3 + cols) * top


# ---------------------------------------------------------------------------------------------- CT


@pytest.mark.parametrize("suffix", [".nrrd", ".nii", ".nii.gz", ".mha"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_volume_round_trip_keeps_voxels_and_geometry(tmp_path, suffix, dtype):
    volume = oblique_volume(dtype)
    if dtype == np.float32:
        volume = volume.with_array(volume.array + 0.25)  # not integral: must stay float
    path = write_volume(volume, tmp_path / f"ct{suffix}")
    back = read_ct(path)
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-5)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [f"ct{suffix}"]  # no temporary file left behind


def test_a_volume_prints_its_geometry_not_its_voxels():
    """The README's `result.ct` at a Python prompt printed pages of numbers."""
    volume = Volume(np.zeros((128, 128, 128), np.int16), (2.5, 2.5, 2.5), (-158.75, -158.75, -158.75))
    assert repr(volume) == ("Volume(shape=(128, 128, 128), dtype=int16, spacing=(2.5, 2.5, 2.5), "
                            "origin=(-158.75, -158.75, -158.75), direction=identity)")
    turned = Volume(np.zeros((2, 2, 2)), direction=np.diag([-1.0, 1.0, -1.0]))
    assert repr(turned).endswith("direction=[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])")


def test_write_volume_stores_integral_float_as_int16(tmp_path):
    volume = oblique_volume(np.float32)
    path = write_volume(volume.with_array(np.round(volume.array)), tmp_path / "ct.nrrd")
    assert read_ct(path).array.dtype == np.int16
    import nrrd

    assert nrrd.read_header(str(path))["encoding"] == "gzip"


def test_sample_ct_is_the_documented_volume():
    volume = read_ct(SAMPLE_CT)
    assert volume.shape == (128, 128, 128) and volume.array.dtype == np.int16
    assert volume.spacing == (2.5, 2.5, 2.5)
    np.testing.assert_array_equal(volume.direction, np.eye(3))
    assert volume.array.min() == -1024 and volume.array.max() == 3071


def test_npz_read(tmp_path):
    ct = synthetic_chest((8, 10, 12)).astype(np.int16)
    path = tmp_path / "p.npz"
    np.savez(path, ct=ct, spacing=np.array([2.5, 2.0, 3.0]), origin=np.array([1.0, 2.0, 3.0]), direction=np.eye(3), axes="zyx")
    volume = read_ct(path)
    np.testing.assert_array_equal(volume.array, ct)
    assert volume.spacing == (2.5, 2.0, 3.0) and volume.origin == (1.0, 2.0, 3.0)
    np.savez(path, ct=np.full((4, 4, 4), "a"), spacing=np.ones(3), origin=np.zeros(3))  # text: inspect's min() raised
    with pytest.raises(XctDiffError, match="its ct array holds <U1, not numbers"):
        inspect_path(path)


def test_shared_npz_matches_sample_nrrd(shared_data):
    npz = read_ct(shared_data / "ct" / "lidc_idri_0001.npz")
    nrrd_volume = read_ct(SAMPLE_CT)
    np.testing.assert_array_equal(npz.array, nrrd_volume.array)
    np.testing.assert_allclose(npz.origin, nrrd_volume.origin, atol=1e-4)


def write_dicom_series(volume: Volume, folder, reverse_names: bool = False, one_position: bool = False):
    """One CT DICOM file per k slice, with patient position/orientation tags (the SimpleITK recipe).
    ``one_position``: every slice gets the first slice's position (a broken export)."""
    import SimpleITK as sitk

    image = volume.to_sitk()
    direction = volume.direction
    orientation = "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = volume.shape[0]
    for k in range(n):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, 0 if one_position else k))
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.2",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in position),
            "0020|0037": orientation,
            "0018|0050": str(volume.spacing[2]),
        }.items():
            plane.SetMetaData(tag, value)
        name = n - 1 - k if reverse_names else k
        writer.SetFileName(str(folder / f"slice{name:03d}.dcm"))
        writer.Execute(plane)


def test_dicom_series_read_geometry(tmp_path):
    volume = Volume(
        synthetic_chest((6, 40, 48), seed=2).astype(np.int16),
        spacing=(0.7, 0.8, 2.0),
        origin=(-20.0, 15.5, -70.0),
        direction=rotation(0, 20.0),
    )
    write_dicom_series(volume, tmp_path, reverse_names=True)  # file order must not matter
    back = read_ct(tmp_path)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-4)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-5)
    one_file = read_ct(tmp_path / "slice003.dcm")  # a file of the series reads the whole series
    np.testing.assert_array_equal(one_file.array, volume.array)


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    """ITK would read the rest with a wrong, averaged z spacing; we refuse it in one sentence."""
    write_dicom_series(Volume(synthetic_chest((6, 40, 48)).astype(np.int16), spacing=(0.7, 0.8, 2.0)), tmp_path)
    (tmp_path / "slice003.dcm").unlink()
    with pytest.raises(XctDiffError, match="missing or unevenly spaced slices"):
        read_ct(tmp_path)


def test_a_damaged_slice_file_is_named_with_what_to_do(tmp_path):
    """A slice file cut short (a download that stopped) is skipped by the DICOM reader: in the middle of the stack the
    user saw only 'missing or unevenly spaced slices (gaps from 2 to 4 mm)', not which file nor what to do; at the end
    of the stack the CT was read one slice short without a word."""
    write_dicom_series(Volume(synthetic_chest((6, 40, 48)).astype(np.int16), spacing=(0.7, 0.8, 2.0)), tmp_path)
    for name in ("slice002.dcm", "slice005.dcm"):
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[:-500])  # its pixels cut short
    (tmp_path / "notes.txt").write_text("not DICOM, not named")
    (tmp_path / "junk.dcm").write_bytes(bytes(128) + b"DICM" + b"x" * 40)  # a DICOM file of nothing readable
    with pytest.raises(XctDiffError, match=r"missing or unevenly spaced slices \(gaps from 2 to 4 mm; the widest after "
                       r"slice001.dcm\); 3 files here could not be read as DICOM \(junk.dcm, slice002.dcm, "
                       r"slice005.dcm\): download or export the series again"):
        read_ct(tmp_path)
    end = tmp_path / "end"  # only the last slice damaged: the stack is even, one slice short
    end.mkdir()
    write_dicom_series(Volume(synthetic_chest((6, 40, 48)).astype(np.int16), spacing=(0.7, 0.8, 2.0)), end)
    (end / "slice005.dcm").write_bytes((end / "slice005.dcm").read_bytes()[:-500])
    with pytest.warns(UserWarning, match=f"1 file in {end} could not be read as DICOM \\(slice005.dcm\\): left out; "
                      "if it is a slice of the CT, download or export the series again"):
        assert read_ct(end).shape[0] == 5


def test_the_search_for_damaged_dicom_files_passes_over_a_folder_it_cannot_list(tmp_path):
    """It runs beside every series read: a folder gone (or not to be listed) since was an OSError's traceback."""
    from XctDiffCore.io.ct import _damaged_dicom_files

    assert _damaged_dicom_files(tmp_path / "gone", [], None, []) == []


def test_a_folder_of_damaged_dicom_files_says_so(tmp_path, capsys):
    """Every slice file cut short (a copy that stopped early): `read_ct` and `prepare` said 'no DICOM series found' /
    'no CT found', as of an empty folder, so the user looked for the CT elsewhere instead of copying it again."""
    from XctDiffCore.commands.cli import main

    (tmp_path / "S").mkdir()
    write_dicom_series(Volume(synthetic_chest((4, 40, 48)).astype(np.int16), spacing=(0.7, 0.8, 2.0)), tmp_path / "S")
    for path in (tmp_path / "S").iterdir():
        path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(XctDiffError, match=f"no DICOM series found in {tmp_path / 'S'}; 4 DICOM files here could not "
                       r"be read \(slice000.dcm, slice001.dcm, slice002.dcm and 1 more\): damaged or cut short; copy, "
                       "download or export them again"):
        read_ct(tmp_path / "S")
    assert main(["prepare", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"error: no CT (DICOM CT series, .npz, .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd) found in {tmp_path}; "
                       "4 DICOM files below it could not be read (damaged or cut short; copy, download or export them "
                       f"again), e.g. {tmp_path / 'S' / 'slice000.dcm'}"), err


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_nifti_cut_short_is_refused_not_read_with_water_for_the_rest(tmp_path, suffix):
    """A NIfTI download that stopped half way was read without a word: ITK filled the missing slices with 0 (water),
    a CT whose upper half is a block of tissue."""
    hu = (synthetic_chest((16, 20, 24)) + np.random.default_rng(0).integers(-30, 30, (16, 20, 24))).astype(np.int16)
    whole = write_volume(Volume(hu, spacing=(2.0,) * 3), tmp_path / f"whole{suffix}")
    assert read_ct(whole).shape == hu.shape  # whole: read (the gzip trailer's size is checked, not the stream)
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(XctDiffError, match=f"{cut} is cut short: its header asks for {352 + hu.size * 2} bytes, the "
                       "file holds [0-9]+ .a download or copy that stopped\\?.: copy or download it again"):
        read_ct(cut)


def test_a_metaimage_cut_short_is_one_line_without_the_librarys_own(tmp_path, capfd):
    """MetaIO printed 'MetaImage: M_ReadElementsData: data not read completely' and 'ideal = ... : actual = ...' on
    stdout around prepare's 'left out' line."""
    whole = write_volume(Volume(synthetic_chest((16, 20, 24)).astype(np.int16), spacing=(2.0,) * 3), tmp_path / "a.mha")
    data = whole.read_bytes()
    cut = tmp_path / "cut.mha"
    cut.write_bytes(data[: len(data) * 2 // 3])
    capfd.readouterr()
    with pytest.raises(XctDiffError, match=f"cannot read {cut} as a CT volume"):
        read_ct(cut)
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_an_nrrd_cut_short_says_so_and_what_to_do(tmp_path, compress):
    """An NRRD download that stopped half way gave ITK's 'Read: Error reading FILE:', naming the file but not what
    was wrong with it or what to do. A detached header's data file cut short is named, with its header."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(synthetic_chest((16, 20, 24)).astype(np.int16))
    whole = tmp_path / "whole.nrrd"
    sitk.WriteImage(image, str(whole), compress)
    assert read_ct(whole).shape == (16, 20, 24)
    data = whole.read_bytes()
    cut = tmp_path / "cut.nrrd"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(XctDiffError, match=f"^{cut} is cut short: its header asks for {16 * 20 * 24 * 2} bytes of "
                       "voxels, the file holds [0-9]+ .a download or copy that stopped\\?.: copy or download it "
                       "again$"):
        read_ct(cut)
    if compress:
        return
    sitk.WriteImage(image, str(tmp_path / "detached.nhdr"))
    raw = next(p for p in tmp_path.iterdir() if p.name.startswith("detached.") and p.suffix != ".nhdr")
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(XctDiffError, match=f"^{raw} .the voxels of {tmp_path / 'detached.nhdr'}. is cut short: its "
                       f"header asks for {16 * 20 * 24 * 2} bytes of voxels, the file holds 1000 "):
        read_ct(tmp_path / "detached.nhdr")


def test_a_4d_nifti_says_how_many_volumes_and_what_to_do(tmp_path):
    """A 4D CT (breathing phases) in one NIfTI was 'expected a 3D volume, got a 4D image': true, and no way on."""
    import SimpleITK as sitk

    image = sitk.JoinSeries([sitk.GetImageFromArray(np.full((4, 5, 6), -1000, np.int16))] * 3)
    path = tmp_path / "phases.nii.gz"
    sitk.WriteImage(image, str(path))
    with pytest.raises(XctDiffError, match=f"{path} is a 4D image of 3 volumes .a time series, such as the breathing "
                       "phases of a 4D CT.: save the one to use as a 3D file"):
        read_ct(path)


def test_dicom_series_whose_slices_share_one_position_is_refused(tmp_path):
    """The median gap is 0: ITK would make up a z spacing of 1 mm."""
    write_dicom_series(Volume(synthetic_chest((6, 40, 48)).astype(np.int16), spacing=(0.7, 0.8, 2.0)), tmp_path,
                       one_position=True)
    with pytest.raises(XctDiffError, match="6 slices of the DICOM series .* share one position"):
        read_ct(tmp_path)


@pytest.mark.parametrize("spacing", ["0\\0", None], ids=["zero", "missing"])
def test_dicom_series_without_pixel_spacing_is_refused(tmp_path, spacing):
    """ITK would read the slices as 1 mm pixels: a CT at the wrong scale, without a word."""
    import pydicom

    write_dicom_series(Volume(synthetic_chest((6, 40, 48)).astype(np.int16), spacing=(0.7, 0.8, 2.0)), tmp_path)
    for path in tmp_path.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        if spacing is None:
            del ds.PixelSpacing
        else:
            ds.PixelSpacing = spacing.split("\\")
        ds.save_as(path)
    with pytest.raises(XctDiffError, match=r"no usable Pixel Spacing \(0028,0030\).*scale is unknown"):
        read_ct(tmp_path)


def test_dicom_series_of_two_slice_sizes_is_one_sentence(tmp_path):
    import SimpleITK as sitk

    write_dicom_series(Volume(synthetic_chest((6, 40, 48)).astype(np.int16), spacing=(0.7, 0.8, 2.0)), tmp_path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp_path / "slice003.dcm"))
    plane = reader.Execute()
    smaller = plane[:30, :20]  # the same tags, fewer pixels
    for key in plane.GetMetaDataKeys():
        smaller.SetMetaData(key, plane.GetMetaData(key))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(tmp_path / "slice003.dcm"))
    writer.Execute(smaller)
    with pytest.raises(XctDiffError, match="slices of the DICOM series .* differ in size"):
        read_ct(tmp_path)


# -------------------------------------------------------------------------------------- radiographs


@pytest.mark.parametrize("bits", [8, 16])
def test_png_round_trip_and_drr_tag(tmp_path, bits):
    image01 = grey_ramp(top=1.0)
    path = write_image_png(image01, tmp_path / "drr.png", metadata=drr_tag_metadata(), bits=bits)
    radiograph = read_radiograph(path)
    assert isinstance(radiograph, Radiograph) and radiograph.image.dtype == np.float32
    top = 2**bits - 1
    np.testing.assert_array_equal(radiograph.image, np.round(image01 * top))
    assert radiograph.is_drr and radiograph.spacing is None and radiograph.source == str(path)
    untagged = read_radiograph(write_image_png(image01, tmp_path / "film.png", bits=bits))
    assert not untagged.is_drr


def test_png_writer_clips_to_unit_range(tmp_path):
    image = grey_ramp(top=1.0) * 3.0 - 1.0  # [-1, 2]
    back = read_radiograph(write_image_png(image, tmp_path / "c.png", bits=8)).image
    assert back.min() == 0 and back.max() == 255


def test_rgb_jpeg_becomes_grey(tmp_path):
    from PIL import Image

    grey = grey_ramp().astype(np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "film.jpg", quality=95)
    image = read_radiograph(tmp_path / "film.jpg").image
    assert image.shape == grey.shape
    assert np.abs(image - grey).mean() < 2.0  # JPEG loss only: no channel mix-up, no flip


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_tiff(tmp_path, dtype):
    from PIL import Image

    film = grey_ramp(top=4000).astype(dtype)
    Image.fromarray(film).save(tmp_path / "film.tif")
    np.testing.assert_array_equal(read_radiograph(tmp_path / "film.tif").image, film.astype(np.float32))


def test_radiograph_nrrd_round_trip(tmp_path):
    film = grey_ramp(top=1.0).astype(np.float32)
    path = write_radiograph_nrrd(film, tmp_path / "drr.nrrd", spacing=(0.5, 0.25), metadata=drr_tag_metadata())
    radiograph = read_radiograph(path)
    np.testing.assert_array_equal(radiograph.image, film)
    assert radiograph.spacing == (0.5, 0.25) and radiograph.is_drr
    import nrrd

    assert nrrd.read_header(str(path))[DRR_TAG_KEY] == "1"


def test_radiograph_nrrd_without_spacing_has_unknown_spacing(tmp_path):
    """A 2D NRRD with neither `spacings` nor `space directions` (the Slicer bridge writes a node's voxels so when
    the spacing is unknown) records no pixel size: unknown, not ITK's default of 1 mm, which made a 64 x 64 node
    "64 x 64 mm by its pixel spacing", a child's film."""
    import nrrd

    film = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    path = write_radiograph_nrrd(film, tmp_path / "node.nrrd")  # spacing None: no spacing field written
    header = nrrd.read_header(str(path))
    assert "spacings" not in header and "space directions" not in header
    radiograph = read_radiograph(path)
    np.testing.assert_array_equal(radiograph.image, film)
    assert radiograph.spacing is None
    assert inspect_path(path, "radiograph")["spacing"] == "unknown"
    assert "by its pixel spacing" not in inspect_path(path, "radiograph")["plausibility"]
    # a spacing field of either kind is believed
    with_spacings = write_radiograph_nrrd(film, tmp_path / "spacings.nrrd", spacing=(0.5, 0.25))
    assert read_radiograph(with_spacings).spacing == (0.5, 0.25)
    nrrd.write(str(tmp_path / "directions.nrrd"), film, {"space dimension": 2,  # fastest axis (columns) first
               "space directions": [[0.3, 0.0], [0.0, 0.2]]}, index_order="C")
    assert read_radiograph(tmp_path / "directions.nrrd").spacing == pytest.approx((0.2, 0.3))


def test_single_slice_volumes_read_as_radiographs(tmp_path):
    """A 2D scalar volume node saved by Slicer is a 3D NRRD with one slice."""
    film = grey_ramp().astype(np.int16)  # [row, col]
    # As Slicer places a loaded PNG: an axial slice, identity direction; the stored order is the display order.
    axial = Volume(film[None], spacing=(0.3, 0.4, 1.0))
    write_volume(axial, tmp_path / "axial.nrrd")
    radiograph = read_radiograph(tmp_path / "axial.nrrd")
    np.testing.assert_array_equal(radiograph.image, film)
    assert radiograph.spacing == pytest.approx((0.4, 0.3))
    # A coronal slice in patient space, stored upside down and mirrored: it must come out head up,
    # patient's left on the image's right (rows to -z, columns to +x).
    stored = film[::-1, ::-1][:, None, :]  # [k=z up, j=1, i=x toward the patient's right]
    coronal = Volume(stored, spacing=(0.3, 1.0, 0.4), direction=np.diag([-1.0, 1.0, 1.0]))
    write_volume(coronal, tmp_path / "coronal.nii.gz")
    radiograph = read_radiograph(tmp_path / "coronal.nii.gz")
    np.testing.assert_array_equal(radiograph.image, film)
    assert radiograph.spacing == pytest.approx((0.4, 0.3))


def write_dicom_radiograph(path, pixels: np.ndarray, photometric="MONOCHROME2", bits_stored=12, **tags):
    """An uncompressed CR DICOM file made with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint8 if bits_stored <= 8 else np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def dicom_without_image(path, sop_class, modality):
    """A DICOM object that holds no image, as a study's export holds beside its films (a presentation state, a key
    object selection, a structured report): file meta, SOP class and instance, the study's UIDs, no Rows, no pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = modality, generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "TEST^PATIENT", "123"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_rescale_spacing_and_monochrome1(tmp_path):
    stored = grey_ramp(top=4095).astype(np.uint16)
    common = dict(RescaleSlope=2, RescaleIntercept=-100, ImagerPixelSpacing=[0.15, 0.2])
    mono2 = read_radiograph(write_dicom_radiograph(tmp_path / "m2.dcm", stored, **common))
    mono1 = read_radiograph(write_dicom_radiograph(tmp_path / "m1.dcm", 4095 - stored, "MONOCHROME1", **common))
    np.testing.assert_array_equal(mono2.image, stored * 2.0 - 100.0)  # modality LUT applied
    np.testing.assert_array_equal(mono1.image, mono2.image)  # the inverted grey scale is undone
    assert mono2.spacing == (0.15, 0.2) and not mono2.is_drr


@pytest.mark.parametrize("header, spacing", [
    (dict(ImagerPixelSpacing=[0.15, 0.2], EstimatedRadiographicMagnificationFactor=1.25), (0.12, 0.16)),
    (dict(ImagerPixelSpacing=[0.15, 0.2], DistanceSourceToDetector=1800, DistanceSourceToPatient=1500), (0.125, 1 / 6)),
    (dict(ImagerPixelSpacing=[0.15, 0.2], EstimatedRadiographicMagnificationFactor=0), (0.15, 0.2)),  # a placeholder
    (dict(ImagerPixelSpacing=[0.15, 0.2], DistanceSourceToDetector=1800, DistanceSourceToPatient=0), (0.15, 0.2)),
    (dict(PixelSpacing=[0.14, 0.14], ImagerPixelSpacing=[0.15, 0.15], EstimatedRadiographicMagnificationFactor=1.1),
     (0.14, 0.14)),  # Pixel Spacing is in the patient's plane already
])
def test_detector_spacing_is_taken_back_to_the_patient_by_the_films_magnification(tmp_path, header, spacing):
    """Imager Pixel Spacing is the detector's: a chest between tube and detector is enlarged on it by about a tenth,
    which the header's magnification factor (or its two distances) takes back; without them it stays as it is."""
    film = read_radiograph(write_dicom_radiograph(tmp_path / "f.dcm", grey_ramp().astype(np.uint16), **header))
    assert film.spacing == pytest.approx(spacing)


@pytest.mark.parametrize("compression", ["JPEG", "JPEG2000", "RLE"])
def test_compressed_dicom_films_read_as_the_uncompressed_film(tmp_path, compression):
    """PACS send CR/DX films compressed: JPEG Lossless (the usual one for CR, which pydicom decodes only with
    pylibjpeg-libjpeg, a dependency), JPEG 2000 and RLE; each must read as the uncompressed film."""
    import pydicom
    import SimpleITK as sitk
    from pydicom.uid import RLELossless

    stored = grey_ramp(top=4000).astype(np.uint16) + (np.arange(48, dtype=np.uint16)[:, None] % 5) * 19  # texture
    plain = write_dicom_radiograph(tmp_path / "plain.dcm", stored, "MONOCHROME1", RescaleSlope=2,
                                   RescaleIntercept=-100, ImagerPixelSpacing=[0.15, 0.2])
    packed = tmp_path / f"{compression}.dcm"
    if compression == "RLE":
        ds = pydicom.dcmread(plain)
        ds.compress(RLELossless)
        ds.save_as(packed)
    else:
        writer = sitk.ImageFileWriter()  # GDCM writes the pixels compressed; the header is copied after
        writer.SetFileName(str(packed))
        writer.SetUseCompression(True)
        writer.SetCompressor(compression)
        writer.Execute(sitk.GetImageFromArray(stored))
        ds, pixels = pydicom.dcmread(plain), pydicom.dcmread(packed)
        ds.file_meta.TransferSyntaxUID = pixels.file_meta.TransferSyntaxUID
        ds.PixelData = pixels.PixelData
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        ds.save_as(packed)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID.is_compressed
    expected, got = read_radiograph(plain), read_radiograph(packed)
    np.testing.assert_array_equal(got.image, expected.image)
    assert got.spacing == expected.spacing == (0.15, 0.2)


def test_dicom_patient_age_is_read_in_years(tmp_path):
    from XctDiffCore.io import dicom_age_years

    stored = grey_ramp(top=4095).astype(np.uint16)
    assert read_radiograph(write_dicom_radiograph(tmp_path / "a.dcm", stored, PatientAge="006Y")).age_years == 6.0
    assert read_radiograph(write_dicom_radiograph(tmp_path / "b.dcm", stored)).age_years is None
    assert dicom_age_years("018M") == 1.5 and dicom_age_years("052W") == pytest.approx(0.9966, abs=1e-3)
    assert [dicom_age_years(v) for v in ("", None, "Y", "12", "abcY", "5 Y")] == [None] * 6


def test_dicom_voi_window_is_applied(tmp_path):
    stored = grey_ramp(top=4095).astype(np.uint16)
    image = read_radiograph(write_dicom_radiograph(tmp_path / "w.dcm", stored, WindowCenter=2000, WindowWidth=1000)).image
    assert image[stored < 1400].max() == 0 and image[stored > 2600].min() == 4095  # clipped by the window


def test_dicom_patient_orientation_gives_display_orientation(tmp_path):
    film = grey_ramp(top=4095).astype(np.uint16)
    # Stored mirrored: rows run toward the patient's right, columns toward the head.
    path = write_dicom_radiograph(tmp_path / "o.dcm", film[::-1, ::-1], PatientOrientation=["R", "H"], PixelSpacing=[0.1, 0.2])
    radiograph = read_radiograph(path)
    np.testing.assert_array_equal(radiograph.image, film)
    assert radiograph.spacing == (0.1, 0.2)


@pytest.mark.parametrize("orientation", [["", ""], ["", "H"], ["X", "Y"]], ids=["empty", "one empty", "unknown"])
def test_dicom_patient_orientation_without_values_changes_nothing(tmp_path, orientation):
    """``\\`` (two empty values) says nothing: the film is not transposed ("" is in "HF") nor flipped."""
    film = grey_ramp(top=4095).astype(np.uint16)  # 48 x 64: a transposition changes the shape
    path = write_dicom_radiograph(tmp_path / "o.dcm", film[::-1] if orientation[1] == "H" else film,
                                  PatientOrientation=orientation, PixelSpacing=[0.1, 0.2])
    radiograph = read_radiograph(path)
    np.testing.assert_array_equal(radiograph.image, film)
    assert radiograph.spacing == (0.1, 0.2)


@pytest.mark.parametrize(
    "tags, spacing",
    [
        (dict(PixelSpacing=[0, 0]), None),
        (dict(PixelSpacing=[0.0, 0.2]), None),
        (dict(ImagerPixelSpacing=[0, 0]), None),
        (dict(PixelSpacing=[0, 0], ImagerPixelSpacing=[0.15, 0.2]), (0.15, 0.2)),
        (dict(PixelSpacing=[0.1, 0.1], ImagerPixelSpacing=[0.15, 0.2]), (0.1, 0.1)),
    ],
    ids=["zero", "one zero", "imager zero", "zero then imager", "pixel spacing first"],
)
def test_dicom_zero_pixel_spacing_is_unknown(tmp_path, recwarn, tags, spacing):
    """0\\0 (how some systems write "not known", e.g. the bundled sample) is no spacing: no error, no warning."""
    film = grey_ramp(top=4095).astype(np.uint16)
    radiograph = read_radiograph(write_dicom_radiograph(tmp_path / "z.dcm", film, **tags))
    assert radiograph.spacing == spacing
    np.testing.assert_array_equal(radiograph.image, film)
    assert [str(w.message) for w in recwarn] == []
    assert inspect_path(tmp_path / "z.dcm")["spacing"] == ("unknown" if spacing is None else f"{spacing[0]:.4g} {spacing[1]:.4g} mm (row, col)")


def test_dicom_negative_pixel_spacing_is_refused(tmp_path):
    film = grey_ramp(top=4095).astype(np.uint16)
    with pytest.raises(XctDiffError, match="pixel spacing must be positive"):
        read_radiograph(write_dicom_radiograph(tmp_path / "n.dcm", film, PixelSpacing=[-0.1, 0.1]))


def lungs_dark_bone_bright(image: np.ndarray) -> bool:
    """A PA chest film: both lung fields darker than the mediastinum/spine column between them."""
    rows, cols = image.shape
    band = image[int(rows * 0.3) : int(rows * 0.6)]
    lungs = np.r_[band[:, int(cols * 0.2) : int(cols * 0.35)].ravel(), band[:, int(cols * 0.65) : int(cols * 0.8)].ravel()]
    spine = band[:, int(cols * 0.46) : int(cols * 0.54)]
    return lungs.mean() < spine.mean() - 10


def test_shared_dicom_polarity(shared_data, tmp_path):
    import pydicom

    folder = shared_data / "cxr" / "dicom"
    mono2 = read_radiograph(folder / "rsna_pneumonia_sample.dcm")
    assert mono2.image.shape == (1024, 1024) and mono2.spacing == (0.168, 0.168)
    assert lungs_dark_bone_bright(mono2.image)
    # A genuine MONOCHROME1 twin of the film (stored grey levels inverted) reads back identically.
    stored = pydicom.dcmread(folder / "rsna_pneumonia_sample.dcm").pixel_array
    twin = read_radiograph(write_dicom_radiograph(tmp_path / "m1.dcm", 255 - stored, "MONOCHROME1", bits_stored=8))
    np.testing.assert_array_equal(twin.image, mono2.image)
    # monochrome1_variant.dcm holds the very same (MONOCHROME2-looking) pixel bytes under a MONOCHROME1
    # tag; the reader honours the tag, so it comes out as the exact inverse.
    variant = read_radiograph(folder / "monochrome1_variant.dcm")
    np.testing.assert_array_equal(variant.image, 255 - mono2.image)


def test_sample_radiograph_and_inspect():
    """The bundled film: NEMA WG04 RG1, a PA chest CR stored MONOCHROME1 (15 bits), Patient Orientation L\\F
    (already display orientation), Pixel Spacing 0\\0 (unknown)."""
    import pydicom

    radiograph = read_radiograph(SAMPLE_RADIOGRAPH)
    assert radiograph.image.shape == (1955, 1841) and radiograph.image.dtype == np.float32 and not radiograph.is_drr
    assert radiograph.spacing is None  # 0\0 records no spacing: unknown, not an error
    assert lungs_dark_bone_bright(radiograph.image)  # MONOCHROME1 inverted: bone bright
    rows = radiograph.image.shape[0]
    # Head up: the diaphragm and upper abdomen (bottom) are brighter than the lung fields (upper half).
    assert radiograph.image[int(rows * 0.8) : int(rows * 0.95)].mean() > radiograph.image[int(rows * 0.25) : int(rows * 0.5)].mean() + 3000
    # Neither flipped nor transposed: the stored grey levels, inverted.
    stored = pydicom.dcmread(SAMPLE_RADIOGRAPH).pixel_array.astype(np.float64)
    assert np.corrcoef(radiograph.image.ravel(), stored.ravel())[0, 1] < -0.99
    facts = inspect_path(SAMPLE_RADIOGRAPH)
    assert facts["kind"] == "radiograph" and facts["shape"].startswith("1955 x 1841") and facts["drr"] == "no"
    assert facts["spacing"] == "unknown"
    facts = inspect_path(SAMPLE_CT)
    assert facts["kind"] == "ct" and facts["hu_range"] == "-1024 .. 3071" and "LPS" in facts["direction"]


def test_inspect_cli_prints_one_fact_per_line():
    import subprocess
    import sys

    from conftest import REPO

    result = subprocess.run(
        [sys.executable, "-m", "XctDiffCore", "inspect", str(SAMPLE_CT), "--as", "ct"],
        cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
    )
    assert result.returncode == 0, result.stderr
    facts = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert facts["kind"] == "ct" and facts["spacing"] == "2.5 2.5 2.5 mm (x, y, z)"
    assert set(facts) == {"path", "kind", "shape", "dtype", "spacing", "origin", "direction", "hu_range", "ap_diameter"}
    assert facts["ap_diameter"].startswith("232 mm (")  # LIDC-IDRI-0001, sternum to back at mid-chest


# ------------------------------------------------------------------------------ failed writes (disk full)


@pytest.fixture
def file_size_limit():
    """``limit(nbytes)``: this process may write files of at most ``nbytes`` (``ulimit -f``), until the test ends.

    Python ignores SIGXFSZ, so a write past the limit fails with EFBIG, as on a full disk (ENOSPC)."""
    resource = pytest.importorskip("resource")
    old = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(nbytes: int) -> None:
        hard = old[1] if old[1] == resource.RLIM_INFINITY else min(old[1], nbytes)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, old)


def noisy_volume() -> Volume:
    """64^3 int16 noise: about 500 kB however it is compressed."""
    return Volume(np.random.default_rng(0).integers(-1000, 1000, (64, 64, 64)).astype(np.int16), (2.5, 2.5, 2.5))


@pytest.mark.parametrize(
    "write, name",
    [
        (lambda path: write_volume(noisy_volume(), path), "ct.nii.gz"),  # SimpleITK's NIfTI writer says nothing
        (lambda path: write_volume(noisy_volume(), path), "ct.nii"),
        (lambda path: write_volume(noisy_volume(), path), "ct.nrrd"),
        (lambda path: write_volume(noisy_volume(), path), "ct.mha"),
        (lambda path: write_image_png(np.random.default_rng(0).random((512, 512)), path), "film.png"),
        (lambda path: write_radiograph_nrrd(np.random.default_rng(0).random((512, 512)), path), "drr.nrrd"),
    ],
    ids=["nii.gz", "nii", "nrrd", "mha", "png", "radiograph nrrd"],
)
def test_full_disk_is_an_error_and_leaves_the_old_file(tmp_path, file_size_limit, write, name):
    target = tmp_path / name
    target.write_bytes(b"the previous file")
    file_size_limit(64 * 1024)
    with pytest.raises(XctDiffError, match=f"cannot write {target}") as info:
        write(target)
    assert "\n" not in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == [name] and target.read_bytes() == b"the previous file"


def _good_files(folder) -> dict:
    """One complete file of each format the engine writes, by suffix."""
    import json

    from safetensors.numpy import save_file

    volume = noisy_volume()
    files = {suffix: write_volume(volume, folder / f"ct{suffix}") for suffix in (".nii.gz", ".nii", ".nrrd", ".mha")}
    files[".png"] = write_image_png(np.random.default_rng(0).random((64, 64)), folder / "film.png")
    np.savez_compressed(folder / "ct.npz", ct=volume.array)
    np.save(folder / "drr.npy", np.ones((64, 64), np.float32))
    (folder / "manifest.json").write_text(json.dumps({"a": list(range(100))}))
    save_file({"w": np.ones((64, 64), np.float32)}, str(folder / "w.safetensors"))
    for suffix, name in ((".npz", "ct.npz"), (".npy", "drr.npy"), (".json", "manifest.json"), (".safetensors", "w.safetensors")):
        files[suffix] = folder / name
    return files


def test_written_files_are_verified_before_the_rename(tmp_path):
    """A file cut short (what a failed write that nobody reported leaves) is found; a complete one passes."""
    from XctDiffCore.atomic import verify_written

    for suffix, path in _good_files(tmp_path).items():
        assert verify_written(path, suffix) is None, suffix
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        assert verify_written(path, suffix), suffix
        path.write_bytes(b"")
        assert verify_written(path, suffix) == "it is empty"


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower case and padding, on purpose
def test_dicom_view_facts_are_read_for_the_plausibility_check(tmp_path):
    stored = grey_ramp(top=4095).astype(np.uint16)
    path = write_dicom_radiograph(tmp_path / "lat.dcm", stored, ViewPosition="ll", BodyPartExamined="Chest ",
                                  PresentationIntentType="FOR PROCESSING", PatientAge="045Y")
    assert read_radiograph(path).header == {"ViewPosition": "LL", "BodyPartExamined": "CHEST",
                                            "PresentationIntentType": "FOR PROCESSING"}
    facts = inspect_path(path)
    assert (facts["view_position"], facts["body_part_examined"], facts["patient_age"]) == ("LL", "CHEST", "45 years")
    assert read_radiograph(write_dicom_radiograph(tmp_path / "plain.dcm", stored)).header == {}


# ------------------------------------------------------------------------- interrupted and concurrent writes


def hidden(folder) -> list:
    """The hidden temporary files and folders left in a folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def interrupt_call(monkeypatch, module, name: str, n: int) -> None:
    """``module.name`` (e.g. ``os.replace`` as atomic.py calls it) raises KeyboardInterrupt at its ``n``-th
    call, as a Ctrl-C arriving just then would; every other call runs."""
    real, calls = getattr(module, name), []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fake)


def small_volume(value: int) -> Volume:
    return Volume(np.full((4, 8, 8), value, np.int16), (2.5, 2.5, 2.5))


def interrupt_swap_step(monkeypatch, n: int, when: str, exchange: bool) -> None:
    """Ctrl-C at the ``n``-th step of atomic.py's swaps (an ``os.replace`` or an ``_exchange``), ``before`` the step
    or just ``after`` it returned; ``exchange=False``: a system that cannot swap two names in one step."""
    from XctDiffCore import atomic

    calls = []

    def counted(real):
        def step(*args):
            calls.append(args)
            if len(calls) == n and when == "before":
                raise KeyboardInterrupt
            result = real(*args)
            if len(calls) == n:
                raise KeyboardInterrupt
            return result
        return step

    monkeypatch.setattr(atomic.os, "replace", counted(atomic.os.replace))
    monkeypatch.setattr(atomic, "_exchange", counted(atomic._exchange if exchange else lambda a, b: False))


def swap_steps(outputs: int) -> list:
    """Every (exchange, n, when) of a swap of ``outputs`` targets that were there before: 2 steps an output
    with the one-step exchange, 5 without it (one of them the exchange that says it cannot)."""
    return [(exchange, n, when) for exchange, steps in ((True, 2), (False, 5))
            for n in range(1, steps * outputs + 1) for when in ("before", "after")]


@pytest.mark.parametrize("exchange, n, when", swap_steps(2))
def test_an_interrupted_output_set_keeps_every_earlier_output(tmp_path, monkeypatch, exchange, n, when):
    """Ctrl-C at any step of a set's swaps (CT, then PNG) puts both earlier outputs back, never a new CT beside an
    old PNG, and leaves no hidden file."""
    from XctDiffCore import atomic

    ct, png = tmp_path / "ct.nrrd", tmp_path / "views.png"
    write_volume(small_volume(1), ct)
    write_image_png(np.zeros((40, 40)), png)
    before = {path: path.read_bytes() for path in (ct, png)}
    interrupt_swap_step(monkeypatch, n, when, exchange)
    with pytest.raises(KeyboardInterrupt), atomic.output_set():
        write_volume(small_volume(2), ct)
        write_image_png(np.ones((40, 40)), png)
    assert {path: path.read_bytes() for path in (ct, png)} == before
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("n, when", [(1, "before"), (1, "after"), (2, "before")])
def test_an_interrupted_swap_of_a_new_output_leaves_nothing(tmp_path, monkeypatch, n, when):
    """Nothing was at the target: an interrupted set leaves nothing there (the exchange says it cannot, step 2)."""
    from XctDiffCore import atomic

    interrupt_swap_step(monkeypatch, n, when, exchange=True)
    with pytest.raises(KeyboardInterrupt), atomic.output_set():
        write_volume(small_volume(2), tmp_path / "ct.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_a_reader_never_finds_an_output_missing_while_it_is_replaced(tmp_path, monkeypatch):
    """Where the system swaps two names in one step, the earlier CT (a file of a set) and the earlier series (a
    folder) are there, whole, at every step of their replacement."""
    from XctDiffCore import atomic
    from XctDiffCore.dicom_series import write_dicom_series

    if not atomic._exchange(tmp_path, tmp_path):
        pytest.skip("this system or file system cannot swap two names in one step")
    ct, series = tmp_path / "ct.nrrd", write_dicom_series(small_volume(1), tmp_path / "series")
    write_volume(small_volume(1), ct)
    files = len(list(series.iterdir()))
    seen = []

    def look(real):
        def step(*args):
            result = real(*args)
            seen.append((ct.is_file() and read_ct(ct).array.max(), len(list(series.iterdir()))))
            return result
        return step

    monkeypatch.setattr(atomic.os, "replace", look(atomic.os.replace))
    monkeypatch.setattr(atomic, "_exchange", look(atomic._exchange))
    with atomic.output_set():
        write_volume(small_volume(2), ct)
        write_dicom_series(small_volume(2), series)
    monkeypatch.undo()
    assert len(seen) >= 4 and all(value in (1, 2) and count == files for value, count in seen)
    assert read_ct(ct).array.max() == 2 and read_ct(series).array.max() == 2 and hidden(tmp_path) == []


def test_an_output_set_is_written_whole_or_not_at_all(tmp_path):
    from XctDiffCore import atomic

    ct, png = tmp_path / "ct.nrrd", tmp_path / "views.png"
    with pytest.raises(XctDiffError, match="stop"), atomic.output_set():
        write_volume(small_volume(2), ct)
        raise XctDiffError("stop")  # a later output fails: the CT written before it is not renamed
    assert list(tmp_path.iterdir()) == []
    with atomic.output_set():
        write_volume(small_volume(2), ct)
        assert not ct.exists()  # renamed only at the end of the set
        write_image_png(np.ones((40, 40)), png)
    assert read_ct(ct).array.max() == 2 and png.is_file() and hidden(tmp_path) == []


@pytest.mark.parametrize("exchange, n, when", swap_steps(1))
def test_an_interrupted_series_swap_keeps_the_earlier_series(tmp_path, monkeypatch, exchange, n, when):
    """Ctrl-C at any step of the swap of a series folder."""
    from XctDiffCore import atomic
    from XctDiffCore.dicom_series import write_dicom_series

    folder = write_dicom_series(small_volume(1), tmp_path / "ct")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    interrupt_swap_step(monkeypatch, n, when, exchange)
    with pytest.raises(KeyboardInterrupt):
        write_dicom_series(small_volume(2), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert hidden(tmp_path) == []


def test_a_second_ctrl_c_during_the_clean_up_leaves_no_temporary(tmp_path, monkeypatch):
    """The second Ctrl-C of a double press arrives while the first one's clean-up removes the temporary."""
    from XctDiffCore import atomic
    from XctDiffCore.dicom_series import write_dicom_series

    interrupt_call(monkeypatch, atomic.os, "rmdir", 1)
    with pytest.raises(KeyboardInterrupt), atomic.atomic_folder(tmp_path / "ct", lambda name: True) as tmp:
        (tmp / "a.dcm").write_bytes(b"half")
        raise KeyboardInterrupt
    interrupt_call(monkeypatch, atomic.os, "unlink", 1)
    with pytest.raises(KeyboardInterrupt), atomic.atomic_path(tmp_path / "ct.nrrd") as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    write_dicom_series(small_volume(1), tmp_path / "ct")  # and the next run writes as usual


@pytest.mark.parametrize("call, write", [
    ("open", lambda atomic, folder: atomic.atomic_path(folder / "ct.nrrd")),
    ("mkdir", lambda atomic, folder: atomic.atomic_folder(folder / "ct", lambda name: True)),
], ids=["file", "folder"])
def test_ctrl_c_just_after_the_temporary_is_made_leaves_nothing(tmp_path, monkeypatch, call, write):
    """The interrupt lands as the creating call returns, before its name could be kept anywhere."""
    from XctDiffCore import atomic

    real = getattr(atomic.os, call)

    def create_then_interrupt(*args, **kwargs):
        monkeypatch.setattr(atomic.os, call, real)
        result = real(*args, **kwargs)
        if call == "open":
            atomic.os.close(result)
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, call, create_then_interrupt)
    with pytest.raises(KeyboardInterrupt), write(atomic, tmp_path):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_second_ctrl_c_does_not_keep_the_empty_folders_a_failed_run_made(tmp_path, monkeypatch):
    from XctDiffCore import atomic

    snapshot = atomic.FolderSnapshot(tmp_path / "out" / "new")
    (tmp_path / "out" / "new" / "images").mkdir(parents=True)
    interrupt_call(monkeypatch, atomic.os, "rmdir", 1)
    with pytest.raises(KeyboardInterrupt):
        snapshot.remove_new_empty_folders()
    assert list(tmp_path.iterdir()) == []


def test_a_series_moved_away_by_another_writer_while_checked_is_no_error(tmp_path, monkeypatch):
    """Two runs writing one series folder: the other run's swap moves the earlier series aside while this
    run checks it. That folder was the tool's own, not foreign files."""
    from XctDiffCore import atomic
    from XctDiffCore.dicom_series import write_dicom_series

    folder = write_dicom_series(small_volume(1), tmp_path / "ct")
    real_stat = Path.stat

    def other_writer_moves_it(entry, **kwargs):  # as this run looks at the first file
        if entry.parent == folder and folder.exists():
            atomic.os.replace(folder, tmp_path / "gone")
        return real_stat(entry, **kwargs)

    monkeypatch.setattr(Path, "stat", other_writer_moves_it)
    assert atomic.check_output_series_folder(folder, lambda name: True) == folder


@pytest.mark.parametrize("exchange", [True, False])
def test_a_series_put_in_place_by_another_writer_during_the_swap_is_no_error(tmp_path, monkeypatch, exchange):
    """The other run's series lands in the middle of this run's swap: this run's still wins, and nothing is left."""
    from XctDiffCore import atomic
    from XctDiffCore.dicom_series import write_dicom_series

    folder = write_dicom_series(small_volume(1), tmp_path / "ct")
    real_replace, others = atomic.os.replace, []
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)

    def other_writer_puts_its_own(source, target):
        real_replace(source, target)
        moved_aside = Path(source) == folder  # without the exchange: this run's earlier series moved aside
        new_aside = exchange and Path(target).name == "old"  # with it: this run's new series put in the slot
        if (moved_aside or new_aside) and not others:
            others.append(source)  # before it writes: its own swap passes here too
            write_dicom_series(small_volume(3), folder)

    monkeypatch.setattr(atomic.os, "replace", other_writer_puts_its_own)
    write_dicom_series(small_volume(2), folder)
    monkeypatch.undo()
    assert others and read_ct(folder).array.max() == 2 and hidden(tmp_path) == []


def test_a_name_at_the_length_limit_is_written_and_a_longer_one_is_one_line(tmp_path):
    longest = tmp_path / ("x" * 250 + ".nrrd")  # 255 bytes: the hidden temporary name must be shorter
    write_volume(small_volume(1), longest)
    assert read_ct(longest).array.max() == 1 and hidden(tmp_path) == []
    with pytest.raises(XctDiffError, match=r"the file name is too long \(261 bytes; at most 255\)"):
        write_volume(small_volume(1), tmp_path / ("x" * 256 + ".nrrd"))
    from XctDiffCore.dicom_series import write_dicom_series

    with pytest.raises(XctDiffError, match="too long"):
        write_dicom_series(small_volume(1), tmp_path / ("x" * 256))
