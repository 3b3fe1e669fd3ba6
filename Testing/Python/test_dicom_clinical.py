"""Valid but unusual clinical DICOM files, as scanners and PACS write them, read right (XctDiffCore/io/).

Each test failed before its fix with a silent wrong result or a misleading error: a bright padding ring
around a CT, a gantry-tilted CT read unsheared, a localizer that made a series look unevenly spaced, an
enhanced (multi-frame) CT refused as "a single 2D image", a DICOMDIR refused as unreadable; a film with
Presentation LUT Shape INVERSE or a PALETTE COLOR film read as a negative, non-square pixels squeezing
the chest on its way to the model, a display shutter's bright frame left in. The files are made with pydicom from a known truth.
The audit they come from, wider (every case, with its outcome): ``python Testing/Scripts/dicom_audit/run.py``.
"""
from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_RADIOGRAPH
from test_io import dicom_without_image, grey_ramp, write_dicom_radiograph

from XctDiffCore.errors import XctDiffError
from XctDiffCore.io import DicomReadWarning, read_ct, read_radiograph

SPACING = (0.8, 0.9, 2.5)  # x, y, z mm
ORIGIN = (-20.0, -18.0, -100.0)


def ct_slices(folder: Path, hu: np.ndarray, positions=None, direction=np.eye(3), encode=None, names=None,
              series_uid=None, extra=None) -> list:
    """hu[k, j, i] as one CT Image Storage file per k (pydicom). ``positions``: each slice's LPS position
    (default: stacked along the normal); ``encode(hu_k) -> (stored, tags)``; ``extra(k, ds)`` edits a slice."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    files = []
    for k in range(hu.shape[0]):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
        ds.Modality, ds.PatientID, ds.StudyDate, ds.StudyTime, ds.StudyID, ds.SeriesNumber = "CT", "P1", "20260101", "120000", "1", 1
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "1.2.3.4", series_uid, "1.2.3.4.5"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelSpacing, ds.SliceThickness = [SPACING[1], SPACING[0]], SPACING[2]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
        position = positions[k] if positions is not None else np.add(ORIGIN, direction[:, 2] * SPACING[2] * k)
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        stored = hu[k].astype("<i2")
        if encode is not None:
            stored, tags = encode(hu[k])
            for key, value in tags.items():
                setattr(ds, key, value)
        if extra is not None:
            extra(k, ds)
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = folder / (names(k) if names else f"IM{k:04d}.dcm")
        ds.save_as(str(name), enforce_file_format=True)
        files.append(name)
    return files


def body(shape=(6, 24, 28)) -> np.ndarray:
    """Air around an ellipse of soft tissue with an off-centre bone block; brighter slice by slice (z shows)."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    hu = np.where((i / 0.8) ** 2 + (j / 0.6) ** 2 < 1, 40.0, -1000.0)
    hu[(i > 0.2) & (i < 0.5) & (j > 0.1) & (j < 0.4)] = 900.0
    return (hu + 10.0 * np.arange(shape[0])[:, None, None]).astype(np.int16)


def outside_circle(shape) -> np.ndarray:
    j, i = np.mgrid[0 : shape[1], 0 : shape[2]]
    return (j - shape[1] / 2 + 0.5) ** 2 + (i - shape[2] / 2 + 0.5) ** 2 > (min(shape[1:]) / 2) ** 2


# ---------------------------------------------------------------------------------------------- CT


@pytest.mark.parametrize("padding, signed, intercept", [(63536, False, -1024), (-2000, True, 0), (0, False, -1024)],
                         ids=["unsigned 63536 (-2000 as int16)", "signed -2000", "unsigned 0"])
def test_ct_padding_outside_the_field_of_view_is_air(tmp_path, padding, signed, intercept):
    """Unsigned pixels padded with 63536 and an intercept of -1024 were read as 62512 HU: a bright ring."""
    hu, out = body(), outside_circle(body().shape)

    def encode(hu_k):
        stored = (hu_k.astype(np.int32) - intercept).astype("<i2" if signed else "<u2")
        stored[out] = padding
        return stored, dict(PixelRepresentation=int(signed), RescaleIntercept=intercept, PixelPaddingValue=padding)

    ct_slices(tmp_path, hu, encode=encode)
    volume = read_ct(tmp_path)
    np.testing.assert_array_equal(volume.array[:, ~out], hu[:, ~out])
    assert volume.array[:, out].max() <= -1000


