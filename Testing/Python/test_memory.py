"""The memory policy (issue 20): which allocator the ``xctdiff`` process and the Slicer child get."""
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from XctDiffCore.memory import KEEP_TUNABLES, find_allocator, memory_environment

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and glibc tunables are Linux's")


def test_find_allocator_prefers_tcmalloc_and_finds_none_in_an_empty_folder(tmp_path):
    assert find_allocator([str(tmp_path)]) is None
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert find_allocator([str(tmp_path)]) == str(tmp_path / "libjemalloc.so.2")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert find_allocator([str(tmp_path)]) == str(tmp_path / "libtcmalloc_minimal.so.4")


@linux_only
def test_memory_environment_adds_the_policy_and_keeps_what_the_user_set():
    env = memory_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "LD_PRELOAD": "/x/libfoo.so"},
                             allocator="/usr/lib/libjemalloc.so.2")
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "LD_PRELOAD": "/usr/lib/libjemalloc.so.2 /x/libfoo.so"}
    assert memory_environment({}, allocator=None) == {"GLIBC_TUNABLES": ":".join(KEEP_TUNABLES)}
    # glibc's policy, without the tunable the user set themselves
    mine = memory_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, allocator=None)["GLIBC_TUNABLES"]
    assert mine.split(":") == ["glibc.malloc.arena_max=2"] + [t for t in KEEP_TUNABLES if "arena_max" not in t]
    theirs = {"LD_PRELOAD": "/opt/libtcmalloc.so.4", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert memory_environment(theirs, allocator="/usr/lib/libjemalloc.so.2") == theirs
    assert memory_environment({"XCTDIFF_ALLOCATOR": "system"}) == {"XCTDIFF_ALLOCATOR": "system"}


@linux_only
def test_glibcs_policy_keeps_freed_memory_for_the_next_allocation():
    """What the policy is for: a large block freed and allocated again costs no page fault under it, and
    one per page without it (glibc maps such a block on its own and hands it back on free)."""
    script = textwrap.dedent("""
        import ctypes, resource
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        size = 64 << 20
        def touch():
            block = libc.malloc(size)
            ctypes.memset(block, 1, size)
            libc.free(block)
        touch()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        touch()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    def faults(tunables):
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert faults("") > pages // 2  # the system's malloc: the block comes back as fresh pages
    assert faults(":".join(KEEP_TUNABLES)) < pages // 100


def _run_restarting(tmp_path, **extra_env) -> str:
    script = tmp_path / "restart.py"
    script.write_text(textwrap.dedent("""
        import sys
        from XctDiffCore.memory import allocator_name, reexec_with_policy
        reexec_with_policy([sys.executable, __file__])
        print(allocator_name())
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "XCTDIFF_MEMORY_POLICY",
                                                           "XCTDIFF_ALLOCATOR")}
    env.update(PYTHONPATH=str(REPO), **extra_env)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@linux_only
def test_the_process_restarts_once_with_the_policy_and_not_when_told_otherwise(tmp_path):
    expected = {"tcmalloc", "jemalloc"} if find_allocator() else {"glibc-keep"}
    assert _run_restarting(tmp_path) in expected
    assert _run_restarting(tmp_path, XCTDIFF_ALLOCATOR="system") == "system"


@linux_only
def test_the_slicer_child_starts_with_the_policy():
    from XctDiffSlicerLib.process import engine_environment  # conftest puts XctDiffSlicer/ on the path

    env = engine_environment("/opt/engine", base={})
    assert set(KEEP_TUNABLES) <= set(env["GLIBC_TUNABLES"].split(":")) or "tcmalloc" in env.get("LD_PRELOAD", "") \
        or "jemalloc" in env.get("LD_PRELOAD", "")


@linux_only
def test_the_reconstruct_command_runs_with_the_policy_and_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XCTDIFF_MEMORY_POLICY", "XCTDIFF_ALLOCATOR")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-m", "XctDiffCore", "reconstruct", str(tmp_path / "missing.png"), "-v"],
                          env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60)
    assert done.returncode == 2 and "error: file not found" in done.stderr
    runtime = next(line for line in done.stderr.splitlines() if line.startswith("runtime:"))
    assert "keeping freed memory" in runtime or "tcmalloc" in runtime or "jemalloc" in runtime
