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
  (:func:`group_affine`: per channel ``scale, shift`` with ``norm(v) = v * scale + shift``), then
  normalises each slab on the fly, with the one-slice halo its 3x3x3 convolution needs;
* a block's second convolution adds into ``x`` slab by slab: the first one, which reads ``x`` with a
  halo, has already finished (its output is ``h``);
* the expansion and pixel shuffle, and the output convolution, are made slab by slab too.

The values are those of the layer-by-layer forward up to floating-point rounding (statistics summed in
float64 in another order, convolutions on other shapes): ``Testing/Python/test_vqgan.py`` compares the
two. With gradients on (training, data-consistency guidance) the tail runs layer by layer as before.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ResBlock3d

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


class SlabWork:
    """Scratch slabs reused for every slab of a volume's pass (fresh ones each time would fragment a kept heap),
    one pair per slab depth (the full one, the last one's): :meth:`fp32` holds a normalised slab and its halo,
    :meth:`low` the same cast to the convolutions' precision. Each is a whole tensor, contiguous in the
    volume's layout, as GroupNorm's kernel requires."""

    def __init__(self, like: torch.Tensor, slab: int = SLAB_DEPTH):
        self.like, self.slab = like, slab
        self.layout = torch.channels_last_3d if not like.is_contiguous() else torch.contiguous_format
        self.buffers: dict = {}

    def fp32(self, depth: int) -> torch.Tensor:
        return self._buffer(depth, torch.float32)

    def low(self, depth: int) -> torch.Tensor:
        return self._buffer(depth, self.like.dtype)

    def _buffer(self, depth: int, dtype: torch.dtype) -> torch.Tensor:
        key = (depth, dtype)
        if key not in self.buffers:
            self.buffers[key] = torch.empty((1, self.like.shape[1], depth, *self.like.shape[3:]), dtype=dtype,
                                            device=self.like.device, memory_format=self.layout)
        return self.buffers[key]


def group_affine(norm: nn.GroupNorm, volume: torch.Tensor, work: SlabWork) -> tuple:
    """Per-channel ``(scale, shift)``, shaped ``(1, C, 1, 1, 1)`` in float32, with ``norm(volume) ==
    volume * scale + shift`` (batch 1): each slab's group statistics in float32 (by GroupNorm's own
    kernel), pooled in float64."""
    channels, groups, depth = volume.shape[1], norm.num_groups, volume.shape[2]
    pooled_mean = torch.zeros(groups, dtype=torch.float64, device=volume.device)
    pooled_square = torch.zeros_like(pooled_mean)
    step = work.slab + 2  # the depth of conv_by_slabs' buffer, so that the two passes share it
    for start in range(0, depth, step):
        part = work.fp32(min(step, depth - start)).copy_(volume[:, :, start:start + step])
        _, mean, rstd = torch.ops.aten.native_group_norm(part, None, None, 1, channels, part[0, 0].numel(), groups, 0.0)
        mean, var = mean.double().view(-1), rstd.double().view(-1).pow(-2)
        weight = part.shape[2] / depth
        pooled_mean += weight * mean
        pooled_square += weight * (var + mean.square())
    var = (pooled_square - pooled_mean.square()).clamp_min(0.0)
    scale = (var + norm.eps).rsqrt().repeat_interleave(channels // groups)
    shift = -pooled_mean.repeat_interleave(channels // groups) * scale
    if norm.affine:
        scale, shift = scale * norm.weight.double(), shift * norm.weight.double() + norm.bias.double()
    return scale.float().view(1, -1, 1, 1, 1), shift.float().view(1, -1, 1, 1, 1)


def conv_by_slabs(conv: nn.Conv3d, source: torch.Tensor, affine: tuple, write: Callable[[int, torch.Tensor], None],
                  work: SlabWork) -> None:
    """``conv(silu(source * scale + shift))`` for a 3x3x3 ``conv`` with padding 1, ``work.slab`` output slices at
    a time: ``write(start, output_slab)`` receives each."""
    scale, shift = affine
    depth = source.shape[2]
    for start in range(0, depth, work.slab):
        stop = min(start + work.slab, depth)
        lo, hi = max(start - 1, 0), min(stop + 1, depth)  # the halo the kernel reads
        first = 1 if start == 0 else 0  # a zero slice where the volume ends: the convolution's padding
        size = stop - start + 2
        part = work.fp32(size)
        data = part[:, :, first:first + hi - lo]
        F.silu(data.copy_(source[:, :, lo:hi]).mul_(scale).add_(shift), inplace=True)
        if first:
            part[:, :, 0].zero_()
        if stop == depth:
            part[:, :, size - 1].zero_()
        low = work.low(size)
        if low is not part:
            low.copy_(part)
        write(start, F.conv3d(low, conv.weight, conv.bias, padding=(0, 1, 1)))


def tail_in_slabs(tail: nn.Module, h: torch.Tensor, slab: int = SLAB_DEPTH) -> torch.Tensor:
    """:class:`~XctDiffCore.models.vqgan.SuperResolutionTail`'s forward, without gradients, in depth slabs."""
    from .vqgan import pixel_shuffle_3d

    half = max(slab // 2, 1)  # the expansion's slabs, on the half-resolution grid
    depth = h.shape[2]
    x = None
    for start in range(0, depth, half):
        stop = min(start + half, depth)
        part = F.pad(h[:, :, max(start - 1, 0):min(stop + 1, depth)],
                     (0, 0, 0, 0, 1 if start == 0 else 0, 1 if stop == depth else 0))  # zero padding in depth
        shuffled = pixel_shuffle_3d(F.conv3d(part, tail.expand.weight, tail.expand.bias, padding=(0, 1, 1)))
        if x is None:
            x = torch.empty((1, shuffled.shape[1], 2 * depth, *shuffled.shape[3:]), dtype=shuffled.dtype,
                            device=shuffled.device,
                            memory_format=torch.channels_last_3d if not shuffled.is_contiguous() else torch.contiguous_format)
        x[:, :, 2 * start: 2 * stop] = shuffled
    work = SlabWork(x, slab)
    buffer = torch.empty_like(x)

    def into_buffer(start, out):
        buffer[:, :, start:start + out.shape[2]] = out

    def add_to_x(start, out):
        x[:, :, start:start + out.shape[2]] += out

    for block in tail.blocks:
        conv_by_slabs(block.conv1, x, group_affine(block.norm1, x, work), into_buffer, work)
        conv_by_slabs(block.conv2, buffer, group_affine(block.norm2, buffer, work), add_to_x, work)
    norm, _, conv = tail.residual
    residual = torch.empty((1, conv.out_channels, *x.shape[2:]), dtype=x.dtype, device=x.device)

    def into_residual(start, out):
        residual[:, :, start:start + out.shape[2]] = out

    conv_by_slabs(conv, x, group_affine(norm, x, work), into_residual, work)
    del x, buffer, work
    return F.interpolate(tail.coarse(h), scale_factor=2, mode="trilinear", align_corners=False) + residual
