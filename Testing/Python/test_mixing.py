"""Inter-patient mixes (`xctdiff prepare --mix`): a chest deformed part of the way to another's shape."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_prepare import SIZE, _write_phantoms

from XctDiffCore.commands.cli import main
from XctDiffCore.drr import drr_of_volume
from XctDiffCore.errors import XctDiffError
from XctDiffCore.evaluation.reconstructions import datalist_training
from XctDiffCore.io import read_ct
from XctDiffCore.mixing import make_mixes
from XctDiffCore.volume import Volume


def _ellipse_chest(width: float, tissue_hu: float, n: int = 64) -> Volume:
    """A body ellipsoid of half-width ``width`` (of the field) with one lung in each half; soft tissue at ``tissue_hu``."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij")
    ct = np.full((n,) * 3, -1024.0, dtype=np.float32)
    ct[(x / width) ** 2 + (y / 0.6) ** 2 + (z / 0.85) ** 2 < 1] = tissue_hu
    for side in (-0.5, 0.5):
        ct[((x - side * width) / (0.35 * width)) ** 2 + (y / 0.4) ** 2 + (z / 0.7) ** 2 < 1] = -850.0
    return Volume(np.rint(ct).astype(np.int16), spacing=(2.5, 2.5, 2.5))


def _body_width(ct: np.ndarray) -> float:
    """The body's mean left-right extent over its axial slices, in voxels."""
    body = ct > -500
    return float(body.any(axis=1).sum(axis=1)[body.any(axis=(1, 2))].mean())


def test_a_mix_is_the_source_tissue_in_a_shape_between_the_two():
    narrow, wide = _ellipse_chest(0.55, 60.0), _ellipse_chest(0.85, 0.0)
    mixes = list(make_mixes({"narrow": narrow, "wide": wide}, per_patient=1, alpha_range=(0.5, 0.5), seed=0))
    assert [(m.source, m.target, m.name) for m in mixes] == [
        ("narrow", "wide", "mix_narrow_to_wide_a50"), ("wide", "narrow", "mix_wide_to_narrow_a50")]
    widths = {name: _body_width(v.array) for name, v in (("narrow", narrow), ("wide", wide))}
    for mix in mixes:
        width = _body_width(mix.volume.array)
        low, high = sorted(widths.values())
        assert low + 0.25 * (high - low) < width < high - 0.25 * (high - low), (mix.name, width, widths)
        assert mix.error_registered < 0.6 * mix.error_before  # the registration found the other shape
        soft = mix.volume.array[(mix.volume.array > -200) & (mix.volume.array < 200)]
        source_hu = 60.0 if mix.source == "narrow" else 0.0
        assert abs(np.median(soft) - source_hu) < 5  # the source's own tissue, not the target's
        assert mix.volume.spacing == (2.5, 2.5, 2.5) and mix.volume.array.dtype == np.int16


def test_a_mix_away_exaggerates_the_source_and_leaves_the_mixes_towards_unchanged():
    narrow, wide = _ellipse_chest(0.55, 60.0), _ellipse_chest(0.85, 0.0)
    cts = {"narrow": narrow, "wide": wide}
    towards = list(make_mixes(cts, per_patient=1, seed=3))
    both = list(make_mixes(cts, per_patient=1, seed=3, away_range=(-0.4, -0.4)))
    assert [m.name for m in both] == [towards[0].name, "mix_narrow_away_from_wide_a40",
                                      towards[1].name, "mix_wide_away_from_narrow_a40"]
    for mix in towards:  # the same draws, the same chests
        twin = next(m for m in both if m.name == mix.name)
        assert twin.alpha == mix.alpha and np.array_equal(twin.volume.array, mix.volume.array)
    narrow_away, wide_away = both[1], both[3]
    assert _body_width(narrow_away.volume.array) < _body_width(narrow.array) - 1  # narrower still
    assert _body_width(wide_away.volume.array) > _body_width(wide.array) + 1  # wider still
    assert narrow_away.alpha == -0.4 and narrow_away.target == "wide"


def test_mixes_refuse_what_cannot_be_mixed():
    chest = _ellipse_chest(0.7, 40.0, n=16)
    with pytest.raises(XctDiffError, match="at least two training patients"):
        list(make_mixes({"a": chest}, per_patient=1))
    with pytest.raises(XctDiffError, match="0 < low <= high < 1"):
        list(make_mixes({"a": chest, "b": chest}, per_patient=1, alpha_range=(0.5, 1.0)))
    with pytest.raises(XctDiffError, match="-1 < low <= high < 0"):
        list(make_mixes({"a": chest, "b": chest}, per_patient=1, away_range=(-0.5, 0.2)))
    other = Volume(chest.array, spacing=(2.5, 2.5, 3.0))
    with pytest.raises(XctDiffError, match="one canonical grid"):
        list(make_mixes({"a": chest, "b": other}, per_patient=1))


