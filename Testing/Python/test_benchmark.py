"""`xctdiff benchmark pipeline` (XctDiffCore/commands/benchmark.py: benchmark_pipeline) on the tiny config:
one row per stage, the settings of the run, the JSON file; errors as one `error:` line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from XctDiffCore.commands.benchmark import PIPELINE_STAGES, _seconds_at_peak, benchmark_pipeline, format_table
from XctDiffCore.commands.cli import main
from XctDiffCore.errors import XctDiffError
from XctDiffCore.model_folder import create_random_model

STAGE_NAMES = [name for name, _ in PIPELINE_STAGES]


def _table_rows(stdout: str) -> list:
    """The table's rows: the lines below its `benchmark device ...` header (the machine's lines are above it)."""
    lines = stdout.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("benchmark ")) + 1:]


def test_pipeline_benchmark_of_random_tiny_weights():
    results = benchmark_pipeline("cpu", steps=2, samples=2, config="tiny", repeats=2, warmup=0, precision="fp32")
    assert [r.name for r in results] == STAGE_NAMES
    for r in results:
        assert r.device == "cpu" and len(r.seconds) == 2 and min(r.seconds) >= 0.0
    by_name = {r.name: r for r in results}
    for stage in ("load", "preprocess", "encoder", "sampler/step", "decode", "drr", "write", "total"):
        assert by_name[stage].median_s > 0.0, stage
    assert by_name["total"].median_s > by_name["sampler/step"].median_s * 2  # two steps and much more
    settings = by_name["total"].settings
    assert {k: settings[k] for k in ("model", "volume", "steps", "sampler", "samples")} == {
        "model": "random", "volume": "32^3", "steps": 2, "sampler": "ddim", "samples": 2}
    assert settings["peak_rss_mib"] > 0 and "peak_cuda_mib" not in settings
    assert all(r.settings == {} for r in results if r.name != "total")
    settings_line, *table = format_table(results).splitlines()  # one result has settings: a line, not a column
    assert settings_line.startswith("settings: model=random, model_version=")
    assert "volume=32^3, method=diffusion, steps=2" in settings_line
    assert len(table) == 1 + len(STAGE_NAMES) and table[0].split() == ["benchmark", "device", "median", "ms", "min",
                                                                       "ms", "GFLOP", "GFLOP/s", "of", "peak"]
    assert max(map(len, table)) < 100  # the settings made every row over 200 characters wide
    # operations counted per stage (issue 20 item 5): the networks' stages have some, file work none
    # and their share of the machine's matrix-product rate, measured in each precision they ran in
    assert table[0].split()[-4:] == ["GFLOP", "GFLOP/s", "of", "peak"]
    assert settings["peak_gflops"] > 0
    decode = next(line for line in table if line.startswith("decode")).split()
    rate = by_name["decode"].gflop / by_name["decode"].median_s
    assert decode[-1] == f"{by_name['decode'].peak_share:.0%}"
    # the decoder runs in one precision (fp32 here; a bf16 run does a few operations in fp32, which
    # _seconds_at_peak weighs by their own peak): its share is its rate over that peak (printed rounded
    # to 1 GFLOP/s, up to 0.5 GFLOP/s off: a few per cent when a busy machine measures some 20 GFLOP/s)
    rounding = 0.5 / settings["peak_gflops"]
    assert by_name["decode"].peak_share == pytest.approx(rate / settings["peak_gflops"], rel=1e-2 + rounding)
    for stage in ("encoder", "sampler/step", "decode", "total"):
        assert by_name[stage].gflop > 0, stage
    assert by_name["write"].gflop is None and by_name["load"].gflop is None
    stages = sum((r.gflop or 0.0) * (2 if r.name == "sampler/step" else 1) for r in results if r.name != "total")
    assert by_name["total"].gflop == pytest.approx(stages, rel=1e-6)


def test_a_stage_in_two_precisions_is_timed_at_each_ones_peak():
    """A bf16 decode does a few operations in fp32: each part counts at its own precision's peak (GFLOP/s)."""
    peaks = {"bfloat16": 900.0, "float32": 225.0}
    assert _seconds_at_peak({"bfloat16": 1.8e9, "float32": 0.45e9}, peaks, 900.0) == pytest.approx(0.002 + 0.002)
    assert _seconds_at_peak({"float16": 0.9e9}, peaks, 900.0) == pytest.approx(0.001)  # no peak measured: the run's
    assert _seconds_at_peak({}, peaks, 900.0) == 0


