"""``xctdiff inspect``: what kind of file a path is (:func:`guess_kind`) and its facts as the engine reads them.

Why a module of its own: it sits on top of both readers and the notes (and, lazily, the plausibility checks and the
AP diameter), which none of them needs.
"""
from __future__ import annotations

from ..errors import XctDiffError
from .common import (PIL_SUFFIXES, SITK_VOLUME_SUFFIXES, _check_input, _dcmread, _fmt, _library_errors, _sitk_header,
                     _suffix, is_dicom_file)
from .ct import read_ct
from .radiograph import Radiograph, read_radiograph
from .writing import SYNTHETIC, volume_notes


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
        notes = volume_notes(path)  # an XctDiff reconstruction: its depth is the model's guess
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(tuple(volume.direction.ravel()))
        facts.update(
            {
                "shape": " x ".join(str(n) for n in volume.shape) + " (k, j, i)",
                "dtype": str(volume.array.dtype),
                "spacing": _fmt(volume.spacing) + " mm (x, y, z)",
                "origin": _fmt(volume.origin, 6) + " mm (LPS)",
                "direction": " / ".join(_fmt(row) for row in volume.direction) + f" (closest orientation {code})",
                "hu_range": f"{_fmt(volume.array.min())} .. {_fmt(volume.array.max())}",
                "ap_diameter": _ap_diameter_fact(volume, synthetic=bool(notes)),
            }
        )
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
    from ..plausibility import input_problems
    from ..preprocess import preprocess_radiograph, square_pixels

    try:
        image01 = preprocess_radiograph(square_pixels(radiograph.image, radiograph.spacing)[0], 128)  # as the model sees it
    except XctDiffError as exc:  # a blank or too elongated film: the facts above still print, and why it is refused
        return f"refused before a reconstruction: {exc}"
    problems = sum(input_problems(radiograph, image01), [])
    return " | ".join(problems) if problems else "passes the checks made before a reconstruction"


def _ap_diameter_fact(volume, synthetic: bool = False) -> str:
    """The chest's front-to-back diameter as ``--ap-diameter`` measures it, or why it was not measured. Of a CT XctDiff
    reconstructed it is the model's guess, which fed back through ``--ap-diameter`` would only confirm itself."""
    from ..ap_diameter import ct_ap_diameter

    try:
        if synthetic:
            return (f"{ct_ap_diameter(volume):.0f} mm (the reconstruction's depth, the model's guess: not a value for "
                    "--ap-diameter, which wants the patient's)")
        return f"{ct_ap_diameter(volume):.0f} mm (mid-chest, midline, the body without the table: the value for --ap-diameter)"
    except XctDiffError as error:
        return f"not measured ({error})"


def _snake(keyword: str) -> str:
    """ViewPosition -> view_position."""
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(keyword))
