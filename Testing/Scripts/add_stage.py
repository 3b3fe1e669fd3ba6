"""Add (or replace) a stage of a model folder, in place: how xctdiff-cpu 0.4.0 (style), 0.5.0 (coarse CT)
and 0.6.0 (a longer-trained diffusion stage) were made from the folder before them; `--autoencoder`
puts in a decoder fine-tuned on the folder's own latents.

    python Testing/Scripts/add_stage.py MODEL_FOLDER --style RUN/style --version 0.4.0 [--dtype float16]
    python Testing/Scripts/add_stage.py MODEL_FOLDER --coarse RUN --version 0.5.0 [--dtype float16] [--metrics JSON]
    python Testing/Scripts/add_stage.py MODEL_FOLDER --diffusion RUN --version 0.6.0 [--dtype float16]
    python Testing/Scripts/add_stage.py MODEL_FOLDER --autoencoder RUN --version V [--dtype float16]
    python Testing/Scripts/add_stage.py MODEL_FOLDER --encoder RUN --version V [--dtype float16]
    python Testing/Scripts/add_stage.py MODEL_FOLDER --new-autoencoder AUTOENCODER_FOLDER --version V [--id ID]

RUN/style is the stage folder of `xctdiff train style` (style.safetensors + style.json, exported when the
run stops); RUN for `--coarse`, `--diffusion` and `--encoder` is a run folder of `xctdiff train coarse`, `xctdiff
train diffusion` or `xctdiff train encoder` (its checkpoint's average of the weights is what ships; an encoder or
diffusion run must have learnt the folder's own latents, else it is refused, and its JSON records that autoencoder
(``latents``), which loading checks; a replaced diffusion stage keeps
the folder's defaults, the ``method``, ``sampler`` and ``steps`` of its diffusion.json, not the run's
validation sampler); `--autoencoder` takes a run of
`xctdiff train autoencoder` with ``autoencoder.decoder_only`` and ``--init MODEL_FOLDER``, and refuses one
whose encoder or codebook differs from the folder's (the encoder and diffusion stages read those latents); `--metrics` replaces the manifest's metrics (the summary.json of `xctdiff
evaluate` with the new stage). The other stages' files stay byte-identical; the manifest is rewritten with
every SHA-256, the model card included (edit MODEL_CARD.md before running this).

`--new-autoencoder` is how xctdiff-cpu 0.7.0 began: another model folder's autoencoder (new latents, e.g.
Resources/Pretrained/xctdiff-cpu-autoencoder) copied in byte for byte; the folder's encoder and diffusion
stages learnt the old latents, so the manifest lists them under ``retrain``: the folder is then a start for
`xctdiff train encoder|diffusion --init FOLDER`, it refuses to reconstruct until `--encoder` replaces its
encoder, and `--method diffusion` until `--diffusion` replaces that stage. `--id` renames the model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from XctDiffCore.model_folder import (FOLDER_LATENTS_DTYPE, MANIFEST_NAME, export_stage, latents_record, load_autoencoder,
                                      load_model_folder, load_stages, write_manifest)

STAGE_JSON_KEYS = ("stage", "dtype", "parameters")  # written by export_stage itself


def style_stage(stage_dir: Path) -> tuple:
    from XctDiffCore.style import load_style_generator

    generator, _ = load_style_generator(stage_dir)
    settings = json.loads((stage_dir / "style.json").read_text(encoding="utf-8"))
    return generator, {k: v for k, v in settings.items() if k not in STAGE_JSON_KEYS}


def trained_stage(stage: str, run_dir: Path) -> tuple:
    from XctDiffCore.training import stage_for_export
    from XctDiffCore.training.common import checkpoint_path, load_checkpoint

    return stage_for_export(stage, load_checkpoint(checkpoint_path(run_dir, stage)))


def learnt_latents(folder: Path, stage: str, run_dir: Path) -> dict:
    """The ``latents`` record of an encoder or diffusion stage going into ``folder``: refused (nothing written) when
    it learnt other latents than its run's autoencoder makes now, or when that autoencoder's encoder or codebook
    differs from the folder's; else the folder's autoencoder, as its loading compares it."""
    from XctDiffCore.training.common import checkpoint_path, latents_changed, load_checkpoint

    vqgan, settings = trained_stage("autoencoder", run_dir)
    changed = latents_changed(f"the run's {stage} stage", load_checkpoint(checkpoint_path(run_dir, stage)).get("latents"),
                              latents_record(vqgan, settings.get("step")))
    if changed:
        raise SystemExit(f"error: {changed}: train it again on it, then add it")
    check_same_latents(folder, vqgan, hint=f"train the {stage} with --init a folder that has this folder's autoencoder")
    step = json.loads((folder / "autoencoder.json").read_text(encoding="utf-8")).get("step")
    return latents_record(load_autoencoder(folder)[0], step, dtype=FOLDER_LATENTS_DTYPE)


def check_same_latents(folder: Path, network, hint: str = "train it with autoencoder.decoder_only and --init that folder") -> None:
    """A new autoencoder may only change the decoder: every stage after it reads its latents."""
    from safetensors.torch import load_file

    shipped = load_file(folder / "autoencoder.safetensors")
    new = network.state_dict()
    moved = [k for k in shipped if k.startswith(("encoder.", "quantizer."))
             and not torch.equal(shipped[k], new[k].to(shipped[k].dtype))]
    if moved:
        raise SystemExit(f"error: the run's encoder or codebook differs from {folder}'s ({len(moved)} tensors, e.g. {moved[0]}); {hint}")


def manifest_parts(folder: Path) -> tuple:
    """A folder's manifest as `write_manifest` takes it: ``(stages, other keys, other checksummed files)``."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    stages = {name: {"weights": r["weights"], "config": r["config"]} for name, r in manifest["stages"].items()}
    staged = {name for entry in stages.values() for name in entry.values()}
    extra = {key: value for key, value in manifest.items() if key not in ("stages", "sha256")}
    return stages, extra, [name for name in manifest["sha256"] if name not in staged]


