"""The style stage: a CycleGAN between real radiographs and the DRRs the other stages train on.

Domains. *Real*: the files named by ``style.real`` (folders, searched recursively for images, or
glob patterns; relative paths start at the working directory), each read with
:func:`~XctDiffCore.io.read_radiograph` when first needed and preprocessed with
:func:`~XctDiffCore.preprocess.preprocess_radiograph` at ``data.xray_size``, then kept in memory.
Reading JPEG/PNG needs Pillow, which scikit-image itself depends on, so a machine with scikit-image
has it. *DRR*: the ``xray`` images of the datalist, resized exactly as the encoder sees them
(:func:`~XctDiffCore.model_inputs.xray_to_model`); ``xctdiff prepare`` normalises them with the
same percentile rule as ``preprocess_radiograph``, so both domains arrive alike. With
``style.augment.enabled``, ``augment.bank`` DRRs of each training CT instead (:func:`warped_drrs`, kept in the run). ``data.val_cases``
real files (a seeded choice) are held out for validation, with the datalist's validation DRRs.

Per step: one update of both generators (LSGAN + cycle + identity,
:func:`~XctDiffCore.models.cyclegan.generator_loss`), then one of both critics on real images and
pooled fakes. Under torchrun the gradients of all four networks are averaged by hand
(:func:`~.common.backward_step` with ``average_over``): each generator runs three times per step
and the critics sit idle during the generator step, which DDP's wrapper cannot express. The
checkpoint follows the other stages (``<run>/style/checkpoint.pt``, ``--resume``) and adds every
rank's image pools; at the end the real -> DRR generator is exported beside it as
``style.safetensors`` + ``style.json`` for a model folder.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from ..config import Config, StyleConfig
from ..datalist import read_datalist
from ..errors import XctDiffError
from ..figures import figure_tag_metadata
from ..io import write_image_png
from ..model_folder import style_stage_config
from ..model_inputs import xray_to_model
from .common import (
    Deadline,
    Distributed,
    StageLog,
    autocast,
    backward_step,
    broadcast_parameters,
    export_stage,
    grad_scaler,
    is_due,
    learning_rate,
    make_optimizer,
    prepare_stage_dir,
    restore_training_state,
    save_stage_checkpoint,
    seed_everything,
    set_learning_rate,
    stage_dir,
    training_batches,
    training_state,
)

STAGE = "style"
DRRS_DIR = "style_drrs"  # RUN/style_drrs: the warped DRRs of style.augment (:func:`warped_drrs`)


# -------------------------------------------------------------------------------------------- data


class RealRadiographs(Dataset):
    """Real films as ``(1, size, size)`` float32 in [-1, 1]: read and preprocessed lazily, then cached."""

    def __init__(self, files: list, size: int):
        self.files, self.size = list(files), size
        self.cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index not in self.cache:
            from ..io import read_radiograph
            from ..preprocess import preprocess_radiograph

            image01 = preprocess_radiograph(read_radiograph(self.files[index]).image, self.size)
            self.cache[index] = torch.from_numpy(image01)[None] * 2.0 - 1.0
        return self.cache[index]


class DatalistDrrs(Dataset):
    """The ``xray`` images of one datalist section as ``(1, size, size)`` float32 in [-1, 1]."""

    def __init__(self, datalist, section: str, size: int):
        self.files = [item["xray"] for item in read_datalist(datalist, section)]
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return xray_to_model(np.load(self.files[index]), self.size)


class WarpedDrrs(Dataset):
    """``count`` DRRs of each training CT (:func:`warped_drrs`) as ``(1, size, size)`` in [-1, 1]."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def warped_drrs(run_dir, datalist, augment: dict, count: int, volume_size: int, size: int, seed: int,
                job: Distributed, deadline=None) -> WarpedDrrs:
    """``count`` DRRs of each training CT: the first of the CT itself (the datalist's DRR), the others of random
    warps (``augment``: rotation, scaling, translation, elastic, HU jitter), plain (no film randomisation: the style is
    the DRRs' own).

    Why: 15 DRRs are few enough for the critics to learn by heart, after which the generator learns nothing more about
    the style; warped copies keep the DRR look and vary the anatomy. They take minutes (the ``cpu`` config's 600: about
    6 min on a 2-core CPU), so they are a file of the run like the encoder's variant bank and made the same way
    (:func:`~.variant_bank.made_in_parts`): ``RUN/style_drrs/KEY-RofW.pt``, the key covering what they depend on (the
    datalist's content and that of the CT files it names, the warps, ``count``, the seed, the sizes, the DRR
    geometry), kept one file each as they are made, bounded by ``--time-limit``, SIGTERM and Ctrl-C, the rest made by
    ``--resume``. Every draw is seeded by (seed, patient, variant), so every rank, every remake and a job of another
    size makes or loads the same set, byte for byte.
    """
    from ..datalist import datalist_geometry
    from ..drr import make_geometry
    from .common import file_sha256
    from .data import PairDataset
    from .variant_bank import keys_of, made_in_parts, make_variant

    def unreadable(exc) -> XctDiffError:
        return XctDiffError(f"style.augment warps the datalist's CTs, and one could not be read: {exc}; "
                            "style.augment.enabled: false (in a copy of the config) trains on the datalist's DRRs "
                            "alone")

    pairs, geometry = PairDataset(datalist, "training", volume_size, size), make_geometry(datalist_geometry(datalist))
    settings = {"style_drrs": True, "datalist": file_sha256(datalist), "augment": augment, "count": count,
                "seed": seed, "volume_size": volume_size, "xray_size": size, "geometry": repr(geometry)}
    try:
        key, key_before = keys_of(settings, [item["image"] for item in pairs.items])
    except OSError as exc:
        raise unreadable(exc) from None
    loaded = {}

    def make(index: int, variant: int) -> list:
        if index not in loaded:  # the variants of one CT follow each other: read it once
            try:
                loaded.clear()
                loaded[index] = pairs[index]
            except (OSError, KeyError, ValueError, XctDiffError) as exc:
                raise unreadable(exc) from None
        item = loaded[index]
        drr01 = make_variant(item["image"][None], seed, index, variant, geometry, size, augment)[1]
        return [item["patient"], variant, drr01[0].float().clone()]

    entries = made_in_parts(Path(run_dir) / DRRS_DIR, key, len(pairs), count, make, job, deadline, "style DRRs", "DRR",
                            f"{count} warped DRRs of each of {len(pairs)} training CTs", key_before)
    return WarpedDrrs(torch.stack([entry[2] for entry in entries]).float() * 2.0 - 1.0)


