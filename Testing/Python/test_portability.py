"""Windows and macOS behaviour of the paths a Slicer user runs, checked on Linux.

Windows cannot run here, so each test gives the module under test a stand-in for the one thing Windows does
differently (``os.name == "nt"``, no ``os.pathconf``/``os.getuid``, an ``os.fsync`` that refuses a read-only
handle, ``os.replace`` onto a folder raising PermissionError, ``kernel32``), through a proxy of ``os`` seen only
by that module: patching ``os.name`` itself would make every ``Path()`` a WindowsPath, which Linux refuses.
"""
from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import types

import pytest

import XctDiffCore.atomic as atomic
from XctDiffSlicerLib import process as slicer_process


class ModuleAsOnWindows(types.SimpleNamespace):
    """A module as another module sees it on Windows: the POSIX-only functions listed in ``missing`` absent,
    anything given as a keyword replaced or added; the rest is Linux's own."""

    def __init__(self, module, missing=(), **replaced):
        super().__init__(**replaced)
        self._module, self._missing = module, set(missing)

    def __getattr__(self, name):
        if name in self._missing:
            raise AttributeError(f"module {self._module.__name__!r} has no attribute {name!r}")
        return getattr(self._module, name)


def WindowsOs(missing=(), **replaced):
    return ModuleAsOnWindows(os, missing, name="nt", **replaced)


def windows_fsync(fd):
    """Windows' os.fsync (_commit, FlushFileBuffers): a handle opened read-only fails with EBADF."""
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
        raise OSError(errno.EBADF, "Bad file descriptor")
    os.fsync(fd)


def test_an_atomic_write_on_windows_syncs_through_a_handle_open_for_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "os", WindowsOs(missing={"pathconf"}, fsync=windows_fsync))
    target = tmp_path / "ct.txt"
    with atomic.atomic_path(target) as tmp:
        tmp.write_text("written", encoding="utf-8")
    assert target.read_text(encoding="utf-8") == "written"
    assert [p.name for p in tmp_path.iterdir()] == ["ct.txt"]


def test_windows_has_no_pathconf_and_counts_a_name_in_utf16_units(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "os", WindowsOs(missing={"pathconf"}))
    atomic.check_name_length(tmp_path / ("é" * 200 + ".nrrd"))  # 405 UTF-8 bytes, 205 UTF-16 units: Windows holds it
    with pytest.raises(atomic.XctDiffError, match=r"too long \(256 characters; at most 255\)"):
        atomic.check_name_length(tmp_path / ("a" * 251 + ".nrrd"))


CREATE_NEW_PROCESS_GROUP, CREATE_NO_WINDOW = 0x200, 0x8000000  # subprocess's values on Windows


def windows_subprocess(calls: list):
    """``subprocess`` with Windows' creation flags; Popen and run record their keywords (Popen then stops)."""

    def popen(command, **options):
        calls.append(("Popen", command, options))
        raise RuntimeError("recorded")

    def run(command, **options):
        calls.append(("run", command, options))

    return ModuleAsOnWindows(subprocess, CREATE_NEW_PROCESS_GROUP=CREATE_NEW_PROCESS_GROUP,
                             CREATE_NO_WINDOW=CREATE_NO_WINDOW, Popen=popen, run=run)


@pytest.mark.parametrize("long_paths", [False, True])
def test_an_output_path_past_windows_260_characters_is_refused_in_one_line_unless_long_paths_are_on(
        tmp_path, monkeypatch, long_paths):
    """Past MAX_PATH Windows calls an existing folder missing: the run said "output folder does not exist" of a
    folder the user could see, or failed at the rename after the work. Enabled long paths lift the limit."""
    monkeypatch.setattr(atomic, "os", WindowsOs(missing={"pathconf"}))
    monkeypatch.setattr(atomic, "_windows_long_paths", lambda: long_paths)
    deep = tmp_path / ("a" * (250 - len(str(tmp_path))))
    deep.mkdir()
    atomic.check_output_path(tmp_path / "ct.nrrd")  # a short path: fine
    for check in (atomic.check_output_path, atomic.check_output_folder):
        if long_paths:
            check(deep / "chest_ct.nrrd")
        else:
            with pytest.raises(atomic.XctDiffError, match=r"too long for Windows \(2\d\d characters.*at most 259 unless "
                                                          r"long paths are enabled.*: .*chest_ct.nrrd$"):
                check(deep / "chest_ct.nrrd")

