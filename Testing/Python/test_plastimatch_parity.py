"""Our cone-beam DRR against an independent renderer: Plastimatch's ``drr`` (the tool X2CT-GAN used).

Plastimatch's conventions, minded here:

* geometry: ``--sad``/``--sid`` in mm, ``-z`` detector size (mm), ``-r`` pixels, ``-o`` isocentre in
  DICOM (LPS) mm, ``--nrm`` the detector normal pointing to the source (posterior: ``0 1 0``),
  ``--vup`` the panel's up (superior: ``0 0 1``);
* orientation: with that normal its column 0 is the patient's *left* (a beam's-eye view from the
  source), rows run head to feet; our radiologist's view is its mirror image;
* output ``-t pfm``: float32, top row first, little-endian when the scale is negative;
* values: sum of ``mu * length`` with ``mu = 0.022 * (1 + HU/1000)`` per mm above -800 HU (0 below),
  divided by 10 (cm); ``-P none`` uses the input voxels as ``mu`` unchanged.
"""
from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SAMPLE_CT, synthetic_chest

from XctDiffCore.drr import ConeGeometry, hu_to_attenuation, render_drr
from XctDiffCore.io import read_ct, write_volume
from XctDiffCore.volume import Volume

pytest.importorskip("plastimatch", reason="the plastimatch wheel is not installed")

LOG = logging.getLogger(__name__)
SIZE = 128
PANEL_PIXELS = 320  # X2CT-GAN's panel, resized to the model's input as they did


def plastimatch_drr(volume_path, workdir, volume: Volume, geometry: ConeGeometry, extra=()) -> np.ndarray:
    """Plastimatch's PA DRR of the file at ``volume_path``, resized to SIZE, in our display orientation."""
    half_extent = np.array(volume.spacing) * (np.array(volume.shape[::-1]) - 1) / 2  # (x, y, z) mm
    centre = np.array(volume.origin) + volume.direction @ half_extent
    panel = f"{PANEL_PIXELS} {PANEL_PIXELS}"
    side = f"{geometry.detector_size_mm} {geometry.detector_size_mm}"
    args = [
        "drr", "-t", "pfm", "--sad", str(geometry.source_to_isocenter_mm), "--sid", str(geometry.source_to_detector_mm),
        "-r", panel, "-z", side, "--nrm", "0 1 0", "--vup", "0 0 1", "-o", " ".join(f"{c:.4f}" for c in centre),
        "-O", str(workdir / "pm_"), *extra, str(volume_path),
    ]
    launcher = "import sys; from plastimatch import plastimatch; plastimatch()"
    result = subprocess.run([sys.executable, "-c", launcher, *args], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    image = read_pfm(workdir / "pm_0000.pfm")[:, ::-1]  # beam's-eye view -> radiologist's view
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    return torch.nn.functional.interpolate(tensor, size=(SIZE, SIZE), mode="bilinear", antialias=True)[0, 0].numpy()


def read_pfm(path) -> np.ndarray:
    header, dims, scale, data = path.read_bytes().split(b"\n", 3)
    assert header == b"Pf", "expected a grey-level PFM"
    width, height = (int(v) for v in dims.split())
    dtype = "<f4" if float(scale) < 0 else ">f4"
    return np.frombuffer(data[: width * height * 4], dtype=dtype).reshape(height, width).astype(np.float32)


def correlation(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_sample_ct_with_plastimatch_hu_conversion(tmp_path):
    volume = read_ct(SAMPLE_CT)
    geometry = ConeGeometry()
    theirs = plastimatch_drr(SAMPLE_CT, tmp_path, volume, geometry, extra=("-i", "uniform"))
    ours = render_drr(volume, geometry, size=SIZE)[0, 0].numpy()
    r, r_mirrored = correlation(ours, theirs), correlation(ours, theirs[:, ::-1])
    LOG.warning("plastimatch parity, sample CT (its own HU conversion): Pearson r = %.4f (mirrored %.4f)",
                r, r_mirrored)
    assert r >= 0.98
    assert r > r_mirrored + 0.05  # the orientation matters, not only the shape


def test_phantom_attenuation_map_same_physics(tmp_path):
    # An asymmetric phantom off the origin: a dense block in the patient's upper left.
    ct = synthetic_chest((64, 64, 64))
    ct[44:52, 10:40, 46:54] = 1200.0
    volume = Volume(ct, spacing=(2.5, 2.5, 2.5), origin=(-90.0, 30.0, 410.0))
    mu = Volume(hu_to_attenuation(torch.from_numpy(ct)).numpy(), volume.spacing, volume.origin)
    path = write_volume(mu, tmp_path / "mu.mha")
    geometry = ConeGeometry()
    theirs = plastimatch_drr(path, tmp_path, volume, geometry, extra=("-P", "none", "-i", "exact"))
    ours = render_drr(volume, geometry, size=SIZE)[0, 0].numpy()
    r = correlation(ours, theirs)
    LOG.warning("plastimatch parity, phantom (same attenuation map): Pearson r = %.5f", r)
    assert r >= 0.98
    # Same physics, same units once Plastimatch's division by 10 (mm -> cm) is undone.
    assert ours.sum() == pytest.approx(10.0 * theirs.sum(), rel=0.02)
    # The block lands in the same place: upper half, image right (patient's left).
    for image in (ours, theirs):
        rows, cols = np.unravel_index(np.argsort(image, axis=None)[-20:], image.shape)
        assert rows.max() < SIZE // 2 and cols.min() > SIZE // 2
