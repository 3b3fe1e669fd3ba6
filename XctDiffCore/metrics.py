"""The pinned metric protocol: how a reconstructed CT is scored against its ground truth.

Every number this project reports (``xctdiff evaluate``, the README's table) is computed here, the
same way for every case, method and run:

1. **Intensity.** Both volumes are in HU on the same canonical grid (``[z, y, x]``, the model's
   output grid). The fixed window ``[-1024, 2048]`` HU (:mod:`XctDiffCore.layout`) is clipped and
   mapped linearly to ``[0, 1]``. No per-volume min-max: a case's score never depends on its own range.
2. **PSNR** (dB), data range 1, over the whole volume: ``10 log10(1 / MSE)``. A perfect match
   (MSE = 0) scores 100 dB, as in X2CT-GAN, so that tables hold finite numbers.
3. **SSIM**, scikit-image's ``structural_similarity`` in 3D with its defaults (7-voxel uniform
   window, K1 = 0.01, K2 = 0.03), ``data_range=1``, over the whole volume.
4. **Slice-averaged PSNR and SSIM** (X2CT-GAN's ``metrics_np.py``, so numbers compare with the papers
   that copy it): for each of the three axes, the 2D metric of every slice across that axis (PSNR:
   from the slice's MSE, 100 dB when it is 0; SSIM: scikit-image 2D, default window, ``data_range=1``),
   averaged over the slices; then the mean of the three axes.
5. **LPIPS** (AlexNet, v0.1 heads; :mod:`XctDiffCore.models.lpips`), slice-wise over the three axes:
   every slice as a one-channel image in ``[-1, 1]`` (``2 * window - 1``), the distance averaged over
   the slices of an axis, then over the three axes. Lower is better. Only where the local weights
   exist (``xctdiff lpips-weights``): otherwise :meth:`LPIPS.load` warns once and the column is empty.
6. **Consistency** of a reconstruction with its input (no ground truth needed): 2D SSIM (default
   window, ``data_range=1``) between the model's input radiograph in [0, 1] and the DRR of the
   reconstruction rendered and normalised the same way (see :mod:`XctDiffCore.pipeline`).
7. **Bone and lung Dice** on HU thresholds of both volumes, before any windowing: bone ``HU > 200``,
   lung ``-1000 < HU < -400``; ``2 |A n B| / (|A| + |B|)``, 1 when both masks are empty. They say
   whether ribs, spine and the lungs' shape are where they belong, which PSNR hardly sees.
8. **Lung Dice in the body**: the same lung masks, both cut to the *truth's* body (per axial slice
   the convex hull of its largest connected region above -500 HU). Why: the air around a patient is
   -1024 HU in places and just above -1000 HU in others (the scanner's reading of air), so the pinned
   lung mask counts outside air as lung (38-74 % of the "lung" of the 4 whole-chest validation CTs
   lies outside the body), and a few HU of error in that air flip it. Inside the body it measures
   the lungs.

Only numpy, torch, SciPy and scikit-image are imported (the body region: :mod:`XctDiffCore.preprocess`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .layout import HU_MAX, HU_MIN

PERFECT_PSNR_DB = 100.0  # X2CT-GAN's value for MSE = 0
BONE_HU = 200.0  # bone: above this
LUNG_HU = (-1000.0, -400.0)  # lung parenchyma: strictly between these
LPIPS_BATCH = 64  # slices per LPIPS forward pass


def window01(hu) -> np.ndarray:
    """HU -> [0, 1] with the pinned window [-1024, 2048] (clipped), float64."""
    hu = np.asarray(hu, dtype=np.float64)
    return np.clip((hu - HU_MIN) / (HU_MAX - HU_MIN), 0.0, 1.0)


def _check_pair(prediction: np.ndarray, target: np.ndarray, ndim: int) -> tuple:
    prediction, target = np.asarray(prediction, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if prediction.shape != target.shape or prediction.ndim != ndim:
        raise ValueError(f"expected two {ndim}D arrays of one shape, got {prediction.shape} and {target.shape}")
    return prediction, target


def _psnr_from_mse(mse: np.ndarray) -> np.ndarray:
    mse = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        psnr = 10.0 * np.log10(1.0 / np.where(mse > 0, mse, 1.0))
    return np.where(mse > 0, psnr, PERFECT_PSNR_DB)


def psnr(prediction01: np.ndarray, target01: np.ndarray) -> float:
    """PSNR (dB, data range 1) of two arrays in [0, 1] over all their elements; 100 dB when equal."""
    prediction01, target01 = np.asarray(prediction01, dtype=np.float64), np.asarray(target01, dtype=np.float64)
    if prediction01.shape != target01.shape:
        raise ValueError(f"shapes differ: {prediction01.shape} and {target01.shape}")
    return float(_psnr_from_mse(np.mean((prediction01 - target01) ** 2)))


def ssim_3d(prediction01: np.ndarray, target01: np.ndarray) -> float:
    """scikit-image 3D SSIM with its default 7-voxel window, ``data_range=1``."""
    from skimage.metrics import structural_similarity

    prediction01, target01 = _check_pair(prediction01, target01, 3)
    return float(structural_similarity(target01, prediction01, data_range=1.0))


def ssim_2d(prediction01: np.ndarray, target01: np.ndarray) -> float:
    """scikit-image 2D SSIM, default window, ``data_range=1`` (the consistency score)."""
    from skimage.metrics import structural_similarity

    prediction01, target01 = _check_pair(prediction01, target01, 2)
    return float(structural_similarity(target01, prediction01, data_range=1.0))


def slice_psnr(prediction01: np.ndarray, target01: np.ndarray) -> float:
    """X2CT-GAN's slice-averaged PSNR: per axis the mean PSNR of its slices, then the mean of the 3 axes."""
    prediction01, target01 = _check_pair(prediction01, target01, 3)
    se = (prediction01 - target01) ** 2
    per_axis = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        per_axis.append(float(_psnr_from_mse(se.mean(axis=others)).mean()))
    return float(np.mean(per_axis))


