"""Write a reconstructed CT as a DICOM CT series (``xctdiff reconstruct --format dicom``), with pydicom.

Why: a hospital's viewers and archives (PACS) take DICOM, not NRRD. Each axial slice becomes one CT Image
Storage file (int16 HU, rescale 1/0) in a folder. When the input film is itself DICOM, the series joins
the film's study: the patient and study attributes are copied from the film's header, and each slice
names the film as its source image; otherwise the series gets a new study and empty patient attributes
(the user's archive fills them in). The series says what it is, in every viewer: image type
``DERIVED\\SECONDARY\\AXIAL``, a series description that ends "research use, not diagnosis", and a
derivation description naming the model. It has its own frame of reference: the CT's position says
nothing about where the film's patient lay.

The geometry is the :class:`~XctDiffCore.volume.Volume`'s (LPS, as DICOM): slice ``k`` lies at
``origin + direction @ (0, 0, k * spacing_z)``, its rows and columns run along the direction's first two
columns. ``xctdiff`` reads the folder back as a CT (:func:`~XctDiffCore.io.read_ct`).
"""
from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Optional

import numpy as np

from .atomic import atomic_folder, check_output_series_folder
from .errors import XctDiffError
from .volume import Volume

SERIES_SUFFIX = ".dcm"  # each slice's file: IM0001.dcm, IM0002.dcm, ...
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DESCRIPTION = "XctDiff CT from one radiograph, research use, not diagnosis"
# (centre, width) HU: soft tissue first (a viewer's default), then lung
WINDOWS = ((40, 400), (-600, 1500))
# what a film's header gives the series: the patient and the study it belongs to
PATIENT_AND_STUDY = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription",
)


def is_series_file(name: str) -> bool:
    """A file this writer makes (an earlier output folder holding only these is replaced, nothing else is)."""
    return name.startswith("IM") and name.endswith(SERIES_SUFFIX)


def check_series_output(path) -> Path:
    """Refuse, before any work, a series folder that cannot be written or that holds other files."""
    return check_output_series_folder(path, is_series_file)


def film_header(source) -> Optional[object]:
    """The DICOM header (no pixels) of the input film, or None when it is not a DICOM file."""
    if source is None or not Path(source).is_file():
        return None
    import pydicom

    try:
        return pydicom.dcmread(str(source), stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError):
        return None


def write_dicom_series(volume: Volume, folder, source=None, derivation: str = "") -> Path:
    """Write ``volume`` (HU) as a DICOM CT series into ``folder`` (atomically: the folder appears complete or
    not at all). ``source``: the input film's path (a DICOM film's patient and study are copied); ``derivation``:
    how it was made (model, method, seed), stored as the derivation description. Returns ``folder``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = check_series_output(folder)
    array = np.asarray(volume.array)
    if not np.all(np.isfinite(array)):
        raise XctDiffError("cannot write a DICOM series: the volume has non-finite values")
    hu = np.clip(np.rint(array), -32768, 32767).astype("<i2")
    film = film_header(source)
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: names copied from any film
    for keyword in PATIENT_AND_STUDY:
        value = film.get(keyword) if film is not None else None
        if value not in (None, ""):
            setattr(base, keyword, value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "StudyID", "AccessionNumber", "ReferringPhysicianName"):  # type 2: present, empty when unknown
        if keyword not in base:
            setattr(base, keyword, "")
    if "StudyInstanceUID" not in base:
        base.StudyInstanceUID = generate_uid()
        base.StudyDate, base.StudyTime = date, time
    base.Modality = "CT"
    base.SeriesInstanceUID = generate_uid()
    base.SeriesNumber = 1
    base.SeriesDescription = DESCRIPTION
    base.SeriesDate = base.ContentDate = date
    base.SeriesTime = base.ContentTime = time
    base.FrameOfReferenceUID = generate_uid()
    base.PositionReferenceIndicator = ""
    base.Manufacturer = "XctDiffSlicer"
    from . import __version__

    base.SoftwareVersions = __version__
    base.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    base.DerivationDescription = (derivation or "reconstructed from one radiograph by XctDiff")[:1024]
    base.BurnedInAnnotation = "NO"
    if film is not None and "SOPInstanceUID" in film and "SOPClassUID" in film:
        item = Dataset()
        item.ReferencedSOPClassUID = film.SOPClassUID
        item.ReferencedSOPInstanceUID = film.SOPInstanceUID
        base.SourceImageSequence = Sequence([item])
    base.SOPClassUID = CT_IMAGE_STORAGE
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = int(hu.shape[1]), int(hu.shape[2])
    base.BitsAllocated, base.BitsStored, base.HighBit, base.PixelRepresentation = 16, 16, 15, 1
    base.RescaleIntercept, base.RescaleSlope, base.RescaleType = 0, 1, "HU"
    base.WindowCenter = [c for c, _ in WINDOWS]
    base.WindowWidth = [w for _, w in WINDOWS]
    base.WindowCenterWidthExplanation = ["soft tissue", "lung"]
    base.KVP = ""
    base.AcquisitionNumber = ""
    sx, sy, sz = volume.spacing
    base.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]  # between rows (y), between columns (x)
    base.SliceThickness = f"{sz:.6g}"
    base.ImageOrientationPatient = [f"{v:.6f}" for v in (*volume.direction[:, 0], *volume.direction[:, 1])]
    origin, normal = np.asarray(volume.origin), volume.direction[:, 2] * sz

    with atomic_folder(folder, is_series_file) as tmp:
        for k in range(hu.shape[0]):
            ds = copy.deepcopy(base)
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            position = origin + normal * k
            ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
            ds.SliceLocation = f"{position[2]:.4f}"
            ds.PixelData = np.ascontiguousarray(hu[k]).tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(tmp / f"IM{k + 1:04d}{SERIES_SUFFIX}", enforce_file_format=True)
    return folder
