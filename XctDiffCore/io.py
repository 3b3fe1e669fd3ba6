"""Read and write CT volumes and radiographs, turning every unreadable input into one readable sentence.

CT volumes come from a DICOM series folder, NIfTI, NRRD, MetaImage or the shared ``.npz`` format and
become a :class:`~XctDiffCore.volume.Volume` (LPS, as SimpleITK reads them). Radiographs come from
PNG/JPEG/TIFF, DICOM (CR/DX/DR) or a 2D (or single-slice 3D) NRRD/NIfTI/MetaImage and become a
:class:`Radiograph`: a float32 ``[row, col]`` image in display orientation (head up, patient's right on
the image's left; see ``XctDiffCore.layout``). The real work is done by SimpleITK, pydicom, pynrrd and
Pillow, imported lazily so that the training machines (torch, numpy, scikit-image only) can import this
module. Every file written goes through :func:`~XctDiffCore.atomic.atomic_path`.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .atomic import atomic_path, check_output_path, failed_write_reason, full_suffix
from .errors import XctDiffError
from .volume import Volume

# A DRR written by ``xctdiff drr`` carries this key (PNG text chunk, NRRD key/value) with value "1",
# so that readers can tell a rendered radiograph from a real film.
DRR_TAG_KEY = "xctdiff_drr"
# Smaller images carry no usable anatomy and break the radiograph preprocessing.
MIN_RADIOGRAPH_SIZE = 32
# The preprocessing pads a film to a square of its long side: 10000 pixels (a 43 cm film scanned at
# 43 um) make a 400 MB float32 square, a strip of 32 x 100000 pixels would ask for 40 GB. Checked on
# the file's header, before the pixels are decoded. (How thin a film may be: preprocess.MAX_RADIOGRAPH_ASPECT.)
MAX_RADIOGRAPH_SIDE = 10000
# Slices of a DICOM series closer than this (mm, median over the series) lie at one position.
MIN_SLICE_GAP_MM = 1e-3
# The most files a detached NRRD/MetaImage header may name (a printf pattern can name millions).
MAX_DETACHED_FILES = 100000

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SITK_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom")
RADIOGRAPH_SUFFIXES = PIL_SUFFIXES + DICOM_SUFFIXES
FILM_FILE_SUFFIXES = RADIOGRAPH_SUFFIXES + SITK_VOLUME_SUFFIXES  # every file type read_radiograph takes by name
VOLUME_WRITE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
NOTE_KEY = "xctdiff_"  # the keys of the notes a CT file written by XctDiff carries (NRRD, MetaImage)
SYNTHETIC = "synthetic CT reconstructed by XctDiff from one radiograph: research use, not diagnosis"
NIFTI_NOTE_LIMIT = 79  # a NIfTI-1 header's descrip field


def film_stem(path) -> str:
    """A film file's name without its file-type suffix (``chest.nii.gz`` -> ``chest``); a name whose last
    dot-part is not a known type (``1.2.840.1.5``, a DICOM file named by its UID) is kept whole."""
    from .atomic import full_suffix

    name, suffix = Path(path).name, full_suffix(Path(path))
    return name[: -len(suffix)] if suffix and suffix.lower() in FILM_FILE_SUFFIXES else name


def drr_tag_metadata() -> dict:
    """The metadata a DRR writer passes to :func:`write_image_png` / :func:`write_radiograph_nrrd`."""
    return {DRR_TAG_KEY: "1"}


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


# --------------------------------------------------------------------------------------------------
# shared checks


def _suffix(path: Path) -> str:
    return full_suffix(path).lower()


def _one_line(exc: BaseException) -> str:
    """The last informative line of a library message (SimpleITK's run over several lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    itk = [line for line in lines if line.startswith("ITK ERROR: ")]  # a matrix may follow it, line by line
    if itk:
        text = re.sub(r"^ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", itk[-1])
        text = text.split(". Refusing", 1)[0]
    else:
        text = lines[-1].removeprefix("sitk::ERROR: ") if lines else type(exc).__name__
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "(its pixel data)", text)  # Pillow names its buffer
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _library_errors(path: Path, what: str):
    """Turn whatever a third-party reader raises on a broken file into one XctDiffError naming the path.

    Only wraps calls into SimpleITK / pydicom / Pillow / pynrrd / numpy's npz loader: their failure
    types on corrupt files are many (RuntimeError, InvalidDicomError, OSError, EOFError, ValueError...).
    """
    try:
        yield
    except XctDiffError:
        raise
    except Exception as exc:  # noqa: BLE001 - library boundary, see docstring
        raise XctDiffError(f"cannot read {path} as {what}: {_one_line(exc)}") from exc


# Kernel views, not data: reading some of their files blocks for ever (/proc/kmsg), so a search never enters them
PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


def walk_below(folder: Path) -> Iterator[Path]:
    """Everything below ``folder`` (as ``rglob("*")``: links to folders named, not entered), never inside
    PSEUDO_FILESYSTEMS (``xctdiff prepare /``, ``reconstruct / --recursive``). A folder that vanishes or
    cannot be listed while the walk runs (a process's /proc entry, another job's temporary folder) is
    passed over, where rglob raised."""
    if _in_pseudo_filesystem(folder):
        return
    for root, folders, files in os.walk(folder):
        here = Path(root)
        folders[:] = [name for name in folders if not _in_pseudo_filesystem(here / name)]  # pruned: never listed
        for name in folders + files:
            yield here / name


def _in_pseudo_filesystem(path: Path) -> bool:
    text = str(path.absolute())
    return any(text == root or text.startswith(root + "/") for root in PSEUDO_FILESYSTEMS)


def special_files(folder: Path) -> list:
    """The entries of ``folder`` that are neither files nor folders (pipes, sockets, devices, as in /proc and /dev),
    which GDCM's folder scan opens like files: a pipe or /proc/kmsg blocks it, others make it skip slices."""
    import stat

    found = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    mode = os.stat(entry.path).st_mode  # through links: a link to a pipe is a pipe to GDCM
                except OSError:
                    continue  # a dangling link: GDCM cannot open it either
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    found.append(Path(entry.path))
    except OSError:
        return []
    return found


