"""How the process gets its memory: an allocator that keeps freed pages for the next layer. Stdlib only.

A 128³ decode allocates and frees hundreds of MiB per layer. glibc's malloc hands each of those
blocks back to the kernel on free (they are above its mmap threshold), so the next layer takes
every page again as a fresh page fault: 2.8 M faults and a third of the decoder's time on the
2-core development CPU (issue 20). Two remedies, both set before the process starts:

* tcmalloc or jemalloc through ``LD_PRELOAD`` when the system has one (Debian:
  ``libtcmalloc-minimal4`` or ``libjemalloc2``): they keep freed memory for reuse.
* otherwise glibc's own tunables (:data:`KEEP_TUNABLES`): no block is mapped on its own
  (``mmap_max=0``), the heap is never trimmed, one arena, no fast bins; so freed blocks stay in
  the heap and are reused, like tcmalloc's. Measured 2026-12-04 with ``xctdiff benchmark pipeline
  --method direct`` on the bundled model (bf16, 2-core EPYC): decoder 1.42 s -> 0.72 s, the whole
  reconstruction 2.08 s -> 1.35-1.52 s, peak RSS 0.9-1.0 GiB either way, no page fault after the
  first run; the price is memory kept until the process ends (the diffusion path's peak RSS 0.95 ->
  1.0-1.1 GiB, 1.6-1.7 GiB before the codebook search reused its distance block).
  The huge-page tunable used before (``glibc.malloc.hugetlb=1``) had made the same decode 1.8x
  faster on a fresh host, but on a host whose memory was fragmented the kernel spent 5 s of system
  time compacting for it and the decode got slower than with no policy at all.

The ``xctdiff`` command re-executes itself once with this environment (:func:`reexec_with_policy`)
and the Slicer module starts its engine process with it; nothing changes for a process that cannot
use it, and ``XCTDIFF_ALLOCATOR=system`` turns it off.
"""
from __future__ import annotations

import glob
import os
import sys
from typing import Iterable, Mapping, Optional, Sequence

#: Preferred first; the file names of the Debian/Ubuntu/Fedora packages.
ALLOCATOR_LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
#: glibc malloc that keeps what it frees (see above); the first is the marker :func:`allocator_name` looks for.
KEEP_TUNABLES = ("glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={2**40}", "glibc.malloc.arena_max=1",
                 "glibc.malloc.mxfast=0")
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"  # recognised when a user sets it; no longer the policy
OPT_OUT = "XCTDIFF_ALLOCATOR"  # "system": leave the process's allocator alone
_APPLIED = "XCTDIFF_MEMORY_POLICY"  # set by the re-execution, so that it happens once


def library_folders(env: Mapping[str, str] = os.environ) -> list:
    """Where shared libraries of the system (and of an active conda environment) live."""
    folders = [os.path.join(env["CONDA_PREFIX"], "lib")] if env.get("CONDA_PREFIX") else []
    folders += sorted(glob.glob("/usr/lib/*-linux-gnu")) + sorted(glob.glob("/lib/*-linux-gnu"))
    return folders + ["/usr/lib64", "/usr/lib", "/usr/local/lib", "/lib64"]


def find_allocator(folders: Optional[Iterable[str]] = None) -> Optional[str]:
    """The path of the first tcmalloc/jemalloc library found, or None."""
    folders = library_folders() if folders is None else list(folders)
    for name in ALLOCATOR_LIBRARIES:
        for folder in folders:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def _preloaded_allocator(env: Mapping[str, str]) -> Optional[str]:
    for entry in env.get("LD_PRELOAD", "").replace(":", " ").split():
        if any(key in os.path.basename(entry) for key in ("tcmalloc", "jemalloc")):
            return entry
    return None


def memory_environment(base: Mapping[str, str], allocator: Optional[str] = "find") -> dict:
    """``base`` plus the memory policy: ``LD_PRELOAD`` of ``allocator`` (by default the one
    :func:`find_allocator` finds) when there is one, else glibc's :data:`KEEP_TUNABLES`.
    What ``base`` already sets (a preloaded allocator, a value of any of those tunables) is kept;
    ``XCTDIFF_ALLOCATOR=system`` returns ``base`` unchanged."""
    env = dict(base)
    if not sys.platform.startswith("linux") or env.get(OPT_OUT, "").lower() == "system":
        return env
    if _preloaded_allocator(env):
        return env
    allocator = find_allocator() if allocator == "find" else allocator
    if allocator:
        env["LD_PRELOAD"] = " ".join(p for p in (allocator, env.get("LD_PRELOAD", "")) if p)
        return env
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    theirs = {t.split("=")[0] for t in tunables}
    env["GLIBC_TUNABLES"] = ":".join(tunables + [t for t in KEEP_TUNABLES if t.split("=")[0] not in theirs])
    return env


def reexec_with_policy(argv: Optional[Sequence[str]] = None) -> None:
    """Restart this Python process once with :func:`memory_environment` (before torch is imported:
    the dynamic loader and glibc read these variables only at start). Returns when there is nothing to
    change or the restart cannot be made."""
    if os.environ.get(_APPLIED):
        return
    env = memory_environment(os.environ)
    if env == dict(os.environ):
        return
    env[_APPLIED] = "1"
    argv = list(getattr(sys, "orig_argv", []) if argv is None else argv)
    if not argv:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)
    except OSError:  # no exec here (a sandbox, an odd interpreter): run with the allocator it has
        return


def transparent_huge_pages() -> str:
    """The kernel's THP mode (always, madvise, never), or 'unknown'."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unknown"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unknown"


def _mapped_allocator() -> Optional[str]:
    try:
        with open("/proc/self/maps") as f:
            mapped = [line.split()[-1] for line in f if "tcmalloc" in line or "jemalloc" in line]
    except OSError:
        return None
    return mapped[0] if mapped else None


def allocator_name() -> str:
    """This process's allocator as it is: tcmalloc or jemalloc (found mapped in the process),
    glibc-keep (glibc malloc started with :data:`KEEP_TUNABLES`), glibc-hugetlb (with the huge-page
    tunable) or system."""
    library = _mapped_allocator()
    if library:
        return "tcmalloc" if "tcmalloc" in library else "jemalloc"
    tunables = os.environ.get("GLIBC_TUNABLES", "").split(":")
    if KEEP_TUNABLES[0] in tunables:
        return "glibc-keep"
    if HUGE_PAGES_TUNABLE in tunables:
        return "glibc-hugetlb"
    return "system"


def describe_allocator() -> str:
    """:func:`allocator_name` in words, for ``--verbose``."""
    name = allocator_name()
    if name in ("tcmalloc", "jemalloc"):
        return f"{name} ({_mapped_allocator()})"
    if name == "glibc-keep":
        return f"glibc malloc keeping freed memory for reuse ({':'.join(KEEP_TUNABLES)})"
    if name == "glibc-hugetlb":
        return (f"glibc malloc with huge pages ({HUGE_PAGES_TUNABLE}; the kernel's transparent huge pages: "
                f"{transparent_huge_pages()})")
    return "the system's malloc" + (f" ({OPT_OUT}=system)" if os.environ.get(OPT_OUT, "").lower() == "system" else "")