@pytest.mark.filterwarnings("ignore:the input does not look like a frontal chest")  # a noise film, on purpose
def test_counting_flops_changes_nothing_and_counts_the_decoder(tmp_path):
    """The counter observes: the same CT with and without it (to 1 HU: under a dispatch mode PyTorch may
    pick other convolution kernels, whose rounding differs); the direct path's decoding stage counts
    exactly what the autoencoder's decoder does, measured here on its own (no second codebook search)."""
    from torch.utils.flop_counter import FlopCounterMode

    from XctDiffCore.pipeline import XctDiffPipeline, counting_flops, extra_flop_formulas

    pipe = XctDiffPipeline.from_pretrained(create_random_model(tmp_path / "model", "tiny"))
    film = torch.rand(64, 64).numpy()
    # fp32 as the decoder alone below: on a CPU with native bf16 "auto" takes bf16, whose decoder runs other operations
    plain = pipe.reconstruct(film, method="direct", device="cpu", seed=0, precision="fp32")
    with counting_flops():
        counted = pipe.reconstruct(film, method="direct", device="cpu", seed=0, precision="fp32")
    assert plain.flops == {} and sum(counted.flops.values()) > 0
    assert np.abs(plain.ct.array.astype(np.int32) - counted.ct.array).max() <= 1
    with torch.inference_mode():
        latent = torch.randn_like(pipe.encoder(torch.zeros(1, 1, pipe.info.xray_size, pipe.info.xray_size)))
    with torch.inference_mode():
        entries = pipe.vqgan.quantizer.lookup(pipe.vqgan.quantize(latent)[2])
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as alone:
        pipe.vqgan.decode(entries)
    assert counted.flops["decoding"] == alone.get_total_flops()


@pytest.mark.filterwarnings("ignore:the input does not look like a frontal chest")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_operations_are_split_by_the_precision_they_ran_in(tmp_path, precision):
    """Under bf16 autocast the networks count as bf16 and the style generator (kept in fp32) as fp32, whose
    peak is lower (the benchmark's share of peak weighs each at its own); in fp32 everything is fp32."""
    from XctDiffCore.pipeline import XctDiffPipeline, counting_flops, extra_flop_formulas

    pipe = XctDiffPipeline.from_pretrained(create_random_model(tmp_path / "model", "tiny"))
    with counting_flops():
        counted = pipe.reconstruct(torch.rand(64, 64).numpy(), method="direct", device="cpu", seed=0,
                                   precision=precision)
    assert counted.flops_by_dtype.keys() == counted.flops.keys()
    for stage, total in counted.flops.items():
        assert sum(counted.flops_by_dtype[stage].values()) == total, stage
    if precision == "fp32":
        assert {d for stage in counted.flops_by_dtype.values() for d in stage} == {"float32"}
    else:
        assert set(counted.flops_by_dtype["style"]) == {"float32"}  # the generator, fp32 on purpose
        # the encoder's networks; the codebook search is a k-d tree outside torch, so no product is counted
        assert set(counted.flops_by_dtype["encoder"]) == {"bfloat16"}
        decoding = counted.flops_by_dtype["decoding"]  # bf16 but for the up-sampler's 3x3x3 -> 2x2x2 kernel folding
        assert decoding["bfloat16"] > 99 * decoding.get("float32", 0)