def replace_latents(folder: Path, source: Path, version: str, model_id) -> None:
    """Copy another folder's autoencoder in, byte for byte, and mark the stages that read its latents."""
    import shutil

    _, settings, manifest = load_stages(source, ("autoencoder",), required=("autoencoder",))  # checksums verified
    record = manifest["stages"]["autoencoder"]
    stages, extra, files = manifest_parts(folder)
    for role in ("weights", "config"):
        shutil.copyfile(source / record[role], folder / stages["autoencoder"][role])
    extra.update(version=version, retrain=["encoder", "diffusion"], **({"id": model_id} if model_id else {}))
    extra.pop("metrics", None)  # measured on the old latents
    steps = extra.get("training", {}).get("steps", {})
    if "autoencoder" in steps and "step" in settings["autoencoder"]:
        steps["autoencoder"] = settings["autoencoder"]["step"]
    write_manifest(folder, stages, extra=extra, files=files)
    print(f"{folder}: autoencoder of {source}; retrain its encoder and diffusion stages on these latents "
          f"(xctdiff train encoder|diffusion --init {folder}), then add them with --encoder / --diffusion")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--style", type=Path, help="a style stage folder (style.safetensors + style.json)")
    source.add_argument("--coarse", type=Path, help="a run folder with a trained coarse stage")
    source.add_argument("--diffusion", type=Path, help="a run folder with a trained diffusion stage")
    source.add_argument("--autoencoder", type=Path, help="a run folder with a decoder-only fine-tuned autoencoder")
    source.add_argument("--encoder", type=Path, help="a run folder with an encoder trained on the folder's latents")
    source.add_argument("--new-autoencoder", type=Path, metavar="FOLDER",
                        help="another model folder's autoencoder (new latents): the encoder and diffusion must be retrained")
    parser.add_argument("--version", required=True)
    parser.add_argument("--id", help="a new model id for the folder")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--metrics", type=Path, help="summary.json of `xctdiff evaluate` for the manifest")
    args = parser.parse_args()
    if args.new_autoencoder:
        replace_latents(args.folder, args.new_autoencoder, args.version, args.id)
        return
    if args.style:
        stage, (network, settings) = "style", style_stage(args.style)
    else:
        stage = next(name for name in ("coarse", "diffusion", "encoder", "autoencoder") if getattr(args, name))
        network, settings = trained_stage(stage, getattr(args, stage))
    if stage == "autoencoder":
        check_same_latents(args.folder, network)
    if stage in ("encoder", "diffusion"):  # it learnt the latents of its run's autoencoder: recorded, for loading
        settings["latents"] = learnt_latents(args.folder, stage, getattr(args, stage))
    previous = args.folder / f"{stage}.json"
    if stage == "diffusion" and previous.is_file():  # the folder's defaults (path, sampler, steps) stay what they were
        defaults = json.loads(previous.read_text(encoding="utf-8"))
        settings["method"] = defaults.get("method", "diffusion")
        settings.update({key: defaults[key] for key in ("sampler", "steps") if key in defaults})
    record = export_stage(network, stage, settings, args.folder, dtype=args.dtype)
    stages, extra, files = manifest_parts(args.folder)
    stages[stage] = record
    extra["version"] = args.version
    if args.id:
        extra["id"] = args.id
    retrain = [name for name in extra.pop("retrain", []) if name != stage]  # this one learnt the folder's latents
    if retrain:
        extra["retrain"] = retrain
    steps = extra.get("training", {}).get("steps", {})
    if stage in steps and "step" in settings:  # the manifest's training record follows the replaced stage
        steps[stage] = settings["step"]
    if args.metrics:
        extra["metrics"] = json.loads(args.metrics.read_text(encoding="utf-8"))
    write_manifest(args.folder, stages, extra=extra, files=files)
    loaded = load_model_folder(args.folder)  # every SHA-256 checked, the stages agree
    print(f"{args.folder}: {loaded.info.model_id} {loaded.info.version}, {stage} stage added ({args.dtype})")


if __name__ == "__main__":
    from XctDiffCore.errors import XctDiffError

    try:
        main()
    except XctDiffError as exc:
        raise SystemExit(f"error: {exc}") from None
