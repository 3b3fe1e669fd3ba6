"""How a CT and a radiograph are laid out and scaled as model tensors. One home for both facts.

**Intensity.** One fixed HU window for every volume, ``[HU_MIN, HU_MAX] = [-1024, 2048]``, mapped
linearly to ``[-1, 1]`` for the models (the evaluation protocol maps the same window to [0, 1]).
Never per-volume min-max: that would make metrics incomparable between cases.

**Model layout.** Models see a CT as ``(..., D, H, W)`` where

* ``D`` is the coronal depth, Anterior -> Posterior (the LPS +y axis): the direction the X-rays travel;
* ``H`` is the radiograph's row, Superior -> Inferior (LPS -z): head up;
* ``W`` is the radiograph's column, patient Right -> Left (LPS +x): the patient's right on the image's left.

So a projection along ``D`` *is* a radiograph as a radiologist reads a PA film, and the 3x3x1
convolutions of the diffusion UNet are kernels ``(1, 3, 3)`` over ``(D, H, W)``: in the radiograph's
plane. A canonical CT array ``[z, y, x]`` becomes ``[y, -z, x]``.
"""
from __future__ import annotations

import numpy as np

HU_MIN = -1024.0
HU_MAX = 2048.0


def hu_to_unit(hu):
    """HU -> [-1, 1] with the fixed window (clipped). Works on numpy arrays and torch tensors."""
    x = (hu - HU_MIN) / (HU_MAX - HU_MIN) * 2.0 - 1.0
    return x.clip(-1.0, 1.0)


def unit_to_hu(x):
    """[-1, 1] -> HU (inverse of :func:`hu_to_unit` inside the window)."""
    return (x.clip(-1.0, 1.0) + 1.0) / 2.0 * (HU_MAX - HU_MIN) + HU_MIN


def ct_to_model_layout(ct):
    """Canonical ``[..., z, y, x]`` -> model ``[..., D=y, H=-z, W=x]`` (numpy array or torch tensor)."""
    if isinstance(ct, np.ndarray):
        return np.flip(np.swapaxes(ct, -3, -2), axis=-2)
    return ct.transpose(-3, -2).flip(-2)


def model_layout_to_ct(x):
    """Model ``[..., D, H, W]`` -> canonical ``[..., z, y, x]``; the inverse of :func:`ct_to_model_layout`."""
    if isinstance(x, np.ndarray):
        return np.swapaxes(np.flip(x, axis=-2), -3, -2)
    return x.flip(-2).transpose(-3, -2)
