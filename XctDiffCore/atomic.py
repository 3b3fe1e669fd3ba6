"""Atomic file output: write to a temporary file beside the target, rename only on success.

Nothing half-written is ever left at the target path: an exception (bad input found late, a kill,
Ctrl-C) removes the temporary file and leaves any earlier file at the target untouched.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import XctDiffError


def full_suffix(path: Path) -> str:
    """``.nii.gz`` for ``ct.nii.gz``, ``.nrrd`` for ``ct.nrrd``: writers choose the format by it."""
    suffixes = Path(path).suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() == ".gz":
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def check_output_path(path) -> Path:
    """Fail early, with one line, when the output's folder does not exist or the path is a folder."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise XctDiffError(f"output folder does not exist: {parent}")
    if path.is_dir():
        raise XctDiffError(f"output path is a folder, expected a file: {path}")
    return path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path with the same suffix in the target's folder; rename it into place on success."""
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{full_suffix(path)}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        # mkstemp makes 0600 (and some writers, e.g. safetensors, recreate the file): outputs get the usual permissions
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
