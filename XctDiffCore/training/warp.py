"""On-the-fly random variants of training CTs, in torch: a fresh warp (and crop) of every volume at every step.

With 15 training patients a stage that sees the same volumes again and again learns them by heart.
Here every step sees a new plausible anatomy instead: per item a random rotation (a few degrees about
each axis), an anisotropic scaling (each axis on its own, about +-10 %), a translation, a smooth
elastic displacement and a small HU jitter (air stays air); never a flip, because a chest is not
left-right symmetric (the heart is on the left). The warp is evaluated only where the output is
wanted, so a 64^3 training patch of a warped 128^3 CT costs one ``grid_sample`` of 64^3 points.

Randomness comes from a generator seeded by ``(seed, rank, step)`` (:func:`step_generator`), so a
resumed run draws exactly the variants an uninterrupted one would have drawn.

Volumes are model tensors ``(B, 1, D, H, W)`` in [-1, 1] (:mod:`XctDiffCore.layout`); the HU jitter
is ``HU' = -1024 + (HU + 1024) * s + offset * t`` with ``t`` rising from 0 (air) to 1 (water and
denser), written in that unit range. :mod:`XctDiffCore.augment` is the numpy twin that ``xctdiff
prepare`` uses for its stored variants.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..layout import HU_MAX, HU_MIN

HU_RANGE = HU_MAX - HU_MIN


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A CPU generator for one optimisation step of one process (resume draws the same numbers)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(rank)) * 10_000_019 + int(step))


def _uniform(generator: torch.Generator, shape, limit: float) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2.0 - 1.0) * limit


def _rotations(angles: torch.Tensor) -> torch.Tensor:
    """``(B, 3)`` angles (radians) -> ``(B, 3, 3)`` rotations of (D, H, W) vectors, one per axis pair."""
    c, s = angles.cos(), angles.sin()
    eye = torch.eye(3, dtype=angles.dtype).expand(angles.shape[0], 3, 3)
    out = eye.clone()
    for k, (i, j) in enumerate(((1, 2), (0, 2), (0, 1))):  # in the H-W, D-W and D-H planes
        r = eye.clone()
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c[:, k], -s[:, k], s[:, k], c[:, k]
        out = out @ r
    return out


def random_views(
    volumes: torch.Tensor,
    generator: torch.Generator,
    size: Optional[int] = None,
    max_rotation_deg: float = 5.0,
    max_scale: float = 0.10,
    max_translation: float = 0.04,
    elastic_mm: float = 3.0,
    elastic_grid: int = 5,
    max_hu_scale: float = 0.03,
    max_hu_offset: float = 20.0,
    spacing_mm: float = 2.5,
) -> torch.Tensor:
    """A random variant of each volume ``(B, 1, N, N, N)``, cropped at random to ``size^3`` (default: whole).

    ``max_scale`` is per axis (anisotropic), ``max_translation`` a fraction of the edge, ``elastic_mm``
    the std of the displacement at the ``elastic_grid^3`` lattice points (trilinearly interpolated
    between them). With every magnitude 0 the result is a plain random crop, exactly.
    """
    b, _, *shape = volumes.shape
    if len(set(shape)) != 1:
        raise ValueError(f"random_views needs cubic volumes, got {tuple(shape)}")
    n = shape[0]
    size = n if size is None else int(size)
    if not 1 <= size <= n:
        raise ValueError(f"crop size {size} must be between 1 and the volume edge {n}")
    device = volumes.device
    # Output voxel centres of a random crop window, in the volume's normalised coordinates (D, H, W).
    start = torch.randint(0, n - size + 1, (b, 3), generator=generator)
    ramp = (torch.arange(size, dtype=torch.float32) + 0.5) / n * 2.0 - 1.0  # (size,)
    offset = start.float() / n * 2.0  # (B, 3)
    axes = [ramp[None] + offset[:, k, None] for k in range(3)]  # 3 x (B, size)
    grid = torch.stack(
        torch.broadcast_tensors(
            axes[0][:, :, None, None], axes[1][:, None, :, None], axes[2][:, None, None, :]
        ),
        dim=-1,
    )  # (B, s, s, s, 3) in (D, H, W) order

    # Output -> input: rotate and scale about the centre, then translate.
    angles = _uniform(generator, (b, 3), math.radians(max_rotation_deg))
    scale = 1.0 + _uniform(generator, (b, 3), max_scale)
    shift = _uniform(generator, (b, 3), 2.0 * max_translation)
    matrix = (_rotations(angles) / scale[:, None, :]).float()  # columns divided: an output step of 1 reads 1/scale
    grid = torch.einsum("bij,bdhwj->bdhwi", matrix, grid) + shift.float()[:, None, None, None, :]
    if elastic_mm > 0:
        lattice = torch.randn((b, 3, elastic_grid, elastic_grid, elastic_grid), generator=generator)
        lattice = lattice * (elastic_mm / spacing_mm * 2.0 / n)  # voxels -> normalised units
        displacement = F.grid_sample(lattice, grid.flip(-1), mode="bilinear", padding_mode="border", align_corners=True)
        grid = grid + displacement.permute(0, 2, 3, 4, 1)
    # grid_sample reads (x, y, z) = (W, H, D); outside the volume is air: sample x + 1 with zero padding.
    out = F.grid_sample(
        volumes + 1.0, grid.flip(-1).to(device=device, dtype=volumes.dtype), mode="bilinear",
        padding_mode="zeros", align_corners=False,
    ) - 1.0

    hu_scale = (1.0 + _uniform(generator, (b,), max_hu_scale)).to(device=device, dtype=volumes.dtype)
    hu_offset = (_uniform(generator, (b,), max_hu_offset) * 2.0 / HU_RANGE).to(device=device, dtype=volumes.dtype)
    tissue = ((out + 1.0) * HU_RANGE / 2.0 / -HU_MIN).clamp(0.0, 1.0)  # 0 for air, 1 from water (0 HU) up
    out = (out + 1.0) * hu_scale.view(b, 1, 1, 1, 1) - 1.0 + hu_offset.view(b, 1, 1, 1, 1) * tissue
    return out.clamp(-1.0, 1.0)
