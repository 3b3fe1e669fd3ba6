"""Stage 1: the 3D VQ-GAN with its volume and slice critics (eqs. 1-4).

Per step: a generator update of the VQ-GAN (L1 + LPIPS + codebook + adaptive-weight GAN terms, see
:class:`XctDiffCore.training.losses.AutoencoderLoss`), then, once the critics have joined at ``disc_start``,
a hinge update of both critics on the real volume and the detached reconstruction. Under torchrun
the VQ-GAN is wrapped in DDP; the critics are averaged by hand (:func:`~.common.backward_step`),
because they sit idle during the generator step. Logs: the loss terms, codebook use (share of the
entries chosen in the interval), validation PSNR/SSIM and codebook use.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from ..config import AutoencoderConfig, AutoencoderModelConfig, Config, config_from_dict
from ..errors import XctDiffError
from .common import (
    Deadline,
    StageLoop,
    autocast,
    backward_step,
    broadcast_parameters,
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


def trained_autoencoder(run_dir, needed_by: str, device: torch.device):
    """The frozen VQ-GAN of a run and its model config (from the checkpoint, not the current config)."""
    checkpoint = trained_stage_checkpoint(run_dir, STAGE, needed_by)
    model_config = config_from_dict(checkpoint["config"]).autoencoder.model
    vqgan = build_autoencoder(model_config)
    vqgan.load_state_dict(checkpoint["models"]["vqgan"])
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


@torch.no_grad()
def validate(vqgan, items: list, device: torch.device, precision: str) -> dict:
    from ..models.quantize import codebook_utilisation

    vqgan.eval()
    scores, codes = [], []
    for item in items:
        x = item["image"][None].to(device)
        with autocast(device, precision):
            x_rec, _, indices = vqgan(x)
        scores.append(volume_metrics(x_rec.float(), x))
        codes.append(indices.reshape(-1).cpu())
    vqgan.train()
    return {
        "val/psnr": sum(s["psnr"] for s in scores) / len(scores),
        "val/ssim": sum(s["ssim"] for s in scores) / len(scores),
        "val/codebook_use": codebook_utilisation(torch.cat(codes), vqgan.codebook_size),
    }


def train_autoencoder(config: Config, resume: bool = False, time_limit: Optional[float] = None) -> Path:
    """Train the VQ-GAN to ``autoencoder.optim.max_steps``; returns its checkpoint path."""
    job = setup_distributed()
    try:
        return _train(config, resume, job, Deadline(time_limit, job))
    finally:
        cleanup_distributed(job)


def _train(config: Config, resume: bool, job, deadline) -> Path:
    from .losses import AutoencoderLoss
    from ..models.lpips import LPIPS
    from ..models.quantize import codebook_utilisation

    section, optim, device = config.autoencoder, config.autoencoder.optim, job.device
    initial = warm_start(config, STAGE, job)  # --init: weights from a model folder, earlier stages copied in
    checkpoint = prepare_stage_dir(config.run.dir, STAGE, resume)
    train_set = PairDataset(config.data.datalist, "training", config.data.volume_size, config.data.xray_size)
    val_set = PairDataset(config.data.datalist, "validation", config.data.volume_size, config.data.xray_size)

    seed_everything(config.run.seed)  # identical initial weights on every rank
    vqgan = build_autoencoder(section.model).to(device)
    if initial is not None:
        vqgan.load_state_dict(initial)
    disc_3d, disc_2d = build_discriminators(section)
    loss_args = {k: v for k, v in dataclasses.asdict(section.loss).items() if k != "lpips_weights"}
    lpips = LPIPS.load(section.loss.lpips_weights or None) if section.loss.perceptual_weight > 0 else None
    loss_fn = AutoencoderLoss(disc_3d, disc_2d, lpips, **loss_args).to(device)
    critics = loss_fn.discriminator_parameters()
    opt_g = make_optimizer(vqgan.parameters(), optim)
    opt_d = make_optimizer(critics, optim)
    scaler_g, scaler_d = grad_scaler(device, config.run.precision), grad_scaler(device, config.run.precision)
    step = 0
    seed_everything(config.run.seed + job.rank)  # then a different random stream per rank
    if checkpoint is not None:
        vqgan.load_state_dict(checkpoint["models"]["vqgan"])
        disc_3d.load_state_dict(checkpoint["models"]["disc_3d"])
        disc_2d.load_state_dict(checkpoint["models"]["disc_2d"])
        opt_g.load_state_dict(checkpoint["optimizers"]["generator"])
        opt_d.load_state_dict(checkpoint["optimizers"]["discriminator"])
        scaler_g.load_state_dict(checkpoint["scalers"]["generator"])
        scaler_d.load_state_dict(checkpoint["scalers"]["discriminator"])
        step = checkpoint["step"]
        restore_rng_states(checkpoint["rng"], job)
    model = wrap_ddp(vqgan, job)
    broadcast_parameters(disc_3d, job)
    broadcast_parameters(disc_2d, job)

    batches = iter(
        train_loader(train_set, optim.batch_size, config.run.seed, step, job.rank, job.world_size, config.data.num_workers)
    )
    val_items = [val_set[i] for i in range(min(config.data.val_cases, len(val_set)))] if job.is_main else []
    loop = StageLoop(config, STAGE, optim, job, deadline, step)
    validation = (lambda: validate(vqgan, val_items, device, config.run.precision)) if val_items else None
    codes = []  # code indices since the last log line: the training codebook use

    def codebook_use() -> dict:
        use = codebook_utilisation(torch.cat(codes), vqgan.codebook_size)
        codes.clear()
        return {"train/codebook_use": use}

    def state() -> dict:
        return {
            "models": {"vqgan": vqgan.state_dict(), "disc_3d": disc_3d.state_dict(), "disc_2d": disc_2d.state_dict()},
            "optimizers": {"generator": opt_g.state_dict(), "discriminator": opt_d.state_dict()},
            "scalers": {"generator": scaler_g.state_dict(), "discriminator": scaler_d.state_dict()},
            "rng": gather_rng_states(job),
        }

    while loop.running():
        step = loop.step
        x = next(batches)["image"]  # (B, 1, D, H, W) in [-1, 1]
        if section.patch_size or section.augment.enabled:  # a fresh variant and/or crop of each volume
            generator = step_generator(config.run.seed, job.rank, step)
            x = random_views(x, generator, section.patch_size or None, **section.augment.magnitudes())
        x = x.to(device, non_blocking=True)
        lr = learning_rate(step, optim)
        set_learning_rate(opt_g, lr)
        set_learning_rate(opt_d, lr)

        for p in critics:  # the critics only judge here; their update comes next
            p.requires_grad_(False)
        with autocast(device, config.run.precision):
            x_rec, codebook_loss, indices = model(x)
            loss, terms = loss_fn.generator_loss(x, x_rec, codebook_loss, step, last_layer=vqgan.last_layer)
        backward_step(loss, list(vqgan.parameters()), opt_g, scaler_g, optim.grad_clip)

        if loss_fn.gan_active(step):
            for p in critics:
                p.requires_grad_(True)
            with autocast(device, config.run.precision):
                d_loss, d_terms = loss_fn.discriminator_loss(x, x_rec, step)
            backward_step(d_loss, critics, opt_d, scaler_d, optim.grad_clip, average_over=job)
            terms.update(d_terms)

        codes.append(indices.detach().reshape(-1).cpu())
        loop.end_step(terms, lr, state, validation, log_extra=codebook_use,
                      shown=("train/total", "train/l1", "train/codebook_use"))
    return loop.close()
