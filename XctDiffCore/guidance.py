"""Data-consistency guidance: move a decoded CT until its DRR matches the input film (``--guidance``).

The film is the one thing known for certain about the patient, and the engine renders a
differentiable DRR of any CT in the training geometry; without guidance that knowledge only
*scores* a result (the consistency). With guidance, each decoded sample ``x0`` (HU, model layout)
becomes

    x = x0 + strength * w * u*,   u* = argmin_u  mean((N(DRR(x0 + w * u)) - film)^2) + PRIOR * mean(u^2)

where ``N`` is the radiograph normalisation (:func:`~XctDiffCore.drr.normalize_drr`, so only the
film's shape of contrast counts, not its absolute exposure) and ``w = STEP_HU * clip((x0 + 1000) /
1000, 0, 2)`` puts the correction where the decoded CT already has matter, in proportion to its
density. Why that weight: a film fixes each ray's integral, not where along the ray the matter
lies; a uniform correction would paint streaks through the air and lungs, while this one keeps
the model's depth profile along every ray (the optimiser does not invent depth) and adds or removes
matter mostly in tissue and bone. ``u*`` is found by a few Adam steps (``ITERATIONS``; the DRR of a
128^3 CT and its gradient cost ~0.1 s on a CPU core), and ``strength`` in [0, 1] is the fraction of
that correction applied (0 = off, 1 = fit the film).

It is the cheap variant of diffusion posterior sampling (Chung et al. 2023) that guides only the
end of the sampling: applied to every decoded sample of the diffusion, and to the direct path's one
CT (refinement), after decoding, never through the decoder (a decoder backward pass costs more
than the whole reconstruction on a CPU).

**Failure mode.** Guidance makes any film "consistent", garbage too. So it is skipped, with a
:class:`GuidanceWarning`, when the unguided result disagrees grossly with the film (consistency
below :data:`MIN_UNGUIDED_CONSISTENCY`: not a frontal chest film, or one the model cannot read),
and results report the unguided consistency beside the guided one (``unguided_consistency``): the
guided score says the DRR was fitted, not that the anatomy is right.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F

from .diffusion import Cancelled
from .drr import Geometry, normalize_drr, render_drr
from .options import check_guidance

ITERATIONS = 30  # Adam steps on u (measured: 20 already reach most of the gain, 60 add ~0.05 consistency)
LEARNING_RATE = 0.05  # Adam's step on u, in units of STEP_HU * density
STEP_HU = 100.0  # the scale of w: one unit of u moves water by 100 HU
DENSITY_POWER = 1.0  # w grows with the decoded density to this power (see correction_weight)
PRIOR = 1e-4  # weight of mean(u^2): keeps the correction small where the film says little
HU_RANGE = (-1024.0, 3071.0)  # what an int16 CT of a scanner holds
MIN_UNGUIDED_CONSISTENCY = 0.5  # below: the film does not look like the model's input; guidance is skipped


class GuidanceWarning(UserWarning):
    """Guidance was asked for but skipped (the film disagrees grossly with the model's reconstruction)."""


def film_drr(volume_hu: torch.Tensor, geometry: Geometry, film_size: int, render_size: int = 128,
             spacing_mm: Optional[tuple] = None) -> torch.Tensor:
    """The DRR of HU volumes ``(B, 1, D, H, W)`` as the model's input looks: rendered at ``render_size``
    (the size the training DRRs were made at), normalised like a film, area-resized to ``film_size``."""
    image = normalize_drr(render_drr(volume_hu, geometry, size=render_size, spacing_mm=spacing_mm).float())
    if image.shape[-1] != film_size:
        image = F.interpolate(image, size=(film_size, film_size), mode="area")
    return image


def correction_weight(volume_hu: torch.Tensor, power: Optional[float] = None) -> torch.Tensor:
    """``w``: where, and how much, guidance may change each voxel: ``STEP_HU * clip((HU + 1000) / 1000, 0, 2) ** power``."""
    power = DENSITY_POWER if power is None else power
    return ((volume_hu + 1000.0) / 1000.0).clamp(0.0, 2.0) ** power * STEP_HU


def guide_to_film(volume_hu: torch.Tensor, film01: torch.Tensor, geometry: Geometry, strength: float,
                  render_size: int = 128, spacing_mm: Optional[tuple] = None, iterations: int = ITERATIONS,
                  cancel: Optional[threading.Event] = None) -> torch.Tensor:
    """The guided copy of one decoded CT ``(1, 1, D, H, W)`` in HU (model layout) for the film ``(1, 1, S, S)``
    in [0, 1]; float32, clipped to :data:`HU_RANGE`. Works under ``torch.inference_mode`` too.

    Raises :class:`~XctDiffCore.diffusion.Cancelled` between iterations when ``cancel`` is set.
    """
    strength = check_guidance(strength)
    if strength == 0.0 or iterations <= 0:
        return volume_hu.float()
    with torch.inference_mode(False), torch.enable_grad():
        x0 = volume_hu.detach().float().clone()  # a normal tensor, even from an inference-mode one
        target = film01.detach().float().clone()
        weight = correction_weight(x0)
        u = torch.zeros_like(x0, requires_grad=True)
        optimizer = torch.optim.Adam([u], lr=LEARNING_RATE)
        for _ in range(iterations):
            if cancel is not None and cancel.is_set():
                raise Cancelled("reconstruction was cancelled")
            x = (x0 + weight * u).clamp(*HU_RANGE)
            drr = film_drr(x, geometry, target.shape[-1], render_size, spacing_mm)
            loss = F.mse_loss(drr, target) + PRIOR * u.square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (x0 + strength * weight * u.detach()).clamp(*HU_RANGE)
