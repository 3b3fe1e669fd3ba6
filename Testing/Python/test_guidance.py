"""Data-consistency guidance (XctDiffCore/guidance.py, issue 19): the guided CT's DRR moves towards the
film, corrections go only where there is matter, the strength is the fraction applied, and the
pipeline, the command line and the Slicer options carry it, with the unguided score beside it."""
from __future__ import annotations

import dataclasses
import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import SAMPLE_RADIOGRAPH, synthetic_chest
from test_pipeline import film, model_dir, pipe  # noqa: F401 (the tiny random model and the sample film)

from XctDiffCore import pipeline as pipeline_module
from XctDiffCore.commands.cli import main
from XctDiffCore.diffusion import Cancelled
from XctDiffCore.drr import ConeGeometry
from XctDiffCore.errors import XctDiffError
from XctDiffCore.guidance import STEP_HU, GuidanceWarning, correction_weight, film_drr, guide_to_film
from XctDiffCore.io import read_radiograph
from XctDiffCore.layout import ct_to_model_layout
from XctDiffCore.metrics import ssim_2d
from XctDiffCore.options import check_guidance

GEOMETRY = ConeGeometry()
SPACING = (10.0, 10.0, 10.0)  # 32^3 voxels of 10 mm: the 320 mm cube of the model grid, cheap to render
SIZE = 32


def _volume(seed: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(ct_to_model_layout(synthetic_chest((SIZE,) * 3, seed=seed))))[None, None].float()


def _drr(volume: torch.Tensor) -> torch.Tensor:
    return film_drr(volume, GEOMETRY, SIZE, SIZE, SPACING)


def _consistency(volume: torch.Tensor, film: torch.Tensor) -> float:
    return ssim_2d(_drr(volume)[0, 0].numpy(), film[0, 0].numpy())


@pytest.fixture(scope="module")
def case():
    """A chest whose film we know, and a blurred first guess of it (as a decoder blurs: bone smeared away)."""
    truth = _volume(0)
    guess = torch.nn.functional.avg_pool3d(truth, 5, stride=1, padding=2, count_include_pad=False)
    return truth, guess, _drr(truth)


def guide(guess, film, strength=1.0, **kwargs):
    return guide_to_film(guess, film, GEOMETRY, strength, render_size=SIZE, spacing_mm=SPACING, **kwargs)


def test_guidance_moves_the_drr_towards_the_film_and_only_where_there_is_matter(case):
    truth, guess, film = case
    guided = guide(guess, film)
    before, after = _consistency(guess, film), _consistency(guided, film)
    assert after > before + 0.05, (before, after)
    error = lambda v: float((_drr(v) - film).square().mean())  # noqa: E731
    assert error(guided) < 0.5 * error(guess)
    air = guess <= -1000  # no matter: the weight is 0, so guidance cannot paint streaks through the air
    assert air.any() and torch.equal(guided[air], guess[air].clamp(-1024, 3071))
    assert guided.shape == guess.shape and guided.dtype == torch.float32


def test_the_correction_weight_follows_the_decoded_density_to_its_power():
    hu = torch.tensor([-1024.0, -1000.0, -500.0, 0.0, 1000.0, 2000.0])
    torch.testing.assert_close(correction_weight(hu), STEP_HU * torch.tensor([0.0, 0.0, 0.5, 1.0, 2.0, 2.0]))
    torch.testing.assert_close(correction_weight(hu, 2.0), STEP_HU * torch.tensor([0.0, 0.0, 0.25, 1.0, 4.0, 4.0]))
    torch.testing.assert_close(correction_weight(hu, 0.0), torch.full_like(hu, STEP_HU))  # air too: power 0 is uniform


def test_strength_is_the_fraction_of_the_correction_applied(case):
    _, guess, film = case
    full, half, off = guide(guess, film, 1.0), guide(guess, film, 0.5), guide(guess, film, 0.0)
    assert torch.equal(off, guess)
    inside = (full > -1024) & (full < 3071) & (guess > -1000)  # where the clip did not act
    torch.testing.assert_close((half - guess)[inside], 0.5 * (full - guess)[inside], atol=1e-3, rtol=1e-4)