def test_ct_padding_within_the_tissue_range_is_left_alone(tmp_path):
    """A header naming a tissue value (0 HU) as padding cannot be told from water: the pixels are kept."""
    hu = body()
    ct_slices(tmp_path, hu, extra=lambda k, ds: setattr(ds, "PixelPaddingValue", 40))
    np.testing.assert_array_equal(read_ct(tmp_path).array, hu)


def smooth(points: np.ndarray) -> np.ndarray:
    return np.rint(500 * np.sin(points[:, 0] / 15) + 400 * np.cos(points[:, 1] / 20) + 3 * points[:, 2])


def test_gantry_tilted_ct_is_resampled_where_the_scanner_put_it(tmp_path):
    """Slices shifted along y by tan(15 deg) x 2.5 mm each (a gantry tilt): ITK read them as an unsheared stack,
    the anatomy displaced by up to 0.67 mm per slice without a word."""
    from scipy.ndimage import map_coordinates

    shape, shift = (8, 30, 32), np.array([0.0, np.tan(np.radians(15)) * SPACING[2], 0.0])
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ijk = np.stack([i, j, k], -1).reshape(-1, 3).astype(float)
    points = np.add(ORIGIN, ijk * SPACING) + np.outer(ijk[:, 2], shift)  # where each stored voxel lies
    hu = smooth(points).reshape(shape).astype(np.int16)
    positions = [np.add(ORIGIN, [0, 0, SPACING[2] * n]) + shift * n for n in range(shape[0])]
    ct_slices(tmp_path, hu, positions=positions, extra=lambda n, ds: setattr(ds, "GantryDetectorTilt", 15))
    with pytest.warns(DicomReadWarning, match="gantry tilt of 15.0 degrees"):
        volume = read_ct(tmp_path)
    np.testing.assert_allclose(volume.direction, np.eye(3), atol=1e-9)
    index = (points - volume.origin) / volume.spacing  # identity direction: (i, j, k) in the volume
    assert index.min() > -1e-3 and np.all(index <= np.array(volume.shape[::-1]) - 1 + 1e-3)
    inner = ((k > 0) & (k < shape[0] - 1) & (j > 0) & (j < shape[1] - 1) & (i > 0) & (i < shape[2] - 1)).ravel()
    sampled = map_coordinates(volume.array.astype(float), index[inner][:, ::-1].T, order=1)
    assert np.abs(sampled - smooth(points)[inner]).max() < 25  # linear interpolation of a smooth field


def test_ct_slices_that_do_not_line_up_are_refused(tmp_path):
    hu = body()
    jitter = [np.add(ORIGIN, [0, 0, SPACING[2] * n]) + [0, 3.0 * (n % 2), 0] for n in range(hu.shape[0])]
    ct_slices(tmp_path, hu, positions=jitter)
    with pytest.raises(XctDiffError, match="do not line up"):
        read_ct(tmp_path)


@pytest.mark.parametrize("tag, second, words", [
    ("PixelSpacing", [1.8, 1.6], "differ in pixel spacing"),
    ("ImageOrientationPatient", [0.984808, 0.173648, 0, -0.173648, 0.984808, 0], "differ in orientation"),
], ids=["pixel spacing", "orientation"])
def test_a_series_of_two_grids_is_refused(tmp_path, tag, second, words):
    """ITK read the whole stack with the first slice's spacing and orientation, without a word."""
    ct_slices(tmp_path, body(), extra=lambda k, ds: setattr(ds, tag, second) if k >= 3 else None)
    with pytest.raises(XctDiffError, match=words):
        read_ct(tmp_path)