def test_prepare_adds_mixes_to_the_training_list_only(tmp_path, capsys):
    paths = _write_phantoms(tmp_path / "in")
    out = tmp_path / "out"
    options = ["--val-fraction", "0.34", "--size", str(SIZE)]
    assert main(["prepare", *map(str, paths), "--out", str(out), *options, "--mix", "1"]) == 0
    assert "training 4 pairs / 2 patients + 2 mixes, validation 1 pair / 1 patient" in capsys.readouterr().out
    datalist = json.loads((out / "datalist.json").read_text())
    mixes = [e for e in datalist["training"] if "mix" in e]
    patients = {e["patient"] for e in datalist["training"] if "mix" not in e}
    assert len(mixes) == 2 and {m["mix"]["source"] for m in mixes} == patients
    assert not [e for e in datalist["validation"] if "mix" in e] and datalist["settings"]["mix"] == 1
    for entry in mixes:  # each pair is consistent: the stored DRR is the stored CT's
        xray = np.load(out / entry["xray"])
        np.testing.assert_allclose(drr_of_volume(read_ct(out / entry["image"]), "cone", SIZE), xray, atol=1e-5)
    assert {t.patient for t in datalist_training(out / "datalist.json")} == patients  # kNN looks up patients only

    away = tmp_path / "away"
    assert main(["prepare", *map(str, paths), "--out", str(away), *options, "--mix", "1", "--mix-away", "-0.5", "-0.2"]) == 0
    assert "+ 4 mixes" in capsys.readouterr().out
    datalist = json.loads((away / "datalist.json").read_text())
    alphas = sorted(e["mix"]["alpha"] for e in datalist["training"] if "mix" in e)
    assert alphas[0] < alphas[1] < 0 < alphas[2] < alphas[3] and datalist["settings"]["mix_away"] == [-0.5, -0.2]

    validation = datalist["validation"][0]["patient"]
    for extra, message in ((["--mix", "-1"], "--mix must be 0 or more"),
                           (["--mix", "1", "--mix-patients", validation], "must be training patients"),
                           (["--mix-patients", sorted(patients)[0]], "give --mix K too"),
                           (["--mix", "1", "--mix-patients", sorted(patients)[0]], "at least two training patients"),
                           (["--mix-away", "-0.5", "-0.2"], "give --mix K too"),
                           (["--mix", "1", "--mix-away", "0.2", "0.5"], "-1 < low <= high < 0")):
        bad = tmp_path / "bad"
        assert main(["prepare", *map(str, paths), "--out", str(bad), *options, *extra]) == 2, extra
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and message in err[0], (extra, err)
        assert not (bad / "datalist.json").exists()


def test_train_on_all_trains_on_the_validation_patients_and_may_mix_them(tmp_path, capsys):
    """How a recipe chosen on a split is retrained on all the data: the validation patients join the training
    list (and may be mixed), and their pairs stay in the validation list for the log."""
    paths = _write_phantoms(tmp_path / "in")
    options = ["--val-fraction", "0.34", "--size", str(SIZE)]
    split_only = tmp_path / "split"
    assert main(["prepare", *map(str, paths), "--out", str(split_only), *options]) == 0
    capsys.readouterr()
    split_list = json.loads((split_only / "datalist.json").read_text())
    validation = split_list["validation"][0]["patient"]
    training = sorted({e["patient"] for e in split_list["training"]})

    out = tmp_path / "all"
    assert main(["prepare", *map(str, paths), "--out", str(out), *options, "--train-on-all",
                 "--mix", "1", "--mix-patients", validation, training[0]]) == 0
    assert ("training 5 pairs / 3 patients + 2 mixes, validation 1 pair / 1 patient (also trained on: training fit)"
            in capsys.readouterr().out)
    datalist = json.loads((out / "datalist.json").read_text())
    assert [e["patient"] for e in datalist["validation"]] == [validation]
    assert validation in {e["patient"] for e in datalist["training"] if "mix" not in e}
    assert {e["mix"]["source"] for e in datalist["training"] if "mix" in e} == {validation, training[0]}
    assert datalist["settings"]["train_on_all"] is True