def slice_ssim(prediction01: np.ndarray, target01: np.ndarray) -> float:
    """X2CT-GAN's slice-averaged SSIM: per axis the mean 2D SSIM of its slices, then the mean of the 3 axes.

    scikit-image's SSIM with ``channel_axis`` is exactly the mean of the per-slice 2D SSIMs.
    """
    from skimage.metrics import structural_similarity

    prediction01, target01 = _check_pair(prediction01, target01, 3)
    per_axis = [
        structural_similarity(target01, prediction01, data_range=1.0, channel_axis=axis) for axis in range(3)
    ]
    return float(np.mean(per_axis))


@torch.no_grad()
def slice_lpips(prediction01: np.ndarray, target01: np.ndarray, lpips: torch.nn.Module, device="cpu") -> float:
    """LPIPS averaged over the slices of each axis, then over the 3 axes (slices >= 32 pixels a side)."""
    prediction01, target01 = _check_pair(prediction01, target01, 3)
    lpips = lpips.to(device)
    pred = torch.from_numpy(prediction01).float() * 2.0 - 1.0
    true = torch.from_numpy(target01).float() * 2.0 - 1.0
    per_axis = []
    for axis in range(3):
        a = pred.movedim(axis, 0).unsqueeze(1)  # (slices, 1, h, w)
        b = true.movedim(axis, 0).unsqueeze(1)
        distances = [
            lpips(x.contiguous().to(device), y.contiguous().to(device)).float().cpu()
            for x, y in zip(a.split(LPIPS_BATCH), b.split(LPIPS_BATCH))
        ]
        per_axis.append(float(torch.cat(distances).mean()))
    return float(np.mean(per_axis))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def bone_dice(prediction_hu: np.ndarray, target_hu: np.ndarray) -> float:
    """Dice of the bone masks (``HU > 200``)."""
    return dice(np.asarray(prediction_hu) > BONE_HU, np.asarray(target_hu) > BONE_HU)


def lung_mask(hu: np.ndarray) -> np.ndarray:
    hu = np.asarray(hu)
    return (hu > LUNG_HU[0]) & (hu < LUNG_HU[1])


def lung_dice(prediction_hu: np.ndarray, target_hu: np.ndarray) -> float:
    """Dice of the lung masks (``-1000 < HU < -400``)."""
    return dice(lung_mask(prediction_hu), lung_mask(target_hu))


def body_region(hu: np.ndarray) -> np.ndarray:
    """The body of a canonical ``[z, y, x]`` CT: per axial slice, the convex hull of its largest connected
    region above -500 HU (a hull, not the preprocessing's hole filling: a body cut by the volume's edge
    leaves its lungs open to the outside)."""
    from skimage.morphology import convex_hull_image

    from .preprocess import body_component

    return np.stack([convex_hull_image(axial) if axial.any() else axial for axial in body_component(hu)])


# The least extent of a whole chest's body on the prepared 2.5 mm grid, head to foot and left to right: every
# class-A chest of the shared data spans 250-320 mm and 290-320 mm; the partial ones (apex cut, a 76-98 mm slab,
# a heart crop 180 mm wide, a phantom) fall below one or the other.
WHOLE_CHEST_MM = {"head to foot": 200.0, "left to right": 240.0}


