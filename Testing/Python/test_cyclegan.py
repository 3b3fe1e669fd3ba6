"""The CycleGAN networks, losses, image pool, export, and the style rule the pipeline follows."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from XctDiffCore.errors import XctDiffError
from XctDiffCore.models import count_parameters
from XctDiffCore.config import DiscriminatorConfig, StyleConfig, StyleModelConfig
from XctDiffCore.models.cyclegan import (
    ImagePool,
    ResnetGenerator,
    critic_augment,
    critic_loss,
    gaussian_blur,
    generator_loss,
    gradient_correlation,
    lsgan_loss,
    upsampling_layer,
)
from XctDiffCore.style import apply_style, load_style_generator, should_apply_style
from XctDiffCore.model_folder import export_stage
from XctDiffCore.training.style import build_cyclegan

GENERATOR_ARGS = {"channels": 4, "num_res_blocks": 1, "upsample": "resize"}


@pytest.mark.parametrize("channels,blocks,downsamples,size", [(8, 2, 2, 32), (8, 1, 3, 64), (4, 0, 1, 30)])
def test_generator_shape_and_range(channels, blocks, downsamples, size):
    g = ResnetGenerator(1, 1, channels, blocks, downsamples)
    y = g(torch.randn(2, 1, size, size) * 3)
    assert y.shape == (2, 1, size, size) and y.dtype == torch.float32
    assert y.abs().max() <= 1.0


def test_generator_rejects_indivisible_side():
    with pytest.raises(ValueError, match="divisible by 4"):
        ResnetGenerator(channels=4, num_res_blocks=1)(torch.zeros(1, 1, 30, 32))


def test_paper_generator_fits_budget():
    # CycleGAN's 128 px generator (64 channels, 6 residual blocks) on one channel; the issue caps it at 8 M.
    n = count_parameters(ResnetGenerator(channels=64, num_res_blocks=6))
    assert n == 7_825_153 and n <= 8_000_000


def test_resize_upsampling_draws_no_checkerboard():
    # a flat feature map must stay flat: the transposed convolution's uneven kernel overlap makes a period-2 pattern
    flat = torch.ones(1, 1, 8, 8)
    for mode, flat_out in (("resize", True), ("transpose", False)):
        (layer,) = [m for m in upsampling_layer(1, 1, mode) if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        torch.nn.init.ones_(layer.weight), torch.nn.init.zeros_(layer.bias)
        out = torch.nn.Sequential(*upsampling_layer(1, 1, mode)[:-1], layer)(flat)[0, 0, 2:-2, 2:-2]
        assert out.shape == (12, 12) and bool(torch.allclose(out, out[0, 0])) == flat_out
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in ResnetGenerator(channels=4, num_res_blocks=1).modules())
    with pytest.raises(ValueError, match="upsample must be one of"):
        upsampling_layer(4, 2, "pixelshuffle")


def test_gradient_correlation_sees_edges_not_contrast():
    rng = np.random.default_rng(0)
    film = torch.zeros(2, 1, 32, 32)
    film[:, :, 8:24, 10:14] = 1.0  # a bone-like bar
    film = film + 0.01 * torch.from_numpy(rng.standard_normal((2, 1, 32, 32))).float()
    assert gradient_correlation(film, film).tolist() == pytest.approx([1.0, 1.0])
    assert gradient_correlation(film, 0.3 * film - 0.5).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)  # a new contrast curve
    bar_gone = 0.01 * torch.from_numpy(rng.standard_normal((2, 1, 32, 32))).float()
    assert gradient_correlation(film, bar_gone).abs().max() < 0.2
    moved = torch.roll(film, 6, dims=-1)  # the bar drawn elsewhere
    assert gradient_correlation(film, moved).max() < 0.2


def test_smoothed_edge_correlation_keeps_bones_and_ignores_grain():
    torch.manual_seed(0)
    bar = torch.zeros(2, 1, 32, 32)
    bar[:, :, 8:24, 10:14] = 1.0  # a bone-like bar
    grainy = bar + 0.4 * torch.randn(2, 1, 32, 32)  # a film: the bar under heavy pixel-scale grain
    assert gradient_correlation(grainy, bar).max() < 0.65  # raw: the grain's edges count against a clean output
    assert gradient_correlation(grainy, bar, sigma=1.0).min() > 0.8  # smoothed: the bar's edges decide
    assert gradient_correlation(grainy, torch.roll(bar, 8, dims=-1), sigma=1.0).max() < 0.3  # a moved bar still fails
    flat = torch.full((1, 1, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat)  # the weights sum to 1, the border is reflected
    assert gaussian_blur(bar, 1.0).sum().item() == pytest.approx(bar.sum().item(), rel=1e-4)


def test_lsgan_loss_targets():
    scores = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    assert lsgan_loss(scores, True).item() == pytest.approx((1 + 0 + 1 + 4) / 4)
    assert lsgan_loss(scores, False).item() == pytest.approx((0 + 1 + 4 + 1) / 4)


def test_image_pool_fills_then_mixes_and_resumes():
    pool = ImagePool(size=4, seed=1)
    first = torch.arange(4.0).reshape(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first)  # filling: new images pass through
    state = pool.state_dict()
    new = 100 + torch.arange(64.0).reshape(64, 1, 1, 1)
    out = pool.query(new)
    from_pool = (out != new).sum().item()
    assert 20 <= from_pool <= 44  # about half are swapped for a stored (older) fake
    assert set(out.flatten().tolist()) <= set(first.flatten().tolist()) | set(new.flatten().tolist())
    clone = ImagePool(size=4, seed=123)
    clone.load_state_dict(state)
    assert torch.equal(clone.query(new), out)
    assert torch.equal(ImagePool(size=0).query(new), new)


def test_losses_backpropagate_to_the_right_networks():
    torch.manual_seed(0)
    section = StyleConfig(model=StyleModelConfig(channels=4, num_res_blocks=1), critic=DiscriminatorConfig(channels=4, norm_groups=4))
    gan = build_cyclegan(section)
    generators, critics = gan["generators"], gan["critics"]
    assert critics["drr"](torch.zeros(1, 1, 128, 128)).shape == (1, 1, 14, 14)  # 70x70 PatchGAN
    nets = (generators["real_to_drr"], generators["drr_to_real"], critics["drr"], critics["real"])
    real, drr = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    critics.requires_grad_(False)
    total, parts, fake_drr, fake_real = generator_loss(*nets, real, drr, 10, 5)
    assert set(parts) == {"adv_drr", "adv_real", "cycle_real", "cycle_drr", "identity_drr", "identity_real"}
    expected = parts["adv_drr"] + parts["adv_real"] + 10 * (parts["cycle_real"] + parts["cycle_drr"]) + 5 * (
        parts["identity_drr"] + parts["identity_real"]
    )
    assert total.item() == pytest.approx(expected.item())
    total.backward()
    assert all(p.grad is not None for p in generators["real_to_drr"].parameters())
    assert all(p.grad is None for p in critics["drr"].parameters())
    gan.zero_grad(set_to_none=True)
    gan.requires_grad_(True)
    critic_total, critic_parts = critic_loss(critics["drr"], critics["real"], real, drr, fake_real, fake_drr)
    critic_total.backward()
    assert set(critic_parts) == {"critic_drr", "critic_real"}
    assert all(p.grad is None for p in generators["real_to_drr"].parameters())  # fakes are detached
    assert all(p.grad is not None for p in critics["drr"].parameters())
    gan.zero_grad(set_to_none=True)  # the critics' augmentation changes what they see, not who learns
    generator_loss(*nets, real, drr, 10, 5, augment=("translation", "cutout"))[0].backward()
    critic_loss(critics["drr"], critics["real"], real, drr, fake_real, fake_drr, ("translation",))[0].backward()
    assert all(p.grad is not None for p in generators["real_to_drr"].parameters())
    assert all(p.grad is not None for p in critics["drr"].parameters())
    assert "identity_drr" not in generator_loss(*nets, real, drr, 10, 0)[1]
    total, parts, _, _ = generator_loss(*nets, real, drr, 10, 0, edge_weight=5)
    assert {"edge_drr", "edge_real"} <= set(parts) and all(0 <= parts[k].item() <= 2 for k in ("edge_drr", "edge_real"))
    expected = parts["adv_drr"] + parts["adv_real"] + 10 * (parts["cycle_real"] + parts["cycle_drr"]) + 5 * (
        parts["edge_drr"] + parts["edge_real"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_export_roundtrip(tmp_path):
    g = ResnetGenerator(**GENERATOR_ARGS)
    export_stage(g, "style", {"model": GENERATOR_ARGS, "image_size": 32}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.json", "style.safetensors"]
    x = torch.rand(1, 1, 32, 32)
    for path in (tmp_path, tmp_path / "style.safetensors"):
        loaded, size = load_style_generator(path)
        assert size == 32 and not loaded.training
        assert torch.equal(loaded(x), g.eval()(x))


def test_style_json_without_upsample_loads_older_transposed_weights(tmp_path):
    old = ResnetGenerator(channels=4, num_res_blocks=1, upsample="transpose")
    export_stage(old, "style", {"model": {"channels": 4, "num_res_blocks": 1}, "image_size": 32}, tmp_path)
    loaded, _ = load_style_generator(tmp_path)
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(loaded(x), old.eval()(x))


def test_export_errors_are_user_errors(tmp_path):
    with pytest.raises(XctDiffError, match="no style weights"):
        load_style_generator(tmp_path)
    g = ResnetGenerator(**GENERATOR_ARGS)
    export_stage(g, "style", {"model": GENERATOR_ARGS, "image_size": 32}, tmp_path)
    (tmp_path / "style.json").write_text('{"image_size": 32, "model": {"channels": 8, "num_res_blocks": 1}}')
    with pytest.raises(XctDiffError, match="not a style generator"):
        load_style_generator(tmp_path)


def test_apply_style_keeps_kind_shape_and_range():
    torch.manual_seed(0)
    g = ResnetGenerator(channels=4, num_res_blocks=1).train()
    image = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    out = apply_style(g, image)
    assert isinstance(out, np.ndarray) and out.shape == (32, 32) and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1
    assert g.training  # restored
    batch = torch.from_numpy(np.stack([image, image[::-1].copy()]))  # (2, H, W)
    out_t = apply_style(g, batch)
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (2, 32, 32)
    np.testing.assert_allclose(out_t[0].numpy(), out, atol=1e-6)
    expected = (g.eval()(torch.from_numpy(image)[None, None] * 2 - 1)[0, 0].detach().numpy() + 1) / 2
    np.testing.assert_allclose(out, expected, atol=1e-6)
    with pytest.raises(XctDiffError, match="divisible"):
        apply_style(g, np.zeros((30, 32), np.float32))


@pytest.mark.parametrize(
    "style,is_drr,expected",
    [("auto", False, True), ("auto", True, False), ("on", True, True), ("on", False, True), ("off", False, False), ("off", True, False)],
)
def test_should_apply_style_rule(style, is_drr, expected):
    assert should_apply_style(style, SimpleNamespace(is_drr=is_drr)) is expected


def test_should_apply_style_rejects_unknown_choice():
    with pytest.raises(XctDiffError, match="auto, on, off"):
        should_apply_style("yes", SimpleNamespace(is_drr=False))


def test_a_model_folders_style_stage_is_verified_before_it_is_loaded(tmp_path):
    from XctDiffCore.model_folder import create_random_model

    folder = create_random_model(tmp_path / "model", "tiny", with_style=True)
    generator, size = load_style_generator(folder)
    assert size > 0 and not generator.training
    weights = folder / "style.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(XctDiffError, match="does not match its SHA-256"):
        load_style_generator(folder)
    (tmp_path / "bare.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "bare.json").write_text('{"image_size": 32, "model": {}}')
    with pytest.raises(XctDiffError, match="not a style generator"):
        load_style_generator(tmp_path / "bare.safetensors")


def test_critic_augment_moves_and_holes_each_image_and_passes_gradients():
    torch.manual_seed(0)
    images = torch.rand(6, 1, 32, 32, requires_grad=True)
    assert critic_augment(images, ()) is images  # no policy: the critic sees the images themselves
    shifted = critic_augment(images, ("translation",))
    assert shifted.shape == images.shape
    for a, b in zip(images.detach(), shifted.detach()):  # each is a shift by at most 4 px, zero-filled
        matches = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                   if torch.equal(b, torch.roll(a, (dy, dx), (1, 2)) * _inside(dy, dx, 32))]
        assert len(matches) == 1
    holed = critic_augment(images, ("cutout",)).detach()
    zeros = (holed == 0).flatten(1).sum(1)
    assert ((zeros > 0) & (zeros <= 16 * 16)).all()  # a square of at most half the size, blanked
    assert torch.equal(holed[holed != 0], images.detach()[holed != 0])
    critic_augment(images, ("translation", "cutout")).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown critic augmentation"):
        critic_augment(images, ("colour",))


def _inside(dy: int, dx: int, size: int) -> torch.Tensor:
    """The pixels of a ``size`` square that a shift by (dy, dx) fills from the image, not from outside."""
    r = torch.arange(size).view(size, 1) - dy
    c = torch.arange(size).view(1, size) - dx
    return ((r >= 0) & (r < size) & (c >= 0) & (c < size)).float()[None]