def test_the_engine_and_its_cancel_open_no_console_window_on_windows(monkeypatch):
    """Slicer is a GUI program on Windows: a console child (python, PythonSlicer) it starts without
    CREATE_NO_WINDOW gets a black window of its own for the whole reconstruction, and taskkill one more."""
    calls = []
    monkeypatch.setattr(slicer_process, "os", WindowsOs(missing={"killpg", "setsid"}))
    monkeypatch.setattr(slicer_process, "subprocess", windows_subprocess(calls))
    child = slicer_process.ChildProcess(["python", "-m", "XctDiffCore", "reconstruct", "film.png"])
    with pytest.raises(RuntimeError, match="recorded"):
        child.start()
    (kind, _, options), = calls
    assert kind == "Popen" and "start_new_session" not in options
    assert options["creationflags"] == CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW
    assert options["encoding"] == "utf-8"  # the child's lines are UTF-8 (PYTHONIOENCODING), not the code page

    child._process = types.SimpleNamespace(pid=4321, poll=lambda: None)
    child.cancel()
    kind, command, options = calls[-1]
    assert kind == "run" and command == ["taskkill", "/T", "/F", "/PID", "4321"]
    assert options.get("creationflags", 0) & CREATE_NO_WINDOW


def test_a_job_handed_to_a_standby_engine_that_left_starts_a_fresh_one_on_windows(tmp_path, monkeypatch):
    """A standby engine that leaves makes its job file's name a folder (PROTOCOL.md); renaming the job onto it is
    "access denied" (PermissionError) on Windows, not IsADirectoryError: the click must start a fresh engine, not
    fail with "cannot prepare the job"."""
    from XctDiffSlicerLib import logic

    def windows_replace(source, target):
        if os.path.isdir(target):
            raise PermissionError(errno.EACCES, "Access is denied", str(source), 5, str(target))
        os.replace(source, target)

    monkeypatch.setattr(logic, "os", WindowsOs(replace=windows_replace))
    (tmp_path / logic.JOB_NAME).mkdir()
    assert logic._hand_over(tmp_path, ["film.png", "-o", "ct.nrrd"]) is False
    assert [p.name for p in tmp_path.iterdir()] == [logic.JOB_NAME]  # no half-handed job left
    (tmp_path / logic.JOB_NAME).rmdir()
    assert logic._hand_over(tmp_path, ["film.png"]) is True

    def refused(source, target):  # a file in the way that cannot be replaced: still said, as before
        raise PermissionError(errno.EACCES, "Access is denied", str(source), 5, str(target))

    monkeypatch.setattr(logic, "os", WindowsOs(replace=refused))
    with pytest.raises(PermissionError):
        logic._hand_over(tmp_path, ["film.png"])


def test_job_folders_of_a_crashed_session_are_removed_on_windows_too(tmp_path, monkeypatch):
    """Windows has no os.getuid; its temporary folder is the user's own: a day-old job folder (a patient's film)
    is removed there as on Linux, where it was left for ever."""
    import time

    from XctDiffSlicerLib import logic

    monkeypatch.setattr(logic, "os", WindowsOs(missing={"getuid", "geteuid"}))
    old, new = tmp_path / "xctdiff-old", tmp_path / "xctdiff-new"
    for folder in (old, new):
        folder.mkdir()
        (folder / "radiograph.nrrd").write_bytes(b"pixels")
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    assert logic.remove_stale_job_folders(str(tmp_path)) == [old]
    assert [p.name for p in tmp_path.iterdir()] == ["xctdiff-new"]


