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


COMMANDS = [add_demo_command]


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
