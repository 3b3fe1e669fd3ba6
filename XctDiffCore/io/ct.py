"""Read a CT volume: :func:`read_ct` and its readers.

A DICOM series folder or file (localizers left out, a gantry tilt resampled, padding made air, missing slices
refused, damaged files named), a DICOMDIR, an enhanced multi-frame file, NIfTI (orientation, shear and a file cut
short checked on the header), NRRD (one cut short said so), MetaImage or the shared ``.npz`` format become a
:class:`~XctDiffCore.volume.Volume` in LPS. Why a module of its own: a CT's pitfalls (slice order and spacing, shear,
several series in one folder) are not a film's.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import XctDiffError, a_few, counted
from ..volume import Volume
from .common import (PIL_SUFFIXES, SITK_VOLUME_SUFFIXES, _c_output_muted, _check_input, _check_sitk_header, _fmt,
                     _itk_quiet, _library_errors, _one_line, _sitk_header, _suffix, is_dicom_file, special_files)


# Slices of a DICOM series closer than this (mm, median over the series) lie at one position.
MIN_SLICE_GAP_MM = 1e-3


def _nifti_header(path: Path):
    """``(header bytes, byte order, 1 or 2)`` of a NIfTI-1 or NIfTI-2 file, or ``None`` when it is not NIfTI or
    cannot be read (ITK then says why)."""
    import gzip
    import struct
    import zlib

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0] if len(header) >= 4 else 0
        if size == 348 and len(header) >= 348:  # NIfTI-1: shorts and floats
            return header, order, 1
        if size == 540 and len(header) >= 540:  # NIfTI-2: ints and doubles
            return header, order, 2
    return None


def _nifti_forms(path: Path):
    """``(qform_code, sform_code, sform)`` from a NIfTI-1 or NIfTI-2 header, ``sform`` the 3 x 4 voxel-to-RAS
    rows (srow_x, srow_y, srow_z); ``None`` when the file is not NIfTI or cannot be read (ITK then says why)."""
    import struct

    found = _nifti_header(path)
    if found is None:
        return None
    header, order, version = found
    if version == 1:
        qcode, scode = struct.unpack(order + "2h", header[252:256])
        rows = struct.unpack(order + "12f", header[280:328])
    else:
        qcode, scode = struct.unpack(order + "2i", header[344:352])
        rows = struct.unpack(order + "12d", header[400:496])
    return qcode, scode, np.array(rows, dtype=float).reshape(3, 4)


def _check_nifti_whole(path: Path) -> None:
    """Refuse a NIfTI file that holds fewer bytes than its header's voxels need (a download or copy that stopped):
    ITK reads it without a word, the missing voxels 0 (water). A .nii.gz is judged by its gzip trailer (the size of
    the data it holds, mod 2^32: a cut file ends in other bytes), and only when that differs by reading it through."""
    import struct

    found = _nifti_header(path)
    if found is None:
        return
    header, order, version = found
    # (dim[8], bitpix, vox_offset): NIfTI-1 shorts and a float, NIfTI-2 int64s and a short
    dims_at, dims_format, bitpix_at, offset_at, offset_format = (
        (40, "8h", 72, 108, "f") if version == 1 else (16, "8q", 14, 168, "q"))
    dims = struct.unpack(order + dims_format, header[dims_at : dims_at + struct.calcsize(dims_format)])
    bitpix = struct.unpack(order + "h", header[bitpix_at : bitpix_at + 2])[0]
    offset = struct.unpack(order + offset_format, header[offset_at : offset_at + struct.calcsize(offset_format)])[0]
    if not 1 <= dims[0] <= 7 or any(d < 1 for d in dims[1 : dims[0] + 1]) or bitpix <= 0 or not np.isfinite(offset):
        return  # a header ITK refuses in its own words
    voxels = 1
    for d in dims[1 : dims[0] + 1]:
        voxels *= int(d)
    needed = int(max(offset, 348 if version == 1 else 540)) + voxels * bitpix // 8
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as f:
            f.seek(-4, 2)
            if int.from_bytes(f.read(4), "little") == needed % 2**32:
                return
            f.seek(0)
            held = _gunzipped_length(f)
    else:
        held = path.stat().st_size
    if held < needed:
        raise XctDiffError(f"{path} is cut short: its header asks for {needed} bytes, the file holds {held} (a "
                           "download or copy that stopped?): copy or download it again")


def _gunzipped_length(f) -> int:
    """How many bytes the gzip stream read from ``f`` (from where it stands) decompresses to; a cut stream just
    ends, a damaged one ends where it breaks."""
    import zlib

    held, stream = 0, zlib.decompressobj(31)
    try:
        while data := f.read(1 << 20):
            while data:
                held += len(stream.decompress(data, 1 << 24))
                data = stream.unconsumed_tail
                if stream.eof and stream.unused_data:  # a file of several gzip members
                    data, stream = stream.unused_data, zlib.decompressobj(31)
    except (OSError, zlib.error):
        pass
    return held


def _nrrd_cut_short(path: Path) -> Optional[str]:
    """Why an NRRD file (or the data file its .nhdr names) holds fewer voxel bytes than its header asks for (a
    download or copy that stopped), or None. Asked only once ITK has failed on it: ITK says no more than
    'Read: Error reading FILE'. Raw and gzip encodings; others (text, bzip2) are left to ITK's words."""
    import nrrd

    try:
        with open(path, "rb") as f:
            header = nrrd.read_header(f)
            start = f.tell()
        encoding = str(header.get("encoding", "")).lower()
        if encoding not in ("raw", "gzip", "gz"):
            return None
        itemsize = nrrd.reader._determine_datatype(header).itemsize  # pynrrd's map of NRRD type names
        needed = itemsize * int(np.prod([int(n) for n in header["sizes"]]))
        data_file = header.get("data file", header.get("datafile"))
        if data_file:  # detached (.nhdr): the one data file it names (a list or pattern: left to ITK)
            if len(str(data_file).split()) != 1:
                return None
            source, start = path.parent / str(data_file).strip(), 0
        else:
            source = path
        start += max(int(header.get("byte skip", header.get("byteskip", 0))), 0)
        if int(header.get("line skip", header.get("lineskip", 0))):
            return None  # lines to skip first: too rare to count here
        with open(source, "rb") as f:
            f.seek(start)
            held = _gunzipped_length(f) if encoding != "raw" else max(source.stat().st_size - start, 0)
    except Exception:  # noqa: BLE001 - a header that does not say: ITK's words stand
        return None
    if held >= needed:
        return None
    named = source if source == path else f"{source} (the voxels of {path})"
    return (f"{named} is cut short: its header asks for {needed} bytes of voxels, the file holds {held} (a download or "
            "copy that stopped?): copy or download it again")


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