def split_real_files(files: list, val_cases: int, seed: int) -> tuple[list, list]:
    """(training, validation) real files: ``val_cases`` held out by a seeded draw, at least one left to train."""
    if len(files) < 2:
        raise XctDiffError(f"the style stage needs at least 2 real radiographs, found {len(files)}")
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = min(val_cases, len(files) - 1)
    val = sorted(files[i] for i in order[:n_val])
    return sorted(files[i] for i in order[n_val:]), val


# ------------------------------------------------------------------------------------------- model


def build_cyclegan(section: StyleConfig) -> nn.ModuleDict:
    """``generators`` (real_to_drr, drr_to_real) and ``critics`` (drr, real), from the config's constructor arguments."""
    from ..models.cyclegan import ResnetGenerator
    from ..models.discriminators import PatchDiscriminator

    return nn.ModuleDict(
        {
            "generators": nn.ModuleDict(
                {
                    "real_to_drr": ResnetGenerator(**dataclasses.asdict(section.model)),
                    "drr_to_real": ResnetGenerator(**dataclasses.asdict(section.model)),
                }
            ),
            "critics": nn.ModuleDict(
                {
                    "drr": PatchDiscriminator(2, **dataclasses.asdict(section.critic)),
                    "real": PatchDiscriminator(2, **dataclasses.asdict(section.critic)),
                }
            ),
        }
    )


def export_style(generator: nn.Module, config: Config, out_dir) -> dict:
    """``style.safetensors`` + ``style.json`` (constructor arguments, input size, value range) in ``out_dir``."""
    return export_stage(generator, STAGE, style_stage_config(config), out_dir)


# ------------------------------------------------------------------------------------------- loops


