"""The 3D VQ-GAN, its critics and the autoencoder loss on tiny configurations (CPU, seconds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from XctDiffCore.layout import ct_to_model_layout, hu_to_unit
from XctDiffCore.training.losses import AutoencoderLoss, sample_slices
from XctDiffCore.models import count_parameters
from XctDiffCore.models.discriminators import PatchDiscriminator
from XctDiffCore.models.lpips import LPIPS
from XctDiffCore.models.vqgan import VQGAN, SuperResolutionTail, pixel_shuffle_3d

from conftest import synthetic_chest

TINY = dict(channels=(8, 16, 32), num_res_blocks=1, latent_channels=8, codebook_size=256)


# Batches of 2 throughout: on CPU, PyTorch runs small batch-1 conv3d through its slow native kernel
# (5x slower forward + backward than oneDNN at these sizes).


def _tiny(**kw):
    torch.manual_seed(0)
    return VQGAN(**{**TINY, **kw})


@pytest.mark.parametrize("size", [32, 64])
def test_tiny_shapes(size):
    model = _tiny()
    x = torch.randn(2, 1, size, size, size)
    z_e = model.encode(x)
    assert z_e.shape == (2, 8, size // 4, size // 4, size // 4) == (2, *model.latent_shape(x.shape[2:]))
    z_q, loss, idx = model.quantize(z_e)
    assert z_q.shape == z_e.shape and idx.shape == (2, size // 4, size // 4, size // 4)
    # z_q is in the normalised space: zero mean, unit variance across channels per latent voxel
    torch.testing.assert_close(z_q.mean(1), torch.zeros_like(z_q[:, 0]), atol=1e-5, rtol=0)
    x_rec = model.decode(z_q)
    assert x_rec.shape == x.shape
    x_rec2, loss2, idx2 = model(x)
    torch.testing.assert_close(x_rec2, x_rec)
    torch.testing.assert_close(model.decode_indices(idx2), x_rec)


def test_anisotropic_input_and_other_channel_tuples():
    model = _tiny()
    x = torch.randn(2, 1, 32, 48, 16)
    assert model(x)[0].shape == x.shape
    two = VQGAN(channels=(8, 12), num_res_blocks=2, latent_channels=4, codebook_size=32)
    assert two.downsample_factor == 2 and two.encode(torch.randn(1, 1, 16, 16, 16)).shape == (1, 4, 8, 8, 8)
    assert two(torch.randn(1, 1, 16, 16, 16))[0].shape == (1, 1, 16, 16, 16)
    four = VQGAN(channels=(4, 8, 8, 16), latent_channels=3, codebook_size=16)
    assert four.downsample_factor == 8 and four(torch.randn(1, 1, 16, 16, 16))[0].shape == (1, 1, 16, 16, 16)


def test_indivisible_input_is_refused():
    with pytest.raises(ValueError, match="multiples of 4"):
        _tiny().encode(torch.randn(1, 1, 30, 32, 32))


def test_super_resolution_tail_present_and_switchable():
    with_sr, without = _tiny(), _tiny(super_resolution=False)
    assert isinstance(with_sr.decoder.head, SuperResolutionTail)
    assert not any(isinstance(m, SuperResolutionTail) for m in without.modules())
    assert without(torch.randn(1, 1, 32, 32, 32))[0].shape == (1, 1, 32, 32, 32)
    assert with_sr.last_layer is with_sr.decoder.head.residual[-1].weight
    # the tail's output = trilinear(coarse) + residual: zeroing the residual conv leaves a smooth upsampling
    tail = with_sr.decoder.head
    with torch.no_grad():
        tail.residual[-1].weight.zero_()
        tail.residual[-1].bias.zero_()
        h = torch.randn(1, 16, 4, 4, 4)
        coarse = tail.coarse(h)
        up = torch.nn.functional.interpolate(coarse, scale_factor=2, mode="trilinear", align_corners=False)
        torch.testing.assert_close(tail(h), up)


def test_pixel_shuffle_3d_places_children():
    x = torch.arange(2 * 8 * 1 * 1 * 1, dtype=torch.float32).view(1, 16, 1, 1, 1)
    y = pixel_shuffle_3d(x)
    assert y.shape == (1, 2, 2, 2, 2)
    # channel c*8 + (r1*4 + r2*2 + r3) goes to voxel (r1, r2, r3) of output channel c
    assert y[0, 1, 1, 0, 1].item() == 1 * 8 + (1 * 4 + 0 * 2 + 1)


def test_backward_reaches_encoder_codebook_decoder():
    model = _tiny()
    x = torch.randn(2, 1, 32, 32, 32)
    x_rec, codebook_loss, _ = model(x)
    ((x_rec - x).abs().mean() + codebook_loss).backward()
    for part in (model.encoder, model.quantizer, model.decoder):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_vqgan_forward_compiles_without_graph_breaks():
    model = _tiny()
    x = torch.randn(1, 1, 16, 16, 16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x)[0], model(x)[0])


def test_parameter_counts_grow_with_config():
    tiny, small = _tiny(), VQGAN(channels=(32, 64, 128), num_res_blocks=1, codebook_size=8192)
    assert count_parameters(tiny) < 500_000 < 4_000_000 < count_parameters(small)
    assert count_parameters(tiny.quantizer) == 256 * 8


@pytest.mark.parametrize("size,expected", [(32, 2), (64, 6), (128, 14)])
def test_discriminator_2d_output_shapes(size, expected):
    disc = PatchDiscriminator(spatial_dims=2, in_channels=1, channels=8, num_layers=3)
    assert disc(torch.randn(3, 1, size, size)).shape == (3, 1, expected, expected)


def test_discriminator_3d_output_shapes():
    disc = PatchDiscriminator(spatial_dims=3, in_channels=1, channels=4, num_layers=3)
    assert disc(torch.randn(2, 1, 32, 32, 32)).shape == (2, 1, 2, 2, 2)
    disc2 = PatchDiscriminator(spatial_dims=3, in_channels=1, channels=4, num_layers=2)
    assert disc2(torch.randn(1, 1, 32, 48, 32)).shape == (1, 1, 6, 10, 6)


def test_sample_slices_same_positions_every_axis():
    x = torch.randn(2, 1, 8, 10, 12)
    y = x * 2
    groups = sample_slices((x, y), slices_per_axis=3)
    assert [g[0].shape for g in groups] == [(6, 1, 10, 12), (6, 1, 8, 12), (6, 1, 8, 10)]
    for a, b in groups:
        torch.testing.assert_close(b, a * 2)


def _loss(lpips=None, disc_start=5, adaptive=True, bone_weight=0.0, ssim_weight=0.0):
    torch.manual_seed(1)
    return AutoencoderLoss(
        disc_3d=PatchDiscriminator(3, 1, channels=4, num_layers=2),
        disc_2d=PatchDiscriminator(2, 1, channels=4, num_layers=2),
        lpips=lpips,
        bone_weight=bone_weight,
        ssim_weight=ssim_weight,
        disc_start=disc_start,
        slices_per_axis=1,
        adaptive_weight=adaptive,
    )


def _batch():
    cts = [hu_to_unit(ct_to_model_layout(synthetic_chest((32, 32, 32), seed=s))) for s in (3, 4)]
    return torch.from_numpy(np.stack(cts)[:, None].copy()).float()  # (2, 1, 32, 32, 32)


def test_loss_gan_term_zero_before_warmup_and_active_after():
    model, loss_fn, x = _tiny(), _loss(disc_start=5), _batch()
    x_rec, cb, _ = model(x)
    total, logs = loss_fn.generator_loss(x, x_rec, cb, step=4, last_layer=model.last_layer)
    assert torch.isfinite(total)
    assert logs["gan_3d"] == 0 and logs["gan_2d"] == 0 and logs["gan_lambda"] == 0
    torch.testing.assert_close(total, logs["l1"] + logs["codebook"])  # no LPIPS weights: term off
    d_total, d_logs = loss_fn.discriminator_loss(x, x_rec, step=4)
    assert d_total.item() == 0 and not loss_fn.gan_active(4)

    total, logs = loss_fn.generator_loss(x, x_rec, cb, step=5, last_layer=model.last_layer)
    assert loss_fn.gan_active(5) and torch.isfinite(total)
    assert logs["gan_3d"] != 0 and logs["gan_2d"] != 0 and logs["gan_lambda"] > 0
    total.backward()
    assert model.decoder.last_layer.grad is not None
    model.zero_grad(set_to_none=True)
    loss_fn.zero_grad(set_to_none=True)
    d_total, d_logs = loss_fn.discriminator_loss(x, x_rec, step=5)
    assert d_total.item() > 0 and all(torch.isfinite(v) for v in d_logs.values())
    d_total.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator_parameters())
    assert all(p.grad is None for p in model.parameters())  # the critics' step leaves the VQ-GAN alone


def test_loss_with_lpips_module_adds_perceptual_term():
    lpips = LPIPS()  # random weights: exercises the path without the cached file
    torch.nn.init.uniform_(lpips.heads[0].weight, 0.0, 1.0)
    model, loss_fn, x = _tiny(), _loss(lpips=lpips, adaptive=False), _batch()
    x_rec, cb, _ = model(x)
    total, logs = loss_fn.generator_loss(x, x_rec, cb, step=0)
    assert logs["lpips"] > 0 and torch.isfinite(total)
    torch.testing.assert_close(total.detach(), logs["l1"] + logs["lpips"] + logs["codebook"])


def test_bone_term_is_the_error_on_the_truths_bone_voxels_only():
    """An error outside bone leaves the bone term at 0; the same error on bone voxels is the term."""
    loss_fn, x = _loss(adaptive=False, bone_weight=3.0), _batch()
    is_bone = x > hu_to_unit(np.float64(200.0))
    assert 0 < is_bone.float().mean() < 0.2  # the phantom has ribs and a spine, and mostly no bone
    no_codebook = torch.zeros(())
    off_bone = x + 0.1 * (~is_bone)
    total, logs = loss_fn.generator_loss(x, off_bone, no_codebook, step=0)
    assert logs["bone_l1"] == 0
    on_bone = x + 0.1 * is_bone
    total, logs = loss_fn.generator_loss(x, on_bone, no_codebook, step=0)
    torch.testing.assert_close(logs["bone_l1"], torch.tensor(0.1))
    torch.testing.assert_close(total, logs["l1"] + 3.0 * logs["bone_l1"])
    assert _loss().generator_loss(x, on_bone, no_codebook, step=0)[1]["bone_l1"] == 0  # logged, 0 when off


def test_ssim_of_the_loss_is_the_evaluations_3d_ssim():
    """The loss's SSIM is the number the evaluation reports (scikit-image 3D, default window), to float32."""
    from XctDiffCore.metrics import ssim_3d as evaluation_ssim
    from XctDiffCore.training.losses import ssim_3d

    rng = np.random.default_rng(0)
    truth = rng.random((2, 1, 12, 14, 16))
    noisy = np.clip(truth + 0.2 * rng.standard_normal(truth.shape), 0, 1)
    ours = ssim_3d(torch.from_numpy(truth), torch.from_numpy(noisy))
    expected = np.mean([evaluation_ssim(noisy[i, 0], truth[i, 0]) for i in range(2)])
    assert abs(float(ours) - expected) < 1e-5 and 0.1 < expected < 0.9
    assert abs(float(ssim_3d(torch.from_numpy(truth), torch.from_numpy(truth))) - 1.0) < 1e-5