def _check_ct_values(volume: Volume, path: Path) -> Volume:
    if min(volume.shape) < 2:
        raise XctDiffError(f"expected a CT volume, got a 2D image of shape {volume.shape} from {path}")
    if volume.array.dtype.kind == "f" and not np.all(np.isfinite(volume.array)):
        raise XctDiffError(f"CT {path} contains NaN or infinite voxel values")
    return volume


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
        if suffix in (".nii", ".nii.gz"):
            _check_nifti_whole(path)
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


def dicom_slice_thickness(path) -> Optional[float]:
    """The Slice Thickness (0018,0050, mm) of a DICOM CT given as one of its series' files (or an enhanced
    multi-frame file: its shared pixel measures), or None: not a DICOM file, or no usable value. Why: a scan
    reconstructed at 2.5 mm spacing from 5 mm thick slices is as blurred head to foot as a 5 mm scan, and its
    spacing does not show it (:func:`~XctDiffCore.metrics.low_resolution_problem`). NIfTI, NRRD and MetaImage do
    not record a thickness."""
    import pydicom

    path = Path(path)
    try:
        if not path.is_file() or not is_dicom_file(path):
            return None
        header = pydicom.dcmread(path, stop_before_pixels=True)
        value = header.get("SliceThickness")
        if value in (None, ""):
            shared = header.get("SharedFunctionalGroupsSequence") or [{}]
            measures = shared[0].get("PixelMeasuresSequence") or [{}]
            value = measures[0].get("SliceThickness")
        thickness = float(value)
    except Exception:  # noqa: BLE001 - unreadable or no number: not known
        return None
    return thickness if np.isfinite(thickness) and thickness > 0 else None