def fake_kernel32(running: dict):
    """kernel32's OpenProcess and WaitForSingleObject over ``running`` (pid: whether it runs); 87 for a number
    no process has (ERROR_INVALID_PARAMETER)."""
    state = {"error": 0}

    def open_process(access, inherit, pid):
        if pid not in running:
            state["error"] = 87
            return None
        return pid + 10_000

    def wait_for_single_object(handle, milliseconds):
        return 0x102 if running[handle - 10_000] else 0  # WAIT_TIMEOUT: still running; WAIT_OBJECT_0: ended

    kernel32 = types.SimpleNamespace(OpenProcess=open_process, WaitForSingleObject=wait_for_single_object)
    return kernel32, state


def test_a_standby_engine_on_windows_sees_its_slicer_end(monkeypatch):
    """Windows' os.getppid keeps answering the parent's number after the parent has ended, and os.kill(pid, 0)
    sends Ctrl-C there: the watch holds a handle to the process instead. Before, a standby engine whose Slicer
    crashed held the model's memory for its 30 idle minutes."""
    import ctypes

    from XctDiffCore.commands import cli

    running = {4242: True, 777: True}
    kernel32, state = fake_kernel32(running)
    monkeypatch.setattr(ctypes, "WinDLL", lambda name, use_last_error=False: kernel32, raising=False)
    monkeypatch.setattr(ctypes, "get_last_error", lambda: state["error"], raising=False)
    monkeypatch.setattr(cli, "os", WindowsOs(getppid=lambda: 777))
    slicer, parent = cli._parent_watch(4242), cli._parent_watch(None)
    assert slicer() and parent()
    running[4242] = running[777] = False
    assert not slicer() and not parent()
    assert not cli._parent_watch(5151)()  # no such process any more


def test_a_name_the_output_code_page_lacks_is_escaped_not_a_traceback(tmp_path):
    """On Windows stdout to a pipe or a file is in the ANSI code page (cp1252), here set by PYTHONIOENCODING: a
    film named in Chinese made ``xctdiff inspect film.png > info.txt`` end in UnicodeEncodeError's traceback."""
    import sys

    import numpy as np
    from conftest import REPO
    from PIL import Image

    film = tmp_path / "王芳_PA.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(film)
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "XctDiffCore", "inspect", str(film)], capture_output=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr.decode("cp1252", "replace")
    assert b"\\u738b\\u82b3_PA.png" in done.stdout and b"Traceback" not in done.stderr


@pytest.mark.parametrize("system", ["windows", "macos"])
def test_two_outputs_that_differ_only_in_case_are_one_file_on_windows_and_macos(tmp_path, monkeypatch, system):
    """A folder holding ``Chest.png`` and ``chest.dcm`` was reconstructed to ``Chest_ct.nrrd`` and ``chest_ct.nrrd``:
    one file where names ignore case (Windows, macOS by default), so the second CT silently replaced the first."""
    from XctDiffCore.commands.reconstruct_job import _refuse_overlaps

    if system == "windows":
        monkeypatch.setattr(atomic, "os", WindowsOs())
    else:
        monkeypatch.setattr(atomic, "sys", types.SimpleNamespace(platform="darwin"))
    films = [tmp_path / "Chest.png", tmp_path / "chest.dcm"]
    out = tmp_path / "out"
    jobs = [(films[0], out / "Chest_ct.nrrd", None, None), (films[1], out / "chest_ct.nrrd", None, None)]
    with pytest.raises(atomic.XctDiffError, match="are the same file"):
        _refuse_overlaps(films, jobs)
    assert atomic.file_identity(out / "a.nrrd") != atomic.file_identity(out / "b.nrrd")


