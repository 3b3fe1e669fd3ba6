"""Timings of the engine's hot paths, shown by ``xctdiff benchmark <target>`` (targets, not timed tests).

Each target is a function returning a :class:`BenchmarkResult`; :func:`time_callable` does the
warm-up, the device synchronisation and the median, so every target is measured the same way, and
:func:`measure_and_report` prints the machine's facts (:func:`machine_facts`) above every table.
Target figures: one 128^2 DRR of a 128^3 volume in <= 0.25 s on a 2-core CPU, <= 5 ms on an H100;
the pipeline's targets are beside :func:`benchmark_pipeline`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..atomic import atomic_path, check_output_path
from ..errors import XctDiffError
from ..memory import allocator_name
from ..progress import progress_bar


@dataclass
class BenchmarkResult:
    """One timed operation: what ran, where, and the per-run seconds."""

    name: str
    device: str
    settings: dict
    seconds: list = field(default_factory=list)
    gflop: float | None = None  # operations per run, where counted: the table adds the achieved GFLOP/s
    peak_share: float | None = None  # the time these operations need at the peak of each precision they ran in / the time taken
    figure: str = "median"  # what ``seconds`` hold: runs whose median is shown, or one "mean step" (training)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def as_dict(self) -> dict:
        return {**asdict(self), "median_s": self.median_s, "min_s": min(self.seconds), "max_s": max(self.seconds)}


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda``; a clear error where CUDA was asked for and is absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise XctDiffError("CUDA was requested but no CUDA device is available to PyTorch")
    if name not in ("cpu", "cuda"):
        raise XctDiffError(f"unknown device {name!r}; choose cpu or cuda")
    return torch.device(name)


def time_callable(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2,
                  after_each: Callable[[], object] = lambda: None) -> list:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones (CUDA work is waited for);
    ``after_each`` runs after every call, outside the time (a progress bar's step)."""
    if repeats < 1:
        raise XctDiffError("--repeats must be at least 1")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
        after_each()
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
        after_each()
    return seconds


#: Volumes of 128^3 float32 (8 MiB each) one timed DRR call may render.
MAX_DRR_BATCH = 64


def benchmark_drr(device: str = "cpu", size: int = 128, geometry: str = "cone", repeats: int = 10,
                  batch: int = 1, volume_size: int = 128) -> BenchmarkResult:
    """Time :func:`~XctDiffCore.drr.render_drr` on a random HU volume ``(batch, 1, n, n, n)``, no gradients."""
    from ..drr import check_drr_size, make_geometry, render_drr

    check_drr_size(size)
    if not 1 <= batch <= MAX_DRR_BATCH:
        raise XctDiffError(f"--batch must be between 1 and {MAX_DRR_BATCH} volumes, got {batch}")
    dev = resolve_device(device)
    geom = make_geometry(geometry)
    generator = torch.Generator().manual_seed(0)
    volume = (torch.rand(batch, 1, volume_size, volume_size, volume_size, generator=generator) * 2000 - 1000).to(dev)

    def run():
        with torch.no_grad():
            render_drr(volume, geom, size=size)

    settings = {"geometry": geometry, "size": size, "volume": f"{volume_size}^3", "batch": batch, "precision": "fp32"}
    return BenchmarkResult("drr", str(dev), settings, time_callable(run, dev, repeats))


