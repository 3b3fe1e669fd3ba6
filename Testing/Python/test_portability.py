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
import types

import pytest

import XctDiffCore.atomic as atomic


class WindowsOs(types.SimpleNamespace):
    """``os`` as a module sees it on Windows: ``name == "nt"``, the POSIX-only functions listed in ``missing``
    absent, anything given as a keyword replaced; the rest is Linux's own."""

    def __init__(self, missing=(), **replaced):
        super().__init__(name="nt", **replaced)
        self._missing = set(missing)

    def __getattr__(self, name):
        if name in self._missing:
            raise AttributeError(f"module 'os' has no attribute {name!r}")
        return getattr(os, name)


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