def _dcmread(path: Path, **options):
    """pydicom's dcmread, and for a file without the DICOM file header (no preamble, no 'DICM': a bare data set, as
    some older or research exports write) the same read forced, when what it finds is an image's data set; else
    one sentence instead of pydicom's advice to "use force=True"."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), **options)
    except InvalidDicomError:
        pass
    try:
        ds = pydicom.dcmread(str(path), force=True, **options)
        if "Rows" in ds and "Columns" in ds:
            _name_transfer_syntax(ds)
            return ds
    except Exception:  # noqa: BLE001 - forced on a file that is no data set: said below
        pass
    raise XctDiffError(f"{path} is not a DICOM file (no DICOM file header, and no image data set without one)")


def _name_transfer_syntax(ds) -> None:
    """A data set read without its file header has no Transfer Syntax UID, which pydicom needs to decode the
    pixels: name the one it was read in (implicit or explicit VR, little or big endian)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", None) or (ds.is_implicit_VR, ds.is_little_endian)
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


@contextlib.contextmanager
def _itk_quiet():
    """Mute ITK's own warnings (printed straight to stderr) while it reads; what they report (no series,
    missing slices) is checked here and raised as an XctDiffError, so a CLI error stays one line."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _check_input(path, allow_folder: bool) -> Path:
    path = Path(path)
    if not path.exists():
        raise XctDiffError(f"file not found: {path}")
    if path.is_dir():
        if not allow_folder:
            raise XctDiffError(f"expected a radiograph file, got a folder: {path}")
        return path
    if not path.is_file():
        raise XctDiffError(f"not a regular file (a pipe or a device?): {path}")
    if path.stat().st_size == 0:
        raise XctDiffError(f"file is empty: {path}")
    return path


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: by suffix, or by the 'DICM' magic after the 128-byte preamble (PACS and DICOMDIR
    exports name their files without a suffix, or by their UID). A file that cannot be opened (no permission: a
    copy still being made) is an XctDiffError naming it, not an OSError's traceback."""
    if _suffix(path) in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise XctDiffError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return head[128:132] == b"DICM"


def _detached_names(path: Path, value: str) -> list:
    """The file names a detached header's data-file field gives: one name, or a printf pattern
    ``<format> <min> <max> <step> [<subdim>]`` (NRRD and MetaImage alike)."""
    parts = value.split()
    if len(parts) in (4, 5) and "%" in parts[0]:
        try:
            low, high, step = (int(v) for v in parts[1:4])
            indices = range(low, high + (1 if step > 0 else -1), step)
            if len(indices) > MAX_DETACHED_FILES:
                raise ValueError(f"{len(indices)} files")
            return [parts[0] % i for i in indices]
        except (ValueError, TypeError) as exc:
            raise XctDiffError(f"{path} names its data files by an unusable pattern {value!r} ({exc})") from None
    return [value.strip()]


def _refuse_outside_data_files(path: Path, names) -> None:
    """A detached header may only name data files in its own folder (or below): a header that points
    at ``/etc/passwd`` or ``../../secret`` (or a link out of the folder) would have it read as pixels."""
    folder = path.parent.resolve()
    for name in names:
        target = (path.parent / name).resolve()
        if not target.is_relative_to(folder):
            raise XctDiffError(
                f"{path} takes its voxels from {name!r}, outside the header's folder: refused "
                "(keep the data file beside the header)"
            )


def _check_metaimage_data_file(path: Path) -> None:
    """The ``ElementDataFile`` of a MetaImage header (.mhd, or an .mha that is not ``LOCAL``)."""
    with _library_errors(path, "a MetaImage file"), open(path, "rb") as f:
        head = f.read(1 << 20)
    lines = head.decode("latin-1").splitlines()
    for i, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if sep and key.strip() == "ElementDataFile":
            value = value.strip()
            if value.upper() == "LOCAL":
                return
            if value.split()[:1] == ["LIST"]:
                names = [n.strip() for n in lines[i + 1 :] if n.strip()]
            else:
                names = _detached_names(path, value)
            _refuse_outside_data_files(path, names)
            return


def _check_nrrd_header(path: Path) -> None:
    """ITK refuses zero spacing with a cryptic message and silently flips negative spacing: say it plainly.
    A detached data file must lie in the header's folder."""
    import nrrd

    with _library_errors(path, "an NRRD file"):
        header = nrrd.read_header(str(path))
    data_file = header.get("data file", header.get("datafile"))
    if data_file:
        _refuse_outside_data_files(path, _detached_names(path, str(data_file)))
    spacing = None
    if "space directions" in header:
        directions = np.asarray(header["space directions"], dtype=float)
        spacing = [np.linalg.norm(d) for d in directions if np.all(np.isfinite(d))]
    elif "spacings" in header:
        spacing = [float(s) for s in header["spacings"]]
    if spacing is not None and not all(np.isfinite(s) and s > 0 for s in spacing):
        raise XctDiffError(f"voxel spacing must be positive, got {_fmt(spacing)} in {path}")


def _check_sitk_header(path: Path, suffix: str) -> None:
    """What ITK's readers would get wrong or read from elsewhere: checked on the header first."""
    if suffix in (".nrrd", ".nhdr"):
        _check_nrrd_header(path)
    elif suffix in (".mhd", ".mha"):
        _check_metaimage_data_file(path)
    elif suffix in (".nii", ".nii.gz") and _nifti_has_nonfinite(path):
        raise XctDiffError(f"{path} contains NaN or infinite voxel values")


def _nifti_forms(path: Path):
    """``(qform_code, sform_code, sform)`` from a NIfTI-1 or NIfTI-2 header, ``sform`` the 3 x 4 voxel-to-RAS
    rows (srow_x, srow_y, srow_z); ``None`` when the file is not NIfTI or cannot be read (ITK then says why)."""
    import gzip
    import struct

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
        for order in "<>":
            size = struct.unpack(order + "i", header[:4])[0] if len(header) >= 4 else 0
            if size == 348 and len(header) >= 348:  # NIfTI-1: shorts and floats
                qcode, scode = struct.unpack(order + "2h", header[252:256])
                rows = struct.unpack(order + "12f", header[280:328])
                return qcode, scode, np.array(rows, dtype=float).reshape(3, 4)
            if size == 540 and len(header) >= 540:  # NIfTI-2: ints and doubles
                qcode, scode = struct.unpack(order + "2i", header[344:352])
                rows = struct.unpack(order + "12d", header[400:496])
                return qcode, scode, np.array(rows, dtype=float).reshape(3, 4)
        return None
    except (OSError, EOFError, struct.error):
        return None


