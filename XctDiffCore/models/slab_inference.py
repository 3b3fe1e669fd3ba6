"""The VQ decoder's full-resolution tail without gradients, computed in depth slabs: two volumes alive, not six.

Why (issue 20): at 128³ the super-resolution tail (:class:`~XctDiffCore.models.vqgan.SuperResolutionTail`)
is the decoder's memory peak. Layer by layer it keeps the expanded 64³ features, their pixel-shuffled
copy, each residual block's input, normalised input and two convolution outputs alive at once: about
5.6 volumes of ``channels[0]`` x 128³ (719 MiB for ``small`` in bf16). Under the engine's memory policy,
which keeps freed memory for reuse (:mod:`XctDiffCore.memory`), the small blocks made between those
volumes split the freed ones, so the kept heap grew to twice that (1.41 GiB above the baseline).

Here the same arithmetic runs with one volume ``x`` (the residual stream) and one buffer ``h`` (a block's
first convolution) at full resolution, everything else in slabs of a few slices along depth:

* GroupNorm needs whole-volume statistics, so each normalisation first reads its volume slab by slab
  (:func:`group_stats`), then normalises each slab on the fly (``batch_norm`` with those statistics: the
  same arithmetic in one pass), with the one-slice halo its 3x3x3 convolution needs;
* a block's second convolution adds into ``x`` slab by slab: the first one, which reads ``x`` with a
  halo, has already finished (its output is ``h``);
* the expansion and pixel shuffle, and the output convolution, are made slab by slab too.

The values are those of the layer-by-layer forward up to floating-point rounding (statistics summed in
float64 in another order, convolutions on other shapes): ``Testing/Python/test_vqgan.py`` compares the
two. With gradients on (training, data-consistency guidance), for a batch of volumes and on a GPU the tail
runs layer by layer as before.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ResBlock3d, conv3d, suggest_memory_format

#: Output slices per slab: 16 x 128² x 32 channels of bf16 is 16 MiB, a small block next to a 128 MiB volume.
SLAB_DEPTH = 16


def can_run_in_slabs(tail: nn.Module, h: torch.Tensor) -> bool:
    """Whether :func:`tail_in_slabs` applies: on the CPU (a GPU's caching allocator does not fragment this
    way, and its speed in slabs is unmeasured), no gradients, one 5-D volume, plain residual blocks."""
    if h.device.type != "cpu" or torch.is_grad_enabled() or h.dim() != 5 or h.shape[0] != 1:
        return False
    convs = [tail.expand, tail.residual[-1]] + [c for block in tail.blocks for c in (block.conv1, block.conv2)]
    return (all(isinstance(block, ResBlock3d) and isinstance(block.skip, nn.Identity) and block.emb_proj is None
                for block in tail.blocks)
            and all(c.kernel_size == (3, 3, 3) and c.padding == (1, 1, 1) and c.stride == (1, 1, 1)
                    and c.dilation == (1, 1, 1) and c.groups == 1 for c in convs))


class Scratch:
    """Whole scratch slabs of a volume's width, one per (depth, dtype), reused for every slab of every pass:
    fresh blocks of varying sizes each time would fragment a kept heap. Contiguous in the volume's layout."""

    def __init__(self, like: torch.Tensor):
        self.like, self.buffers = like, {}
        self.layout = suggest_memory_format(like)

    def __call__(self, depth: int, dtype: torch.dtype) -> torch.Tensor:
        key = (depth, dtype)
        if key not in self.buffers:
            self.buffers[key] = torch.empty((1, self.like.shape[1], depth, *self.like.shape[3:]), dtype=dtype,
                                            device=self.like.device, memory_format=self.layout)
        return self.buffers[key]


def group_stats(norm: nn.GroupNorm, volume: torch.Tensor, scratch: Scratch, slab: int = SLAB_DEPTH) -> tuple:
    """GroupNorm's whole-volume statistics of a batch-1 ``volume`` as per-channel float32 ``(mean, var)``
    (each channel gets its group's): each slab's group statistics in float32 (by GroupNorm's own kernel, on
    a float32 copy), pooled in float64."""
    channels, groups, depth = volume.shape[1], norm.num_groups, volume.shape[2]
    pooled_mean = torch.zeros(groups, dtype=torch.float64, device=volume.device)
    pooled_square = torch.zeros_like(pooled_mean)
    for start in range(0, depth, slab):
        part = scratch(min(slab, depth - start), torch.float32).copy_(volume[:, :, start:start + slab])
        _, mean, rstd = torch.ops.aten.native_group_norm(part, None, None, 1, channels, part[0, 0].numel(), groups, 0.0)
        mean, var = mean.double().view(-1), rstd.double().view(-1).pow(-2)
        weight = part.shape[2] / depth
        pooled_mean += weight * mean
        pooled_square += weight * (var + mean.square())
    var = (pooled_square - pooled_mean.square()).clamp_min(0.0)
    per_group = channels // groups
    return pooled_mean.repeat_interleave(per_group).float(), var.repeat_interleave(per_group).float()


