"""Progress of long work on stderr: tqdm's bar on a terminal, plain lines in a log file.

Why: a bar redraws itself with carriage returns, so a cluster job's log file (or ``nohup``'s) held one very long
line of redrawn bars, which said nothing readable. Without a terminal, :func:`progress_bar` gives
:class:`ProgressLines` instead: a line now and then (every tenth of the work, and at least once a minute) with
the count done of the total and the time left at the pace so far, as the training stages' lines do
(``prepare: 12 of 40 pairs, 3 min 05 s left``).
"""
from __future__ import annotations

import sys
import time
from typing import Optional


def is_terminal(stream) -> bool:
    """Whether ``stream`` is a terminal (False for a file, a pipe, a closed or captured stream)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def time_left(seconds: float) -> str:
    """``1 h 05 min``, ``12 min 05 s`` or ``7 s``."""
    hours, rest = divmod(round(seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def left_at_pace(started: float, done: int, total: int) -> str:
    """``, 12 min 05 s left`` at the pace since ``started`` (``time.monotonic()``) with ``done`` of ``total`` done;
    nothing before the first or after the last."""
    if not 0 < done < total:
        return ""
    return f", {time_left((time.monotonic() - started) / done * (total - done))} left"


def progress_bar(total: int, desc: str, unit: str, disable: bool = False, leave: bool = True):
    """A tqdm bar on a terminal; :class:`ProgressLines` otherwise (or without tqdm); silent when ``disable``.
    Either has ``update``, ``set_postfix_str``, ``clear`` and ``close`` and is a context manager."""
    if not disable and is_terminal(sys.stderr):
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr)
        except ImportError:
            pass
    return ProgressLines(total, desc, unit, enabled=not disable)


class ProgressLines:
    """A bar's stand-in for a log file: ``DESC: DONE of TOTAL UNITs, TIME left (NOTE)`` on stderr at every tenth
    of the work and at least every ``every`` seconds, and when it is all done."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, every: float = 60.0):
        self.total, self.desc, self.unit, self.enabled, self.every = total, desc, unit, enabled, every
        self.n, self.note, self.started = 0, "", time.monotonic()
        self.last_line, self.last_tenth = self.started, 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        tenth = 10 * self.n // self.total if self.total else 10
        if tenth > self.last_tenth or self.n >= self.total or time.monotonic() - self.last_line >= self.every:
            self.last_tenth, self.last_line = tenth, time.monotonic()
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        unit = self.unit if self.total == 1 else f"{self.unit}s"
        return f"{self.desc}: {self.n} of {self.total} {unit}{left_at_pace(self.started, self.n, self.total)}" + (f" ({self.note})" if self.note else "")

    def set_postfix_str(self, note: str, refresh: Optional[bool] = None) -> None:
        self.note = note

    def clear(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "ProgressLines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
