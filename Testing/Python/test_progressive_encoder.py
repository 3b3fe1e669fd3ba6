"""The progressive encoder: radiograph -> the VQ-GAN's normalised latent grid, and the prior y."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from XctDiffCore.models.progressive_encoder import ProgressiveEncoder
from XctDiffCore.models.quantize import homogeneous_normalize
from XctDiffCore.models.vqgan import VQGAN


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_encoder(**overrides) -> ProgressiveEncoder:
    torch.manual_seed(0)
    args = dict(image_size=32, channels_2d=(8, 16, 16), depth=8, lift_channels=4, channels_3d=(16,), norm_groups=8)
    return ProgressiveEncoder(**{**args, **overrides})


def tiny_vqgan() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(channels=(8, 16, 16), num_res_blocks=1, codebook_size=64, norm_groups=8)


def test_output_matches_the_vq_latent_grid_at_32():
    encoder, vqgan = tiny_encoder(), tiny_vqgan()
    ct_latent = vqgan.encode(torch.zeros(1, 1, 32, 32, 32))
    z = encoder(torch.randn(2, 1, 32, 32))
    assert encoder.latent_shape == tuple(ct_latent.shape[1:]) == (8, 8, 8, 8)
    assert z.shape == (2, *encoder.latent_shape)


def test_output_matches_the_vq_latent_grid_at_128():
    encoder = tiny_encoder(image_size=128, channels_2d=(4, 8, 8), depth=32, lift_channels=2, channels_3d=(4,), norm_groups=4)
    assert encoder.latent_shape == tiny_vqgan().latent_shape((128, 128, 128)) == (8, 32, 32, 32)
    with torch.no_grad():
        assert encoder(torch.randn(1, 1, 128, 128)).shape == (1, 8, 32, 32, 32)


def test_output_is_z_score_normalised_per_voxel():
    z = tiny_encoder()(torch.randn(2, 1, 32, 32))
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(2, 8, 8, 8), atol=1e-5, rtol=0)
    # (1 up to the quantiser's epsilon: var / (var + 1e-5) for the small raw outputs at initialisation)
    torch.testing.assert_close(z.var(dim=1, unbiased=False), torch.ones(2, 8, 8, 8), atol=1e-2, rtol=0)


def test_lift_output_index_is_slice_major():
    """Feature k of the lift MLP lands in slice d = k // C', channel c = k % C' (as documented)."""
    encoder = tiny_encoder()
    d0, c0 = 5, 2
    with torch.no_grad():
        last = encoder.lift[-1]
        last.weight.zero_()
        last.bias.zero_()
        last.bias[d0 * encoder.lift_channels + c0] = 1.0
    seen = {}
    encoder.encoder_3d.register_forward_pre_hook(lambda module, args: seen.setdefault("volume", args[0]))
    encoder(torch.randn(2, 1, 32, 32))
    volume = seen["volume"]  # (B, C', depth, h, w)
    assert volume.shape == (2, 4, 8, 8, 8)
    expected = torch.zeros_like(volume)
    expected[:, c0, d0] = 1.0
    assert torch.equal(volume, expected)


def test_prior_is_the_quantised_latent_and_passes_gradients():
    encoder, vqgan = tiny_encoder(), tiny_vqgan().requires_grad_(False)
    xray = torch.randn(2, 1, 32, 32)
    y = encoder.prior(xray, vqgan.quantize)
    _, _, indices = vqgan.quantize(encoder(xray))
    torch.testing.assert_close(y, vqgan.quantizer.lookup(indices))
    y.square().sum().backward()  # straight-through: an image-space loss reaches the encoder
    assert all(p.grad is not None for p in encoder.parameters())


def test_latent_loss_goes_down():
    encoder = tiny_encoder()
    xray = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    target = homogeneous_normalize(torch.randn(2, 8, 8, 8, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    optimiser = torch.optim.Adam(encoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(encoder(xray), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        tiny_encoder(image_size=30)
    with pytest.raises(ValueError):
        tiny_encoder()(torch.randn(1, 1, 64, 64))
