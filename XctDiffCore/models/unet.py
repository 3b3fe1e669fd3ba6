"""The denoiser of XctDiff's latent diffusion: a UNet with 3x3x1 convolutions, conditioned on the prior y.

**Which axis.** Latents are ``(B, C, D, H, W)`` with ``D`` the coronal depth (Anterior -> Posterior, the
X-ray direction) and ``(H, W)`` the radiograph's plane (see :mod:`XctDiffCore.layout`). Every
convolution here has kernel ``(1, 3, 3)`` (or ``(1, 1, 1)``) over ``(D, H, W)``: it works within one
coronal slice, the plane the radiograph faces, and never across slices. Down/up-sampling halves and
doubles ``H`` and ``W`` only; ``D`` keeps its full size at every level.

**Mixing along D** comes from attention, where the 1-wide kernels cannot reach:

* depth attention: self-attention along ``D`` within each ``(h, w)`` column (sequences of length D,
  cheap), with a sinusoidal code of the slice index so that front and back differ; at every level
  flagged in ``attention_levels`` and always in the middle block;
* with ``conditioning="cross_attention"``, cross-attention from every voxel of those levels to the
  tokens of y (the paper): y goes through a small ``(1,3,3)`` stem, a strided conv down to the
  bottleneck's grid ``(D, H/f, W/f)`` and one ResBlock there; queries and tokens carry a 3D sinusoidal code of their position in latent voxel
  units, so the attention can learn the (near-diagonal) alignment of x and y.

``conditioning="concat"`` (the released reference code) instead concatenates y to ``x_t`` at the input.

Each level: ``num_res_blocks`` x [ResBlock (+ attention)], then a down-sampler; the decoder mirrors it
with skip connections. Time: sinusoidal embedding -> MLP -> an additive shift in every ResBlock.
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from .blocks import Conv3d, Downsample3d, ResBlock3d, Upsample3d, normalization

PLANE_KERNEL = (1, 3, 3)  # (D, H, W): in the radiograph's plane only


def sinusoidal_embedding(positions: torch.Tensor, channels: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sin/cos code ``(N,) -> (N, channels)`` (zero-padded when ``channels`` is odd)."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs[None, :]
    code = torch.cat([angles.sin(), angles.cos()], dim=1)
    return nn.functional.pad(code, (0, channels - 2 * half))


def grid_embedding(grid: Sequence[int], steps: Sequence[float], channels: int, device) -> torch.Tensor:
    """Code of a 3D grid's voxel centres ``(d*h*w, channels)``: a third of the channels per axis.

    ``steps`` is the voxel size per axis in latent voxel units, so grids of different resolutions
    over the same volume (queries at one level, tokens of y at another) share one coordinate frame.
    """
    per_axis = channels // 3
    codes = []
    for size, step in zip(grid, steps):
        centres = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) * step
        codes.append(sinusoidal_embedding(centres, per_axis))
    d, h, w = (c.shape[0] for c in codes)
    code = torch.cat(
        [
            codes[0][:, None, None, :].expand(d, h, w, per_axis),
            codes[1][None, :, None, :].expand(d, h, w, per_axis),
            codes[2][None, None, :, :].expand(d, h, w, per_axis),
        ],
        dim=-1,
    ).reshape(d * h * w, 3 * per_axis)
    return nn.functional.pad(code, (0, channels - 3 * per_axis))


def _attention(channels: int, num_heads: int, context_channels: Optional[int] = None) -> nn.MultiheadAttention:
    """Multi-head attention whose output projection starts at zero: the residual block starts as identity."""
    attn = nn.MultiheadAttention(channels, num_heads, batch_first=True, kdim=context_channels, vdim=context_channels)
    nn.init.zeros_(attn.out_proj.weight)
    nn.init.zeros_(attn.out_proj.bias)
    return attn


class DepthAttention(nn.Module):
    """Self-attention along D within each (h, w) column: the UNet's only mixing across coronal slices."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.norm = normalization(channels, groups)
        self.attn = _attention(channels, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * h * w, d, c)  # b c d h w -> (b h w) d c
        tokens = tokens + sinusoidal_embedding(torch.arange(d, device=x.device), c).to(tokens.dtype)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return x + out.reshape(b, h, w, d, c).permute(0, 4, 3, 1, 2)  # (b h w) d c -> b c d h w


