"""Add (or replace) the style stage of a model folder, in place: how xctdiff-cpu 0.4.0 was made from 0.3.0.

    python Testing/Scripts/add_style_stage.py MODEL_FOLDER RUN/style --version 0.4.0 [--dtype float16]

RUN/style is the stage folder of `xctdiff train style` (style.safetensors + style.json, exported when the
run stops). The other stages' files stay byte-identical; the manifest is rewritten with every SHA-256,
the model card included (edit MODEL_CARD.md before running this).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from XctDiffCore.model_folder import MANIFEST_NAME, export_stage, load_model_folder, write_manifest
from XctDiffCore.style import load_style_generator

STAGE_JSON_KEYS = ("stage", "dtype", "parameters")  # written by export_stage itself


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("style", type=Path, help="a style stage folder (style.safetensors + style.json)")
    parser.add_argument("--version", required=True)
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    args = parser.parse_args()
    generator, _ = load_style_generator(args.style)
    settings = json.loads((args.style / "style.json").read_text(encoding="utf-8"))
    record = export_stage(generator, "style", {k: v for k, v in settings.items() if k not in STAGE_JSON_KEYS},
                          args.folder, dtype=args.dtype)
    manifest = json.loads((args.folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    stages = {name: {"weights": r["weights"], "config": r["config"]} for name, r in manifest["stages"].items()}
    stages["style"] = record
    staged = {name for entry in stages.values() for name in entry.values()}
    files = [name for name in manifest["sha256"] if name not in staged]
    extra = {key: value for key, value in manifest.items() if key not in ("stages", "sha256")}
    extra["version"] = args.version
    write_manifest(args.folder, stages, extra=extra, files=files)
    loaded = load_model_folder(args.folder)  # every SHA-256 checked, the stages agree
    print(f"{args.folder}: {loaded.info.model_id} {loaded.info.version}, style stage added ({args.dtype})")


if __name__ == "__main__":
    main()