def _volume_from_sitk(image, path: Path) -> Volume:
    if image.GetDimension() == 2:
        raise XctDiffError(f"expected a CT volume, got a 2D image of size {image.GetSize()} from {path}")
    if image.GetDimension() == 4:
        raise XctDiffError(f"{path} is a 4D image of {image.GetSize()[3]} volumes (a time series, such as the "
                           "breathing phases of a 4D CT): save the one to use as a 3D file (in Slicer: Sequences; or "
                           "SimpleITK's image[:, :, :, k])")
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

    try:
        with _library_errors(path, "a CT volume"), _itk_quiet(), _c_output_muted(1, 2):  # MetaIO prints on stdout
            image = sitk.ReadImage(str(path))
    except XctDiffError:
        cut_short = _nrrd_cut_short(path) if _suffix(path) in (".nrrd", ".nhdr") else None
        if cut_short:  # ITK said only 'Read: Error reading FILE'
            raise XctDiffError(cut_short) from None
        raise
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
    from ..ct_search import ct_series_below

    below = list(dict.fromkeys(ct_series_below(path.parent)))
    if len(below) == 1:
        return _read_dicom_series(below[0], below[0], None)
    if not below:
        raise XctDiffError(f"{path} is a DICOMDIR (the index of a DICOM export) and no DICOM CT series lies below it")
    raise XctDiffError(f"{path} is a DICOMDIR (the index of a DICOM export) with CT series in several folders, e.g. "
                       f"{below[0]} and {below[1]}: give one of them")


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
        from ..ct_search import ct_series_below

        below = ct_series_below(folder) if series_uid is None else []
        hint = (f"; below it: {len(below)}{'+' if len(below) >= 3 else ''} DICOM CT series, e.g. {below[0]} (give one; "
                "`xctdiff prepare` takes the whole folder)") if below else ""
        damaged = unreadable_dicom_files(folder) if not hint else []
        if damaged:
            hint = (f"; {len(damaged)} DICOM files here could not be read ({a_few(damaged)}): damaged or cut short; copy, "
                    "download or export them again")
        raise XctDiffError(f"no DICOM series found in {folder}{hint}")
    damaged = _damaged_dicom_files(folder, files, series_uid or uids[chosen], uids)
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
    damaged_files = counted(len(damaged), "file")
    if np.any(np.abs(gaps - np.median(gaps)) > 0.1 * abs(np.median(gaps))):
        widest = Path(files[int(np.argmax(np.abs(gaps)))]).name
        raise XctDiffError(
            f"the DICOM series in {folder} has missing or unevenly spaced slices (gaps from {_fmt(np.abs(gaps).min())} "
            f"to {_fmt(np.abs(gaps).max())} mm; the widest after {widest})"
            f"{f'; {damaged_files} here could not be read as DICOM ({a_few(damaged)})' if damaged else ''}: "
            "download or export the series again"
        )
    if damaged:  # at an end of the stack: the CT is read without them, a little short
        which = "it is a slice" if len(damaged) == 1 else "they are slices"
        warnings.warn(f"{damaged_files} in {folder} could not be read as DICOM ({a_few(damaged)}): left out; if "
                      f"{which} of the CT, download or export the series again", DicomReadWarning, stacklevel=3)
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


def unreadable_dicom_files(folder: Path) -> list:
    """The names of the DICOM files (by suffix or mark) in ``folder`` that the DICOM library reads into no series:
    damaged or cut short. Why: it skips them without a word, and a folder of nothing else looked empty."""
    import SimpleITK as sitk

    with _itk_quiet():
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        listed = [f for uid in uids for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)]
    return _damaged_dicom_files(folder, listed, None, uids)


def _damaged_dicom_files(folder: Path, files, series_uid: Optional[str], uids) -> list:
    """The names of the files in ``folder`` that GDCM left out of the series ``series_uid`` (whose ``files`` it
    lists; ``uids``: every series it found there; None: ``files`` are all of them) because they cannot be read whole: a DICOM file (by suffix or mark)
    whose header does not read, or a CT image (this series', or of no series found) whose pixels are missing or cut
    short (a download or copy that stopped). GDCM skips them without a word: the series then has a gap, or is a
    slice short. Files of the other series, and documents (a report, a DICOMDIR), are passed over."""
    import pydicom

    listed, found = {Path(f).name for f in files}, {str(u).strip() for u in uids}
    try:
        entries = sorted(folder.iterdir())
    except OSError:  # not to be listed now: the series read says the rest
        return []
    damaged = []
    for path in entries:
        if path.name in listed or path.name.upper() == "DICOMDIR" or not path.is_file():
            continue
        try:
            if not is_dicom_file(path):
                continue
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPClassUID"])
            uid = str(header.get("SeriesInstanceUID", "") or "").strip()
            sop_class = str(header.get("SOPClassUID", "") or header.file_meta.get("MediaStorageSOPClassUID", ""))
            if series_uid is not None and uid in found and uid != series_uid.strip():
                continue  # a file of another series
            if uid and uid not in found and sop_class not in _CT_IMAGE_CLASSES:
                continue  # a document or an object that is no CT image: not a slice
            _whole_pixels(pydicom.dcmread(path))
        except Exception:  # noqa: BLE001 - any failure to read it: damaged, named in the message
            damaged.append(path.name)
    return damaged


# CT Image Storage and Enhanced CT Image Storage
_CT_IMAGE_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")


def _whole_pixels(header) -> None:
    """Raise when a dataset (an image of a CT series) has no pixel data, or uncompressed pixel data shorter than its
    rows, columns and bits say."""
    if "PixelData" not in header:
        raise ValueError("no pixel data")
    if header.file_meta.TransferSyntaxUID.is_compressed:
        return
    expected = (int(header.Rows) * int(header.Columns) * int(header.get("NumberOfFrames", 1) or 1)
                * int(header.get("SamplesPerPixel", 1) or 1) * int(header.BitsAllocated) // 8)
    if len(header.PixelData) < expected:
        raise ValueError(f"pixel data of {len(header.PixelData)} bytes, {expected} expected")


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