def test_ssim_term_is_one_minus_the_ssim_and_pulls_the_decoding():
    loss_fn, x = _loss(adaptive=False, ssim_weight=2.0), _batch()
    no_codebook = torch.zeros(())
    blurred = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False).requires_grad_(True)
    total, logs = loss_fn.generator_loss(x, blurred, no_codebook, step=0)
    from XctDiffCore.training.losses import ssim_3d

    expected = 1.0 - ssim_3d((x + 1) / 2, (blurred.detach() + 1) / 2)
    torch.testing.assert_close(logs["ssim_loss"], expected)
    assert 0 < float(expected) < 1
    torch.testing.assert_close(total, logs["l1"] + 2.0 * logs["ssim_loss"])
    total.backward()
    assert blurred.grad is not None and blurred.grad.abs().sum() > 0
    assert _loss().generator_loss(x, blurred, no_codebook, step=0)[1]["ssim_loss"] == 0  # logged, 0 when off


def test_tiny_autoencoder_overfits_a_phantom():
    """A few Adam steps on one 32^3 phantom reduce the reconstruction error (the model is trainable)."""
    model, loss_fn, x = _tiny(), _loss(disc_start=1000), _batch()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    l1s = []
    for step in range(6):
        x_rec, cb, _ = model(x)
        total, logs = loss_fn.generator_loss(x, x_rec, cb, step, last_layer=model.last_layer)
        opt.zero_grad()
        total.backward()
        opt.step()
        l1s.append(logs["l1"].item())
    assert all(torch.isfinite(torch.tensor(l1s)))
    assert l1s[-1] < 0.7 * l1s[0]


