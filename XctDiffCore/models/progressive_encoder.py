"""The progressive encoder of XctDiff (eqs. 5-6): a radiograph lifted into the VQ-GAN's latent space.

The frontal radiograph faces the CT's coronal plane, so the encoder keeps the radiograph's plane as
the model's ``(H, W)`` and *creates* the coronal depth ``D`` (the X-ray direction, see
:mod:`XctDiffCore.layout`) in one place, the lift::

    xray (B, 1, S, S)
      -> 2D encoder: conv, [ResBlock x n](c0) -> down -> ... -> [ResBlock x n](c_last)   (B, C, S/f, S/f)
      -> lift, one of two (``lift=``):                                                    (B, C', depth, S/f, S/f)
         "mlp" (the paper): at every (h, w) of that map, an MLP over the C features,
               LayerNorm -> Linear(C, C) -> GELU -> Linear(C, depth * C'),
               whose output index k holds slice d = k // C', channel c = k % C'
         "geometric": back-projection along the DRR's rays: voxel (d, h, w) samples the map where
               its centre projects on the detector (bilinear, zero outside the film), then
               Conv 1x1x1 (C -> C') + a learned embedding of the depth along the ray (C', depth)
               (computed as Conv 1x1 on the map, then the sampling: the same, as both are linear)
      -> 3D convs: conv, [ResBlock 3x3x3] per width of channels_3d                      (B, c3, depth, S/f, S/f)
      -> Conv: GroupNorm, SiLU, conv 3x3x3 -> latent_channels, then N (z-score per voxel)  = forward()
      -> q: the frozen VQ-GAN quantiser (returns N(e_k))                                 = prior()

``f = 2 ** (len(channels_2d) - 1)``. The 2D encoder runs the shared 3D blocks on a one-slice volume
``(B, C, 1, H, W)`` with ``(1, 3, 3)`` kernels, which is exactly a 2D network. With the MLP lift each
(h, w) column's depth profile comes from that position's 2D features (their receptive field), then
the 3x3x3 convolutions mix neighbouring columns and slices.

**Why a geometric lift.** The film is a cone-beam projection: a voxel near the source is magnified
more than one near the detector, so the film pixel that "sees" voxel (d, h, w) moves with d. The MLP
must learn that ray geometry (and which film pixels belong to which column) from a few patients;
the geometric lift builds it in (each voxel gets the features of the film point on its ray), so the
network only learns *what lies along each ray* (the depth embedding and the 3D convolutions).

Ray geometry (see :mod:`XctDiffCore.drr`): D runs anterior -> posterior, the source is posterior and
the detector anterior. A voxel at transverse offset ``p`` (mm from the axis) and depth ``t`` (mm from
the isocentre, + posterior) projects to ``p * M(t)`` on the detector, ``M(t) = SID / (SAD - t)``: about
1.36 for the most anterior slice (d = 0) and 2.48 for the most posterior (d = depth - 1) with the
defaults. The film spans ``detector_size_mm``. The parallel geometry has ``M = 1`` and a film spanning
the CT cube (as :func:`~XctDiffCore.drr.render_drr`'s parallel rays).

Training target (the training loop's job): the paired CT's latent ``y_ct = vqgan.quantize(vqgan.encode(ct))[0]``
(normalised); ``forward`` returns ``N(Conv(x))`` in the same normalised space, so the latent-space loss is
``F.mse_loss(encoder(xray), y_ct)``, smooth, without the quantiser in the way; an image-space term can
decode ``encoder.prior(xray, vqgan.quantize)`` (straight-through gradient) with the frozen decoder.
The diffusion model is conditioned on ``y = encoder.prior(xray, vqgan.quantize) = N(q(Conv(x)))``.
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .blocks import Conv3d, Downsample3d, ResBlock3d, conv3d, normalization
from .quantize import homogeneous_normalize

PLANE_KERNEL = (1, 3, 3)  # on the one-slice volume: a 3x3 2D convolution
LIFTS = ("mlp", "geometric")
GEOMETRIES = ("cone", "parallel")


def ray_sampling_grid(
    depth: int,
    side: int,
    geometry: str = "cone",
    source_to_isocenter_mm: float = 541.0,
    source_to_detector_mm: float = 949.0,
    detector_size_mm: float = 500.0,
    field_of_view_mm: float = 320.0,
) -> torch.Tensor:
    """Where each voxel centre of the ``(depth, side, side)`` latent grid projects on the film.

    Returns ``(depth, side, side, 2)`` in ``grid_sample`` units (``align_corners=False``; last axis
    ``[x = W, y = H]``; outside [-1, 1] is off the film). The grid covers the ``field_of_view_mm`` cube
    centred on the isocentre; the film spans ``detector_size_mm`` (cone) or the cube (parallel).
    """
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}; choose one of {', '.join(GEOMETRIES)}")
    if field_of_view_mm <= 0:
        raise ValueError("field_of_view_mm must be positive")

    def centres(n: int) -> torch.Tensor:  # voxel centres, mm from the isocentre
        return (torch.arange(n, dtype=torch.float64) + 0.5 - n / 2.0) * (field_of_view_mm / n)

    if geometry == "cone":
        sad, sid = source_to_isocenter_mm, source_to_detector_mm
        if not 0 < sad < sid or detector_size_mm <= 0:
            raise ValueError("need 0 < source_to_isocenter_mm < source_to_detector_mm and detector_size_mm > 0")
        if sad <= field_of_view_mm / 2:
            raise ValueError("the source lies inside the CT cube: increase source_to_isocenter_mm")
        magnification = sid / (sad - centres(depth))  # (depth,): + depth is posterior, toward the source
        half_film = detector_size_mm / 2
    else:
        magnification = torch.ones(depth, dtype=torch.float64)
        half_film = field_of_view_mm / 2
    p = centres(side)  # (side,) transverse offsets of the voxel centres, the same along H and W
    x = magnification.view(depth, 1, 1) * p.view(1, 1, side) / half_film  # (depth, 1, side): W
    y = magnification.view(depth, 1, 1) * p.view(1, side, 1) / half_film  # (depth, side, 1): H
    return torch.stack(torch.broadcast_tensors(x, y), dim=-1).float()  # (depth, side, side, 2)


class ProgressiveEncoder(nn.Module):
    """Radiograph ``(B, in_channels, S, S)`` -> normalised latent ``(B, latent_channels, depth, S/f, S/f)``.

    Args:
        image_size: S, the radiograph's side in pixels (checked at ``forward``).
        in_channels: radiograph channels (1).
        channels_2d: widths of the 2D encoder's levels; each level after the first halves the size.
        num_res_blocks: ResBlocks per 2D level.
        depth: number of coronal slices the lift creates: the VQ latent's D (32 for 128^3 CTs).
        lift_channels: C', features per slice after the lift.
        channels_3d: widths of the 3D ResBlocks after the lift (one block each).
        latent_channels: the VQ-GAN's latent channels (8).
        norm_groups: GroupNorm groups (reduced to a divisor of tiny widths).
        lift: ``"mlp"`` (the paper's, per-column MLP) or ``"geometric"`` (back-projection along the
            DRR's rays plus a learned depth embedding; see the module docstring).
        geometry: the geometric lift's rays, ``"cone"`` or ``"parallel"``: the training DRRs' geometry.
        source_to_isocenter_mm, source_to_detector_mm, detector_size_mm: the cone geometry; the
            defaults are :class:`XctDiffCore.drr.ConeGeometry`'s (copied: the model does not import drr).
        field_of_view_mm: the CT cube's side: 128 voxels x 2.5 mm (a pooled grid, e.g. tiny's 32^3, spans the same cube).
    """

    def __init__(
        self,
        image_size: int = 128,
        in_channels: int = 1,
        channels_2d: Sequence[int] = (32, 64, 128),
        num_res_blocks: int = 1,
        depth: int = 32,
        lift_channels: int = 16,
        channels_3d: Sequence[int] = (64, 64),
        latent_channels: int = 8,
        norm_groups: int = 32,
        lift: str = "mlp",
        geometry: str = "cone",
        source_to_isocenter_mm: float = 541.0,  # = drr.ConeGeometry
        source_to_detector_mm: float = 949.0,  # = drr.ConeGeometry
        detector_size_mm: float = 500.0,  # = drr.ConeGeometry
        field_of_view_mm: float = 320.0,  # 128 voxels x 2.5 mm (preprocess.preprocess_ct)
    ):
        super().__init__()
        if lift not in LIFTS:
            raise ValueError(f"unknown lift {lift!r}; choose one of {', '.join(LIFTS)}")
        if geometry not in GEOMETRIES:
            raise ValueError(f"unknown geometry {geometry!r}; choose one of {', '.join(GEOMETRIES)}")
        channels_2d = tuple(int(c) for c in channels_2d)
        channels_3d = tuple(int(c) for c in channels_3d)
        if not channels_2d or not channels_3d:
            raise ValueError("channels_2d and channels_3d need at least one width each")
        self.downsample_factor = 2 ** (len(channels_2d) - 1)
        if image_size % self.downsample_factor:
            raise ValueError(f"image_size {image_size} must be a multiple of {self.downsample_factor}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.depth = depth
        self.lift_channels = lift_channels
        self.latent_channels = latent_channels
        self.lift_kind = lift

        layers: list[nn.Module] = [Conv3d(in_channels, channels_2d[0], PLANE_KERNEL, padding=(0, 1, 1))]
        prev = channels_2d[0]
        for i, width in enumerate(channels_2d):
            for _ in range(num_res_blocks):
                layers.append(ResBlock3d(prev, width, kernel=PLANE_KERNEL, groups=norm_groups))
                prev = width
            if i < len(channels_2d) - 1:
                layers.append(Downsample3d(width, factor=(1, 2, 2)))
        layers += [normalization(prev, norm_groups), nn.SiLU(inplace=True)]
        self.encoder_2d = nn.Sequential(*layers)

        if lift == "mlp":
            self.lift = nn.Sequential(
                nn.LayerNorm(prev), nn.Linear(prev, prev), nn.GELU(), nn.Linear(prev, depth * lift_channels)
            )
        else:
            side = image_size // self.downsample_factor
            grid = ray_sampling_grid(
                depth, side, geometry, source_to_isocenter_mm, source_to_detector_mm, detector_size_mm, field_of_view_mm
            )
            # Fixed by the geometry: not a parameter, and not in the state dict.
            self.register_buffer("ray_grid", grid, persistent=False)  # (depth, h, w, [x, y])
            self.lift = Conv3d(prev, lift_channels, 1)
            # About the scale of the 1x1x1 conv's outputs at initialisation (~0.2), so depth shows from the start.
            self.depth_embedding = nn.Parameter(0.2 * torch.randn(lift_channels, depth))  # (C', depth)

        layers = [Conv3d(lift_channels, channels_3d[0], 3, padding=1)]
        prev = channels_3d[0]
        for width in channels_3d:
            layers.append(ResBlock3d(prev, width, groups=norm_groups))
            prev = width
        layers += [normalization(prev, norm_groups), nn.SiLU(inplace=True), Conv3d(prev, latent_channels, 3, padding=1)]
        self.encoder_3d = nn.Sequential(*layers)

    @property
    def latent_shape(self) -> Tuple[int, int, int, int]:
        """``(latent_channels, depth, S/f, S/f)``: must equal the VQ-GAN's latent shape of the CT."""
        side = self.image_size // self.downsample_factor
        return (self.latent_channels, self.depth, side, side)

    def forward(self, xray: torch.Tensor) -> torch.Tensor:
        """``N(Conv(x))``: the normalised, not yet quantised latent ``(B, latent_channels, depth, S/f, S/f)``."""
        return homogeneous_normalize(self.encoder_3d(self.lifted(xray)), dim=1)

    def lifted(self, xray: torch.Tensor) -> torch.Tensor:
        """The 2D encoder and the lift: the film's features in the volume ``(B, C', depth, S/f, S/f)``."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if xray.ndim != 4 or tuple(xray.shape[1:]) != expected:
            raise ValueError(f"expected a radiograph batch (B, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(xray.shape)}")
        features = self.encoder_2d(xray[:, :, None])  # (B, C, 1, h, w)
        b, _, _, h, w = features.shape
        if self.lift_kind == "mlp":
            columns = self.lift(features[:, :, 0].permute(0, 2, 3, 1))  # (B, h, w, depth * C')
            return columns.reshape(b, h, w, self.depth, self.lift_channels).permute(0, 4, 3, 1, 2)  # (B, C', depth, h, w)
        # The 1x1x1 convolution C -> C' and the back-projection are both linear, so they commute: it runs on
        # the film's h*w features before the sampling rather than on the depth*h*w voxels after it (C'/C of
        # the channels to sample, 1/depth of the products: 2.4x faster a lift on the 2-core CPU). Its bias
        # joins the depth embedding after the sampling, where the voxels whose ray misses the film got zeros.
        film = conv3d(features, self.lift.weight)[:, :, 0]  # (B, C', h, w)
        volume = self._back_project(film)  # (B, C', depth, h, w)
        offset = self.lift.bias[:, None] + self.depth_embedding  # (C', depth): the same per slice d
        return volume + offset[:, :, None, None].to(volume.dtype)

    def _back_project(self, features: torch.Tensor) -> torch.Tensor:
        """The film's features ``(B, C, h, w)`` at every voxel's ray point: ``(B, C, depth, h, w)``."""
        # Sample in at least fp32: a bf16 grid would misplace the points by a fraction of a pixel.
        dtype = torch.promote_types(features.dtype, torch.float32)
        grid = rearrange(self.ray_grid, "d h w xy -> 1 (d h) w xy").to(dtype).expand(features.shape[0], -1, -1, -1)
        samples = F.grid_sample(features.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return rearrange(samples, "b c (d h) w -> b c d h w", d=self.depth).to(features.dtype)

    def prior(self, xray: torch.Tensor, quantize: Callable[[torch.Tensor], Tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """The condition of the diffusion model, ``y = N(q(Conv(x)))``; pass ``vqgan.quantize`` (frozen).

        ``quantize(z)`` returns ``(z_q normalised, loss, indices)``; only ``z_q`` is kept. Normalising
        twice is harmless (N is idempotent), so the quantiser may normalise again.
        """
        return quantize(self(xray))[0]