@torch.no_grad()
def validate(gan: nn.ModuleDict, real: list, drrs: list, device: torch.device, precision: str) -> tuple[dict, np.ndarray]:
    """Cycle and identity L1 on held-out images, and a preview (rows: real | real->DRR | back to real)."""
    from ..models.cyclegan import gradient_correlation

    g = gan["generators"]
    g.eval()
    metrics, rows = {}, []
    if real:
        x = torch.stack(real).to(device)  # (N, 1, H, W)
        with autocast(device, precision):
            fake_drr = g["real_to_drr"](x).float()
            back = g["drr_to_real"](fake_drr).float()
        metrics["val/cycle_real"] = float((back - x).abs().mean())
        metrics["val/edge_correlation"] = float(gradient_correlation(x, fake_drr).mean())  # bones kept: 1
        rows = [torch.cat([a[0], b[0], c[0]], dim=1) for a, b, c in zip(x, fake_drr, back)]
    if drrs:
        y = torch.stack(drrs).to(device)
        with autocast(device, precision):
            fake_real = g["drr_to_real"](y).float()
            back = g["real_to_drr"](fake_real).float()
            same = g["real_to_drr"](y).float()
        metrics["val/cycle_drr"] = float((back - y).abs().mean())
        metrics["val/identity_drr"] = float((same - y).abs().mean())  # how much a DRR is (wrongly) restyled
    g.train()
    preview = ((torch.cat(rows, dim=0).clamp(-1, 1) + 1) / 2).cpu().numpy() if rows else np.zeros((0, 0), np.float32)
    return metrics, preview


def style_films(patterns, run_dir=None, datalist=None) -> list:
    """The real films of the style stage: the config's ``style.real``, the run folder passed over (its preview.png,
    read back on a --resume, would be a real film). A folder or pattern that finds none says which setting named it
    (the bundled configs name the shared data, from the working directory); films that are the ``datalist``'s DRRs
    or their previews (``style.real`` naming the prepared folder) are refused, as evaluate-style refuses them."""
    from ..evaluation.style import refuse_drrs_as_films
    from ..style import find_real_films

    try:
        files = find_real_films(patterns, run_dir)
    except XctDiffError as exc:
        from ..config import CONFIG_DIR

        # where the bundled configs lie: a newcomer who trained with `--config cpu` has no file at hand to copy
        raise XctDiffError(f"{exc}; the style stage's real films are the config's style.real (folders or glob "
                           f"patterns, from the working directory {Path.cwd()}): set it to your films in a copy of "
                           f"the config (the bundled ones are {CONFIG_DIR}/NAME.yaml) and pass the copy to --config") from None
    if datalist is not None:
        refuse_drrs_as_films(files, datalist, "the style stage would learn to move DRRs into the DRR style, not real "
                             "films; set the config's style.real to real radiographs")
    return files