@pytest.mark.parametrize("factor", [(2, 2, 2), (1, 2, 2), (2, 1, 1)])
def test_the_up_sampler_without_the_up_sampled_volume_is_the_plain_one(factor):
    """Upsample3d convolves per parity on the coarse grid: the same values and gradients as nearest + conv."""
    from XctDiffCore.models.blocks import Upsample3d

    torch.manual_seed(0)
    layer = Upsample3d(4, factor=factor)
    assert layer.subpixel
    x = torch.randn(2, 4, 5, 6, 7, requires_grad=True)
    fast = layer(x)
    plain = layer.conv(torch.nn.functional.interpolate(x, scale_factor=factor, mode="nearest"))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    grad_fast = torch.autograd.grad(fast.square().sum(), (x, layer.conv.weight))
    grad_plain = torch.autograd.grad(plain.square().sum(), (x, layer.conv.weight))
    for a, b in zip(grad_fast, grad_plain):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_channels_last_stays_channels_last_through_the_decoder_with_the_same_values():
    """The CPU bf16 path keeps volumes channels-last: the sub-pixel shuffle and the up-sampler must not hand
    the next layer a contiguous copy (a full-volume copy per layer, issue 20), nor change a value."""
    from XctDiffCore.models.blocks import Upsample3d

    torch.manual_seed(0)
    x = torch.randn(2, 16, 3, 4, 5)
    last = x.contiguous(memory_format=torch.channels_last_3d)
    shuffled = pixel_shuffle_3d(last)
    assert shuffled.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(shuffled, pixel_shuffle_3d(x))

    layer = Upsample3d(16)
    up = layer(last)
    assert up.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(up, layer(x), atol=1e-5, rtol=1e-5)

    model = _tiny().eval()
    z = torch.randn(1, model.latent_channels, 4, 4, 4)
    with torch.no_grad():
        plain = model.decode(z)
        model.decoder.to(memory_format=torch.channels_last_3d)
        fast = model.decode(z.contiguous(memory_format=torch.channels_last_3d))
    assert fast.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)


