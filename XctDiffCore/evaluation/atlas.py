"""The registered-atlas baseline of ``xctdiff evaluate --atlas K``: the nearest training CTs, each warped until
its DRR matches the input film, averaged.

Why a second lookup: kNN (:func:`~XctDiffCore.evaluation.reconstructions.knn_ct`) averages training CTs as
they are, so it loses to any model on the outline alone (a narrower patient, a lower diaphragm). The
classical answer to single-view reconstruction is 2D/3D registration of an atlas: deform a CT until its
projection is the film. That learns nothing either, but it uses everything the film says about the
frontal plane; what it cannot know is what the film does not say (how deep each structure lies), which
is exactly what a learned model must add. A model that does not beat it has learnt the outline and no more.

**Registration.** Each candidate CT (the ``2 K`` nearest by DRR, :data:`CANDIDATE_FACTOR`) is warped by an
affine map (12 parameters) plus a smooth displacement field (a :data:`GRID`\\ :sup:`3` x 3 control grid,
trilinearly upsampled), found by Adam (:data:`ITERATIONS` steps) on the mean squared difference between
the film and the warped CT's DRR (rendered in the geometry the model was trained in, normalised like a
film by :func:`~XctDiffCore.drr.normalize_drr`), with small quadratic penalties that keep the warp near the identity. It works on
the CT at :data:`WORK_SIZE`\\ :sup:`3` and compares films at :data:`WORK_FILM` px (about 2.5 s per
candidate on one CPU core); the warp found there is applied to the CT at full resolution. The ``K``
candidates whose warped DRRs fit the film best are averaged in HU.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..drr import Geometry, make_geometry, normalize_drr, render_drr
from ..layout import ct_to_model_layout, model_layout_to_ct
from ..model_folder import FIELD_OF_VIEW_MM

ITERATIONS = 60  # Adam steps per candidate (10 already reach most of the 3D gain; the film fit keeps improving)
LEARNING_RATE = 0.01  # in normalised coordinates: 1 % of the volume's half-extent per step, at most
GRID = 5  # control points per axis of the displacement field
AFFINE_PENALTY = 0.01  # weight of mean(affine change^2)
DISPLACEMENT_PENALTY = 0.05  # weight of mean(displacement^2), normalised units
WORK_SIZE = 64  # the CT's grid during the registration
WORK_FILM = 64  # the films' size during the registration
CANDIDATE_FACTOR = 2  # registers CANDIDATE_FACTOR * K nearest CTs by DRR, keeps the K that fit best
AIR_HU = -1024.0  # what the warp brings in from outside the volume


def warp(volume_hu: torch.Tensor, theta: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``(1, 1, D, H, W)`` HU warped by ``affine_grid(theta) + upsample(displacement)`` (air outside)."""
    grid = F.affine_grid(theta, list(volume_hu.shape), align_corners=False)
    field = F.interpolate(displacement, size=volume_hu.shape[-3:], mode="trilinear", align_corners=True)
    grid = grid + field.permute(0, 2, 3, 4, 1)
    moved = F.grid_sample(volume_hu - AIR_HU, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved + AIR_HU


def _affine(parameters: torch.Tensor) -> torch.Tensor:
    return torch.eye(3, 4, dtype=parameters.dtype).unsqueeze(0) + parameters.view(1, 3, 4)


def _film_at(volume_hu: torch.Tensor, geometry: Geometry, render_size: int, extent_mm: float) -> torch.Tensor:
    spacing = extent_mm / volume_hu.shape[-1]
    image = normalize_drr(render_drr(volume_hu, geometry, size=render_size, spacing_mm=(spacing,) * 3))
    return F.interpolate(image, size=(WORK_FILM, WORK_FILM), mode="area")


def register_to_film(volume_hu: torch.Tensor, film01: torch.Tensor, geometry: Union[str, Geometry] = "cone",
                     extent_mm: float = FIELD_OF_VIEW_MM, render_size: int = 128, iterations: int = ITERATIONS) -> tuple:
    """Warp parameters ``(theta (1, 3, 4), displacement (1, 3, GRID, GRID, GRID), fit)`` that bring the DRR of
    ``volume_hu`` ``(1, 1, D, H, W)`` (model layout, HU, a cube spanning ``extent_mm``) to the film ``(1, 1, S, S)``
    in [0, 1]; ``fit`` is the final mean squared film difference (at :data:`WORK_FILM` px)."""
    geometry = make_geometry(geometry)
    with torch.inference_mode(False), torch.enable_grad():
        work = volume_hu.detach().float().clone()
        if work.shape[-1] != WORK_SIZE:
            work = F.interpolate(work, size=(WORK_SIZE,) * 3, mode="area")
        target = F.interpolate(film01.detach().float().clone(), size=(WORK_FILM, WORK_FILM), mode="area")
        parameters = torch.zeros(12, requires_grad=True)
        displacement = torch.zeros(1, 3, GRID, GRID, GRID, requires_grad=True)
        optimizer = torch.optim.Adam([parameters, displacement], lr=LEARNING_RATE)
        for _ in range(iterations):
            moved = warp(work, _affine(parameters), displacement)
            loss = (F.mse_loss(_film_at(moved, geometry, render_size, extent_mm), target)
                    + AFFINE_PENALTY * parameters.square().mean() + DISPLACEMENT_PENALTY * displacement.square().mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            theta, displacement = _affine(parameters.detach()), displacement.detach()
            fit = F.mse_loss(_film_at(warp(work, theta, displacement), geometry, render_size, extent_mm), target).item()
    return theta, displacement, fit


def registered_ct(ct_hu: np.ndarray, drr01: np.ndarray, geometry: Union[str, Geometry] = "cone",
                  iterations: int = ITERATIONS) -> tuple:
    """(``ct_hu``, a canonical ``[z, y, x]`` cube spanning the prepared field of view, warped until its DRR matches
    the film ``drr01`` (``[row, col]`` in [0, 1]), float32; the final film difference, :func:`register_to_film`'s fit)."""
    ct = torch.from_numpy(np.ascontiguousarray(ct_to_model_layout(ct_hu), dtype=np.float32))[None, None]
    film = torch.from_numpy(np.ascontiguousarray(drr01, dtype=np.float32))[None, None]
    theta, displacement, fit = register_to_film(ct, film, geometry, iterations=iterations)
    with torch.no_grad():
        moved = warp(ct, theta, displacement)[0, 0].numpy()
    return np.ascontiguousarray(model_layout_to_ct(moved), dtype=np.float32), fit


def atlas_ct(drr01: np.ndarray, training: list, k: int, volume_size: int, geometry: Union[str, Geometry] = "cone",
             iterations: int = ITERATIONS, candidates: Optional[int] = None) -> tuple:
    """(mean HU ``[z, y, x]`` on a ``volume_size``^3 grid of the ``k`` registered training CTs that fit the film
    ``drr01`` best, their patient ids best first). ``training``: kNN candidates
    (:func:`~XctDiffCore.evaluation.reconstructions.datalist_training`)."""
    from ..datalist import load_entry_ct
    from .reconstructions import model_grid_hu, nearest_training

    fitted = []
    for patient in nearest_training(drr01, training, candidates or CANDIDATE_FACTOR * k):
        moved, fit = registered_ct(model_grid_hu(load_entry_ct(patient.image), volume_size), drr01, geometry, iterations)
        fitted.append((fit, patient.patient, moved))
    fitted.sort(key=lambda f: f[0])  # stable: equal fits keep the DRR order
    best = fitted[:k]
    mean = np.mean([moved.astype(np.float64) for _, _, moved in best], axis=0)
    return mean.astype(np.float32), [patient for _, patient, _ in best]
