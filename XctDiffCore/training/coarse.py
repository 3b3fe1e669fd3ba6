"""The coarse CT stage (:mod:`XctDiffCore.models.coarse`): radiograph -> the CT at the latent grid, in HU.

Each step draws fresh variants of the training pairs (warped CTs, their DRRs rendered anew and
randomised on the film side: :class:`~XctDiffCore.training.variants.PairVariants`); the target is
the warped CT average-pooled to the coarse grid, the loss the MSE in the model's [-1, 1] units. The
network is the encoder's with one output channel; it starts from the run's trained encoder (the 2D
network, the lift and the 3D convolutions; the head is new and starts near zero, i.e. at the mean
CT), or from ``--init``'s coarse stage when that folder has one. The training mean CT on the coarse
grid is a buffer of the network, computed from the datalist when the stage starts from scratch.
Validation scores the coarse CT upsampled to the full grid on its own and blended into the run's
direct path (encoder -> decoder) with ``coarse.blend``, beside the direct path alone.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import Config
from .autoencoder import trained_autoencoder
from .common import (
    Deadline,
    Distributed,
    StageLog,
    autocast,
    backward_step,
    checkpoint_path,
    grad_scaler,
    is_due,
    learning_rate,
    make_optimizer,
    mean_scores,
    optional_ema,
    prepare_stage_dir,
    restore_training_state,
    save_stage_checkpoint,
    seed_everything,
    set_learning_rate,
    shipped_average,
    stage_data,
    trained_stage_checkpoint,
    training_batches,
    training_state,
    volume_metrics,
    wrap_ddp,
)
from .warm_start import warm_start

STAGE = "coarse"


def build_coarse(config: Config):
    import dataclasses

    from ..models.coarse import CoarseCT

    return CoarseCT(**dataclasses.asdict(config.coarse_model()))


def shipped_weights(models: dict) -> dict:
    """The coarse CT a checkpoint ships: the average of the weights when the run kept one."""
    return shipped_average(models, "coarse")


def _encoder_start(config: Config, coarse) -> dict:
    """The run's trained encoder weights that fit the coarse network (all but the one-channel head)."""
    path = checkpoint_path(config.run.dir, "encoder")
    if not path.is_file():
        warnings.warn(f"no trained encoder in {config.run.dir}: the coarse CT starts from random weights (train the "
                      "encoder first, or pass --init MODEL)", stacklevel=2)
        return {}
    from .encoder import shipped_weights as encoder_weights

    weights = encoder_weights(trained_stage_checkpoint(config.run.dir, "encoder", STAGE)["models"])
    own = coarse.state_dict()
    return {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}


@torch.no_grad()
def _training_mean(train_set, size: int) -> torch.Tensor:
    from ..models.coarse import coarse_grid

    total = None
    for i in range(len(train_set)):
        low = coarse_grid(train_set[i]["image"][None].float(), size)
        total = low if total is None else total + low
    return total / len(train_set)


@torch.no_grad()
def direct_reconstructions(config: Config, items: list, device: torch.device, precision: str) -> Optional[list]:
    """The run's direct path (encoder -> decoder, both frozen) on the validation items, decoded once per
    run; None when the run has no trained encoder (the blend is then not validated)."""
    run_dir = config.run.dir
    if not items or not checkpoint_path(run_dir, "encoder").is_file():
        return None
    from .encoder import trained_encoder

    vqgan, _ = trained_autoencoder(run_dir, STAGE, device, config)
    encoder, _ = trained_encoder(run_dir, STAGE, device)
    volumes = []
    for item in items:
        with autocast(device, precision):
            volumes.append(vqgan.decode(vqgan.quantize(encoder(item["xray"][None].to(device)))[0]).float())
    return volumes