def format_table(results: list) -> str:
    """A small fixed-width table: one line per result (GFLOP, GFLOP/s and the share of the measured matrix-product
    peak where counted: a result's ``peak_share``, else its rate over ``peak_gflops`` in a result's settings).

    Where one result has settings (a DRR; a pipeline's total), they are a ``settings:`` line above the table: as a
    column they made every row of the pipeline's table over 200 characters wide."""
    counted = any(r.gflop is not None for r in results)
    peak = next((r.settings["peak_gflops"] for r in results if r.settings.get("peak_gflops")), None)
    texts = [", ".join(f"{k}={v}" for k, v in r.settings.items() if v is not None) for r in results]
    above = [text for text in texts if text] if sum(map(bool, texts)) == 1 else []
    # columns as wide as their longest entry: `benchmark train`'s names (train/autoencoder) ran into the next column
    name_w, device_w = max([12, *(len(r.name) for r in results)]), max([7, *(len(r.device) for r in results)])
    settings_w = 0 if above else max([58, *map(len, texts)])
    settings_header = "" if above else f" {'settings':<{settings_w}}"
    # a training step's figure is one mean per stage (no median, no fastest run): the header says so
    mean_step = bool(results) and all(r.figure == "mean step" for r in results)
    figures = f" {'mean ms/step':>12}" if mean_step else f" {'median ms':>10} {'min ms':>8}"
    lines = [f"settings: {text}" for text in above]
    lines.append(f"{'benchmark':<{name_w}} {'device':<{device_w}}{settings_header}{figures}"
                 + (f" {'GFLOP':>8} {'GFLOP/s':>8}" if counted else "") + (f" {'of peak':>8}" if counted and peak else ""))
    for r, settings in zip(results, texts):
        settings = "" if above else f" {settings:<{settings_w}}"
        line = f"{r.name:<{name_w}} {r.device:<{device_w}}{settings}" + (
            f" {r.median_s * 1e3:>12.2f}" if mean_step else f" {r.median_s * 1e3:>10.2f} {min(r.seconds) * 1e3:>8.2f}")
        if counted and r.gflop:
            rate = r.gflop / r.median_s if r.median_s > 0 else 0.0
            share = r.peak_share if r.peak_share is not None else (rate / peak if peak else None)
            line += f" {r.gflop:>8.1f} {rate:>8.1f}" + (f" {share:>8.0%}" if peak and share is not None else "")
        lines.append(line)
    return "\n".join(lines)


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """The best GFLOP/s of a ``size``-square matrix product in ``dtype`` on ``device`` with the current threads.

    Why: "share of peak" needs a peak, and a datasheet's is not what this machine, under its current
    load, thread count and precision, can give; a large matrix product is the best rate its libraries reach.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    with torch.inference_mode():
        seconds = time_callable(lambda: a @ b, device, repeats, warmup=2)
    return 2 * size**3 / min(seconds) / 1e9


def write_json(results: list, path, machine: dict) -> None:
    """The machine and the results, with every run's time, as JSON (written atomically)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"machine": machine, "results": [r.as_dict() for r in results]}, indent=2) + "\n")


def measure_and_report(measure: Callable[[], list], json_path=None) -> int:
    """Run ``measure`` (a target's results), then print the machine's lines and the table, and write the JSON.

    Why here and not in each target: every figure needs the same facts beside it to be compared (README,
    Performance), and the --json file is checked before the timing, not found unwritable minutes later.
    """
    if json_path:
        check_output_path(json_path)
    load = _load_average()  # before the run: the benchmark's own threads are not other work
    results = measure()
    machine = machine_facts(results[0].device if results else "cpu", load)
    print(format_machine(machine))
    print(format_table(results))
    if json_path:
        write_json(results, json_path, machine)
    return 0


# ------------------------------------------------------------------------------------------ the machine
#: A 1-minute load average at or above this, before the run, means other work shared the CPU.
BUSY_LOAD = 0.5


