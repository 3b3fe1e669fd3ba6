"""The perceptual compression model of XctDiff: a 3D VQ-GAN with a homogeneous codebook and an SR tail.

Shapes for the paper's configuration (``channels=(c0, c1, c2)``, input ``(B, 1, 128, 128, 128)``)::

    encoder   conv_in -> [ResBlock x n](c0) @128 -> down -> [ResBlock x n](c1) @64 -> down
              -> [ResBlock x n](c2) @32 -> mid ResBlock -> GroupNorm, SiLU, conv -> z_e (B, 8, 32, 32, 32)
    quantize  N(z_e) -> nearest N(e) -> z_q (B, 8, 32, 32, 32), normalised space (see quantize.py)
    decoder   conv_in -> mid ResBlock -> [ResBlock x n](c2) @32 -> up -> [ResBlock x n](c1) @64
    SR tail   coarse = conv(h) @64;  x = trilinear_up(coarse) + residual, where
              residual = conv(c1 -> 8 c0) -> pixel-shuffle-3d (x2) -> [ResBlock x n](c0) @128 -> conv

Every ``len(channels) - 1`` levels halve the size, so the latent is ``downsample_factor = 2 **
(len(channels) - 1)`` times smaller per axis (the paper: 3 levels, factor 4); any input whose sizes are
multiples of that factor works.

**Super-resolution tail (design).** The decoder proper stops at half resolution and predicts a coarse
image there; the tail brings it to full resolution as trilinear interpolation of that image *plus* a
learned residual made by sub-pixel convolution (a 3D pixel shuffle: one conv predicts the 8 children
of each voxel). The smooth part of the CT thus comes free from interpolation and the full-resolution
layers only have to add edges and texture, which is the SR module's job in the paper; sub-pixel
convolution avoids the checkerboard of transposed convolutions. ``super_resolution=False`` (the
ablation) replaces the tail with a plain nearest up-sampling level mirroring the encoder.

No attention anywhere (memory at 32^3 tokens); GroupNorm throughout.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .blocks import Conv3d, Downsample3d, ResBlock3d, Upsample3d, normalization, suggest_memory_format
from .quantize import HomogeneousQuantizer
from .slab_inference import can_run_in_slabs, tail_in_slabs


def pixel_shuffle_3d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Sub-pixel rearrangement ``(B, C r^3, D, H, W) -> (B, C, D r, H r, W r)``, in ``x``'s memory layout.

    A channels-last ``x`` (the CPU bf16 path) gives a channels-last result in one copy; the plain
    rearrange would give a contiguous one that the next convolution copies back (issue 20).
    """
    if suggest_memory_format(x) != torch.channels_last_3d:
        return rearrange(x, "b (c r1 r2 r3) d h w -> b c (d r1) (h r2) (w r3)", r1=factor, r2=factor, r3=factor)
    b, cr, d, h, w = x.shape
    c = cr // factor ** 3
    last = x.permute(0, 2, 3, 4, 1).reshape(b, d, h, w, c, factor, factor, factor)  # a view: C is innermost
    last = last.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, d * factor, h * factor, w * factor, c)  # the one copy
    return last.permute(0, 4, 1, 2, 3)  # (B, C, D r, H r, W r) with channels-last strides


