"""The chest's front-to-back (AP) diameter: what a frontal film does not say, when the user knows it.

A frontal film fixes the chest's outline in its own plane, not how deep the chest is: a model can only
reconstruct about the typical depth of the chests it learnt from, and on an unseen patient the direct path's
body is shrunk towards the training patients' average depth (Docs/RESULTS.md, "How deep is the chest?").
Where the diameter is known (a caliper, a lateral film, an earlier CT), the reconstruction is stretched
along AP about the body's centre until its own diameter, measured the same way, is that one.

The measure (:func:`measure_ap_diameter`): the largest connected region above :data:`BODY_HU` (the
patient, without the table), at mid-chest (the middle :data:`ROWS` rows, 75 mm) on the midline (the
middle :data:`COLUMNS` columns, 50 mm): the median over those lines of the distance from the first to the
last body voxel front to back, sternum to the skin over the spine. :func:`ct_ap_diameter` measures an
earlier CT of the patient the same way, on the engine's prepared grid (``xctdiff inspect CT`` prints it). Torch-free.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

BODY_HU = -400.0  # halfway between air and soft tissue: the skin of a blurred reconstruction as of a CT
ROWS = 30  # mid-chest: the middle 30 rows (75 mm at 2.5 mm)
COLUMNS = 20  # the midline: the middle 20 columns (50 mm)


def measure_ap_diameter(ct_hu: np.ndarray, spacing_mm: float) -> Optional[tuple]:
    """``(diameter_mm, centre)`` of a canonical ``[z, y, x]`` CT (centre: a fractional index along y), or None
    where no body crosses the mid-chest midline."""
    from .preprocess import body_component  # the table left out as the preprocessing leaves it out

    z, _, x = ct_hu.shape
    rows = slice(max(0, z // 2 - ROWS // 2), z // 2 + ROWS // 2)
    columns = slice(max(0, x // 2 - COLUMNS // 2), x // 2 + COLUMNS // 2)
    body = body_component(ct_hu, BODY_HU)[rows, :, columns]
    lines = body.any(axis=1)
    if not lines.any():
        return None
    first = np.argmax(body, axis=1)[lines]
    last = body.shape[1] - 1 - np.argmax(body[:, ::-1, :], axis=1)[lines]
    return float(np.median(last - first + 1)) * spacing_mm, float(np.median((first + last) / 2.0))


def stretch_ap(ct_hu: np.ndarray, factor: float, centre: float) -> np.ndarray:
    """The CT scaled along y (front to back) by ``factor`` about index ``centre`` (linear interpolation; what
    comes from beyond the volume repeats its first or last plane, air around a chest)."""
    n = ct_hu.shape[1]
    source = np.clip(centre + (np.arange(n) - centre) / factor, 0.0, n - 1.0)
    below = np.minimum(np.floor(source).astype(np.int64), n - 2)
    weight = (source - below).astype(ct_hu.dtype)[None, :, None]
    return ct_hu[:, below, :] * (1 - weight) + ct_hu[:, below + 1, :] * weight


def fit_ap_diameter(ct_hu: np.ndarray, diameter_mm: float, spacing_mm: float, rounds: int = 3) -> tuple:
    """``(ct, measured_mm)``: the CT stretched to ``diameter_mm`` and its own diameter before (None, and the CT
    unchanged, where it has no body to measure). The stretch moves the body's edges by whole voxels and can
    join or part the body and the table, so the factor is corrected from the result's own measure (``rounds``
    times at most; each round resamples the original, once, and measures the result)."""
    measured = measure_ap_diameter(ct_hu, spacing_mm)
    if measured is None:
        return ct_hu, None
    before, centre = measured
    factor, now, stretched = 1.0, before, ct_hu
    for _ in range(rounds):
        if abs(now - diameter_mm) < spacing_mm:
            break
        factor *= diameter_mm / now
        stretched = stretch_ap(ct_hu, factor, centre)
        remeasured = measure_ap_diameter(stretched, spacing_mm)
        if remeasured is None:
            break
        now = remeasured[0]
    return stretched, before


def ct_ap_diameter(volume) -> float:
    """The AP diameter (mm, whole) of a CT as read (:class:`~XctDiffCore.volume.Volume`), on the engine's prepared
    grid (2.5 mm, lung-centred): the number to give ``--ap-diameter`` when an earlier CT of the patient is at hand.
    A one-sentence :class:`~XctDiffCore.errors.XctDiffError` where it is a single slice, the preprocessing refuses it,
    no body crosses the mid-chest midline, or the diameter is not a chest's (outside
    :data:`~XctDiffCore.options.AP_DIAMETER_MM`)."""
    from .errors import XctDiffError
    from .options import AP_DIAMETER_MM
    from .preprocess import preprocess_ct

    if min(volume.shape) < 2:
        raise XctDiffError("a single-slice image (a radiograph?), not a CT volume to measure")
    prepared = preprocess_ct(volume)
    measured = measure_ap_diameter(prepared.array.astype(np.float32), float(prepared.spacing[0]))
    if measured is None:
        raise XctDiffError("no body crosses the mid-chest midline, so no AP diameter can be measured")
    diameter, (low, high) = float(round(measured[0])), AP_DIAMETER_MM
    if not low <= diameter <= high:
        raise XctDiffError(f"the AP diameter measures {diameter:.0f} mm, outside a chest's {low:g}-{high:g} mm")
    return diameter