def _random_tail():
    """A super-resolution tail with 2 blocks whose normalisations have non-trivial affine parameters."""
    torch.manual_seed(0)
    tail = SuperResolutionTail(16, 8, 1, num_res_blocks=2, groups=4)
    with torch.no_grad():
        for module in tail.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return tail.eval()


def test_the_tail_in_depth_slabs_is_the_layer_by_layer_tail():
    """Without gradients the tail runs in slabs (issue 20: two full-resolution volumes alive, not six):
    whole-volume GroupNorm statistics, the convolutions' halo and zero padding at both ends, a last slab
    shorter than the others, an input far from zero mean: the same values as layer by layer, in fp32."""
    from XctDiffCore.models.slab_inference import can_run_in_slabs, tail_in_slabs

    tail = _random_tail()
    h = torch.randn(1, 16, 13, 6, 7) * 2 + 3
    plain = tail(h)  # parameters require gradients here: layer by layer
    assert plain.requires_grad and not can_run_in_slabs(tail, h)
    with torch.no_grad():
        assert can_run_in_slabs(tail, h) and not can_run_in_slabs(tail, h.expand(2, -1, -1, -1, -1))
        for slab in (4, 8, 16, 64):
            torch.testing.assert_close(tail_in_slabs(tail, h, slab=slab), plain.detach(), atol=2e-5, rtol=2e-5)
    with torch.inference_mode():
        torch.testing.assert_close(tail(h), plain.detach(), atol=2e-5, rtol=2e-5)  # the forward picks the slabs


