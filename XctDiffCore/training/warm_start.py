"""Fine-tuning from a model folder: ``xctdiff train STAGE --init MODEL`` (``run.init``).

The trained stage starts from the folder's weights instead of random ones (with a fresh optimiser
from step 0, so its warm-up applies again), which is how a researcher adapts the bundled model to
their own data. The earlier stages it builds on (and the style stage) are copied from the folder into
the run as checkpoints when the run has none, so that the run trains and exports like any other.
A copied checkpoint holds only weights: it is marked ``imported_from`` and cannot be resumed. The
coarse CT is added to a whole model, so for it all three stages are copied.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..config import Config, config_from_dict, config_to_dict, section_from_dict
from ..errors import XctDiffError
from .common import checkpoint_path, latents_record, save_checkpoint

EARLIER_STAGES = {"autoencoder": (), "encoder": ("autoencoder",), "diffusion": ("autoencoder", "encoder"),
                  "coarse": ("autoencoder", "encoder", "diffusion")}  # added to a whole model
STYLE_PREFIX = "generators.real_to_drr."  # the CycleGAN's key of the one generator a model folder ships


def warm_start(config: Config, stage: str, job) -> Optional[dict]:
    """Copy the earlier stages into the run; return the trained stage's starting weights.

    None without ``--init``, or when the folder is a partial one without this stage (e.g. an exported
    autoencoder alone): the stage then trains from random weights on the folder's earlier stages.
    """
    if not config.run.init:
        return None
    from ..model_folder import load_stages

    folder = Path(config.run.init)
    # checksums, settings and shapes verified; the earlier stages must be there, this one may not
    networks, settings, manifest = load_stages(folder, EARLIER_STAGES[stage] + (stage, "style"), EARLIER_STAGES[stage])
    data = manifest.get("data", {}) or {}
    sizes = (config.data.volume_size, config.data.xray_size)
    theirs = (int(data.get("volume_size", sizes[0])), int(data.get("xray_size", sizes[1])))
    if sizes != theirs:
        raise XctDiffError(
            f"{folder} works at {theirs[0]}^3 voxels and {theirs[1]} px radiographs, this config at "
            f"{sizes[0]}^3 and {sizes[1]} px: use the config the model was trained with (its stage JSON files hold the models)"
        )
    if stage in networks:
        _check_same_model(config, stage, settings[stage], folder)
    _check_copied_latents(folder, stage, networks, settings, manifest)
    if job.is_main:
        # the folder's encoder and diffusion learnt its autoencoder's latents: said in their copies, so that a run
        # with an autoencoder of its own refuses to build on them or to export them
        latents = latents_record(networks["autoencoder"], settings["autoencoder"].get("step"), folder) \
            if "autoencoder" in networks else None
        for earlier in EARLIER_STAGES[stage] + ("style",):
            path = checkpoint_path(config.run.dir, earlier)
            if earlier in networks and not path.exists():
                save_checkpoint(path, _imported_checkpoint(config, earlier, networks[earlier], settings[earlier], folder,
                                                           latents if earlier in ("encoder", "diffusion") else None))
    if job.enabled:
        torch.distributed.barrier()  # the other ranks read the copied stages next
    if stage not in networks:
        return None
    return {k: v.detach().clone() for k, v in networks[stage].state_dict().items()}


def _check_copied_latents(folder: Path, stage: str, networks: dict, settings: dict, manifest: dict) -> None:
    """The earlier stages copied into the run must have learnt the folder's autoencoder's latents (their JSON's
    record; ``retrain`` in the manifest says they did not): the trained stage would learn on a garbage prior."""
    from ..model_folder import check_same_latents

    earlier = [s for s in EARLIER_STAGES[stage] if s in networks and s != "autoencoder"]
    retrain = [s for s in earlier if s in (manifest.get("retrain") or [])]
    if retrain:
        raise XctDiffError(f"the {retrain[0]} stage of {folder} learnt another autoencoder's latents (retrain in its "
                           f"manifest): train it first (`xctdiff train {retrain[0]} --init {folder}` with the same --out)")
    check_same_latents(folder, networks, {s: settings[s] for s in earlier}, ())


def _check_same_model(config: Config, stage: str, folder_settings: dict, folder: Path) -> None:
    """The config must build the network the folder holds; for diffusion, with the same noise schedule."""
    section = getattr(config, stage)
    for key in ("model", "schedule") if stage == "diffusion" else ("model",):
        ours = config.coarse_model() if stage == "coarse" else getattr(section, key)
        theirs = config_to_dict(section_from_dict(type(ours), folder_settings.get(key, {}), f"{stage}.{key}"))  # defaults filled
        ours = config_to_dict(ours)
        differing = sorted(k for k in ours if ours[k] != theirs[k])
        if differing:
            raise XctDiffError(
                f"the config's {stage}.{key} differs from the one in {folder} ({', '.join(differing)}): "
                "use the config the model was trained with"
            )


def _imported_checkpoint(config: Config, stage: str, network, folder_settings: dict, folder: Path,
                         latents: Optional[dict] = None) -> dict:
    """A weights-only checkpoint of a folder's stage, with the run's config carrying that stage's model
    (``latents``: the folder's autoencoder's record, for a stage that learnt its latents)."""
    data = config_to_dict(config)
    if stage == "diffusion":
        data[stage]["schedule"] = folder_settings.get("schedule", data[stage]["schedule"])
        data[stage]["optim"]["val_sample_steps"] = folder_settings.get("steps", data[stage]["optim"]["val_sample_steps"])
    data[stage]["model"] = folder_settings["model"]
    data["run"]["init"] = ""  # copied, not fine-tuned: its export must read as the folder's own stage
    config_from_dict(data)  # the folder's settings must make a valid config
    state = network.state_dict()
    key = {"autoencoder": "vqgan", "encoder": "encoder", "diffusion": "ema", "style": "cyclegan"}[stage]
    if stage == "style":
        state = {STYLE_PREFIX + k: v for k, v in state.items()}
    elif stage == "diffusion":  # a folder ships the average the UNet samples with: an EMA's state
        state = {**{"module." + k: v for k, v in state.items()}, "num_updates": torch.zeros((), dtype=torch.long)}
    return {
        "stage": stage,
        "step": int(folder_settings.get("step", 0)),
        "config": data,
        "models": {key: state},
        "imported_from": str(folder.resolve()),
        **({"latents": latents} if latents else {}),
    }
