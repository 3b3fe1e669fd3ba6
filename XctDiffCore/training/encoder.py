"""Stage 2: the progressive encoder, radiograph -> the frozen VQ-GAN's latent space (eqs. 5-6).

Target of each pair: the CT's normalised quantised latent ``y_ct = N(q(E(ct)))`` from the frozen
VQ-GAN of stage 1. Loss: ``F.mse_loss(encoder(xray), y_ct)`` in the normalised space, smooth, with
the quantiser out of the way (see :mod:`XctDiffCore.models.progressive_encoder`); optionally plus
``encoder.image_weight`` times the L1 of the decoded prior against the CT, and with ``encoder.bone_weight``
the squared error of each latent cell weighted by ``1 + bone_weight x`` its fraction of bone voxels. Validation decodes
the prior ``y = N(q(encoder(xray)))`` with the frozen decoder: the PSNR/SSIM of the encoder alone,
the floor that the diffusion stage must beat. With ``encoder.optim.ema_decay`` an average of the
weights (:class:`~XctDiffCore.training.common.EMA`) is what validation scores and export ships.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import Config, EncoderModelConfig, config_from_dict
from ..errors import XctDiffError
from .autoencoder import trained_autoencoder
from .common import (
    Deadline,
    Distributed,
    StageLog,
    autocast,
    backward_step,
    checkpoint_step,
    freeze,
    grad_scaler,
    is_due,
    latents_changed,
    latents_record,
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
from .variant_bank import stage_variants
from .variants import bone_fractions
from .warm_start import warm_start

STAGE = "encoder"


def build_encoder(model: EncoderModelConfig):
    from ..models.progressive_encoder import ProgressiveEncoder

    return ProgressiveEncoder(**dataclasses.asdict(model))


def shipped_weights(models: dict) -> dict:
    """The encoder weights a checkpoint's ``models`` stand for: their average when the run kept one
    (``encoder.optim.ema_decay``), else the weights themselves. Later stages and export both use it."""
    return shipped_average(models, "encoder")


def trained_encoder(run_dir, needed_by: str, device: torch.device, latents: Optional[dict] = None):
    """The frozen progressive encoder of a run (:func:`shipped_weights`) and its model config; with ``latents``
    (the run's autoencoder's :func:`~.common.latents_record`), refused when it learnt another autoencoder's."""
    checkpoint = trained_stage_checkpoint(run_dir, STAGE, needed_by)
    changed = latents and latents_changed(f"the {STAGE} stage", checkpoint.get("latents"), latents)
    if changed:  # the later stage would learn to refine priors that are noise to this autoencoder
        raise XctDiffError(f"{changed}: train the encoder on it first (`xctdiff train encoder ... --resume` goes on "
                           f"from this one), then the {needed_by} stage")
    model_config = config_from_dict(checkpoint["config"]).encoder.model
    encoder = build_encoder(model_config)
    encoder.load_state_dict(shipped_weights(checkpoint["models"]))
    return freeze(encoder.to(device)), model_config


@torch.no_grad()
def ct_latent(vqgan, ct: torch.Tensor) -> torch.Tensor:
    """``N(q(E(ct)))``: the normalised quantised latent of CT volumes ``(B, 1, D, H, W)``."""
    return vqgan.quantize(vqgan.encode(ct))[0]


@torch.no_grad()
def validate(encoder, vqgan, items: list, device: torch.device, precision: str) -> dict:
    was_training = encoder.training
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
    encoder.train(was_training)
    return {
        "val/latent_mse": sum(errors) / len(errors),
        **mean_scores(scores),
    }


