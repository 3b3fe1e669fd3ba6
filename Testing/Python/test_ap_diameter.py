"""The chest's AP diameter given by the user (XctDiffCore/ap_diameter.py): measured like a caliper on a
synthetic chest, the table left out, stretched to a diameter, and carried from every front door (API,
command line, Slicer logic) to the result and its reports."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import SAMPLE_RADIOGRAPH

from XctDiffCore.ap_diameter import fit_ap_diameter, measure_ap_diameter, stretch_ap
from XctDiffCore.errors import XctDiffError
from XctDiffCore.options import check_ap_diameter

SPACING = 2.5


def synthetic_chest(ap_mm: float = 220.0, lateral_mm: float = 300.0, table: bool = True, n: int = 128) -> np.ndarray:
    """Canonical [z, y, x] HU: air, an elliptic cylinder of soft tissue with two lungs, a table behind it."""
    centre = (n - 1) / 2
    _, y, x = np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij")
    ct = np.full((n, n, n), -1000.0, np.float32)
    inside = ((y - centre) / (ap_mm / SPACING / 2)) ** 2 + ((x - centre) / (lateral_mm / SPACING / 2)) ** 2 <= 1
    ct[inside] = 40.0
    for side in (-1, 1):  # lungs left and right of the midline, which the measure's columns avoid
        lung = ((y - centre) / (ap_mm / SPACING / 3)) ** 2 + ((x - centre - side * 30) / 18) ** 2 <= 1
        ct[lung & inside] = -850.0
    if table:
        ct[:, int(centre + ap_mm / SPACING / 2) + 4 : int(centre + ap_mm / SPACING / 2) + 8, :] = 200.0
    return ct


@pytest.mark.parametrize("ap_mm", [150.0, 220.0, 280.0])
def test_the_measure_is_the_body_front_to_back_without_the_table(ap_mm):
    diameter, centre = measure_ap_diameter(synthetic_chest(ap_mm), SPACING)
    assert abs(diameter - ap_mm) <= SPACING  # to a voxel
    assert abs(centre - 63.5) <= 1.0
    assert measure_ap_diameter(np.full((64, 64, 64), -1000.0, np.float32), SPACING) is None


@pytest.mark.parametrize("target", [180.0, 260.0])
def test_a_ct_is_stretched_to_the_given_diameter(target):
    chest = synthetic_chest(220.0)
    fitted, before = fit_ap_diameter(chest, target, SPACING)
    assert abs(before - 220.0) <= SPACING
    assert abs(measure_ap_diameter(fitted, SPACING)[0] - target) <= SPACING
    assert fitted.shape == chest.shape and fitted.dtype == chest.dtype
    assert np.allclose(fitted[:, :10, :5], -1000.0)  # air in front of the body stays air
    def lung_depth(ct):  # voxels of lung front to back through a lung's centre, mid-chest
        line = ct[64, :, 64 + 30]
        return ((line < -445.0) & (line > -925.0)).sum()  # partial voxels split at the midpoints

    assert abs(lung_depth(fitted) - lung_depth(chest) * target / 220.0) <= 2  # the lungs stretch along


def test_a_factor_of_one_changes_nothing_and_nothing_to_measure_is_left_alone():
    chest = synthetic_chest()
    assert np.allclose(stretch_ap(chest, 1.0, 63.5), chest)
    air = np.full((32, 32, 32), -1000.0, np.float32)
    same, before = fit_ap_diameter(air, 250.0, SPACING)
    assert same is air and before is None


@pytest.mark.parametrize("value", [50, 400, float("nan"), True, "wide", [250]])
def test_a_diameter_outside_a_chest_is_one_readable_error(value):
    with pytest.raises(XctDiffError, match=r"ap_diameter must be the chest's front-to-back diameter in mm, between 100 and 300"):
        check_ap_diameter(value)
    assert check_ap_diameter(None) is None and check_ap_diameter("250") == 250.0


def test_the_pipeline_stretches_the_model_layout_along_its_depth_axis():
    """Model layout (D=AP, H=rows, W=columns): the stretch goes along D, the other axes stay."""
    from XctDiffCore.layout import ct_to_model_layout
    from XctDiffCore.pipeline import XctDiffPipeline

    chest = synthetic_chest(200.0)
    hu_model = torch.from_numpy(np.ascontiguousarray(ct_to_model_layout(chest)))[None, None]
    diameters = []
    fitted = XctDiffPipeline._fit_ap_diameter(hu_model, 250.0, diameters)
    assert fitted.shape == hu_model.shape and fitted.dtype == hu_model.dtype
    assert abs(diameters[0] - 200.0) <= SPACING
    from XctDiffCore.layout import model_layout_to_ct

    assert abs(measure_ap_diameter(model_layout_to_ct(fitted[0, 0].numpy()), SPACING)[0] - 250.0) <= SPACING


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from XctDiffCore.model_folder import create_random_model
    from XctDiffCore.pipeline import XctDiffPipeline

    return XctDiffPipeline.from_pretrained(create_random_model(tmp_path_factory.mktemp("model") / "tiny", "tiny"))


def test_the_result_reports_the_diameter_given_and_its_own(pipe, monkeypatch):
    from XctDiffCore import ap_diameter
    from XctDiffCore.io import read_radiograph
    from XctDiffCore.pipeline import APDiameterWarning

    film = read_radiograph(SAMPLE_RADIOGRAPH)
    plain = pipe.reconstruct(film, method="direct", device="cpu")
    assert plain.ap_diameter is None and plain.learnt_ap_diameter is None
    assert plain.summary()["ap_diameter_mm"] is None
    monkeypatch.setattr(ap_diameter, "measure_ap_diameter", lambda ct, spacing: (200.0, ct.shape[1] / 2))
    given = pipe.reconstruct(film, method="direct", device="cpu", ap_diameter=250)
    assert given.ap_diameter == 250.0 and given.learnt_ap_diameter == 200.0
    assert given.summary()["learnt_ap_diameter_mm"] == 200.0 and given.warnings == []
    assert not np.array_equal(given.ct.array, plain.ct.array)
    monkeypatch.setattr(ap_diameter, "measure_ap_diameter", lambda ct, spacing: None)  # a volume with no body
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bodiless = pipe.reconstruct(film, method="direct", device="cpu", ap_diameter=250)
    assert np.array_equal(bodiless.ct.array, plain.ct.array) and bodiless.learnt_ap_diameter is None
    assert any("AP diameter was not applied to 1 of 1" in w for w in bodiless.warnings)
    assert any(issubclass(w.category, APDiameterWarning) for w in caught)


def test_the_command_line_refuses_a_bad_diameter_in_one_line(tmp_path, capsys):
    from XctDiffCore.commands.cli import main

    status = main(["reconstruct", str(SAMPLE_RADIOGRAPH), "-o", str(tmp_path / "ct.nrrd"), "--ap-diameter", "40"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("error: ap_diameter must be the chest's front-to-back diameter in mm")
    assert list(tmp_path.iterdir()) == []


def test_the_summary_line_and_the_slicer_panel_show_both_diameters():
    from types import SimpleNamespace

    from XctDiffCore.commands.reconstruct_job import summary_line
    from XctDiffSlicerLib.logic import ReconstructionOptions, ReconstructionOutput, consistency_text

    result = SimpleNamespace(method="direct", seed=0, device="cpu", consistency=0.9, unguided_consistency=None,
                             ap_diameter=250.0, learnt_ap_diameter=231.6)
    assert summary_line("a.png", "a.nrrd", 1.0, result).endswith("direct method (no seed), AP diameter 232 -> 250 mm")
    assert "--ap-diameter" not in ReconstructionOptions().engine_arguments()
    args = ReconstructionOptions(ap_diameter=250.0).engine_arguments()
    assert args[args.index("--ap-diameter") + 1] == "250"
    with pytest.raises(XctDiffError, match="ap_diameter must be"):
        ReconstructionOptions(ap_diameter=20.0)
    output = ReconstructionOutput(None, None, 0.9, "cpu", {}, ap_diameter=250.0, learnt_ap_diameter=231.6)
    assert consistency_text(output) == "0.900\nAP diameter 250 mm as given (the model's own 232 mm)"


def test_inspect_measures_an_earlier_ct_on_the_engines_grid(tmp_path):
    """`xctdiff inspect CT` prints the diameter to give --ap-diameter: a 230 mm chest scanned at 1.25 x 1.25 x 2 mm
    (not the engine's grid: it is prepared first) reads 230 mm to a voxel; a CT with no body says why not."""
    from XctDiffCore.io import inspect_path, write_volume
    from XctDiffCore.volume import Volume

    n, z, pixel = 256, 120, 1.25
    centre = (n - 1) / 2
    y, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    axial = np.full((n, n), -1000.0, np.float32)
    inside = ((y - centre) * pixel / 115.0) ** 2 + ((x - centre) * pixel / 150.0) ** 2 <= 1
    axial[inside] = 40.0
    axial[inside & ((((y - centre) * pixel / 80.0) ** 2 + ((np.abs(x - centre) * pixel - 75.0) / 45.0) ** 2) <= 1)] = -850.0
    chest = Volume(np.repeat(axial[None], z, axis=0).astype(np.int16), (pixel, pixel, 2.0), (-160.0, -160.0, -120.0))
    facts = inspect_path(write_volume(chest, tmp_path / "earlier.nii.gz"))
    diameter = float(facts["ap_diameter"].split(" mm")[0])
    assert abs(diameter - 230.0) <= SPACING, facts["ap_diameter"]
    assert facts["ap_diameter"].endswith("the value for --ap-diameter)")
    # a CT XctDiff reconstructed: its depth is the model's guess, not a value to feed back (it was offered as one)
    facts = inspect_path(write_volume(chest, tmp_path / "made_ct.nrrd", notes={"note": "synthetic CT (test)"}))
    assert facts["ap_diameter"] == (f"{diameter:.0f} mm (the reconstruction's depth, the model's guess: not a value for "
                                    "--ap-diameter, which wants the patient's)") and "synthetic" in facts
    air = Volume(np.full((40, 40, 40), -1000, np.int16), (2.5, 2.5, 2.5))
    assert inspect_path(write_volume(air, tmp_path / "air.nrrd"))["ap_diameter"].startswith("not measured (no body found")
    block = Volume(np.full((20, 20, 20), 40, np.int16), (0.7, 0.7, 5.0))  # 14 mm deep: no chest
    assert inspect_path(write_volume(block, tmp_path / "block.nii.gz"))["ap_diameter"] == (
        "not measured (the AP diameter measures 15 mm, outside a chest's 100-300 mm)")