def test_guidance_runs_under_inference_mode_after_a_cached_render(case):
    """The cone rays are cached: one made under inference_mode must not break a later differentiable render."""
    _, guess, film = case
    torch.testing.assert_close(guide(guess, film), guide(guess, film))  # deterministic
    from XctDiffCore.drr import _cone_rays

    _cone_rays.cache_clear()
    with torch.inference_mode():
        _drr(guess)  # fills the ray cache inside inference mode
        guided = guide(guess, film)
    assert _consistency(guided, film) > _consistency(guess, film)


def test_cancel_stops_the_guidance(case):
    _, guess, film = case
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        guide(guess, film, cancel=cancel)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "strong", None])
def test_strength_out_of_range_is_a_readable_error(bad):
    with pytest.raises(XctDiffError, match="guidance must be"):
        check_guidance(bad)
    assert check_guidance("0.25") == 0.25


# ----------------------------------------------------------------------------- pipeline, CLI, Slicer


def test_the_pipeline_guides_and_keeps_the_unguided_score(pipe, film, monkeypatch):
    monkeypatch.setattr(pipeline_module, "MIN_UNGUIDED_CONSISTENCY", 0.0)  # random weights: a poor first guess
    plain = pipe.reconstruct(film, method="direct", device="cpu", style="off")
    guided = pipe.reconstruct(film, method="direct", device="cpu", style="off", guidance=1.0)
    assert plain.guidance == 0.0 and plain.unguided_consistency is None and "guidance" not in plain.timings
    assert guided.guidance == 1.0 and guided.timings["guidance"] > 0
    assert guided.unguided_consistency == pytest.approx(plain.consistency, abs=0.01)
    assert guided.consistency > plain.consistency
    assert not np.array_equal(guided.ct.array, plain.ct.array)
    assert guided.summary()["unguided_consistency"] == round(guided.unguided_consistency, 4)


def test_guidance_is_skipped_with_a_warning_when_the_film_disagrees_grossly(pipe, film, monkeypatch):
    monkeypatch.setattr(pipeline_module, "MIN_UNGUIDED_CONSISTENCY", 1.01)  # nothing can pass
    plain = pipe.reconstruct(film, method="direct", device="cpu", style="off")
    with pytest.warns(GuidanceWarning, match="guidance skipped"):
        skipped = pipe.reconstruct(film, method="direct", device="cpu", style="off", guidance=1.0)
    assert skipped.guidance == 0.0 and skipped.unguided_consistency is not None
    np.testing.assert_array_equal(skipped.ct.array, plain.ct.array)


def test_a_sample_skipped_by_the_guard_is_reported_with_its_share(pipe, film, monkeypatch):
    """Samples are guarded one by one; the result says how many were skipped, and its strength is the
    share the mean CT received (one of two samples guided at 1: 0.5), not the strength asked for."""
    from XctDiffCore import metrics

    real = metrics.ssim_2d
    before = iter([0.9, 0.1])  # the two samples' consistency before guidance; then the real score
    monkeypatch.setattr(metrics, "ssim_2d", lambda a, b: next(before, None) or real(a, b))
    with pytest.warns(GuidanceWarning, match="guidance skipped on 1 of 2 samples"):
        result = pipe.reconstruct(film, steps=2, samples=2, seed=0, device="cpu", style="off", guidance=1.0)
    assert result.guidance == 0.5 and result.unguided_consistency == pytest.approx(0.5)
    assert any("1 of 2 samples" in note for note in result.warnings)


