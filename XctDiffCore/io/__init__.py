"""Read and write CT volumes and radiographs, turning every unreadable input into one readable sentence.

CT volumes come from a DICOM series folder, NIfTI, NRRD, MetaImage or the shared ``.npz`` format and
become a :class:`~XctDiffCore.volume.Volume` (LPS, as SimpleITK reads them). Radiographs come from
PNG/JPEG/TIFF, DICOM (CR/DX/DR) or a 2D (or single-slice 3D) NRRD/NIfTI/MetaImage and become a
:class:`Radiograph`: a float32 ``[row, col]`` image in display orientation (head up, patient's right on
the image's left; see ``XctDiffCore.layout``). The real work is done by SimpleITK, pydicom, pynrrd and
Pillow, imported lazily so that the training machines (torch, numpy, scikit-image only) can import this
package. Every file written goes through :func:`~XctDiffCore.atomic.atomic_path`.

One job a module (each imports only those before it in this list):

* :mod:`.common`: the file-type tables, the checks on a path and a header, folder walking, library errors, DICOM
  and ITK header opening, shared by the rest;
* :mod:`.ct`: :func:`read_ct` and its readers;
* :mod:`.radiograph`: :class:`Radiograph`, :func:`read_radiograph` and its readers;
* :mod:`.writing`: :func:`write_volume` and its notes, :func:`write_image_png`, :func:`write_radiograph_nrrd`;
* :mod:`.inspect`: :func:`guess_kind` and :func:`inspect_path` (``xctdiff inspect``).

The names other modules use are imported here, so ``from XctDiffCore.io import read_ct`` keeps working. To
replace a name for a test, patch the module that uses it (``XctDiffCore.io.common.open``), not this package.
"""
from __future__ import annotations

from .common import (DICOM_SUFFIXES, DRR_TAG_KEY, FILM_FILE_SUFFIXES, MAX_DETACHED_FILES, PIL_SUFFIXES,
                     PSEUDO_FILESYSTEMS, RADIOGRAPH_SUFFIXES, SITK_VOLUME_SUFFIXES, film_stem, is_dicom_file,
                     special_files, walk_below)
from .ct import MIN_SLICE_GAP_MM, DicomReadWarning, ReadWarning, read_ct
from .radiograph import (HEADER_FACTS, MAGNIFICATION_RANGE, MAX_RADIOGRAPH_SIDE, MIN_RADIOGRAPH_SIZE,
                         VOLUME_MODALITIES, Radiograph, check_radiograph_image, check_radiograph_size, dicom_age_years,
                         dicom_not_a_film, find_real_radiographs, read_radiograph, to_grey)
from .writing import (NIFTI_NOTE_LIMIT, NOTE_KEY, SYNTHETIC, VOLUME_WRITE_SUFFIXES, drr_tag_metadata,
                      warn_if_synthetic, volume_notes, write_image_png, write_radiograph_nrrd, write_volume)
from .inspect import guess_kind, inspect_path

__all__ = [
    "DICOM_SUFFIXES", "DRR_TAG_KEY", "FILM_FILE_SUFFIXES", "MAX_DETACHED_FILES", "PIL_SUFFIXES", "PSEUDO_FILESYSTEMS",
    "RADIOGRAPH_SUFFIXES", "SITK_VOLUME_SUFFIXES", "film_stem", "is_dicom_file", "special_files", "walk_below",
    "MIN_SLICE_GAP_MM", "DicomReadWarning", "ReadWarning", "read_ct",
    "HEADER_FACTS", "MAGNIFICATION_RANGE", "MAX_RADIOGRAPH_SIDE", "MIN_RADIOGRAPH_SIZE", "VOLUME_MODALITIES",
    "Radiograph", "check_radiograph_image", "check_radiograph_size", "dicom_age_years", "dicom_not_a_film",
    "find_real_radiographs", "read_radiograph", "to_grey",
    "NIFTI_NOTE_LIMIT", "NOTE_KEY", "SYNTHETIC", "VOLUME_WRITE_SUFFIXES", "drr_tag_metadata", "warn_if_synthetic",
    "volume_notes", "write_image_png", "write_radiograph_nrrd", "write_volume",
    "guess_kind", "inspect_path",
]
