"""Training of the XctDiff stages, one short loop each, in order:

1. ``autoencoder`` (:mod:`.autoencoder`): the VQ-GAN with its 3D volume and 2D slice discriminators;
2. ``encoder`` (:mod:`.encoder`): the progressive encoder, radiograph -> latent, against the frozen VQ-GAN;
3. ``diffusion`` (:mod:`.diffusion`): the latent UNet, conditioned on the encoder's prior;
4. optional: ``coarse`` (:mod:`.coarse`), the CT at the latent grid learnt in HU, which the direct
   path blends in, and ``style`` (:mod:`.style`), the real film -> DRR CycleGAN.

Each stage reads the earlier ones from the same run folder (``<run>/<stage>/checkpoint.pt``).
:func:`train` is what ``xctdiff train`` calls; :mod:`.common` holds the shared machinery and the
export to a model folder (:func:`~XctDiffCore.model_folder.export_stage`, :func:`~XctDiffCore.model_folder.write_manifest`).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

from ..config import STAGES, Config, config_from_dict
from ..errors import XctDiffError, first_line


def with_overrides(config: Config, stage: str, data=None, out=None, max_steps: Optional[int] = None, init=None) -> Config:
    """The config with the command line's ``--data``, ``--out``, ``--max-steps`` and ``--init`` applied."""
    if init is not None:
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, init=str(init)))
    if data is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, datalist=str(data)))
    if out is not None:
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(out)))
    if max_steps is not None:
        if max_steps < 1:
            raise XctDiffError(f"--max-steps must be at least 1, got {max_steps}")
        section = getattr(config, stage)
        optim = dataclasses.replace(section.optim, max_steps=max_steps)
        config = dataclasses.replace(config, **{stage: dataclasses.replace(section, optim=optim)})
    if not config.data.datalist:
        raise XctDiffError("no datalist: pass --data DATALIST (from `xctdiff prepare`) or set data.datalist")
    return config


def check_training_datalist(path, ct: bool = True) -> None:
    """Refuse a datalist without training pairs, or naming files that are not there, before the run
    folder is touched (``ct``: the stage reads the CTs too, not only the DRRs)."""
    from ..datalist import read_datalist

    items = read_datalist(path, "training")
    if not items:
        raise XctDiffError(f"{path} has no training entries (make one with `xctdiff prepare`)")
    missing = [f for item in items for f in ((item["image"], item["xray"]) if ct else (item["xray"],)) if not f.is_file()]
    if missing:
        raise XctDiffError(f"{path} names {len(missing)} file(s) that do not exist, e.g. {missing[0]}")