def test_cli_with_a_model_folder_writes_json(tmp_path, capsys):
    model = create_random_model(tmp_path / "model", "tiny")
    out = tmp_path / "bench.json"
    capsys.readouterr()
    assert main(["benchmark", "pipeline", "--model", str(model), "--steps", "1", "--repeats", "1", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert [line.split()[0] for line in _table_rows(stdout)] == STAGE_NAMES
    records = json.loads(out.read_text())["results"]
    assert [r["name"] for r in records] == STAGE_NAMES
    for r in records:
        assert len(r["seconds"]) == 1 and r["median_s"] == r["min_s"] == r["max_s"] == r["seconds"][0]
    assert records[-1]["settings"]["steps"] == 1 and records[-1]["settings"]["model"] == "random"
    # the README labels a figure with the model's version: the settings said only its name
    version = json.loads((model / "manifest.json").read_text())["version"]
    assert records[-1]["settings"]["model_version"] == version and f"model_version={version}" in stdout


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--config", "tiny", "--model", "somewhere"], "give --model or --config, not both"),
        (["--config", "tiny", "--repeats", "0"], "--repeats must be at least 1"),
        (["--config", "no-such-config"], "unknown config 'no-such-config'"),
    ],
    ids=["model and config", "no repeats", "unknown config"],
)
def test_cli_errors(capsys, argv, words):
    capsys.readouterr()
    assert main(["benchmark", "pipeline", *argv]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.strip().splitlines() == [stderr.strip()] and words in stderr


def test_train_benchmark_times_each_stage_after_its_warmup(tmp_path, capsys, monkeypatch):
    """`xctdiff benchmark train`: one row per stage; the figure is the log's seconds per step after the
    warm-up, so a stage made slower by a known delay per step shows that delay."""
    import time

    import XctDiffCore.training.encoder as encoder_stage

    real_backward = encoder_stage.backward_step
    monkeypatch.setattr(encoder_stage, "backward_step", lambda *a, **k: (time.sleep(0.2), real_backward(*a, **k))[1])
    out = tmp_path / "train.json"
    capsys.readouterr()
    assert main(["benchmark", "train", "--config", "tiny", "--steps", "2", "--stages", "encoder", "diffusion",
                 "--json", str(out)]) == 0
    records = json.loads(out.read_text())["results"]
    assert [r["name"] for r in records] == ["train/encoder", "train/diffusion"]  # the autoencoder: untimed, 1 step
    encoder, diffusion = (r["median_s"] for r in records)
    assert encoder >= 0.2 and 0 < diffusion
    for r in records:
        assert r["settings"]["it_per_s"] == pytest.approx(1 / r["median_s"], rel=1e-2)
        assert r["settings"]["batch"] == 2 and r["settings"]["steps"] == 2
    out_text, err = capsys.readouterr()
    assert "train/encoder" in out_text
    # training's own closing line named a checkpoint in the removed temporary folder and advised what to do with it
    assert "encoder: trained to step 4" in err and "next:" not in err and "xctdiff-bench-train-" not in err, err


def test_table_columns_line_up_whatever_the_names_and_settings():
    """`benchmark train`'s names (train/autoencoder) and long settings ran into the next column: every value
    must end where its header ends."""
    from XctDiffCore.commands.benchmark import BenchmarkResult

    results = [BenchmarkResult("drr", "cpu", {"size": 128}, [0.5]),
               BenchmarkResult("train/autoencoder", "cpu", {"config": "tiny", "note": "x" * 70}, [12.25])]
    header, *rows = format_table(results).splitlines()
    for label in ("median ms", "min ms"):
        end = header.index(label) + len(label)
        for row in rows:
            assert row[end - 1] != " " and (len(row) == end or row[end] == " "), (label, header, row)
    assert [row.split()[0] for row in rows] == ["drr", "train/autoencoder"]


def test_the_train_table_says_its_figure_is_the_mean_step():
    """`benchmark train`'s header said 'median ms' and 'min ms' over a figure that is the mean of the timed steps (one
    figure per stage: its 'min' was the same number)."""
    from XctDiffCore.commands.benchmark import BenchmarkResult

    train = [BenchmarkResult("train/encoder", "cpu", {"config": "tiny"}, [0.25], figure="mean step")]
    header, row = format_table(train).splitlines()[-2:]  # below the settings line
    assert "median" not in header and "min ms" not in header and "mean ms/step" in header
    assert row.split()[-1] == "250.00" and header.index("mean ms/step") + len("mean ms/step") == len(row)
    assert "median ms" in format_table([BenchmarkResult("drr", "cpu", {}, [0.5, 0.25])])  # the others: as before


def test_the_train_benchmark_times_the_device_asked_for(tmp_path, capsys, monkeypatch):
    """`benchmark train` had no --device: on a GPU machine its CPU could not be timed (training takes CUDA when
    present). Here a machine that claims a GPU: --device cpu trains on the CPU; --device cuda without a usable GPU
    is one line, as `benchmark drr --device cuda` says it."""
    out = tmp_path / "train.json"
    if not torch.cuda.is_available():
        assert main(["benchmark", "train", "--device", "cuda", "--stages", "autoencoder"]) == 2
        assert capsys.readouterr().err.strip() == "error: CUDA was requested but no CUDA device is available to PyTorch"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as training sees it
    assert main(["benchmark", "train", "--device", "cpu", "--config", "tiny", "--steps", "1", "--stages",
                 "autoencoder", "--json", str(out)]) == 0
    [record] = json.loads(out.read_text())["results"]
    assert record["device"] == "cpu" and record["settings"]["precision"] == "fp32"


def test_an_autoencoder_timed_without_its_lpips_term_says_so(tmp_path, capsys, monkeypatch):
    """A config whose loss has LPIPS (small, cpu, paper) timed where the weights are missing trains without the LPIPS
    term: its step is faster than the real one, and the row said nothing of it (a warning scrolled by above)."""
    import yaml

    from XctDiffCore.config import resolve_config_path

    config = yaml.safe_load(resolve_config_path("tiny").read_text())
    config["autoencoder"]["loss"]["perceptual_weight"] = 1.0
    (tmp_path / "lpips.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("XCTDIFF_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "train.json"
    assert main(["benchmark", "train", "--config", str(tmp_path / "lpips.yaml"), "--steps", "1", "--stages",
                 "autoencoder", "--json", str(out)]) == 0
    [record] = json.loads(out.read_text())["results"]
    assert record["settings"]["lpips"] == "no (weights missing: xctdiff lpips-weights)"
    assert "lpips=no (weights missing" in capsys.readouterr().out


def test_a_model_folder_given_as_the_train_benchmarks_config_is_said_as_such(tmp_path, capsys):
    """`benchmark train --config MODEL_FOLDER` said 'config file not found' of a folder that is there."""
    model = create_random_model(tmp_path / "model", "tiny")
    assert main(["benchmark", "train", "--config", str(model)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {model} is a model folder, not a configuration")


def test_cuda_requested_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    with pytest.raises(XctDiffError, match="CUDA was requested"):
        benchmark_pipeline("cuda", steps=1, config="tiny", repeats=1)


def test_cuda_peak_memory_is_reported():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    results = benchmark_pipeline("cuda", steps=2, config="tiny", repeats=1, warmup=1)
    assert results[-1].device == "cuda" and results[-1].settings["peak_cuda_mib"] > 0


def test_startup_benchmark_times_whole_processes(capsys):
    """`xctdiff benchmark startup`: one row per command, each a whole process (start-up included), so the
    plain `--help` takes longer than nothing but less than a DRR that imports torch and renders."""
    assert main(["benchmark", "startup", "--repeats", "1"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line for line in _table_rows(out)}
    assert list(rows) == ["help", "inspect", "drr"]
    assert "benchmark startup: 6 of 6 runs" in err  # 3 commands, each a warm-up and 1 timed run
    assert all("whole_process=yes" in line for line in rows.values())
    seconds = {name: float(line.split()[-2]) / 1e3 for name, line in rows.items()}
    assert 0.0 < seconds["help"] < seconds["drr"]


def test_every_benchmark_says_what_machine_and_runtime_its_figures_are_from(tmp_path, capsys):
    """A figure means little without the machine: the CPU, torch, the threads and how they wait, the allocator and
    whether other work was running. Before, `benchmark drr` printed only its thread count and the JSON was a bare list."""
    import os

    out = tmp_path / "drr.json"
    capsys.readouterr()
    assert main(["benchmark", "drr", "--size", "32", "--repeats", "1", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    machine = next(line for line in stdout.splitlines() if line.startswith("machine: "))
    runtime = next(line for line in stdout.splitlines() if line.startswith("runtime: "))
    assert f"torch {torch.__version__}" in machine and f"{os.cpu_count()} cores" in machine
    assert "OMP_WAIT_POLICY=" in runtime and "allocator " in runtime and "load average" in runtime
    assert f"{torch.get_num_threads()} thread" in runtime
    record = json.loads(out.read_text())
    facts = record["machine"]
    assert facts["torch"] == torch.__version__ and facts["threads"] == torch.get_num_threads() and facts["cpu"]
    assert {"omp_wait_policy", "allocator", "load_average", "busy", "xctdiff", "date", "native_bf16"} <= facts.keys()
    assert [r["name"] for r in record["results"]] == ["drr"]
    assert record["results"][0]["settings"]["precision"] == "fp32"


def test_a_json_file_that_cannot_be_written_is_refused_before_the_benchmark_runs(tmp_path, capsys, monkeypatch):
    """Before, a missing folder for --json was found after minutes of timing, the figures lost with the error."""
    import XctDiffCore.commands.benchmark as benchmark

    monkeypatch.setattr(benchmark, "benchmark_pipeline", lambda *a, **k: pytest.fail("the benchmark ran"))
    capsys.readouterr()
    assert main(["benchmark", "pipeline", "--config", "tiny", "--json", str(tmp_path / "no" / "bench.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: output folder does not exist")


def _signal_at_step(monkeypatch, signum, at_call=2):
    """Send ``signum`` to this process during the encoder stage's ``at_call``-th optimiser step."""
    import os
    import signal  # noqa: F401

    import XctDiffCore.training.encoder as encoder_stage

    real_backward, calls = encoder_stage.backward_step, []

    def backward(*a, **k):
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), signum)
        return real_backward(*a, **k)

    monkeypatch.setattr(encoder_stage, "backward_step", backward)


def test_sigterm_during_a_training_benchmark_stops_it_with_one_line(tmp_path, capsys, monkeypatch):
    """SIGTERM (a scheduler's stop) ended the stage early with a checkpoint, and the benchmark then divided by the
    steps it never timed: a ZeroDivisionError traceback (or a wrong figure and the next stage run)."""
    import signal

    _signal_at_step(monkeypatch, signal.SIGTERM)
    out = tmp_path / "train.json"
    capsys.readouterr()
    status = main(["benchmark", "train", "--config", "tiny", "--steps", "3", "--stages", "encoder", "--json", str(out)])
    err = capsys.readouterr().err
    assert status == 128 + signal.SIGTERM and err.strip().splitlines()[-1] == "error: terminated", err
    assert not out.exists() and "Traceback" not in err


def test_ctrl_c_during_a_training_benchmark_promises_no_checkpoint(tmp_path, capsys, monkeypatch):
    """Ctrl-C said the stage 'stopped with a checkpoint ... the same command with --resume continues from it': the
    checkpoint was in the benchmark's temporary folder, removed at once, and `benchmark train` has no --resume."""
    import signal

    _signal_at_step(monkeypatch, signal.SIGINT)
    out = tmp_path / "train.json"
    capsys.readouterr()
    status = main(["benchmark", "train", "--config", "tiny", "--steps", "3", "--stages", "encoder", "--json", str(out)])
    err = capsys.readouterr().err
    assert status == 130 and err.strip().splitlines()[-1] == "error: interrupted", err
    assert "--resume" not in err and "stops after this step" not in err and not out.exists()


def test_long_benchmarks_say_how_far_they_are(capsys):
    """A pipeline run of `small` takes 15 s on the 2-core CPU, `startup` some 20 s: before, both were silent until
    the table. Now a line per run on stderr (a bar on a terminal); the time of each run is not counted in it."""
    capsys.readouterr()
    assert main(["benchmark", "pipeline", "--config", "tiny", "--steps", "1", "--repeats", "1"]) == 0
    err = capsys.readouterr().err
    assert "benchmark pipeline: 1 of 3 runs" in err and "benchmark pipeline: 3 of 3 runs" in err, err


def test_steps_given_to_the_direct_path_are_said_to_be_ignored(capsys):
    """`--method direct --steps 50` timed the direct path without a word: a figure labelled 50 steps that had none."""
    capsys.readouterr()
    argv = ["benchmark", "pipeline", "--config", "tiny", "--method", "direct", "--steps", "5", "--repeats", "1"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err.count("warning: the direct method does not sample: the number of steps given is ignored") == 1, err
    assert "method=direct" in out and "steps=" not in out


@pytest.mark.parametrize("target", [[], ["drr"], ["pipeline"], ["train"], ["startup"]])
def test_each_benchmark_help_says_what_it_prints_and_in_what_unit(target, capsys):
    """The help said '(median reported)' and nothing of the unit, of what 'total' covers or of the machine's lines."""
    with pytest.raises(SystemExit):
        main(["benchmark", *target, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "milliseconds" in text or "in ms" in text, text
    if target == ["pipeline"]:
        assert "'total' is the reconstruction" in text and "'load'" in text and "'write'" in text
    if not target:
        assert "'machine:'" in text and "load average" in text
        assert "(train: the mean step)" in text  # not its median: one figure per stage


def test_the_pipeline_benchmark_times_the_models_own_path_by_default(tmp_path, capsys, monkeypatch):
    """`xctdiff benchmark pipeline` timed the diffusion path whatever the model's default: for the bundled model
    (direct, as `xctdiff reconstruct` runs it) someone checking a machine got the other path's figure."""
    import dataclasses

    from XctDiffCore.pipeline import XctDiffPipeline

    real = XctDiffPipeline.from_pretrained

    def direct_by_default(*args, **kwargs):
        pipe = real(*args, **kwargs)
        pipe.info = dataclasses.replace(pipe.info, method="direct")
        return pipe

    monkeypatch.setattr(XctDiffPipeline, "from_pretrained", staticmethod(direct_by_default))
    model = create_random_model(tmp_path / "model", "tiny")
    out = tmp_path / "bench.json"
    capsys.readouterr()
    assert main(["benchmark", "pipeline", "--model", str(model), "--repeats", "1", "--json", str(out)]) == 0
    settings = json.loads(out.read_text())["results"][-1]["settings"]
    assert settings["method"] == "direct" and settings["steps"] is None and settings["sampler"] is None
    assert "method=direct" in capsys.readouterr().out
    # several samples are diffusion's, as `xctdiff reconstruct --samples 2` takes them (not "the direct method
    # makes one deterministic CT")
    assert main(["benchmark", "pipeline", "--model", str(model), "--repeats", "1", "--samples", "2", "--steps", "1",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"][-1]["settings"]["method"] == "diffusion"