class CrossAttention(nn.Module):
    """Every voxel of x (queries) attends to the tokens of the prior y (keys and values)."""

    def __init__(self, channels: int, context_channels: int, num_heads: int, groups: int):
        super().__init__()
        self.norm = normalization(channels, groups)
        self.attn = _attention(channels, num_heads, context_channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, in_plane_step: int) -> torch.Tensor:
        """``x`` (B, C, D, h, w) at in-plane voxel size ``in_plane_step``; ``context`` (B, N, C_ctx)."""
        b, c, d, h, w = x.shape
        queries = self.norm(x).flatten(2).transpose(1, 2)  # b c d h w -> b (d h w) c
        queries = queries + grid_embedding((d, h, w), (1, in_plane_step, in_plane_step), c, x.device).to(queries.dtype)
        out, _ = self.attn(queries, context, context, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, d, h, w)


class ContextEncoder(nn.Module):
    """Prior y (B, C_y, D, H, W) -> tokens (B, D * H/f * W/f, channels) with their position code.

    Narrow at full resolution (a stem of ``stem_channels``), wide only on the coarse token grid.
    """

    def __init__(self, latent_channels: int, stem_channels: int, channels: int, factor: int, groups: int):
        super().__init__()
        self.factor = factor
        self.stem = Conv3d(latent_channels, stem_channels, PLANE_KERNEL, padding=(0, 1, 1))
        self.pool = Conv3d(stem_channels, channels, (1, factor, factor), stride=(1, factor, factor))
        self.block = ResBlock3d(channels, channels, kernel=PLANE_KERNEL, groups=groups)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h = self.block(self.pool(nn.functional.silu(self.stem(y))))
        b, c, d, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # b c d h w -> b (d h w) c
        return tokens + grid_embedding((d, hh, ww), (1, self.factor, self.factor), c, y.device).to(tokens.dtype)


