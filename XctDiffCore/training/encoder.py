"""Stage 2: the progressive encoder, radiograph -> the frozen VQ-GAN's latent space (eqs. 5-6).

Target of each pair: the CT's normalised quantised latent ``y_ct = N(q(E(ct)))`` from the frozen
VQ-GAN of stage 1. Loss: ``F.mse_loss(encoder(xray), y_ct)`` in the normalised space, smooth, with
the quantiser out of the way (see :mod:`XctDiffCore.models.progressive_encoder`); optionally plus
``encoder.image_weight`` times the L1 of the decoded prior against the CT. Validation decodes
the prior ``y = N(q(encoder(xray)))`` with the frozen decoder: the PSNR/SSIM of the encoder alone,
the floor that the diffusion stage must beat.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import Config, EncoderModelConfig, config_from_dict
from .autoencoder import check_latent_compatible, trained_autoencoder
from .common import (
    Deadline,
    StageLoop,
    autocast,
    backward_step,
    cleanup_distributed,
    freeze,
    gather_rng_states,
    grad_scaler,
    learning_rate,
    make_optimizer,
    prepare_stage_dir,
    restore_rng_states,
    seed_everything,
    set_learning_rate,
    setup_distributed,
    trained_stage_checkpoint,
    volume_metrics,
    wrap_ddp,
)
from .data import PairDataset, train_loader
from .variant_bank import stage_variants
from .warm_start import warm_start

STAGE = "encoder"


def build_encoder(model: EncoderModelConfig):
    from ..models.progressive_encoder import ProgressiveEncoder

    return ProgressiveEncoder(**dataclasses.asdict(model))


def trained_encoder(run_dir, needed_by: str, device: torch.device):
    """The frozen progressive encoder of a run and its model config."""
    checkpoint = trained_stage_checkpoint(run_dir, STAGE, needed_by)
    model_config = config_from_dict(checkpoint["config"]).encoder.model
    encoder = build_encoder(model_config)
    encoder.load_state_dict(checkpoint["models"]["encoder"])
    return freeze(encoder.to(device)), model_config


@torch.no_grad()
def ct_latent(vqgan, ct: torch.Tensor) -> torch.Tensor:
    """``N(q(E(ct)))``: the normalised quantised latent of CT volumes ``(B, 1, D, H, W)``."""
    return vqgan.quantize(vqgan.encode(ct))[0]


@torch.no_grad()
def validate(encoder, vqgan, items: list, device: torch.device, precision: str) -> dict:
    encoder.eval()
    scores, errors = [], []
    for item in items:
        ct, xray = item["image"][None].to(device), item["xray"][None].to(device)
        with autocast(device, precision):
            target = ct_latent(vqgan, ct)
            prediction = encoder(xray)
            recon = vqgan.decode(vqgan.quantize(prediction)[0])
        errors.append(float(F.mse_loss(prediction.float(), target.float())))
        scores.append(volume_metrics(recon.float(), ct))
    encoder.train()
    return {
        "val/latent_mse": sum(errors) / len(errors),
        "val/psnr": sum(s["psnr"] for s in scores) / len(scores),
        "val/ssim": sum(s["ssim"] for s in scores) / len(scores),
    }


def train_encoder(config: Config, resume: bool = False, time_limit: Optional[float] = None) -> Path:
    """Train the progressive encoder against the run's frozen VQ-GAN; returns its checkpoint path."""
    job = setup_distributed()
    try:
        return _train(config, resume, job, Deadline(time_limit, job))
    finally:
        cleanup_distributed(job)


def _train(config: Config, resume: bool, job, deadline) -> Path:
    section, optim, device = config.encoder, config.encoder.optim, job.device
    initial = warm_start(config, STAGE, job)  # --init: weights from a model folder, earlier stages copied in
    vqgan, trained = trained_autoencoder(config.run.dir, STAGE, device)
    check_latent_compatible(trained, config)
    checkpoint = prepare_stage_dir(config.run.dir, STAGE, resume)
    train_set = PairDataset(config.data.datalist, "training", config.data.volume_size, config.data.xray_size)
    val_set = PairDataset(config.data.datalist, "validation", config.data.volume_size, config.data.xray_size)

    seed_everything(config.run.seed)  # identical initial weights on every rank
    encoder = build_encoder(section.model).to(device)
    if initial is not None:
        encoder.load_state_dict(initial)
    optimizer = make_optimizer(encoder.parameters(), optim)
    scaler = grad_scaler(device, config.run.precision)
    step = 0
    seed_everything(config.run.seed + job.rank)
    if checkpoint is not None:
        encoder.load_state_dict(checkpoint["models"]["encoder"])
        optimizer.load_state_dict(checkpoint["optimizers"]["encoder"])
        scaler.load_state_dict(checkpoint["scalers"]["encoder"])
        step = checkpoint["step"]
        restore_rng_states(checkpoint["rng"], job)
    model = wrap_ddp(encoder, job)

    batches = iter(
        train_loader(train_set, optim.batch_size, config.run.seed, step, job.rank, job.world_size, config.data.num_workers)
    )
    val_items = [val_set[i] for i in range(min(config.data.val_cases, len(val_set)))] if job.is_main else []
    loop = StageLoop(config, STAGE, optim, job, deadline, step)
    validation = (lambda: validate(encoder, vqgan, val_items, device, config.run.precision)) if val_items else None

    def state() -> dict:
        return {"models": {"encoder": encoder.state_dict()}, "optimizers": {"encoder": optimizer.state_dict()},
                "scalers": {"encoder": scaler.state_dict()}, "rng": gather_rng_states(job)}

    variants = stage_variants(config, section, train_set, vqgan, job, deadline)

    def encode(ct: torch.Tensor) -> torch.Tensor:
        with autocast(device, config.run.precision):
            return ct_latent(vqgan, ct.to(device))

    while loop.running():
        batch = next(batches)
        if section.image_weight > 0:  # the decoded prior is compared with the (warped) CT itself
            ct, xray = variants(batch, loop.step)
            ct = ct.to(device, non_blocking=True)  # (B, 1, D, H, W)
            target = encode(ct)
        else:  # stored pairs, fresh variants, or variants drawn from the run's bank
            target, xray = variants.latent_pairs(batch, loop.step, encode)  # (B, 8, d, h, w)
        target, xray = target.to(device, non_blocking=True), xray.to(device, non_blocking=True)  # xray (B, 1, H, W)
        lr = learning_rate(loop.step, optim)
        set_learning_rate(optimizer, lr)
        with autocast(device, config.run.precision):
            prediction = model(xray)
            latent_loss = F.mse_loss(prediction.float(), target.float())
            losses = {"latent_mse": latent_loss}
            loss = latent_loss
            if section.image_weight > 0:  # the decoded prior against the CT (gradient straight through q)
                n = section.image_items or len(ct)
                decoded = vqgan.decode(vqgan.quantize(prediction[:n].float())[0])
                losses["image_l1"] = F.l1_loss(decoded.float(), ct[:n])
                loss = loss + section.image_weight * losses["image_l1"]
        backward_step(loss, list(encoder.parameters()), optimizer, scaler, optim.grad_clip)
        loop.end_step(losses, lr, state, validation)
    return loop.close()
