"""Small 3D building blocks shared by the networks (VQ-GAN, progressive encoder, UNet).

Kept deliberately few and stable: a GroupNorm factory, a pre-activation residual block with an
anisotropic kernel (the UNet's 3x3x1 convolutions are ``kernel=(1, 3, 3)`` over ``(D, H, W)``), and a
strided-conv down-sampler / nearest+conv up-sampler with a per-axis factor. GroupNorm everywhere:
3D volumes train at batch 1-2, where BatchNorm statistics are noise.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Triple = Tuple[int, int, int]


def _triple(value) -> Triple:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"expected 3 values for (D, H, W), got {value}")
    return value


def normalization(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels`` (tiny widths work)."""
    return nn.GroupNorm(math.gcd(channels, groups), channels, eps=1e-6)


class ResBlock3d(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, Conv) x 2 plus a 1x1x1 skip when widths differ.

    ``emb_channels`` > 0 adds a per-channel shift computed from an embedding vector (e.g. the diffusion
    timestep) between the two convolutions; ``forward(x)`` without ``emb`` then is an error.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Sequence[int] = (3, 3, 3),
        groups: int = 32,
        dropout: float = 0.0,
        emb_channels: int = 0,
    ):
        super().__init__()
        kernel = _triple(kernel)
        padding = tuple(k // 2 for k in kernel)
        self.norm1 = normalization(in_channels, groups)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel, padding=padding)
        self.emb_proj = nn.Linear(emb_channels, out_channels) if emb_channels > 0 else None
        self.norm2 = normalization(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel, padding=padding)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_proj is not None:
            h = h + self.emb_proj(F.silu(emb))[:, :, None, None, None]  # (B, C) -> (B, C, 1, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample3d(nn.Module):
    """Strided convolution; ``factor=(1, 2, 2)`` halves H and W only. Even sizes are halved exactly."""

    def __init__(self, channels: int, factor: Sequence[int] = (2, 2, 2)):
        super().__init__()
        factor = _triple(factor)
        kernel = tuple(3 if f > 1 else 1 for f in factor)
        padding = tuple(k // 2 for k in kernel)
        self.conv = nn.Conv3d(channels, channels, kernel, stride=factor, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3d(nn.Module):
    """Nearest-neighbour up-sampling then a convolution (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int, factor: Sequence[int] = (2, 2, 2), kernel: Sequence[int] = (3, 3, 3)):
        super().__init__()
        self.factor = _triple(factor)
        kernel = _triple(kernel)
        self.conv = nn.Conv3d(channels, channels, kernel, padding=tuple(k // 2 for k in kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))