def train(stage: str, config: Config, data=None, out=None, resume: bool = False, max_steps: Optional[int] = None,
          init=None, time_limit: Optional[float] = None) -> Path:
    """Train one stage to its ``max_steps``; returns the stage's checkpoint path.

    ``init``: a model folder to fine-tune from (:mod:`.warm_start`) instead of random weights.
    ``time_limit``: minutes after which the stage checkpoints and stops early (resume to continue).
    """
    if stage not in STAGES:
        raise XctDiffError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    config = with_overrides(config, stage, data=data, out=out, max_steps=max_steps, init=init)
    check_training_datalist(config.data.datalist, ct=stage != "style")
    if stage == "style" and config.run.init:
        raise XctDiffError("--init does not apply to the style stage: a model folder ships only its real -> DRR generator")
    if stage == "autoencoder":
        from .autoencoder import train_autoencoder as run
    elif stage == "encoder":
        from .encoder import train_encoder as run
    elif stage == "style":
        from .style import train_style as run
    elif stage == "coarse":
        from .coarse import train_coarse as run
    else:
        from .diffusion import train_diffusion as run
    import contextlib

    from .common import (Deadline, Progress, StoppedBeforeTraining, checkpoint_path, checkpoint_step, cleanup_distributed,
                         setup_distributed, stage_lock)

    job = setup_distributed()  # one process, or this rank of a torchrun job
    run_dir = Path(config.run.dir)
    new_folders = [folder for folder in (run_dir, run_dir / stage) if not folder.exists()]
    finished, ours, deadline = False, False, None  # ours: this job holds the stage folder (a refused second job removes nothing)
    stopped_before = None  # stopped in the variant bank, before the first step: the variants made are kept
    try:
        with stage_lock(run_dir, stage) if job.is_main else contextlib.nullcontext():
            ours = True
            deadline = Deadline(time_limit, job, f"the {stage} stage")
            try:
                path = run(config, resume, job, deadline)
            except StoppedBeforeTraining as stop:
                stopped_before, path = stop, checkpoint_path(run_dir, stage)
        if stopped_before is not None and job.is_main and not path.is_file():
            _remove_unfinished(new_folders[-1:])  # an empty stage folder; the run's (holding what was made) is kept
        finished = True
    except BaseException as exc:
        Progress.close_open()  # the error line below the bar, not on it
        kept = checkpoint_path(run_dir, stage)
        if job.is_main and ours and not kept.is_file():  # a new run folder holding variants made stays for the next try
            _remove_unfinished(new_folders[-1:] if _holds_made_variants(run_dir) else new_folders)
        if job.world_size > 1 and _is_peer_failure(exc):
            raise XctDiffError(f"rank {job.rank}: another process of the job stopped (its error is above)") from None
        if isinstance(exc, KeyboardInterrupt) and job.is_main and ours and not kept.is_file() and deadline is not None \
                and deadline.kept:
            # before the first step, the variants made (minutes) were kept without a word
            raise KeyboardInterrupt(f"before the first step; {deadline.kept}: the same command (with --resume or "
                                    "without) loads them instead of making them again") from None
        if isinstance(exc, KeyboardInterrupt) and job.is_main and ours and kept.is_file():
            # a second Ctrl-C (or one during the first step) does not checkpoint: say what survives
            step = checkpoint_step(run_dir, stage)
            raise KeyboardInterrupt(f"{kept}{'' if step is None else f' (step {step})'} is kept: the same command "
                                    "with --resume continues from it") from None
        raise
    finally:
        if deadline is not None:
            deadline.restore()
        cleanup_distributed(job, finished)
    if stopped_before is not None:  # a slot spent on the bank: exit as the step loop does when so stopped
        if stopped_before.cause == "Ctrl-C":
            raise KeyboardInterrupt(*([str(stopped_before)] if job.is_main else []))
        if job.is_main:
            print(stopped_before, file=sys.stderr, flush=True)
        return path
    step = checkpoint_step(run_dir, stage) if job.is_main else None
    if deadline.interrupted or deadline.ctrl_c:  # Ctrl-C: the stage checkpointed and stopped; exit as interrupted
        raise KeyboardInterrupt(*([f"{stage}: stopped at step {step} with a checkpoint, {path}: the same command with "
                                   "--resume continues from it"] if job.is_main else []))
    if job.is_main and not deadline.stopped_early:  # those said why they stopped
        print(f"{stage}: trained{'' if step is None else f' to step {step}'}; checkpoint {path}; "
              f"next: {next_step(stage, run_dir, config.run.init, config.autoencoder.decoder_only)}", file=sys.stderr,
              flush=True)
    return path


#: What ``train`` suggests after each stage (the README's order of the stages).
NEXT_STEP = {
    "autoencoder": "`xctdiff train encoder` with the same --config, --data and --out",
    "encoder": "`xctdiff train diffusion` (and, optionally, `coarse`) with the same --config, --data and --out",
    "diffusion": "`xctdiff train style` (optional), then `xctdiff export {run} --out MODEL`",
    "style": "`xctdiff export {run} --out MODEL` once the autoencoder, encoder and diffusion are trained",
    "coarse": "`xctdiff export {run} --out MODEL`",
}


def next_step(stage: str, run_dir, init: str, decoder_only: bool = False) -> str:
    """What ``train`` suggests after a stage; after a fine-tuned one (``--init``) the export, which completes the
    model with the folder's other stages (after an autoencoder only when its latents stayed the folder's)."""
    if init and (stage in ("encoder", "diffusion", "coarse") or stage == "autoencoder" and decoder_only):
        return (f"`xctdiff export {run_dir} --out MODEL` (the stages this run did not train are taken from {init} as "
                "they are)" + (", or fine-tune the diffusion stage too first (`xctdiff train diffusion --init "
                               f"{init}` with the same --config, --data and --out)" if stage == "encoder" else ""))
    return NEXT_STEP[stage].format(run=run_dir)


def _remove_unfinished(new_folders: list) -> None:
    """Take back the folders a failed run made when no checkpoint came of it (its log, its TensorBoard events,
    the stages ``--init`` copied in): a half-made run folder would refuse the next attempt. Folders that
    were there before are left as they are."""
    import shutil

    for folder in new_folders:  # the run folder first: it holds the stage's
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            return