def test_an_output_folder_named_in_another_letter_case_is_still_the_jobs_own_on_macos(tmp_path, monkeypatch):
    """`xctdiff reconstruct ~/Films -o ~/films/CT` on macOS: one folder there, but the search compared the names
    as written, so a second run read the first run's CTs back from Films/ct as inputs."""
    monkeypatch.setattr(atomic, "sys", types.SimpleNamespace(platform="darwin"))
    (tmp_path / "Films" / "ct").mkdir(parents=True)
    written = tmp_path / "Films" / "ct" / "RG1_ct.nrrd"
    assert atomic.in_folder(written, tmp_path / "films" / "CT")
    with pytest.raises(atomic.XctDiffError, match="is in the output folder"):
        atomic.refuse_own_output(written, tmp_path / "films" / "CT")
    assert not atomic.in_folder(tmp_path / "Films" / "RG1.dcm", tmp_path / "films" / "CT")
    (tmp_path / "films" / "CT").mkdir(parents=True)  # a volume formatted case-sensitive: two folders after all
    assert not atomic.in_folder(written, tmp_path / "films" / "CT")
    monkeypatch.undo()  # Linux: names that differ in case are other folders
    assert not atomic.in_folder(tmp_path / "Films" / "ct" / "x", tmp_path / "films" / "ct")

def test_non_ascii_lines_cross_the_slicer_protocol_whatever_the_childs_locale(tmp_path):
    """The engine child writes UTF-8 (engine_environment's PYTHONIOENCODING) and the module reads UTF-8, whatever
    the locale says: on Windows a child left to itself writes cp1252 to a pipe, here an ASCII locale (LC_ALL=C,
    PYTHONUTF8=0), under which a patient's name in a line was a UnicodeEncodeError in the child."""
    import sys

    from conftest import REPO

    script = (
        "import json, sys\n"
        "print('PROGRESS 0.5 lecture de Müller 王芳', flush=True)\n"
        "print('warning: film of Müller 王芳', file=sys.stderr, flush=True)\n"
        "print('RESULT ' + json.dumps({'consistency': 0.9, 'timings': {}, 'device': 'cpu', 'patient': 'Müller 王芳'},"
        " ensure_ascii=False), flush=True)\n"
    )
    engine = tmp_path / "engine.py"  # a file, UTF-8 source: an argument would be decoded by the ASCII locale
    engine.write_text(script, encoding="utf-8")
    base = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
    env = slicer_process.engine_environment(str(REPO), base=base)
    events = []
    finished = slicer_process.ChildProcess([sys.executable, str(engine)], env=env).start().wait(events.append, 60)
    assert finished.succeeded, finished.error
    assert finished.result["patient"] == "Müller 王芳"
    assert slicer_process.Progress(0.5, "lecture de Müller 王芳") in events
    assert slicer_process.LogLine("warning: film of Müller 王芳", "stderr") in events


def test_an_output_renamed_while_a_virus_scanner_holds_it_on_windows_is_renamed_a_moment_later(tmp_path, monkeypatch):
    """On Windows a scanner or the indexer opening a file just written makes its rename fail for some milliseconds
    (PermissionError); the write then failed as a whole. Both ways an output is put in place (alone, and as a set)."""
    refusals = []

    def scanned_replace(source, target):
        if len(refusals) < 2:
            refusals.append(source)
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        os.replace(source, target)

    monkeypatch.setattr(atomic, "os", WindowsOs(missing={"pathconf"}, fsync=windows_fsync, replace=scanned_replace))
    with atomic.atomic_path(tmp_path / "ct.txt") as tmp:
        tmp.write_text("alone", encoding="utf-8")
    assert len(refusals) == 2 and (tmp_path / "ct.txt").read_text(encoding="utf-8") == "alone"
    refusals.clear()
    with atomic.output_set():
        with atomic.atomic_path(tmp_path / "ct.txt") as tmp:
            tmp.write_text("as a set", encoding="utf-8")
    assert len(refusals) == 2 and (tmp_path / "ct.txt").read_text(encoding="utf-8") == "as a set"
    assert [p.name for p in tmp_path.iterdir()] == ["ct.txt"]


