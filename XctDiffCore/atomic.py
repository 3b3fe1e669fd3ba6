"""Atomic file output: write to a temporary file beside the target, rename only on success.

Nothing half-written is ever left at the target path: an exception (bad input found late, SIGTERM,
which the CLI turns into an exception, Ctrl-C) removes the temporary file and leaves any earlier file
at the target untouched (SIGKILL cannot be caught: it may leave a hidden ``.xctdiff-*.tmp*`` file or
folder, never a partial target). Temporary names are short, so that a target name at the file system's
limit (255 bytes) can still be written. Before the rename the temporary file is checked (:func:`verify_written`:
not empty, and complete for the formats whose writers may fail silently, e.g. SimpleITK's NIfTI
writer on a full disk) and flushed to disk (fsync). A failed write becomes one :class:`XctDiffError`.

Several outputs of one command (a CT and its views PNG) are written as one set inside :func:`output_set`:
every temporary is finished first, then all are renamed into place at its end, and a failure or interrupt
during those renames puts the earlier outputs back. On Linux each output takes its target's place in one
step (a DICOM series folder too), so a reader never finds a target missing. Clean-up runs to its end even
when a second Ctrl-C arrives during it (:func:`_finish`). A folder that a long job fills file by file
(``prepare``, ``evaluate``, a training stage) is held by :func:`output_lock` while the job runs: a second
job into it is refused, where the two wrote the same files in turns.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import hashlib
import os
import re
import secrets
import stat
import sys
import time
from pathlib import Path
from typing import Optional

from .errors import XctDiffError

TEMP_PREFIX = ".xctdiff-"  # hidden and short: a temporary name is never longer than the target's limit allows
LOCK_NAME = ".lock"  # held by the job writing an output folder (see output_lock)

# the list of (finished temporary, target) of the innermost open output_set; None outside one
_pending_outputs: contextvars.ContextVar = contextvars.ContextVar("xctdiff_pending_outputs", default=None)


def full_suffix(path: Path) -> str:
    """``.nii.gz`` for ``ct.nii.gz``, ``.nrrd`` for ``ct.nrrd``: writers choose the format by it."""
    suffixes = Path(path).suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() == ".gz":
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def check_name_length(path) -> None:
    """Refuse, with one line, a name the file system cannot hold (else a later ``stat`` raises ENAMETOOLONG)."""
    path = Path(path)
    if os.name == "nt":  # no pathconf; NTFS, ReFS and exFAT hold 255 UTF-16 units, whatever UTF-8 would take
        size, limit, unit = len(path.name.encode("utf-16-le")) // 2, 255, "characters"
    else:
        size, unit = len(os.fsencode(path.name)), "bytes"
        try:
            limit = os.pathconf(path.parent, "PC_NAME_MAX")
        except (OSError, ValueError):  # the folder is missing, or no such limit here
            limit = 255
    if size > limit:
        raise XctDiffError(f"the file name is too long ({size} {unit}; at most {limit}): {path}")


#: The characters of a path that Windows' file functions take (MAX_PATH, 260, less the closing NUL), unless long
#: paths are enabled; beyond it a folder that exists reads as missing and a write fails as "path not found".
WINDOWS_MAX_PATH = 259
MADE_INSIDE = 40  # characters a temporary name beside an output (or a file of a series inside it) may take


def check_path_length(path, folder: bool = False) -> None:
    """On Windows without long paths, refuse with one line an output whose path, or the temporary names written
    beside it (inside it: ``folder``), would pass :data:`WINDOWS_MAX_PATH`; before anything looks at it, since
    past that limit Windows calls an existing folder missing ("output folder does not exist", which it does)."""
    if os.name != "nt" or _windows_long_paths():
        return
    full = os.path.abspath(path)
    longest = max(len(full) + (1 + MADE_INSIDE if folder else 0), len(os.path.dirname(full)) + 1 + MADE_INSIDE)
    if longest > WINDOWS_MAX_PATH:
        raise XctDiffError(f"the output path is too long for Windows ({len(full)} characters, its temporary files up to "
                           f"{longest}; at most {WINDOWS_MAX_PATH} unless long paths are enabled, 'Enable Win32 long "
                           f"paths' in Group Policy): choose a shorter folder: {path}")


@functools.lru_cache(maxsize=1)
def _windows_long_paths() -> bool:
    """Whether Windows was told to take long paths (LongPathsEnabled; Python's own executable declares itself
    ready for them since 3.6)."""
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            return winreg.QueryValueEx(key, "LongPathsEnabled")[0] == 1
    except (ImportError, OSError):
        return False


def check_output_path(path) -> Path:
    """Fail early, with one line, when the output's folder is missing or not writable, the path is a folder or
    its name too long."""
    path = Path(path)
    check_path_length(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise XctDiffError(f"output folder does not exist: {parent}")
    check_name_length(path)
    if path.is_dir():
        raise XctDiffError(f"output path is a folder, expected a file: {path}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise XctDiffError(f"output folder is not writable: {parent}")
    return path


def check_output_folder(path, parents: bool = False) -> Path:
    """Fail early, with one line, when ``--out`` names a file, or (unless ``parents``: the caller makes
    them) a folder whose parent is missing; checked before any work, so a refused run leaves nothing."""
    path = Path(path)
    check_path_length(path, folder=True)
    check_name_length(path)
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
        if isinstance(exc, FileExistsError) and path.is_symlink():  # not a file: a link to nothing (or to a file)
            reason = f"it is a link to {os.readlink(path)}, which is not a folder"
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
        """Runs to its end even when a second Ctrl-C arrives meanwhile (:func:`_finish`)."""
        _finish(self._remove_new_empty_folders)

    def _remove_new_empty_folders(self) -> None:
        roots = [Path(root) for root, _, _ in os.walk(self.path, topdown=False)] if self.path.is_dir() else []
        for folder in [root for root in roots if root not in self.before] + self.missing:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only when empty


class FolderBusy(XctDiffError):
    """Another job holds the output folder (:func:`output_lock`): what appeared in it meanwhile is that job's,
    so a refused job takes nothing back."""


@contextlib.contextmanager
def output_lock(folder, job: str, busy: str = "written", lock_of: str = "the output folder's lock"):
    """Hold ``<folder>/.lock`` while ``job`` (``xctdiff evaluate``) writes the folder: a second job into the
    same folder (a job submitted twice, a ``--resume`` while the first still runs) is refused in one line
    (:class:`FolderBusy`), where the two wrote the same files in turns. An advisory ``flock``: the kernel
    releases it however the process ends, so a killed job leaves no stale lock (its file, naming a process
    that has ended, is taken over by the next job); a job that ends removes the file. Where there are no
    locks (no fcntl on Windows; a network file system without them) the job goes on unguarded.

    Makes the folder (and those above it). A refused job, or one whose lock cannot be written, takes back
    the empty folders it made for the lock; a block that fails takes back every empty folder made since."""
    folder = Path(folder)
    made = FolderSnapshot(folder)
    make_output_folder(folder)
    path, fd = folder / LOCK_NAME, None
    try:
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if fcntl is not None:
            fd = _locked_file(path, folder, fcntl, job, busy, lock_of)
    except BaseException:
        for new in made.missing:  # only these: anything else new in the folder is the holder's
            with contextlib.suppress(OSError):
                os.rmdir(new)
        raise
    try:
        yield folder
    except BaseException:
        fd = _unlock(path, fd)
        made.remove_new_empty_folders()
        raise
    finally:
        _unlock(path, fd)


def _locked_file(path: Path, folder: Path, fcntl, job: str, busy: str, lock_of: str) -> Optional[int]:
    """The open, flocked lock file at ``path`` (its holder written in it: the process, then the job), or None
    where the file system has no locks. A file its holder removed between our open and our lock is not the
    lock any more: open again."""
    import socket
    import time

    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise XctDiffError(f"cannot open {lock_of} {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lines = os.pread(fd, 400, 0).decode("utf-8", "replace").splitlines() + ["", ""]
            os.close(fd)
            owner, holder = lines[0].strip() or "another process", lines[1].strip() or job
            raise FolderBusy(f"{folder} is being {busy} by another `{holder}` ({owner}): wait for it to end or "
                             "stop it, or choose another --out") from None
        except OSError:  # no locks here (some network file systems): unguarded, as without fcntl, and no file left
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M')}"
                          f"\n{job}\n".encode(), 0)
            except OSError as exc:  # a full disk: one line before any work (the job's own writes would fail later)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                os.close(fd)
                raise XctDiffError(f"cannot write {lock_of} {path}: {exc.strerror or exc}") from None
            return fd
        os.close(fd)
    raise XctDiffError(f"cannot hold {lock_of} {path}: it keeps being removed")


def _unlock(path: Path, fd: Optional[int]) -> None:
    """Remove the lock file, then let go of it (a job that opened it meanwhile finds it gone and opens the
    new one); None, for the caller's ``fd``."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
    return None


