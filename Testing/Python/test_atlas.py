"""The registered-atlas baseline (XctDiffCore/evaluation/atlas.py): the registration moves a chest phantom onto
a wider, shifted copy of itself seen only through its DRR; a training CT registered to its own DRR stays nearer
itself than another chest gets; `xctdiff evaluate --atlas K` scores it beside kNN, says in one line that a CT
folder has none to register, and refuses a negative K in one line."""
from __future__ import annotations

import contextlib
import csv
import io
import json

import numpy as np
import pytest
import torch
from test_evaluate import datalist, ct_folder, leaky_datalist, model_dir, no_lpips  # noqa: F401 (fixtures)

from XctDiffCore.commands.cli import main
from XctDiffCore.evaluation.atlas import _film_at, atlas_ct, register_to_film, warp
from XctDiffCore.evaluation.reconstructions import datalist_cases, datalist_training
from XctDiffCore.drr import ConeGeometry
from XctDiffCore.metrics import psnr, window01

EXTENT_MM = 320.0


def phantom(n=64, width=0.8, shift=0.0):
    """A chest in model layout (1, 1, D, H, W), HU: body, two lungs, a spine; ``width`` its half-width along W
    (normalised), ``shift`` moves it along H (normalised)."""
    d, h, w = torch.meshgrid(*[torch.linspace(-1, 1, n)] * 3, indexing="ij")
    h = h - shift
    ct = torch.full((n, n, n), -1024.0)
    body = ((w / width) ** 2 + (d / 0.6) ** 2 < 1) & (h.abs() < 0.8)
    ct[body] = 40.0
    for side in (-0.45, 0.45):
        ct[((w / width - side) / 0.35) ** 2 + (d / 0.4) ** 2 + (h / 0.6) ** 2 < 1] = -850.0
    ct[((w / 0.1) ** 2 + ((d - 0.45) / 0.1) ** 2 < 1) & (h.abs() < 0.8)] = 700.0
    return ct[None, None]


def test_registration_moves_a_chest_onto_what_its_film_shows():
    torch.manual_seed(0)
    geometry = ConeGeometry()
    source, target = phantom(), phantom(width=0.9, shift=0.1)
    film = _film_at(target, geometry, 128, EXTENT_MM)
    before_film = torch.mean((_film_at(source, geometry, 128, EXTENT_MM) - film) ** 2).item()
    theta, displacement, fit = register_to_film(source, film, geometry, EXTENT_MM)
    moved = warp(source, theta, displacement)
    assert fit < before_film / 5  # the film is matched
    error = lambda v: torch.mean((v - target) ** 2).item()  # noqa: E731
    assert error(moved) < error(source) / 2  # and so is the volume: the warp is a real move, not a film trick
    assert float(theta[0, 0, 0]) < 0.97  # x' = 0.9 x: the grid samples the source at a narrower place


def test_a_ct_registered_to_its_own_drr_stays_nearest_itself(leaky_datalist):  # noqa: F811
    training = datalist_training(leaky_datalist)
    case = datalist_cases(leaky_datalist, 128)[0]
    unmoved, neighbours = atlas_ct(case.drr, training, 1, 128, iterations=0)
    assert neighbours == [f"copy-{case.name.removesuffix('_aug0')}"]
    assert np.abs(unmoved - case.truth_hu).max() < 0.5  # the identity warp is exact
    ct, neighbours = atlas_ct(case.drr, training, 1, 128, iterations=20)
    assert neighbours == [f"copy-{case.name.removesuffix('_aug0')}"]
    other, _ = atlas_ct(case.drr, [t for t in training if t.patient != neighbours[0]], 1, 128, iterations=20)
    mine, theirs = (psnr(window01(v), window01(case.truth_hu)) for v in (ct, other))
    assert mine > theirs + 2, (mine, theirs)  # fitting its own film keeps a chest nearer itself than another gets


def test_evaluate_scores_the_atlas_beside_knn(no_lpips, model_dir, datalist, tmp_path):  # noqa: F811
    out = tmp_path / "eval"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["evaluate", "--model", str(model_dir), "--data", str(datalist), "--out", str(out), "--steps", "1",
                     "--device", "cpu", "--max-cases", "1", "--atlas", "1"]) == 0
    assert "| atlas, k=1 training CTs registered to the DRR |" in stdout.getvalue()
    with open(out / "metrics.csv", newline="", encoding="utf-8") as f:
        (row,) = [r for r in csv.DictReader(f) if r["method"] == "atlas"]
    (patient,) = [e["patient"] for e in json.loads(datalist.read_text())["training"]]
    assert row["neighbours"] == patient and 0 < float(row["psnr"]) < 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["atlas"] == 1 and list(summary["summary"]) == ["xctdiff", "direct", "knn", "atlas", "mean_ct"]
    assert "atlas: the 1 of 1 nearest" in (out / "summary.md").read_text(encoding="utf-8")


def test_a_ct_folder_has_no_atlas_and_says_so(no_lpips, model_dir, ct_folder, tmp_path, capsys):  # noqa: F811
    assert main(["evaluate", "--model", str(model_dir), "--data", str(ct_folder), "--out", str(tmp_path / "e"),
                 "--steps", "1", "--device", "cpu", "--max-cases", "1", "--atlas", "2"]) == 0
    err = capsys.readouterr().err
    assert "warning: --atlas registers a datalist's training CTs, and a CT folder has none" in err
    assert "atlas" not in json.loads((tmp_path / "e" / "summary.json").read_text())["summary"]


def test_a_negative_atlas_k_is_one_line(model_dir, datalist, tmp_path, capsys):  # noqa: F811
    assert main(["evaluate", "--model", str(model_dir), "--data", str(datalist), "--out", str(tmp_path / "e"),
                 "--atlas", "-1"]) != 0
    err = capsys.readouterr().err
    assert "--atlas must be 0 (off) or more, got -1" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()