@pytest.mark.parametrize("size", [(24, 28), (40, 32)], ids=["same size", "other size"])
def test_a_localizer_in_the_series_is_left_out(tmp_path, size):
    """A scout image in the series was refused as 'unevenly spaced slices' or 'Size mismatch' (ITK's words)."""
    import pydicom

    hu = body()
    files = ct_slices(tmp_path, hu)
    scout = pydicom.dcmread(files[0])
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = "1.2.3.99"
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient, scout.ImagePositionPatient = [1, 0, 0, 0, 0, -1], [-20, 0, 50]
    scout.Rows, scout.Columns = size
    scout.PixelData = np.zeros(size, "<i2").tobytes()
    scout.save_as(tmp_path / "scout.dcm")
    with pytest.warns(DicomReadWarning, match="left out 1 localizer"):
        volume = read_ct(tmp_path)
    np.testing.assert_array_equal(volume.array, hu)
    assert volume.origin == pytest.approx(ORIGIN)


def test_a_folder_of_two_series_says_which_it_read(tmp_path):
    hu = body()
    ct_slices(tmp_path, hu, names=lambda k: f"A{k}.dcm")
    ct_slices(tmp_path, hu[:4] + 7, names=lambda k: f"B{k}.dcm")
    with pytest.warns(DicomReadWarning, match=r"holds 2 DICOM series: read the one with the most images, [0-9.]+ \(6; the others have 4\)"):
        np.testing.assert_array_equal(read_ct(tmp_path).array, hu)