def temporary_folder_problem() -> Optional[str]:
    """Why Python's ``tempfile`` finds no folder to write in, as one sentence, or None when it finds one.

    With TMPDIR, /tmp, /var/tmp, /usr/tmp and the current folder all full, read-only or missing,
    ``tempfile.gettempdir()`` raises FileNotFoundError wherever it is first asked: inside torch (an optimiser's
    compile cache folder), a download, the Slicer module's job folder."""
    import tempfile

    try:
        tempfile.gettempdir()
    except FileNotFoundError as exc:
        return f"{exc.strerror or exc}: full, read-only or missing; set TMPDIR to a writable folder"
    return None


def in_folder(path, folder, resolved: bool = False) -> bool:
    """Whether ``path`` is ``folder`` or lies below it, both resolved (through links too) unless ``resolved`` says
    they are already: how a job that searches folders for its inputs tells its own output folder, whose files read
    back would be taken for inputs."""
    if not resolved:
        path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if path == folder or folder in path.parents:
        return True
    if not _names_ignore_case():
        return False
    # Windows and macOS: ~/Films/out and ~/films/OUT are one folder (realpath keeps the case it was given)
    folded, candidate = Path(str(folder).casefold()), Path(str(path).casefold())
    if candidate != folded and folded not in candidate.parents:
        return False
    same_depth = (path, *path.parents)[len(path.parts) - len(folder.parts)]
    try:  # a volume formatted case-sensitive (APFS can be) keeps the two apart: ask it
        return os.path.samefile(same_depth, folder)
    except OSError:  # one of them not made yet: the system's default, names that ignore case
        return True


