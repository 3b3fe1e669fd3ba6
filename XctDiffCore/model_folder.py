"""A model folder: what the pipeline loads, verified before a single weight is used.

Layout (written by :func:`save_model_folder`, one :func:`export_stage` per stage and :func:`write_manifest`
last; training imports these, never the other way round)::

    <folder>/manifest.json          id, version, data geometry, per-stage files and settings, SHA-256 of every file
    <folder>/autoencoder.safetensors + autoencoder.json   VQGAN constructor arguments under "model"
    <folder>/encoder.safetensors     + encoder.json       ProgressiveEncoder arguments under "model", "latents"
    <folder>/diffusion.safetensors   + diffusion.json     LatentUNet arguments, "schedule", default "sampler" and "steps", "latents"
    <folder>/style.safetensors       + style.json         optional: the real -> DRR generator (stage_configs' "style")
    <folder>/coarse.safetensors      + coarse.json        optional: the coarse CT (CoarseCT arguments, "blend")
    <folder>/mean_ct.npy                                  optional: mean training CT in HU (the evaluation baseline)
    <folder>/MODEL_CARD.md

``manifest.json`` may carry ``"data": {"volume_size", "xray_size", "spacing_mm", "geometry"}``; where
it does not, the sizes come from the networks and the spacing from the field of view every prepared
CT has (128 voxels x 2.5 mm = 320 mm, average-pooled to ``volume_size``).

The manifest itself is read and checked in :mod:`XctDiffCore.model_manifest` (torch-free: the Slicer panel checks
a chosen folder with it). :func:`load_model_folder` refuses, with one sentence each: a missing manifest or file, a file whose
SHA-256 differs from the manifest (corrupted, truncated or edited), manifest settings that differ
from the stage files, weights that do not fit their configuration, stages that disagree on the
latent's shape, an encoder or diffusion stage whose ``latents`` record names another autoencoder than the folder's
(:func:`check_same_latents`: stages of two models), and a file that leads out of the folder (``..``, an absolute name,
a link). Each file
is read once: its bytes are hashed and those same bytes deserialised, so a file changed between the
check and the use is never loaded. :func:`create_random_model` makes a valid folder with random weights from a config
(tests, benchmarks of untrained sizes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch
from torch import nn

from .atomic import file_sha256
from .config import METHODS
from .errors import XctDiffError
from .model_manifest import (MANIFEST_NAME, MEAN_CT_NAME, MODEL_CARD_NAME, MODEL_FORMAT, OPTIONAL_STAGES,  # noqa: F401
                             REQUIRED_STAGES, as_model_folder, manifest_data, model_file, model_files_in, read_manifest,
                             retrain_stages, verify_checksums)

PREPARED_SIZE = 128  # `xctdiff prepare` writes 128^3 CTs at 2.5 mm and 128^2 DRRs
PREPARED_SPACING_MM = 2.5
FIELD_OF_VIEW_MM = PREPARED_SIZE * PREPARED_SPACING_MM
DEFAULT_SAMPLER = "ddim"
DEFAULT_STEPS = 50
BUNDLED_MODELS_DIR = Path("Resources") / "Models"


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about a model besides its weights."""

    model_id: str
    version: str
    folder: Path
    volume_size: int  # output CT edge in voxels
    xray_size: int  # model input edge in pixels
    spacing_mm: float  # output voxel size (isotropic)
    geometry: str  # DRR geometry of the training pairs ("cone" or "parallel")
    sampler: str  # default sampler of the diffusion stage
    steps: int  # default number of sampler steps
    method: str = "diffusion"  # default reconstruction path: "diffusion", or "direct" (encoder -> decoder)
    # a result whose consistency is below is flagged unreliable; measured for this model on real films, DRRs and
    # photographs (Testing/Scripts/consistency_survey.py), in the manifest; None: not calibrated, nothing flagged
    min_consistency: Optional[float] = None
    # stages whose weights learnt another autoencoder's latents (``retrain`` in the manifest, written by
    # Testing/Scripts/add_stage.py --new-autoencoder): starting points for training, not for reconstructing
    retrain: tuple = ()