def train_style(config: Config, resume: bool, job: Distributed, deadline: Deadline) -> Path:
    """Train the CycleGAN to ``style.optim.max_steps``; returns its checkpoint path."""
    from ..models.cyclegan import ImagePool, critic_loss, generator_loss

    section, optim, device, size = config.style, config.style.optim, job.device, config.data.xray_size
    precision = config.run.precision
    real_train, real_val = split_real_files(style_films(section.real, config.run.dir, config.data.datalist),
                                            config.data.val_cases, config.run.seed)
    drr_train = DatalistDrrs(config.data.datalist, "training", size)
    drr_val = DatalistDrrs(config.data.datalist, "validation", size)
    if len(drr_train) == 0:
        raise XctDiffError(f"the datalist {config.data.datalist} has no training DRRs")
    checkpoint = prepare_stage_dir(config.run.dir, STAGE, resume, config.data.datalist)
    finished = checkpoint is not None and checkpoint["step"] >= optim.max_steps  # a resume with nothing to train
    if section.augment.enabled and not finished:  # a wider DRR domain: warped copies of each training CT, kept in the run
        drr_train = warped_drrs(config.run.dir, config.data.datalist, section.augment.magnitudes(),
                                section.augment.bank, config.data.volume_size, size, config.run.seed, job, deadline)

    seed_everything(config.run.seed)  # identical initial weights on every rank
    gan = build_cyclegan(section).to(device)
    generators, critics = gan["generators"], gan["critics"]
    opt_g = make_optimizer(generators.parameters(), optim)
    opt_d = make_optimizer(critics.parameters(), optim)
    scaler_g, scaler_d = grad_scaler(device, precision), grad_scaler(device, precision)
    pools = {"drr": ImagePool(section.loss.pool_size, config.run.seed + job.rank),
             "real": ImagePool(section.loss.pool_size, config.run.seed + job.rank + 10_000)}
    seed_everything(config.run.seed + job.rank)  # then a different random stream per rank
    # what the checkpoint holds, by name: training_state() (+ the pools) writes it, restore_training_state() reads it back
    models = {"cyclegan": gan}
    optimizers, scalers = {"generator": opt_g, "discriminator": opt_d}, {"generator": scaler_g, "discriminator": scaler_d}
    step = 0
    if checkpoint is not None:
        step = restore_training_state(checkpoint, job, models, optimizers, scalers, config=config)
        if len(checkpoint["pools"]) == job.world_size:  # another world size starts with empty pools
            for name, pool in pools.items():
                pool.load_state_dict(checkpoint["pools"][job.rank][name], device)
    broadcast_parameters(gan, job)
    real_batches = training_batches(RealRadiographs(real_train, size), config, optim, step, job)
    drr_batches = training_batches(drr_train, config, optim, step, job)
    val_real = [RealRadiographs(real_val, size)[i] for i in range(len(real_val))] if job.is_main else []
    val_drrs = [drr_val[i] for i in range(min(config.data.val_cases, len(drr_val)))] if job.is_main else []

    log, stop = StageLog(config, STAGE, optim, job, step), False
    while step < optim.max_steps and not stop:
        real = next(real_batches).to(device, non_blocking=True)  # (B, 1, H, W) in [-1, 1]
        drr = next(drr_batches).to(device, non_blocking=True)
        lr = learning_rate(step, optim)
        set_learning_rate(opt_g, lr)
        set_learning_rate(opt_d, lr)

        critics.requires_grad_(False)  # the critics only judge here; their update comes next
        with autocast(device, precision):
            loss, terms, fake_drr, fake_real = generator_loss(
                generators["real_to_drr"], generators["drr_to_real"], critics["drr"], critics["real"], real, drr,
                section.loss.cycle_weight, section.loss.identity_weight, section.loss.edge_weight,
                section.loss.critic_augment, section.loss.edge_sigma,
            )
        backward_step(loss, list(generators.parameters()), opt_g, scaler_g, optim.grad_clip, average_over=job)

        critics.requires_grad_(True)
        pooled_drr, pooled_real = pools["drr"].query(fake_drr.float()), pools["real"].query(fake_real.float())
        with autocast(device, precision):
            d_loss, d_terms = critic_loss(
                critics["drr"], critics["real"], real, drr, pooled_real, pooled_drr, section.loss.critic_augment
            )
        backward_step(d_loss, list(critics.parameters()), opt_d, scaler_d, optim.grad_clip, average_over=job)

        step, stop = step + 1, deadline.passed()  # the time limit and SIGTERM: checkpoint, then stop
        log.add({"total": loss, **terms, "critic_total": d_loss, **d_terms})
        if is_due(step, optim.log_every, optim.max_steps) or stop:
            log.write(step, {**log.means(), "lr": lr},
                      shown=("train/total", "train/cycle_real", "train/adv_drr", "train/critic_total"))
        if (val_real or val_drrs) and is_due(step, optim.val_every, optim.max_steps):
            metrics, preview = validate(gan, val_real, val_drrs, device, precision)
            if preview.size:
                write_image_png(preview, stage_dir(config.run.dir, STAGE) / "preview.png", bits=8,
                                metadata=figure_tag_metadata("style training preview"))
            log.write(step, metrics)
        if is_due(step, optim.checkpoint_every, optim.max_steps) or stop:
            state = training_state(job, models, optimizers, scalers)
            save_stage_checkpoint(config, STAGE, step, job, {**state, "pools": _gather_pools(pools, job)})
    if job.is_main:
        export_style(generators["real_to_drr"], config, stage_dir(config.run.dir, STAGE))
    return log.close(deadline, step)


def _gather_pools(pools: dict, job) -> list:
    """Every rank's image pools (rank order), so a resumed job shows each critic the fakes it would have seen."""
    state = {name: pool.state_dict() for name, pool in pools.items()}
    if not job.enabled:
        return [state]
    states = [None] * job.world_size
    dist.all_gather_object(states, state)
    return states
