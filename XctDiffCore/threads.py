"""CPU thread policy for processes that share the machine (the Slicer child, folder batches). Stdlib only.

OpenMP threads that spin at barriers (the default ACTIVE wait policy) are fast on an idle machine
and ruinous beside other work: on the 2-core development CPU a reconstruction next to a busy
process ran 12x slower, and a PASSIVE policy (threads sleep instead of spinning) or one thread
fewer made it 1.7-2.7x faster there (issue 20). The policy must be in the environment before the
OpenMP runtime starts (before torch runs its first parallel region), so it is set for a child
process, or at the start of a command, never afterwards. A value the user set is kept.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional


def shared_machine_threads(cores: Optional[int] = None) -> int:
    """Threads that leave one core to the GUI (or the other work): cores - 1, at least 1."""
    cores = os.cpu_count() if cores is None else cores
    return max(1, int(cores or 1) - 1)


def shared_machine_environment(base: Mapping[str, str], cores: Optional[int] = None) -> dict:
    """``base`` with ``OMP_WAIT_POLICY=PASSIVE`` and ``OMP_NUM_THREADS`` = cores - 1, unless ``base`` sets them."""
    env = dict(base)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("OMP_NUM_THREADS", str(shared_machine_threads(cores)))
    return env


def describe_policy(env: Mapping[str, str] = os.environ) -> str:
    """How this process's OpenMP threads wait and how many there are, for benchmarks and --verbose lines."""
    wait = env.get("OMP_WAIT_POLICY", "default (active spinning)")
    threads = env.get("OMP_NUM_THREADS", f"default ({os.cpu_count()} cores)")
    return f"OMP_WAIT_POLICY={wait}, OMP_NUM_THREADS={threads}"