def test_bad_guidance_on_the_command_line_is_one_error_line_before_the_model_loads(tmp_path, capsys):
    status = main(["reconstruct", str(SAMPLE_RADIOGRAPH), "-o", str(tmp_path / "ct.nrrd"), "--model",
                   str(tmp_path / "no-model"), "--guidance", "1.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("error: guidance must be between 0 (off) and 1")
    assert list(tmp_path.iterdir()) == []


def test_the_summary_line_shows_the_score_before_guidance():
    from types import SimpleNamespace

    from XctDiffCore.commands.reconstruct_job import summary_line

    result = SimpleNamespace(method="direct", seed=0, device="cpu", consistency=0.94, guidance=1.0, unguided_consistency=0.85,
                             ap_diameter=None, learnt_ap_diameter=None)
    assert "consistency 0.940 (guided 1; 0.850 unguided)" in summary_line("a.png", "a.nrrd", 1.0, result)
    result.guidance = 0.0
    assert "consistency 0.940 (guidance skipped)" in summary_line("a.png", "a.nrrd", 1.0, result)
    result.unguided_consistency = None
    assert "guid" not in summary_line("a.png", "a.nrrd", 1.0, result)


def test_slicer_options_pass_guidance_to_the_engine_and_show_both_scores():
    from XctDiffSlicerLib.logic import ReconstructionOptions, ReconstructionOutput, consistency_text

    assert "--guidance" not in ReconstructionOptions().engine_arguments()
    args = ReconstructionOptions(guidance=0.5).engine_arguments()
    assert args[args.index("--guidance") + 1] == "0.5"
    with pytest.raises(XctDiffError, match="guidance must be between 0"):
        ReconstructionOptions(guidance=2.0)
    output = ReconstructionOutput(None, None, 0.94, "cpu", {}, unguided_consistency=0.85)
    assert consistency_text(output) == "0.940 (0.850 before guidance)"


# ----------------------------------------------------------------------------- plausibility (runs first)


def test_the_plausibility_check_flags_negatives_and_photographs_but_not_chest_films():
    """(Laterals, and the sample CT's lateral DRR, which has a bright middle: the frontal-view check's test below.)"""
    from skimage import data

    from XctDiffCore.drr import drr_of_volume
    from XctDiffCore.io import read_ct
    from XctDiffCore.plausibility import film_problems
    from XctDiffCore.preprocess import preprocess_ct, preprocess_radiograph
    from conftest import SAMPLE_CT

    real = preprocess_radiograph(read_radiograph(SAMPLE_RADIOGRAPH).image, 128)
    ct = preprocess_ct(read_ct(SAMPLE_CT))
    drr = drr_of_volume(ct)
    assert film_problems(real) == [] and film_problems(drr) == []
    for name, image in {"negative": 1.0 - real, "negative DRR": 1.0 - drr,
                        "photograph": data.camera().astype(np.float32) / 255.0}.items():
        problems = film_problems(preprocess_radiograph(image, 128))
        assert len(problems) == 1 and "does not look like a frontal chest radiograph" in problems[0], name


def test_the_frontal_view_check_flags_a_lateral_view_and_a_ct_slice_and_turn_auto_leaves_them():
    """The sample CT's lateral DRR has a bright middle too: it passed every check, and an axial CT slice saved as a
    picture passed them a third of the time (the lungs either side of a bright middle); a lateral called "on its
    side" was turned by --turn auto and then passed. The frontal-view check (Testing/Scripts/view_weights.py, its
    figures in plausibility.py) names them, whichever side a lateral is seen from, and no turn is applied."""
    import json

    import torch

    from XctDiffCore.drr import ConeGeometry, drr_of_volume, normalize_drr, render_drr
    from XctDiffCore.io import read_ct
    from XctDiffCore.layout import ct_to_model_layout
    from XctDiffCore.plausibility import VIEW_FILE, film_problems, frontal_score, head_up_turn
    from XctDiffCore.preprocess import preprocess_ct, preprocess_radiograph
    from conftest import SAMPLE_CT

    assert "Kermany" in json.loads(VIEW_FILE.read_text())["fitted_on"]
    ct = preprocess_ct(read_ct(SAMPLE_CT))
    real = preprocess_radiograph(read_radiograph(SAMPLE_RADIOGRAPH).image, 128)
    assert frontal_score(real) > 0 and frontal_score(drr_of_volume(ct)) > 0
    volume = torch.from_numpy(np.ascontiguousarray(ct_to_model_layout(ct.array.astype(np.float32))))[None, None]
    side = normalize_drr(render_drr(volume.transpose(2, 4).contiguous(), ConeGeometry(), 128))[0, 0].numpy()
    hu = ct.array.astype(np.float32)
    level = int(np.argmax(((hu > -950) & (hu < -400)).mean(axis=(1, 2))))  # the axial slice with the most lung
    axial = np.clip((hu[level] + 1000.0) / 1400.0, 0.0, 1.0)
    messages = {}
    for name, image in {"lateral": side, "lateral from the other side": np.fliplr(side), "axial slice": axial}.items():
        image = preprocess_radiograph(image, 128)
        problems = film_problems(image)
        assert len(problems) == 1 and "a lateral view" in problems[0], (name, problems)  # or the contrast check's
        assert head_up_turn(image) == 0, name
        messages[name] = problems[0]
    assert "like a lateral view or a cross-section (a CT slice)" in messages["lateral"]  # it passed every check
    assert "like a lateral view or a cross-section (a CT slice)" in messages["axial slice"]


def test_the_orientation_checks_flag_upside_down_sideways_and_mirrored_films():
    """A film hung upside down, turned half round or a quarter, or mirrored (a flipped scan, a photo of a film from behind) passed
    the contrast check and came out a chest upside down or mirrored, without a word. Both checks are linear in
    what a flip reverses, so a flip negates their score exactly; their weights are fitted on real films
    (Testing/Scripts/orientation_weights.py, the figures in plausibility.py)."""
    import json

    from XctDiffCore.drr import drr_of_volume
    from XctDiffCore.io import read_ct
    from XctDiffCore.plausibility import ORIENTATION_FILE, film_problems, orientation_checks, orientation_scores
    from XctDiffCore.preprocess import preprocess_ct, preprocess_radiograph
    from conftest import SAMPLE_CT

    made = json.loads(ORIENTATION_FILE.read_text())
    assert "Kermany" in made["fitted_on"] and set(orientation_checks()) == {"up_down", "left_right"}
    for weights, threshold in orientation_checks().values():
        assert weights.shape == (32,) and np.all(np.isfinite(weights)) and threshold <= 0.0
    real = preprocess_radiograph(read_radiograph(SAMPLE_RADIOGRAPH).image, 128)
    drr = drr_of_volume(preprocess_ct(read_ct(SAMPLE_CT)))
    for film in (real, drr):
        scores = orientation_scores(film)
        assert scores["up_down"] > 0 and scores["left_right"] > 0 and film_problems(film) == []
        assert orientation_scores(np.flipud(film))["up_down"] == pytest.approx(-scores["up_down"], abs=1e-5)
        assert orientation_scores(np.fliplr(film))["left_right"] == pytest.approx(-scores["left_right"], abs=1e-5)
        for turned in (np.flipud(film), np.rot90(film, 2)):
            problems = film_problems(turned)
            assert len(problems) == 1 and problems[0].startswith("the film looks upside down")
        for k, way in ((1, "clockwise"), (3, "anticlockwise")):  # np.rot90 turns anticlockwise: turn it back
            problems = film_problems(np.rot90(film, k))
            assert len(problems) == 1 and problems[0].startswith("the film looks turned on its side"), problems
            assert f"stand it head up, a quarter turn {way} (--turn {way}, or --turn auto);" in problems[0]
    problems = film_problems(np.fliplr(drr))  # RG1's mirror image passes (score -0.26: the check misses 8 % of films)
    assert len(problems) == 1 and problems[0].startswith("the film may be mirrored left to right")


def test_the_panel_names_its_own_controls_in_the_orientation_warnings():
    """The engine's orientation warnings name the command line's flags (--turn half, --mirror), which a clinician
    in Slicer's panel does not have: the panel's score line names its Turn film and Flip controls instead."""
    from XctDiffCore.drr import drr_of_volume
    from XctDiffCore.io import read_ct
    from XctDiffCore.plausibility import film_problems
    from XctDiffCore.preprocess import preprocess_ct
    from XctDiffSlicerLib.logic import ReconstructionOutput, consistency_text
    from conftest import SAMPLE_CT

    drr = drr_of_volume(preprocess_ct(read_ct(SAMPLE_CT)))
    expected = {"upside": "turn it head up, half round (Turn film: half round, or Auto)",
                "anticlockwise": "a quarter turn anticlockwise (Turn film: a quarter anticlockwise, or Auto)",
                "clockwise": "a quarter turn clockwise (Turn film: a quarter clockwise, or Auto)",
                "mirrored": "a mirrored CT (Flip left to right flips it back)"}
    films = {"upside": np.flipud(drr), "anticlockwise": np.rot90(drr, 3), "clockwise": np.rot90(drr, 1),
             "mirrored": np.fliplr(drr)}
    for case, film in films.items():
        warnings_ = tuple(film_problems(film))
        assert len(warnings_) == 1 and "--" in warnings_[0], (case, warnings_)
        text = consistency_text(ReconstructionOutput(None, None, 0.7, "cpu", {}, warnings=warnings_))
        assert expected[case] in text and "--" not in text, (case, text)


def test_head_up_turn_names_the_turn_that_undoes_a_turn_and_never_a_mirror():
    from XctDiffCore.plausibility import head_up_turn
    from XctDiffCore.preprocess import preprocess_radiograph

    real = preprocess_radiograph(read_radiograph(SAMPLE_RADIOGRAPH).image, 128)
    assert head_up_turn(real) == 0 and head_up_turn(np.fliplr(real)) == 0  # a mirror is dextrocardia's look too
    for k in (1, 2, 3):
        assert head_up_turn(np.rot90(real, k)) == (4 - k) % 4, k
    assert head_up_turn(np.flipud(real)) == 2  # half round: then it is mirrored, which the mirror check says
    assert head_up_turn(1.0 - real) == 0  # a negative is the contrast check's, not a turn's


def test_turn_and_mirror_stand_the_film_head_up_before_anything_sees_it(pipe, film):
    """--turn auto gives a film on its side or upside down the CT of the film the right way round, exactly, with a
    note; an explicit turn is what the user asked (a turn of an upright film is then flagged upside down);
    --mirror flips first. The pixel spacing turns with the film."""
    from XctDiffCore.io import Radiograph
    from XctDiffCore.plausibility import PlausibilityWarning
    from XctDiffCore.preprocess import turn_film

    oblong = Radiograph(film.image, (0.2, 0.3), False, "oblong")
    assert turn_film(oblong, 1).spacing == (0.3, 0.2) and turn_film(oblong, 2).spacing == (0.2, 0.3)
    np.testing.assert_array_equal(turn_film(turn_film(film, 1, mirror=True), 1, mirror=True).image, film.image)
    upright = pipe.reconstruct(film, method="direct", device="cpu")
    assert upright.turn == "none" and not upright.mirrored and upright.summary()["turn"] == "none"
    for k, way in ((1, "clockwise"), (2, "half"), (3, "anticlockwise")):
        with pytest.warns(PlausibilityWarning, match="before reconstructing \\(turn auto\\)"):
            result = pipe.reconstruct(turn_film(film, k), method="direct", device="cpu", turn="auto", strict=True)
        np.testing.assert_array_equal(result.ct.array, upright.ct.array)
        assert result.turn == way and result.summary()["turn"] == way and len(result.warnings) == 1
    with pytest.warns(PlausibilityWarning, match="upside down"):
        result = pipe.reconstruct(film, method="direct", device="cpu", turn="half")
    assert result.turn == "half" and not any("before reconstructing" in w for w in result.warnings)
    assert pipe.reconstruct(film, method="direct", device="cpu", turn="auto").warnings == []  # upright: left alone
    lateral = dataclasses.replace(turn_film(film, 1), header={"ViewPosition": "LL"})  # no chest on its side
    with pytest.warns(PlausibilityWarning) as caught:
        result = pipe.reconstruct(lateral, method="direct", device="cpu", turn="auto")
    assert result.turn == "none" and not any("before reconstructing" in w for w in result.warnings)
    assert any("lateral view" in str(w.message) for w in caught) and any("on its side" in w for w in result.warnings)
    mirrored = Radiograph(np.ascontiguousarray(film.image[:, ::-1]), film.spacing, False, "mirrored")
    result = pipe.reconstruct(mirrored, method="direct", device="cpu", mirror=True)
    np.testing.assert_array_equal(result.ct.array, upright.ct.array)
    assert result.mirrored and result.summary()["mirror"] is True


@pytest.mark.parametrize("bad", [{"turn": "left"}, {"turn": 90}, {"mirror": "yes"}])
def test_a_bad_turn_or_mirror_is_one_readable_error(bad):
    from XctDiffCore.options import ReconstructOptions

    with pytest.raises(XctDiffError, match="turn must be one of none, auto|mirror must be True or False"):
        ReconstructOptions(**bad)


def test_the_turn_reaches_the_command_line_the_slicer_child_and_the_panel_text():
    from types import SimpleNamespace

    from XctDiffCore.commands.reconstruct_job import summary_line
    from XctDiffCore.options import ReconstructOptions
    from XctDiffSlicerLib.logic import ReconstructionOptions, ReconstructionOutput, _result_fields, consistency_text

    options = ReconstructOptions(turn="auto", mirror=True)
    argv = options.to_argv()
    assert argv[argv.index("--turn") + 1] == "auto" and "--mirror" in argv
    assert "--turn" not in ReconstructOptions().to_argv() and "--mirror" not in ReconstructOptions().to_argv()
    child = ReconstructionOptions(turn="clockwise", mirror=True).engine_arguments()
    assert child[child.index("--turn") + 1] == "clockwise" and "--mirror" in child
    with pytest.raises(XctDiffError, match="turn must be one of"):
        ReconstructionOptions(turn="sideways")
    result = SimpleNamespace(method="direct", seed=0, device="cpu", consistency=0.7, unguided_consistency=None,
                             ap_diameter=None, learnt_ap_diameter=None, turn="half", mirrored=True)
    assert summary_line("a.png", "a.nrrd", 1.0, result).endswith(", film mirrored and turned half round")
    fields = _result_fields({"consistency": 0.7, "turn": "clockwise", "mirror": True})
    assert fields["turn"] == "clockwise" and fields["mirrored"] is True
    for odd in ("sideways", ["half"], 3):  # an engine's odd value: none, not a traceback
        assert _result_fields({"consistency": 0.7, "turn": odd})["turn"] == "none"
    output = ReconstructionOutput(None, None, 0.7, "cpu", {}, turn="clockwise")
    assert consistency_text(output) == "0.700\nthe film was turned a quarter clockwise before reconstructing"


def test_an_upside_down_film_warns_and_is_refused_with_strict(pipe, film):
    from XctDiffCore.io import Radiograph
    from XctDiffCore.plausibility import PlausibilityWarning

    upside_down = Radiograph(np.ascontiguousarray(film.image[::-1]), film.spacing, False, "upside down")
    with pytest.warns(PlausibilityWarning, match="upside down"):
        result = pipe.reconstruct(upside_down, method="direct", device="cpu")
    assert any("upside down" in w for w in result.warnings)
    with pytest.raises(XctDiffError, match="upside down.*refused: strict|refused: strict.*upside down"):
        pipe.reconstruct(upside_down, method="direct", device="cpu", strict=True)


def test_an_implausible_film_warns_is_refused_with_strict_and_is_never_guided(pipe, film, monkeypatch):
    from XctDiffCore.io import Radiograph
    from XctDiffCore.plausibility import PlausibilityWarning

    monkeypatch.setattr(pipeline_module, "MIN_UNGUIDED_CONSISTENCY", 0.0)
    negative = Radiograph(film.image.max() - film.image, film.spacing, False, "negative")
    with pytest.warns(PlausibilityWarning, match="may be inverted"):
        with pytest.warns(GuidanceWarning, match="failed the plausibility check"):
            result = pipe.reconstruct(negative, method="direct", device="cpu", guidance=1.0)
    assert result.guidance == 0.0 and len(result.warnings) == 2 and result.summary()["warnings"] == result.warnings
    with pytest.raises(XctDiffError, match="refused: strict"):
        pipe.reconstruct(negative, method="direct", device="cpu", strict=True)


def test_the_dicom_header_flags_lateral_oblique_and_other_body_parts_and_warns_on_raw_images():
    from XctDiffCore.plausibility import processing_problems, view_problems

    frontal = {"ViewPosition": "PA", "BodyPartExamined": "CHEST", "PresentationIntentType": "FOR PRESENTATION"}
    assert view_problems(frontal) == [] and processing_problems(frontal) == [] and view_problems({}) == []
    assert view_problems({"ViewPosition": "AP", "BodyPartExamined": "PORT CHEST"}) == []  # unknown free text passes
    assert "lateral view (View Position LL)" in view_problems({"ViewPosition": "LL"})[0]
    assert "oblique view" in view_problems({"ViewPosition": "RLO"})[0]
    assert "shows the knee" in view_problems({"BodyPartExamined": "KNEE"})[0]
    assert len(view_problems({"ViewPosition": "RL", "BodyPartExamined": "SKULL"})) == 2
    assert "For Processing" in processing_problems({"PresentationIntentType": "FOR PROCESSING"})[0]


def test_a_lateral_dicom_film_is_refused_with_strict_and_a_raw_one_only_warned(pipe, film, monkeypatch):
    from XctDiffCore.io import Radiograph
    from XctDiffCore.plausibility import PlausibilityWarning

    monkeypatch.setattr(pipeline_module, "MIN_UNGUIDED_CONSISTENCY", 0.0)
    lateral = Radiograph(film.image, film.spacing, False, "lateral", header={"ViewPosition": "LL"})
    with pytest.warns(PlausibilityWarning, match="lateral view"):
        with pytest.warns(GuidanceWarning, match="failed the plausibility check"):
            result = pipe.reconstruct(lateral, method="direct", device="cpu", guidance=1.0)
    assert result.guidance == 0.0 and "lateral view" in result.warnings[0]
    with pytest.raises(XctDiffError, match="lateral view.*refused: strict"):
        pipe.reconstruct(lateral, method="direct", device="cpu", strict=True)
    raw = Radiograph(film.image, film.spacing, False, "raw", header={"PresentationIntentType": "FOR PROCESSING"})
    with pytest.warns(PlausibilityWarning, match="For Processing"):
        result = pipe.reconstruct(raw, method="direct", device="cpu", guidance=1.0, strict=True)
    assert result.guidance > 0


def test_size_warnings_come_from_a_childs_age_or_a_small_film_and_nothing_else():
    from XctDiffCore.plausibility import size_problems

    assert size_problems() == [] and size_problems(62.0, (3000, 2500), (0.14, 0.14)) == []
    (child,) = size_problems(5.0)
    assert "5 years old" in child and "adult-sized" in child
    assert "8 months old" in size_problems(8 / 12)[0]
    (small,) = size_problems(None, (1024, 1024), (0.168, 0.168))  # the RSNA sample: resized, original spacing kept
    assert "172 x 172 mm" in small and "resized" in small
    assert len(size_problems(4.0, (1000, 800), (0.2, 0.2))) == 2


def test_a_childs_film_is_reconstructed_with_a_warning_guided_and_never_refused(pipe, film, monkeypatch):
    from XctDiffCore.io import Radiograph
    from XctDiffCore.plausibility import PlausibilityWarning

    monkeypatch.setattr(pipeline_module, "MIN_UNGUIDED_CONSISTENCY", 0.0)
    child = Radiograph(film.image, (0.1, 0.1), False, "child", age_years=4.0)
    with pytest.warns(PlausibilityWarning, match="adult-sized"):
        result = pipe.reconstruct(child, method="direct", device="cpu", guidance=1.0, strict=True)
    assert result.guidance > 0 and len(result.warnings) == 2 and all("adult" in w for w in result.warnings)


def test_a_result_whose_drr_disagrees_with_the_film_is_flagged_unreliable_or_refused_with_strict(pipe, film, monkeypatch):
    from XctDiffCore.plausibility import PlausibilityWarning, consistency_problems

    assert consistency_problems(0.3) == [] and consistency_problems(0.5, 0.5) == []  # no calibrated minimum: no flag
    (reason,) = consistency_problems(0.49, 0.5)
    assert "unreliable" in reason and "0.490 < 0.5" in reason
    (reason,) = consistency_problems(0.4951, 0.5)  # the score as the summary line and the panel print it, not 0.50 < 0.5
    assert "consistency 0.495 < 0.5," in reason
    assert pipe.info.min_consistency is None  # a random model is not calibrated
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlausibilityWarning)
        passed = pipe.reconstruct(film, method="direct", device="cpu", strict=True)
    assert passed.warnings == []
    # the same film, for a model whose real films all scored higher than this one does
    monkeypatch.setattr(pipe, "info", dataclasses.replace(pipe.info, min_consistency=passed.consistency + 0.01))
    with pytest.warns(PlausibilityWarning, match="unreliable"):
        flagged = pipe.reconstruct(film, method="direct", device="cpu")
    assert flagged.consistency == passed.consistency and "unreliable" in flagged.warnings[0]
    with pytest.raises(XctDiffError, match="unreliable.*refused: strict"):
        pipe.reconstruct(film, method="direct", device="cpu", strict=True)


def test_inspect_says_what_the_checks_before_a_reconstruction_would(tmp_path):
    """A folder of films can be checked without reconstructing: `xctdiff inspect FILM` prints `plausibility:`."""
    from PIL import Image

    from XctDiffCore.io import inspect_path

    assert inspect_path(SAMPLE_RADIOGRAPH)["plausibility"] == "passes the checks made before a reconstruction"
    image = read_radiograph(SAMPLE_RADIOGRAPH).image
    grey = np.round(255 * (image - image.min()) / np.ptp(image)).astype(np.uint8)
    Image.fromarray(np.ascontiguousarray(grey[::-1])).save(tmp_path / "upside_down.png")
    assert inspect_path(tmp_path / "upside_down.png")["plausibility"].startswith("the film looks upside down")
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(tmp_path / "blank.png")  # the other facts still print
    facts = inspect_path(tmp_path / "blank.png")
    assert facts["shape"] == "64 x 64 (row, col)" and facts["plausibility"].startswith(
        "refused before a reconstruction: the radiograph is blank")


def test_inspect_checks_a_film_without_importing_torch(monkeypatch):
    """Its resize in NumPy where torch is not loaded (importing torch is 1.4 s of a 0.7 s command), to the same
    image as torch's products give the pipeline."""
    import subprocess
    import sys

    from conftest import REPO
    from XctDiffCore.preprocess import preprocess_radiograph

    image = read_radiograph(SAMPLE_RADIOGRAPH).image
    with_torch = preprocess_radiograph(image, 128)
    monkeypatch.delitem(sys.modules, "torch")
    np.testing.assert_allclose(preprocess_radiograph(image, 128), with_torch, atol=1e-5)
    code = ("import sys; from XctDiffCore.io import inspect_path; "
            f"facts = inspect_path({str(SAMPLE_RADIOGRAPH)!r}); assert 'torch' not in sys.modules, 'torch imported'; "
            "print(facts['plausibility'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "passes the checks made before a reconstruction", done.stderr