def _nifti_without_orientation(path: Path) -> bool:
    """A NIfTI file whose qform_code and sform_code are both 0: "no particular spatial orientation is
    attached" (the standard's method 1). ITK then reads it as LPS, nibabel as LAS: left and right are a guess."""
    forms = _nifti_forms(path)
    return forms is not None and forms[:2] == (0, 0)


def _nifti_sheared_sform(path: Path):
    """The sform of a NIfTI file when it is sheared (its columns not perpendicular), as ITK geometry
    ``(origin, spacing, direction)`` in LPS; else ``None``. ITK's reader turns such an sform into a nearby
    rotation (a warning on stderr, muted here): the anatomy would come out rotated instead of sheared."""
    forms = _nifti_forms(path)
    if forms is None or forms[1] <= 0 or not np.all(np.isfinite(forms[2])):
        return None
    to_lps = np.diag([-1.0, -1.0, 1.0])
    matrix, offset = to_lps @ forms[2][:, :3], to_lps @ forms[2][:, 3]
    spacing = np.linalg.norm(matrix, axis=0)
    if np.any(spacing <= 0):
        return None
    direction = matrix / spacing
    if np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        return None
    return offset, spacing, direction  # (nearly) parallel axes: refused by ITK or by _volume_from_sitk


#: NIfTI-1 floating-point data types: code -> numpy type.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_has_nonfinite(path: Path) -> bool:
    """NaN or Inf among a floating-point NIfTI's voxels. Checked on the raw bytes because ITK's NIfTI reader
    turns them into 0 (water) on the way in, so a check of what it returns would pass a broken volume."""
    import gzip
    import struct

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(348)
            if len(header) < 348:
                return False  # ITK says what is wrong with it
            order = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
            datatype = struct.unpack(order + "h", header[70:72])[0]
            if datatype not in _NIFTI_FLOATS:
                return False
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            f.read(max(offset - 348, 0))
            data = np.frombuffer(f.read(), dtype=np.dtype(order + _NIFTI_FLOATS[datatype]))
    except (OSError, EOFError, ValueError, struct.error):
        return False  # a broken file: the reader itself refuses it, in its words
    return not bool(np.all(np.isfinite(data)))


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
    NaN or Inf. Returns float32."""
    try:
        image = np.asarray(image)
    except (TypeError, ValueError, RuntimeError) as exc:  # a tensor numpy cannot take (bf16), ragged lists
        raise XctDiffError(f"radiograph {source} is not an array of numbers ({_one_line(exc)})") from None
    if image.ndim != 2:
        raise XctDiffError(f"expected a 2D radiograph, got an array of shape {image.shape} from {source}")
    if image.dtype.kind not in "biuf":  # strings, objects, complex numbers: no grey levels
        raise XctDiffError(f"radiograph {source} holds {image.dtype} values, not grey levels")
    check_radiograph_size(*image.shape, source)
    with np.errstate(over="ignore", invalid="ignore"):  # a value beyond float32 becomes inf: refused below
        image = image.astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        raise XctDiffError(f"radiograph {source} contains NaN or infinite pixel values")
    return image


def _check_ct_values(volume: Volume, path: Path) -> Volume:
    if min(volume.shape) < 2:
        raise XctDiffError(f"expected a CT volume, got a 2D image of shape {volume.shape} from {path}")
    if volume.array.dtype.kind == "f" and not np.all(np.isfinite(volume.array)):
        raise XctDiffError(f"CT {path} contains NaN or infinite voxel values")
    return volume


# --------------------------------------------------------------------------------------------------
# CT volumes


def read_ct(path) -> Volume:
    """Read a CT (DICOM series folder or file, .nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd, shared .npz) in LPS.

    Voxel values are returned as stored after the format's own rescale (HU for DICOM), in the file's
    orientation; :func:`XctDiffCore.preprocess.preprocess_ct` makes it canonical.
    """
    path = _check_input(path, allow_folder=True)
    suffix = _suffix(path)
    if path.is_dir():
        volume = _read_dicom_series(path, path, None)
    elif suffix == ".npz":
        volume = _read_npz(path)
    elif suffix in SITK_VOLUME_SUFFIXES or suffix in PIL_SUFFIXES:
        # Image suffixes go through SimpleITK too so that a PNG given as a CT says "2D image".
        _check_sitk_header(path, suffix)
        if suffix in (".nii", ".nii.gz") and _nifti_without_orientation(path):
            warnings.warn(f"{path} records no orientation (NIfTI qform_code and sform_code 0, as ANALYZE files): read "
                          "as ITK does, its first axis towards the patient's left; check left and right", ReadWarning,
                          stacklevel=2)
        volume = _read_sitk_volume(path)
    elif is_dicom_file(path) and _is_dicomdir(path):
        volume = _read_dicomdir(path)
    elif is_dicom_file(path):
        volume = _read_dicom_series(path.parent, path, _dicom_series_uid(path))
    else:
        raise XctDiffError(
            f"unsupported CT file type '{suffix or path.name}': expected a DICOM folder, "
            f".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or .npz ({path})"
        )
    return _check_ct_values(volume, path)


def _volume_from_sitk(image, path: Path) -> Volume:
    if image.GetDimension() == 2:
        raise XctDiffError(f"expected a CT volume, got a 2D image of size {image.GetSize()} from {path}")
    if image.GetDimension() == 3:
        direction = np.array(image.GetDirection()).reshape(3, 3)
        if np.all(np.isfinite(direction)) and not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
            if abs(np.linalg.det(direction)) < 1e-3:
                raise XctDiffError(f"the axes of {path} are (nearly) parallel: its voxels do not span a volume")
            volume, shear = _orthogonal_resample(image)
            warnings.warn(f"the axes of {path} are not perpendicular (a sheared volume, such as a gantry-tilted CT "
                          f"saved as scanned; {shear:.1f} degrees): resampled onto an orthogonal grid", ReadWarning,
                          stacklevel=4)
            return volume
    try:
        return Volume.from_sitk(image)
    except XctDiffError as exc:
        raise XctDiffError(f"{exc} ({path})") from exc


def _read_sitk_volume(path: Path) -> Volume:
    import SimpleITK as sitk

    with _library_errors(path, "a CT volume"), _itk_quiet():
        image = sitk.ReadImage(str(path))
    sheared = _nifti_sheared_sform(path) if _suffix(path) in (".nii", ".nii.gz") else None
    if sheared is not None and image.GetDimension() == 3:
        origin, spacing, direction = sheared
        with _library_errors(path, "a CT volume"):  # axes exactly parallel: ITK's "determinant is 0", as for NRRD
            image.SetOrigin(tuple(float(v) for v in origin))
            image.SetSpacing(tuple(float(v) for v in spacing))
            image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return _volume_from_sitk(image, path)


def _is_dicomdir(path: Path) -> bool:
    """A DICOMDIR (Media Storage Directory): an index of a DICOM export, with no pixels of its own."""
    if path.name.upper() == "DICOMDIR":
        return True
    import pydicom

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - not readable as DICOM: the series reader says what is wrong
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10"


def _read_dicomdir(path: Path) -> Volume:
    """A DICOMDIR indexes a DICOM export (a CD, a PACS download): the CT series in the folders below it, when
    there is one folder of them; else an error that names some."""
    from .ct_search import ct_series_below

    below = list(dict.fromkeys(ct_series_below(path.parent)))
    if len(below) == 1:
        return _read_dicom_series(below[0], below[0], None)
    if not below:
        raise XctDiffError(f"{path} is a DICOMDIR (the index of a DICOM export) and no DICOM CT series lies below it")
    raise XctDiffError(f"{path} is a DICOMDIR (the index of a DICOM export) with CT series in several folders, e.g. "
                       f"{below[0]} and {below[1]}: give one of them")


def _sitk_header(path: Path, what: str):
    """SimpleITK's reader of ``path`` with its header read and no voxels (size, components, metadata); a file it
    cannot read is one XctDiffError naming ``what`` it was read as."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with _library_errors(path, what), _itk_quiet():
        reader.ReadImageInformation()
    return reader


