"""On-the-fly random variants of training pairs, in torch: a fresh warp (and crop) of every CT at every
step, and for the radiograph stages its DRR rendered anew and randomised on the film side.

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

**Film side** (:func:`random_films`): real films differ from a DRR by more than anatomy: a contrast
curve (gamma, contrast), detector blur, quantum noise and scatter, a low-frequency haze that lifts the
dark lungs. Each is drawn per image, so the encoder learns what stays the same under them.
:func:`random_pairs` chains both: warp the CT, render its DRR in the data set's geometry, randomise
the film; the stage then encodes the warped CT with its frozen autoencoder for the target.
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
    ).to(device)  # (B, s, s, s, 3) in (D, H, W) order; the random numbers are drawn on the CPU, the
    # per-voxel work runs where the volumes are (a GPU warps a batch of 128^3 CTs in milliseconds)

    # Output -> input: rotate and scale about the centre, then translate.
    angles = _uniform(generator, (b, 3), math.radians(max_rotation_deg))
    scale = 1.0 + _uniform(generator, (b, 3), max_scale)
    shift = _uniform(generator, (b, 3), 2.0 * max_translation)
    matrix = (_rotations(angles) / scale[:, None, :]).float()  # columns divided: an output step of 1 reads 1/scale
    grid = torch.einsum("bij,bdhwj->bdhwi", matrix.to(device), grid) + shift.float().to(device)[:, None, None, None, :]
    if elastic_mm > 0:
        lattice = torch.randn((b, 3, elastic_grid, elastic_grid, elastic_grid), generator=generator)
        lattice = (lattice * (elastic_mm / spacing_mm * 2.0 / n)).to(device)  # voxels -> normalised units
        displacement = F.grid_sample(lattice, grid.flip(-1), mode="bilinear", padding_mode="border", align_corners=True)
        grid = grid + displacement.permute(0, 2, 3, 4, 1)
    # grid_sample reads (x, y, z) = (W, H, D); outside the volume is air: sample x + 1 with zero padding.
    out = F.grid_sample(
        volumes + 1.0, grid.flip(-1).to(dtype=volumes.dtype), mode="bilinear",
        padding_mode="zeros", align_corners=False,
    ) - 1.0

    hu_scale = (1.0 + _uniform(generator, (b,), max_hu_scale)).to(device=device, dtype=volumes.dtype)
    hu_offset = (_uniform(generator, (b,), max_hu_offset) * 2.0 / HU_RANGE).to(device=device, dtype=volumes.dtype)
    tissue = ((out + 1.0) * HU_RANGE / 2.0 / -HU_MIN).clamp(0.0, 1.0)  # 0 for air, 1 from water (0 HU) up
    out = (out + 1.0) * hu_scale.view(b, 1, 1, 1, 1) - 1.0 + hu_offset.view(b, 1, 1, 1, 1) * tissue
    return out.clamp(-1.0, 1.0)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(1, 1, H, W)`` with reflected borders; ``sigma`` in pixels (0: unchanged)."""
    if sigma <= 0.05:
        return images
    radius = max(1, int(math.ceil(3.0 * sigma)))
    radius = min(radius, images.shape[-1] - 1, images.shape[-2] - 1)
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def random_films(
    images01: torch.Tensor,
    generator: torch.Generator,
    max_gamma: float = 0.25,
    max_contrast: float = 0.15,
    max_blur_px: float = 1.0,
    max_noise: float = 0.02,
    max_haze: float = 0.15,
) -> torch.Tensor:
    """A film-like variant of each normalised DRR ``(B, 1, H, W)`` in [0, 1] (same shape, in [0, 1]).

    In order: scatter haze ``(1 - a) x + a blur(x, H / 8)``, a ``gamma`` in ``[1/(1+g), 1+g]``, contrast
    about mid-grey, detector blur, Gaussian noise; the strength of each drawn uniformly up to its maximum.
    With every maximum 0 the images come back unchanged.
    """
    out = []
    for image in images01.split(1):
        haze = float(torch.rand((), generator=generator)) * max_haze
        gamma = math.exp(float(_uniform(generator, (), math.log1p(max_gamma))))
        contrast = 1.0 + float(_uniform(generator, (), max_contrast))
        blur = float(torch.rand((), generator=generator)) * max_blur_px
        noise = float(torch.rand((), generator=generator)) * max_noise
        x = image
        if haze > 0:
            x = (1.0 - haze) * x + haze * _gaussian_blur(x, x.shape[-1] / 8.0)
        x = x.clamp(0.0, 1.0) ** gamma
        x = (x - 0.5) * contrast + 0.5
        x = _gaussian_blur(x, blur)
        if noise > 0:
            x = x + noise * torch.randn(x.shape, generator=generator).to(x)
        out.append(x.clamp(0.0, 1.0))
    return torch.cat(out)