def _holds_made_variants(run_dir: Path) -> bool:
    """Whether the run folder holds variants made before a stage's first step (the encoder's variant bank, the style
    stage's warped DRRs: minutes of work, whole files each), which the next attempt reuses."""
    from .style import DRRS_DIR
    from .variant_bank import BANK_DIR

    folders = [run_dir / name for name in (BANK_DIR, DRRS_DIR) if (run_dir / name).is_dir()]
    return any(".tmp" not in path.name for folder in folders for path in folder.rglob("*.pt"))


def _is_peer_failure(exc: BaseException) -> bool:
    """Whether a collective failed because another rank of the job stopped (gloo/NCCL lose the connection)."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(w in text for w in ("gloo", "nccl", "connection", "peer"))


def stage_parameter_counts(config: Config) -> dict:
    """Parameters of each deployed network of a config (built on the meta device: no memory, no time)."""
    import torch

    from ..models import count_parameters
    from .autoencoder import build_autoencoder, build_discriminators
    from .coarse import build_coarse
    from .diffusion import build_unet
    from .encoder import build_encoder
    from .style import build_cyclegan

    with torch.device("meta"):
        counts = {
            "autoencoder": count_parameters(build_autoencoder(config.autoencoder.model)),
            "encoder": count_parameters(build_encoder(config.encoder.model)),
            "diffusion": count_parameters(build_unet(config.diffusion.model)),
            "style": count_parameters(build_cyclegan(config.style)["generators"]["real_to_drr"]),
            "coarse": count_parameters(build_coarse(config)),
        }
        counts["discriminators (training only)"] = sum(
            count_parameters(d) for d in build_discriminators(config.autoencoder)
        )
    return counts


def parameter_table(configs: dict) -> str:
    """A text table: parameters and fp16 MiB per stage and in total, for each named config."""
    rows = [("config", "stage", "parameters", "fp16 MiB")]
    for name, config in configs.items():
        counts = stage_parameter_counts(config)
        deployed = 0
        for stage, n in counts.items():
            rows.append((name, stage, f"{n:,}", f"{n * 2 / 2**20:.1f}"))
            if stage in STAGES:
                deployed += n
        rows.append((name, "total (deployed stages)", f"{deployed:,}", f"{deployed * 2 / 2**20:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def model_folder_name(folder) -> str:
    """``"<id> <version>"`` from a model folder's manifest, what a reader can look up (a folder's own name,
    such as a scratch copy's, often says nothing); the folder's name when it has no readable manifest."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
        return f"{manifest['id']} {manifest['version']}"
    except (OSError, ValueError, KeyError, TypeError):
        return Path(folder).name