def whole_chest_problem(hu: np.ndarray, spacing_mm: float = 2.5) -> Optional[str]:
    """Why a canonical ``[z, y, x]`` CT is no whole chest (its body's extent, :func:`body_region`'s largest region,
    below :data:`WHOLE_CHEST_MM`), or None. The protocol scores whole chests: a cropped truth is mostly air where a
    reconstruction of the whole chest puts a body, and its scores say little of the model."""
    from .preprocess import body_component

    body = body_component(hu)
    extents = {"head to foot": body.any(axis=(1, 2)).sum() * spacing_mm,
               "left to right": body.any(axis=(0, 1)).sum() * spacing_mm}
    short = [f"{extents[axis]:.0f} mm {axis} (a whole chest: {least:.0f} or more)"
             for axis, least in WHOLE_CHEST_MM.items() if extents[axis] < least]
    return f"its body spans only {' and '.join(short)}" if short else None


# A scan whose voxels are coarser than this (mm, on any axis: its slice spacing as a rule), or whose slices are thicker,
# is of low resolution: every class-A chest of the shared data is 2.5 mm or finer, its class-B/C scans 4-5 mm.
# Resampled to the prepared 2.5 mm such a scan looks whole, but it is blurred head to foot: a truth that does not
# show the bone a model draws. So is one reconstructed at 2.5 mm spacing from 5 mm thick slices (DICOM Slice
# Thickness, 0018,0050): its slices overlap, and each is a 5 mm average.
LOW_RESOLUTION_MM = 3.0


def low_resolution_problem(spacing_mm, slice_thickness_mm=None) -> Optional[str]:
    """Why a scan of voxel size ``spacing_mm`` (x, y, z, mm: the source CT's own, before preprocessing) and slices
    ``slice_thickness_mm`` thick (where the source says it: DICOM; else None) is of low resolution, its voxels or its
    slices coarser than :data:`LOW_RESOLUTION_MM` (the coarser of the two decides), or None; None too when the
    voxel size is unknown (not three positive numbers, as in a datalist written before prepare kept it). The one
    rule of prepare and evaluate."""
    try:
        spacing = [float(s) for s in spacing_mm]
    except (TypeError, ValueError):
        return None
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        return None
    coarsest = max(spacing)
    try:
        thickness = float(slice_thickness_mm)
    except (TypeError, ValueError):
        thickness = 0.0
    if np.isfinite(thickness) and thickness > max(coarsest, LOW_RESOLUTION_MM):
        return f"{thickness:.1f} mm thick slices, {spacing[2]:.1f} mm apart (coarser than {LOW_RESOLUTION_MM:g} mm)"
    return f"{coarsest:.1f} mm voxels (coarser than {LOW_RESOLUTION_MM:g} mm)" if coarsest > LOW_RESOLUTION_MM else None


def lung_dice_in_body(prediction_hu: np.ndarray, target_hu: np.ndarray, body: Optional[np.ndarray] = None) -> float:
    """Dice of the lung masks inside the truth's :func:`body_region` (pass ``body`` to reuse it)."""
    body = body_region(target_hu) if body is None else body
    return dice(lung_mask(prediction_hu) & body, lung_mask(target_hu) & body)


def volume_scores(prediction_hu: np.ndarray, target_hu: np.ndarray, lpips: Optional[torch.nn.Module] = None, device="cpu",
                  body: Optional[np.ndarray] = None) -> dict:
    """Every metric of the protocol for one reconstructed CT against its truth (both in HU, one grid).

    Keys: ``psnr``, ``ssim`` (whole volume), ``psnr_slices``, ``ssim_slices`` (X2CT-GAN), ``lpips``
    (None without an LPIPS model), ``bone_dice``, ``lung_dice``, ``lung_dice_body`` (``body``: the truth's
    :func:`body_region`, when the caller scores several volumes against one truth).
    """
    pred, true = window01(prediction_hu), window01(target_hu)
    if pred.shape != true.shape or pred.ndim != 3:
        raise ValueError(f"expected two 3D volumes on one grid, got {pred.shape} and {true.shape}")
    return {
        "psnr": psnr(pred, true),
        "ssim": ssim_3d(pred, true),
        "psnr_slices": slice_psnr(pred, true),
        "ssim_slices": slice_ssim(pred, true),
        "lpips": slice_lpips(pred, true, lpips, device) if lpips is not None else None,
        "bone_dice": bone_dice(prediction_hu, target_hu),
        "lung_dice": lung_dice(prediction_hu, target_hu),
        "lung_dice_body": lung_dice_in_body(prediction_hu, target_hu, body),
    }
