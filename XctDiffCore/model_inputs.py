"""A CT and a radiograph as the models' input tensors: one definition for training, evaluation and inference.

The layout and the HU window are :mod:`XctDiffCore.layout`'s (numpy only, torch-free); this module adds
the torch side: the average pooling of a CT to the model grid and the area resize of a radiograph,
both as the training data loader has always done them, so a film at inference is what a DRR was in
training.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .layout import ct_to_model_layout, hu_to_unit


def ct_to_model(ct_hu: np.ndarray, size: int) -> torch.Tensor:
    """Canonical ``[z, y, x]`` HU -> ``(1, size, size, size)`` float32 in [-1, 1] (model layout, avg-pooled)."""
    x = torch.from_numpy(hu_to_unit(np.ascontiguousarray(ct_to_model_layout(ct_hu)).astype(np.float32)))
    x = x[None]  # (1, D, H, W)
    if tuple(x.shape[1:]) != (size, size, size):
        x = F.adaptive_avg_pool3d(x, size)
    return x.contiguous()


def area_resize(image01: np.ndarray, size: int) -> np.ndarray:
    """``[row, col]`` float32 -> ``size``^2 by area averaging (how the 128 px training DRRs were resized)."""
    image = np.ascontiguousarray(image01, dtype=np.float32)
    if image.shape == (size, size):
        return image
    return F.interpolate(torch.from_numpy(image)[None, None], size=(size, size), mode="area")[0, 0].numpy()


def xray_to_model(xray01: np.ndarray, size: int) -> torch.Tensor:
    """Display-oriented ``[row, col]`` radiograph in [0, 1] -> ``(1, size, size)`` float32 in [-1, 1] (area resize)."""
    image = area_resize(np.asarray(xray01, dtype=np.float32).clip(0.0, 1.0), size)
    return (torch.from_numpy(image)[None] * 2.0 - 1.0).contiguous()