@dataclass
class ModelFolder:
    """The loaded, verified networks of one model folder (CPU, eval mode, no gradients)."""

    info: ModelInfo
    vqgan: nn.Module
    encoder: nn.Module
    unet: nn.Module
    schedule: object  # XctDiffCore.diffusion.NoiseSchedule
    style: Optional[nn.Module]
    mean_ct: Optional[np.ndarray]  # [z, y, x] HU at volume_size^3, when the folder has one
    settings: dict = field(default_factory=dict)  # each stage's JSON (model, schedule, step, ...)
    coarse: Optional[nn.Module] = None  # the coarse CT the direct path blends in (settings["coarse"]["blend"])


# ------------------------------------------------------------------------------------------ reading


def _min_consistency(folder: Path, manifest: dict) -> Optional[float]:
    value = manifest.get("min_consistency")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise XctDiffError(f"{folder / MANIFEST_NAME}: min_consistency must be a number from 0 to 1, got {value!r}")
    return float(value)


def bundled_model_folder() -> Path:
    """The default model shipped in ``Resources/Models/<id>/`` (repository or installed package)."""
    package = Path(__file__).resolve().parent
    folders = []
    for root in (package.parent, package):
        base = root / BUNDLED_MODELS_DIR
        if base.is_dir():
            folders += sorted(p.parent for p in base.glob(f"*/{MANIFEST_NAME}"))
    if not folders:
        raise XctDiffError(f"no bundled model found beside the engine ({package}): an install that is not editable "
                           "(`pip install .`) copies the engine without the repository's Resources/Models; install "
                           "with `pip install -e .` in the repository, or give --model DIR (a model folder)")
    if len(folders) > 1:
        names = ", ".join(p.name for p in folders)
        raise XctDiffError(f"several bundled models ({names}): choose one with --model DIR")
    return folders[0]


def _refuse_a_bundled_models_name(folder: Path) -> None:
    """``from_pretrained("xctdiff-cpu")`` (a model hub's habit) or ``--model xctdiff-cpu`` away from its folder: a
    bare name that is no folder here but the bundled model's is pointed to it, not only 'not found'."""
    if folder.exists() or len(folder.parts) != 1:
        return
    try:
        bundled = bundled_model_folder()
    except XctDiffError:
        return
    if folder.name == bundled.name:
        raise XctDiffError(f"model folder not found: {folder}; {folder.name} is the bundled model: leave out the model "
                           f"(from_pretrained(), no --model) or give its folder {bundled}")