def _dicom_series_uid(path: Path) -> str:
    reader = _sitk_header(path, "a DICOM file")
    return reader.GetMetaData("0020|000e").strip() if reader.HasMetaDataKey("0020|000e") else ""


def _read_dicom_series(folder: Path, path: Path, series_uid: Optional[str]) -> Volume:
    """One DICOM series from ``folder``: the one ``series_uid`` names, else the one with the most slices.

    A series with a missing or unreadable slice is refused: ITK would read it with a silently wrong z spacing.
    Localizer (scout) images in the series are left out; a gantry-tilted (sheared) stack is resampled onto
    an orthogonal grid; padding (Pixel Padding Value) becomes air. An enhanced (multi-frame) CT file is read
    whole (:func:`_read_dicom_multiframe`).
    """
    import SimpleITK as sitk

    special = special_files(folder)
    if special:
        raise XctDiffError(f"{folder} holds {special[0].name}, which is not a file (a pipe, socket or device): DICOM "
                           "readers would block on it or skip slices; read the series from a folder of files")
    reader = sitk.ImageSeriesReader()
    with _library_errors(path, "a DICOM series"), _itk_quiet():
        uids = reader.GetGDCMSeriesIDs(str(folder))
        if series_uid:
            files = reader.GetGDCMSeriesFileNames(str(folder), series_uid)
        else:
            series = [reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in uids]
            chosen = max(range(len(series)), key=lambda n: len(series[n]), default=None)
            files = series[chosen] if series else ()
            others = sorted((len(s) for n, s in enumerate(series) if n != chosen and len(s) >= 2), reverse=True)
            if others:
                warnings.warn(
                    f"{folder} holds {len(others) + 1} DICOM series: read the one with the most images, {uids[chosen]} "
                    f"({len(files)}; the others have {', '.join(str(n) for n in others)}); to read another, give one "
                    "of its files", DicomReadWarning, stacklevel=3)
    if not files and series_uid is None and path == folder and (folder / "DICOMDIR").is_file():
        return _read_dicomdir(folder / "DICOMDIR")  # the top of a DICOM export: the series it indexes
    if not files:
        from .ct_search import ct_series_below

        below = ct_series_below(folder) if series_uid is None else []
        hint = (f"; below it: {len(below)}{'+' if len(below) >= 3 else ''} DICOM CT series, e.g. {below[0]} (give one; "
                "`xctdiff prepare` takes the whole folder)") if below else ""
        raise XctDiffError(f"no DICOM series found in {folder}{hint}")
    files = _without_localizers(list(files), folder)
    if len(files) == 1 and _dicom_frames(Path(files[0])) > 1:
        return _read_dicom_multiframe(Path(files[0]))
    if len(files) < 2:
        raise XctDiffError(f"expected a CT volume, got a DICOM series with a single 2D image ({path})")
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    with _library_errors(path, "a DICOM series"), _itk_quiet():
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            if any(words in str(exc) for words in ("does not fully contain the requested region", "Size mismatch")):
                # ITK's words for slices of two sizes
                raise XctDiffError(f"the slices of the DICOM series in {folder} differ in size: not one CT volume") from None
            raise
        positions = np.array(
            [[float(v) for v in reader.GetMetaData(n, "0020|0032").split("\\")] for n in range(len(files))]
        )
        pixel_spacing = reader.GetMetaData(0, "0028|0030") if reader.HasMetaDataKey(0, "0028|0030") else ""
        slice_tags = [{tag: reader.GetMetaData(n, tag).strip() for tag in _SLICE_TAGS if reader.HasMetaDataKey(n, tag)}
                      for n in range(len(files))]
    try:
        in_plane = [float(v) for v in pixel_spacing.split("\\")]
    except ValueError:
        in_plane = []
    if len(in_plane) != 2 or not all(np.isfinite(v) and v > 0 for v in in_plane):
        # ITK would read the slices as 1 mm pixels: a CT at the wrong scale, without a word.
        raise XctDiffError(f"the DICOM series in {folder} has no usable Pixel Spacing (0028,0030)"
                           f"{f' ({pixel_spacing.strip()})' if pixel_spacing.strip() else ''}: its scale is unknown")
    _check_one_grid(slice_tags, folder)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    normal = direction[:, 2]
    gaps = np.diff(positions @ normal)
    if not np.all(np.isfinite(gaps)) or abs(np.median(gaps)) < MIN_SLICE_GAP_MM:
        # ITK would read the stack with a made-up z spacing of 1 mm.
        raise XctDiffError(
            f"the {len(files)} slices of the DICOM series in {folder} share one position "
            "(no distance between slices): not a CT volume"
        )
    if np.any(np.abs(gaps - np.median(gaps)) > 0.1 * abs(np.median(gaps))):
        raise XctDiffError(
            f"the DICOM series in {folder} has missing or unevenly spaced slices "
            f"(gaps from {_fmt(np.abs(gaps).min())} to {_fmt(np.abs(gaps).max())} mm)"
        )
    if np.mean(gaps) < 0:  # stacked against the normal (GDCM's sorter does not, but the geometry must hold)
        direction[:, 2], gaps = -normal, -gaps
    array = _padding_as_air(sitk.GetArrayFromImage(image), slice_tags)
    # The slice spacing along the normal (ITK's own is the distance between positions, too long for a tilted stack).
    volume = Volume(array, (*image.GetSpacing()[:2], float(np.mean(gaps))), positions[0], direction)
    return _unsheared(volume, positions, folder)