class LatentUNet(nn.Module):
    """eps_theta(x_t, t, y): predicts the noise in the latent ``x_t`` given the prior ``y``.

    Args:
        latent_channels: channels of x_t, of y and of the output (the VQ-GAN's 8).
        channels: width per level; each level after the first halves H and W (D stays).
        num_res_blocks: ResBlocks per level in the encoder (the decoder has the same number).
        attention_levels: per level, whether its blocks get depth attention (and cross-attention).
        num_heads: attention heads (must divide the widths of the attention levels).
        conditioning: ``"cross_attention"`` (the paper: y tokens at the attention levels and the middle)
            or ``"concat"`` (the reference code: y concatenated to x_t at the input).
        norm_groups: GroupNorm groups (reduced to a divisor of tiny widths).

    ``forward(x_t, t, cond)``: ``x_t`` and ``cond`` (B, latent_channels, D, H, W) with H and W multiples
    of ``2 ** (len(channels) - 1)``; ``t`` (B,) integer timesteps; returns eps like ``x_t``.
    """

    def __init__(
        self,
        latent_channels: int = 8,
        channels: Sequence[int] = (64, 128, 256),
        num_res_blocks: int = 1,
        attention_levels: Sequence[bool] = (False, True, True),
        num_heads: int = 4,
        conditioning: Literal["cross_attention", "concat"] = "cross_attention",
        norm_groups: int = 32,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        attention_levels = tuple(bool(a) for a in attention_levels)
        if len(attention_levels) != len(channels):
            raise ValueError("attention_levels needs one flag per level of channels")
        if conditioning not in ("cross_attention", "concat"):
            raise ValueError(f"conditioning must be 'cross_attention' or 'concat', got {conditioning!r}")
        self.latent_channels = latent_channels
        self.conditioning = conditioning
        self.in_plane_factor = 2 ** (len(channels) - 1)
        cross = conditioning == "cross_attention"
        time_channels = 4 * channels[0]
        context_channels = channels[-1]

        self.time_mlp = nn.Sequential(
            nn.Linear(channels[0], time_channels), nn.SiLU(), nn.Linear(time_channels, time_channels)
        )
        self.context = (
            ContextEncoder(latent_channels, channels[0], context_channels, self.in_plane_factor, norm_groups) if cross else None
        )
        in_channels = latent_channels if cross else 2 * latent_channels
        self.conv_in = Conv3d(in_channels, channels[0], PLANE_KERNEL, padding=(0, 1, 1))

        def res(cin: int, cout: int) -> ResBlock3d:
            return ResBlock3d(cin, cout, kernel=PLANE_KERNEL, groups=norm_groups, emb_channels=time_channels)

        def attention(width: int) -> nn.ModuleDict:
            parts = {"depth": DepthAttention(width, num_heads, norm_groups)}
            if cross:
                parts["cross"] = CrossAttention(width, context_channels, num_heads, norm_groups)
            return nn.ModuleDict(parts)

        # Encoder: level i = [res (+ attn)] x num_res_blocks, then down-sample (not after the last level).
        self.down = nn.ModuleList()
        prev = channels[0]
        for i, width in enumerate(channels):
            level = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.append(nn.ModuleList([res(prev, width), attention(width) if attention_levels[i] else nn.Identity()]))
                prev = width
            self.down.append(level)
        self.downsamplers = nn.ModuleList(Downsample3d(w, factor=(1, 2, 2)) for w in channels[:-1])

        self.mid_res1 = res(prev, prev)
        self.mid_attention = attention(prev)
        self.mid_res2 = res(prev, prev)

        # Decoder: level i = [res on (h ++ skip) (+ attn)] x num_res_blocks, then up-sample (not at level 0).
        self.up = nn.ModuleList()
        for i in reversed(range(len(channels))):
            width = channels[i]
            level = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.append(nn.ModuleList([res(prev + width, width), attention(width) if attention_levels[i] else nn.Identity()]))
                prev = width
            self.up.append(level)
        self.upsamplers = nn.ModuleList(
            Upsample3d(w, factor=(1, 2, 2), kernel=PLANE_KERNEL) for w in reversed(channels[1:])
        )

        self.out = nn.Sequential(
            normalization(channels[0], norm_groups),
            nn.SiLU(),
            Conv3d(channels[0], latent_channels, PLANE_KERNEL, padding=(0, 1, 1)),
        )
        nn.init.zeros_(self.out[-1].weight)  # predicts eps = 0 at initialisation
        nn.init.zeros_(self.out[-1].bias)

    def _attend(self, block: nn.Module, h: torch.Tensor, context: Optional[torch.Tensor], step: int) -> torch.Tensor:
        if isinstance(block, nn.Identity):
            return h
        h = block["depth"](h)
        if "cross" in block:
            h = block["cross"](h, context, step)
        return h

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        f = self.in_plane_factor
        if x_t.shape[-2] % f or x_t.shape[-1] % f:
            raise ValueError(f"H and W of the latent ({tuple(x_t.shape[-2:])}) must be multiples of {f}")
        if cond.shape != x_t.shape:
            raise ValueError(f"cond {tuple(cond.shape)} must have the shape of x_t {tuple(x_t.shape)}")
        emb = self.time_mlp(sinusoidal_embedding(t.reshape(-1), self.time_mlp[0].in_features).to(x_t.dtype))
        if self.context is not None:
            context, h = self.context(cond), self.conv_in(x_t)
        else:
            context, h = None, self.conv_in(torch.cat([x_t, cond], dim=1))

        skips = []
        for i, level in enumerate(self.down):
            for block, attn in level:
                h = self._attend(attn, block(h, emb), context, 2**i)
                skips.append(h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)

        h = self.mid_res1(h, emb)
        h = self._attend(self.mid_attention, h, context, f)
        h = self.mid_res2(h, emb)

        for j, level in enumerate(self.up):
            i = len(self.up) - 1 - j  # the level's index in `channels`
            for block, attn in level:
                h = self._attend(attn, block(torch.cat([h, skips.pop()], dim=1), emb), context, 2**i)
            if j < len(self.upsamplers):
                h = self.upsamplers[j](h)
        return self.out(h)
