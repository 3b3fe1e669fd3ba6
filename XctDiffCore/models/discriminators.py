"""PatchGAN critics of the autoencoder's GAN loss (eq. 3): one on whole volumes, one on 2D slices.

The 3D critic judges local 3D texture and the consistency between slices; the 2D critic judges the
in-plane sharpness of slices sampled along the three axes (cheap, so many slices can be judged). Both
are the pix2pix PatchGAN (Isola et al. 2017): strided 4^n convolutions, LeakyReLU(0.2), one logit per
overlapping patch. GroupNorm instead of BatchNorm: volumes come in batches of 1-2.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import normalization


class PatchDiscriminator(nn.Module):
    """PatchGAN critic for ``spatial_dims`` = 2 (slices ``(B, C, H, W)``) or 3 (volumes ``(B, C, D, H, W)``).

    ``num_layers`` stride-2 convolutions (the first without normalisation), then two stride-1
    convolutions: each output axis is ``size / 2**num_layers - 2`` (e.g. 14 for 128 with 3 layers);
    inputs must be at least ``2**num_layers * 3`` wide. Returns raw logits ``(B, 1, ...)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1, channels: int = 64, num_layers: int = 3, norm_groups: int = 32):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        layers = [conv(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, num_layers + 1):
            out = channels * min(2 ** n, 8)
            stride = 2 if n < num_layers else 1
            layers += [conv(width, out, 4, stride=stride, padding=1), normalization(out, norm_groups), nn.LeakyReLU(0.2)]
            width = out
        layers.append(conv(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