# per-slice DICOM tags the series reader keeps: padding, rescale
_SLICE_TAGS = ("0028|0120", "0028|0121", "0028|1052", "0028|1053", "0028|0103", "0028|0030", "0020|0037")
# HU range of real tissue and air in a CT: padding outside it is made air
_AIR_HU, _TOP_HU = -1024, 3071


class ReadWarning(UserWarning):
    """An input was read, but not quite as given, or on an assumption the file leaves open."""


class DicomReadWarning(ReadWarning):
    """A DICOM input was read, but not quite as given (one of several series, a resampled tilted stack)."""


def _without_localizers(files: list, folder: Path) -> list:
    """The files of a series without its localizer (scout) images: a scout lies across the stack and would be
    read as a slice at the wrong place (the series then looks unevenly spaced, or of two sizes)."""
    import pydicom

    kept = []
    for name in files:
        try:
            header = pydicom.dcmread(name, stop_before_pixels=True, specific_tags=["ImageType"])
            image_type = [str(v).strip().upper() for v in (header.get("ImageType") or [])]
        except Exception:  # noqa: BLE001 - an unreadable header: ITK says what is wrong with the file
            image_type = []
        if "LOCALIZER" not in image_type:
            kept.append(name)
    if len(kept) < len(files):
        warnings.warn(f"left out {len(files) - len(kept)} localizer image(s) of the DICOM series in {folder}",
                      DicomReadWarning, stacklevel=4)
    return kept


def _check_one_grid(slice_tags: list, folder: Path) -> None:
    """Every slice of the series has the first one's pixel spacing and orientation: ITK reads the whole stack
    with the first slice's, so a series that mixes two (a reformat or a second field of view under one series
    UID) would be read at the wrong scale or place for part of it, without a word."""
    def numbers(tags, key):
        try:
            return np.array([float(v) for v in tags.get(key, "").split("\\")])
        except ValueError:
            return np.array([])

    for key, what, tolerance in (("0028|0030", "pixel spacing", 1e-3), ("0020|0037", "orientation", 1e-3)):
        first = numbers(slice_tags[0], key)
        for tags in slice_tags[1:]:
            other = numbers(tags, key)
            if other.shape != first.shape or not np.allclose(other, first, rtol=tolerance, atol=tolerance):
                raise XctDiffError(f"the slices of the DICOM series in {folder} differ in {what} ({_fmt(first)} and "
                                   f"{_fmt(other)}): not one CT volume (export each part as its own series)")


def _padding_as_air(array: np.ndarray, slice_tags: list) -> np.ndarray:
    """Voxels that a slice's Pixel Padding Value (and Pixel Padding Range Limit) mark as padding (outside the
    scanner's circular field of view, typically) become air (-1024 HU), where the padding's HU lies outside
    tissue (-1024 to 3071): unsigned data padded with 63536 (-2000 as int16) and an intercept of -1024
    reads as 62512 HU, a bright ring around the body. Padding within the tissue range is left as it is:
    it cannot be told from tissue, and a header that names such a value is more likely wrong than the pixels."""
    for k, tags in enumerate(slice_tags):
        try:
            padding = [float(tags[tag]) for tag in ("0028|0120", "0028|0121") if tags.get(tag, "") != ""]
            if tags.get("0028|0103") == "1":  # signed pixels: a value written unsigned (US) means its int16
                padding = [v - 65536 if v >= 32768 else v for v in padding]
            slope = float(tags.get("0028|1053") or 1.0)
            intercept = float(tags.get("0028|1052") or 0.0)
        except ValueError:
            continue
        if not padding:
            continue
        low, high = sorted(value * slope + intercept for value in (min(padding), max(padding)))
        if _AIR_HU <= high and low <= _TOP_HU:  # (partly) within tissue
            continue
        if not array.flags.writeable:
            array = array.copy()
        padded = (array[k] >= low - 0.5 * abs(slope)) & (array[k] <= high + 0.5 * abs(slope))
        array[k][padded] = max(_AIR_HU, np.iinfo(array.dtype).min) if array.dtype.kind in "iu" else _AIR_HU
    return array


def _unsheared(volume: Volume, positions: np.ndarray, folder) -> Volume:
    """A series whose slices shift within their plane from one to the next (a gantry tilt: the positions do
    not run along the slices' normal) resampled onto an orthogonal grid, where each voxel lies where the
    scanner put it. ITK reads such a stack as if it were not sheared: the anatomy would be displaced by up
    to the tilt's tangent times the stack's length (a 15 degree tilt over 300 mm: 80 mm), without a word."""
    direction, spacing = volume.direction, np.asarray(volume.spacing)
    steps = np.diff(positions, axis=0)
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    in_plane = step - (step @ direction[:, 2]) * direction[:, 2]
    pixel = min(spacing[:2])
    if np.linalg.norm(in_plane) * (len(positions) - 1) < 0.5 * pixel:  # under half a pixel over the whole stack
        return volume
    if np.abs(steps - step).max() > 0.5 * pixel:
        raise XctDiffError(f"the slices of the DICOM series in {folder} do not line up (their in-plane shift from "
                           "one slice to the next varies): not one CT volume")
    stored = volume.to_sitk()  # the stack as it was scanned: its third axis runs along the step, not the normal
    sheared = direction.copy()
    sheared[:, 2] = step / np.linalg.norm(step)
    stored.SetDirection(tuple(sheared.ravel()))
    stored.SetSpacing((*spacing[:2], float(np.linalg.norm(step))))
    stored.SetOrigin(tuple(float(v) for v in positions[0]))
    resampled, tilt = _orthogonal_resample(stored)
    warnings.warn(f"the DICOM series in {folder} was scanned with a gantry tilt of {tilt:.1f} degrees: resampled "
                  "onto an orthogonal grid", DicomReadWarning, stacklevel=4)
    return resampled