def _out_conv(channels: int, out_channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(normalization(channels, groups), nn.SiLU(inplace=True), Conv3d(channels, out_channels, 3, padding=1))


class Encoder3d(nn.Module):
    """Volume ``(B, in, D, H, W)`` -> pre-quantisation latent ``(B, latent, D/f, H/f, W/f)``."""

    def __init__(self, in_channels: int, channels: Sequence[int], num_res_blocks: int, latent_channels: int, groups: int):
        super().__init__()
        self.conv_in = Conv3d(in_channels, channels[0], 3, padding=1)
        layers = []
        prev = channels[0]
        for level, ch in enumerate(channels):
            for _ in range(num_res_blocks):
                layers.append(ResBlock3d(prev, ch, groups=groups))
                prev = ch
            if level < len(channels) - 1:
                layers.append(Downsample3d(ch))
        layers.append(ResBlock3d(prev, prev, groups=groups))  # middle block at the latent resolution
        self.blocks = nn.Sequential(*layers)
        self.conv_out = _out_conv(prev, latent_channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.blocks(self.conv_in(x)))


class SuperResolutionTail(nn.Module):
    """Half-resolution features -> full-resolution image: ``trilinear(coarse) + sub-pixel residual``."""

    def __init__(self, in_channels: int, channels: int, out_channels: int, num_res_blocks: int, groups: int):
        super().__init__()
        self.coarse = _out_conv(in_channels, out_channels, groups)
        self.expand = Conv3d(in_channels, channels * 8, 3, padding=1)  # 8 = 2^3 children per voxel
        self.blocks = nn.Sequential(*[ResBlock3d(channels, channels, groups=groups) for _ in range(num_res_blocks)])
        self.residual = _out_conv(channels, out_channels, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if can_run_in_slabs(self, h):  # inference: two full-resolution volumes alive instead of about six
            return tail_in_slabs(self, h)
        coarse = F.interpolate(self.coarse(h), scale_factor=2, mode="trilinear", align_corners=False)
        return coarse + self.residual(self.blocks(pixel_shuffle_3d(self.expand(h))))

    @property
    def last_layer(self) -> torch.Tensor:
        return self.residual[-1].weight


class Decoder3d(nn.Module):
    """Normalised latent ``(B, latent, d, h, w)`` -> volume ``(B, out, d f, h f, w f)``."""

    def __init__(
        self,
        out_channels: int,
        channels: Sequence[int],
        num_res_blocks: int,
        latent_channels: int,
        groups: int,
        super_resolution: bool,
    ):
        super().__init__()
        top = channels[-1]
        self.conv_in = Conv3d(latent_channels, top, 3, padding=1)
        layers = [ResBlock3d(top, top, groups=groups)]  # middle block
        prev = top
        # Levels from the latent resolution up to half resolution (channels[1]).
        for level in range(len(channels) - 1, 0, -1):
            ch = channels[level]
            for _ in range(num_res_blocks):
                layers.append(ResBlock3d(prev, ch, groups=groups))
                prev = ch
            if level > 1:
                layers.append(Upsample3d(ch))
        if super_resolution:
            self.blocks = nn.Sequential(*layers)
            self.head = SuperResolutionTail(prev, channels[0], out_channels, num_res_blocks, groups)
        else:
            layers.append(Upsample3d(prev))
            for _ in range(num_res_blocks):
                layers.append(ResBlock3d(prev, channels[0], groups=groups))
                prev = channels[0]
            self.blocks = nn.Sequential(*layers)
            self.head = _out_conv(prev, out_channels, groups)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.conv_in(z)))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final convolution (for the adaptive GAN weight of the loss)."""
        head = self.head
        return head.last_layer if isinstance(head, SuperResolutionTail) else head[-1].weight


class VQGAN(nn.Module):
    """3D VQ-GAN: ``encode`` -> ``quantize`` (homogeneous codebook) -> ``decode`` with an SR tail.

    Inputs are CT volumes in the model layout and intensity window of :mod:`XctDiffCore.layout`
    (``(B, 1, D, H, W)`` in ``[-1, 1]``). ``quantize`` returns ``z_q`` in the normalised space: that
    ``y = N(q(E(x)))`` is the target of the progressive encoder and the diffusion model, and
    ``decode`` expects such a latent. A continuous latent from the diffusion model can be snapped
    to the codebook first with ``quantize`` (normalising is idempotent).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        num_res_blocks: int = 1,
        latent_channels: int = 8,
        codebook_size: int = 8192,
        beta: float = 0.25,
        super_resolution: bool = True,
        norm_groups: int = 32,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError("channels needs at least two levels (one down-sampling)")
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.downsample_factor = 2 ** (len(channels) - 1)
        self.encoder = Encoder3d(in_channels, channels, num_res_blocks, latent_channels, norm_groups)
        self.quantizer = HomogeneousQuantizer(codebook_size, latent_channels, beta)
        self.decoder = Decoder3d(in_channels, channels, num_res_blocks, latent_channels, norm_groups, super_resolution)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def latent_shape(self, spatial_shape: Sequence[int]) -> Tuple[int, int, int, int]:
        """``(latent_channels, D/f, H/f, W/f)`` for an input of spatial shape ``(D, H, W)``."""
        f = self.downsample_factor
        return (self.latent_channels, *(int(s) // f for s in spatial_shape))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in, D, H, W)`` -> pre-quantisation latent ``z_e`` ``(B, latent, D/f, H/f, W/f)``."""
        f = self.downsample_factor
        if any(s % f for s in x.shape[2:]):
            raise ValueError(f"input sizes {tuple(x.shape[2:])} must be multiples of {f}")
        return self.encoder(x)

    def quantize(self, z_e: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z_e`` -> ``(z_q normalised, codebook_loss, indices (B, d, h, w))``."""
        return self.quantizer(z_e)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> volume ``(B, in, D, H, W)``."""
        return self.decoder(z_q)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices ``(B, d, h, w)`` -> volume."""
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` -> ``(x_rec, codebook_loss, indices)``."""
        z_q, codebook_loss, indices = self.quantize(self.encode(x))
        return self.decode(z_q), codebook_loss, indices

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final convolution (for the adaptive GAN weight)."""
        return self.decoder.last_layer
