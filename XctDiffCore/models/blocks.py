"""Small 3D building blocks shared by the networks (VQ-GAN, progressive encoder, UNet).

Kept deliberately few and stable: a GroupNorm factory, a pre-activation residual block with an
anisotropic kernel (the UNet's 3x3x1 convolutions are ``kernel=(1, 3, 3)`` over ``(D, H, W)``), and a
strided-conv down-sampler / nearest+conv up-sampler with a per-axis factor. GroupNorm everywhere:
3D volumes train at batch 1-2, where BatchNorm statistics are noise. Every 3D convolution of the
networks is :class:`Conv3d` (``nn.Conv3d``'s parameters), whose float32 CPU forward avoids PyTorch's
slow paths for one volume (:func:`conv3d`).
"""
from __future__ import annotations

import math
import platform
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


def suggest_memory_format(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last_3d`` when a 5-D ``x`` is laid out channels-last (the CPU bf16 path), else contiguous.

    Why: a new tensor made in the other layout costs a full copy at the next convolution, and mixed
    layouts make element-wise ops several times slower (issue 20's profile of the 128^3 decoder).
    """
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


#: oneDNN is called directly only where that was measured (x86-64): on ARM its kernels come from another backend.
_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> torch.Tensor:
    """``F.conv3d`` (numeric padding), but by oneDNN for a float32 CPU input of any size.

    Why (issue 20): PyTorch sends a batch-1 float32 input whose ``N*C*D*H`` is at most 20480 to its
    reference kernel, 2-4x slower on the 2-core CPU than oneDNN (the decoder's expansion in slabs, 32 x 10
    x 64 x 64, took 38 % of a fp32 decode there). Other dtypes, devices, builds and machines take ``F.conv3d``,
    except for one-channel outputs (:func:`_one_image_conv3x3x3`).
    """
    if torch.compiler.is_compiling():  # a compiled graph picks its own kernels
        return F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and not x.is_mkldnn
            and not torch.is_autocast_enabled("cpu")):  # bf16 autocast: F.conv3d casts, and oneDNN runs it anyway
        if _is_one_image_3x3x3(x, weight, stride, padding, dilation, groups):
            return _one_image_conv3x3x3(x, weight, bias, _triple(padding))
        if _X86_64 and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
            return torch.mkldnn_convolution(x, weight, bias, _triple(padding), _triple(stride), _triple(dilation),
                                            groups)
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups)


#: The largest per-tap product array (27 one-channel volumes) :func:`_one_image_conv3x3x3` makes, in bytes.
ONE_IMAGE_TAPS_BYTES = 64 * 2 ** 20


def _is_one_image_3x3x3(x, weight, stride, padding, dilation, groups) -> bool:
    """Whether :func:`_one_image_conv3x3x3` applies: one volume in, one channel out, a 3x3x3 kernel
    with stride and dilation 1 and padding 0 or 1, no gradients, and its 27 products within the bound."""
    return (weight.shape[0] == 1 and tuple(weight.shape[2:]) == (3, 3, 3) and x.dim() == 5 and x.shape[0] == 1
            and groups == 1 and _triple(stride) == (1, 1, 1) and _triple(dilation) == (1, 1, 1)
            and all(p in (0, 1) for p in _triple(padding)) and not torch.is_grad_enabled()
            and 27 * x[0, 0].numel() * x.element_size() <= ONE_IMAGE_TAPS_BYTES)


def _one_image_conv3x3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         padding: Triple) -> torch.Tensor:
    """A 3x3x3 convolution to one output channel as one matrix product (each voxel's 27 tap products) and 27
    shifted sums. Why (issue 20): oneDNN runs a one-channel output at a few GFLOP/s (nothing to vectorise
    over); the VQ decoder's last layers, a few GFLOP in all, took 13 % of an fp32 decode, 2.3-3.5x longer."""
    channels, (d, h, w) = x.shape[1], x.shape[2:]
    taps = weight[0].permute(1, 2, 3, 0).reshape(27, channels)  # tap (kd, kh, kw) x input channel
    if suggest_memory_format(x) == torch.channels_last_3d:  # (D, H, W, C) in memory: voxels x channels
        products = (x[0].permute(1, 2, 3, 0).reshape(-1, channels) @ taps.T).T.unflatten(1, (d, h, w))
    else:
        products = (taps @ x.reshape(channels, -1)).view(27, d, h, w)  # a copy first if x is strided otherwise
    size = tuple(n + 2 * p - 2 for n, p in zip((d, h, w), padding))
    out = torch.zeros(size, dtype=x.dtype, device=x.device)
    for tap, kernel in enumerate((a, b, c) for a in range(3) for b in range(3) for c in range(3)):
        # Output o reads input o + k - p: only where that lies inside the volume (the zero padding adds nothing).
        o = [slice(max(0, p - k), min(n_out, n_in + p - k))
             for k, p, n_out, n_in in zip(kernel, padding, size, (d, h, w))]
        i = tuple(slice(s.start + k - p, s.stop + k - p) for s, k, p in zip(o, kernel, padding))
        out[tuple(o)] += products[(tap, *i)]
    if bias is not None:
        out += bias.to(x.dtype)
    return out[None, None]


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (the same parameters and state-dict keys) whose zero-padded forward runs :func:`conv3d`."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(x, weight, bias)
        return conv3d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


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
        self.conv1 = Conv3d(in_channels, out_channels, kernel, padding=padding)
        self.emb_proj = nn.Linear(emb_channels, out_channels) if emb_channels > 0 else None
        self.norm2 = normalization(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv3d(out_channels, out_channels, kernel, padding=padding)
        self.skip = Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # in place: no second volume to allocate
        if self.emb_proj is not None:
            h = h + self.emb_proj(F.silu(emb))[:, :, None, None, None]  # (B, C) -> (B, C, 1, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return self.skip(x) + h


class Downsample3d(nn.Module):
    """Strided convolution; ``factor=(1, 2, 2)`` halves H and W only. Even sizes are halved exactly."""

    def __init__(self, channels: int, factor: Sequence[int] = (2, 2, 2)):
        super().__init__()
        factor = _triple(factor)
        kernel = tuple(3 if f > 1 else 1 for f in factor)
        padding = tuple(k // 2 for k in kernel)
        self.conv = Conv3d(channels, channels, kernel, stride=factor, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3d(nn.Module):
    """Nearest-neighbour up-sampling then a convolution (no checkerboard artefacts of transposed convs).

    Computed without making the up-sampled volume (the same numbers, to float rounding): along an
    axis up-sampled by 2, output ``2i + a`` of a 3-tap kernel ``(w0, w1, w2)`` sees only the inputs
    ``i - 1, i`` (parity 0: taps ``w0, w1 + w2``) or ``i, i + 1`` (parity 1: ``w0 + w1, w2``). So each
    of the (up to) 8 parities is a 2x2x2 convolution of the low-resolution input: 8 taps instead of
    27 at each output voxel, and no 8x larger intermediate (the VQ decoder's most expensive layer on
    a CPU; issue 20). Other kernels and factors take the plain path.
    """

    def __init__(self, channels: int, factor: Sequence[int] = (2, 2, 2), kernel: Sequence[int] = (3, 3, 3)):
        super().__init__()
        self.factor = _triple(factor)
        kernel = _triple(kernel)
        self.conv = Conv3d(channels, channels, kernel, padding=tuple(k // 2 for k in kernel))
        self.subpixel = kernel == (3, 3, 3) and all(f in (1, 2) for f in self.factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.subpixel:
            return _nearest_up_conv3x3x3(x, self.conv.weight, self.conv.bias, self.factor)
        return self.conv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))


# Per parity of an axis up-sampled by 2: which of the 3 taps add up into each of the 2 effective taps.
_PARITY_TAPS = ((( 1.0, 0.0, 0.0), (0.0, 1.0, 1.0)),   # output 2i:     x[i-1] * w0 + x[i] * (w1 + w2)
                (( 1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))   # output 2i + 1: x[i] * (w0 + w1) + x[i+1] * w2


def _nearest_up_conv3x3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], factor: Triple) -> torch.Tensor:
    """``conv3d(interpolate(x, factor, "nearest"), weight, bias, padding=1)`` for factors 1 or 2 per axis, by parities."""
    padded = F.pad(x, (1, 1, 1, 1, 1, 1))  # the zero padding of the up-sampled volume, on the coarse grid
    sizes = x.shape[2:]
    axes = []  # per axis, per parity: (tap matrix, first index in padded, window length, output offset)
    for f in factor:
        if f == 1:
            axes.append([(torch.eye(3), 0, 3, 0)])
        else:
            axes.append([(torch.tensor(_PARITY_TAPS[a]), a, 2, a) for a in (0, 1)])
    parities = [(d, h, w) for d in axes[0] for h in axes[1] for w in axes[2]]
    with torch.autocast(x.device.type, enabled=False):  # sum the taps in the weights' own precision
        kernels = [torch.einsum("px,qy,rz,oixyz->oipqr", d[0].to(weight), h[0].to(weight), w[0].to(weight), weight)
                   for d, h, w in parities]
    out = None
    for (d, h, w), kernel in zip(parities, kernels):
        window = padded[:, :, d[1]: d[1] + sizes[0] + d[2] - 1, h[1]: h[1] + sizes[1] + h[2] - 1,
                        w[1]: w[1] + sizes[2] + w[2] - 1]
        y = conv3d(window, kernel, bias)
        if out is None:  # in y's layout: a channels-last result stays channels-last (no copy by the next layer)
            out = torch.empty(*y.shape[:2], *(n * f for n, f in zip(sizes, factor)), dtype=y.dtype, device=y.device,
                              memory_format=suggest_memory_format(y))
        out[:, :, d[3]:: factor[0], h[3]:: factor[1], w[3]:: factor[2]] = y
    return out
