"""The progressive encoder of XctDiff (eqs. 5-6): a radiograph lifted into the VQ-GAN's latent space.

The frontal radiograph faces the CT's coronal plane, so the encoder keeps the radiograph's plane as
the model's ``(H, W)`` and *creates* the coronal depth ``D`` (the X-ray direction, see
:mod:`XctDiffCore.layout`) in one place, the lift::

    xray (B, 1, S, S)
      -> 2D encoder: conv, [ResBlock x n](c0) -> down -> ... -> [ResBlock x n](c_last)   (B, C, S/f, S/f)
      -> lift: at every (h, w) of that map, an MLP over the C features,
               LayerNorm -> Linear(C, C) -> GELU -> Linear(C, depth * C'),
               whose output index k holds slice d = k // C', channel c = k % C'     (B, C', depth, S/f, S/f)
      -> 3D convs: conv, [ResBlock 3x3x3] per width of channels_3d                      (B, c3, depth, S/f, S/f)
      -> Conv: GroupNorm, SiLU, conv 3x3x3 -> latent_channels, then N (z-score per voxel)  = forward()
      -> q: the frozen VQ-GAN quantiser (returns N(e_k))                                 = prior()

``f = 2 ** (len(channels_2d) - 1)``. The 2D encoder runs the shared 3D blocks on a one-slice volume
``(B, C, 1, H, W)`` with ``(1, 3, 3)`` kernels, which is exactly a 2D network. Each (h, w) column's
depth profile comes from that position's 2D features (their receptive field), then the 3x3x3
convolutions mix neighbouring columns and slices.

Training target (the training loop's job): the paired CT's latent ``y_ct = vqgan.quantize(vqgan.encode(ct))[0]``
(normalised); ``forward`` returns ``N(Conv(x))`` in the same normalised space, so the latent-space loss is
``F.mse_loss(encoder(xray), y_ct)``, smooth, without the quantiser in the way; an image-space term can
decode ``encoder.prior(xray, vqgan.quantize)`` (straight-through gradient) with the frozen decoder.
The diffusion model is conditioned on ``y = encoder.prior(xray, vqgan.quantize) = N(q(Conv(x)))``.
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
from torch import nn

from .blocks import Downsample3d, ResBlock3d, normalization
from .quantize import homogeneous_normalize

PLANE_KERNEL = (1, 3, 3)  # on the one-slice volume: a 3x3 2D convolution


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
    ):
        super().__init__()
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

        layers: list[nn.Module] = [nn.Conv3d(in_channels, channels_2d[0], PLANE_KERNEL, padding=(0, 1, 1))]
        prev = channels_2d[0]
        for i, width in enumerate(channels_2d):
            for _ in range(num_res_blocks):
                layers.append(ResBlock3d(prev, width, kernel=PLANE_KERNEL, groups=norm_groups))
                prev = width
            if i < len(channels_2d) - 1:
                layers.append(Downsample3d(width, factor=(1, 2, 2)))
        layers += [normalization(prev, norm_groups), nn.SiLU()]
        self.encoder_2d = nn.Sequential(*layers)

        self.lift = nn.Sequential(
            nn.LayerNorm(prev), nn.Linear(prev, prev), nn.GELU(), nn.Linear(prev, depth * lift_channels)
        )

        layers = [nn.Conv3d(lift_channels, channels_3d[0], 3, padding=1)]
        prev = channels_3d[0]
        for width in channels_3d:
            layers.append(ResBlock3d(prev, width, groups=norm_groups))
            prev = width
        layers += [normalization(prev, norm_groups), nn.SiLU(), nn.Conv3d(prev, latent_channels, 3, padding=1)]
        self.encoder_3d = nn.Sequential(*layers)

    @property
    def latent_shape(self) -> Tuple[int, int, int, int]:
        """``(latent_channels, depth, S/f, S/f)``: must equal the VQ-GAN's latent shape of the CT."""
        side = self.image_size // self.downsample_factor
        return (self.latent_channels, self.depth, side, side)

    def forward(self, xray: torch.Tensor) -> torch.Tensor:
        """``N(Conv(x))``: the normalised, not yet quantised latent ``(B, latent_channels, depth, S/f, S/f)``."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if xray.ndim != 4 or tuple(xray.shape[1:]) != expected:
            raise ValueError(f"expected a radiograph batch (B, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(xray.shape)}")
        features = self.encoder_2d(xray[:, :, None])  # (B, C, 1, h, w)
        b, _, _, h, w = features.shape
        columns = self.lift(features[:, :, 0].permute(0, 2, 3, 1))  # (B, h, w, depth * C')
        volume = columns.reshape(b, h, w, self.depth, self.lift_channels).permute(0, 4, 3, 1, 2)  # (B, C', depth, h, w)
        return homogeneous_normalize(self.encoder_3d(volume), dim=1)

    def prior(self, xray: torch.Tensor, quantize: Callable[[torch.Tensor], Tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """The condition of the diffusion model, ``y = N(q(Conv(x)))``; pass ``vqgan.quantize`` (frozen).

        ``quantize(z)`` returns ``(z_q normalised, loss, indices)``; only ``z_q`` is kept. Normalising
        twice is harmless (N is idempotent), so the quantiser may normalise again.
        """
        return quantize(self(xray))[0]