def test_a_simpleitk_failure_on_a_non_ascii_path_on_windows_says_why(monkeypatch):
    """SimpleITK on Windows says "the file ... does not exist" for a file whose path has a letter beyond ASCII
    (it opens names through the ANSI code page): the error says so and what to do, where it said nothing."""
    import ctypes

    from XctDiffCore.io import common

    kernel32 = types.SimpleNamespace(GetACP=lambda: 1252)
    monkeypatch.setattr(ctypes, "windll", types.SimpleNamespace(kernel32=kernel32), raising=False)
    monkeypatch.setattr(common, "os", WindowsOs())
    path = "C:/Users/Müller/film_ct.nrrd"
    with pytest.raises(atomic.XctDiffError, match="letters beyond ASCII unless Windows uses UTF-8"):
        with common._library_errors(path, "a CT volume"):
            raise RuntimeError(f"sitk::ERROR: The file '{path}' does not exist.")
    with pytest.raises(atomic.XctDiffError) as plain:  # an ASCII path, or a Windows on UTF-8: the library's words
        with common._library_errors("C:/Users/Muller/film_ct.nrrd", "a CT volume"):
            raise RuntimeError("sitk::ERROR: The file does not exist.")
    assert "ASCII" not in str(plain.value)
    kernel32.GetACP = lambda: 65001
    assert common.windows_path_note(path) == ""


def test_files_of_a_share_that_gives_no_file_number_are_told_apart_by_their_paths(tmp_path, monkeypatch):
    """Windows reports st_ino 0 on file systems without file ids (some network shares): two existing outputs were
    then "the same file", and a second run of a folder into such a share was refused."""
    def stat_without_ids(path, *args, **kwargs):
        status = os.stat(path, *args, **kwargs)
        return types.SimpleNamespace(st_dev=status.st_dev, st_ino=0, st_mode=status.st_mode)

    monkeypatch.setattr(atomic, "os", WindowsOs(stat=stat_without_ids))
    first, second = tmp_path / "a_ct.nrrd", tmp_path / "b_ct.nrrd"
    first.write_bytes(b"1")
    second.write_bytes(b"2")
    assert atomic.file_identity(first) != atomic.file_identity(second)
    assert atomic.file_identity(first) == atomic.file_identity(tmp_path / "A_CT.nrrd")  # one name, on Windows


def test_an_earlier_series_with_read_only_files_is_removed_on_windows(tmp_path, monkeypatch):
    """A DICOM series copied from a CD keeps its files read-only; Windows refuses to delete such a file, so the
    earlier series a new one replaced stayed behind, set aside under a hidden name. It is made writable first."""
    import stat

    def windows_unlink(path):
        if not os.stat(path).st_mode & stat.S_IWRITE:
            raise PermissionError(errno.EACCES, "Access is denied", str(path))
        os.unlink(path)

    monkeypatch.setattr(atomic, "os", WindowsOs(unlink=windows_unlink))
    series = tmp_path / "old_series"
    series.mkdir()
    for name in ("IM0001.dcm", "IM0002.dcm"):
        (series / name).write_bytes(b"slice")
        (series / name).chmod(stat.S_IREAD)
    atomic._remove(series)
    assert not series.exists()


def test_a_closed_pipe_on_windows_ends_the_command_quietly(monkeypatch, capsys):
    """`xctdiff inspect film | more`, quit early: Windows reports the write to the closed pipe as EINVAL, not
    BrokenPipeError, and the command ended in a traceback; it now ends as a closed pipe does elsewhere (141)."""
    import io
    import sys

    from conftest import SAMPLE_RADIOGRAPH
    from XctDiffCore.commands import cli

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise OSError(errno.EINVAL, "Invalid argument")

        def flush(self):
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(cli, "os", WindowsOs())
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["inspect", str(SAMPLE_RADIOGRAPH)]) == 141
    monkeypatch.setattr(cli, "os", os)  # on Linux the same error is no closed pipe: raised as it is
    with pytest.raises(OSError, match="Invalid argument"):
        cli.main(["inspect", str(SAMPLE_RADIOGRAPH)])