def stage_for_export(stage: str, checkpoint: dict):
    """The network a model folder ships for ``stage`` and its settings (the weights' average for the
    diffusion, and for the encoder when it kept one).

    The settings are what :func:`~XctDiffCore.model_folder.export_stage` writes beside the weights: the constructor
    arguments under ``"model"`` (``VQGAN(**settings["model"])`` etc.), the data sizes, the training
    step, for diffusion the noise schedule and the default sampler, for style the image size.
    """
    from ..model_folder import DEFAULT_SAMPLER, non_finite_tensor
    from .common import ema_weights

    config = config_from_dict(checkpoint["config"])
    settings = {
        "step": checkpoint["step"],
        "data": {"volume_size": config.data.volume_size, "xray_size": config.data.xray_size, "latent_size": config.latent_size()},
    }
    if config.run.init and _folder_has_stage(config.run.init, stage):  # fine-tuned: "step" counts the steps after the folder's own
        settings["fine_tuned_from"] = model_folder_name(config.run.init)
    if stage == "autoencoder":
        from .autoencoder import build_autoencoder, shipped_weights

        model, model_config, weights = build_autoencoder(config.autoencoder.model), config.autoencoder.model, shipped_weights(checkpoint["models"])
        if "ema" in checkpoint["models"]:  # autoencoder.optim.ema_decay: the manifest says the average ships
            settings["weights"] = "ema"
        if config.autoencoder.decoder_only:  # the encoder and codebook are the folder's: its latents hold
            settings["decoder_only"] = True
    elif stage == "encoder":
        from .encoder import build_encoder, shipped_weights

        model, model_config, weights = build_encoder(config.encoder.model), config.encoder.model, shipped_weights(checkpoint["models"])
        if "ema" in checkpoint["models"]:  # encoder.optim.ema_decay: the manifest says the average ships
            settings["weights"] = "ema"
    elif stage == "diffusion":
        from .diffusion import build_unet

        model, model_config = build_unet(config.diffusion.model), config.diffusion.model
        weights = ema_weights(checkpoint["models"]["ema"])
        settings["schedule"] = dataclasses.asdict(config.diffusion.schedule)
        settings["weights"] = "ema"
        settings["sampler"] = DEFAULT_SAMPLER
        settings["steps"] = config.diffusion.optim.val_sample_steps
    elif stage == "style":
        from .style import build_cyclegan

        model, model_config = build_cyclegan(config.style)["generators"]["real_to_drr"], config.style.model
        prefix = "generators.real_to_drr."
        weights = {k[len(prefix):]: v for k, v in checkpoint["models"]["cyclegan"].items() if k.startswith(prefix)}
        settings.update({"image_size": config.data.xray_size, "direction": "real_to_drr", "value_range": [-1.0, 1.0]})
    elif stage == "coarse":
        from .coarse import build_coarse, shipped_weights

        model, model_config, weights = build_coarse(config), config.coarse_model(), shipped_weights(checkpoint["models"])
        settings["blend"] = config.coarse.blend
        if "ema" in checkpoint["models"]:
            settings["weights"] = "ema"
    else:
        raise XctDiffError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    broken = non_finite_tensor(weights)
    if broken:  # a diverged run: its model would write all-NaN CTs
        raise XctDiffError(f"the {stage} checkpoint holds NaN or infinite weights ({broken}): its run diverged")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:  # a checkpoint of another stage or config under this stage's name
        raise XctDiffError(f"the {stage} checkpoint does not fit its own config: {first_line(exc)}") from None
    settings["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model_config).items()}
    return model.eval(), settings


def _folder_has_stage(folder, stage: str) -> bool:
    """Whether an ``--init`` folder held this stage (a partial one may not: the stage then trained from scratch)."""
    path = Path(folder) / "manifest.json"
    try:
        return stage in json.loads(path.read_text(encoding="utf-8")).get("stages", {})
    except (OSError, ValueError, AttributeError):
        return True  # the folder is gone: keep the record that the run started from it


def shareable_metrics(metrics: dict) -> dict:
    """The ``--metrics`` document as a model folder shares it: the absolute paths of the machine it was measured on
    (``xctdiff evaluate``'s ``command`` names the model and the datalist as ``/home/NAME/...``) shown relative to the
    folder they share, the project's (``--data data/lidc/datalist.json``, repeatable from there), or by their names
    where they share only the root. The options that made the figures stay as they were."""
    import os
    import shlex

    def words(key, text: str) -> list:
        if key != "command":
            return [text]
        try:
            return shlex.split(text)
        except ValueError:  # unbalanced quotes: not a command of ours
            return text.split()

    found = []

    def collect(key, text: str) -> str:
        found.extend(word for word in words(key, text) if os.path.isabs(word))
        return text

    _each_string(metrics, collect)
    if not found:
        return metrics
    base = os.path.commonpath([os.path.dirname(path) for path in found])
    shown = {path: os.path.relpath(path, base) if os.path.dirname(base) != base else os.path.basename(path) or path
             for path in found}

    def shareable(key, text: str) -> str:
        if key == "command":
            return shlex.join(shown.get(word, word) for word in words(key, text))
        return shown.get(text, text)

    return _each_string(metrics, shareable)


def _each_string(value, change, key=None):
    """``value`` (JSON) with each string replaced by ``change(key, string)``, ``key`` the name it is under."""
    if isinstance(value, dict):
        return {k: _each_string(v, change, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_each_string(v, change, key) for v in value]
    return change(key, value) if isinstance(value, str) else value


def export_run(run_dir, model_dir, dtype: str = "float16", model_id: str = "xctdiff", version: str = "0",
               model_card: str = "", datalist=None, metrics: Optional[dict] = None, method: Optional[str] = None,
               stages=None, min_consistency: Optional[float] = None) -> Path:
    """Export a trained run into a model folder (created); returns its ``manifest.json``.

    The three reconstruction stages are required; ``style`` and ``coarse`` are included when the run trained them.
    ``stages`` (e.g. ``("autoencoder",)``) exports only those: a partial folder that the later stages
    can be trained on (``--init``), e.g. to keep an autoencoder between two training sessions.
    The mean-CT baseline of ``xctdiff evaluate`` is the mean of the datalist's training CTs
    (``datalist``, else the one the diffusion stage trained on, when it is still there). The manifest
    records the training patients of that datalist, each stage's training steps and ``metrics``
    (e.g. the ``summary.json`` of ``xctdiff evaluate``, its machine's paths made relative: :func:`shareable_metrics`).
    ``method``: the pipeline's default path
    (``"direct"`` for a model whose diffusion stage measures worse than its encoder alone; None: ``"diffusion"``, or
    the folder's own for a diffusion stage taken from it).
    A run fine-tuned with ``--init MODEL`` ships the stages it did not train as that folder has them, byte for byte
    (one line each on stderr), checked like its own: an encoder or diffusion that learnt another autoencoder's
    latents than the one shipped is refused.
    ``min_consistency``: the model's reliability threshold (:func:`~XctDiffCore.plausibility.consistency_problems`),
    recorded in the manifest; None: its reconstructions are never flagged unreliable.
    """
    from ..model_folder import MANIFEST_NAME, OPTIONAL_STAGES, REQUIRED_STAGES, save_model_folder

    required = _check_export_arguments(run_dir, model_dir, stages, datalist, min_consistency)
    run = _run_stages(run_dir, required, stages)
    base = next((folder for folder in run.bases if (folder / MANIFEST_NAME).is_file()), None)
    copied = _stages_from_base(base, run_dir, required if stages else REQUIRED_STAGES + OPTIONAL_STAGES, run, method)
    _check_trained(run, run_dir, required, stages, base)
    _check_same_latents(run, run_dir, base, copied)
    _warn_unfinished(run.unfinished)
    _warn_training_now(run_dir, run.settings)
    if "diffusion" in run.settings and "diffusion" not in copied:
        run.settings["diffusion"]["method"] = method or "diffusion"
    training, mean_ct = _training_record(run, run_dir, datalist, stages, base if copied else None)
    another = _warn_metrics_of_another_model(metrics, model_id, version)
    extra = {"training": training, **({"metrics": shareable_metrics(metrics)} if metrics else {}),
             **({"min_consistency": float(min_consistency)} if min_consistency is not None else {})}
    save_model_folder(model_dir, run.networks, run.config, model_id, version, mean_ct=mean_ct, model_card=model_card,
                      dtype=dtype, settings=run.settings, extra=extra, required=required, copied=copied)
    for stage in copied:  # one line each: the folder ships stages this run did not train
        print(f"{stage}: taken unchanged from {base} ({model_folder_name(base)}): the run did not train it",
              file=sys.stderr, flush=True)
    if not another:  # the same id and version: were they these weights?
        _warn_metrics_of_other_weights(metrics, model_dir)
    return Path(model_dir) / MANIFEST_NAME


def _check_export_arguments(run_dir, model_dir, stages, datalist, min_consistency: Optional[float]) -> tuple:
    """Refuse what the command line got wrong, before any checkpoint is read; returns the stages required."""
    from ..model_folder import REQUIRED_STAGES

    if Path(model_dir).resolve() in {Path(run_dir).resolve(), *(Path(run_dir, s).resolve() for s in STAGES)}:
        raise XctDiffError(f"the model folder {model_dir} would be written into the run folder {run_dir}: choose another --out")
    if min_consistency is not None and not 0.0 <= min_consistency <= 1.0:  # NaN fails this too
        raise XctDiffError(f"--min-consistency must be an SSIM from 0 to 1, got {min_consistency:g}")
    required = tuple(stages) if stages else REQUIRED_STAGES
    unknown = sorted(set(required) - set(REQUIRED_STAGES))
    if unknown:
        raise XctDiffError(f"--stages takes {', '.join(REQUIRED_STAGES)}; got {', '.join(unknown)}")
    if datalist is not None and not Path(datalist).is_file():  # it was passed over without a word
        raise XctDiffError(f"--data: datalist not found: {datalist}")
    _check_run_folder(Path(run_dir))
    return required


def _check_run_folder(run_dir: Path) -> None:
    """``RUN`` must be the run folder of ``xctdiff train``: one of its stage folders, its checkpoint, a model folder
    or another file given in its place is named as such (a stage folder read as a run with no trained stage, 'train
    them first'; a file as a run folder not found)."""
    from ..model_manifest import MANIFEST_NAME
    from .common import CHECKPOINT_NAME

    if run_dir.is_file():
        above = f": its run folder is {run_dir.parent.parent}" if run_dir.name == CHECKPOINT_NAME else ""
        raise XctDiffError(f"{run_dir} is a file, not a run folder (the --out of `xctdiff train`){above}")
    if not run_dir.is_dir():
        raise XctDiffError(f"run folder not found: {run_dir} (the --out of `xctdiff train`)")
    if (run_dir / CHECKPOINT_NAME).is_file():
        raise XctDiffError(f"{run_dir} is a stage folder of a run ({run_dir.name}), not the run folder: give the folder "
                           f"above it, {run_dir.parent}")
    if (run_dir / MANIFEST_NAME).is_file():
        raise XctDiffError(f"{run_dir} is a model folder (exported already), not a run folder of `xctdiff train`: give "
                           f"the run it was exported from (`xctdiff inspect {run_dir}` says what the model is)")


@dataclasses.dataclass
class _RunStages:
    """What an export reads of a run's checkpoints (and, later, the ``--init`` folder's stages beside them)."""

    networks: dict = dataclasses.field(default_factory=dict)  # stage -> the network to ship
    settings: dict = dataclasses.field(default_factory=dict)  # stage -> its JSON (stage_for_export)
    learnt: dict = dataclasses.field(default_factory=dict)  # stage -> the latents record of the autoencoder it learnt
    unfinished: list = dataclasses.field(default_factory=list)  # (stage, words) of those stopped before max_steps
    bases: list = dataclasses.field(default_factory=list)  # the --init folders the run started from
    imported: set = dataclasses.field(default_factory=set)  # stages only copied in by --init
    config: Optional[Config] = None  # the last required stage's: it carries every earlier stage's model
    datalist_sha256: Optional[str] = None  # that stage's record of the datalist it trained on
    datalist_path: Optional[str] = None  # and where it was (absolute)


def _run_stages(run_dir, required: tuple, stages) -> _RunStages:
    """The run's trained stages: the ``required`` ones, and the optional ones it has unless ``stages`` names them."""
    from ..model_folder import OPTIONAL_STAGES, REQUIRED_STAGES
    from .common import checked_stage, checkpoint_path, load_checkpoint

    run = _RunStages()
    for stage in REQUIRED_STAGES + OPTIONAL_STAGES:
        path = checkpoint_path(run_dir, stage)
        if (stage not in required and (stages or not path.is_file())) or not path.exists():
            continue
        checkpoint = checked_stage(load_checkpoint(path, required=("config", "models", "step")), path, stage)
        run.networks[stage], run.settings[stage] = stage_for_export(stage, checkpoint)
        run.learnt[stage] = checkpoint.get("latents")  # the encoder's and diffusion's: the autoencoder they learnt
        max_steps = checkpoint["config"].get(stage, {}).get("optim", {}).get("max_steps")
        if "imported_from" in checkpoint:  # copied by --init: the folder's own files ship, where it is still there
            run.bases.insert(0, Path(checkpoint["imported_from"]))
            run.imported.add(stage)
        else:
            run.bases += [Path(checkpoint["config"]["run"]["init"])] if checkpoint["config"].get("run", {}).get("init") else []
            if isinstance(max_steps, int) and checkpoint["step"] < max_steps:
                run.unfinished.append((stage, f"the {stage} stage stopped at step {checkpoint['step']} of {max_steps}"))
        if stage in required or run.config is None:
            run.config = config_from_dict(checkpoint["config"])
            run.datalist_sha256, run.datalist_path = checkpoint.get("datalist_sha256"), checkpoint.get("datalist_path")
    return run


def _check_trained(run: _RunStages, run_dir, required: tuple, stages, base: Optional[Path]) -> None:
    """Every required stage is there, from the run or its ``--init`` folder; else what to train, or how to keep what
    there is, not only which file is missing."""
    from ..model_folder import REQUIRED_STAGES
    from .common import checkpoint_path

    untrained = [stage for stage in required if stage not in run.networks]
    if not untrained:
        return
    trained = [stage for stage in REQUIRED_STAGES if stage in run.networks]
    keep = f", or keep what it has with --stages {' '.join(trained)}" if trained and not stages else ""
    names = " or ".join(filter(None, (", ".join(untrained[:-1]), untrained[-1])))
    gone = f" (it was fine-tuned from {run.bases[0]}, which is not there any more)" if run.bases and base is None else ""
    holder = _lock_holder(Path(run_dir, untrained[0]))
    if holder:  # `train` runs and has written no checkpoint yet
        raise XctDiffError(f"{run_dir} has no {untrained[0]} checkpoint yet: the stage is being trained now ({holder}); "
                           "export when it has written one (the training says where), or after it")
    raise XctDiffError(f"{run_dir} has no trained {names} stage (no {checkpoint_path(run_dir, untrained[0])}){gone}: "
                       f"train {'it first' if len(untrained) == 1 else 'them first, in that order'} "
                       f"(`xctdiff train {untrained[0]} ... --out {run_dir}`){keep}")


def _check_same_latents(run: _RunStages, run_dir, base: Optional[Path], copied: dict) -> None:
    """Refuse stages that learnt another autoencoder's latents than the one shipped: their model reconstructs noise."""
    from .common import latents_changed, latents_record

    if "autoencoder" not in run.networks:
        return
    current = latents_record(run.networks["autoencoder"], run.settings["autoencoder"].get("step"))
    stale = [stage for stage in run.networks if latents_changed(f"the {stage} stage", run.learnt.get(stage), current)]
    if stale:
        words = f"the {' and '.join(stale)} stage{'s' if len(stale) > 1 else ''}"
        again = (f" on it (`xctdiff train {stale[0]} --init {base} ... --out {run_dir}`)" if stale[0] in copied
                 else f" again on it (`xctdiff train {stale[0]} ... --resume` goes on from the old weights)")
        raise XctDiffError(f"{latents_changed(words, run.learnt[stale[0]], current)}: train {'them' if len(stale) > 1 else 'it'}"
                           f"{again}, then export")


def _warn_unfinished(unfinished: list) -> None:
    """A Ctrl-C, --time-limit or SIGTERM left a stage short: the model would ship it without a word."""
    if unfinished:
        import warnings

        names = "|".join(stage for stage, _ in unfinished)
        warnings.warn(f"{'; '.join(words for _, words in unfinished)} (interrupted, or --time-limit): exported as it is; "
                      f"`xctdiff train {names} ... --resume` finishes it, then export again",
                      stacklevel=3)


def _warn_training_now(run_dir, settings: dict) -> None:
    """A stage that ``xctdiff train`` trains as the export runs (its lock is held) ships its last checkpoint, which
    the training replaces later: say so (the checkpoint's own step count said nothing of it)."""
    busy = {stage: holder for stage in settings if (holder := _lock_holder(Path(run_dir, stage)))}
    if busy:
        import warnings

        several = len(busy) > 1
        steps = ", ".join(f"{name + ' ' if several else ''}step {settings[name].get('step')}" for name in busy)
        warnings.warn(f"the {' and '.join(busy)} stage{'s are' if several else ' is'} being trained now "
                      f"({next(iter(busy.values()))}): {'their' if several else 'its'} last checkpoint{'s' * several} "
                      f"({steps}) {'are' if several else 'is'} exported; export again when the training has ended",
                      stacklevel=3)


def _warn_metrics_of_another_model(metrics, model_id: str, version: str) -> bool:
    """``--metrics`` of an evaluation of another model (its summary names the model it measured: an earlier version,
    the bundled model) would be shared as this model's figures: say so (and return True)."""
    if not isinstance(metrics, dict) or "model" not in metrics:
        return False
    measured = (str(metrics["model"]), str(metrics.get("version", version)))
    if measured != (str(model_id), str(version)):
        import warnings

        warnings.warn(f"the --metrics figures measured the model {' '.join(measured)}, not this export ({model_id} "
                      f"{version}): they are recorded as this model's; evaluate this model and export again with its "
                      "summary.json, or give the --id and --version of the model they measured", stacklevel=3)
        return True
    return False


def _warn_metrics_of_other_weights(metrics, model_dir) -> None:
    """``--metrics`` of an evaluation of other weights under the same id and version (the run trained on after its
    export was evaluated) would be shared as this model's figures: say so. The summary's ``weights``
    (:func:`~XctDiffCore.evaluation.reconstructions.measured_weights`) are compared with the exported folder's,
    rounded to float16 as export casts them: an evaluation of a float32 export of these weights holds for the float16
    one. A summary that records none (made before evaluate recorded them, or evaluate-autoencoder's) is not judged."""
    if not isinstance(metrics, dict) or not isinstance(metrics.get("weights"), dict):
        return
    from ..evaluation.reconstructions import measured_weights

    shipped = measured_weights(model_dir)
    differ = [stage for stage, record in metrics["weights"].items() if stage in shipped and isinstance(record, dict)
              and record.get("float16_sha256") != shipped[stage]["float16_sha256"]]
    if differ:
        import warnings

        warnings.warn(f"the --metrics figures measured other weights than this export ships ({', '.join(differ)} "
                      f"differ{'s' * (len(differ) == 1)}: the run trained on after the evaluation, or another run's): "
                      "they are recorded as this model's; evaluate this export and export again with its summary.json",
                      stacklevel=3)


def _lock_holder(folder: Path) -> Optional[str]:
    """Who holds ``folder``'s lock (:func:`~XctDiffCore.atomic.output_lock`: a job writing it runs now), as its lock
    file says (``pid N on HOST, since ...``), or None: no lock, a lock file a finished or killed job left, no locks
    on this system."""
    import os

    from ..atomic import LOCK_NAME

    try:
        import fcntl

        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a moment: let go at once (closed) below
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").partition("\n")[0].strip() or "another process"
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def _training_record(run: _RunStages, run_dir, datalist, stages, base: Optional[Path]) -> tuple:
    """``(training, mean_ct)``: what the manifest records of the training (each stage's steps, the ``--init``
    folder ``base`` the stages the run did not train come from, the patients trained and validated on) and the
    mean training CT (the evaluation's baseline) of a model that reconstructs; both from ``datalist``, else the
    run's, where training read it (:func:`~XctDiffCore.datalist.find_run_datalist`: from whatever folder the export
    runs in)."""
    from ..datalist import find_run_datalist, read_datalist
    from ..evaluation.reconstructions import datalist_mean_ct

    if datalist is None:
        recorded = run.config.data.datalist
        datalist, why = find_run_datalist(run_dir, run.config.run.dir, recorded, run.datalist_sha256, run.datalist_path)
        if why:
            import warnings

            warnings.warn(f"the run trained on {recorded}, and {why}: the model folder gets no mean training CT (the "
                          "evaluation's baseline) and names no training patients; give the datalist with --data",
                          stacklevel=3)
    datalist = Path(datalist) if datalist else None
    training = {"steps": {stage: s["step"] for stage, s in run.settings.items() if s.get("step") is not None}}
    if base is not None:  # what the run did not train is the folder's
        training["fine_tuned_from"] = model_folder_name(base)
    mean_ct = None
    if datalist is not None and datalist.is_file():
        read_datalist(datalist, "training")  # one line for a file that is none
        if not stages:  # the mean-CT baseline belongs to a model that reconstructs
            mean_ct = datalist_mean_ct(datalist, run.config.data.volume_size)
        entries = json.loads(datalist.read_text(encoding="utf-8"))
        for section in ("training", "validation"):
            training[f"{section}_patients"] = sorted({str(e.get("patient", "")) for e in entries.get(section, [])} - {""})
        # a model retrained on every patient after its recipe was chosen says so: its validation scores are fit
        training["validation_seen_in_training"] = bool(
            set(training["training_patients"]) & set(training["validation_patients"]))
    return training, mean_ct


def _stages_from_base(base: Optional[Path], run_dir, wanted, run: _RunStages, method: Optional[str]) -> dict:
    """The stages of the ``--init`` folder ``base`` that the run did not train (absent, or only copied in by
    ``--init``), byte for byte (:func:`~XctDiffCore.model_folder.stage_files`); ``run``'s networks, settings and
    learnt latents get theirs, so that the export checks them as the run's own. A copied diffusion stage keeps the
    folder's default path unless ``method`` names one."""
    from ..model_folder import LATENT_STAGES, check_same_latents, load_stages, stage_files
    from .common import latents_record

    if base is None:
        return {}
    taken = [stage for stage in wanted if stage not in run.networks or stage in run.imported]
    copied = stage_files(base, taken)  # checksums verified
    if not copied:
        return {}
    folder_networks, folder_settings, manifest = load_stages(base, dict.fromkeys(("autoencoder", *copied)), required=())
    retrain = [stage for stage in (manifest.get("retrain") or []) if stage in copied]
    if retrain:  # Testing/Scripts/add_stage.py --new-autoencoder: the folder's stage learnt other latents
        raise XctDiffError(f"the {retrain[0]} stage of {base} learnt another autoencoder's latents (retrain in its "
                           f"manifest): train it in this run first (`xctdiff train {retrain[0]} --init {base} ... "
                           f"--out {run_dir}`), then export")
    check_same_latents(base, folder_networks, folder_settings, ())
    for stage in copied:
        run.networks[stage], run.settings[stage] = folder_networks[stage], folder_settings[stage]
        if stage in LATENT_STAGES and "autoencoder" in folder_networks:  # the folder's own autoencoder's latents
            run.learnt[stage] = latents_record(folder_networks["autoencoder"], folder_settings["autoencoder"].get("step"), base)
    if "diffusion" in copied and method is not None and folder_settings["diffusion"].get("method", "diffusion") != method:
        document = json.loads(copied["diffusion"]["config"])  # the weights stay byte for byte, the default path changes
        document["method"] = method
        copied["diffusion"]["config"] = (json.dumps(document, indent=2) + "\n").encode("utf-8")
        run.settings["diffusion"] = {**run.settings["diffusion"], "method": method}
    return copied