def test_the_tail_in_slabs_under_bf16_autocast_and_channels_last():
    """The CPU bf16 path: channels-last volumes, bf16 convolutions; the slabs agree with layer by layer
    to bf16's rounding (normalised in fp32 there, in bf16 here)."""
    from XctDiffCore.models.slab_inference import tail_in_slabs

    tail = _random_tail().to(memory_format=torch.channels_last_3d)
    h = torch.randn(1, 16, 12, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = tail(h).detach().float()
        with torch.no_grad():
            slabs = tail_in_slabs(tail, h, slab=8).float()
    assert (slabs - plain).abs().mean() < 0.01 * plain.abs().mean()
    torch.testing.assert_close(slabs, plain, atol=0.05, rtol=0.05)


class _Ops(TorchDispatchMode):
    """Records the name of every ATen operation run inside it (which kernel family a convolution took)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_small_float32_cpu_convolutions_run_by_onednn_with_the_plain_values_and_gradients():
    """Issue 20: PyTorch sends a batch-1 float32 input with N*C*D*H <= 20480 to its reference kernel (the
    decoder's expansion in slabs took 38 % of a fp32 decode there); the models' convolutions call oneDNN
    directly instead, with F.conv3d's values and gradients. Under bf16 autocast they stay F.conv3d's."""
    from XctDiffCore.models.blocks import _X86_64, Conv3d

    if not (torch.backends.mkldnn.is_available() and _X86_64):
        pytest.skip("oneDNN is called directly only by an x86-64 torch build with it")

    torch.manual_seed(0)
    conv = Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1))
    x = torch.randn(1, 4, 5, 6, 7, requires_grad=True)  # N*C*D*H = 120: the reference kernel's size
    with _Ops() as ops:
        fast = conv(x)
    assert "mkldnn_convolution.default" in ops.names
    plain = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=(0, 1, 1))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(fast.square().sum(), (x, conv.weight, conv.bias)),
                    torch.autograd.grad(plain.square().sum(), (x, conv.weight, conv.bias))):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with _Ops() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    assert "mkldnn_convolution.default" not in ops.names


@pytest.mark.parametrize("padding", [(0, 1, 1), (1, 1, 1), (0, 0, 0)])
def test_one_channel_convolutions_by_tap_products_are_the_plain_ones(padding):
    """Issue 20: a 3x3x3 convolution to one channel (the decoder's last layers) runs as one matrix product
    and 27 shifted sums without gradients: F.conv3d's values, with and without a bias, for a contiguous, a
    channels-last and an otherwise strided volume; with gradients, the
    plain path (the 27 products of a whole volume would be a training step's largest tensor)."""
    from XctDiffCore.models.blocks import conv3d

    torch.manual_seed(0)
    x, weight, bias = torch.randn(1, 6, 5, 7, 9) * 2 + 1, torch.randn(1, 6, 3, 3, 3), torch.randn(1)
    last = x.contiguous(memory_format=torch.channels_last_3d)
    for b, volume in ((bias, x), (None, x), (bias, last), (bias, x.transpose(3, 4).contiguous().transpose(3, 4))):
        plain = torch.nn.functional.conv3d(x, weight, b, padding=padding)
        with torch.no_grad(), _Ops() as ops:
            fast = conv3d(volume, weight, b, padding=padding)
        assert not any("convolution" in name for name in ops.names) and fast.shape == plain.shape
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    with _Ops() as ops:
        conv3d(x, weight.requires_grad_(), bias, padding=padding)
    assert any("convolution" in name for name in ops.names)