def train_encoder(config: Config, resume: bool, job: Distributed, deadline: Deadline) -> Path:
    """Train the progressive encoder against the run's frozen VQ-GAN; returns its checkpoint path."""
    section, optim, device, precision = config.encoder, config.encoder.optim, job.device, config.run.precision
    initial = warm_start(config, STAGE, job)  # --init: weights from a model folder, earlier stages copied in
    vqgan, _ = trained_autoencoder(config.run.dir, STAGE, device, config)
    latents = latents_record(vqgan, checkpoint_step(config.run.dir, "autoencoder"))  # what the checkpoint records
    checkpoint = prepare_stage_dir(config.run.dir, STAGE, resume, config.data.datalist)
    changed = checkpoint and job.is_main and latents_changed(f"the {STAGE} stage", checkpoint.get("latents"), latents)
    if changed:
        warnings.warn(f"{changed}: the encoder goes on from step {checkpoint['step']} on the new ones; train the "
                      "diffusion stage again after it", stacklevel=2)
    train_set, val_items = stage_data(config, job)

    seed_everything(config.run.seed)  # identical initial weights on every rank
    encoder = build_encoder(section.model).to(device)
    if initial is not None:
        encoder.load_state_dict(initial)
    optimizer = make_optimizer(encoder.parameters(), optim)
    scaler = grad_scaler(device, precision)
    seed_everything(config.run.seed + job.rank)  # then a different random stream per rank
    # what the checkpoint holds, by name: training_state() writes it, restore_training_state() reads it back
    models, optimizers, scalers = {"encoder": encoder}, {"encoder": optimizer}, {"encoder": scaler}
    step = restore_training_state(checkpoint, job, models, optimizers, scalers, config=config) if checkpoint else 0
    ema = optional_ema(encoder, optim.ema_decay, models, checkpoint)
    model = wrap_ddp(encoder, job)
    batches = training_batches(train_set, config, optim, step, job)
    variants = stage_variants(config, section, train_set, vqgan, job, deadline)

    def encode(ct: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return ct_latent(vqgan, ct.to(device))

    log, stop = StageLog(config, STAGE, optim, job, step), False
    while step < optim.max_steps and not stop:
        batch = next(batches)
        if section.image_weight > 0:  # the decoded prior is compared with the (warped) CT itself
            ct, xray = variants(batch, step)
            ct = ct.to(device, non_blocking=True)  # (B, 1, D, H, W)
            target = encode(ct)
            bone = bone_fractions(ct, variants.bone_latent_size) if variants.bone_latent_size else None
        else:  # stored pairs, fresh variants, or variants drawn from the run's bank
            target, xray, bone = variants.latent_pairs(batch, step, encode)  # (B, 8, d, h, w), bone (B, 1, d, h, w)
        target, xray = target.to(device, non_blocking=True), xray.to(device, non_blocking=True)  # xray (B, 1, H, W)
        lr = learning_rate(step, optim)
        set_learning_rate(optimizer, lr)
        with autocast(device, precision):
            prediction = model(xray)
            latent_loss = F.mse_loss(prediction.float(), target.float())
            losses = {"latent_mse": latent_loss}
            loss = latent_loss
            if bone is not None:  # encoder.bone_weight: the cells that hold bone count more
                weight = 1.0 + section.bone_weight * bone.to(device)
                loss = losses["weighted_latent_mse"] = ((prediction.float() - target.float()) ** 2 * weight).mean() / weight.mean()
            if section.image_weight > 0:  # the decoded prior against the CT (gradient straight through q)
                n = section.image_items or len(ct)
                decoded = vqgan.decode(vqgan.quantize(prediction[:n].float())[0])
                losses["image_l1"] = F.l1_loss(decoded.float(), ct[:n])
                loss = loss + section.image_weight * losses["image_l1"]
        backward_step(loss, list(encoder.parameters()), optimizer, scaler, optim.grad_clip)
        if ema is not None:
            ema.update(encoder)

        step, stop = step + 1, deadline.passed()  # the time limit and SIGTERM: checkpoint, then stop
        log.add(losses)
        if is_due(step, optim.log_every, optim.max_steps) or stop:
            log.write(step, {**log.means(), "lr": lr})
        if val_items and is_due(step, optim.val_every, optim.max_steps):
            log.write(step, validate(ema.module if ema else encoder, vqgan, val_items, device, precision))
        if is_due(step, optim.checkpoint_every, optim.max_steps) or stop:
            save_stage_checkpoint(config, STAGE, step, job, {**training_state(job, models, optimizers, scalers),
                                                             "latents": latents})
    return log.close(deadline, step)
