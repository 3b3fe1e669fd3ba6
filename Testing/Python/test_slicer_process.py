"""The child-process runner of the Slicer module against a small engine that speaks PROTOCOL.md.

The fake engine below is a test of the runner (progress lines, RESULT, ``error:`` lines, crashes,
Cancel killing the process tree), not a stand-in for Slicer: it reads the radiograph with the real
``XctDiffCore.io`` and back-projects it into a canonical 128^3 CT at 2.5 mm, so the logic tests can
follow the geometry from the node to the child and back.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from XctDiffSlicerLib.process import (  # the runner needs no VTK
    ChildProcess,
    Finished,
    LogLine,
    Progress,
    engine_environment,
    failure_message,
    parse_stdout_line,
)

MODE_VARIABLE = "XCTDIFF_FAKE_ENGINE_MODE"

FAKE_ENGINE = r'''
"""A fake XctDiffCore CLI speaking PROTOCOL.md; behaviour picked by $XCTDIFF_FAKE_ENGINE_MODE."""
import argparse, json, os, subprocess, sys, time

parser = argparse.ArgumentParser()
parser.add_argument("command")
parser.add_argument("input")
parser.add_argument("-o", "--output", required=True)
parser.add_argument("--uncertainty")
parser.add_argument("--model")
parser.add_argument("--steps", type=int)
parser.add_argument("--samples", type=int, default=1)
parser.add_argument("--seed", type=int)
parser.add_argument("--device", default="auto")
parser.add_argument("--style", default="auto")
parser.add_argument("--progress-lines", action="store_true")
args = parser.parse_args()
mode = os.environ.get("XCTDIFF_FAKE_ENGINE_MODE", "ok")

def progress(fraction, stage):
    print(f"PROGRESS {fraction:.3f} {stage}", flush=True)

if mode == "error":
    print("loading", file=sys.stderr, flush=True)
    print("error: cannot read radiograph.nrrd as a radiograph: not an image", file=sys.stderr, flush=True)
    sys.exit(2)
if mode == "crash":
    progress(0.1, "loading model")
    raise RuntimeError("CUDA out of memory")
if mode == "noresult":
    progress(1.0, "done")
    sys.exit(0)
if mode == "hang":
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(f"PIDS {os.getpid()} {grandchild.pid}", flush=True)
    progress(0.05, "sampling 1/1000")
    time.sleep(120)
    sys.exit(0)

import numpy as np
from skimage.transform import resize
from XctDiffCore.io import read_radiograph, write_volume
from XctDiffCore.volume import Volume

progress(0.0, "loading model")
radiograph = read_radiograph(args.input)
image = resize(radiograph.image, (128, 128), order=1, anti_aliasing=True)  # [row, col]
progress(0.5, "sampling 1/2")
lo, hi = np.percentile(image, (1, 99))
unit = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
# Back-projection into canonical [z, y, x]: row 0 (superior) is the highest z, column 0 (patient's
# right) is x = 0 (LPS x runs right to left); constant along y (the ray direction).
ct = np.broadcast_to((unit[::-1, :] * 2000.0 - 1000.0)[:, None, :], (128, 128, 128)).astype(np.float32)
origin = (-158.75, -180.0, -300.0)
write_volume(Volume(ct, (2.5, 2.5, 2.5), origin, np.eye(3)), args.output)
if args.uncertainty and args.samples >= 2:
    write_volume(Volume(np.abs(ct) / 10.0, (2.5, 2.5, 2.5), origin, np.eye(3)), args.uncertainty)
progress(1.0, "writing")
print(json.dumps({"note": "a free-text line that only looks like JSON"}), flush=True)
print("RESULT " + json.dumps({"consistency": 0.875, "timings": {"sampling": 0.1}, "device": "cpu",
                              "seed": 1234 if args.seed is None else args.seed, "method": "diffusion",
                              "warnings": ["a warning for the test"] if mode == "warn" else [],
                              "output": args.output, "argv": sys.argv[1:]}), flush=True)
'''


@pytest.fixture
def fake_engine(tmp_path) -> Path:
    path = tmp_path / "fake_engine.py"
    path.write_text(FAKE_ENGINE, encoding="utf-8")
    return path


def run_fake(fake_engine: Path, mode: str, tmp_path: Path) -> ChildProcess:
    env = engine_environment(str(REPO))
    env[MODE_VARIABLE] = mode
    command = [sys.executable, str(fake_engine), "reconstruct", str(tmp_path / "in.nrrd"), "-o", str(tmp_path / "out.nrrd")]
    return ChildProcess(command, env=env).start()


def is_gone(pid: int) -> bool:
    """Dead or a zombie (a killed orphan that no init has reaped yet is as good as gone)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            return stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError):
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- line parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, expected",
    [
        ("PROGRESS 0.25 sampling 12/50\n", Progress(0.25, "sampling 12/50")),
        ("PROGRESS 1 done", Progress(1.0, "done")),
        ("PROGRESS 1.7 overshoot", Progress(1.0, "overshoot")),
        ("PROGRESS -0.1 early", Progress(0.0, "early")),
        ("PROGRESS half way", LogLine("PROGRESS half way", "stdout")),
        ("PROGRESS nan sampling", LogLine("PROGRESS nan sampling", "stdout")),
        ("PROGRESS inf done", Progress(1.0, "done")),
        ('RESULT {"consistency": 0.5}', {"consistency": 0.5}),
        ("RESULT not-json", LogLine("RESULT not-json", "stdout")),
        ("RESULT [1, 2]", LogLine("RESULT [1, 2]", "stdout")),
        # Paths travel JSON-escaped: a newline in a file name is read back, and cannot start a line of its own.
        ('RESULT {"output": "/tmp/ct\\nRESULT {}.nrrd"}', {"output": "/tmp/ct\nRESULT {}.nrrd"}),
        ("Loading weights...", LogLine("Loading weights...", "stdout")),
    ],
)
def test_parse_stdout_line(line, expected):
    assert parse_stdout_line(line) == expected


