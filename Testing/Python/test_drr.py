"""DRR renderer: shapes, orientation, cone vs parallel, gradients, contrast, and the `xctdiff drr` command."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE_CT, SAMPLE_RADIOGRAPH, synthetic_chest

from XctDiffCore.drr import (
    ConeGeometry,
    ParallelGeometry,
    drr_of_volume,
    make_geometry,
    normalize_drr,
    render_drr,
)
from XctDiffCore.errors import XctDiffError
from XctDiffCore.layout import ct_to_model_layout
from XctDiffCore.volume import Volume

GEOMETRIES = [ParallelGeometry(), ConeGeometry()]


def _model_tensor(ct_zyx: np.ndarray) -> torch.Tensor:
    """Canonical [z, y, x] HU -> (1, 1, D, H, W) float32 model tensor."""
    return torch.from_numpy(np.ascontiguousarray(ct_to_model_layout(ct_zyx.astype(np.float32))))[None, None]


def _corr(a, b) -> float:
    return float(np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1])


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["parallel", "cone"])
@pytest.mark.parametrize("size", [16, 24, 32])
def test_shape_dtype_and_batch_independence(geometry, size):
    volumes = torch.stack([_model_tensor(synthetic_chest((32, 32, 32), seed=s))[0] for s in range(2)])
    drr = render_drr(volumes, geometry, size=size)
    assert drr.shape == (2, 1, size, size) and drr.dtype == torch.float32 and drr.device.type == "cpu"
    assert torch.isfinite(drr).all() and (drr >= 0).all() and drr.amax() > 0
    # Each batch item is rendered on its own: the batch equals the two single renders.
    for b in range(2):
        torch.testing.assert_close(drr[b : b + 1], render_drr(volumes[b : b + 1], geometry, size=size))
    image = normalize_drr(drr)
    assert image.shape == drr.shape and float(image.min()) == 0.0 and float(image.max()) == 1.0


def test_integer_volume_and_volume_object_are_accepted():
    ct = synthetic_chest((24, 24, 24)).astype(np.int16)
    from_tensor = render_drr(_model_tensor(ct), ParallelGeometry(), size=24, spacing_mm=(3.0, 3.0, 3.0))
    from_volume = render_drr(Volume(ct, spacing=(3.0, 3.0, 3.0)), ParallelGeometry(), size=24)
    torch.testing.assert_close(from_tensor, from_volume)
    with pytest.raises(XctDiffError):
        render_drr(Volume(ct, direction=np.diag([-1.0, 1.0, -1.0])), ParallelGeometry(), size=24)


def test_parallel_line_integral_is_exact_for_a_uniform_slab():
    # Water everywhere: every ray crosses D voxels of water, so the DRR is mu_water * D * spacing.
    water = torch.zeros(1, 1, 20, 16, 16)
    drr = render_drr(water, ParallelGeometry(), size=16, spacing_mm=(2.0, 2.5, 2.5), mu_water=0.02)
    torch.testing.assert_close(drr, torch.full_like(drr, 0.02 * 20 * 2.0))


def test_parallel_marker_lands_at_its_row_and_column():
    # An A->P column of bone at a superior, patient-left position of a canonical [z, y, x] volume.
    shape = (32, 32, 32)
    ct = np.full(shape, -1024.0, dtype=np.float32)
    z, x = 25, 6  # z: Inferior->Superior, x: Right->Left
    ct[z, :, x] = 1000.0
    drr = render_drr(Volume(ct, spacing=(2.5, 2.5, 2.5)), ParallelGeometry(), size=32)[0, 0]
    row, col = np.unravel_index(int(drr.argmax()), drr.shape)
    assert (row, col) == (shape[0] - 1 - z, x)  # head up; patient's right on the image's left
    # The same marker on the patient's left (x large) lands on the image's right.
    ct = np.full(shape, -1024.0, dtype=np.float32)
    ct[z, :, 27] = 1000.0
    drr = render_drr(Volume(ct, spacing=(2.5, 2.5, 2.5)), ParallelGeometry(), size=32)[0, 0]
    assert np.unravel_index(int(drr.argmax()), drr.shape) == (shape[0] - 1 - z, 27)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["parallel", "cone"])
def test_phantom_spine_centred_and_left_marker_on_image_right(geometry):
    ct = synthetic_chest((64, 64, 64))
    ct[20:28, 16:48, 52:56] = 1500.0  # a dense marker in the patient's left lower chest
    without = render_drr(Volume(synthetic_chest((64, 64, 64))), geometry, size=64)[0, 0].numpy()
    with_marker = render_drr(Volume(ct), geometry, size=64)[0, 0].numpy()
    rows, cols = np.nonzero(with_marker - without > 0.5 * (with_marker - without).max())
    assert cols.min() > 32 and rows.min() > 32  # image right (patient's left), image bottom (inferior)
    # The spine (posterior, midline) is the brightest column of the phantom's mid-chest rows.
    profile = without[24:40].mean(axis=0)
    assert abs(int(profile.argmax()) - 31.5) <= 1.5


def test_cone_agrees_with_parallel_for_a_centred_object():
    # A 3 cm soft-tissue sphere at the isocentre; a detector that images the volume's extent at the isocentre.
    n, spacing = 64, 2.5
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * spacing] * 3, indexing="ij")
    ct = np.where(zz**2 + yy**2 + (xx / 1.3) ** 2 < 30.0**2, 500.0, -1024.0).astype(np.float32)
    cone = ConeGeometry(detector_size_mm=n * spacing * 949.0 / 541.0)
    image_cone = render_drr(Volume(ct, spacing=(spacing,) * 3), cone, size=n)[0, 0].numpy()
    image_parallel = render_drr(Volume(ct, spacing=(spacing,) * 3), ParallelGeometry(), size=n)[0, 0].numpy()
    assert _corr(image_cone, image_parallel) > 0.99
    assert image_cone.sum() == pytest.approx(image_parallel.sum(), rel=0.05)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["parallel", "cone"])
def test_gradients_flow_to_the_voxels(geometry):
    volume = _model_tensor(synthetic_chest((16, 16, 16))).requires_grad_(True)
    target = torch.rand(1, 1, 16, 16)
    loss = torch.nn.functional.l1_loss(normalize_drr(render_drr(volume, geometry, size=16)), target)
    loss.backward()
    assert torch.isfinite(volume.grad).all() and volume.grad.abs().sum() > 0


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["parallel", "cone"])
def test_gradcheck_in_double_precision(geometry):
    torch.manual_seed(0)
    volume = (torch.rand(1, 1, 6, 6, 6, dtype=torch.float64) * 1000 - 500).requires_grad_(True)
    render = lambda v: render_drr(v, geometry, size=5, spacing_mm=(20.0, 20.0, 20.0))  # noqa: E731
    assert torch.autograd.gradcheck(render, (volume,), fast_mode=True)


def test_geometry_validation():
    with pytest.raises(ValueError):
        ConeGeometry(source_to_isocenter_mm=1000.0, source_to_detector_mm=900.0)
    with pytest.raises(XctDiffError):
        make_geometry("fan")
    assert make_geometry("cone") == ConeGeometry() and make_geometry("parallel") == ParallelGeometry()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["parallel", "cone"])
def test_cuda_matches_cpu(geometry):
    volume = _model_tensor(synthetic_chest((64, 64, 64)))
    cpu = render_drr(volume, geometry, size=64)
    cuda = render_drr(volume.cuda(), geometry, size=64)
    assert cuda.is_cuda
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-3, atol=1e-3)


def _sample_ct() -> Volume:
    from XctDiffCore.io import read_ct

    return read_ct(SAMPLE_CT)


def test_bone_brighter_than_lung_on_the_sample():
    ct = _sample_ct()
    image = drr_of_volume(ct, "parallel", size=128)
    assert image.shape == (128, 128) and image.dtype == np.float32 and 0.0 <= image.min() < image.max() <= 1.0
    # Where the rays cross the most bone vs the most lung (from the CT itself, in the image's layout).
    model = ct_to_model_layout(ct.array.astype(np.float32))
    bone_path = (model > 300).sum(axis=0)
    lung_path = ((model > -950) & (model < -500)).sum(axis=0)
    bone_pixels = bone_path >= np.percentile(bone_path, 97)
    lung_pixels = lung_path >= np.percentile(lung_path, 97)
    assert image[bone_pixels].mean() > image[lung_pixels].mean() + 0.25


def test_cone_drr_is_normalised_like_a_preprocessed_radiograph():
    from XctDiffCore.preprocess import preprocess_ct, preprocess_radiograph

    image = drr_of_volume(preprocess_ct(_sample_ct()), "cone", size=128)
    # The body fills the cone detector: no border to crop, so the preprocessing leaves the DRR as it is.
    np.testing.assert_allclose(preprocess_radiograph(image, size=128), image, atol=1e-3)


def test_cone_drr_of_the_sample_is_radiograph_like():
    image = drr_of_volume(_sample_ct(), "cone", size=64)
    assert image.shape == (64, 64) and image.dtype == np.float32
    # Mediastinum and spine (centre columns) brighter than the lung fields on either side.
    centre = image[16:40, 28:36].mean()
    assert centre > image[16:40, 8:20].mean() + 0.1 and centre > image[16:40, 44:56].mean() + 0.1


# --- the `xctdiff drr` command ------------------------------------------------------------------


def test_cli_drr_writes_a_tagged_png_and_an_nrrd(tmp_path, capsys):
    from XctDiffCore.commands.cli import main
    from XctDiffCore.io import read_radiograph

    out = tmp_path / "sample_drr.png"
    assert main(["drr", str(SAMPLE_CT), "-o", str(out), "--size", "64"]) == 0
    radiograph = read_radiograph(out)
    assert radiograph.is_drr and radiograph.image.shape == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample_drr.png"]

    out_nrrd = tmp_path / "sample_drr.nrrd"
    assert main(["drr", str(SAMPLE_CT), "-o", str(out_nrrd), "--size", "64", "--geometry", "parallel"]) == 0
    radiograph = read_radiograph(out_nrrd)
    assert radiograph.is_drr and radiograph.image.shape == (64, 64)
    from XctDiffCore.preprocess import preprocess_ct

    expected = drr_of_volume(preprocess_ct(_sample_ct()), "parallel", 64)
    np.testing.assert_allclose(radiograph.image, expected, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["missing_ct", "radiograph_as_ct", "missing_output_folder", "unknown_output_format"],
)
def test_cli_drr_bad_input_leaves_nothing(tmp_path, capsys, case):
    from XctDiffCore.commands.cli import main

    ct, out = str(SAMPLE_CT), tmp_path / "drr.png"
    if case == "missing_ct":
        ct = str(tmp_path / "absent.nrrd")
    elif case == "radiograph_as_ct":
        ct = str(SAMPLE_RADIOGRAPH)
    elif case == "missing_output_folder":
        out = tmp_path / "absent" / "drr.png"
    else:
        out = tmp_path / "drr.jpg"
    assert main(["drr", ct, "-o", str(out), "--size", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert list(tmp_path.rglob("*")) == []


def test_demo_without_a_model_renders_the_sample_into_a_new_folder(tmp_path, capsys, monkeypatch):
    from XctDiffCore import model_folder
    from XctDiffCore.commands.demo import run_demo
    from XctDiffCore.io import read_radiograph

    def no_model():
        raise XctDiffError("no bundled model")

    monkeypatch.setattr(model_folder, "bundled_model_folder", no_model)
    out = tmp_path / "demo" / "nested"
    paths = run_demo(out)
    assert read_radiograph(paths["drr"]).is_drr and read_radiograph(paths["drr"]).image.shape == (128, 128)
    overview = read_radiograph(paths["overview"]).image
    assert overview.shape[0] == 128 and overview.shape[1] > 3 * 128
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "no trained model" in printed[0].lower() and str(out) in printed[0]


def test_demo_with_a_model_reconstructs_the_sample_radiograph(tmp_path, capsys):
    from XctDiffCore.commands.demo import run_demo
    from XctDiffCore.io import read_ct, read_radiograph
    from XctDiffCore.model_folder import create_random_model

    model = create_random_model(tmp_path / "model", "tiny")
    paths = run_demo(tmp_path / "demo", model=model)
    ct = read_ct(paths["ct"])
    assert ct.shape == (128, 128, 128) and np.allclose(ct.spacing, 2.5)
    assert read_radiograph(paths["views"]).image.shape[1] > 3 * 128
    assert "wrote the reconstruction" in capsys.readouterr().out
