"""Write what the engine makes: a CT volume with its notes, a film as PNG or 2D NRRD; and read the notes back.

:func:`write_volume` stores a CT as NRRD, NIfTI or MetaImage with notes that say it is synthetic and how it was
made; :func:`volume_notes` reads them (or a DICOM series' derivation) back, so that :func:`warn_if_synthetic` and
``inspect`` know a reconstruction wherever it goes. Why a module of its own: every write goes through
:func:`~XctDiffCore.atomic.atomic_path` and one set of refusals (NaN, wrong suffix), apart from the readers.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..atomic import atomic_path, check_output_path, failed_write_reason
from ..errors import XctDiffError
from ..volume import Volume
from .common import (DRR_TAG_KEY, SITK_VOLUME_SUFFIXES, _c_output_muted, _dcmread, _one_line, _sitk_header, _suffix,
                     is_dicom_file, windows_path_note)


VOLUME_WRITE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
NOTE_KEY = "xctdiff_"  # the keys of the notes a CT file written by XctDiff carries (NRRD, MetaImage)
SYNTHETIC = "synthetic CT reconstructed by XctDiff from one radiograph: research use, not diagnosis"
NIFTI_NOTE_LIMIT = 79  # a NIfTI-1 header's descrip field


def drr_tag_metadata() -> dict:
    """The metadata a DRR writer passes to :func:`write_image_png` / :func:`write_radiograph_nrrd`."""
    return {DRR_TAG_KEY: "1"}


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
    with atomic_path(path) as tmp, _c_output_muted(2):  # NIfTI's writer: `** ERROR: NWAD: wrote only ...`
        try:
            sitk.WriteImage(image, str(tmp), useCompression=suffix in (".nrrd", ".mha"))
        except RuntimeError as exc:  # ITK's NRRD and MetaImage writers report a failed write (disk full) so,
            # naming the hidden temporary file and not why: the system's words where they can be known
            reason = failed_write_reason(exc, tmp) or _one_line(exc).removeprefix('Reason: ') + windows_path_note(tmp)
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
