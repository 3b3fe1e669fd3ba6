"""Run the engine in a child process that speaks PROTOCOL.md, without ever blocking Slicer's UI.

Two reader threads turn the child's stdout and stderr into events on a queue; the UI drains it with
:meth:`ChildProcess.poll` from a timer, a console script with :meth:`ChildProcess.wait`. Cancel kills
the child's whole process group at once, so GPU memory is freed immediately. A failed child becomes
one readable sentence (its ``error: ...`` line), never a traceback.
"""
from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

# Exit status of a user-facing error (XctDiffError) in the engine's CLI.
USER_ERROR_STATUS = 2
STDERR_LINES_KEPT = 200


@dataclass(frozen=True)
class Progress:
    """``PROGRESS <fraction> <stage words>``."""

    fraction: float
    stage: str


@dataclass(frozen=True)
class LogLine:
    """Any other line, from ``stream`` "stdout" or "stderr"."""

    text: str
    stream: str


@dataclass(frozen=True)
class Finished:
    """The last event of a run. ``status``: "succeeded", "failed" or "cancelled"."""

    status: str
    returncode: Optional[int]
    result: dict = field(default_factory=dict)
    error: str = ""

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


Event = Union[Progress, LogLine, Finished]


def parse_stdout_line(line: str) -> Union[Progress, dict, LogLine]:
    """One stdout line: a :class:`Progress`, the ``RESULT`` dict, or free text as a :class:`LogLine`."""
    text = line.rstrip("\r\n")
    keyword, _, rest = text.partition(" ")
    if keyword == "PROGRESS":
        number, _, stage = rest.partition(" ")
        try:
            fraction = float(number)
        except ValueError:
            return LogLine(text, "stdout")
        if math.isnan(fraction):  # no place on a progress bar (the panel's int() of it raised, events lost)
            return LogLine(text, "stdout")
        return Progress(min(max(fraction, 0.0), 1.0), stage.strip())
    if keyword == "RESULT":
        try:
            result = json.loads(rest)
        except json.JSONDecodeError:
            return LogLine(text, "stdout")
        if isinstance(result, dict):
            return result
    return LogLine(text, "stdout")


def failure_message(returncode: int, stderr_lines: Sequence[str]) -> str:
    """A user error's own sentence, for a crash its exit status and the last line of stderr, for a kill its signal."""
    for line in reversed(stderr_lines):
        if line.startswith("error: "):
            return line[len("error: "):].strip()
    if returncode < 0:  # ended by a signal (POSIX): the last stderr line, a warning printed before, is not why
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        guess = ": out of memory?" if -returncode == getattr(signal, "SIGKILL", 9) else ""
        return f"reconstruction failed (the engine was killed by {name}{guess})"
    last = next((line.strip() for line in reversed(stderr_lines) if line.strip()), "")
    message = f"reconstruction failed (exit status {returncode})"
    return f"{message}: {last}" if last else message


class ChildProcess:
    """One child process: start, poll or wait for its events, cancel (kill its process tree)."""

    def __init__(self, command: Sequence[str], env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None):
        self.command = [str(part) for part in command]
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stderr_lines: deque = deque(maxlen=STDERR_LINES_KEPT)
        self.finished: Optional[Finished] = None
        self._events: queue.Queue = queue.Queue()
        self._process: Optional[subprocess.Popen] = None
        self._result: Optional[dict] = None
        self._cancelled = False
        self._readers: list = []

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "ChildProcess":
        # A new process group / session: Cancel can then kill the child and everything it started. On Windows also
        # no console window: Slicer is a GUI program, so each console child (python, the PythonSlicer launcher)
        # would otherwise open a black window of its own for as long as it runs.
        group = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
                 if os.name == "nt" else {"start_new_session": True})
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            env=self.env,
            cwd=self.cwd,
            **group,
        )
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        threading.Thread(target=self._wait_for_exit, daemon=True).start()
        return self

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self.finished is None and self._process.poll() is None

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until the child has exited (after :meth:`cancel`: at once); True when it has."""
        if self._process is None:
            return True
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def cancel(self) -> None:
        """Kill the child's whole process group now (SIGKILL; ``taskkill /T /F`` on Windows)."""
        if self._process is None or self._process.poll() is not None:
            return
        self._cancelled = True
        if os.name == "nt":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(self._process.pid)], capture_output=True,
                           creationflags=subprocess.CREATE_NO_WINDOW)
        else:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- events --------------------------------------------------------------------------------

    def poll(self) -> list:
        """All events that arrived since the last call, without waiting (for a UI timer)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def wait(self, on_event: Optional[Callable[[Event], None]] = None, timeout: Optional[float] = None) -> Finished:
        """Block until the child ends (the console path), handing each event to ``on_event``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                event = self._events.get(timeout=remaining)
            except queue.Empty:
                self.cancel()
                raise TimeoutError(f"child process still running after {timeout} s; cancelled")
            if on_event is not None:
                on_event(event)
            if isinstance(event, Finished):
                return event

    # -- reader threads ------------------------------------------------------------------------

    def _read_stdout(self) -> None:
        for line in self._process.stdout:
            parsed = parse_stdout_line(line)
            if isinstance(parsed, dict):
                self._result = parsed
            else:
                self._events.put(parsed)

    def _read_stderr(self) -> None:
        for line in self._process.stderr:
            text = line.rstrip("\r\n")
            self.stderr_lines.append(text)
            self._events.put(LogLine(text, "stderr"))

    def _wait_for_exit(self) -> None:
        returncode = self._process.wait()
        if os.name != "nt":  # what it left in its group (a grandchild holding its pipes open) would hang the readers
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except OSError:  # nothing left: the usual case
                pass
        for reader in self._readers:
            reader.join()
        if self._cancelled:
            finished = Finished("cancelled", returncode, error="cancelled")
        elif returncode == 0 and self._result is not None:
            finished = Finished("succeeded", returncode, result=self._result)
        elif returncode == 0:
            finished = Finished("failed", returncode, error="the reconstruction ended without a result")
        else:
            finished = Finished("failed", returncode, error=failure_message(returncode, list(self.stderr_lines)))
        self.finished = finished
        self._events.put(finished)


def python_executable() -> str:
    """The Python that runs the engine: Slicer's ``PythonSlicer`` launcher inside Slicer, else this one."""
    import shutil

    return shutil.which("PythonSlicer") or sys.executable


def engine_environment(core_parent: str, base: Optional[Mapping[str, str]] = None) -> dict:
    """The child's environment: ``core_parent`` (the folder holding ``XctDiffCore``) first on PYTHONPATH, and
    OpenMP threads that sleep instead of spinning and leave Slicer's GUI a core (:mod:`XctDiffCore.threads`),
    and an allocator that keeps its pages (:mod:`XctDiffCore.memory`)."""
    from XctDiffCore.memory import memory_environment
    from XctDiffCore.threads import shared_machine_environment

    env = memory_environment(shared_machine_environment(os.environ if base is None else base))
    paths = [core_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != core_parent]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env