def _names_ignore_case() -> bool:
    return os.name == "nt" or sys.platform == "darwin"


def refuse_own_output(path, output) -> None:
    """An input ``path`` given inside the job's ``output`` folder (or that folder itself): one error line."""
    if in_folder(path, output):
        raise XctDiffError(f"{path} is in the output folder {output}: a job does not read its own outputs back as "
                           "inputs; write the output to a folder outside it")


def file_identity(path) -> tuple:
    """Equal for two paths that name one file: (device, inode) of an existing file (links included),
    else the resolved path (two outputs not written yet), case folded where names ignore case (Windows, macOS:
    ``A_ct.nrrd`` and ``a_ct.nrrd`` are one file there, and the second written replaced the first). A file system
    that gives no file number (0: some network shares on Windows) is told by the path too, where every file of it
    was one."""
    path = Path(path)
    try:
        status = os.stat(path)
    except OSError:
        status = None
    if status is None or not status.st_ino:
        text = str(path.resolve())
        return ("path", text.casefold() if _names_ignore_case() else text)
    return ("file", status.st_dev, status.st_ino)


def file_sha256(path) -> str:
    """A file's SHA-256 (hex), read in 1 MiB pieces: what tells two files apart whatever their names, sizes and dates."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path with the same suffix in the target's folder; rename it into place on success.

    On success the written file is verified (:func:`verify_written`) and synced before the rename; a
    failed write (disk full, file too large, permissions) raises :class:`XctDiffError` naming ``path``.
    Inside :func:`output_set` the rename waits for the set's end.
    """
    path = check_output_path(path)
    tmp = None
    try:
        tmp = _temp_name(path.parent, f".tmp{full_suffix(path).lower()}")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        yield tmp
        problem = verify_written(tmp, full_suffix(path).lower())
        if problem:
            raise XctDiffError(f"cannot write {path}: the written file is incomplete ({problem}); is the disk full?")
        _fsync(tmp)
        # made 0600 (and some writers, e.g. safetensors, recreate the file): outputs get the usual permissions
        os.chmod(tmp, 0o666 & ~_umask())
        pending = _pending_outputs.get()
        if pending is not None:
            pending.append((tmp, path))  # the set renames it, or removes it
            tmp = None
            return
        _replace(tmp, path)
        with contextlib.suppress(OSError):  # the rename itself on disk; not every file system syncs folders
            _fsync(path.parent)
    except OSError as exc:
        raise XctDiffError(f"cannot write {path}: {_os_reason(exc)}") from exc
    except XctDiffError:
        raise
    except Exception as exc:  # torch's or safetensors' own exception for a failed write (disk full)
        reason = failed_write_reason(exc, tmp if tmp is not None else path.parent)
        if reason is None:
            raise
        raise XctDiffError(f"cannot write {path}: {reason}") from exc
    finally:
        if tmp is not None:
            _finish(lambda: _remove(tmp))


