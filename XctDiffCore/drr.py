"""Digitally reconstructed radiographs (DRRs): differentiable PA projections of a CT in PyTorch.

The paper trains on CT + DRR pairs, the pipeline scores a reconstruction by re-projecting it, and
training may use the projection as a loss: so one renderer, batched, on CPU or CUDA, with
gradients flowing back to the voxels.

**Layout.** Volumes are model tensors ``(B, 1, D, H, W)`` in HU (see :mod:`XctDiffCore.layout`):
D runs Anterior->Posterior, H Superior->Inferior, W patient Right->Left. The X-rays travel along D
from a posterior source to an anterior detector, so image ``[row, col]`` = ``[H, W]`` is the PA film
as a radiologist reads it, with no flip. The isocentre is the volume's centre.

**Physics.** Beer-Lambert with a linear HU->attenuation map,
``mu = MU_WATER_PER_MM * max(0, 1 + HU / 1000)``; the DRR is the line integral of ``mu`` (a
dimensionless optical depth ``-log(I / I0)``, which is what a digital radiograph displays after its
log transform: bone bright, air dark). :func:`normalize_drr` maps it to [0, 1] for display and for
comparison with preprocessed radiographs.

**Rays.** The parallel geometry is a weighted sum along D. The cone geometry uses Joseph's method:
every ray crosses each coronal plane of voxel centres once (the rays are within ~15 degrees of D),
so the integral is the sum over planes of the interpolated ``mu`` (trilinear sampling at a plane's
depth is bilinear: one 2D ``grid_sample`` over all planes and the batch at once, with the ray grid
cached per geometry) times the path length through a plane, ``spacing_D / cos(angle)``. When a detector pixel seen at the isocentre is wider than a voxel, the
detector is rendered at an integer multiple of the resolution and average-pooled (no aliasing).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from .errors import XctDiffError
from .layout import ct_to_model_layout
from .preprocess import RADIOGRAPH_PERCENTILES
from .volume import Volume

# Linear attenuation of water at 60 keV, about the effective energy of a 120 kVp chest beam
# (NIST XCOM: mu/rho = 0.2059 cm^2/g). Plastimatch uses 0.022 /mm (50 keV) and zero below -800 HU.
MU_WATER_PER_MM = 0.0206



@dataclass(frozen=True)
class ParallelGeometry:
    """Parallel rays along D, one per detector pixel; the square detector spans the volume's coronal extent.

    The idealised projection: no magnification, so image pixels line up with the model's H x W grid.
    """


@dataclass(frozen=True)
class ConeGeometry:
    """The point-source PA geometry X2CT-GAN rendered LIDC with (Plastimatch): source posterior, detector anterior.

    Distances in mm from the source. X2CT-GAN's panel is 320 px over 500 mm, resized to the model
    input; rendering ``size`` pixels over the same 500 mm is that image at the model's resolution.
    """

    source_to_isocenter_mm: float = 541.0
    source_to_detector_mm: float = 949.0
    detector_size_mm: float = 500.0

    def __post_init__(self):
        if not 0 < self.source_to_isocenter_mm < self.source_to_detector_mm:
            raise ValueError("need 0 < source_to_isocenter_mm < source_to_detector_mm")
        if self.detector_size_mm <= 0:
            raise ValueError("detector_size_mm must be positive")

    @property
    def magnification(self) -> float:
        """Detector size of an object at the isocentre divided by its true size."""
        return self.source_to_detector_mm / self.source_to_isocenter_mm


Geometry = Union[ParallelGeometry, ConeGeometry]

GEOMETRIES = {"cone": ConeGeometry, "parallel": ParallelGeometry}


def make_geometry(geometry: Union[str, Geometry]) -> Geometry:
    """A geometry object from its CLI name ("cone", "parallel") with the default numbers; objects pass through."""
    if isinstance(geometry, (ParallelGeometry, ConeGeometry)):
        return geometry
    if geometry not in GEOMETRIES:
        raise XctDiffError(f"unknown DRR geometry {geometry!r}; choose one of {', '.join(GEOMETRIES)}")
    return GEOMETRIES[geometry]()


def hu_to_attenuation(hu: torch.Tensor, mu_water: float = MU_WATER_PER_MM) -> torch.Tensor:
    """HU -> linear attenuation per mm, ``mu_water * max(0, 1 + HU/1000)`` (air and padding give 0)."""
    return mu_water * torch.relu(1.0 + hu / 1000.0)


def render_drr(
    volume_hu: Union[torch.Tensor, Volume],
    geometry: Geometry = ConeGeometry(),
    size: int = 128,
    spacing_mm: Optional[tuple] = None,
    mu_water: float = MU_WATER_PER_MM,
) -> torch.Tensor:
    """Line-integral DRRs ``(B, 1, size, size)`` of HU volumes ``(B, 1, D, H, W)`` in the model layout.

    ``spacing_mm`` is the voxel size along (D, H, W); it defaults to 2.5 mm, the model's grid. A
    canonical :class:`Volume` is accepted too (its own spacing is used). Model outputs in [-1, 1] go
    through :func:`~XctDiffCore.layout.unit_to_hu` first. Differentiable in the voxels (zero gradient
    below -1000 HU, where the attenuation is clamped to 0).
    """
    if isinstance(volume_hu, Volume):
        if spacing_mm is not None:
            raise ValueError("spacing_mm is taken from the Volume; do not pass both")
        volume_hu, spacing_mm = _volume_to_model_tensor(volume_hu)
    spacing_mm = (2.5, 2.5, 2.5) if spacing_mm is None else tuple(float(s) for s in spacing_mm)
    if volume_hu.ndim != 5 or volume_hu.shape[1] != 1:
        raise ValueError(f"expected a (B, 1, D, H, W) volume, got shape {tuple(volume_hu.shape)}")
    if size < 1:
        raise ValueError("size must be positive")
    if not volume_hu.is_floating_point():
        volume_hu = volume_hu.float()
    # hu_to_attenuation without its constant factor, which is applied to the (linear) projection instead.
    density = (volume_hu + 1000.0).relu_()
    if isinstance(geometry, ConeGeometry):
        image = _render_cone(density, geometry, size, spacing_mm)
    elif isinstance(geometry, ParallelGeometry):
        image = _render_parallel(density, size, spacing_mm)
    else:
        raise TypeError(f"unsupported geometry {type(geometry).__name__}")
    return image * (mu_water / 1000.0)


def normalize_drr(drr: torch.Tensor, percentiles: tuple = RADIOGRAPH_PERCENTILES) -> torch.Tensor:
    """Per-image robust window to [0, 1]: the ``percentiles`` of each ``(B, 1, H, W)`` image map to 0 and 1.

    The rule of :func:`~XctDiffCore.preprocess.preprocess_radiograph`, so a DRR and a preprocessed film
    are comparable (a normalised DRR with no empty border is a fixed point of that function).
    Differentiable (through the pixels and the selected quantiles).
    """
    flat = rearrange(drr, "b c h w -> b (c h w)")
    q = torch.tensor([p / 100.0 for p in percentiles], dtype=flat.dtype, device=flat.device)
    low, high = torch.quantile(flat, q, dim=1)  # (B,), (B,)
    scale = (high - low).clamp_min(torch.finfo(flat.dtype).eps)
    out = (drr - low.view(-1, 1, 1, 1)) / scale.view(-1, 1, 1, 1)
    return out.clamp(0.0, 1.0)


def drr_of_volume(volume: Volume, geometry: Union[str, Geometry] = "cone", size: int = 128) -> np.ndarray:
    """The radiograph-like DRR of a canonical CT: float32 ``[row, col]`` in [0, 1], display orientation."""
    with torch.no_grad():
        drr = render_drr(volume, make_geometry(geometry), size=size)
        return normalize_drr(drr)[0, 0].cpu().numpy().astype(np.float32)


def detector_pixel_mm(geometry: Geometry, size: int, volume_extent_mm: float) -> float:
    """Pixel pitch of a ``size``-pixel DRR in the detector plane (for the image's spacing metadata)."""
    if isinstance(geometry, ConeGeometry):
        return geometry.detector_size_mm / size
    return volume_extent_mm / size


DRR_FILE_SUFFIXES = (".png", ".nrrd")


#: The DRR sides ``xctdiff drr`` and its benchmark take, in pixels.
DRR_SIZES = (16, 2048)


def check_drr_size(size: int) -> int:
    if not DRR_SIZES[0] <= size <= DRR_SIZES[1]:
        raise XctDiffError(f"DRR size must be between {DRR_SIZES[0]} and {DRR_SIZES[1]} pixels, got {size}")
    return size


def write_drr_file(ct_path, out_path, geometry: str = "cone", size: int = 128) -> Path:
    """Read a CT, preprocess it (canonical 2.5 mm grid), render its DRR and write it tagged as a DRR.

    ``.png``: 16-bit grey in [0, 1]; ``.nrrd``: the float32 image with its detector pixel spacing.
    Bad input raises :class:`XctDiffError` before anything is written.
    """
    from .atomic import check_output_path, file_identity, full_suffix
    from .io import drr_tag_metadata, read_ct, write_image_png, write_radiograph_nrrd
    from .preprocess import preprocess_ct

    out_path = check_output_path(out_path)
    if file_identity(out_path) == file_identity(ct_path):
        raise XctDiffError(f"the output {out_path} is the input CT: write the DRR elsewhere")
    suffix = full_suffix(out_path).lower()
    if suffix not in DRR_FILE_SUFFIXES:
        raise XctDiffError(f"cannot write a DRR as '{suffix or out_path.name}': use .png or .nrrd")
    check_drr_size(size)
    geom = make_geometry(geometry)
    ct = preprocess_ct(read_ct(ct_path))
    image = drr_of_volume(ct, geom, size)
    metadata = {**drr_tag_metadata(), "xctdiff_drr_geometry": repr(geom), "xctdiff_drr_source": Path(ct_path).name}
    if suffix == ".nrrd":
        coronal_extent = max(ct.shape[0] * ct.spacing[2], ct.shape[2] * ct.spacing[0])  # z, x extents in mm
        pixel = detector_pixel_mm(geom, size, coronal_extent)
        return write_radiograph_nrrd(image, out_path, spacing=(pixel, pixel), metadata=metadata)
    return write_image_png(image, out_path, metadata=metadata)


# --- internals ---------------------------------------------------------------------------------


def _volume_to_model_tensor(volume: Volume):
    """Canonical ``Volume`` -> ``(1, 1, D, H, W)`` float32 tensor and its (D, H, W) spacing."""
    if not np.allclose(volume.direction, np.eye(3), atol=1e-3):
        raise XctDiffError("the DRR needs a canonical (LPS-aligned) CT: preprocess it first")
    array = ct_to_model_layout(np.asarray(volume.array, dtype=np.float32))
    sx, sy, sz = volume.spacing
    return torch.from_numpy(np.ascontiguousarray(array))[None, None], (sy, sz, sx)


def _pixel_centres(n: int, extent_mm: float, like: torch.Tensor) -> torch.Tensor:
    """Centres (mm, relative to the detector centre) of ``n`` pixels spanning ``extent_mm``."""
    return (torch.arange(n, dtype=like.dtype, device=like.device) + 0.5 - n / 2.0) * (extent_mm / n)


def _oversampling(pixel_at_isocentre_mm: float, spacing_hw: tuple) -> int:
    """How many rays per pixel side keep the ray spacing at or below one voxel (anti-aliasing)."""
    return max(1, math.ceil(pixel_at_isocentre_mm / min(spacing_hw) - 1e-6))


def _render_parallel(mu: torch.Tensor, size: int, spacing: tuple) -> torch.Tensor:
    sd, sh, sw = spacing
    _, _, _, H, W = mu.shape
    projection = mu.sum(dim=2) * sd  # (B, 1, H, W)
    extent = max(H * sh, W * sw)
    k = _oversampling(extent / size, (sh, sw))
    n = size * k
    coords = _pixel_centres(n, extent, mu)
    grid = torch.stack(torch.meshgrid(coords / (W * sw / 2), coords / (H * sh / 2), indexing="xy"), dim=-1)
    grid = grid.expand(mu.shape[0], n, n, 2)  # (B, rows, cols, [x=W, y=H]) in grid_sample units
    image = F.grid_sample(projection, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(image, k) if k > 1 else image


def _render_cone(mu: torch.Tensor, geometry: ConeGeometry, size: int, spacing: tuple) -> torch.Tensor:
    B, _, D, H, W = mu.shape
    grid, path, k = _cone_rays(geometry, size, (D, H, W), spacing, mu.device, mu.dtype)
    # The batch rides in grid_sample's channels: one grid per plane serves every volume.
    planes = rearrange(mu, "b 1 d h w -> d b h w")
    samples = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    image = rearrange(samples.sum(dim=0), "b h w -> b 1 h w") * path  # (B, 1, rows, cols)
    return F.avg_pool2d(image, k) if k > 1 else image


@functools.lru_cache(maxsize=8)
def _cone_rays(geometry: ConeGeometry, size: int, shape: tuple, spacing: tuple, device, dtype):
    """Per plane, where each ray crosses it (grid_sample units), the path length per plane, the oversampling.

    Depends only on the geometry, so it is computed once per (geometry, size, grid, device), as normal
    tensors even under ``torch.inference_mode`` (a cached inference tensor could not be used by a later
    differentiable rendering, such as the guidance's).
    """
    with torch.inference_mode(False):
        return _cone_rays_uncached(geometry, size, shape, spacing, device, dtype)


def _cone_rays_uncached(geometry: ConeGeometry, size: int, shape: tuple, spacing: tuple, device, dtype):
    D, H, W = shape
    sd, sh, sw = spacing
    sad, sid = geometry.source_to_isocenter_mm, geometry.source_to_detector_mm
    if sad <= D * sd / 2:
        raise ValueError("the source lies inside the volume: increase source_to_isocenter_mm")
    k = _oversampling(geometry.detector_size_mm / size / geometry.magnification, (sh, sw))
    n = size * k
    like = torch.empty(0, dtype=dtype, device=device)
    coords = _pixel_centres(n, geometry.detector_size_mm, like)  # detector plane, mm
    depth = _pixel_centres(D, D * sd, like)  # plane centres along D (+ = posterior, toward the source)
    shrink = (sad - depth) / sid  # (D,): a detector point seen on plane d, relative to the axis
    x = shrink.view(D, 1, 1) * coords.view(1, 1, n) / (W * sw / 2)  # (D, 1, cols)
    y = shrink.view(D, 1, 1) * coords.view(1, n, 1) / (H * sh / 2)  # (D, rows, 1)
    grid = torch.stack(torch.broadcast_tensors(x, y), dim=-1)  # (D, rows, cols, [x=W, y=H])
    # Path length through one plane: spacing_D / cos(ray angle) = spacing_D * |ray| / SID.
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    path = sd * torch.sqrt(sid**2 + rows**2 + cols**2) / sid  # (rows, cols)
    return grid, path, k
