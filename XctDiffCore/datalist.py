"""The datalist `xctdiff prepare` writes (CT + DRR pairs, split by patient): reading it, torch-free.

Training, evaluation and the style evaluation read the same file; this module is theirs to share, so
evaluation never imports the training package.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import XctDiffError, first_line


def read_datalist(path, section: str) -> list[dict]:
    """The entries of one section with absolute paths; a clear error for a missing file or key."""
    path = Path(path)
    if path.is_dir():
        raise XctDiffError(f"{path} is a folder: give its datalist.json (from `xctdiff prepare`)")
    if not path.is_file():
        raise XctDiffError(f"datalist not found: {path} (make one with `xctdiff prepare`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise XctDiffError(f"{path} is not a datalist: not a text file") from None
    except json.JSONDecodeError as exc:
        raise XctDiffError(f"{path} is not valid JSON: {exc}") from None
    entries = data.get(section, []) if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise XctDiffError(f"{path} is not a datalist of `xctdiff prepare` (expected an object whose {section!r} "
                           "is a list of entries)")
    items = []
    for entry in entries:
        if "image" not in entry or "xray" not in entry:
            raise XctDiffError(f"{path}: every {section} entry needs 'image' and 'xray', got {sorted(entry)}")
        for key in ("image", "xray"):
            if not isinstance(entry[key], str) or not entry[key]:
                raise XctDiffError(f"{path}: a {section} entry's {key!r} must be a file path, got {entry[key]!r}")
        items.append(
            {
                "image": path.parent / entry["image"],
                "xray": path.parent / entry["xray"],
                "patient": str(entry.get("patient", Path(entry["image"]).stem)),
            }
        )
    return items


def datalist_geometry(path) -> str:
    """The DRR geometry a datalist's radiographs were rendered in (``settings.geometry``; cone by default)."""
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return "cone"
    return str(settings.get("geometry", "cone")) if isinstance(settings, dict) else "cone"


def load_entry_ct(path) -> np.ndarray:
    """The HU cube of a datalist entry's ``image`` (``.npz`` with ``ct``), or one line naming the file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            ct = npz["ct"]
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as exc:
        raise XctDiffError(f"cannot read the datalist's CT {path}: {_reason(exc)}") from None
    problem = _array_problem(ct, 3) or (None if len(set(ct.shape)) == 1 else
                                        f"a {' x '.join(map(str, ct.shape))} volume, not the cube `xctdiff prepare` writes")
    if problem:
        raise XctDiffError(f"the datalist's CT {path} is {problem}")
    return ct


def load_entry_xray(path) -> np.ndarray:
    """The DRR of a datalist entry's ``xray`` (``.npy``), or one line naming the file."""
    try:
        xray = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise XctDiffError(f"cannot read the datalist's radiograph {path}: {_reason(exc)}") from None
    problem = _array_problem(xray, 2)
    if problem:
        raise XctDiffError(f"the datalist's radiograph {path} is {problem}")
    return xray



def find_run_datalist(run, recorded_run, recorded, sha256: Optional[str] = None, resolved=None) -> tuple:
    """``(path, None)`` of a training run's datalist where training read it, or ``(None, why)``.

    A checkpoint keeps the path as typed (``data.datalist``) and, since 2026-12-07, as training resolved it
    (``resolved``, ``datalist_path``); a relative one is also looked for from the folder ``xctdiff train`` ran in,
    which is the folder whose ``recorded_run`` (``run.dir`` as typed) ``run`` is (a project moved whole), and from
    here. Why: an export or an evaluation of the run from another folder looked for it from there, and the model
    folder got no training patients. A file whose SHA-256 is not ``sha256`` (the checkpoint's record) is not the
    one trained on (another data set's of the same relative name, or this one changed since)."""
    from .atomic import file_sha256

    if not recorded:
        return None, "no datalist is recorded"
    typed = Path(recorded)
    ran_in = None if typed.is_absolute() else _folder_training_ran_in(run, recorded_run)
    candidates = [*([Path(resolved)] if resolved else []),
                  *([typed] if typed.is_absolute() else [*([ran_in / typed] if ran_in else []), typed.resolve()])]
    found = [path for path in dict.fromkeys(candidates) if path.is_file()]
    for path in found:
        if sha256 is None or file_sha256(path) == sha256:
            return path, None
    first = candidates[0]
    if first in found:
        return None, f"{first} has changed since (its SHA-256 is not the one trained on)"
    moved = " (where training ran is not known: the run was moved or renamed since)" if (
        ran_in is None and not typed.is_absolute() and not resolved) else ""
    return None, f"it is not at {first}{moved}" + (f"; {found[0]} is another file (another SHA-256)" if found else "")


def _folder_training_ran_in(run, recorded_run) -> Optional[Path]:
    """The folder ``xctdiff train`` ran in: ``run`` (resolved) less the relative ``recorded_run`` it was given as; None
    when that was absolute or does not end ``run``'s path (the run moved or was renamed since)."""
    if not recorded_run or Path(recorded_run).is_absolute():
        return None
    folder = Path(run).resolve()
    for part in reversed(Path(os.path.normpath(recorded_run)).parts):
        if part != folder.name:  # '..' included: the folder above it is not known
            return None
        folder = folder.parent
    return folder

def _array_problem(array, ndim: int):
    """Why an array is no image of ``ndim`` dimensions (numbers, not empty, finite), or None: a NaN voxel
    trains a network to NaN without a word, and a wrong shape fails deep inside torch."""
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        return f"not an array of numbers ({getattr(array, 'dtype', type(array).__name__)})"
    if array.ndim != ndim or array.size == 0:
        return f"of shape {tuple(array.shape)}, not a {ndim}D image"
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return "holding NaN or infinite values"
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file (was the data set moved without its datalist?)"
    if isinstance(exc, KeyError):
        return "no 'ct' array in it"
    if isinstance(exc, ValueError) and "pickle" in str(exc):  # numpy's hint to allow pickles is no advice here
        return "not a numpy array file"
    return first_line(exc)
