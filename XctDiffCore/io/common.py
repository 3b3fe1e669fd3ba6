"""What the CT and radiograph readers (and the writers and ``inspect``) share.

The file-type tables; the checks made on a path, and on a header before a library reads it (a detached NRRD or
MetaImage header that points outside its folder, zero spacing, NaN in a NIfTI); the walk through folders (never into
/proc, /sys or /dev, no pipe or device handed to GDCM); the turning of a library's failure into one XctDiffError; the
opening of DICOM files and of ITK headers. Why a module of its own: :mod:`.ct` and :mod:`.radiograph` take the same
NRRD, MetaImage, NIfTI and DICOM files, and must refuse the same broken or dangerous ones in the same words.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from ..atomic import full_suffix
from ..errors import XctDiffError


# A DRR written by ``xctdiff drr`` carries this key (PNG text chunk, NRRD key/value) with value "1",
# so that readers can tell a rendered radiograph from a real film.
DRR_TAG_KEY = "xctdiff_drr"

# The most files a detached NRRD/MetaImage header may name (a printf pattern can name millions).
MAX_DETACHED_FILES = 100000

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SITK_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom")
RADIOGRAPH_SUFFIXES = PIL_SUFFIXES + DICOM_SUFFIXES
FILM_FILE_SUFFIXES = RADIOGRAPH_SUFFIXES + SITK_VOLUME_SUFFIXES  # every file type read_radiograph takes by name


def film_stem(path) -> str:
    """A film file's name without its file-type suffix (``chest.nii.gz`` -> ``chest``); a name whose last
    dot-part is not a known type (``1.2.840.1.5``, a DICOM file named by its UID) is kept whole."""
    from ..atomic import full_suffix

    name, suffix = Path(path).name, full_suffix(Path(path))
    return name[: -len(suffix)] if suffix and suffix.lower() in FILM_FILE_SUFFIXES else name


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
        note = windows_path_note(path) if isinstance(exc, RuntimeError) else ""  # SimpleITK's error type
        raise XctDiffError(f"cannot read {path} as {what}: {_one_line(exc)}{note}") from exc


def windows_path_note(path) -> str:
    """Why SimpleITK (ITK, GDCM) failed on a path that may well exist, or "": on Windows it opens file names
    through the system's ANSI code page, so a path with a letter beyond ASCII (a user named José, a folder
    "Müller") is "not found" there unless Windows runs with the UTF-8 code page (as 3D Slicer's programs do)."""
    if os.name != "nt" or str(path).isascii():
        return ""
    try:
        import ctypes

        if ctypes.windll.kernel32.GetACP() == 65001:  # UTF-8: the path reached SimpleITK as it is
            return ""
    except Exception:  # noqa: BLE001 - cannot tell: say it
        pass
    return (" (on Windows SimpleITK cannot open a path with letters beyond ASCII unless Windows uses UTF-8: move "
            "the file to a folder whose path has none, or turn on 'Beta: Use Unicode UTF-8 for worldwide language "
            "support' in Windows' region settings)")


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


@contextlib.contextmanager
def _c_output_muted(*fds: int):
    """Silence what C libraries print straight to the file descriptors ``fds`` (1: stdout, 2: stderr) meanwhile:
    NIfTI's writer (``** ERROR: NWAD: wrote only ...`` on a full disk), MetaIO's reader (``MetaImage:
    M_ReadElementsData: data not read completely`` on stdout for a file cut short). The failure is found and said
    in one line all the same."""
    import sys

    saved = []
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd in fds:
            saved.append((fd, os.dup(fd)))
    except (OSError, ValueError):  # no real stream (captured, closed): nothing to mute
        for _, copy in saved:
            os.close(copy)
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)  # a descriptor, not a file object: a Ctrl-C here warns of none
        try:
            for fd, _ in saved:
                os.dup2(devnull, fd)
        finally:
            os.close(devnull)
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


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


def _sitk_header(path: Path, what: str):
    """SimpleITK's reader of ``path`` with its header read and no voxels (size, components, metadata); a file it
    cannot read is one XctDiffError naming ``what`` it was read as."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with _library_errors(path, what), _itk_quiet():
        reader.ReadImageInformation()
    return reader


def _fmt(values, digits: int = 4) -> str:
    return " ".join(f"{float(v):.{digits}g}" for v in np.ravel(values))
