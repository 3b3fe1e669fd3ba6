"""The pinned metric protocol (XctDiffCore.metrics): fixed HU window, PSNR/SSIM on the whole volume,
X2CT-GAN's slice-averaged PSNR/SSIM over three axes, slice-wise LPIPS."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import synthetic_chest
from skimage.metrics import structural_similarity

from XctDiffCore import metrics


@pytest.fixture
def pair():
    truth = synthetic_chest((24, 32, 28), seed=0)
    noisy = truth + np.random.default_rng(1).normal(0, 150, truth.shape).astype(np.float32)
    return metrics.window01(noisy), metrics.window01(truth)


def test_window_is_fixed_and_clipped():
    hu = np.array([-3000.0, -1024.0, 512.0, 2048.0, 4000.0])
    np.testing.assert_allclose(metrics.window01(hu), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_psnr_of_a_constant_hu_offset_does_not_depend_on_the_volume():
    """A 96 HU error is 96/3072 of the window: 10 log10(1 / (1/32)^2) = 30.10 dB for any anatomy."""
    for seed in (0, 1):
        truth = synthetic_chest((16, 16, 16), seed=seed)
        truth = np.clip(truth, -900, 1900)  # keep truth + offset inside the window
        scores = metrics.volume_scores(truth + 96.0, truth)
        assert scores["psnr"] == pytest.approx(20 * np.log10(32), abs=1e-6)
        assert scores["psnr_slices"] == pytest.approx(20 * np.log10(32), abs=1e-6)


def test_identical_volumes_score_perfectly(pair):
    _, truth = pair
    assert metrics.psnr(truth, truth) == metrics.PERFECT_PSNR_DB
    assert metrics.slice_psnr(truth, truth) == metrics.PERFECT_PSNR_DB
    assert metrics.ssim_3d(truth, truth) == pytest.approx(1.0)
    assert metrics.slice_ssim(truth, truth) == pytest.approx(1.0)


def test_psnr_matches_its_definition(pair):
    pred, truth = pair
    mse = np.mean((pred - truth) ** 2)
    assert metrics.psnr(pred, truth) == pytest.approx(10 * np.log10(1 / mse))


def test_ssim_3d_is_scikit_image_with_default_window(pair):
    pred, truth = pair
    assert metrics.ssim_3d(pred, truth) == pytest.approx(structural_similarity(truth, pred, data_range=1.0, win_size=7))
    assert 0.0 < metrics.ssim_3d(pred, truth) < 1.0


def test_slice_psnr_matches_x2ct_gan_loops(pair):
    pred, truth = pair
    per_axis = []
    for axis in range(3):
        values = []
        for i in range(truth.shape[axis]):
            mse = np.mean((np.take(pred, i, axis) - np.take(truth, i, axis)) ** 2)
            values.append(20 * np.log10(1.0 / np.sqrt(mse)))
        per_axis.append(np.mean(values))
    assert metrics.slice_psnr(pred, truth) == pytest.approx(np.mean(per_axis))


def test_slice_ssim_is_the_mean_of_2d_slice_ssims(pair):
    pred, truth = pair
    per_axis = [
        np.mean([structural_similarity(np.take(truth, i, a), np.take(pred, i, a), data_range=1.0)
                 for i in range(truth.shape[a])])
        for a in range(3)
    ]
    assert metrics.slice_ssim(pred, truth) == pytest.approx(np.mean(per_axis))


def test_slice_lpips_averages_slices_then_axes():
    """With a stand-in distance (mean absolute difference per slice) the averaging is checkable by hand."""

    class MeanAbs(torch.nn.Module):
        def forward(self, x, y):
            assert x.ndim == 4 and x.shape[1] == 1 and x.min() >= -1 and x.max() <= 1
            return (x - y).abs().mean(dim=(1, 2, 3))

    rng = np.random.default_rng(0)
    truth = rng.random((4, 5, 6))
    pred = np.clip(truth + rng.normal(0, 0.1, truth.shape), 0, 1)
    expected = np.mean([np.mean(np.abs(pred - truth).mean(axis=tuple(b for b in range(3) if b != a))) * 2 for a in range(3)])
    assert metrics.slice_lpips(pred, truth, MeanAbs()) == pytest.approx(expected, rel=1e-5)


def test_lpips_of_identical_volumes_is_zero():
    from XctDiffCore.models.lpips import LPIPS

    torch.manual_seed(0)
    truth = metrics.window01(synthetic_chest((32, 32, 32)))
    assert metrics.slice_lpips(truth, truth, LPIPS()) == pytest.approx(0.0, abs=1e-6)


def test_volume_scores_keys_and_missing_lpips(pair):
    truth_hu = synthetic_chest((16, 16, 16))
    scores = metrics.volume_scores(truth_hu + 50, truth_hu, lpips=None)
    assert set(scores) == {"psnr", "ssim", "psnr_slices", "ssim_slices", "lpips", "bone_dice", "lung_dice", "lung_dice_body"}
    assert scores["lpips"] is None


def test_bone_and_lung_dice_follow_the_hu_thresholds():
    truth = np.full((8, 8, 8), -1024.0)
    truth[:, :4] = -800.0  # lung
    truth[:, 6:] = 700.0  # bone
    assert metrics.bone_dice(truth, truth) == 1.0 and metrics.lung_dice(truth, truth) == 1.0
    half_bone = truth.copy()
    half_bone[:, 7:] = 40.0  # half the bone becomes soft tissue: Dice 2 * 64 / (64 + 128)
    assert metrics.bone_dice(half_bone, truth) == pytest.approx(2 / 3)
    assert metrics.lung_dice(half_bone, truth) == 1.0
    air = np.full_like(truth, -1024.0)  # -1024 is not lung (the interval is open) and not bone
    assert metrics.bone_dice(air, truth) == 0.0 and metrics.lung_dice(air, truth) == 0.0
    assert metrics.bone_dice(air, air) == 1.0  # both empty


def _chest_in_air(outside_air: float, cut_posterior: bool = False) -> np.ndarray:
    """[z, y, x]: an elliptic body (soft tissue) holding two lungs, in air of the given HU; cut: the body runs
    out of the volume at the back, so its lungs reach the volume's edge (the ring is open there)."""
    z, y, x = np.mgrid[:8, :32, :32]
    centre, lung_depth = (22, 10.0) if cut_posterior else (16, 8.0)
    ct = np.where(((y - centre) / 13.0) ** 2 + ((x - 16) / 14.0) ** 2 < 1.0, 40.0, outside_air)
    ct[(((y - centre) / lung_depth) ** 2 + ((np.abs(x - 16) - 6) / 3.5) ** 2) < 1.0] = -850.0
    return ct


