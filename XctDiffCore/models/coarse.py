"""The coarse CT (issue 14): the film -> the CT itself at 10 mm voxels, learnt in voxel space.

The direct path decodes the progressive encoder's latent, which is trained to match latents (MSE in
the VQ latent space), not HU. What a chest looks like at the scale of centimetres (the body's outline,
the lungs, the mediastinum: most of the error of a reconstruction from one film) can instead be
learnt directly: the same network as the encoder (2D convolutions, lift, 3D convolutions), with one
output channel that is the CT average-pooled to the latent grid (32^3 of 10 mm for 128^3 CTs), as a
residual over the training patients' mean CT at that grid (a buffer, saved with the weights). On the
validation patients it scores like the direct path on its own, and their average beats both (the
README's Results): the two make different errors. The pipeline blends it into the direct path's
decoded CT (``blend`` in the stage's JSON, the coarse CT's weight).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .progressive_encoder import ProgressiveEncoder


class CoarseCT(ProgressiveEncoder):
    """Radiograph ``(B, 1, S, S)`` -> CT ``(B, 1, depth, S/f, S/f)`` in the model's [-1, 1] units.

    Takes :class:`ProgressiveEncoder`'s arguments with ``latent_channels`` = 1 (one HU channel);
    ``mean`` (a buffer) is the training mean CT on the same grid, so the network learns the residual.
    """

    def __init__(self, **encoder_args):
        super().__init__(**encoder_args)
        if self.latent_channels != 1:
            raise ValueError(f"the coarse CT has one channel (latent_channels 1), got {self.latent_channels}")
        side = self.image_size // self.downsample_factor
        self.register_buffer("mean", torch.zeros(1, 1, self.depth, side, side))

    def forward(self, xray: torch.Tensor) -> torch.Tensor:
        return self.mean + self.encoder_3d(self.lifted(xray))


def coarse_grid(volumes: torch.Tensor, size: int) -> torch.Tensor:
    """CT volumes ``(B, 1, N, N, N)`` average-pooled to ``size``^3: the coarse CT's target."""
    factor = volumes.shape[-1] // size
    if factor * size != volumes.shape[-1]:
        raise ValueError(f"the volume edge {volumes.shape[-1]} is not a multiple of the coarse grid {size}")
    return F.avg_pool3d(volumes, factor) if factor > 1 else volumes


def upsample_coarse(coarse: torch.Tensor, size) -> torch.Tensor:
    """The coarse CT ``(B, 1, d, h, w)`` trilinearly upsampled to the grid ``size`` (D, H, W)."""
    return F.interpolate(coarse, size=tuple(size), mode="trilinear", align_corners=False)


def blend_coarse(volume: torch.Tensor, coarse: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 - weight) * volume + weight * coarse``, the coarse CT upsampled to the volume's grid."""
    if weight <= 0:
        return volume
    return torch.lerp(volume, upsample_coarse(coarse.to(volume.dtype), volume.shape[2:]), weight)
