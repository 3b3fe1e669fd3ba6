"""On-the-fly training variants (training/variants.py): exact crops when nothing is drawn, reproducible per step,
air outside the volume and in the air, every magnitude doing what it says."""
from __future__ import annotations

import pytest
import torch

from XctDiffCore.config import AugmentConfig, FilmConfig
from XctDiffCore.training.variants import random_films, random_views, step_generator

OFF = AugmentConfig(enabled=False).magnitudes()


def volumes(b: int = 2, n: int = 32) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(b, 1, n, n, n) * 2.0 - 1.0


def test_without_augmentation_a_view_is_an_exact_random_crop():
    x = volumes()
    out = random_views(x, step_generator(0, 0, 7), 16, **OFF)
    start = torch.randint(0, 17, (2, 3), generator=step_generator(0, 0, 7))  # the first draw is the crop corner
    for i, (d, h, w) in enumerate(start.tolist()):
        torch.testing.assert_close(out[i], x[i, :, d:d + 16, h:h + 16, w:w + 16], rtol=0, atol=1e-6)
    assert not torch.equal(start[0], start[1])  # each item its own window


def test_views_are_reproducible_per_seed_rank_and_step():
    x = volumes()
    a = random_views(x, step_generator(3, 0, 11), 16)
    torch.testing.assert_close(a, random_views(x, step_generator(3, 0, 11), 16))
    for other in (step_generator(3, 0, 12), step_generator(3, 1, 11), step_generator(4, 0, 11)):
        assert not torch.allclose(a, random_views(x, other, 16))


def test_augmented_views_differ_from_crops_but_stay_close_and_in_range():
    x = torch.nn.functional.avg_pool3d(volumes(1, 40), 5, stride=1, padding=2)  # smooth, so a small warp is a small change
    plain = random_views(x, step_generator(0, 0, 1), **OFF)
    warped = random_views(x, step_generator(0, 0, 1))
    torch.testing.assert_close(plain, x)
    difference = (warped - x).abs().mean()
    assert 0.002 < difference < 0.2
    assert warped.min() >= -1.0 and warped.max() <= 1.0


def test_air_stays_air_and_outside_the_volume_is_air():
    air = torch.full((1, 1, 24, 24, 24), -1.0)
    out = random_views(air, step_generator(0, 0, 0), max_rotation_deg=10, max_scale=0.2, max_hu_scale=0.1,
                       max_hu_offset=100.0)
    torch.testing.assert_close(out, air)
    water = torch.full((1, 1, 24, 24, 24), -1.0 / 3.0)  # 0 HU in the [-1024, 2048] window
    shifted = random_views(water, step_generator(0, 0, 0), max_rotation_deg=0, max_scale=0, max_translation=0.4,
                           elastic_mm=0, max_hu_scale=0, max_hu_offset=0)
    assert (shifted == -1.0).float().mean() > 0.05  # the part shifted in from outside is air


def test_anisotropic_scaling_changes_each_axis_on_its_own():
    n = 32
    x = torch.full((1, 1, n, n, n), -1.0)
    x[..., 8:24, 8:24, 8:24] = 0.0  # a cube of tissue
    extents = []
    for step in range(6):
        out = random_views(x, step_generator(0, 0, step), max_rotation_deg=0, max_scale=0.2, max_translation=0,
                           elastic_mm=0, max_hu_scale=0, max_hu_offset=0)
        inside = out[0, 0] > -0.5
        extents.append([int(inside.any(dim=tuple(a for a in range(3) if a != k)).sum()) for k in range(3)])
    assert any(len(set(e)) > 1 for e in extents)  # some draw scales the axes differently


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        random_views(volumes(), step_generator(0, 0, 0), 64)
    with pytest.raises(ValueError):
        random_views(torch.zeros(1, 1, 8, 8, 16), step_generator(0, 0, 0))


def test_films_are_unchanged_without_randomisation_and_randomised_within_range():
    torch.manual_seed(0)
    images = torch.nn.functional.avg_pool2d(torch.rand(3, 1, 32, 32), 5, stride=1, padding=2)
    off = FilmConfig(enabled=True, max_gamma=0, max_contrast=0, max_blur_px=0, max_noise=0, max_haze=0).magnitudes()
    torch.testing.assert_close(random_films(images, step_generator(0, 0, 0), **off), images)
    a = random_films(images, step_generator(0, 0, 1), **FilmConfig(enabled=True).magnitudes())
    torch.testing.assert_close(a, random_films(images, step_generator(0, 0, 1), **FilmConfig(enabled=True).magnitudes()))
    assert a.shape == images.shape and a.min() >= 0.0 and a.max() <= 1.0
    assert not torch.allclose(a, images) and (a - images).abs().mean() < 0.2
    noisy = random_films(images, step_generator(0, 0, 1), 0, 0, 0, 0.2, 0)
    assert (noisy - images).std() > 0.01  # noise only: a visible std, the same image underneath
    assert FilmConfig(enabled=False).magnitudes() is None


def test_pairs_pass_through_when_off_and_are_fresh_consistent_drrs_when_on(tmp_path):
    from XctDiffCore.drr import make_geometry, normalize_drr, render_drr
    from XctDiffCore.layout import unit_to_hu
    from XctDiffCore.training.variants import PairVariants, random_pairs

    batch = {"image": volumes(2, 32), "xray": torch.zeros(2, 1, 32, 32)}
    off = PairVariants(AugmentConfig(), FilmConfig(), tmp_path / "none.json", 32, 0, 0)
    ct, xray = off(batch, 5)
    assert ct is batch["image"] and xray is batch["xray"]
    on = PairVariants(AugmentConfig(enabled=True), FilmConfig(), tmp_path / "none.json", 32, 0, 0)
    ct, xray = on(batch, 5)
    assert not torch.allclose(ct, batch["image"]) and xray.shape == (2, 1, 32, 32)
    # Without film randomisation the radiograph is exactly the normalised DRR of the warped CT, in [-1, 1].
    drr = normalize_drr(render_drr(unit_to_hu(ct), make_geometry("cone"), size=32, spacing_mm=(10.0,) * 3))
    torch.testing.assert_close(xray, drr * 2.0 - 1.0)
    ct2, xray2 = random_pairs(batch["image"], step_generator(0, 0, 5), make_geometry("cone"), 32,
                              AugmentConfig(enabled=True).magnitudes(), None)
    torch.testing.assert_close(ct2, ct)  # the same step draws the same variant


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_view_warped_on_the_gpu_is_the_view_warped_on_the_cpu():
    # the random numbers come from the same CPU generator; only where the per-voxel work runs differs
    x = volumes(2, 32)
    cpu = random_views(x, step_generator(5, 0, 3), 24)
    gpu = random_views(x.cuda(), step_generator(5, 0, 3), 24)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)
