"""Atomic file output: write to a temporary file beside the target, rename only on success.

Nothing half-written is ever left at the target path: an exception (bad input found late, SIGTERM,
which the CLI turns into an exception, Ctrl-C) removes the temporary file and leaves any earlier file
at the target untouched (SIGKILL cannot be caught: it may leave the hidden ``.NAME.*.tmp*`` file, never a
partial target). Before the rename the temporary file is checked (:func:`verify_written`:
not empty, and complete for the formats whose writers may fail silently, e.g. SimpleITK's NIfTI
writer on a full disk) and flushed to disk (fsync). A failed write becomes one :class:`XctDiffError`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .errors import XctDiffError


def full_suffix(path: Path) -> str:
    """``.nii.gz`` for ``ct.nii.gz``, ``.nrrd`` for ``ct.nrrd``: writers choose the format by it."""
    suffixes = Path(path).suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() == ".gz":
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def check_output_path(path) -> Path:
    """Fail early, with one line, when the output's folder is missing or not writable, or the path is a folder."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise XctDiffError(f"output folder does not exist: {parent}")
    if path.is_dir():
        raise XctDiffError(f"output path is a folder, expected a file: {path}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise XctDiffError(f"output folder is not writable: {parent}")
    return path


def check_output_folder(path, parents: bool = False) -> Path:
    """Fail early, with one line, when ``--out`` names a file, or (unless ``parents``: the caller makes
    them) a folder whose parent is missing; checked before any work, so a refused run leaves nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise XctDiffError(f"--out names a file, not a folder: {path}")
    if not parents and not path.parent.is_dir():
        raise XctDiffError(f"output folder does not exist: {path.parent}")
    return path


def make_output_folder(path, parents: bool = True) -> Path:
    """Create an output folder (and, with ``parents``, the folders above it), or fail with one line that says why."""
    path = Path(path)
    try:
        path.mkdir(parents=parents, exist_ok=True)
    except OSError as exc:
        reason = "a file of that name is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) \
            else exc.strerror or exc
        raise XctDiffError(f"cannot make the output folder {path}: {reason}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise XctDiffError(f"output folder is not writable: {path}")
    return path


class FolderSnapshot:
    """The folders at and below an output path before a command runs, so that a failed run can take back
    the empty folders it made (``prepare``'s ``images/``, a batch's sub-folders, ``--out`` itself) and leave
    the disk as it found it. Files are never removed: whatever a run wrote whole stays."""

    def __init__(self, path):
        self.path = Path(path)
        missing = []
        for folder in (self.path, *self.path.parents):
            if folder.exists():
                break
            missing.append(folder)
        self.missing = missing  # deepest first: folders a run may create above and at the path
        self.before = {Path(root) for root, _, _ in os.walk(self.path)} if self.path.is_dir() else set()

    def remove_new_empty_folders(self) -> None:
        if self.path.is_dir():
            for root, _, _ in os.walk(self.path, topdown=False):
                if Path(root) not in self.before:
                    with contextlib.suppress(OSError):
                        os.rmdir(root)  # only when empty
        for folder in self.missing:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def file_identity(path) -> tuple:
    """Equal for two paths that name one file: (device, inode) of an existing file (links included),
    else the resolved path (two outputs not written yet)."""
    path = Path(path)
    try:
        status = path.stat()
    except OSError:
        return ("path", str(path.resolve()))
    return ("file", status.st_dev, status.st_ino)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path with the same suffix in the target's folder; rename it into place on success.

    On success the written file is verified (:func:`verify_written`) and synced before the rename; a
    failed write (disk full, file too large, permissions) raises :class:`XctDiffError` naming ``path``.
    """
    path = check_output_path(path)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{full_suffix(path).lower()}", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        problem = verify_written(tmp, full_suffix(path).lower())
        if problem:
            raise XctDiffError(f"cannot write {path}: the written file is incomplete ({problem}); is the disk full?")
        _fsync(tmp)
        # mkstemp makes 0600 (and some writers, e.g. safetensors, recreate the file): outputs get the usual permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # the rename itself on disk; not every file system syncs folders
            _fsync(path.parent)
    except OSError as exc:
        raise XctDiffError(f"cannot write {path}: {_os_reason(exc)}") from exc
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def check_output_series_folder(path, replaceable) -> Path:
    """Fail early when a folder output (a DICOM series) cannot be written: its parent missing or not
    writable, the path a file, or a folder holding anything but files ``replaceable(name)`` accepts (what an
    earlier run wrote there: it is replaced; anything else is the user's, never deleted)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise XctDiffError(f"output folder does not exist: {parent}")
    if path.exists() and not path.is_dir():
        raise XctDiffError(f"output path is a file, expected a folder: {path}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise XctDiffError(f"output folder is not writable: {parent}")
    if path.is_dir():
        foreign = [entry.name for entry in path.iterdir() if not (entry.is_file() and replaceable(entry.name))]
        if foreign:
            raise XctDiffError(f"the output folder {path} holds other files ({foreign[0]}, ...): "
                               "give an empty or new folder")
    return path


@contextlib.contextmanager
def atomic_folder(path, replaceable):
    """Yield a hidden temporary folder beside ``path``; on success every file in it is synced and the folder
    takes ``path``'s place (an earlier folder there, checked by :func:`check_output_series_folder`, is
    removed only after the new one is in place). On failure the temporary folder is removed and ``path`` is
    untouched."""
    path = check_output_series_folder(path, replaceable)
    tmp = old = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        yield tmp
        for entry in tmp.iterdir():
            if entry.stat().st_size == 0:
                raise XctDiffError(f"cannot write {path}: {entry.name} is empty; is the disk full?")
            _fsync(entry)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        tmp = None
        with contextlib.suppress(OSError):
            _fsync(path.parent)
    except OSError as exc:
        if old is not None and not path.exists():  # the swap failed half way: the earlier folder goes back
            with contextlib.suppress(OSError):
                os.replace(old / path.name, path)
        raise XctDiffError(f"cannot write {path}: {_os_reason(exc)}") from exc
    finally:
        for folder in (tmp, old):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


def _os_reason(exc: OSError) -> str:
    """Why a write failed, in one line: the system's words, else the first line of a library's message
    (pydicom puts the whole traceback of a full disk into its exception's text)."""
    if exc.strerror:
        return exc.strerror
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ verification


def verify_written(path, suffix: str) -> Optional[str]:
    """Why the file just written to ``path`` (format given by ``suffix``) is incomplete, or None.

    Cheap checks that catch a truncated file: never empty; gzip streams read to their end; NIfTI
    holds the bytes its header promises; NRRD and MetaImage read back; PNG decodes; zip archives
    (.npz, torch's .pt) have their directory (and for .npz intact members); .npy, .json and
    .safetensors parse. Other formats: only the size.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        return "it is empty"
    check = next((f for ends, f in _VERIFIERS if suffix.endswith(ends)), None)
    if check is None:
        return None
    try:
        return check(path, suffix)
    except ImportError:  # the reader is not installed here (a bare training machine): the size must do
        return None
    except Exception as exc:  # noqa: BLE001 - any failure of a reader means a broken file
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[-1][:150]}" if lines else type(exc).__name__


def _verify_gzip(path: Path, suffix: str) -> Optional[str]:
    import gzip

    head, total = b"", 0
    with gzip.open(path, "rb") as f:  # EOFError when the stream ends early, BadGzipFile/zlib.error when corrupt
        for chunk in iter(lambda: f.read(1 << 20), b""):
            head = head or chunk[:540]
            total += len(chunk)
    return _nifti_size_problem(head, total) if suffix == ".nii.gz" else None


def _verify_nifti(path: Path, suffix: str) -> Optional[str]:
    with open(path, "rb") as f:
        head = f.read(540)
    return _nifti_size_problem(head, path.stat().st_size)


def _nifti_size_problem(head: bytes, size: int) -> Optional[str]:
    """NIfTI-1/2: the header's voxel offset + dim product * bitpix/8 must fit in ``size`` bytes."""
    import struct

    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        return "no NIfTI header"
    voxels = 1
    for n in dims[1 : 1 + max(0, min(dims[0], 7))]:
        voxels *= max(int(n), 1)
    expected = offset + voxels * bitpix // 8
    return None if size >= expected else f"{size} of {expected} bytes"


def _verify_itk(path: Path, suffix: str) -> Optional[str]:
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        sitk.ReadImage(str(path))  # ITK's NRRD and MetaImage readers refuse missing voxel data
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    return None


def _verify_png(path: Path, suffix: str) -> Optional[str]:
    from PIL import Image

    with Image.open(path) as image:
        image.load()  # a truncated stream raises
    return None


def _verify_zip(path: Path, suffix: str) -> Optional[str]:
    import zipfile

    with zipfile.ZipFile(path) as archive:  # the directory is written last: a truncated archive has none
        bad = archive.testzip() if suffix == ".npz" else None  # member CRCs (small files; .pt can be large)
    return f"member {bad} is corrupt" if bad else None


def _verify_npy(path: Path, suffix: str) -> Optional[str]:
    import numpy as np

    np.load(path, mmap_mode="r")  # raises when the file is shorter than its header says
    return None


def _verify_json(path: Path, suffix: str) -> Optional[str]:
    import json

    json.loads(path.read_text(encoding="utf-8"))
    return None


def _verify_safetensors(path: Path, suffix: str) -> Optional[str]:
    import json
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
    size = path.stat().st_size
    return None if size >= 8 + n + end else f"{size} of {8 + n + end} bytes"


# (suffix ending, check): the first whose ending matches the output's full suffix
_VERIFIERS = (
    (".gz", _verify_gzip),
    (".nii", _verify_nifti),
    (".nrrd", _verify_itk),
    (".mha", _verify_itk),
    (".png", _verify_png),
    (".npz", _verify_zip),
    (".pt", _verify_zip),
    (".npy", _verify_npy),
    (".json", _verify_json),
    (".safetensors", _verify_safetensors),
)