def random_pairs(ct: torch.Tensor, generator: torch.Generator, geometry, xray_size: int, augment: dict, film: Optional[dict]):
    """Fresh ``(ct, xray)`` training pairs from CTs ``(B, 1, N, N, N)`` in [-1, 1] (the prepared 320 mm cube),
    their DRRs in ``geometry`` (a :mod:`XctDiffCore.drr` geometry object).

    ``augment``: the magnitudes of :func:`random_views`; ``film``: those of :func:`random_films` (None:
    the plain DRR). Returns the warped CTs and their radiographs ``(B, 1, S, S)`` in [-1, 1], the
    model's input range (:func:`XctDiffCore.model_inputs.xray_to_model`).
    """
    from ..drr import normalize_drr, render_drr
    from ..layout import unit_to_hu
    from ..model_folder import FIELD_OF_VIEW_MM

    ct = random_views(ct, generator, **augment)
    spacing = FIELD_OF_VIEW_MM / ct.shape[-1]
    with torch.no_grad():
        xray = normalize_drr(render_drr(unit_to_hu(ct), geometry, size=xray_size, spacing_mm=(spacing,) * 3))
    if film is not None:
        xray = random_films(xray, generator, **film)
    return ct, xray * 2.0 - 1.0


def bone_fractions(ct: torch.Tensor, latent_size: int) -> torch.Tensor:
    """Per latent cell, the fraction of its voxels that are bone (above the evaluation's 200 HU):
    ``(B, 1, d, h, w)`` for CTs ``(B, 1, D, H, W)`` on the [-1, 1] scale (``encoder.bone_weight``)."""
    from .losses import BONE_LEVEL

    return F.avg_pool3d((ct > BONE_LEVEL).float(), ct.shape[-1] // latent_size)


class PairVariants:
    """A radiograph stage's training pairs: the stored ones, or fresh variants (``augment``/``film`` enabled).

    ``pairs(batch, step)`` returns ``(ct, xray)`` model tensors; the DRRs are rendered in the geometry the
    datalist's own DRRs were made with (``settings.geometry`` of ``xctdiff prepare``), so a fresh pair
    looks like a stored one apart from what was randomised.
    """

    def __init__(self, augment, film, datalist, xray_size: int, seed: int, rank: int, device=None):
        self.enabled = augment.enabled or film.enabled
        self.augment, self.film = augment.magnitudes(), film.magnitudes()
        self.xray_size, self.seed, self.rank = xray_size, seed, rank
        self.device = device  # where fresh variants are warped and rendered (None: where the batch is)
        self.geometry, self.bank = None, None
        self.bone_latent_size = 0  # > 0: latent_pairs also gives each pair's bone fractions at that grid
        if self.enabled or augment.bank:
            from ..drr import make_geometry
            from ..datalist import datalist_geometry

            self.geometry = make_geometry(datalist_geometry(datalist))

    def __call__(self, batch: dict, step: int) -> tuple:
        if not self.enabled:
            return batch["image"], batch["xray"]
        generator = step_generator(self.seed, self.rank, step)
        ct = batch["image"] if self.device is None else batch["image"].to(self.device, non_blocking=True)
        return random_pairs(ct, generator, self.geometry, self.xray_size, self.augment, self.film)

    def latent_pairs(self, batch: dict, step: int, encode) -> tuple:
        """``(target latents, radiographs, bone)``: drawn from :attr:`bank` (a
        :class:`~XctDiffCore.training.variant_bank.VariantBank`, films randomised anew) when one is set,
        else this step's pairs with ``encode(ct)`` as their targets; ``bone`` is :func:`bone_fractions`
        when :attr:`bone_latent_size` asks for it, else None."""
        if self.bank is not None:
            return self.bank.draw(batch["patient"], step_generator(self.seed, self.rank, step), self.film)
        ct, xray = self(batch, step)
        bone = bone_fractions(ct, self.bone_latent_size) if self.bone_latent_size else None
        return encode(ct), xray, bone