@pytest.mark.parametrize("cut_posterior", [False, True])
def test_lung_dice_in_the_body_ignores_the_air_around_the_patient(cut_posterior):
    """Air of -995 HU around the truth is 'lung' by the threshold; in the body only the lungs count."""
    truth, prediction = _chest_in_air(-995.0, cut_posterior), _chest_in_air(-1024.0, cut_posterior)
    body = metrics.body_region(truth)
    assert body[:, 16, 16].all() and not body[:, 0, 0].any()  # the lungs are inside, the corners outside
    assert body[truth == -850.0].all()
    if cut_posterior:  # why a hull: filling the holes of an open ring drops the lungs
        from XctDiffCore.preprocess import _body_mask

        assert not _body_mask(truth)[truth == -850.0].any()
    assert metrics.lung_dice(prediction, truth) < 0.6  # the pinned lung Dice is mostly the outside air
    # the hull of a rasterised body takes in a few pixels of the air just outside it: almost 1
    assert metrics.lung_dice_in_body(prediction, truth) > 0.94
    assert metrics.lung_dice_in_body(prediction, truth, body) == metrics.lung_dice_in_body(prediction, truth)
    assert metrics.lung_dice_in_body(truth, truth) == 1.0
    collapsed = np.where(truth == -850.0, 40.0, prediction)  # no lungs at all
    assert metrics.lung_dice_in_body(collapsed, truth) == 0.0
    half = prediction.copy()
    half[:, :, 16:][truth[:, :, 16:] == -850.0] = 40.0  # the left lung lost: Dice 2 * 1 / (1 + 2) = 2 / 3
    assert metrics.lung_dice_in_body(half, truth) == pytest.approx(2 / 3, abs=0.04)


def test_worse_reconstructions_score_worse():
    truth = synthetic_chest((16, 24, 24), seed=0)
    rng = np.random.default_rng(0)
    mild, strong = (truth + rng.normal(0, s, truth.shape) for s in (30, 300))
    a, b = metrics.volume_scores(mild, truth), metrics.volume_scores(strong, truth)
    for key in ("psnr", "ssim", "psnr_slices", "ssim_slices"):
        assert a[key] > b[key]


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError):
        metrics.volume_scores(np.zeros((8, 8, 8)), np.zeros((8, 8, 9)))
    with pytest.raises(ValueError):
        metrics.ssim_2d(np.zeros((8, 8)), np.zeros((8, 9)))


def test_a_whole_chest_passes_and_a_slab_or_a_narrow_crop_is_named():
    """The protocol scores whole chests: evaluate flags a truth whose body is shorter than 200 mm head to foot or
    narrower than 240 mm (every class-A chest of the shared data spans 250+ and 290+ mm on the 2.5 mm grid)."""
    chest = synthetic_chest((128, 128, 128))  # 320 mm each way, the body 288 mm wide
    assert metrics.whole_chest_problem(chest) is None
    slab = np.full_like(chest, -1024.0)
    slab[40:80] = chest[40:80]  # 100 mm of it, as a partial scan
    assert metrics.whole_chest_problem(slab) == "its body spans only 100 mm head to foot (a whole chest: 200 or more)"
    narrow = np.full_like(chest, -1024.0)
    narrow[..., 32:96] = chest[..., 32:96]  # a 160 mm wide crop around the heart
    assert metrics.whole_chest_problem(narrow) == "its body spans only 160 mm left to right (a whole chest: 240 or more)"
    assert "100 mm" in metrics.whole_chest_problem(slab[::2, ::2, ::2], spacing_mm=5.0)  # on another grid, in mm