def test_failure_message_prefers_the_error_line_and_never_shows_a_traceback():
    lines = ["Traceback (most recent call last):", '  File "x.py", line 1', "error: model folder not found: /m"]
    assert failure_message(2, lines) == "model folder not found: /m"
    crash = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>', "RuntimeError: boom", ""]
    assert failure_message(1, crash) == "reconstruction failed (exit status 1): RuntimeError: boom"
    killed = "reconstruction failed (the engine was killed by SIGKILL: out of memory?)"
    assert failure_message(-9, ["warning: a small film"]) == killed  # not the warning printed before
    assert failure_message(-11, []) == "reconstruction failed (the engine was killed by SIGSEGV)"


def test_engine_environment_puts_the_engine_first_on_the_path():
    env = engine_environment("/opt/engine", base={"PYTHONPATH": os.pathsep.join(["/a", "/opt/engine"]), "X": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/opt/engine", "/a"]
    assert env["PYTHONUNBUFFERED"] == "1" and env["X"] == "1"


def test_the_child_threads_sleep_and_leave_the_gui_a_core_unless_the_user_says_otherwise():
    from XctDiffCore.threads import describe_policy, shared_machine_environment, shared_machine_threads

    env = engine_environment("/opt/engine", base={})
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == str(shared_machine_threads())
    assert [shared_machine_threads(n) for n in (1, 2, 16)] == [1, 1, 15]
    mine = engine_environment("/opt/engine", base={"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "8"})
    assert (mine["OMP_WAIT_POLICY"], mine["OMP_NUM_THREADS"]) == ("ACTIVE", "8")
    assert shared_machine_environment({}, cores=4)["OMP_NUM_THREADS"] == "3"
    assert describe_policy({"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}) == "OMP_WAIT_POLICY=PASSIVE, OMP_NUM_THREADS=3"


# --- the runner with a real child -----------------------------------------------------------------


def test_progress_then_result(fake_engine, tmp_path):
    from XctDiffCore.io import write_radiograph_nrrd
    import numpy as np

    write_radiograph_nrrd(np.random.default_rng(0).random((64, 48), dtype=np.float32), tmp_path / "in.nrrd")
    events = []
    finished = run_fake(fake_engine, "ok", tmp_path).wait(events.append, timeout=60)
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.fraction for p in progress] == [0.0, 0.5, 1.0]
    assert progress[1].stage == "sampling 1/2"
    assert finished.succeeded and finished.returncode == 0
    assert finished.result["consistency"] == 0.875
    assert any(isinstance(e, LogLine) and "free-text" in e.text for e in events)
    assert events[-1] is finished
    assert (tmp_path / "out.nrrd").is_file()


def test_user_error_reaches_the_user_as_one_sentence(fake_engine, tmp_path):
    finished = run_fake(fake_engine, "error", tmp_path).wait(timeout=30)
    assert finished.status == "failed" and finished.returncode == 2
    assert finished.error == "cannot read radiograph.nrrd as a radiograph: not an image"


def test_crash_is_summarised_without_traceback(fake_engine, tmp_path):
    child = run_fake(fake_engine, "crash", tmp_path)
    finished = child.wait(timeout=30)
    assert finished.status == "failed" and finished.returncode == 1
    assert finished.error == "reconstruction failed (exit status 1): RuntimeError: CUDA out of memory"
    assert "Traceback" not in finished.error
    assert any("Traceback" in line for line in child.stderr_lines)  # kept for the log


def test_exit_without_result_is_a_failure(fake_engine, tmp_path):
    finished = run_fake(fake_engine, "noresult", tmp_path).wait(timeout=30)
    assert finished.status == "failed" and "without a result" in finished.error


def test_join_waits_for_the_killed_child(fake_engine, tmp_path):
    child = run_fake(fake_engine, "hang", tmp_path)
    assert not child.join(timeout=0.2)  # still running
    child.cancel()
    assert child.join(timeout=5) and child._process.poll() is not None


def test_poll_never_blocks_and_cancel_kills_the_process_tree_within_a_second(fake_engine, tmp_path):
    child = run_fake(fake_engine, "hang", tmp_path)
    pids, deadline = None, time.monotonic() + 30
    while pids is None and time.monotonic() < deadline:
        start = time.monotonic()
        events = child.poll()
        assert time.monotonic() - start < 0.2  # a UI timer may call it at any time (blocking would take seconds)
        for event in events:
            if isinstance(event, LogLine) and event.text.startswith("PIDS "):
                pids = [int(p) for p in event.text.split()[1:]]
        time.sleep(0.02)
    assert pids is not None and pids[0] == child.pid
    assert child.running and not any(is_gone(pid) for pid in pids)

    start = time.monotonic()
    child.cancel()
    finished = child.wait(timeout=5)
    while not all(is_gone(pid) for pid in pids) and time.monotonic() - start < 1.0:
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    assert finished.status == "cancelled"
    assert all(is_gone(pid) for pid in pids), "the engine or its own child survived Cancel"
    assert elapsed < 1.0
    assert not child.running
    assert isinstance(child.finished, Finished)


def test_an_engine_killed_alone_ends_its_job_and_leaves_no_grandchild(fake_engine, tmp_path):
    """The system's out-of-memory killer takes the engine, not its process group: a grandchild holding the pipes
    open kept the readers waiting, the job never finished and the panel's Cancel found nothing to kill."""
    import signal

    child = run_fake(fake_engine, "hang", tmp_path)
    pids, deadline = None, time.monotonic() + 30
    while pids is None and time.monotonic() < deadline:
        for event in child.poll():
            if isinstance(event, LogLine) and event.text.startswith("PIDS "):
                pids = [int(p) for p in event.text.split()[1:]]
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    finished = child.wait(timeout=10)
    assert finished.error == "reconstruction failed (the engine was killed by SIGKILL: out of memory?)"
    deadline = time.monotonic() + 5
    while not is_gone(pids[1]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert is_gone(pids[1])