def check_output_series_folder(path, replaceable) -> Path:
    """Fail early when a folder output (a DICOM series) cannot be written: its parent missing or not
    writable, the path a file or a mount point (a folder output is swapped in whole), or a folder holding
    anything but files ``replaceable(name)`` accepts (what an earlier run wrote there: it is replaced; anything
    else is the user's, never deleted)."""
    path = Path(path)
    check_path_length(path, folder=True)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise XctDiffError(f"output folder does not exist: {parent}")
    check_name_length(path)
    try:  # one look each: another writer of the same series may move it away at any moment
        is_file = not stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        is_file = False
    if is_file:
        raise XctDiffError(f"output path is a file, expected a folder: {path}")
    if os.path.ismount(path):  # the swap of atomic_folder renames the folder itself: EBUSY, after all the work
        raise XctDiffError(f"the output folder {path} is a mount point, which cannot be replaced whole: "
                           "give a new folder inside it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise XctDiffError(f"output folder is not writable: {parent}")
    try:
        entries = list(path.iterdir())
    except FileNotFoundError:  # a new output, or another writer's swap under way
        entries = []
    foreign = [entry.name for entry in entries if _is_foreign(entry, replaceable)]
    if foreign:
        raise XctDiffError(f"the output folder {path} holds other files ({foreign[0]}, ...): "
                           "give an empty or new folder")
    return path


def _is_foreign(entry: Path, replaceable) -> bool:
    """Whether a folder output's entry is someone else's: not a file ``replaceable`` accepts. One look (a file
    that vanishes meanwhile was moved aside by another writer of the same output: it was replaceable)."""
    try:
        is_file = stat.S_ISREG(entry.stat().st_mode)
    except FileNotFoundError:
        return False
    return not (is_file and replaceable(entry.name))


@contextlib.contextmanager
def atomic_folder(path, replaceable):
    """Yield a hidden temporary folder beside ``path``; on success every file in it is synced and the folder
    takes ``path``'s place (see :func:`_commit`: an earlier folder there, checked by
    :func:`check_output_series_folder`, is moved aside and removed only after the new one is in place, or put
    back if that fails or is interrupted). On failure the temporary folder is removed and ``path`` is
    untouched. Inside :func:`output_set` the swap waits for the set's end."""
    path = check_output_series_folder(path, replaceable)
    tmp = None
    try:
        tmp = _temp_name(path.parent, ".tmp")
        os.mkdir(tmp, 0o700)
        inner = _pending_outputs.set(None)  # files written into the folder are renamed there at once
        try:
            yield tmp
        finally:
            _pending_outputs.reset(inner)
        for entry in tmp.iterdir():
            if entry.stat().st_size == 0:
                raise XctDiffError(f"cannot write {path}: {entry.name} is empty; is the disk full?")
            _fsync(entry)
        os.chmod(tmp, 0o777 & ~_umask())
        pending = _pending_outputs.get()
        if pending is not None:
            pending.append((tmp, path))
        else:
            _commit([(tmp, path)])
        tmp = None
    except OSError as exc:
        raise XctDiffError(f"cannot write {path}: {_os_reason(exc)}") from exc
    except XctDiffError as exc:  # a file of the folder (atomic_path inside): named by its place, not the hidden one
        if tmp is None or str(tmp) not in str(exc):
            raise
        raise XctDiffError(str(exc).replace(str(tmp), str(path))) from exc
    except Exception as exc:  # a writer's own exception for a failed write, as in atomic_path
        reason = failed_write_reason(exc, tmp if tmp is not None else path.parent)
        if reason is None:
            raise
        raise XctDiffError(f"cannot write {path}: {reason}") from exc
    finally:
        if tmp is not None:
            _finish(lambda: _remove(tmp))


@contextlib.contextmanager
def output_set():
    """Write the outputs of one command as a set (a CT and its views: never a new one beside an old one).

    Inside the block :func:`atomic_path` and :func:`atomic_folder` write and check their temporaries but do
    not rename them; at the block's end :func:`_commit` renames them all in quick succession. An exception or
    interrupt inside the block removes every temporary, and one during the renames puts the earlier outputs
    back, so each output is either all new or all as before."""
    pending = []
    token = _pending_outputs.set(pending)
    try:
        yield
    except BaseException:
        _finish(lambda: [_remove(tmp) for tmp, _ in pending])
        raise
    finally:
        _pending_outputs.reset(token)
    try:
        _commit(pending)
    except OSError as exc:
        raise XctDiffError(f"cannot write {pending[0][1]}: {_os_reason(exc)}") from exc


def _commit(pending: list) -> None:
    """Put each finished ``(temporary, target)`` in place, the earlier target kept in a hidden folder so that
    it can be put back (:func:`_swap_in`). Until the last folder is synced, any exception, Ctrl-C included,
    undoes the swaps (:func:`_undo`); after that the earlier targets are removed."""
    done = []  # (target, folder holding the earlier target as "old", identity of the new output)
    failed = True
    try:
        for tmp, path in pending:
            aside = _temp_name(path.parent, ".old")
            done.append((path, aside, _identity(tmp)))
            os.mkdir(aside, 0o700)
            _swap_in(tmp, path, aside)
        for folder in {path.parent for _, path in pending}:
            with contextlib.suppress(OSError):  # the renames on disk; not every file system syncs folders
                _fsync(folder)
        failed = False
    except BaseException:
        failed = True
        _finish(lambda: _undo(done))
        raise
    finally:  # the temporaries not renamed; on success the earlier targets (_undo removes what it put back)
        leftovers = [tmp for tmp, _ in pending] + ([] if failed else [aside for _, aside, _ in done])
        _finish(lambda: [_remove(p) for p in leftovers])


def _swap_in(tmp: Path, path: Path, aside: Path) -> None:
    """Put ``tmp`` at ``path`` and what was there at ``aside/old``. Where the system can swap two names in one
    step (Linux's renameat2, most local file systems) a reader never finds ``path`` missing, a folder included.
    Elsewhere the earlier one is moved aside first, and a folder that another writer of the same output put
    there in between is moved aside too and the rename tried again. Either way the last writer wins."""
    slot = aside / "old"
    _replace(tmp, slot)  # still not in place: _undo knows it by its identity
    if _exchange(slot, path):
        return
    new = aside / "new"
    _replace(slot, new)
    with contextlib.suppress(FileNotFoundError):  # nothing there (or another writer moved it just now)
        os.replace(path, slot)
    for attempt in range(3):
        try:
            _replace(new, path)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == 2:
                raise
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, aside / f"other{attempt}")