def cpu_model() -> str:
    """The CPU's name as the system gives it (Linux: /proc/cpuinfo's 'model name'), else the platform's word."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _load_average():
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):  # Windows
        return None


def machine_facts(device: str, load_average) -> dict:
    """What a figure needs beside it to be compared: the hardware, torch, the threads and how they wait, the
    allocator, and the load average (1, 5, 15 min) before the run with whether other work was running."""
    from datetime import datetime, timezone

    from .. import __version__
    from ..device import cpu_has_native_bf16

    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "xctdiff": __version__,
            "cpu": cpu_model(), "cores": os.cpu_count(), "native_bf16": cpu_has_native_bf16(), "gpu": gpu,
            "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "allocator": allocator_name(), "load_average": load_average,
            "busy": None if load_average is None else load_average[0] >= BUSY_LOAD}


def format_machine(facts: dict) -> str:
    """Two lines: ``machine:`` (hardware and software) and ``runtime:`` (threads, allocator, load)."""
    from ..threads import describe_policy

    env = {k: v for k, v in (("OMP_WAIT_POLICY", facts["omp_wait_policy"]),
                             ("OMP_NUM_THREADS", facts["omp_num_threads"])) if v is not None}
    gpu = f", GPU {facts['gpu']}" if facts["gpu"] else ""
    torch_build = f"CUDA {facts['cuda']}" if facts["cuda"] else "CPU build"
    threads = facts["threads"]
    if facts["load_average"] is None:
        load = "load average unknown"
    else:
        load = (f"load average {facts['load_average'][0]:.2f} before the run (1 min): "
                + ("busy, other work shared the CPU and the figures may be slower" if facts["busy"] else "quiet"))
    return (f"machine: {facts['cpu']} ({facts['cores']} cores, native bf16 {'yes' if facts['native_bf16'] else 'no'}"
            f"{gpu}); torch {facts['torch']} ({torch_build}); xctdiff {facts['xctdiff']}; {facts['date']}\n"
            f"runtime: {threads} thread{'' if threads == 1 else 's'} ({describe_policy(env)}); "
            f"allocator {facts['allocator']}; {load}")


# ------------------------------------------------------------------------------------------ start-up
def benchmark_startup(repeats: int = 5) -> list:
    """Whole-process seconds of short commands, start-up included: ``xctdiff --help``, ``xctdiff inspect``
    of the sample film and ``xctdiff drr`` of the sample CT (LIDC-IDRI-0001; issue 20: for a short
    command much of the wait is importing, which a timing inside the process cannot see).

    Each runs ``repeats`` times after one untimed run (which warms the file cache) as ``python -m
    XctDiffCore`` with this interpreter, so the figure is the engine's own, not a launcher's.
    """
    import subprocess
    import tempfile

    from .demo import SAMPLE_CT_NAME, SAMPLE_RADIOGRAPH_NAME, sample_path

    if repeats < 1:
        raise XctDiffError("--repeats must be at least 1")
    with tempfile.TemporaryDirectory(prefix="xctdiff-bench-startup-") as tmp, \
            progress_bar(3 * (1 + repeats), "benchmark startup", "run") as bar:
        commands = {"help": ["--help"], "inspect": ["inspect", str(sample_path(SAMPLE_RADIOGRAPH_NAME))],
                    "drr": ["drr", str(sample_path(SAMPLE_CT_NAME)), "-o", str(Path(tmp) / "drr.png")]}
        results = []
        for name, args in commands.items():
            def run(argv=(sys.executable, "-m", "XctDiffCore", *args)):
                done = subprocess.run(argv, capture_output=True, text=True, encoding="utf-8", errors="replace")
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                    raise XctDiffError(f"`xctdiff {' '.join(argv[3:])}` failed: {last}")

            results.append(BenchmarkResult(name, "cpu", {"command": f"xctdiff {args[0]}", "whole_process": "yes"},
                                           time_callable(run, torch.device("cpu"), repeats, warmup=1,
                                                         after_each=bar.update)))
    return results


# ------------------------------------------------------------------------------------------ pipeline
# Targets for the default model, 128^3, one sample, model loaded, default steps: <= 0.5 s end to end on
# one H100 (8 samples batched <= 1.5 s, peak CUDA memory <= 2 GiB) and <= 30 s on a 2-core CPU.

PIPELINE_STAGES = (("load", "load"), ("read", "read"), ("preprocess", "preprocessing"), ("style", "style"),
                   ("encoder", "encoder"), ("sampler/step", "sampling_per_step"), ("decode", "decoding"),
                   ("guidance", "guidance"), ("drr", "consistency"), ("write", "write"), ("total", "total"))


def benchmark_pipeline(device: str = "cpu", steps=None, samples: int = 1, model=None, config=None,
                       repeats: int = 3, warmup: int = 1, method=None, guidance: float = 0.0,
                       precision: str = "auto") -> list:
    """Per-stage seconds of :meth:`XctDiffPipeline.reconstruct` on the bundled sample radiograph, and peak memory.

    ``model``: a model folder (None: the bundled default); ``config``: instead, random weights of that
    config (timings do not depend on the weights). Each stage is the median of ``repeats`` runs after
    ``warmup`` untimed ones; "load" reloads the folder each time, "write" writes the CT as .nrrd.
    Peak memory: CUDA ``max_memory_allocated`` over the timed runs, and the process's peak RSS.
    ``method``, ``guidance`` and ``precision`` as in :meth:`XctDiffPipeline.reconstruct` (``method`` None: the
    model's own path, as ``xctdiff reconstruct`` takes it; the stages a path skips time 0); the settings printed say which precision ``auto`` became. One more, untimed
    run counts each stage's operations (:func:`~XctDiffCore.pipeline.counting_flops`): GFLOP, achieved
    GFLOP/s and their share of this machine's matrix-product rate in the run's precision
    (:func:`matmul_peak_gflops`, ``peak_gflops``) beside the times show the distance to the hardware.
    """
    import tempfile

    from ..io import write_volume
    from ..options import ReconstructOptions
    from ..pipeline import XctDiffPipeline, counting_flops

    if repeats < 1:
        raise XctDiffError("--repeats must be at least 1")
    dev = resolve_device(device)
    # a run of `small` takes 15 s on the 2-core CPU: a line per run, the untimed one counting operations last
    with tempfile.TemporaryDirectory(prefix="xctdiff-bench-") as tmp, \
            progress_bar(warmup + repeats + 1, "benchmark pipeline", "run") as bar:
        if config is not None:
            from ..model_folder import create_random_model

            model = create_random_model(Path(tmp) / "model", config)
        radiograph = _sample_radiograph()
        runs = {name: [] for name, _ in PIPELINE_STAGES}
        pipe = None
        for i in range(warmup + repeats):
            if i == warmup and dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)  # the peak of the timed runs only
            pipe = XctDiffPipeline.from_pretrained(model)
            if i == 0:  # the path `xctdiff reconstruct` takes with these options (once: its warning of unused steps)
                method = ReconstructOptions(steps=steps, samples=samples, method=method).for_model(
                    pipe.info.method, pipe.info.sampler, pipe.info.steps, pipe.schedule.num_train_steps).method
            result = pipe.reconstruct(radiograph, steps=steps if method == "diffusion" else None, samples=samples,
                                      seed=i, device=str(dev), method=method, cpu_fallback=False, guidance=guidance,
                                      precision=precision)
            start = time.perf_counter()
            write_volume(result.ct, Path(tmp) / "ct.nrrd")
            result.timings["write"] = time.perf_counter() - start
            result.timings["load"] = pipe.load_seconds
            if i >= warmup:
                for name, key in PIPELINE_STAGES:
                    runs[name].append(result.timings.get(key, 0.0))
            bar.set_postfix_str("warm-up" if i < warmup else f"{result.timings.get('total', 0.0):.2f} s")
            bar.update()
        with counting_flops():  # one more, untimed run: the operations of each stage
            counted = pipe.reconstruct(radiograph, steps=steps if method == "diffusion" else None, samples=samples,
                                       seed=0, device=str(dev), method=method, cpu_fallback=False, guidance=guidance,
                                       precision=precision)
        bar.set_postfix_str("operations counted")
        bar.update()
        run_dtype = "bfloat16" if result.precision == "bf16" else "float32"
        # the run's precision and any other one its stages used (e.g. the style generator, fp32 in a bf16 run)
        names = {run_dtype} | {name for stage in counted.flops_by_dtype.values() for name in stage
                               if name in ("float32", "bfloat16", "float16")}
        peaks = {name: matmul_peak_gflops(dev, getattr(torch, name)) for name in sorted(names)}
        peak = peaks[run_dtype]
    settings = {"model": pipe.info.model_id, "model_version": pipe.info.version,
                "volume": f"{pipe.info.volume_size}^3", "method": method, "steps": result.steps,
                "sampler": pipe.info.sampler if method == "diffusion" else None, "samples": samples,
                "guidance": guidance or None, "precision": result.precision, **_peak_memory(dev), "peak_gflops": round(peak),
                **{f"peak_gflops_{name}": round(value) for name, value in peaks.items() if value != peak}}
    # the operations of a stage: its lap's; a sampler step's: the sampling lap's over the steps
    lap = {name: "sampling" if name == "sampler/step" else key for name, key in PIPELINE_STAGES}
    per_run = {name: 1 / result.steps if name == "sampler/step" and result.steps else 1 for name in lap}
    gflop = {name: counted.flops.get(lap[name], 0) / 1e9 * per_run[name] for name in lap}
    gflop["total"] = sum(counted.flops.values()) / 1e9
    ideal = {name: _seconds_at_peak(counted.flops_by_dtype.get(lap[name], {}), peaks, peak) * per_run[name]
             for name in lap}
    ideal["total"] = sum(_seconds_at_peak(stage, peaks, peak) for stage in counted.flops_by_dtype.values())
    results = []
    for name, seconds in runs.items():
        median = statistics.median(seconds)
        share = ideal[name] / median if counted.flops_by_dtype and ideal[name] and median > 0 else None
        results.append(BenchmarkResult(name, str(dev), settings if name == "total" else {}, seconds,
                                       gflop.get(name) or None, share))
    return results


def _seconds_at_peak(flops_by_dtype: dict, peaks: dict, default_peak: float) -> float:
    """Seconds these operations need at the measured peak of each precision they ran in (GFLOP/s)."""
    return sum(count / 1e9 / peaks.get(name, default_peak) for name, count in flops_by_dtype.items())


def _sample_radiograph():
    """The bundled sample film (NEMA WG04 RG1, a real DICOM CR: the style stage runs), else a synthetic
    256 px chest-like image."""
    from ..io import Radiograph, read_radiograph
    from .demo import SAMPLE_RADIOGRAPH_NAME, sample_path

    try:
        return read_radiograph(sample_path(SAMPLE_RADIOGRAPH_NAME))
    except XctDiffError:
        pass
    rows, cols = np.mgrid[-1:1:256j, -1:1:256j]
    image = np.exp(-(rows**2 + (np.abs(cols) - 0.45) ** 2) / 0.1).astype(np.float32)
    return Radiograph(image, None, False, "synthetic")


def _peak_memory(device: torch.device) -> dict:
    """Peak CUDA memory (MiB) of the timed runs and the process's peak resident memory (MiB)."""
    memory = {}
    if device.type == "cuda":
        memory["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource
    except ImportError:  # Windows
        return memory
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    memory["peak_rss_mib"] = round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
    return memory


# ------------------------------------------------------------------------------------------ training
TRAIN_STAGES = ("autoencoder", "encoder", "diffusion")


def _synthetic_datalist(root: Path, pairs: int = 4) -> Path:
    """A datalist like ``xctdiff prepare`` writes (128^3 CTs, 128 px DRRs) of random volumes: timing only."""
    from ..pipeline import OUTPUT_SIZE as size

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "xrays").mkdir()
    entries = []
    for i in range(pairs):
        ct = rng.integers(-1000, 1000, (size,) * 3, dtype=np.int16)
        np.savez(root / "images" / f"p{i}.npz", ct=ct, spacing=np.full(3, 2.5), origin=np.zeros(3))
        projection = (ct.astype(np.float32) + 1000.0).sum(axis=1)
        np.save(root / "xrays" / f"p{i}.npy", (projection / projection.max()).astype(np.float32))
        entries.append({"image": f"images/p{i}.npz", "xray": f"xrays/p{i}.npy", "patient": f"p{i}"})
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": entries[1:], "validation": entries[:1]}))
    return path


@contextlib.contextmanager
def _ctrl_c_at_once():
    """Ctrl-C stops a benchmark's training at once, with only "interrupted" to say: training's own Ctrl-C (finish
    the step, keep a checkpoint, "--resume continues from it") promised what a removed temporary folder cannot keep.
    Training takes over Ctrl-C only where it finds Python's default handler, so another one keeps it off."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # Ctrl-C ignored (started in the background) or handled by the caller: left as it is
        return
    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt() from None  # not training's words about a checkpoint in the temporary folder
    finally:
        signal.signal(signal.SIGINT, previous)


class _TemporaryFolderLines:
    """stderr for a benchmark's training: a line naming the temporary run folder keeps only its parts before the first
    that names it (that part itself, where it is the first, with the folder's name said in words). Training closes a
    stage with "encoder: trained to step 4; checkpoint /tmp/...; next: `xctdiff train diffusion` ...": a checkpoint
    and advice about a folder the user never sees, removed at the end."""

    def __init__(self, stream, folder: str):
        self._stream, self._folder = stream, folder

    def write(self, text: str) -> int:
        if self._folder in text:
            parts = text.split("; ")
            kept = parts[: next(i for i, part in enumerate(parts) if self._folder in part)] or \
                [parts[0].replace(self._folder, "the benchmark's temporary folder").rstrip("\n")]
            text = "; ".join(kept) + ("\n" if text.endswith("\n") else "")
        return self._stream.write(text)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding: the stream's own
        return getattr(self._stream, name)


@contextlib.contextmanager
def _training_on(device: torch.device, run_folder: Path):
    """Training as the benchmark runs it: on ``device`` and with its lines about ``run_folder`` cut (see above).

    Training takes CUDA whenever PyTorch finds it; to time a GPU machine's CPU it is told there is none (the
    benchmark's own process: nothing else runs meanwhile)."""
    from unittest import mock

    hide_cuda = mock.patch.object(torch.cuda, "is_available", lambda: False) if device.type == "cpu" \
        else contextlib.nullcontext()
    with hide_cuda, contextlib.redirect_stderr(_TemporaryFolderLines(sys.stderr, str(run_folder))):
        yield


def _lpips_setting(stage: str, section) -> dict:
    """``lpips``: whether an autoencoder whose loss has an LPIPS term was timed with it. Without the weights
    training refuses such a config; the benchmark times it without the term, a step faster than the real one."""
    if stage != "autoencoder" or section.loss.perceptual_weight <= 0:
        return {}
    from ..models.lpips import weights_path

    present = weights_path(section.loss.lpips_weights).is_file()
    return {"lpips": "yes" if present else "no (weights missing: xctdiff lpips-weights)"}


def benchmark_train(config: str = "tiny", steps: int = 5, warmup: int = 2, stages=TRAIN_STAGES,
                    device: str | None = None) -> list:
    """Seconds per optimiser step of each stage, through the real ``xctdiff train`` on random data.

    Each stage trains ``warmup + steps`` steps, logging every ``warmup`` steps and validating and
    checkpointing only at the end; its CSV log's ``train/seconds_per_step`` over the steps after the
    warm-up is the figure (data loading included, building the networks excluded). The device is the
    one training picks (CUDA when present) unless ``device`` (cpu or cuda) says which; the batch is the config's, so
    samples/s = batch / figure. Training's lines about the temporary run folder (its checkpoint, what to run next)
    are cut.
    A later stage needs the earlier ones: those not asked for are trained for one untimed step.
    """
    import csv
    import dataclasses
    import tempfile

    from ..config import load_config
    from ..training import train
    from ..training.common import checkpoint_step, setup_distributed

    if steps < 1:
        raise XctDiffError(f"--steps must be at least 1, got {steps}")
    if warmup < 1:
        raise XctDiffError(f"warmup must be at least 1, got {warmup}")
    base = load_config(config)
    dev = resolve_device(device) if device is not None else setup_distributed().device
    device = str(dev)
    results = []
    with tempfile.TemporaryDirectory(prefix="xctdiff-bench-train-") as tmp:
        datalist, run = _synthetic_datalist(Path(tmp) / "data"), Path(tmp) / "run"
        last = max(TRAIN_STAGES.index(stage) for stage in stages)
        for stage in TRAIN_STAGES[: last + 1]:
            timed = stage in stages
            total = warmup + steps if timed else 1
            section = getattr(base, stage)
            optim = dataclasses.replace(section.optim, max_steps=total, log_every=warmup, val_every=total,
                                        checkpoint_every=total)
            print(f"benchmark train: the {stage} stage, {total} step{'s' if total > 1 else ''}"
                  + (f" ({warmup} warm-up, {steps} timed)" if timed else " (untimed: the next stage needs it)")
                  + "; its training lines follow, its folder is temporary", file=sys.stderr, flush=True)
            timed_section = dataclasses.replace(section, optim=optim)
            if _lpips_setting(stage, section).get("lpips", "yes") != "yes":  # no weights: timed without the term
                timed_section = dataclasses.replace(timed_section, loss=dataclasses.replace(section.loss, perceptual_weight=0.0))
            with _ctrl_c_at_once(), _training_on(dev, run):
                train(stage, dataclasses.replace(base, **{stage: timed_section}), data=str(datalist), out=str(run))
            if checkpoint_step(run, stage) != total:  # SIGTERM ended the stage early, with a checkpoint: stop too
                from .cli import Terminated

                raise Terminated()
            if not timed:
                continue
            with open(run / stage / "log.csv", newline="", encoding="utf-8") as f:
                rows = [(int(r["step"]), float(r["train/seconds_per_step"])) for r in csv.DictReader(f)
                        if r.get("train/seconds_per_step")]
            seconds, previous = 0.0, warmup
            for step, per_step in rows:
                if step > warmup:
                    seconds += per_step * (step - previous)
                    previous = step
            per_step = seconds / steps
            settings = {"config": config, "batch": section.optim.batch_size, "steps": steps,
                        "precision": base.run.precision if device.startswith("cuda") else "fp32",  # CPUs train in fp32
                        "it_per_s": round(1.0 / per_step, 3), **_lpips_setting(stage, section)}
            results.append(BenchmarkResult(f"train/{stage}", device, settings, [per_step], figure="mean step"))
    return results