def _orthogonal_resample(image):
    """A sheared image (its third axis not perpendicular to its slices) resampled, linearly, onto the
    orthogonal grid of its slices' plane, every voxel covered; outside it air. Returns the Volume and the
    shear in degrees (the angle between the third axis and the slices' normal). ITK maps points through
    any invertible direction matrix, so the sheared image samples itself at the new grid's points."""
    import SimpleITK as sitk

    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    first = direction[:, 0] / np.linalg.norm(direction[:, 0])
    second = direction[:, 1] - (direction[:, 1] @ first) * first
    second /= np.linalg.norm(second)
    normal = np.cross(first, second)
    normal *= np.sign(normal @ direction[:, 2]) or 1.0
    frame = np.stack([first, second, normal], axis=1)
    along = abs(direction[:, 2] @ normal)
    shear = float(np.degrees(np.arccos(min(1.0, along / np.linalg.norm(direction[:, 2])))))
    out_spacing = np.array([spacing[0], spacing[1], spacing[2] * along])
    i, j, k = image.GetSize()
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint((a, b, c))
                        for a in (0, i - 1) for b in (0, j - 1) for c in (0, k - 1)])
    origin = np.array(image.GetOrigin())
    local = (corners - origin) @ frame  # along the first axis, the second, the normal
    low, high = local.min(axis=0), local.max(axis=0)
    size = [int(np.ceil((h - lo) / s - 1e-6)) + 1 for lo, h, s in zip(low, high, out_spacing)]  # covers every voxel
    out_origin = origin + frame @ low
    resampled = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), size, sitk.Transform(), sitk.sitkLinear,
                              tuple(out_origin), tuple(out_spacing), tuple(frame.ravel()), float(_AIR_HU))
    return Volume(sitk.GetArrayFromImage(resampled), out_spacing, out_origin, frame), shear


def _dicom_frames(path: Path) -> int:
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["NumberOfFrames"])
        return int(header.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - unreadable: read as one image, whose reader says what is wrong
        return 1


def _read_dicom_multiframe(path: Path) -> Volume:
    """An enhanced (multi-frame) CT in one file: GDCM reads its geometry and rescale from the functional
    groups; the frames' positions are checked here as a series' slices are (even spacing, no shear)."""
    import pydicom
    import SimpleITK as sitk

    with _library_errors(path, "a multi-frame DICOM CT"):
        header = pydicom.dcmread(path, stop_before_pixels=True)
    frames = header.get("PerFrameFunctionalGroupsSequence") or []
    try:
        positions = np.array([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in frames])
    except (AttributeError, IndexError, TypeError, ValueError):
        positions = np.zeros((0, 3))
    if len(positions) < 2 or len(positions) != int(header.get("NumberOfFrames", 0) or 0):
        raise XctDiffError(f"{path} is a multi-frame DICOM without a position for each frame: its slice spacing is "
                           "unknown (export the CT as one file per slice)")
    transforms = {(str(item.get("RescaleSlope", 1)), str(item.get("RescaleIntercept", 0)))
                  for f in frames for item in (f.get("PixelValueTransformationSequence") or [])}
    if len(transforms) > 1:
        raise XctDiffError(f"{path} is a multi-frame DICOM whose frames have different rescale slopes or intercepts: "
                           "not read (export the CT as one file per slice)")
    with _library_errors(path, "a multi-frame DICOM CT"), _itk_quiet():
        image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3 or image.GetSize()[2] != len(positions):
        raise XctDiffError(f"{path} is a multi-frame DICOM that does not read as one CT volume")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    order = np.argsort(positions @ direction[:, 2])
    if not np.array_equal(order, np.arange(len(order))):
        raise XctDiffError(f"the frames of {path} are not stored in order along their normal: not read "
                           "(export the CT as one file per slice)")
    gaps = np.diff(positions @ direction[:, 2])
    if abs(np.median(gaps)) < MIN_SLICE_GAP_MM or np.any(np.abs(gaps - np.median(gaps)) > 0.1 * abs(np.median(gaps))):
        raise XctDiffError(f"the frames of {path} are unevenly spaced or share one position "
                           f"(gaps from {_fmt(np.abs(gaps).min())} to {_fmt(np.abs(gaps).max())} mm)")
    volume = Volume(sitk.GetArrayFromImage(image), (*image.GetSpacing()[:2], float(np.mean(gaps))), positions[0],
                    direction)
    return _unsheared(volume, positions, path)


def _read_npz(path: Path) -> Volume:
    """The shared format: ct[z, y, x] (axes='zyx'), spacing/origin in (x, y, z), direction 3x3 (LPS)."""
    with _library_errors(path, "a CT .npz file"), np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    missing = [key for key in ("ct", "spacing", "origin") if key not in arrays]
    if missing:
        raise XctDiffError(f"{path} lacks the key(s) {', '.join(missing)} of the CT .npz format")
    axes = str(arrays.get("axes", "zyx"))
    if axes != "zyx":
        raise XctDiffError(f"{path} has axes '{axes}', expected 'zyx'")
    if arrays["ct"].dtype.kind not in "biuf":  # text or objects: no voxel values (inspect's min() raised on them)
        raise XctDiffError(f"{path} is not a CT .npz file: its ct array holds {arrays['ct'].dtype}, not numbers")
    try:
        return Volume(arrays["ct"], arrays["spacing"], arrays["origin"], arrays.get("direction", np.eye(3)))
    except XctDiffError as exc:
        raise XctDiffError(f"{exc} ({path})") from exc
    except (ValueError, TypeError) as exc:  # e.g. a spacing of strings
        raise XctDiffError(f"{path} is not a CT .npz file: its spacing, origin or direction are not numbers "
                           f"({_one_line(exc)})") from None


@contextlib.contextmanager
def _c_stderr_muted():
    """Silence what C libraries print straight to file descriptor 2 (NIfTI's writer: ``** ERROR: NWAD: wrote
    only ...`` on a full disk) while they write; the failed write is found and said in one line all the same
    (:func:`~XctDiffCore.atomic.verify_written`)."""
    import os
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (captured, closed): nothing to mute
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)  # a descriptor, not a file object: a Ctrl-C here warns of none
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def write_volume(volume: Volume, path, notes: Optional[dict] = None) -> Path:
    """Write a volume as .nrrd (gzip), .nii, .nii.gz or .mha (zlib), atomically.

    Voxels are stored as int16 when they are all integers within int16's range (a HU CT), else float32.
    ``notes`` (what made the volume: :func:`volume_notes` reads them back) go into the header as ``xctdiff_<key>``
    fields in NRRD and MetaImage, and as the ``descrip`` text (79 characters) in NIfTI.
    """
    import SimpleITK as sitk

    path = check_output_path(path)
    suffix = _suffix(path)
    if suffix not in VOLUME_WRITE_SUFFIXES:
        raise XctDiffError(f"cannot write a volume as '{suffix or path.name}': use .nrrd, .nii, .nii.gz or .mha")
    array = np.asarray(volume.array)
    if array.dtype.kind not in "biuf" or array.size == 0:
        raise XctDiffError(f"cannot write {path}: the volume holds no voxel values ({array.dtype}, shape {array.shape})")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array.astype(np.float32))):  # float64 beyond float32 too
        raise XctDiffError(f"cannot write {path}: the volume has NaN or infinite values (no reader would take them back)")
    if array.dtype.kind == "f":
        integral = bool(np.all(np.isfinite(array)) and np.all(array == np.round(array)))
    else:
        integral = array.dtype.kind in "biu"
    if integral and np.iinfo(np.int16).min <= array.min() and array.max() <= np.iinfo(np.int16).max:
        array = array.astype(np.int16)
    else:
        array = array.astype(np.float32)
    image = Volume(array, volume.spacing, volume.origin, volume.direction).to_sitk()
    if notes and suffix in (".nii", ".nii.gz"):
        image.SetMetaData("ITK_FileNotes", " ".join(str(notes.get("summary", SYNTHETIC)).split())[:NIFTI_NOTE_LIMIT])
    elif notes:
        for key, value in notes.items():
            image.SetMetaData(NOTE_KEY + key, " ".join(str(value).split()))  # one header line each
    with atomic_path(path) as tmp, _c_stderr_muted():
        try:
            sitk.WriteImage(image, str(tmp), useCompression=suffix in (".nrrd", ".mha"))
        except RuntimeError as exc:  # ITK's NRRD and MetaImage writers report a failed write (disk full) so,
            # naming the hidden temporary file and not why: the system's words where they can be known
            reason = failed_write_reason(exc, tmp) or _one_line(exc).removeprefix('Reason: ')
            raise XctDiffError(f"cannot write {path}: {reason}") from exc
    return path


