"""Read a radiograph: :class:`Radiograph`, :func:`read_radiograph` and its readers.

PNG/JPEG/TIFF (Pillow), a 2D or single-slice NRRD/NIfTI/MetaImage (SimpleITK) and a DICOM film (modality and VOI
LUTs, MONOCHROME1 and palettes, pixel spacing at the patient, display shutters and overlays, patient orientation,
missing decoders) become a float32 image in display orientation with its spacing when known. Also what a DICOM file
that is no film is (:func:`dicom_not_a_film`) and the search for real films (:func:`find_real_radiographs`). Why a
module of its own: a film's pitfalls (grey levels, orientation, an unknown pixel size) are not a CT's.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import XctDiffError
from .common import (DRR_TAG_KEY, PIL_SUFFIXES, RADIOGRAPH_SUFFIXES, SITK_VOLUME_SUFFIXES, _check_input,
                     _check_sitk_header, _dcmread, _itk_quiet, _library_errors, _one_line, _sitk_header, _suffix,
                     is_dicom_file, walk_below)


# Smaller images carry no usable anatomy and break the radiograph preprocessing.
MIN_RADIOGRAPH_SIZE = 32
# The preprocessing pads a film to a square of its long side: 10000 pixels (a 43 cm film scanned at
# 43 um) make a 400 MB float32 square, a strip of 32 x 100000 pixels would ask for 40 GB. Checked on
# the file's header, before the pixels are decoded. (How thin a film may be: preprocess.MAX_RADIOGRAPH_ASPECT.)
MAX_RADIOGRAPH_SIDE = 10000


@dataclass
class Radiograph:
    """A radiograph as the engine sees it.

    ``image``: float32 ``[row, col]`` in display orientation, intensities as stored (after DICOM
    modality/VOI LUTs; MONOCHROME1, and MONOCHROME2 with Presentation LUT Shape INVERSE, inverted so that
    bone is bright; PALETTE COLOR through its palette; what a display shutter hides set to the film's
    black), on the file's pixel grid. ``spacing``: ``(row, col)`` in mm when the file records it (DICOM:
    Pixel Spacing, else Imager Pixel Spacing, the detector's, divided by the film's magnification where the
    header records it), else ``None``; rows and columns may be
    spaced differently (:func:`~XctDiffCore.preprocess.square_pixels` makes them square for the model). ``is_drr``: the file carries the ``xctdiff_drr=1`` tag.
    ``source``: the path it was read from. ``age_years``: the patient's age when a DICOM file records
    it (Patient's Age), else ``None``. ``header``: what a DICOM file says about the view, for the
    plausibility check (:data:`HEADER_FACTS`' keywords, upper case, those it records).
    """

    image: np.ndarray
    spacing: Optional[tuple]
    is_drr: bool
    source: str
    age_years: Optional[float] = None
    header: dict = field(default_factory=dict)


# the DICOM attributes that say what a film shows (read by plausibility.view_problems and processing_problems)
HEADER_FACTS = ("ViewPosition", "BodyPartExamined", "PresentationIntentType", "ConversionType")


def check_radiograph_size(rows: int, cols: int, source: str = "image") -> None:
    """Refuse a film under 32x32 pixels or over 10000 pixels a side."""
    rows, cols = int(rows), int(cols)
    if min(rows, cols) < MIN_RADIOGRAPH_SIZE:
        raise XctDiffError(
            f"radiograph {source} is {rows}x{cols} pixels, "
            f"smaller than the minimum {MIN_RADIOGRAPH_SIZE}x{MIN_RADIOGRAPH_SIZE}"
        )
    if max(rows, cols) > MAX_RADIOGRAPH_SIDE:
        raise XctDiffError(
            f"radiograph {source} is {rows}x{cols} pixels, larger than the maximum {MAX_RADIOGRAPH_SIDE} pixels a side"
        )


def check_radiograph_image(image: np.ndarray, source: str = "image") -> np.ndarray:
    """Refuse what no radiograph step can use: not 2D, a size :func:`check_radiograph_size` refuses,
    NaN or Inf. A colour image (rows x columns x 3 or 4: RGB, RGBA) is made grey, as a colour file is.
    Returns float32."""
    try:
        image = np.asarray(image)
    except (TypeError, ValueError, RuntimeError) as exc:  # a tensor numpy cannot take (bf16), ragged lists
        raise XctDiffError(f"radiograph {source} is not an array of numbers ({_one_line(exc)})") from None
    if image.dtype.kind not in "biuf":  # strings, objects, complex numbers: no grey levels
        raise XctDiffError(f"radiograph {source} holds {image.dtype} values, not grey levels")
    if image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) > 4:  # a colour image, not a 3-slice stack
        image = to_grey(image)
    if image.ndim != 2:
        raise XctDiffError(f"expected a 2D radiograph, got an array of shape {image.shape} (radiograph {source})")
    check_radiograph_size(*image.shape, source)
    with np.errstate(over="ignore", invalid="ignore"):  # a value beyond float32 becomes inf: refused below
        image = image.astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        raise XctDiffError(f"radiograph {source} contains NaN or infinite pixel values")
    return image


def find_real_radiographs(patterns) -> list[Path]:
    """Folders (searched recursively for image and DICOM files) or glob patterns -> sorted unique files."""
    files: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            found = [p for p in walk_below(path) if p.is_file() and p.suffix.lower() in RADIOGRAPH_SUFFIXES]
        else:
            found = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
        if not found:
            raise XctDiffError(f"no real radiographs found at {pattern!r} (a folder of images or a glob pattern)")
        files.update(found)
    if not files:
        raise XctDiffError("style.real names no real radiographs: list folders or glob patterns of real films")
    return sorted(files)


def read_radiograph(path) -> Radiograph:
    """Read a radiograph (PNG/JPEG/TIFF, DICOM CR/DX/DR, 2D or single-slice NRRD/NIfTI/MetaImage)."""
    path = _check_input(path, allow_folder=False)
    suffix, age, header = _suffix(path), None, {}
    if suffix in PIL_SUFFIXES:
        image, spacing, is_drr = _read_pil(path)
    elif suffix in SITK_VOLUME_SUFFIXES:
        _check_sitk_header(path, suffix)
        image, spacing, is_drr = _read_sitk_radiograph(path)
    elif suffix == ".npz":
        raise XctDiffError(f"expected a radiograph, got a 3D CT volume (.npz): {path}")
    elif is_dicom_file(path):
        image, spacing, is_drr, age, header = _read_dicom_radiograph(path)
    else:
        raise XctDiffError(
            f"unsupported radiograph file type '{suffix or path.name}': expected .png, .jpg, .tif, "
            f".dcm, .nrrd, .nii or .mha ({path})"
        )
    image = check_radiograph_image(image, str(path))
    return Radiograph(image=image, spacing=spacing, is_drr=is_drr, source=str(path), age_years=age, header=header)


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma (weights sum to 1: a grey image stored as RGB keeps its grey levels)."""
    return rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _read_pil(path: Path):
    from PIL import Image, ImageOps, UnidentifiedImageError

    with _library_errors(path, "an image"):
        try:
            opened = Image.open(path)
        except UnidentifiedImageError as exc:
            raise XctDiffError(f"{path} is not a readable image: its content is not {_suffix(path)} image data") from exc
    with _library_errors(path, "an image"), opened as img:
        if getattr(img, "n_frames", 1) > 1:
            raise XctDiffError(f"expected a 2D radiograph, got a {img.n_frames}-frame image stack: {path}")
        check_radiograph_size(img.size[1], img.size[0], str(path))  # before decoding (EXIF rotation keeps it)
        img.load()
        text = dict(getattr(img, "text", {}) or {})
        img = ImageOps.exif_transpose(img)  # cameras and scanners may store the film rotated
        if img.mode in ("1", "LA", "La"):
            img = img.convert("L")
        elif not (img.mode in ("L", "I", "F", "RGB") or img.mode.startswith("I;16")):
            img = img.convert("RGB")  # palette, RGBA, CMYK, YCbCr...: through RGB to grey
        array = np.asarray(img)
    if array.ndim == 3:
        array = to_grey(array)
    return array.astype(np.float32), None, text.get(DRR_TAG_KEY) == "1"


def _read_sitk_radiograph(path: Path):
    """A 2D image, or a 3D one with a single slice (how Slicer saves a 2D scalar volume node)."""
    import SimpleITK as sitk

    reader = _sitk_header(path, "a radiograph")
    size, components = reader.GetSize(), reader.GetNumberOfComponents()
    if components not in (1, 3, 4):
        raise XctDiffError(f"expected a grey (or RGB) radiograph, got {components} values per pixel: {path}")
    if len(size) == 2 or (len(size) == 3 and 1 in size):  # a film (3D: one slice): check before reading its pixels
        flat = size.index(1) if len(size) == 3 else None
        rows, cols = [size[axis] for axis in reversed(range(len(size))) if axis != flat]
        check_radiograph_size(rows, cols, str(path))
    with _library_errors(path, "a radiograph"), _itk_quiet():
        image = reader.Execute()
    is_drr = image.HasMetaDataKey(DRR_TAG_KEY) and image.GetMetaData(DRR_TAG_KEY).strip() == "1"
    if image.GetDimension() == 3:
        size = image.GetSize()
        if 1 not in size:
            raise XctDiffError(f"expected a radiograph, got a 3D volume of size {size} (x, y, z): {path}")
        normal = np.array(image.GetDirection()).reshape(3, 3)[:, size.index(1)]
        if np.argmax(np.abs(normal)) == 1:
            # A coronal slice placed in patient space: rows run to the feet, columns to the patient's left.
            image = sitk.DICOMOrient(image, "LPI")
        flat = image.GetSize().index(1)  # sitk axis (x, y, z) of the single slice
        kept = [axis for axis in (2, 1, 0) if axis != flat]  # sitk axes of (row, col)
        array = np.take(sitk.GetArrayFromImage(image), 0, axis=2 - flat)
    else:
        kept = [1, 0]
        array = sitk.GetArrayFromImage(image)  # [row, col] (+ components)
    if array.ndim == 3:  # vector pixels (RGB)
        array = to_grey(array)
    spacing = tuple(float(image.GetSpacing()[axis]) for axis in kept)
    if _suffix(path) in (".nrrd", ".nhdr") and not _nrrd_records_spacing(path):
        spacing = None  # ITK's 1 mm is its default, not the film's: unknown, as a PNG's
    return array.astype(np.float32), spacing, is_drr


def _nrrd_records_spacing(path: Path) -> bool:
    """Whether an NRRD header gives its pixel size (a ``spacings`` or ``space directions`` field). The Slicer
    bridge writes a node whose spacing is unknown without either; ITK reads such a file as 1 mm pixels, which
    would make a 64 x 64 node a 64 mm film."""
    import nrrd

    with _library_errors(path, "an NRRD file"):
        header = nrrd.read_header(str(path))
    return "spacings" in header or "space directions" in header


def _dicom_luts():
    try:  # pydicom >= 3
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x, as bundled with some 3D Slicer releases
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _dicom_color_lut():
    try:  # pydicom >= 3
        from pydicom.pixels import apply_color_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_color_lut
    return apply_color_lut


def _dicom_display_orientation(image: np.ndarray, orientation, spacing):
    """Use (0020,0020) Patient Orientation, when given, to put the patient's left at the right and feet down."""
    if not orientation or len(orientation) != 2:
        return image, spacing
    # The first letter of each value; an empty value (``\\``) or an unknown letter says nothing.
    row_dir, col_dir = (str(v).strip().upper()[:1] for v in orientation)
    row_dir, col_dir = (d if d and d in "LRAPHF" else None for d in (row_dir, col_dir))
    if row_dir in ("H", "F") and col_dir in ("L", "R"):  # stored transposed
        image, row_dir, col_dir = image.T, col_dir, row_dir
        spacing = spacing[::-1] if spacing else spacing
    if row_dir == "R":
        image = image[:, ::-1]
    if col_dir == "H":
        image = image[::-1, :]
    return np.ascontiguousarray(image), spacing


def _dicom_pixel_spacing(ds):
    """``(row, col)`` mm in the patient's plane from Pixel Spacing, else Imager Pixel Spacing divided by the
    film's magnification; ``None`` when neither records one.

    Imager Pixel Spacing is measured at the detector, where a chest lying between it and the tube is enlarged
    by about 1.1 (at 180 cm, more for an AP film at the bedside): the header's Estimated Radiographic
    Magnification Factor, else Distance Source to Detector / Distance Source to Patient, takes that back; a
    film that records neither keeps the detector's spacing (a chest about a tenth larger than it is). Pixel
    Spacing, where a DX/CR file has it, is already in the patient's plane (or calibrated), and is believed.
    A value of 0 (``0\\0``, which some systems write when they do not know the spacing, e.g. NEMA's
    WG04 sample RG1) records no spacing: the attribute is passed over, as if absent, without a warning
    (a PNG records none either). Negative or non-finite values are refused by the caller."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = ds.get(keyword)
        if not values or len(values) != 2:
            continue
        spacing = (float(values[0]), float(values[1]))
        if 0.0 in spacing:
            continue
        if keyword == "ImagerPixelSpacing":
            magnification = _dicom_magnification(ds)
            spacing = tuple(v / magnification for v in spacing)
        return spacing
    return None


MAGNIFICATION_RANGE = (1.0, 2.0)  # a film's geometric magnification: never below 1; 2 would be a chest halfway


def _dicom_magnification(ds) -> float:
    """The film's magnification at the patient (:func:`_dicom_pixel_spacing`): Estimated Radiographic
    Magnification Factor, else Distance Source to Detector / Distance Source to Patient; 1 when the header records
    neither, or a value outside :data:`MAGNIFICATION_RANGE` (a placeholder such as 0 says nothing)."""
    def number(keyword):
        try:
            value = float(ds.get(keyword))
        except (TypeError, ValueError):
            return None
        return value if np.isfinite(value) else None

    factor = number("EstimatedRadiographicMagnificationFactor")
    if factor is None:
        detector, patient = number("DistanceSourceToDetector"), number("DistanceSourceToPatient")
        factor = detector / patient if detector and patient and patient > 0 else None
    low, high = MAGNIFICATION_RANGE
    return factor if factor is not None and low <= factor <= high else 1.0


#: DICOM modalities whose images are slices of a volume, never a radiograph
VOLUME_MODALITIES = ("CT", "MR", "PT", "NM")


def dicom_not_a_film(path) -> tuple:
    """What a DICOM file is when its header alone says it is no film: ``("slices", modality)`` for a volume's slice
    (:data:`VOLUME_MODALITIES`), ``("no image", modality)`` for an object without an image (no Rows, and a SOP class
    that is no image's: a presentation state PR, a key object selection KO, a structured report SR, an encapsulated
    PDF DOC, as a study's PACS export holds beside its films); ``("", "")`` for a film, another kind, or a file that
    cannot be read (its reader says why). A few attributes of the header alone; a film cut short before its Rows (a
    copy stopped) keeps its image SOP class in its file meta, so it stays a film, whose reading says what is wrong."""
    try:
        header = _dcmread(Path(path), stop_before_pixels=True, specific_tags=["Modality", "Rows", "SOPClassUID"])
    except Exception:  # noqa: BLE001 - not judged here: reading it as a film names the problem
        return "", ""
    modality = str(header.get("Modality", "") or "").strip().upper()
    if modality in VOLUME_MODALITIES:
        return "slices", modality
    if "Rows" not in header and _imageless_class(header):
        return "no image", modality or "no Modality"
    return "", ""


def _imageless_class(ds) -> str:
    """The name of the data set's SOP class (else its file meta's) when it is a known class that is no image's (a
    report, a presentation state, a DICOMDIR), else "": an image class, or none or an unknown one (a file cut short)."""
    sop = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    named = getattr(sop, "name", "") if sop else ""
    return named if named and named != str(sop) and "Image" not in named else ""


def _read_dicom_radiograph(path: Path):
    import pydicom

    apply_modality_lut, apply_voi_lut = _dicom_luts()
    # An absurd rescale (slope 1e300) overflows to inf or NaN: refused below, without numpy's warnings.
    with _library_errors(path, "a DICOM radiograph"), np.errstate(over="ignore", invalid="ignore"):
        ds = _dcmread(path)
        modality = str(ds.get("Modality", "")).upper()
        if modality in VOLUME_MODALITIES:
            raise XctDiffError(f"expected a radiograph, got a {modality} image (read it as a CT series): {path}")
        if "Rows" not in ds:  # an object without an image: a DICOMDIR, a report, a presentation state
            raise XctDiffError(_without_image(path, ds))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise XctDiffError(f"expected a radiograph, got a 3D volume of {frames} frames: {path}")
        if "Rows" in ds and "Columns" in ds:
            check_radiograph_size(ds.Rows, ds.Columns, str(path))  # before decoding the pixels
        stored = _decoded_pixels(ds, path)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        if photometric == "PALETTE COLOR":  # the pixels are indices into a colour table, not grey levels
            image = to_grey(_dicom_color_lut()(stored, ds))
        elif stored.ndim == 3:  # colour (pydicom converts YCbCr to RGB)
            image = to_grey(stored)
        else:
            image = apply_voi_lut(apply_modality_lut(stored, ds), ds)
            # MONOCHROME1 is shown inverted (the DX rule pairs it with Presentation LUT Shape INVERSE: one
            # inversion, not two); a MONOCHROME2 image with Presentation LUT Shape INVERSE is too (a viewer
            # shows it so; read as stored, it would be a negative).
            shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
            if photometric == "MONOCHROME1" or shape == "INVERSE":
                # Invert about the range the LUTs can produce, so that a MONOCHROME1 film and its
                # MONOCHROME2 twin come out with the same values (bone bright).
                bits = int(ds.BitsStored)
                if int(ds.get("PixelRepresentation", 0)) == 1:
                    ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=stored.dtype)
                else:
                    ends = np.array([0, 2**bits - 1], dtype=stored.dtype)
                ends = apply_voi_lut(apply_modality_lut(ends, ds), ds).astype(np.float64)
                image = ends.min() + ends.max() - image.astype(np.float64)
        spacing = _dicom_pixel_spacing(ds)
        orientation = ds.get("PatientOrientation")
        age = dicom_age_years(ds.get("PatientAge"))
        header = {key: str(ds.get(key)).strip().upper() for key in HEADER_FACTS if str(ds.get(key) or "").strip()}
        hidden = _dicom_shutter_mask(ds, np.shape(image)[:2])
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, refused by check_radiograph_image
        image = np.asarray(image, dtype=np.float32)
    if hidden is not None:
        image = np.where(hidden, image[~hidden].min(), image)  # black, as a viewer shows it
    image, spacing = _dicom_display_orientation(image, orientation, spacing)
    if spacing is not None and not all(np.isfinite(s) and s > 0 for s in spacing):
        raise XctDiffError(f"pixel spacing must be positive, got {spacing} in {path}")
    return image, spacing, False, age, header


def _without_image(path: Path, ds) -> str:
    """What a DICOM file given as a film is when it holds no image: the index of an export (and how to reach the films
    it lists), else its Modality and SOP class (a report, a presentation state), in the words of the error line."""
    sop = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    if str(sop or "") == "1.2.840.10008.1.3.10" or "DirectoryRecordSequence" in ds:
        return (f"{path} is a DICOMDIR, the index of a DICOM export, not a radiograph: give the folder it tops, "
                f"{path.parent}, with --recursive")
    named = _imageless_class(ds)
    if not named:  # an image's class, or none: the header stops before the image's attributes
        return f"cannot read {path} as a DICOM radiograph: its header ends before the image (no Rows): a copy cut short?"
    what = ", ".join(x for x in (str(ds.get("Modality", "") or "").strip(), named) if x)
    return f"expected a radiograph, got a DICOM object without an image ({what}): {path}"


def _decoded_pixels(ds, path: Path) -> np.ndarray:
    """``ds.pixel_array``; where no decoder for its transfer syntax is installed, one line naming the syntax and what
    each of pydicom's plugins needs. pydicom says so over several lines, and the last, all a one-line error kept, could
    name a package that is there: Pillow without its OpenJPEG codec reads "requires numpy and pillow>=10.0"."""
    try:
        return ds.pixel_array
    except RuntimeError as exc:
        if "missing dependencies" not in str(exc):
            raise
        needs = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        needs = [f"{need} (built with this codec)" if need.startswith("pillow ") else need for need in needs]
        syntax = getattr(getattr(ds, "file_meta", {}).get("TransferSyntaxUID"), "name", "compressed")
        raise XctDiffError(f"cannot read {path} as a DICOM radiograph: no decoder for its {syntax} pixel data is "
                           f"installed; one of: {'; '.join(needs)}") from exc


def _dicom_shutter_mask(ds, shape) -> Optional[np.ndarray]:
    """The pixels a Display Shutter (rectangular, circular and/or polygonal; PS3.3 C.7.6.11) hides, or None.

    Why: a DX or CR film often keeps the collimated, unexposed border in its pixels (white, on a processed
    film) and says in its header that a viewer must hide it. Read as stored, that bright frame changes the
    film's grey-level normalisation and is not cropped as an empty border is; hidden (black), it is. A
    bitmap shutter hides the set bits of the overlay plane it names (Shutter Overlay Group). A shutter that
    would leave almost nothing visible is taken for a wrong header and ignored."""
    shapes = {str(v).strip().upper() for v in np.atleast_1d(ds.get("ShutterShape") or [])}
    if not shapes or len(shape) != 2:
        return None
    rows, cols = shape
    r, c = np.mgrid[1 : rows + 1, 1 : cols + 1]  # DICOM counts rows and columns from 1
    visible = np.ones(shape, dtype=bool)
    try:
        if "RECTANGULAR" in shapes:
            left, right = int(ds.ShutterLeftVerticalEdge), int(ds.ShutterRightVerticalEdge)
            upper, lower = int(ds.ShutterUpperHorizontalEdge), int(ds.ShutterLowerHorizontalEdge)
            visible &= (c >= left) & (c <= right) & (r >= upper) & (r <= lower)
        if "CIRCULAR" in shapes:
            centre_row, centre_col = (float(v) for v in ds.CenterOfCircularShutter)
            visible &= (r - centre_row) ** 2 + (c - centre_col) ** 2 <= float(ds.RadiusOfCircularShutter) ** 2
        if "POLYGONAL" in shapes:
            from skimage.draw import polygon2mask

            vertices = np.asarray([float(v) for v in ds.VerticesOfThePolygonalShutter]).reshape(-1, 2) - 1.0
            visible &= polygon2mask(shape, vertices)
        if "BITMAP" in shapes:
            visible &= ~_overlay_mask(ds, int(ds.ShutterOverlayGroup), shape)
    except (AttributeError, TypeError, ValueError, KeyError):  # an incomplete shutter: shown as stored
        return None
    if visible.sum() < MIN_RADIOGRAPH_SIZE**2:
        return None
    return ~visible if not visible.all() else None


def _overlay_mask(ds, group: int, shape) -> np.ndarray:
    """The set bits of the overlay plane in ``group`` (0x6000-0x601E) on the image's grid: placed at its Overlay
    Origin (row, column, from 1; it may start outside the image), cut to the image."""
    if not (0x6000 <= group <= 0x601E and group % 2 == 0):
        raise ValueError(f"not an overlay group: {group:#06x}")
    bits = np.asarray(ds.overlay_array(group), dtype=bool)
    if bits.ndim != 2:
        raise ValueError("a multi-frame overlay")
    top, left = (int(v) - 1 for v in ds[group, 0x0050].value)
    mask = np.zeros(shape, dtype=bool)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + bits.shape[0], shape[0]), min(left + bits.shape[1], shape[1])
    if r1 > r0 and c1 > c0:
        mask[r0:r1, c0:c1] = bits[r0 - top : r1 - top, c0 - left : c1 - left]
    return mask


def dicom_age_years(value) -> Optional[float]:
    """DICOM Patient's Age (``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``) in years; ``None`` when absent or malformed."""
    text = str(value or "").strip().upper()
    units = {"D": 365.25, "W": 365.25 / 7, "M": 12.0, "Y": 1.0}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        return None
    return int(text[:-1]) / units[text[-1]]