def _replace(source, target) -> None:
    """``os.replace`` of a file just written; on Windows tried again for a moment when refused: a virus scanner or
    the search indexer that opens a new file holds it for some milliseconds without letting it be renamed
    (PermissionError: "access is denied", "used by another process"), and the whole job failed on it."""
    for pause in (0.01, 0.03, 0.1, 0.3, 0.6, None):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if os.name != "nt" or pause is None:
                raise
        time.sleep(pause)


def _undo(done: list) -> None:
    """Put the earlier targets of a failed :func:`_commit` back, last first; safe to run again (:func:`_finish`).
    Where each swap stopped is read from the files themselves (which of them is the new output), not from a
    record that an interrupt could leave one step behind. An earlier target that cannot be put back stays in
    its hidden ``.xctdiff-*.old`` folder, never deleted."""
    for path, aside, new_id in reversed(done):
        slot = aside / "old"
        with contextlib.suppress(OSError):
            new_in_place = new_id is not None and _identity(path) == new_id
            earlier_aside = _identity(slot) not in (None, new_id)
            if earlier_aside and (new_in_place or not os.path.lexists(path)):
                if not _exchange(slot, path):  # after an exchange the slot holds the new output
                    _remove(path)
                    os.replace(slot, path)
            elif new_in_place:
                _remove(path)  # the new one: there was nothing before
        if _identity(slot) in (None, new_id):
            _remove(aside)