def volume_notes(path) -> dict:
    """What an XctDiff output says about itself (the notes of :func:`write_volume`; a DICOM series' description and
    derivation), read from its header alone; {} for a scan or a file that says nothing. So that a synthetic CT is
    known for one wherever it goes: ``inspect`` says so, ``prepare`` and ``evaluate`` warn before they learn from it."""
    path = Path(path)
    try:
        if path.is_dir() or is_dicom_file(path):
            return _dicom_notes(path)
        if _suffix(path) not in SITK_VOLUME_SUFFIXES:
            return {}
        reader = _sitk_header(path, "a volume")
        fields = {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}
    except (OSError, RuntimeError, ValueError, XctDiffError):
        return {}
    notes = {key[len(NOTE_KEY):]: value for key, value in fields.items() if key.startswith(NOTE_KEY)}
    descrip = fields.get("ITK_FileNotes", fields.get("descrip", ""))
    if not notes and descrip.startswith("XctDiff"):
        notes = {"summary": descrip}
    return notes


def warn_if_synthetic(paths, consequence: str) -> None:
    """One warning naming the XctDiff reconstructions among the CT ``paths`` (:func:`volume_notes`), which a command
    that learns from or scores against scans should not take for scans; ``consequence`` says what they would do."""
    found = [Path(p) for p in paths if volume_notes(p)]
    if found:
        # a DICOM series is found as one of its files: its folder names it (not IM0001.dcm, IM0001.dcm)
        names = ", ".join(p.parent.name if p.is_file() and is_dicom_file(p) else p.name for p in found[:3])
        names += ", ..." if len(found) > 3 else ""
        one = len(found) == 1
        warnings.warn(f"{len(found)} of the CTs {'is' if one else 'are'} XctDiff's own reconstruction{'' if one else 's'}, "
                      f"not {'a scan' if one else 'scans'} ({names}): {consequence}", stacklevel=3)


def _dicom_notes(path: Path) -> dict:
    """The notes of a DICOM CT series XctDiff wrote (:mod:`XctDiffCore.dicom_series`): its first file's derivation."""
    first = path if path.is_file() else next((p for p in sorted(path.iterdir()) if p.is_file() and is_dicom_file(p)), None)
    if first is None:
        return {}
    header = _dcmread(first, stop_before_pixels=True)
    derivation = str(header.get("DerivationDescription", ""))
    if header.get("Manufacturer") != "XctDiffSlicer" and "XctDiff" not in derivation:
        return {}
    if not derivation:
        return {"summary": SYNTHETIC}
    # inspect: `synthetic:` the note, `made_by:` the derivation, as for a volume file's header notes
    return {"summary": f"{SYNTHETIC}; {derivation}", "note": SYNTHETIC, "settings": derivation}


# --------------------------------------------------------------------------------------------------
# radiographs


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