def enhanced_ct(path: Path, hu: np.ndarray, gaps=None) -> Path:
    """An Enhanced CT Image Storage file: every frame in one file, geometry and rescale in functional groups."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2.1", generate_uid()
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "1.2.3", generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames, (ds.Rows, ds.Columns) = hu.shape[0], hu.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    measures, plane, value = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [SPACING[1], SPACING[0]], SPACING[2]
    plane.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    value.RescaleIntercept, value.RescaleSlope, value.RescaleType = -1024, 1, "HU"
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([plane])
    shared.PixelValueTransformationSequence = Sequence([value])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    z = np.cumsum([0.0] + list(gaps if gaps is not None else [SPACING[2]] * (hu.shape[0] - 1)))
    frames = []
    for k in range(hu.shape[0]):
        position, frame = Dataset(), Dataset()
        position.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + z[k]]
        frame.PlanePositionSequence = Sequence([position])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = (hu.astype(np.int32) + 1024).astype("<u2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.mark.parametrize("step", [SPACING[2], -SPACING[2]], ids=["feet to head", "head to feet"])
def test_an_enhanced_multiframe_ct_is_read(tmp_path, step):
    """It was refused as 'a DICOM series with a single 2D image'. Frames stored head to feet (down the normal)
    are read with the direction that says so."""
    hu = body()
    for given in (enhanced_ct(tmp_path / "enhanced.dcm", hu, gaps=[step] * (hu.shape[0] - 1)), tmp_path):  # file, folder
        volume = read_ct(given)
        np.testing.assert_array_equal(volume.array, hu)
        assert volume.spacing == pytest.approx(SPACING) and volume.origin == pytest.approx(ORIGIN)
        np.testing.assert_allclose(volume.direction, np.diag([1.0, 1.0, np.sign(step)]), atol=1e-9)


def test_an_enhanced_ct_with_uneven_frames_is_refused(tmp_path):
    path = enhanced_ct(tmp_path / "e.dcm", body(), gaps=[2.5, 2.5, 5.0, 2.5, 2.5])
    with pytest.raises(XctDiffError, match="unevenly spaced"):
        read_ct(path)


def test_a_dicomdir_reads_the_series_it_indexes(tmp_path):
    """A CD or PACS export: DICOMDIR at the top, the files (no suffix) in folders below it."""
    import pydicom
    from pydicom.fileset import FileSet

    hu = body()
    files = ct_slices(tmp_path / "source", hu, names=lambda k: f"{k:08d}")
    fileset = FileSet()
    for name in files:
        fileset.add(pydicom.dcmread(name))
    fileset.write(tmp_path / "export")
    with warnings.catch_warnings():  # pydicom stages in a TemporaryDirectory it leaves to the garbage collector, whose
        warnings.simplefilter("ignore", ResourceWarning)  # warning would land in a later test's captured stderr
        del fileset
        gc.collect()
    for given in (tmp_path / "export" / "DICOMDIR", tmp_path / "export"):  # the index, or the folder it tops
        np.testing.assert_array_equal(read_ct(given).array, hu)
    (tmp_path / "export" / "DICOMDIR").unlink()  # a folder above a series, no index: the series is named
    with pytest.raises(XctDiffError, match="below it: 1 DICOM CT series"):
        read_ct(tmp_path / "export")


def sheared_ct(path: Path, hu: np.ndarray, axes: np.ndarray) -> Path:
    """hu[k, j, i] written with voxel (i, j, k) at ORIGIN + axes @ (i, j, k): ``axes``' columns need not be
    perpendicular. NRRD through pynrrd; MetaImage through SimpleITK; NIfTI through SimpleITK, then its sform
    rows written into the header (SimpleITK's writer rotates a sheared matrix into a perpendicular one)."""
    import gzip
    import struct

    import nrrd
    import SimpleITK as sitk

    if path.suffix == ".nrrd":
        nrrd.write(str(path), hu, {"space": "left-posterior-superior", "space directions": axes.T,
                                   "space origin": np.array(ORIGIN), "kinds": ["domain"] * 3}, index_order="C")
        return path
    image = sitk.GetImageFromArray(hu)
    spacing = np.linalg.norm(axes, axis=0)
    image.SetSpacing(tuple(spacing))
    image.SetOrigin(ORIGIN)
    if path.suffix == ".mha":
        image.SetDirection(tuple((axes / spacing).ravel()))
        sitk.WriteImage(image, str(path))
        return path
    plain = path.with_name("plain.nii")
    sitk.WriteImage(image, str(plain))
    data = bytearray(plain.read_bytes())
    sform = np.diag([-1.0, -1.0, 1.0]) @ np.column_stack([axes, ORIGIN])  # LPS -> the RAS of NIfTI
    struct.pack_into("<12f", data, 280, *sform.ravel())
    path.write_bytes(gzip.compress(bytes(data)) if path.name.endswith(".gz") else bytes(data))
    return path


@pytest.mark.parametrize("name", ["sheared.nrrd", "sheared.mha", "sheared.nii", "sheared.nii.gz"])
def test_a_sheared_volume_is_resampled_where_its_voxels_lie(tmp_path, name):
    """Its axes not perpendicular (a tilted CT saved as it was scanned): refused before (NRRD, MetaImage), or
    read by ITK as a nearby rotation without a word (NIfTI: the anatomy tilted instead of sheared)."""
    from scipy.ndimage import map_coordinates

    from XctDiffCore.io import ReadWarning

    shape = (8, 30, 32)
    axes = np.diag(SPACING)
    axes[1, 2] = np.tan(np.radians(15)) * SPACING[2]  # each slice 0.67 mm further along y
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ijk = np.stack([i, j, k], -1).reshape(-1, 3).astype(float)
    points = np.add(ORIGIN, ijk @ axes.T)
    path = sheared_ct(tmp_path / name, smooth(points).reshape(shape).astype(np.int16), axes)
    with pytest.warns(ReadWarning, match=r"not perpendicular .*15.0 degrees.*resampled onto an orthogonal grid"):
        volume = read_ct(path)
    np.testing.assert_allclose(volume.direction, np.eye(3), atol=1e-6)
    index = (points - volume.origin) / volume.spacing
    assert index.min() > -1e-3 and np.all(index <= np.array(volume.shape[::-1]) - 1 + 1e-3)
    inner = ((k > 0) & (k < shape[0] - 1) & (j > 0) & (j < shape[1] - 1) & (i > 0) & (i < shape[2] - 1)).ravel()
    sampled = map_coordinates(volume.array.astype(float), index[inner][:, ::-1].T, order=1)
    assert np.abs(sampled - smooth(points)[inner]).max() < 25  # linear interpolation of a smooth field


@pytest.mark.parametrize("name", ["flat.nrrd", "flat.nii"])
def test_a_volume_whose_axes_are_parallel_is_refused_in_words(tmp_path, name):
    """ITK's message ran over seven lines, a matrix among them, and the one kept was '0 0 0'."""
    axes = np.diag(SPACING)
    axes[:, 2] = axes[:, 1] / SPACING[1] * SPACING[2]  # the third axis along the second
    with pytest.raises(XctDiffError, match="determinant is 0$|are .nearly. parallel"):
        read_ct(sheared_ct(tmp_path / name, body(), axes))


def test_a_nifti_without_orientation_says_so(tmp_path):
    """qform_code = sform_code = 0: the standard attaches no orientation (ITK reads LPS, nibabel LAS): left and
    right are a guess, which was made silently."""
    import struct

    from XctDiffCore.io import ReadWarning, write_volume
    from XctDiffCore.volume import Volume

    path = write_volume(Volume(body(), SPACING, ORIGIN), tmp_path / "analyze.nii")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_ct(path)  # written with its orientation: no word
    data = bytearray(path.read_bytes())
    struct.pack_into("<2h", data, 252, 0, 0)
    path.write_bytes(bytes(data))
    with pytest.warns(ReadWarning, match="records no orientation .*check left and right"):
        np.testing.assert_array_equal(read_ct(path).array, body())


# ---------------------------------------------------------------------------------------------- films


def test_presentation_lut_shape_inverse_is_shown_as_a_viewer_shows_it(tmp_path):
    """MONOCHROME2 with Presentation LUT Shape INVERSE came out as a negative; MONOCHROME1 with INVERSE (the DX
    rule) is inverted once, not twice."""
    film = grey_ramp(top=4095).astype(np.uint16)
    plain = read_radiograph(write_dicom_radiograph(tmp_path / "plain.dcm", film)).image
    inverse = read_radiograph(write_dicom_radiograph(tmp_path / "inv.dcm", 4095 - film, PresentationLUTShape="INVERSE"))
    mono1 = read_radiograph(write_dicom_radiograph(tmp_path / "m1.dcm", 4095 - film, "MONOCHROME1",
                                                   PresentationLUTShape="INVERSE"))
    identity = read_radiograph(write_dicom_radiograph(tmp_path / "id.dcm", film, PresentationLUTShape="IDENTITY"))
    for radiograph in (inverse, mono1, identity):
        np.testing.assert_array_equal(radiograph.image, plain)


def test_a_palette_color_film_is_read_through_its_palette(tmp_path):
    """Palette indices were read as grey levels: with a reversed grey palette, a negative."""
    film = (grey_ramp() // 1).astype(np.uint8)
    table = ((255 - np.arange(256)) * 257).astype("<u2").tobytes()  # index i -> grey 255 - i
    luts = {f"{colour}PaletteColorLookupTable{part}": value for colour in ("Red", "Green", "Blue")
            for part, value in (("Descriptor", [256, 0, 16]), ("Data", table))}
    path = write_dicom_radiograph(tmp_path / "p.dcm", 255 - film, "PALETTE COLOR", bits_stored=8, **luts)
    image = read_radiograph(path).image
    np.testing.assert_allclose(image / 257.0, film, atol=1e-3)


def test_non_square_pixels_reach_the_model_square(tmp_path):
    """Rows 0.2 mm apart, columns 0.4 mm: the film reached the model squeezed to half its width (the
    preprocessing resizes the pixel grid as it is). The reader keeps the stored grid; the pipeline's
    preprocessing makes the pixels square first."""
    from XctDiffCore.preprocess import square_pixels

    film = grey_ramp(rows=96, cols=64, top=4095)
    radiograph = read_radiograph(write_dicom_radiograph(tmp_path / "n.dcm", film, PixelSpacing=[0.2, 0.4]))
    assert radiograph.image.shape == (96, 64) and radiograph.spacing == (0.2, 0.4)  # as stored
    image, spacing = square_pixels(radiograph.image, radiograph.spacing)
    assert image.shape == (48, 64) and spacing == (0.4, 0.4)  # 19.2 x 25.6 mm either way
    np.testing.assert_allclose(image, film[0::2] / 2 + film[1::2] / 2, atol=0.02 * 4095)
    wide, _ = square_pixels(radiograph.image.T, (0.4, 0.2))
    np.testing.assert_allclose(wide, image.T, rtol=1e-5)  # the other axis: the same, to float32 rounding
    assert square_pixels(radiograph.image, (0.2, 0.201))[0] is radiograph.image  # within 1 %: as it is
    assert square_pixels(radiograph.image, None)[0] is radiograph.image


def test_the_pipeline_preprocesses_a_film_with_square_pixels(tmp_path):
    """Pipeline.preprocess of a film stored at 0.2 x 0.4 mm equals that of the same film stored square."""
    from XctDiffCore.io import Radiograph
    from XctDiffCore.pipeline import XctDiffPipeline
    from XctDiffCore.preprocess import square_pixels

    film = grey_ramp(rows=192, cols=128, top=4095).astype(np.float32)
    stretched = Radiograph(film, (0.2, 0.4), False, "n")
    square = Radiograph(square_pixels(film, (0.2, 0.4))[0], (0.4, 0.4), False, "s")

    class Info:
        xray_size = 128

    pipeline = XctDiffPipeline.__new__(XctDiffPipeline)  # preprocess needs no network
    pipeline.info = Info()
    np.testing.assert_array_equal(pipeline.preprocess(stretched), pipeline.preprocess(square))


@pytest.mark.parametrize("shutter", [
    dict(ShutterShape="RECTANGULAR", ShutterLeftVerticalEdge=9, ShutterRightVerticalEdge=56,
         ShutterUpperHorizontalEdge=7, ShutterLowerHorizontalEdge=42),
    dict(ShutterShape="CIRCULAR", CenterOfCircularShutter=[24, 32], RadiusOfCircularShutter=20),
    dict(ShutterShape="POLYGONAL", VerticesOfThePolygonalShutter=[7, 9, 7, 56, 42, 56, 42, 9]),
], ids=["rectangular", "circular", "polygonal"])
def test_a_display_shutter_hides_the_collimated_border(tmp_path, shutter):
    """The unexposed border, white on a processed film, was left in (a viewer hides it: black)."""
    film = grey_ramp(top=3000).astype(np.uint16) + 500
    r, c = np.mgrid[1:49, 1:65]
    if shutter["ShutterShape"] == "CIRCULAR":
        visible = (r - 24) ** 2 + (c - 32) ** 2 <= 20**2
    else:
        visible = (r >= 7) & (r <= 42) & (c >= 9) & (c <= 56)
    stored = np.where(visible, film, 4095).astype(np.uint16)
    image = read_radiograph(write_dicom_radiograph(tmp_path / "s.dcm", stored, **shutter)).image
    np.testing.assert_array_equal(image[visible], film[visible])
    assert np.all(image[~visible] == film[visible].min())


@pytest.mark.parametrize("origin", [(1, 1), (-3, 5)], ids=["at the corner", "partly outside"])
def test_a_bitmap_shutter_hides_the_set_bits_of_its_overlay_plane(tmp_path, origin):
    """Shutter Shape BITMAP names an overlay plane whose set bits a viewer hides: it was left as stored."""
    from pydicom.pixels import pack_bits

    film = grey_ramp(top=3000).astype(np.uint16) + 500
    rows, cols = 40, 60
    r, c = np.mgrid[0:rows, 0:cols]
    bits = ((r - 20) ** 2 + (c - 30) ** 2 > 15**2).astype(np.uint8)  # a round field, the rest shuttered
    hidden = np.zeros(film.shape, dtype=bool)
    top, left = origin[0] - 1, origin[1] - 1
    inside = (r + top >= 0) & (r + top < film.shape[0]) & (c + left >= 0) & (c + left < film.shape[1])
    hidden[(r + top)[inside], (c + left)[inside]] = bits[inside].astype(bool)
    stored = np.where(hidden, 4095, film).astype(np.uint16)
    path = write_dicom_radiograph(tmp_path / "b.dcm", stored, ShutterShape="BITMAP", ShutterOverlayGroup=0x6000)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", cols)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", list(origin))
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", pack_bits(bits.ravel()))
    ds.save_as(path)
    image = read_radiograph(path).image
    np.testing.assert_array_equal(image[~hidden], film[~hidden])
    assert hidden.sum() > 100 and np.all(image[hidden] == film[~hidden].min())


@pytest.mark.parametrize("conversion, words", [
    ("WSD", "a workstation's screen capture (Conversion Type WSD)"), ("SD", "a scanned document (Conversion Type SD)"),
    ("DF", None), ("SI", None)])
def test_a_secondary_capture_screenshot_is_flagged_by_its_header(tmp_path, conversion, words):
    """A study's PACS export holds Secondary Capture images beside its films: a digitized film (Conversion Type DF) is a
    film, but a workstation's screenshot (a dose sheet, an annotated view: WSD) or a scanned request form (SD) is not,
    and a text screenshot can pass the chest-contrast check (one of a dose sheet did, consistency 0.53 over the bundled
    model's 0.5): it was reconstructed as a chest without a word. Its header says what it is, as a lateral's does."""
    from XctDiffCore.plausibility import view_problems

    film = read_radiograph(write_dicom_radiograph(tmp_path / "sc.dcm", grey_ramp().astype(np.uint16),
                                                  SOPClassUID="1.2.840.10008.5.1.4.1.1.7", Modality="OT",
                                                  ConversionType=conversion))
    problems = view_problems(film.header)
    if words is None:
        assert problems == []
    else:
        assert len(problems) == 1 and words in problems[0] and "not a film" in problems[0], problems


def test_a_dicomdir_or_a_report_given_as_a_film_says_what_it_is(tmp_path):
    """`xctdiff reconstruct export/DICOMDIR` (the index a PACS or CD export tops its films with) or a study's report
    was "cannot read ... The dataset has no 'Pixel Data', 'Float Pixel Data' or 'Double Float Pixel Data' element":
    now the line says what the file is, and for the index how to reach the films it lists."""
    import pydicom
    from pydicom.fileset import FileSet

    fileset = FileSet()
    from pydicom.uid import generate_uid

    film = write_dicom_radiograph(tmp_path / "film.dcm", grey_ramp().astype(np.uint16), PatientID="1",
                                  PatientName="A^B", StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
                                  StudyDate="20260101", StudyTime="120000", StudyID="1", AccessionNumber="1",
                                  SeriesNumber=1, InstanceNumber=1)
    fileset.add(pydicom.dcmread(film))
    fileset.write(tmp_path / "export")
    with warnings.catch_warnings():  # pydicom's staging TemporaryDirectory, left to the garbage collector
        warnings.simplefilter("ignore", ResourceWarning)
        del fileset
        gc.collect()
    index = tmp_path / "export" / "DICOMDIR"
    with pytest.raises(XctDiffError, match=f"^{index} is a DICOMDIR, the index of a DICOM export, not a radiograph: "
                                           f"give the folder it tops, {tmp_path / 'export'}, with --recursive$"):
        read_radiograph(index)
    report = dicom_without_image(tmp_path / "IM000002", "1.2.840.10008.5.1.4.1.1.88.33", "SR")
    with pytest.raises(XctDiffError, match=r"^expected a radiograph, got a DICOM object without an image \(SR, "
                                           f"Comprehensive SR Storage\\): {report}$"):
        read_radiograph(report)
    data = film.read_bytes()  # a film cut short before its Rows (a copy stopped) is no report
    (tmp_path / "IM000003").write_bytes(data[: data.index(b"\x28\x00\x10\x00")])
    with pytest.raises(XctDiffError, match="its header ends before the image \\(no Rows\\): a copy cut short"):
        read_radiograph(tmp_path / "IM000003")


def test_a_film_whose_decoder_is_missing_names_every_way_to_one(tmp_path, monkeypatch):
    """A PACS sends a film in JPEG 2000; where no decoder is installed pydicom lists, over several lines, what each of
    its plugins needs, and the one line kept was the last: "pillow - requires numpy and pillow>=10.0", with Pillow 13
    installed (its OpenJPEG codec is what was missing) and pylibjpeg-openjpeg, the one to install, unnamed. Now the
    line names the transfer syntax and every plugin's needs."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import RLELossless

    import pydicom

    path = write_dicom_radiograph(tmp_path / "IM000001", grey_ramp(top=4000).astype(np.uint16))
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.save_as(path)
    decoder = get_decoder(RLELossless)  # as if none of its plugins could run here
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"gdcm": ("gdcm>=3.0.10",),
                                                  "pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-rle>=1.0"),
                                                  "pillow": ("numpy", "pillow>=10.0")})
    with pytest.raises(XctDiffError) as caught:
        read_radiograph(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message == (f"cannot read {path} as a DICOM radiograph: no decoder for its RLE Lossless pixel data is "
                       "installed; one of: gdcm - requires gdcm>=3.0.10; pylibjpeg - requires pylibjpeg>=2.0 and "
                       "pylibjpeg-rle>=1.0; pillow - requires numpy and pillow>=10.0 (built with this codec)")


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit VR", "implicit VR"])
def test_a_film_without_the_dicom_file_header_is_read(tmp_path, implicit):
    """A bare data set (no preamble, no 'DICM', no file meta: older and research exports write it) is the film
    it holds; pydicom alone said "use force=True". A .dcm file that holds no data set at all is one sentence."""
    import pydicom

    from XctDiffCore.io import inspect_path, read_radiograph

    ds = pydicom.dcmread(SAMPLE_RADIOGRAPH)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(tmp_path / "bare.dcm", implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    assert np.array_equal(read_radiograph(tmp_path / "bare.dcm").image, read_radiograph(SAMPLE_RADIOGRAPH).image)
    assert inspect_path(tmp_path / "bare.dcm")["kind"] == "radiograph"
    (tmp_path / "junk.dcm").write_bytes(b"hello, not a DICOM file")
    with pytest.raises(XctDiffError, match="is not a DICOM file"):
        read_radiograph(tmp_path / "junk.dcm")


def test_a_folder_that_vanishes_during_a_search_is_passed_over(tmp_path, monkeypatch):
    """`xctdiff inspect /` walked /proc: a process that ended between its listing and its turn (or another job's
    temporary folder removed meanwhile) raised FileNotFoundError out of rglob, a traceback."""
    from XctDiffCore.ct_search import find_ct_inputs

    ct_slices(tmp_path / "a" / "series", body())
    (tmp_path / "b" / "gone").mkdir(parents=True)
    scandir = os.scandir

    def vanishing(path="."):
        if Path(path).name == "gone":
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", vanishing)
    found = find_ct_inputs([tmp_path], [])
    assert [item.path.parent.name for item in found] == ["series"]
    from XctDiffCore.commands.reconstruct_job import find_radiographs  # the films of reconstruct --recursive
    from XctDiffCore.io import find_real_radiographs  # the style stage's real films

    (tmp_path / "b" / "film.png").write_bytes(b"")
    assert find_radiographs(tmp_path / "b", recursive=True) == [tmp_path / "b" / "film.png"]
    assert find_real_radiographs([tmp_path / "b"]) == [tmp_path / "b" / "film.png"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_pipe_in_a_series_folder_is_one_sentence_not_a_hang(tmp_path):
    """GDCM's folder scan opens every entry like a file: a named pipe made it skip slices ("unevenly spaced"), and a
    folder it cannot finish (/proc/kmsg, under `xctdiff inspect /`) blocked for ever. A series folder holding one is
    refused, a search passes over it, and no search enters /proc, /sys or /dev."""
    import subprocess
    import sys

    from conftest import REPO

    ct_slices(tmp_path / "series", body())
    os.mkfifo(tmp_path / "series" / "pipe")
    with pytest.raises(XctDiffError, match="holds pipe, which is not a file"):
        read_ct(tmp_path / "series")
    from XctDiffCore.ct_search import find_ct_inputs

    ignored = []
    with pytest.raises(XctDiffError, match="no CT"):
        find_ct_inputs([tmp_path], ignored)
    assert [item.reason for item in ignored] == ["holds pipe, which is not a file (a pipe, socket or device)"]
    if Path("/proc/kmsg").exists():
        done = subprocess.run([sys.executable, "-m", "XctDiffCore", "inspect", "/"], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.strip().startswith("error: ")