def _padded_slab(source: torch.Tensor, start: int, stop: int, scratch: Scratch, prepare=None) -> torch.Tensor:
    """Slices ``start - 1 .. stop + 1`` of ``source`` in a scratch slab, zeros where the volume ends (a 3x3x3
    convolution's padding); ``prepare(src, dest)`` fills ``dest`` from ``src`` (default: a copy)."""
    depth = source.shape[2]
    lo, hi = max(start - 1, 0), min(stop + 1, depth)
    first = lo - (start - 1)  # 1 at the volume's first slice, else 0
    part = scratch(stop - start + 2, source.dtype)
    dest = part[:, :, first:first + hi - lo]
    if prepare is None:
        dest.copy_(source[:, :, lo:hi])
    else:
        prepare(source[:, :, lo:hi], dest)
    if first:
        part[:, :, 0].zero_()
    if first + hi - lo < part.shape[2]:
        part[:, :, first + hi - lo:].zero_()
    return part


def conv_by_slabs(conv: nn.Conv3d, norm: nn.GroupNorm, source: torch.Tensor, stats: tuple,
                  write: Callable[[int, torch.Tensor], None], scratch: Scratch, slab: int = SLAB_DEPTH) -> None:
    """``conv(silu(norm(source)))`` for a 3x3x3 ``conv`` with padding 1, ``slab`` output slices at a time, the
    normalisation from the whole volume's ``stats`` (:func:`group_stats`); ``write(start, output_slab)``
    receives each. The normalisation is ``batch_norm`` with those statistics (or, where the slab's part is not
    one block of memory, the same per-channel scale and shift by one ``addcmul``): GroupNorm's arithmetic (in
    float32, rounded once to the volume's precision) in one pass, written into a scratch slab."""
    mean, var = stats
    no_stats = torch.empty(0, device=source.device)
    scale = (norm.weight * torch.rsqrt(var + norm.eps)).view(1, -1, 1, 1, 1)
    shift = norm.bias.view(1, -1, 1, 1, 1) - mean.view(1, -1, 1, 1, 1) * scale

    def normalise(src, dest):
        if dest.is_contiguous(memory_format=scratch.layout):
            torch.ops.aten.native_batch_norm.out(src, norm.weight, norm.bias, mean, var, False, 0.0, norm.eps,
                                                 out=dest, save_mean=no_stats, save_invstd=no_stats)
        else:  # a depth slice of a contiguous-layout slab, not one block of memory: x * scale + shift, one pass
            torch.addcmul(shift, src, scale, out=dest)

    depth = source.shape[2]
    for start in range(0, depth, slab):
        stop = min(start + slab, depth)
        part = F.silu(_padded_slab(source, start, stop, scratch, normalise), inplace=True)  # silu(0) = 0
        write(start, conv3d(part, conv.weight, conv.bias, padding=(0, 1, 1)))


def tail_in_slabs(tail: nn.Module, h: torch.Tensor, slab: int = SLAB_DEPTH) -> torch.Tensor:
    """:class:`~XctDiffCore.models.vqgan.SuperResolutionTail`'s forward, without gradients, in depth slabs."""
    from .vqgan import pixel_shuffle_3d

    half = max(slab // 2, 1)  # the expansion's slabs, on the half-resolution grid
    depth, low_scratch = h.shape[2], Scratch(h)
    x = None
    for start in range(0, depth, half):
        stop = min(start + half, depth)
        part = _padded_slab(h, start, stop, low_scratch)
        shuffled = pixel_shuffle_3d(conv3d(part, tail.expand.weight, tail.expand.bias, padding=(0, 1, 1)))
        if x is None:
            x = torch.empty((1, shuffled.shape[1], 2 * depth, *shuffled.shape[3:]), dtype=shuffled.dtype,
                            device=shuffled.device,
                            memory_format=suggest_memory_format(shuffled))
        x[:, :, 2 * start: 2 * stop] = shuffled
    del low_scratch
    buffer, scratch = torch.empty_like(x), Scratch(x)

    def into_buffer(start, out):
        buffer[:, :, start:start + out.shape[2]] = out

    def add_to_x(start, out):
        x[:, :, start:start + out.shape[2]] += out

    for block in tail.blocks:
        conv_by_slabs(block.conv1, block.norm1, x, group_stats(block.norm1, x, scratch, slab), into_buffer, scratch, slab)
        conv_by_slabs(block.conv2, block.norm2, buffer, group_stats(block.norm2, buffer, scratch, slab), add_to_x,
                      scratch, slab)
    norm, _, conv = tail.residual
    residual = torch.empty((1, conv.out_channels, *x.shape[2:]), dtype=x.dtype, device=x.device)

    def into_residual(start, out):
        residual[:, :, start:start + out.shape[2]] = out

    conv_by_slabs(conv, norm, x, group_stats(norm, x, scratch, slab), into_residual, scratch, slab)
    del x, buffer, scratch
    return F.interpolate(tail.coarse(h), scale_factor=2, mode="trilinear", align_corners=False) + residual