def write_image_png(image01: np.ndarray, path, metadata: Optional[dict] = None, bits: int = 16) -> Path:
    """Write a float image in [0, 1] (values outside are clipped) as an 8- or 16-bit grey PNG, atomically.

    ``metadata`` becomes PNG text chunks (e.g. :func:`drr_tag_metadata`).
    """
    from PIL import Image, PngImagePlugin

    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    image01 = np.asarray(image01, dtype=np.float64)
    if image01.ndim != 2:
        raise XctDiffError(f"expected a 2D image to write as PNG, got shape {image01.shape}")
    if not np.all(np.isfinite(image01)):
        raise XctDiffError(f"refusing to write {path}: the image contains NaN or infinite values")
    top = 2**bits - 1
    pixels = np.round(np.clip(image01, 0.0, 1.0) * top).astype(np.uint8 if bits == 8 else np.uint16)
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def write_radiograph_nrrd(image: np.ndarray, path, spacing: Optional[tuple] = None, metadata: Optional[dict] = None,
                          compress: bool = True) -> Path:
    """Write a float32 ``[row, col]`` radiograph as a 2D NRRD (gzip unless not ``compress``), atomically.

    ``spacing`` is ``(row, col)`` in mm; ``metadata`` becomes NRRD key/value pairs (``key:=value``).
    """
    import nrrd

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise XctDiffError(f"expected a 2D radiograph to write as NRRD, got shape {image.shape}")
    if _suffix(Path(path)) not in (".nrrd",):
        raise XctDiffError(f"cannot write {path} as NRRD: give it the suffix .nrrd")
    header = {"kinds": ["domain", "domain"], "encoding": "gzip" if compress else "raw"}
    if spacing is not None:
        row, col = (float(s) for s in spacing)
        if not (np.isfinite(row) and np.isfinite(col) and row > 0 and col > 0):
            raise XctDiffError(f"pixel spacing must be positive, got {spacing}")
        header["spacings"] = [col, row]  # NRRD lists the fastest axis (columns) first
    header.update({str(k): str(v) for k, v in (metadata or {}).items()})  # unknown fields: key:=value
    with atomic_path(path) as tmp:
        nrrd.write(str(tmp), image, header, index_order="C")
    return Path(path)


# --------------------------------------------------------------------------------------------------
# inspection


def guess_kind(path) -> str:
    """'ct' or 'radiograph', from the folder/suffix and, for volume formats, the header's size."""
    path = _check_input(path, allow_folder=True)
    suffix = _suffix(path)
    if path.is_dir() or suffix == ".npz":
        return "ct"
    if suffix in PIL_SUFFIXES:
        return "radiograph"
    if suffix in (".nrrd", ".nhdr"):
        import nrrd

        with _library_errors(path, "an NRRD file"):
            sizes = list(nrrd.read_header(str(path))["sizes"])
        return "radiograph" if len(sizes) == 2 or 1 in sizes else "ct"
    if suffix in SITK_VOLUME_SUFFIXES:
        size = _sitk_header(path, "an image").GetSize()
        return "radiograph" if len(size) == 2 or 1 in size else "ct"
    if is_dicom_file(path):
        import pydicom

        with _library_errors(path, "a DICOM file"):
            ds = _dcmread(path, stop_before_pixels=True)
        return "ct" if str(ds.get("Modality", "")).upper() in ("CT", "MR", "PT", "NM") else "radiograph"
    raise XctDiffError(f"cannot tell what kind of file {path} is: give --as ct or --as radiograph")


def _fmt(values, digits: int = 4) -> str:
    return " ".join(f"{float(v):.{digits}g}" for v in np.ravel(values))


def inspect_path(path, kind: str = "auto") -> dict:
    """Read ``path`` as the engine would (``kind``: 'ct', 'radiograph' or 'auto') and list its facts."""
    if kind not in ("auto", "ct", "radiograph"):
        raise ValueError(f"kind must be 'auto', 'ct' or 'radiograph', got {kind!r}")
    if kind == "auto":
        kind = guess_kind(path)
    facts = {"path": str(path), "kind": kind}
    if kind == "ct":
        import SimpleITK as sitk

        volume = read_ct(path)
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(tuple(volume.direction.ravel()))
        facts.update(
            {
                "shape": " x ".join(str(n) for n in volume.shape) + " (k, j, i)",
                "dtype": str(volume.array.dtype),
                "spacing": _fmt(volume.spacing) + " mm (x, y, z)",
                "origin": _fmt(volume.origin, 6) + " mm (LPS)",
                "direction": " / ".join(_fmt(row) for row in volume.direction) + f" (closest orientation {code})",
                "hu_range": f"{_fmt(volume.array.min())} .. {_fmt(volume.array.max())}",
                "ap_diameter": _ap_diameter_fact(volume),
            }
        )
        notes = volume_notes(path)
        if notes:
            facts["synthetic"] = notes.get("note", notes.get("summary", SYNTHETIC))
            made = [notes[key] for key in ("model", "settings") if key in notes]
            if made:
                facts["made_by"] = ", ".join(made) + (f", from {notes['film']}" if "film" in notes else "")
    else:
        radiograph = read_radiograph(path)
        facts.update(
            {
                "shape": " x ".join(str(n) for n in radiograph.image.shape) + " (row, col)",
                "spacing": (_fmt(radiograph.spacing) + " mm (row, col)") if radiograph.spacing else "unknown",
                "intensity_range": f"{_fmt(radiograph.image.min())} .. {_fmt(radiograph.image.max())}",
                "drr": "yes" if radiograph.is_drr else "no",
                **({"patient_age": f"{radiograph.age_years:g} years"} if radiograph.age_years is not None else {}),
                **{_snake(key): value for key, value in radiograph.header.items()},
                "plausibility": _plausibility_fact(radiograph),
            }
        )
    return facts


def _plausibility_fact(radiograph: Radiograph) -> str:
    """What the checks before a reconstruction say of the film (a header, a negative, a turned or mirrored film,
    a child's size), so that a folder of films can be checked without reconstructing one."""
    from .plausibility import input_problems
    from .preprocess import preprocess_radiograph, square_pixels

    try:
        image01 = preprocess_radiograph(square_pixels(radiograph.image, radiograph.spacing)[0], 128)  # as the model sees it
    except XctDiffError as exc:  # a blank or too elongated film: the facts above still print, and why it is refused
        return f"refused before a reconstruction: {exc}"
    problems = sum(input_problems(radiograph, image01), [])
    return " | ".join(problems) if problems else "passes the checks made before a reconstruction"


def _ap_diameter_fact(volume) -> str:
    """The chest's front-to-back diameter as ``--ap-diameter`` measures it, or why it was not measured."""
    from .ap_diameter import ct_ap_diameter

    try:
        return f"{ct_ap_diameter(volume):.0f} mm (mid-chest, midline, the body without the table: the value for --ap-diameter)"
    except XctDiffError as error:
        return f"not measured ({error})"


def _snake(keyword: str) -> str:
    """ViewPosition -> view_position."""
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(keyword))
