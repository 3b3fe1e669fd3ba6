"""The latent UNet: shapes, 3x3x1 kernels that never reach across D, both conditionings, trainability."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from XctDiffCore.diffusion import NoiseSchedule
from XctDiffCore.training.diffusion import diffusion_loss
from XctDiffCore.models.unet import DepthAttention, LatentUNet

MODES = ("cross_attention", "concat")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(conditioning: str, channels=(16, 32, 32), attention_levels=(False, True, True)) -> LatentUNet:
    torch.manual_seed(0)
    return LatentUNet(latent_channels=8, channels=channels, num_res_blocks=1, attention_levels=attention_levels,
                      num_heads=2, conditioning=conditioning, norm_groups=8)


def randomize_zero_layers(model: nn.Module) -> nn.Module:
    """Give the zero-initialised projections (output conv, attention outputs) random weights."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.05)
    return model


def latents(batch=2, d=8, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, d, h, w, generator=g)


@pytest.mark.parametrize("conditioning", MODES)
def test_shapes_of_both_conditionings(conditioning):
    model = tiny_unet(conditioning)
    x, y = latents(), latents(seed=1)
    eps = model(x, torch.tensor([0, 999]), y)
    assert eps.shape == x.shape
    assert torch.count_nonzero(eps) == 0  # zero-initialised output: eps = 0 at the start
    # D needs no divisibility (never down-sampled); H and W do.
    assert model(latents(d=5), torch.tensor([3, 4]), latents(d=5, seed=1)).shape == (2, 8, 5, 8, 8)


@pytest.mark.parametrize("conditioning", MODES)
def test_every_convolution_is_one_wide_along_depth(conditioning):
    convs = [m for m in tiny_unet(conditioning).modules() if isinstance(m, nn.Conv3d)]
    assert len(convs) > 10
    for conv in convs:
        assert conv.kernel_size[0] == 1 and conv.stride[0] == 1 and conv.padding[0] == 0, conv
        assert conv.kernel_size[1:] in ((3, 3), (1, 1)) or conv.stride[1:] != (1, 1), conv


def test_only_depth_attention_mixes_slices(monkeypatch):
    # GroupNorm statistics span the whole volume (one mean and variance per group and sample): switch
    # them off to see what the convolutions and the attention do to a change in one coronal slice.
    monkeypatch.setattr(nn.GroupNorm, "forward", lambda self, h: h)
    model = randomize_zero_layers(tiny_unet("concat")).eval()
    x, y, t = latents(), latents(seed=1), torch.tensor([10, 500])
    poked = x.clone()
    poked[:, :, 3] += 1.0

    def change_per_slice() -> torch.Tensor:
        with torch.no_grad():
            return (model(poked, t, y) - model(x, t, y)).abs().amax(dim=(0, 1, 3, 4))

    changed = change_per_slice()
    others = torch.arange(8) != 3
    assert changed[3] > 0 and (changed[others] > 0).all()  # depth attention spreads it along D
    monkeypatch.setattr(DepthAttention, "forward", lambda self, h: h)
    changed = change_per_slice()
    assert changed[3] > 0 and (changed[others] == 0).all()  # the convolutions alone never do


@pytest.mark.parametrize("conditioning", MODES)
def test_output_depends_on_the_prior_and_the_timestep(conditioning):
    model = randomize_zero_layers(tiny_unet(conditioning)).eval()
    x, y, t = latents(), latents(seed=1), torch.tensor([10, 500])
    with torch.no_grad():
        base = model(x, t, y)
        assert not torch.allclose(base, model(x, t, latents(seed=2)), atol=1e-5)
        assert not torch.allclose(base, model(x, torch.tensor([11, 600]), y), atol=1e-5)


@pytest.mark.parametrize("conditioning", MODES)
def test_loss_goes_down_on_a_toy_latent_batch(conditioning):
    model = tiny_unet(conditioning, channels=(16, 32), attention_levels=(False, True))
    schedule = NoiseSchedule()
    y = latents(batch=4, d=8, h=8, w=8, seed=5)  # target = prior: learnable from the condition
    x0 = y

    def held_out_loss() -> float:
        with torch.no_grad():
            return diffusion_loss(model, x0, y, schedule, generator=torch.Generator().manual_seed(123)).item()

    before = held_out_loss()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        loss = diffusion_loss(model, x0, y, schedule, generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = held_out_loss()
    assert after < 0.7 * before, (before, after)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        LatentUNet(channels=(16, 32), attention_levels=(True,), norm_groups=8)
    with pytest.raises(ValueError):
        LatentUNet(channels=(16, 32), attention_levels=(False, True), conditioning="add", norm_groups=8)
    model = tiny_unet("concat")
    with pytest.raises(ValueError):  # H not a multiple of 4
        model(latents(h=6), torch.tensor([1, 2]), latents(h=6))
    with pytest.raises(ValueError):
        model(latents(), torch.tensor([1, 2]), latents(d=4))