def _stage_settings(folder: Path, manifest: dict, stage: str, contents: dict) -> dict:
    """A stage's JSON (constructor arguments under ``model``; schedule, step, ...), checked against the manifest.

    ``contents``: the verified bytes of :func:`verify_checksums`."""
    record = manifest["stages"][stage]
    path = folder / record["config"]
    try:
        settings = json.loads(contents[record["config"]].decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XctDiffError(f"cannot read {path}: {exc}") from None
    if "settings" in record and record["settings"] != settings:
        raise XctDiffError(f"{MANIFEST_NAME} and {path.name} disagree on the {stage} settings in {folder}")
    if not isinstance(settings.get("model"), dict):
        raise XctDiffError(f"{path} has no 'model' section (the network's constructor arguments)")
    return settings


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines else type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _build(stage: str, cls, settings: dict, folder: Path) -> nn.Module:
    try:
        return cls(**settings["model"])
    except (TypeError, ValueError) as exc:
        raise XctDiffError(f"the {stage} configuration in {folder} does not fit {cls.__name__}: {_first_line(exc)}") from None


#: The precision of a latents record (:func:`latents_record`): a checkpoint's is exact; a model folder's encoder.json
#: and diffusion.json round the weights to float16 first, the same whether the folder ships float16 or float32
CHECKPOINT_LATENTS_DTYPE = torch.float32
FOLDER_LATENTS_DTYPE = torch.float16


def state_digest(state: dict) -> str:
    """SHA-256 over the tensors (names sorted; name, dtype, shape and bytes of each).

    Pins what a weights file holds rather than its bytes: safetensors serialises its metadata map in
    an order that changes from process to process, so two writes of the same tensors can differ. (LPIPS's pinned
    weights; which weights an evaluation measured.)"""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _latents_fingerprint(vqgan: nn.Module, dtype: torch.dtype = CHECKPOINT_LATENTS_DTYPE) -> str:
    """A digest of what makes a VQ-GAN's latents: its encoder and codebook (a decoder trained on alone keeps it),
    the floating weights rounded to ``dtype`` first."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vqgan.state_dict().items()):
        if name.startswith(("encoder.", "quantizer.")):
            tensor = tensor.detach().cpu()
            tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor.float()
            digest.update(name.encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def latents_record(vqgan: nn.Module, step: Optional[int], folder=None, *,
                   dtype: torch.dtype = CHECKPOINT_LATENTS_DTYPE) -> dict:
    """What an encoder or diffusion stage records (``"latents"``) of the autoencoder whose latents it learnt: an
    autoencoder trained further (``train autoencoder --resume``), replaced, or another model's makes other latents,
    and a model of theirs would reconstruct noise (:func:`other_latents`).

    ``dtype``: :data:`CHECKPOINT_LATENTS_DTYPE` in a checkpoint, :data:`FOLDER_LATENTS_DTYPE` in a model folder
    (a record survives the export's cast only there); two records compare in the same one. ``folder``: the model
    folder the autoencoder came from (``--init``), for the words of a refusal."""
    return {"fingerprint": _latents_fingerprint(vqgan, dtype), "autoencoder_step": step,
            **({"folder": str(folder)} if folder is not None else {})}


def other_latents(recorded, current: dict) -> bool:
    """Whether a stage's latents record names another autoencoder than ``current`` (the record, in the same dtype, of
    the autoencoder it is to run with); a stage that recorded none (made before the record) is not judged."""
    return isinstance(recorded, dict) and recorded.get("fingerprint") not in (None, current["fingerprint"])


LATENT_STAGES = ("encoder", "diffusion")  # the stages that learnt the autoencoder's latents


def check_same_latents(folder: Path, networks: dict, settings: dict, retrain: tuple) -> None:
    """The encoder and diffusion must have learnt this folder's autoencoder's latents (as their JSON records them;
    a folder exported before the record, or a stage listed under ``retrain``, is not judged)."""
    recorded = {stage: settings[stage].get("latents") for stage in LATENT_STAGES if stage in settings and stage not in retrain}
    if "autoencoder" not in networks or not any(isinstance(record, dict) for record in recorded.values()):
        return
    ours = latents_record(networks["autoencoder"], None, dtype=FOLDER_LATENTS_DTYPE)
    stale = [stage for stage, record in recorded.items() if other_latents(record, ours)]
    if stale:
        names = " and ".join(stale)
        raise XctDiffError(f"the {names} in {folder} learnt the latents of another autoencoder than the folder's "
                           f"({stale[0]}.json records autoencoder {recorded[stale[0]].get('fingerprint')}, the folder's is "
                           f"{ours['fingerprint']}): the folder mixes two models' stages; put back the autoencoder they "
                           "were exported with, or export the model again from one run (xctdiff export)")


def non_finite_tensor(tensors: dict, prefix: str = "") -> Optional[str]:
    """The name of the first floating tensor of a (nested) state dict holding NaN or Inf, or None: weights of a
    diverged run, found when they load, export or are checkpointed."""
    for name, value in tensors.items():
        if isinstance(value, dict):
            found = non_finite_tensor(value, f"{prefix}{name}.")
            if found:
                return found
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{prefix}{name}"
    return None


def _load_weights(network: nn.Module, stage: str, path: Path, data: bytes) -> nn.Module:
    """``network`` with the weights deserialised from ``data``: the verified bytes of the file ``path``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state = load(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise XctDiffError(f"cannot read the {stage} weights {path}: {_first_line(exc)}") from None
    broken = non_finite_tensor(state)
    if broken is not None:  # a diverged run exported as it was: it would write a CT of zeros, without a word
        raise XctDiffError(f"the {stage} weights in {path} hold NaN or infinite values ({broken}): "
                           "the training run that made them diverged")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise XctDiffError(
            f"the {stage} weights in {path} do not match its configuration ({_first_line(exc)})"
        ) from None
    return network.float().eval().requires_grad_(False)


def _stage_classes() -> dict:
    from .models.coarse import CoarseCT
    from .models.cyclegan import ResnetGenerator
    from .models.progressive_encoder import ProgressiveEncoder
    from .models.unet import LatentUNet
    from .models.vqgan import VQGAN

    return {"autoencoder": VQGAN, "encoder": ProgressiveEncoder, "diffusion": LatentUNet, "style": ResnetGenerator,
            "coarse": CoarseCT}


def load_stages(folder, stages, required=REQUIRED_STAGES) -> tuple:
    """``(networks, settings, manifest)`` for those of ``stages`` the folder holds, checksums verified.

    ``required``: the stages the folder must have (a partial folder, e.g. an autoencoder exported
    before the later stages were trained, is enough for the stages built on it).
    """
    networks, settings, manifest, _ = _load_verified_stages(folder, stages, required)
    return networks, settings, manifest


def _load_verified_stages(folder, stages, required) -> tuple:
    """:func:`load_stages` plus the verified bytes of the folder's other files (the mean CT, ...)."""
    folder = Path(folder)
    manifest = read_manifest(folder, required=required)
    contents = verify_checksums(folder, manifest)
    classes = _stage_classes()
    networks, settings = {}, {}
    for stage in stages:
        if stage not in manifest["stages"]:
            continue
        settings[stage] = _stage_settings(folder, manifest, stage, contents)
        network = _build(stage, classes[stage], settings[stage], folder)
        weights = manifest["stages"][stage]["weights"]
        data = contents.pop(weights, None)  # freed once loaded
        if data is None:
            raise XctDiffError(f"{folder / MANIFEST_NAME}: stage {stage} names the weights {weights} of another stage")
        networks[stage] = _load_weights(network, stage, folder / weights, data)
    return networks, settings, manifest, contents


def stage_files(folder, stages) -> dict:
    """The verified bytes of those of ``stages`` a (possibly partial) model folder holds, to copy them into another
    folder unchanged: ``{stage: {"weights": bytes, "config": bytes}}``."""
    folder = Path(folder)
    manifest = read_manifest(folder, required=())
    contents = verify_checksums(folder, manifest)
    return {stage: {role: contents[manifest["stages"][stage][role]] for role in ("weights", "config")}
            for stage in stages if stage in manifest["stages"]}


def load_autoencoder(folder) -> tuple:
    """The verified VQ-GAN of a (possibly partial) model folder and the CT edge it works at: ``(vqgan, volume_size)``."""
    networks, _, manifest = load_stages(folder, ("autoencoder",), required=("autoencoder",))
    data = manifest_data(folder, manifest)
    return networks["autoencoder"], int(data.get("volume_size", PREPARED_SIZE))


def load_model_folder(folder) -> ModelFolder:
    """Verify a model folder (checksums, settings, shapes) and build its networks on the CPU."""
    from .diffusion import SAMPLERS, NoiseSchedule
    from .drr import GEOMETRIES

    folder = as_model_folder(folder)
    _refuse_a_bundled_models_name(folder)
    networks, settings, manifest, contents = _load_verified_stages(folder, REQUIRED_STAGES + OPTIONAL_STAGES, REQUIRED_STAGES)

    diffusion = settings["diffusion"]
    try:
        schedule = NoiseSchedule(**diffusion.get("schedule", {}))
    except (TypeError, ValueError) as exc:
        raise XctDiffError(f"the diffusion schedule in {folder} is invalid: {_first_line(exc)}") from None
    data = manifest_data(folder, manifest)
    vqgan, encoder = networks["autoencoder"], networks["encoder"]
    volume_size = int(data.get("volume_size", encoder.depth * vqgan.downsample_factor))
    info = ModelInfo(
        model_id=str(manifest.get("id", folder.name)),
        version=str(manifest.get("version", "")),
        folder=folder.resolve(),
        volume_size=volume_size,
        xray_size=int(data.get("xray_size", encoder.image_size)),
        spacing_mm=float(data.get("spacing_mm", FIELD_OF_VIEW_MM / volume_size)),
        geometry=str(data.get("geometry", "cone")),
        sampler=str(diffusion.get("sampler", DEFAULT_SAMPLER)),
        steps=int(diffusion.get("steps", DEFAULT_STEPS)),
        method=str(diffusion.get("method", "diffusion")),
        min_consistency=_min_consistency(folder, manifest),
        retrain=retrain_stages(folder, manifest),
    )
    if info.method not in METHODS:
        raise XctDiffError(f"{folder}: unknown default method {info.method!r} (diffusion or direct)")
    if info.geometry not in GEOMETRIES:
        raise XctDiffError(f"{folder / MANIFEST_NAME}: unknown DRR geometry {info.geometry!r}")
    if info.sampler not in SAMPLERS:
        raise XctDiffError(f"{folder}: unknown default sampler {info.sampler!r}")
    _check_compatible(info, networks, settings)
    check_same_latents(folder, networks, settings, info.retrain)
    mean_ct = _load_mean_ct(folder, manifest, info.volume_size, contents)
    return ModelFolder(info, vqgan, encoder, networks["diffusion"], schedule, networks.get("style"), mean_ct, settings,
                       coarse=networks.get("coarse"))


def _check_compatible(info: ModelInfo, networks: dict, settings: dict) -> None:
    """The stages must agree on the latent grid and the image sizes, or the folder mixes two models."""
    vqgan, encoder, unet = networks["autoencoder"], networks["encoder"], networks["diffusion"]
    latent = tuple(vqgan.latent_shape((info.volume_size,) * 3))
    where = f"in {info.folder}"
    if tuple(encoder.latent_shape) != latent:
        raise XctDiffError(f"the encoder's latent {tuple(encoder.latent_shape)} differs from the autoencoder's {latent} {where}")
    if unet.latent_channels != vqgan.latent_channels:
        raise XctDiffError(f"the diffusion model has {unet.latent_channels} latent channels, the autoencoder {vqgan.latent_channels} {where}")
    if latent[-1] % unet.in_plane_factor:
        raise XctDiffError(f"the latent size {latent[-1]} is not a multiple of the diffusion UNet's factor {unet.in_plane_factor} {where}")
    if encoder.image_size != info.xray_size:
        raise XctDiffError(f"the encoder takes {encoder.image_size} px radiographs, the manifest says {info.xray_size} {where}")
    coarse = networks.get("coarse")
    if coarse is not None:
        blend = settings["coarse"].get("blend", 0.5)
        if coarse.image_size != info.xray_size or info.volume_size % coarse.mean.shape[-1]:
            raise XctDiffError(f"the coarse CT takes {coarse.image_size} px radiographs to a {coarse.mean.shape[-1]}^3 grid, "
                               f"which does not fit {info.xray_size} px and {info.volume_size}^3 {where}")
        if isinstance(blend, bool) or not isinstance(blend, (int, float)) or not 0.0 <= blend <= 1.0:
            raise XctDiffError(f"the coarse CT's blend must be a number from 0 to 1, got {blend!r} {where}")
    if "style" in settings:
        size = int(settings["style"].get("image_size", info.xray_size))
        if size != info.xray_size:
            raise XctDiffError(f"the style stage works on {size} px images, the encoder on {info.xray_size} {where}")


def _load_mean_ct(folder: Path, manifest: dict, volume_size: int, contents: dict) -> Optional[np.ndarray]:
    name = manifest.get("mean_ct")
    if not name:
        return None
    if name not in manifest["sha256"] or name not in contents:
        raise XctDiffError(f"{folder / MANIFEST_NAME}: {name} has no SHA-256")
    try:
        array = np.load(io.BytesIO(contents[name]), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise XctDiffError(f"cannot read {folder / name}: {_first_line(exc)}") from None
    if array.shape != (volume_size,) * 3:
        raise XctDiffError(f"{folder / name} has shape {array.shape}, expected {(volume_size,) * 3}")
    return array.astype(np.float32)


# ------------------------------------------------------------------------------------------ writing


def stage_configs(config) -> dict:
    """What each stage's JSON holds, from a :class:`~XctDiffCore.config.Config` (besides export_stage's own keys)."""
    return {
        "autoencoder": {"model": dataclasses.asdict(config.autoencoder.model)},
        "encoder": {"model": dataclasses.asdict(config.encoder.model)},
        "diffusion": {
            "model": dataclasses.asdict(config.diffusion.model),
            "schedule": dataclasses.asdict(config.diffusion.schedule),
            "sampler": DEFAULT_SAMPLER,
            "steps": config.diffusion.optim.val_sample_steps,
        },
    }


def coarse_stage_config(config) -> dict:
    """What ``coarse.json`` holds: the coarse CT's arguments and its weight in the direct path."""
    return {"model": dataclasses.asdict(config.coarse_model()), "blend": config.coarse.blend}


def style_stage_config(config) -> dict:
    """What ``style.json`` holds: the real -> DRR generator's arguments, its input size and value range."""
    return {
        "model": dataclasses.asdict(config.style.model),
        "image_size": config.data.xray_size,
        "direction": "real_to_drr",
        "value_range": [-1.0, 1.0],
    }


EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def export_stage(model: nn.Module, stage: str, stage_config: dict, out_dir, dtype: str = "float32") -> dict:
    """Write ``<stage>.safetensors`` (floating tensors cast to ``dtype``) and ``<stage>.json``.

    ``stage_config`` is what the pipeline needs to rebuild the network (its constructor arguments
    under ``"model"``, plus stage extras such as the noise schedule); the JSON adds the stage name,
    the dtype and the parameter count. Returns ``{"weights": name, "config": name}`` for
    :func:`write_manifest`.
    """
    from safetensors.torch import save_file

    from .atomic import atomic_path

    if dtype not in EXPORT_DTYPES:
        raise XctDiffError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise XctDiffError(f"output folder does not exist: {out_dir}")
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    tensors = {
        name: (t.detach().to(EXPORT_DTYPES[dtype]) if t.is_floating_point() else t.detach()).cpu().clone().contiguous()
        for name, t in model.state_dict().items()
    }
    weights, config_name = f"{stage}.safetensors", f"{stage}.json"
    with atomic_path(out_dir / weights) as tmp:
        # One metadata key only: safetensors writes several in a random order, and the same weights
        # must give the same file (and SHA-256) on every export. The dtype is in the JSON beside it.
        save_file(tensors, str(tmp), metadata={"stage": stage})
    document = {
        "stage": stage,
        "dtype": dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        **stage_config,
    }
    with atomic_path(out_dir / config_name) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return {"weights": weights, "config": config_name}


def write_manifest(model_dir, stages: dict, extra: Optional[dict] = None, files: Iterable[str] = ()) -> Path:
    """Write ``manifest.json``: ``extra`` (id, version, ...), each stage's files and config, a SHA-256 per file.

    ``stages`` maps a stage name to :func:`export_stage`'s return value (any ``{role: file name}``
    dict); ``files`` lists further files of the folder to checksum (e.g. ``MODEL_CARD.md``).
    """
    from .atomic import atomic_path

    model_dir = Path(model_dir)
    names = [name for entry in stages.values() for name in entry.values()] + list(files)
    missing = [n for n in names if not (model_dir / n).is_file()]
    if missing:
        raise XctDiffError(f"cannot write the manifest: {model_dir / missing[0]} does not exist")
    manifest = {"format": MODEL_FORMAT, **(extra or {})}
    manifest["stages"] = {}
    for stage, entry in stages.items():
        record = dict(entry)
        if "config" in entry:
            record["settings"] = json.loads((model_dir / entry["config"]).read_text(encoding="utf-8"))
        manifest["stages"][stage] = record
    manifest["sha256"] = {name: file_sha256(model_dir / name) for name in names}
    path = model_dir / "manifest.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def save_model_folder(
    out_dir,
    networks: dict,
    config,
    model_id: str,
    version: str,
    mean_ct: Optional[np.ndarray] = None,
    model_card: str = "",
    geometry: str = "cone",
    dtype: str = "float32",
    settings: Optional[dict] = None,
    extra: Optional[dict] = None,
    required=REQUIRED_STAGES,
    copied: Optional[dict] = None,
) -> Path:
    """Write a model folder (stage files, optional mean CT, model card, manifest last); returns it.

    ``networks``: ``autoencoder`` (VQGAN), ``encoder`` (ProgressiveEncoder), ``diffusion`` (the
    LatentUNet to sample with, i.e. the EMA copy) and optionally ``style`` (the real -> DRR generator).
    ``required``: the stages it must hold; fewer than all three make a partial folder, which cannot
    reconstruct but can start the later stages' training (``xctdiff train ... --init``).
    ``copied``: stages written as they are (:func:`stage_files` of another folder), in place of the networks of
    the same name (which still stand for them in the checks, e.g. the latents the encoder records).
    ``settings``: each stage's JSON (:func:`~XctDiffCore.training.stage_for_export`); by default they
    come from ``config``. ``extra``: further manifest entries (training data, metrics). The folder is
    written whole in a hidden temporary folder beside ``out_dir``, then takes its place
    (:func:`~XctDiffCore.atomic.atomic_folder`): an earlier model folder there is replaced (none of its files
    stays) and stays valid when the export fails or is interrupted; any other folder that is not empty is refused.
    """
    from .atomic import atomic_folder, make_output_folder

    out_dir = Path(out_dir)
    missing = [s for s in required if s not in networks and s not in (copied or {})]
    if missing:
        raise XctDiffError(f"cannot export a model without the {', '.join(missing)} stage(s)")
    _check_replaceable(out_dir)
    make_output_folder(out_dir.parent)
    with atomic_folder(out_dir, replaceable=lambda name: True) as folder:
        _write_model_files(folder, networks, config, model_id, version, mean_ct, model_card, geometry, dtype,
                           settings, extra, copied or {})
    return out_dir


def _check_replaceable(out_dir: Path) -> None:
    """An export replaces an earlier model folder whole, one without its manifest too (copied or written only in
    part: it holds nothing but a model's files); a folder without a manifest that holds anything else is someone
    else's: refused before any work, never deleted."""
    if out_dir.is_dir() and not (out_dir / MANIFEST_NAME).is_file() and \
            sorted(entry.name for entry in out_dir.iterdir()) != model_files_in(out_dir):
        raise XctDiffError(f"the output folder {out_dir} is not empty and not a model folder (no {MANIFEST_NAME}): "
                           "give a new or empty folder, or an earlier model folder to replace")


def _write_model_files(out_dir: Path, networks: dict, config, model_id: str, version: str, mean_ct, model_card: str,
                       geometry: str, dtype: str, settings: Optional[dict], extra: Optional[dict], copied: dict) -> None:
    """The files of :func:`save_model_folder` into the (temporary) folder ``out_dir``, the manifest last."""
    from .atomic import atomic_path

    settings = dict(settings or stage_configs(config))
    if networks.get("autoencoder") is not None:  # the encoder and diffusion say whose latents they learnt
        record = latents_record(networks["autoencoder"], settings.get("autoencoder", {}).get("step"), dtype=FOLDER_LATENTS_DTYPE)
        for stage in LATENT_STAGES:
            if stage in settings:
                settings[stage] = {**settings[stage], "latents": record}
    stages = {}
    for stage in REQUIRED_STAGES + OPTIONAL_STAGES:
        if stage in copied:
            stages[stage] = {"weights": f"{stage}.safetensors", "config": f"{stage}.json"}
            for role, name in stages[stage].items():
                with atomic_path(out_dir / name) as tmp:
                    tmp.write_bytes(copied[stage][role])
        elif networks.get(stage) is not None:
            default = {"style": style_stage_config, "coarse": coarse_stage_config}.get(stage)
            stage_settings = settings[stage] if stage in settings or default is None else default(config)
            stages[stage] = export_stage(networks[stage], stage, stage_settings, out_dir, dtype=dtype)
    files = [MODEL_CARD_NAME]
    extra = {
        **(extra or {}),
        "id": model_id,
        "version": version,
        "data": {
            "volume_size": config.data.volume_size,
            "xray_size": config.data.xray_size,
            "spacing_mm": FIELD_OF_VIEW_MM / config.data.volume_size,
            "geometry": geometry,
        },
    }
    if mean_ct is not None:
        with atomic_path(out_dir / MEAN_CT_NAME) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(mean_ct, dtype=np.float32))
        files.append(MEAN_CT_NAME)
        extra["mean_ct"] = MEAN_CT_NAME
    with atomic_path(out_dir / MODEL_CARD_NAME) as tmp:
        tmp.write_text(model_card or f"# {model_id} {version}\n\nXctDiff model folder.\n", encoding="utf-8")
    write_manifest(out_dir, stages, extra=extra, files=files)


def create_random_model(out_dir, config: Union[str, object] = "tiny", seed: int = 0, with_style: bool = True,
                        mean_ct: bool = False, with_coarse: bool = False) -> Path:
    """A valid model folder with randomly initialised networks of a config (bundled name, path or Config).

    For tests and for benchmarking model sizes that are not trained yet; its reconstructions are noise.
    The diffusion UNet's zero-initialised output layer is re-drawn so that sampling does real work.
    """
    from .config import load_config
    from .models.cyclegan import ResnetGenerator
    from .models.progressive_encoder import ProgressiveEncoder
    from .models.unet import LatentUNet
    from .models.vqgan import VQGAN

    if isinstance(config, (str, Path)):
        config = load_config(config)
    torch.manual_seed(seed)
    unet = LatentUNet(**dataclasses.asdict(config.diffusion.model))
    nn.init.normal_(unet.out[-1].weight, std=0.02)  # a trained UNet does not predict eps = 0
    networks = {
        "autoencoder": VQGAN(**dataclasses.asdict(config.autoencoder.model)),
        "encoder": ProgressiveEncoder(**dataclasses.asdict(config.encoder.model)),
        "diffusion": unet,
    }
    if with_style:
        networks["style"] = ResnetGenerator(**dataclasses.asdict(config.style.model))
    if with_coarse:
        from .models.coarse import CoarseCT

        networks["coarse"] = CoarseCT(**dataclasses.asdict(config.coarse_model()))
    size = config.data.volume_size
    mean = None
    if mean_ct:
        rng = np.random.default_rng(seed)
        mean = rng.uniform(-1000.0, 400.0, (size, size, size)).astype(np.float32)
    card = "# random\n\nRandomly initialised networks (tests and benchmarks only): the reconstructions are noise.\n"
    return save_model_folder(out_dir, networks, config, model_id="random", version=f"seed{seed}", mean_ct=mean, model_card=card)
