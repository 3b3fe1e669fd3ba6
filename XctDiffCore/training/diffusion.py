"""Stage 3: the latent UNet, conditioned on the progressive encoder's prior (eq. 7).

Per pair, with both earlier stages frozen: the target ``x0 = N(q(E(ct)))`` (the CT's normalised
quantised latent) and the condition ``y = N(q(encoder(xray)))`` (the prior). Loss: noise-prediction
MSE at a uniform timestep, or v-prediction MSE with ``diffusion.schedule.prediction: v``
(:func:`XctDiffCore.diffusion.diffusion_loss`); its timesteps and noise come
from a per-rank generator that the checkpoint saves, so a resumed run draws the same noise. An EMA
of the weights (:class:`EMA`) is what validation samples with (DDIM) and what gets exported.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import Config, UNetConfig
from .autoencoder import trained_autoencoder
from ..diffusion import Denoiser, NoiseSchedule, sample
from .common import (
    EMA,
    Deadline,
    Distributed,
    StageLog,
    autocast,
    backward_step,
    checkpoint_step,
    grad_scaler,
    is_due,
    latents_changed,
    latents_record,
    learning_rate,
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
from .encoder import ct_latent, trained_encoder
from .variant_bank import stage_variants
from .warm_start import warm_start

STAGE = "diffusion"


def build_unet(model: UNetConfig):
    from ..models.unet import LatentUNet

    return LatentUNet(**dataclasses.asdict(model))


def augment_condition(cond: torch.Tensor, max_std: float, generator: torch.Generator) -> torch.Tensor:
    """Conditioning augmentation (``diffusion.cond_noise``): each prior plus Gaussian noise of a std
    drawn uniformly from [0, ``max_std``]; ``max_std`` 0 returns the priors unchanged (no draws)."""
    if max_std <= 0:
        return cond
    level = max_std * torch.rand((len(cond),) + (1,) * (cond.dim() - 1), device=cond.device, generator=generator)
    return cond + level * torch.randn(cond.shape, device=cond.device, generator=generator)


def diffusion_loss(
    model: Denoiser,
    x0: torch.Tensor,
    cond: torch.Tensor,
    schedule: NoiseSchedule,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Eq. 7: ``E ||eps - eps_theta(x_t, t, y)||^2`` with t uniform in [0, T) and eps ~ N(0, I).

    With a v-prediction schedule the target is v instead of eps (:meth:`NoiseSchedule.target`).
    ``x0`` are the clean (normalised) VQ latents of the CTs, ``cond`` the priors y of their radiographs.
    A ``generator`` must live on ``x0``'s device.
    """
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_train_steps, (b,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = schedule.add_noise(x0, noise, t)
    return F.mse_loss(model(x_t, t, cond), schedule.target(x0, noise, t))


@torch.no_grad()
def validate(ema, encoder, vqgan, schedule, items: list, device, precision: str, steps: int, seed: int) -> dict:
    """DDIM reconstructions of the validation pairs from a fixed noise seed (the global RNG is untouched)."""
    scores = []
    generator = torch.Generator("cpu").manual_seed(seed)
    for item in items:
        ct, xray = item["image"][None].to(device), item["xray"][None].to(device)
        with autocast(device, precision):
            cond = encoder.prior(xray, vqgan.quantize).float()
            latent = sample(ema, cond, tuple(cond.shape), schedule, sampler="ddim", steps=steps, generator=generator)
            recon = vqgan.decode(vqgan.quantize(latent)[0])
        scores.append(volume_metrics(recon.float(), ct))
    return mean_scores(scores)


def train_diffusion(config: Config, resume: bool, job: Distributed, deadline: Deadline) -> Path:
    """Train the latent UNet on the run's frozen VQ-GAN and encoder; returns its checkpoint path."""
    section, optim, device, precision = config.diffusion, config.diffusion.optim, job.device, config.run.precision
    initial = warm_start(config, STAGE, job)  # --init: weights from a model folder, earlier stages copied in
    vqgan, _ = trained_autoencoder(config.run.dir, STAGE, device, config)
    latents = latents_record(vqgan, checkpoint_step(config.run.dir, "autoencoder"))  # what the checkpoint records
    encoder, _ = trained_encoder(config.run.dir, STAGE, device, latents)  # one of other latents: refused
    checkpoint = prepare_stage_dir(config.run.dir, STAGE, resume, config.data.datalist)
    changed = checkpoint and job.is_main and latents_changed(f"the {STAGE} stage", checkpoint.get("latents"), latents)
    if changed:
        warnings.warn(f"{changed}: the diffusion stage goes on from step {checkpoint['step']} on the new ones",
                      stacklevel=2)
    train_set, val_items = stage_data(config, job)
    schedule = NoiseSchedule(**dataclasses.asdict(section.schedule))
    loss_name = "noise_mse" if schedule.prediction == "epsilon" else "v_mse"  # the logged training loss

    seed_everything(config.run.seed)  # identical initial weights on every rank
    unet = build_unet(section.model).to(device)
    if initial is not None:
        unet.load_state_dict(initial)
    ema = EMA(unet, optim.ema_decay)
    optimizer = make_optimizer(unet.parameters(), optim)
    scaler = grad_scaler(device, precision)
    noise = torch.Generator(device).manual_seed(config.run.seed + job.rank)  # timesteps and noise of eq. 7
    seed_everything(config.run.seed + job.rank)  # then a different random stream per rank
    # what the checkpoint holds, by name: training_state() writes it, restore_training_state() reads it back
    models, optimizers, scalers, generators = {"unet": unet, "ema": ema}, {"unet": optimizer}, {"unet": scaler}, {"noise": noise}
    step = restore_training_state(checkpoint, job, models, optimizers, scalers, generators, config=config) if checkpoint else 0
    model = wrap_ddp(unet, job)
    batches = training_batches(train_set, config, optim, step, job)
    variants = stage_variants(config, section, train_set, vqgan, job, deadline)

    def encode(ct: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(device, precision):
            return ct_latent(vqgan, ct.to(device))

    log, stop = StageLog(config, STAGE, optim, job, step), False
    while step < optim.max_steps and not stop:
        # stored pairs, fresh variants, or variants drawn from the run's bank
        x0, xray, _ = variants.latent_pairs(next(batches), step, encode)
        x0 = x0.to(device, non_blocking=True).float()  # (B, 8, d, h, w), zero mean and unit variance per voxel
        xray = xray.to(device, non_blocking=True)  # (B, 1, H, W)
        lr = learning_rate(step, optim)
        set_learning_rate(optimizer, lr)
        with torch.no_grad(), autocast(device, precision):
            cond = encoder.prior(xray, vqgan.quantize).float()  # y, same shape
            cond = augment_condition(cond, section.cond_noise, noise)
        with autocast(device, precision):
            loss = diffusion_loss(model, x0, cond, schedule, generator=noise)
        backward_step(loss, list(unet.parameters()), optimizer, scaler, optim.grad_clip)
        ema.update(unet)

        step, stop = step + 1, deadline.passed()  # the time limit and SIGTERM: checkpoint, then stop
        log.add({loss_name: loss})
        if is_due(step, optim.log_every, optim.max_steps) or stop:
            log.write(step, {**log.means(), "lr": lr})
        if val_items and is_due(step, optim.val_every, optim.max_steps):
            log.write(step, validate(ema, encoder, vqgan, schedule, val_items, device, precision,
                                     optim.val_sample_steps, config.run.seed))
        if is_due(step, optim.checkpoint_every, optim.max_steps) or stop:
            save_stage_checkpoint(config, STAGE, step, job, {**training_state(job, models, optimizers, scalers, generators),
                                                             "latents": latents})
    return log.close(deadline, step)
