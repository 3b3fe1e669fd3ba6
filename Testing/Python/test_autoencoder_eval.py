"""The autoencoder fidelity report (XctDiffCore/evaluation/autoencoder.py): its bounds, its tables and figure, its errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import check_refused_while_held, synthetic_chest

from XctDiffCore.evaluation.autoencoder import evaluate_autoencoder, pool_and_resample
from XctDiffCore.commands.cli import main
from XctDiffCore.metrics import volume_scores
from XctDiffCore.model_folder import create_random_model


def test_the_resample_bound_is_perfect_at_full_size_and_loses_detail_when_coarser():
    ct = synthetic_chest((32, 32, 32), seed=1)
    np.testing.assert_allclose(pool_and_resample(ct, 32), ct, atol=1e-3)
    fine, coarse = (volume_scores(pool_and_resample(ct, s), ct)["psnr"] for s in (16, 8))
    assert fine > coarse


@pytest.fixture(autouse=True)
def no_lpips(tmp_path, monkeypatch):
    """As in CI: no LPIPS weights in the cache (the column stays empty), which keeps these tests fast."""
    monkeypatch.setenv("XCTDIFF_CACHE", str(tmp_path / "empty_cache"))


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory):
    from XctDiffCore.io import write_volume
    from XctDiffCore.volume import Volume

    folder = tmp_path_factory.mktemp("cts")
    for seed in (0, 1):
        ct = np.rint(synthetic_chest((48, 48, 48), seed=seed)).astype(np.int16)
        write_volume(Volume(ct, spacing=(2.5, 2.5, 2.5)), folder / f"patient{seed}.nrrd")
    return folder


def test_report_of_a_random_model_on_a_ct_folder(tmp_path, ct_folder, capsys):
    model = create_random_model(tmp_path / "model", "tiny", seed=0)
    out = tmp_path / "eval" / "report"  # the folder above is made too (it was `error: output folder does not exist`)
    assert main(["evaluate-autoencoder", "--model", str(model), "--data", str(ct_folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| autoencoder |" in printed and "resample 8^3" in printed and "resample 64^3" in printed
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert {r["case"] for r in rows} == {"patient0", "patient1"}
    assert {r["method"] for r in rows} == {"autoencoder", "resample 8^3", "resample 64^3"}
    ae = summary["summary"]["autoencoder"]
    assert 0.0 < ae["codebook_use"]["mean"] <= 1.0 and ae["perplexity"]["mean"] >= 1.0
    # A random autoencoder is far below the 64^3 bound, which no learning is needed for.
    assert ae["psnr"]["mean"] < summary["summary"]["resample 64^3"]["psnr"]["mean"]
    text = (out / "summary.md").read_text()
    assert "| patient0 | autoencoder |" in text and "bone Dice" in text and "lung Dice" in text
    assert (out / "figure.png").stat().st_size > 0 and (out / "metrics.csv").is_file()


def test_the_report_says_what_made_it_and_which_cases_are_no_whole_chest(tmp_path, ct_folder, capsys):
    """The report said neither when nor by which command it was made, and scored a 120 mm slab like a whole chest
    without a word (the two CTs of ``ct_folder`` are 48 slices of 2.5 mm)."""
    import re
    import shlex

    model = create_random_model(tmp_path / "model", "tiny", seed=0)
    out = tmp_path / "report"
    assert main(["evaluate-autoencoder", "--model", str(model), "--data", str(ct_folder), "--out", str(out),
                 "--max-cases", "1"]) == 0
    assert ("1 of the 1 cases is no whole chest (patient0: its body spans only 120 mm head to foot (a whole chest: "
            "200 or more)") in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["not_whole_chest"]) == ["patient0"] and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", summary["date"])
    assert shlex.split(summary["command"]) == ["xctdiff", "evaluate-autoencoder", "--model", str(model.resolve()), "--data",
                                               str(ct_folder.resolve()), "--out", str(out), "--max-cases", "1"]
    text = (out / "summary.md").read_text()
    assert f"Made on {summary['date']}" in text and f"\n    {summary['command']}\n" in text
    assert "**Not whole chests:** patient0" in text
    assert "not a whole chest: its body spans only 120 mm" in (out / "metrics.csv").read_text()


def test_report_errors_are_one_line(tmp_path, ct_folder, capsys):
    assert main(["evaluate-autoencoder", "--run", str(tmp_path / "none"), "--data", str(ct_folder),
                 "--out", str(tmp_path / "o" / "p")]) == 2
    assert "error: no autoencoder checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # the folders a refused run made are taken back
    (tmp_path / "file").write_text("x")
    model = create_random_model(tmp_path / "model", "tiny", seed=0)
    assert main(["evaluate-autoencoder", "--model", str(model), "--data", str(ct_folder), "--out", str(tmp_path / "file")]) == 2
    assert "names a file" in capsys.readouterr().err


def test_a_report_folder_being_written_is_refused_to_a_second_run(tmp_path, ct_folder, capsys):
    """Two reports into one --out wrote the same four files in turns: the second is refused in one line before it
    loads the model, the folder (here an earlier report) left as it was; once the first has ended, it runs."""
    model = create_random_model(tmp_path / "model", "tiny", seed=0)
    out = tmp_path / "report"
    argv = ["evaluate-autoencoder", "--model", str(model), "--data", str(ct_folder), "--out", str(out), "--max-cases", "1"]
    out.mkdir()
    (out / "summary.md").write_text("an earlier report\n")
    check_refused_while_held(argv, out, "xctdiff evaluate-autoencoder", capsys)
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["figure.png", "metrics.csv", "summary.json", "summary.md"]


def test_the_report_names_the_model_device_and_precision_and_marks_training_fit(tmp_path, ct_folder, capsys):
    """The report named the model by its path alone, said neither the device nor the precision, and scored the
    model's own training patients as unseen ones without a word (the bundled model was trained on every shared CT):
    now the manifest's id and version, cpu, fp32, and `xctdiff evaluate`'s training-fit mark."""
    model = create_random_model(tmp_path / "model", "tiny", seed=0)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["training"] = {"training_patients": ["patient0", "someone_else"]}
    (model / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "report"
    assert main(["evaluate-autoencoder", "--model", str(model), "--data", str(ct_folder), "--out", str(out),
                 "--max-cases", "1"]) == 0
    err = capsys.readouterr().err
    assert "1 of the 1 cases is a patient the model was trained on (patient0)" in err
    assert "patient0: scoring resample 64^3" in err  # the bar names the row being scored, as evaluate's does
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training_fit"] == ["patient0"] and summary["device"] == "cpu" and summary["precision"] == "fp32"
    assert summary["source"] == f"{manifest['id']} {manifest['version']} ({model.resolve()})"
    text = (out / "summary.md").read_text()
    assert f"Autoencoder of `{summary['source']}` in fp32" in text and "by XctDiff " in text and " on cpu, by " in text
    assert "**Training fit:** 1 of the 1 cases (patient0)" in text
    assert "training fit" in (out / "metrics.csv").read_text()


def test_an_output_folder_that_holds_the_model_or_the_datalist_is_refused(tmp_path, capsys):
    """`--out MODEL` wrote metrics.csv, summary.md/json and figure.png into the model folder, `--out DS` beside the
    datalist: each is refused in one line before any work, and nothing is written."""
    model = create_random_model(tmp_path / "model", "tiny", seed=0)
    before = sorted(p.name for p in model.iterdir())
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "datalist.json").write_text("{}")
    for out, data in ((model, tmp_path / "ds" / "datalist.json"), (tmp_path / "ds", tmp_path / "ds" / "datalist.json"),
                      (tmp_path, tmp_path / "ds" / "datalist.json")):
        assert main(["evaluate-autoencoder", "--model", str(model), "--data", str(data), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"is in the output folder {out}" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in model.iterdir()) == before
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["datalist.json"]


def test_the_help_says_what_it_prints_and_in_what_units(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate-autoencoder", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("Prints the mean ± std over cases per method", "PSNR in dB", "SSIM (0-1)", "bone Dice (HU > 200)",
                  "perplexity", "model and version, device, precision, date, command", "training fit"):
        assert words in text


def test_a_partial_model_folder_with_only_the_autoencoder_is_scored_with_its_training_list(tmp_path, ct_folder, capsys):
    """`export --stages autoencoder` writes a manifest with the autoencoder alone: reading its training list asked
    for all three stages ('manifest.json lacks the encoder, diffusion stage(s)')."""
    model = create_random_model(tmp_path / "model", "tiny", seed=0)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["stages"] = {"autoencoder": manifest["stages"]["autoencoder"]}
    manifest["training"] = {"training_patients": ["patient0"]}
    (model / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "report"
    assert main(["evaluate-autoencoder", "--model", str(model), "--data", str(ct_folder), "--out", str(out),
                 "--max-cases", "1"]) == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["training_fit"] == ["patient0"]


def test_the_figure_labels_fit_their_panels_and_the_caption_names_each_case():
    """The truth panels' labels ('lidc_idri_0001 coronal bone', 27 characters) ran into the next panel's
    ('...bonedecoded coronal bone'), and nothing said which windows were used: now each label fits its panel and a
    caption names the windows, each case in full with its notes, and the model."""
    from XctDiffCore.evaluation.autoencoder import figure_caption, figure_rows
    from XctDiffCore.evaluation.reconstructions import Case
    from XctDiffCore.figures import PANEL_SIZE, label_font

    ct = synthetic_chest((32, 32, 32), seed=0)
    figure = [(Case("cptac_lscc_c3n_00247_aug0", None, ct), ct), (Case("lidc_idri_0001_aug0", None, ct), ct)]
    font = label_font()
    labels = [label for row in figure_rows(figure) for label, _ in row]
    assert len(labels) == 16 and all(font.getlength(label) <= PANEL_SIZE for label in labels), labels
    caption = " ".join(figure_caption(figure, "xctdiff-cpu 0.8.0", {"lidc_idri_0001_aug0": ["training fit"]}))
    assert "cptac_lscc_c3n_00247_aug0, lidc_idri_0001_aug0 (training fit)" in caption
    assert "bone window (W 1800 / L 450)" in caption and "lung window (W 1500 / L -600)" in caption
    assert "xctdiff-cpu 0.8.0" in caption


def test_a_run_given_as_a_model_and_a_model_given_as_a_run_are_named(tmp_path, capsys):
    """`--model RUN` said 'not a model folder (no manifest.json)', `--run MODEL` 'no autoencoder checkpoint in MODEL':
    neither said that the other option was the one meant."""
    run, model = tmp_path / "run", create_random_model(tmp_path / "model", "tiny", seed=0)
    (run / "autoencoder").mkdir(parents=True)
    (run / "autoencoder" / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "cts").mkdir()
    for option, given, other in (("--model", run, "--run"), ("--run", model, "--model")):
        assert main(["evaluate-autoencoder", option, str(given), "--data", str(tmp_path / "cts"), "--out",
                     str(tmp_path / "out")]) == 2
        kind = "a training run, not a model folder" if option == "--model" else "a model folder, not a training run"
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {given} is {kind}: give {other} {given}"]
    assert not (tmp_path / "out").exists()


def test_a_runs_training_patients_are_read_from_its_datalist(tmp_path):
    """--run marks the cases of its training datalist as training fit; a datalist since moved or broken marks none."""
    from XctDiffCore.evaluation.autoencoder import run_training_patients

    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "a.npz", "xray": "a.npy", "patient": "p0"},
                                                 {"image": "b_aug1.npz", "xray": "b.npy", "patient": "p1"}],
                                    "validation": [{"image": "c.npz", "xray": "c.npy", "patient": "p2"}]}))
    assert run_training_patients(str(datalist)) == {"p0", "p1"}
    assert run_training_patients(str(tmp_path / "moved.json")) is None and run_training_patients("") is None
    datalist.write_text("{not json")
    assert run_training_patients(str(datalist)) is None


def a_run_trained_from(project, run="runs/r", datalist="ds/datalist.json", ema_decay=0.0):
    """A run folder as `xctdiff train autoencoder --data DATALIST --out RUN` run in ``project`` records it: its
    checkpoint's config keeps both paths as typed (relative), and the datalist's SHA-256 (a random tiny VQ-GAN)."""
    import dataclasses

    from XctDiffCore.atomic import file_sha256
    from XctDiffCore.config import config_to_dict, load_config
    from XctDiffCore.models.vqgan import VQGAN
    from XctDiffCore.training.common import save_checkpoint

    config = load_config("tiny")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, datalist=datalist),
                                 run=dataclasses.replace(config.run, dir=run))
    vqgan = VQGAN(**dataclasses.asdict(config.autoencoder.model))
    save_checkpoint(project / run / "autoencoder" / "checkpoint.pt",
                    {"stage": "autoencoder", "step": 1, "config": config_to_dict(config),
                     "datalist_sha256": file_sha256(project / datalist), "models": {"vqgan": vqgan.state_dict()}})
    return project / run


def test_a_runs_relative_datalist_is_read_from_the_folder_training_ran_in(tmp_path, monkeypatch):
    """`xctdiff train ... --data ds/datalist.json --out runs/r` in a project folder, then `evaluate-autoencoder --run
    ../project/runs/r` from elsewhere: the datalist was looked for from there, not found, and the run's own training
    patients were scored as unseen without a word. Now it is found where training read it (the folder whose
    runs/r the run is); one moved away (or changed since) is said in one warning, and no case is marked."""
    import warnings

    from XctDiffCore.evaluation.autoencoder import load_vqgan

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "ds").mkdir(parents=True)
    elsewhere.mkdir()
    (project / "ds" / "datalist.json").write_text(json.dumps(
        {"training": [{"image": "a.npz", "xray": "a.npy", "patient": "p0"}],
         "validation": [{"image": "c.npz", "xray": "c.npy", "patient": "p2"}]}))
    run = a_run_trained_from(project)
    monkeypatch.chdir(elsewhere)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_vqgan(run="../project/runs/r")[3] == {"p0"}
    monkeypatch.chdir(project)  # where training ran: as before
    assert load_vqgan(run="runs/r")[3] == {"p0"}
    monkeypatch.chdir(elsewhere)
    (elsewhere / "ds").mkdir()  # a datalist of the same relative name here is another data set's
    (elsewhere / "ds" / "datalist.json").write_text(json.dumps({"training": [{"image": "x.npz", "xray": "x.npy",
                                                                              "patient": "other"}], "validation": []}))
    assert load_vqgan(run=str(run))[3] == {"p0"}
    (project / "ds" / "datalist.json").rename(project / "ds" / "moved.json")
    with pytest.warns(UserWarning) as caught:
        assert load_vqgan(run=str(run))[3] is None
    (line,) = [str(w.message) for w in caught]
    assert "ds/datalist.json" in line and str(project / "ds" / "datalist.json") in line and "training fit" in line
    (project / "ds" / "moved.json").write_text(json.dumps({"training": [], "validation": []}))
    (project / "ds" / "moved.json").rename(project / "ds" / "datalist.json")  # back, but another split since
    with pytest.warns(UserWarning, match="datalist.json has changed since"):
        assert load_vqgan(run=str(run))[3] is None
