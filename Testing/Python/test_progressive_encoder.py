"""The progressive encoder: radiograph -> the VQ-GAN's normalised latent grid, and the prior y."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from XctDiffCore.models.progressive_encoder import ProgressiveEncoder, ray_sampling_grid
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


@pytest.mark.parametrize("lift", ["mlp", "geometric"])
def test_latent_loss_goes_down(lift):
    encoder = tiny_encoder(lift=lift)
    xray = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    target = homogeneous_normalize(torch.randn(2, 8, 8, 8, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    optimiser = torch.optim.Adam(encoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
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


# --- the lift: the paper's MLP (default) or the geometric back-projection along the DRR's rays ------------


def test_default_lift_is_the_papers_mlp_with_an_unchanged_state_dict():
    encoder = tiny_encoder()
    assert encoder.lift_kind == "mlp"
    state = encoder.state_dict()
    # The keys and sizes the MLP encoder had before the geometric lift existed (checkpoints still load).
    assert [k for k in state if not k.startswith(("encoder_2d.", "encoder_3d."))] == [
        "lift.0.weight", "lift.0.bias", "lift.1.weight", "lift.1.bias", "lift.3.weight", "lift.3.bias"
    ]
    assert len(state) == 54 and sum(v.numel() for v in state.values()) == 32608
    assert list(tiny_encoder(lift="mlp").state_dict()) == list(state)


def test_geometric_lift_shapes_and_state_dict():
    for geometry in ("cone", "parallel"):
        encoder = tiny_encoder(lift="geometric", geometry=geometry)
        z = encoder(torch.randn(2, 1, 32, 32))
        assert z.shape == (2, *encoder.latent_shape) == (2, 8, 8, 8, 8)
        assert encoder.ray_grid.shape == (8, 8, 8, 2)
        state = encoder.state_dict()
        assert "ray_grid" not in state  # fixed by the geometry: a non-persistent buffer
        assert sorted(k for k in state if not k.startswith(("encoder_2d.", "encoder_3d."))) == [
            "depth_embedding", "lift.bias", "lift.weight"
        ]
        assert state["depth_embedding"].shape == (4, 8)  # (C', depth)
    big = tiny_encoder(image_size=128, channels_2d=(4, 8, 8), depth=32, lift_channels=2, channels_3d=(4,), norm_groups=4,
                       lift="geometric")
    with torch.no_grad():
        assert big(torch.randn(1, 1, 128, 128)).shape == (1, 8, 32, 32, 32)


def test_parallel_rays_put_a_film_feature_at_its_pixel_in_every_slice():
    encoder = tiny_encoder(lift="geometric", geometry="parallel")
    features = torch.randn(2, 16, 8, 8)  # (B, C, h, w): the 2D encoder's map
    volume = encoder._back_project(features)  # (B, C, depth, h, w)
    assert volume.shape == (2, 16, 8, 8, 8)
    for d in range(8):
        torch.testing.assert_close(volume[:, :, d], features, atol=1e-5, rtol=0)
    spike = torch.zeros(1, 1, 8, 8)
    spike[0, 0, 2, 6] = 1.0  # film row 2 (H), column 6 (W)
    expected = torch.zeros(1, 1, 8, 8, 8)
    expected[0, 0, :, 2, 6] = 1.0
    torch.testing.assert_close(encoder._back_project(spike), expected, atol=1e-5, rtol=0)


def test_cone_rays_magnify_more_toward_the_posterior_source():
    """D runs anterior (d = 0, next to the detector) -> posterior (the source side, see drr.py)."""
    grid = tiny_encoder(lift="geometric", geometry="cone").ray_grid  # (depth, h, w, [x, y])
    parallel = tiny_encoder(lift="geometric", geometry="parallel").ray_grid
    # The footprint of each slice on the film, in mm, over the slice's own extent in mm.
    footprint = (grid[:, 0, -1, 0] - grid[:, 0, 0, 0]) * 250.0
    extent = (parallel[:, 0, -1, 0] - parallel[:, 0, 0, 0]) * 160.0
    magnification = footprint / extent
    assert (magnification > 1).all() and (magnification.diff() > 0).all(), magnification
    t = (torch.arange(8) + 0.5 - 4) * 40.0  # slice depths, mm from the isocentre (+ posterior)
    torch.testing.assert_close(magnification, 949.0 / (541.0 - t), rtol=1e-5, atol=0)
    # The same along H, and centred on the detector's centre.
    torch.testing.assert_close(grid[..., 1], grid.transpose(1, 2)[..., 0])
    torch.testing.assert_close(grid.mean(dim=(1, 2)), torch.zeros(8, 2), atol=1e-6, rtol=0)


def test_cone_rays_match_the_drr_renderer():
    """A single bright voxel's DRR lands where the lift's grid says that voxel projects."""
    import inspect
    from dataclasses import fields

    from XctDiffCore.drr import ConeGeometry, render_drr

    defaults = inspect.signature(ray_sampling_grid).parameters
    for field in fields(ConeGeometry):  # the model's copied defaults are drr.py's
        assert defaults[field.name].default == field.default
        assert inspect.signature(ProgressiveEncoder).parameters[field.name].default == field.default
    side = 32  # 32^3 voxels of 10 mm: the 320 mm cube
    grid = ray_sampling_grid(side, side)  # (depth, h, w, [x, y])
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    for d, h, w in [(30, 12, 20), (1, 20, 9), (16, 14, 18)]:
        volume = torch.full((1, 1, side, side, side), -1000.0)
        volume[0, 0, d, h, w] = 1000.0
        drr = render_drr(volume, ConeGeometry(), size=side, spacing_mm=(10.0, 10.0, 10.0))[0, 0]  # (rows, cols)
        centroid = torch.stack([(drr * cols).sum(), (drr * rows).sum()]) / drr.sum()  # (col, row) in pixels
        projected = ((grid[d, h, w] + 1) * side - 1) / 2  # grid_sample units -> pixels
        torch.testing.assert_close(centroid, projected, atol=0.1, rtol=0)


def test_the_geometric_lift_is_the_pointwise_convolution_of_the_back_projected_features():
    """The lift runs its 1x1x1 convolution on the film's map before the sampling (cheaper); it must equal the
    definition, the convolution (bias included) of every voxel's sampled features, also where rays miss the film."""
    encoder = tiny_encoder(lift="geometric", geometry="cone", detector_size_mm=200.0)  # a small film: rays miss it
    assert (encoder.ray_grid.abs() > 1).any()
    with torch.no_grad():
        encoder.lift.bias.normal_()
        xray = torch.randn(2, 1, 32, 32)
        features = encoder.encoder_2d(xray[:, :, None])  # (B, C, 1, h, w)
        expected = encoder.lift(encoder._back_project(features[:, :, 0])) + encoder.depth_embedding[:, :, None, None]
        torch.testing.assert_close(encoder.lifted(xray), expected, atol=1e-5, rtol=1e-5)