def _identity(path) -> Optional[tuple]:
    """(device, inode) of what is at ``path`` itself (not followed), None if nothing is."""
    try:
        status = os.lstat(path)
    except OSError:
        return None
    return (status.st_dev, status.st_ino)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2():
    """glibc's renameat2 (2.28 and later), or None: another C library, another system."""
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).renameat2
    except Exception:  # noqa: BLE001 - no such C function here (macOS, musl, Windows: CDLL(None) itself fails)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a, b) -> bool:
    """Swap what ``a`` and ``b`` name in one step; False (nothing done) where the system or the file system
    cannot, or one of them is missing."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    import ctypes

    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOENT, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _temp_name(folder: Path, suffix: str) -> Path:
    """A new hidden name in ``folder``, to be created by the caller (O_EXCL, mkdir) after it holds the name, so
    that an interrupt right after the creation still finds it to remove (tempfile's own functions return the
    name only after creating it). 48 random bits: a name already taken fails the write, as good as never."""
    return folder / f"{TEMP_PREFIX}{secrets.token_hex(6)}{suffix}"


def _finish(action) -> None:
    """Run a short clean-up to its end even if Ctrl-C or SIGTERM arrives during it (a second Ctrl-C while
    the first unwinds): it is run again, then the interrupt is raised. ``action`` must be safe to repeat."""
    interrupt = None
    for _ in range(3):
        try:
            action()
            break
        except Exception:
            raise
        except BaseException as exc:  # KeyboardInterrupt, the CLI's Terminated
            interrupt = interrupt or exc
    if interrupt is not None:
        raise interrupt


def _remove(path) -> None:
    """Remove a file or a folder tree if it is there, as far as it can. Safe to interrupt and run again: it holds
    no file descriptor (shutil.rmtree interrupted at the wrong moment closes one twice and fails with EBADF).
    Windows refuses to delete a read-only file (a DICOM series copied from a CD): it is made writable first."""
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            for name in os.listdir(path):
                _remove(os.path.join(path, name))
            os.rmdir(path)
        else:
            try:
                os.unlink(path)
            except PermissionError:
                if os.name != "nt":
                    raise
                os.chmod(path, stat.S_IWRITE)
                os.unlink(path)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _os_reason(exc: OSError) -> str:
    """Why a write failed, in one line: the system's words, else the error number a library's text quotes
    (pydicom puts the whole traceback of a full disk into its exception's text), else its first line."""
    if exc.strerror:
        return exc.strerror
    quoted = _quoted_errno(str(exc))
    if quoted is not None:
        return os.strerror(quoted)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


_QUOTED_ERRNO = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")  # Rust's io::Error; Python's OSError as text


def _quoted_errno(text: str) -> Optional[int]:
    match = _QUOTED_ERRNO.search(text)
    return int(match.group(1) or match.group(2)) if match else None


def failed_write_reason(exc: BaseException, written) -> Optional[str]:
    """The system's words for a write that a library reported in its own exception, or None when ``exc`` is
    not a failed write (a programming error stays a traceback).

    Not every writer lets the OSError through: safetensors (Rust) raises a SafetensorError quoting it
    ("... (os error 28)"), torch.save a RuntimeError on the short write ("unexpected pos ..."), ITK a
    RuntimeError naming the temporary file. So: the error number the text quotes; else a file system with no
    free block left where ``written`` (the temporary file or its folder) lies (ENOSPC); else a temporary file
    at this process's file size limit, ``ulimit -f`` (EFBIG); else torch's short write all the same (a disk
    quota, a network file system that reports no free-block count)."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.strerror or os.strerror(exc.errno)
    quoted = _quoted_errno(str(exc))
    if quoted is not None:
        return os.strerror(quoted)
    try:
        disk = os.statvfs(written)
        if (disk.f_bfree if os.geteuid() == 0 else disk.f_bavail) == 0:  # root may use the reserved blocks
            return os.strerror(errno.ENOSPC)
    except (OSError, AttributeError):  # gone already; no statvfs or geteuid (Windows)
        pass
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and os.path.isfile(written) and os.path.getsize(written) >= limit:
            return os.strerror(errno.EFBIG)
    except (ImportError, OSError):
        pass
    if "unexpected pos" in str(exc):  # torch.save's short write where the disk does not look full: a user's quota
        return "the file could not be written whole; is the disk full or a disk quota reached?"
    return None


def _fsync(path: Path) -> None:
    # Windows flushes only a handle open for writing (fsync of a read-only one: EBADF); a folder cannot be opened
    # there at all (PermissionError, which the callers that sync folders pass over)
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
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
