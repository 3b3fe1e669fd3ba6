"""Shared test fixtures. Tests must pass without ../shared and without a GPU."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLES = REPO / "Resources" / "Samples"
SAMPLE_CT = SAMPLES / "LIDC-IDRI-0001_ct.nrrd"
SAMPLE_RADIOGRAPH = SAMPLES / "RG1_UNCR_chest_PA.dcm"  # DICOM CR, MONOCHROME1, 15-bit, 1955 x 1841, PixelSpacing 0\0

for folder in (REPO, REPO / "XctDiffSlicer"):  # the engine; the Slicer module's library (XctDiffSlicerLib)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder, or a clean skip where it is absent (a user's clone, CI elsewhere)."""
    if not (SHARED_DATA / "ct").is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def synthetic_chest(shape=(64, 64, 64), seed=0) -> np.ndarray:
    """A crude chest phantom in HU, canonical [z, y, x]: body ellipse, two lungs, a spine posteriorly."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    ct = np.full(shape, -1024.0, dtype=np.float32)
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    ct[body] = 40.0
    for side in (-0.45, 0.45):
        lung = ((x - side) / 0.3) ** 2 + (y / 0.45) ** 2 + (z / 0.9) ** 2 < 1
        ct[lung] = -850.0
    spine = (x / 0.12) ** 2 + ((y - 0.5) / 0.12) ** 2 < 1
    ct[spine] = 700.0
    ct += rng.normal(0, 10, shape).astype(np.float32)
    return ct.astype(np.float32)


@pytest.fixture
def chest_phantom() -> np.ndarray:
    return synthetic_chest()


@pytest.fixture(scope="module")
def drr_png(tmp_path_factory) -> Path:
    """The sample CT's DRR, written (and tagged as a DRR) by `xctdiff drr`."""
    from XctDiffCore.commands.cli import main

    path = tmp_path_factory.mktemp("drr") / "sample_drr.png"
    assert main(["drr", str(SAMPLE_CT), "-o", str(path)]) == 0
    return path


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy machine two threads spin-wait (x7 slower).
    Modules of tiny-model tests opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def require_slicer_core():
    """The MRML wheel; a missing one fails loudly (the Slicer tests must run in CI, never skip)."""
    try:
        import slicer

        slicer.vtkMRMLScene  # noqa: B018 - the real MRML, not another package named "slicer"
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"slicer-core is not installed ({exc}): pip install -r requirements-test.txt", pytrace=False)
    return slicer


@pytest.fixture(scope="module")
def slicer():
    return require_slicer_core()


@pytest.fixture(scope="module")
def bridge(slicer):
    from XctDiffSlicerLib import mrml_bridge

    return mrml_bridge


@pytest.fixture
def scene(slicer):
    return slicer.vtkMRMLScene()


def folder_state(folder) -> dict:
    """Every path below ``folder`` with its kind, bytes and modification time: what "left as it was" compares."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.is_dir(), None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def check_refused_while_held(argv, folder, job: str, capsys) -> None:
    """``xctdiff argv`` while another job holds ``folder`` (its output lock, taken here: flock conflicts between
    two open files even in one process) is refused in one line, exit 2, and leaves the folder as it was; the
    holder's lock file goes with the holder."""
    import os
    import re

    from XctDiffCore.atomic import LOCK_NAME, output_lock
    from XctDiffCore.commands.cli import main

    with output_lock(folder, job):
        before = folder_state(folder)
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(rf"error: {re.escape(str(folder))} is being written by another `{re.escape(job)}` "
                            rf"\(pid {os.getpid()} on .+, since .+\): wait for it to end or stop it, or choose "
                            r"another --out\n", err), err
        assert folder_state(folder) == before
    assert not (Path(folder) / LOCK_NAME).exists()