@torch.no_grad()
def validate(coarse, blend: float, direct: Optional[list], items: list, device: torch.device, precision: str) -> dict:
    """The coarse CT upsampled on its own, and blended into the run's ``direct`` reconstructions (when given)."""
    from ..models.coarse import blend_coarse, upsample_coarse

    was_training = coarse.training
    coarse.eval()
    alone, blended = [], []
    for k, item in enumerate(items):
        ct, xray = item["image"][None].to(device), item["xray"][None].to(device)
        with autocast(device, precision):
            low = coarse(xray).float()
        alone.append(volume_metrics(upsample_coarse(low, ct.shape[2:]), ct))
        if direct is not None:
            blended.append(volume_metrics(blend_coarse(direct[k], low, blend), ct))
    coarse.train(was_training)
    scores = {f"val/coarse_{k.split('/', 1)[1]}": v for k, v in mean_scores(alone).items()}
    if direct is not None:
        scores.update(mean_scores(blended))  # val/psnr etc.: the direct path with the coarse CT, what ships
        direct_scores = [volume_metrics(volume, item["image"][None].to(device)) for volume, item in zip(direct, items)]
        scores.update({f"val/direct_{k.split('/', 1)[1]}": v for k, v in mean_scores(direct_scores).items()})
    return scores


def train_coarse(config: Config, resume: bool, job: Distributed, deadline: Deadline) -> Path:
    """Train the coarse CT on fresh pair variants; returns its checkpoint path."""
    from ..models.coarse import coarse_grid
    from .variants import PairVariants

    section, optim, device, precision = config.coarse, config.coarse.optim, job.device, config.run.precision
    initial = warm_start(config, STAGE, job)  # --init: the folder's stages copied in, its coarse CT if any
    checkpoint = prepare_stage_dir(config.run.dir, STAGE, resume, config.data.datalist)
    train_set, val_items = stage_data(config, job)

    seed_everything(config.run.seed)  # identical initial weights on every rank
    coarse = build_coarse(config)
    size = coarse.mean.shape[-1]
    if initial is not None:
        coarse.load_state_dict(initial)
    elif not checkpoint:  # (a resumed run gets everything back from its checkpoint)
        coarse.load_state_dict(_encoder_start(config, coarse), strict=False)
        with torch.no_grad():  # a new head near zero: the stage starts at the training mean CT
            head = coarse.encoder_3d[-1]
            head.weight.mul_(0.01)
            head.bias.zero_()
            coarse.mean.copy_(_training_mean(train_set, size))
    coarse = coarse.to(device)
    optimizer = make_optimizer(coarse.parameters(), optim)
    scaler = grad_scaler(device, precision)
    seed_everything(config.run.seed + job.rank)
    models, optimizers, scalers = {"coarse": coarse}, {"coarse": optimizer}, {"coarse": scaler}
    step = restore_training_state(checkpoint, job, models, optimizers, scalers, config=config) if checkpoint else 0
    ema = optional_ema(coarse, optim.ema_decay, models, checkpoint)
    model = wrap_ddp(coarse, job)
    batches = training_batches(train_set, config, optim, step, job)
    variants = PairVariants(section.augment, section.film, config.data.datalist, config.data.xray_size,
                            config.run.seed, job.rank, device)
    direct = direct_reconstructions(config, val_items, device, precision)  # what the blend validates on

    log, stop = StageLog(config, STAGE, optim, job, step), False
    while step < optim.max_steps and not stop:
        ct, xray = variants(next(batches), step)
        target = coarse_grid(ct, size).to(device, non_blocking=True)
        xray = xray.to(device, non_blocking=True)
        lr = learning_rate(step, optim)
        set_learning_rate(optimizer, lr)
        with autocast(device, precision):
            prediction = model(xray)
        loss = F.mse_loss(prediction.float(), target.float())
        backward_step(loss, list(coarse.parameters()), optimizer, scaler, optim.grad_clip)
        if ema is not None:
            ema.update(coarse)

        step, stop = step + 1, deadline.passed()
        log.add({"mse": loss})
        if is_due(step, optim.log_every, optim.max_steps) or stop:
            log.write(step, {**log.means(), "lr": lr})
        if val_items and is_due(step, optim.val_every, optim.max_steps):
            log.write(step, validate(ema.module if ema else coarse, section.blend, direct, val_items, device, precision))
        if is_due(step, optim.checkpoint_every, optim.max_steps) or stop:
            save_stage_checkpoint(config, STAGE, step, job, training_state(job, models, optimizers, scalers))
    return log.close(deadline, step)
