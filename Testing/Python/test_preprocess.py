"""The paper's preprocessing: canonical 2.5 mm lung-centred CT, [0, 1] square radiographs, and the layout."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE_CT, SAMPLE_RADIOGRAPH, synthetic_chest

from XctDiffCore.errors import XctDiffError
from XctDiffCore.io import read_ct, read_radiograph
from XctDiffCore.layout import ct_to_model_layout
from XctDiffCore.preprocess import preprocess_ct, preprocess_radiograph, resize_operator
from XctDiffCore.volume import Volume


def lung_z_extent(hu: np.ndarray) -> tuple:
    """First and last axial slice where air inside the body covers > 10% of the largest such area."""
    from scipy import ndimage

    body = np.stack([ndimage.binary_fill_holes(s) for s in hu > -500])
    area = ((hu < -400) & body).sum(axis=(1, 2))
    zs = np.nonzero(area > 0.1 * area.max())[0]
    return zs.min(), zs.max()


def phantom_volume(shape=(40, 48, 48), spacing=(5.0, 5.0, 5.0), origin=(-120.0, -120.0, -100.0)) -> Volume:
    return Volume(synthetic_chest(shape, seed=3), spacing=spacing, origin=origin)


def test_preprocess_ct_shape_spacing_dtype_and_window():
    volume = phantom_volume()
    volume.array[20, 24, 10] = 5000.0  # above the stored range
    out = preprocess_ct(volume, size=64, spacing=2.5)
    assert out.shape == (64, 64, 64) and out.array.dtype == np.int16
    assert out.spacing == (2.5, 2.5, 2.5)
    np.testing.assert_array_equal(out.direction, np.eye(3))
    assert out.array.min() == -1024 and out.array.max() == 3071  # clipped to [-1024, 3071], air padding


def test_preprocess_ct_keeps_patient_position():
    """Output voxels are the input's, sampled where the output's own geometry says they are."""
    volume = read_ct(SAMPLE_CT)
    out = preprocess_ct(volume)
    offset = np.round((np.array(out.origin) - volume.origin) / 2.5).astype(int)[::-1]  # (z, y, x) voxels
    np.testing.assert_allclose(np.array(out.origin) - volume.origin, offset[::-1] * 2.5, atol=1e-3)
    assert np.all(np.abs(offset) <= 1)  # the sample was already centred this way
    src = tuple(slice(max(o, 0), 128 + min(o, 0)) for o in offset)
    dst = tuple(slice(max(-o, 0), 128 - max(o, 0)) for o in offset)
    np.testing.assert_array_equal(out.array[dst], volume.array[src])


def test_preprocess_ct_centres_the_lungs_in_z():
    volume = read_ct(SAMPLE_CT)
    # Move the chest off-centre: 40 slices of air below it, the top 30 slices cut away.
    shifted = np.concatenate([np.full((40, 128, 128), -1024, np.int16), volume.array[:-30]])
    out = preprocess_ct(Volume(shifted, volume.spacing, np.array(volume.origin) - [0, 0, 40 * 2.5]))
    low, high = lung_z_extent(out.array.astype(np.float32))
    assert abs((low + high) / 2 - 63.5) <= 2.0  # within 5 mm of the centre
    before_low, before_high = lung_z_extent(shifted.astype(np.float32))
    assert abs((before_low + before_high) / 2 - 63.5) > 30  # it was far off before
    assert high - low > 60  # the lungs themselves are all there


def test_preprocess_ct_resamples_anisotropic_input():
    fine = phantom_volume(shape=(40, 96, 96), spacing=(1.25, 1.25, 5.0), origin=(-60.0, -60.0, -100.0))
    out = preprocess_ct(fine, size=96, spacing=2.5)
    # The body (an ellipse 0.9 x 0.7 of the half field) keeps its size in millimetres.
    width_mm = (out.array > -500).any(axis=(0, 1)).sum() * 2.5
    depth_mm = (out.array > -500).any(axis=(0, 2)).sum() * 2.5
    assert width_mm == pytest.approx(0.9 * 120, abs=5.0)
    assert depth_mm == pytest.approx(0.7 * 120, abs=5.0)


def test_a_ct_already_on_the_grid_skips_the_resample_with_the_same_result(monkeypatch):
    """A prepared CT (identity direction, 2.5 mm) needs no SimpleITK: the shortcut equals the resample."""
    import XctDiffCore.preprocess as preprocess

    volume = phantom_volume(spacing=(2.5, 2.5, 2.5), origin=(-60.0, -60.0, -50.0))
    assert preprocess._on_canonical_grid(volume, 2.5)
    assert not preprocess._on_canonical_grid(phantom_volume(), 2.5)
    fast = preprocess_ct(volume, size=32)
    monkeypatch.setattr(preprocess, "_on_canonical_grid", lambda volume, spacing: False)
    resampled = preprocess_ct(volume, size=32)
    np.testing.assert_array_equal(fast.array, resampled.array)
    np.testing.assert_allclose(fast.origin, resampled.origin)


@pytest.mark.parametrize("stored", ["flipped_x", "permuted"])
def test_preprocess_ct_reorients_to_lps(stored):
    canonical = phantom_volume()
    expected = preprocess_ct(canonical, size=48)
    if stored == "flipped_x":
        # Same patient, x index running toward the patient's right: last column first.
        low, high = canonical.extent_lps()
        other = Volume(canonical.array[:, :, ::-1], canonical.spacing, (high[0], low[1], low[2]), np.diag([-1.0, 1.0, 1.0]))
    else:
        # Axis order (y, x, z) on disk: index i runs along z, j along x, k along y.
        other = Volume(np.transpose(canonical.array, (1, 2, 0)), canonical.spacing, canonical.origin, np.eye(3)[:, [2, 0, 1]])
    out = preprocess_ct(other, size=48)
    np.testing.assert_array_equal(out.array, expected.array)
    np.testing.assert_allclose(out.origin, expected.origin, atol=1e-6)


@pytest.mark.parametrize("units", ["raw 0..4095", "normalised 0..1", "normalised -1..1"])
def test_a_ct_not_in_hounsfield_units_is_refused(units):
    """Raw scanner values (air 0: no rescale intercept) or a CT normalised to 0..1 or -1..1 were prepared as HU: air
    read as tissue, the whole box one block of body, without a word."""
    hu = synthetic_chest((24, 24, 24)).astype(np.float32)
    stored = {"raw 0..4095": hu + 1024, "normalised 0..1": (hu + 1024) / 4095,
              "normalised -1..1": (hu + 1024) / 2047.5 - 1}[units]
    with pytest.raises(XctDiffError, match="not in Hounsfield units"):
        preprocess_ct(Volume(stored, spacing=(8.0,) * 3), size=16)
    assert preprocess_ct(Volume(np.full((8, 8, 8), 40.0), spacing=(8.0,) * 3), size=16).shape == (16,) * 3  # a block


def test_model_layout_puts_spine_back_left_marker_right_and_head_up():
    ct = synthetic_chest((64, 64, 64))  # canonical [z, y, x], spine at posterior y
    ct[40:44, 20:24, 52:56] = 2000.0  # a dense marker in the patient's LEFT (+x), superior (+z) half
    model = ct_to_model_layout(ct)  # [D = A->P, H = S->I, W = R->L]
    spine = np.argwhere((model > 600) & (model < 1500))
    assert np.median(spine[:, 0]) > 40  # posterior = large D
    assert abs(np.median(spine[:, 2]) - 31.5) < 2  # on the midline
    # A projection along D is a PA film [row, col]; the marker shows where the patient's left and head are.
    film = ct_to_model_layout(ct.clip(-1000, None)).sum(axis=0)
    plain = ct_to_model_layout(synthetic_chest((64, 64, 64)).clip(-1000, None)).sum(axis=0)
    row, col = np.unravel_index(np.argmax(film - plain), film.shape)
    assert col > 48  # patient's left on the image's right
    assert row < 24  # superior at the top


def test_preprocess_radiograph_shape_range_and_determinism():
    film = read_radiograph(SAMPLE_RADIOGRAPH).image
    out = preprocess_radiograph(film)
    assert out.shape == (128, 128) and out.dtype == np.float32
    # Black padding at 0; the brightest 0.5 % clipped to 1, then blurred by the anti-aliased downscaling
    # (1955 x 1841 -> 128^2), so the top stays just under 1.
    assert out.min() == 0.0 and 0.99 < out.max() <= 1.0
    np.testing.assert_array_equal(out, preprocess_radiograph(film))
    assert preprocess_radiograph(film, size=64).shape == (64, 64)


def test_preprocess_radiograph_same_for_8_and_16_bit():
    film = read_radiograph(SAMPLE_RADIOGRAPH).image  # 15 bits stored: brought to 8-bit grey levels first
    film = np.round((film - film.min()) / (film.max() - film.min()) * 255.0).astype(np.float32)
    eight = preprocess_radiograph(film)
    sixteen = preprocess_radiograph(film * 257.0 + 3.0)  # the same film in a 16-bit range, with an offset
    np.testing.assert_allclose(eight, sixteen, atol=1e-5)


def test_preprocess_radiograph_crops_empty_border_and_pads_square():
    r, c = np.mgrid[0:80, 0:60]
    body = 100.0 + 50.0 * np.sin(r / 7.0) * np.cos(c / 5.0)
    film = np.zeros((160, 200), np.float32)  # black border around an 80 x 60 body
    film[40:120, 70:130] = body
    out = preprocess_radiograph(film, size=80)
    # Cropped to 80 x 60 then padded to 80 x 80: 10 columns of padding each side, the body in between.
    assert np.all(out[:, :9] == 0) and np.all(out[:, -9:] == 0)
    assert np.all(out[:, 11:-11].max(axis=0) > 0.5) and np.all(out[1:-1, 11:-11].max(axis=1) > 0.5)
    # A few burned-in hot pixels do not change the window.
    hot = film.copy()
    hot[45:47, 75:77] = 1e5
    np.testing.assert_allclose(preprocess_radiograph(hot, size=80)[20:, :], out[20:, :], atol=5e-3)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (20, 21), (61, 40), (200, 157)])
def test_empty_lines_are_found_by_counts_as_by_sorting_each_line(shape):
    """The border test counts values above the level instead of sorting every row and column: the same
    answer as ``np.percentile(.., 95) > level``, including lines whose percentile falls between two values
    on either side of the level (the few that are still sorted) and lines exactly at it."""
    from XctDiffCore.preprocess import _lines_above

    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    level = np.float32(0.05)
    unit = rng.random(shape, dtype=np.float32) * np.float32(0.1)  # about half the values above the level
    unit[: shape[0] // 3] = rng.choice(np.array([0.0, level, 0.06, 1.0], np.float32), (shape[0] // 3, shape[1]))
    for axis in (1, 0):
        n = shape[axis]
        k = int(np.floor(0.95 * (n - 1)))
        edited = unit.copy()
        line = np.full(n, 0.01, np.float32)  # its order statistics k and k + 1 straddle the level
        line[k + 1:] = 0.2
        if axis == 1:
            edited[0, :] = line
        else:
            edited[:, 0] = line
        assert np.count_nonzero(edited > level, axis=axis)[0] == n - k - 1  # the case that is still sorted
        expected = np.percentile(edited, 95, axis=axis) > level
        np.testing.assert_array_equal(_lines_above(edited, level, axis), expected)


def test_film_percentiles_are_numpys():
    """The film's 0.5/99.5 percentiles from a histogram and one bin's partial sort: NumPy's values (to float64
    rounding; identical in float32, as the model sees them) on films with ties, a few levels, heavy tails,
    one odd pixel, one pixel, a constant image, and at percentiles 0 and 100."""
    from XctDiffCore.preprocess import film_percentiles

    rng = np.random.default_rng(7)
    films = [rng.normal(size=(301, 257)), rng.integers(0, 5, size=(64, 90)), rng.exponential(size=(120, 80)) ** 3,
             np.where(np.arange(4000).reshape(50, 80) == 17, 7.0, 3.0), np.array([[5.0]]), np.full((9, 9), 2.0),
             rng.integers(0, 4096, size=(400, 300)) * 1.25 + 3000.5]
    for film in films:
        film = film.astype(np.float32)
        for qs in ((0.5, 99.5), (0.0, 100.0), (37.3,), (50.0, 2.0, 99.99)):
            expected, got = np.percentile(film, qs), film_percentiles(film, qs)
            np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
            np.testing.assert_array_equal(got.astype(np.float32), expected.astype(np.float32))


@pytest.mark.parametrize("side,size", [(1955, 128), (300, 128), (257, 128), (129, 128), (128, 128), (100, 128),
                                       (37, 64), (2, 8), (1, 4)])
def test_the_resize_operator_is_skimages_anti_aliased_resize(side, size):
    """The square film is resized as R @ image @ R.T: it must be skimage's resize (Gaussian anti-aliasing when
    shrinking, linear interpolation, mirror edges), shrinking, keeping or enlarging."""
    from skimage.transform import resize

    image = np.random.default_rng(side).random((side, side), dtype=np.float32)
    image[: side // 3] += 2.0  # an edge, so the boundary handling and the blur show
    expected = resize(image, (size, size), order=1, anti_aliasing=side > size, preserve_range=True)
    operator = resize_operator(side, size)
    assert operator.shape == (size, side) and operator.dtype == np.float32
    np.testing.assert_allclose(operator @ image @ operator.T, expected, atol=2e-6, rtol=0)


def test_preprocess_radiograph_refuses_blank_and_tiny():
    with pytest.raises(XctDiffError, match="blank"):
        preprocess_radiograph(np.full((64, 64), 7.0))
    with pytest.raises(XctDiffError, match="32x32"):
        preprocess_radiograph(np.ones((20, 64)))
