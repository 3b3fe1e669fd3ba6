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

from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import Config
from .autoencoder import trained_autoencoder
from .common import (
    EMA,
    Deadline,
    Distributed,
    StageLog,
    autocast,
    backward_step,
    checkpoint_path,
    ema_weights,
    grad_scaler,
    is_due,
    learning_rate,
    load_checkpoint,
    make_optimizer,
    mean_scores,
    prepare_stage_dir,
    restore_training_state,
    save_stage_checkpoint,
    seed_everything,
    set_learning_rate,
    stage_data,
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
    return ema_weights(models["ema"]) if "ema" in models else models["coarse"]


def _encoder_start(config: Config, coarse) -> dict:
    """The run's trained encoder weights that fit the coarse network (all but the one-channel head)."""
    path = checkpoint_path(config.run.dir, "encoder")
    if not path.is_file():
        return {}
    from .encoder import shipped_weights as encoder_weights

    weights = encoder_weights(load_checkpoint(path)["models"])
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
def validate(coarse, blend: float, vqgan, encoder, items: list, device: torch.device, precision: str) -> dict:
    """The coarse CT upsampled on its own, and (with the run's encoder) blended into the direct path."""
    from ..models.coarse import blend_coarse

    was_training = coarse.training
    coarse.eval()
    alone, blended, direct = [], [], []
    for item in items:
        ct, xray = item["image"][None].to(device), item["xray"][None].to(device)
        with autocast(device, precision):
            low = coarse(xray).float()
        alone.append(volume_metrics(blend_coarse(torch.zeros_like(ct), low, 1.0), ct))
        if encoder is not None:
            with autocast(device, precision):
                recon = vqgan.decode(vqgan.quantize(encoder(xray))[0]).float()
            direct.append(volume_metrics(recon, ct))
            blended.append(volume_metrics(blend_coarse(recon, low, blend), ct))
    coarse.train(was_training)
    scores = {f"val/coarse_{k.split('/', 1)[1]}": v for k, v in mean_scores(alone).items()}
    if blended:
        scores.update(mean_scores(blended))  # val/psnr etc.: the direct path with the coarse CT, what ships
        scores.update({f"val/direct_{k.split('/', 1)[1]}": v for k, v in mean_scores(direct).items()})
    return scores


def train_coarse(config: Config, resume: bool, job: Distributed, deadline: Deadline) -> Path:
    """Train the coarse CT on fresh pair variants; returns its checkpoint path."""
    from ..models.coarse import coarse_grid
    from .encoder import trained_encoder
    from .variants import PairVariants

    section, optim, device, precision = config.coarse, config.coarse.optim, job.device, config.run.precision
    initial = warm_start(config, STAGE, job)  # --init: the folder's stages copied in, its coarse CT if any
    checkpoint = prepare_stage_dir(config.run.dir, STAGE, resume)
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
    step = restore_training_state(checkpoint, job, models, optimizers, scalers) if checkpoint else 0
    ema = None
    if optim.ema_decay > 0:
        ema = models["ema"] = EMA(coarse, optim.ema_decay)
        if checkpoint and "ema" in checkpoint["models"]:
            ema.load_state_dict(checkpoint["models"]["ema"])
    model = wrap_ddp(coarse, job)
    batches = training_batches(train_set, config, optim, step, job)
    variants = PairVariants(section.augment, section.film, config.data.datalist, config.data.xray_size,
                            config.run.seed, job.rank)
    vqgan = encoder = None
    if val_items and checkpoint_path(config.run.dir, "encoder").is_file():  # the blend needs the direct path
        vqgan, _ = trained_autoencoder(config.run.dir, STAGE, device, config)
        encoder, _ = trained_encoder(config.run.dir, STAGE, device)

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
            log.write(step, validate(ema.module if ema else coarse, section.blend, vqgan, encoder, val_items,
                                     device, precision))
        if is_due(step, optim.checkpoint_every, optim.max_steps) or stop:
            save_stage_checkpoint(config, STAGE, step, job, training_state(job, models, optimizers, scalers))
    return log.close(deadline, step)