def test_depth_embedding_gets_a_gradient():
    encoder = tiny_encoder(lift="geometric")
    encoder(torch.randn(2, 1, 32, 32)).square().mean().backward()
    grad = encoder.depth_embedding.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is not None for p in encoder.parameters())


def test_geometric_lift_under_bf16_autocast():
    encoder = tiny_encoder(lift="geometric")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = encoder(torch.randn(1, 1, 32, 32))
    assert z.shape == (1, 8, 8, 8, 8) and torch.isfinite(z).all()


def test_unknown_lift_or_geometry_is_refused():
    with pytest.raises(ValueError, match="lift"):
        tiny_encoder(lift="transformer")
    with pytest.raises(ValueError, match="geometry"):
        tiny_encoder(lift="geometric", geometry="fan")
    with pytest.raises(ValueError, match="geometry"):
        tiny_encoder(geometry="fan")
    with pytest.raises(ValueError, match="source"):
        tiny_encoder(lift="geometric", source_to_isocenter_mm=100.0)


def test_the_config_builds_either_lift():
    import dataclasses

    from XctDiffCore.config import EncoderModelConfig, load_config

    tiny = dict(image_size=32, channels_2d=(8, 16, 16), num_res_blocks=1, depth=8, lift_channels=4, channels_3d=(16,),
                norm_groups=8)
    assert ProgressiveEncoder(**dataclasses.asdict(EncoderModelConfig(**tiny))).lift_kind == "mlp"
    encoder = ProgressiveEncoder(**dataclasses.asdict(EncoderModelConfig(**tiny, lift="geometric", geometry="parallel")))
    assert encoder.lift_kind == "geometric"
    assert load_config("cpu").encoder.model.lift == "geometric"
    assert load_config("paper").encoder.model.lift == "mlp"
