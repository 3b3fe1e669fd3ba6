"""Stage 3: the latent UNet, conditioned on the progressive encoder's prior (eq. 7).

Per pair, with both earlier stages frozen: the target ``x0 = N(q(E(ct)))`` (the CT's normalised
quantised latent) and the condition ``y = N(q(encoder(xray)))`` (the prior). Loss: noise-prediction
MSE at a uniform timestep, or v-prediction MSE with ``diffusion.schedule.prediction: v``
(:func:`XctDiffCore.diffusion.diffusion_loss`); its timesteps and noise come
from a per-rank generator that the checkpoint saves, so a resumed run draws the same noise. An EMA
of the weights is what validation samples with (DDIM) and what gets exported.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from ..config import Config, UNetConfig
from .autoencoder import check_latent_compatible, trained_autoencoder
from .common import (
    Deadline,
    StageLoop,
    autocast,
    backward_step,
    cleanup_distributed,
    gather_rng_states,
    grad_scaler,
    learning_rate,
    make_optimizer,
    prepare_stage_dir,
    restore_rng_states,
    seed_everything,
    set_learning_rate,
    setup_distributed,
    volume_metrics,
    wrap_ddp,
)
from .data import PairDataset, train_loader
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


@torch.no_grad()
def validate(ema, encoder, vqgan, schedule, items: list, device, precision: str, steps: int, seed: int) -> dict:
    """DDIM reconstructions of the validation pairs from a fixed noise seed (the global RNG is untouched)."""
    from ..diffusion import sample

    scores = []
    generator = torch.Generator("cpu").manual_seed(seed)
    for item in items:
        ct, xray = item["image"][None].to(device), item["xray"][None].to(device)
        with autocast(device, precision):
            cond = encoder.prior(xray, vqgan.quantize).float()
            latent = sample(ema, cond, tuple(cond.shape), schedule, sampler="ddim", steps=steps, generator=generator)
            recon = vqgan.decode(vqgan.quantize(latent)[0])
        scores.append(volume_metrics(recon.float(), ct))
    return {
        "val/psnr": sum(s["psnr"] for s in scores) / len(scores),
        "val/ssim": sum(s["ssim"] for s in scores) / len(scores),
    }


def train_diffusion(config: Config, resume: bool = False, time_limit: Optional[float] = None) -> Path:
    """Train the latent UNet on the run's frozen VQ-GAN and encoder; returns its checkpoint path."""
    job = setup_distributed()
    try:
        return _train(config, resume, job, Deadline(time_limit, job))
    finally:
        cleanup_distributed(job)


def _train(config: Config, resume: bool, job, deadline) -> Path:
    from ..diffusion import EMA, NoiseSchedule, diffusion_loss

    section, optim, device = config.diffusion, config.diffusion.optim, job.device
    initial = warm_start(config, STAGE, job)  # --init: weights from a model folder, earlier stages copied in
    vqgan, trained = trained_autoencoder(config.run.dir, STAGE, device)
    check_latent_compatible(trained, config)
    encoder, _ = trained_encoder(config.run.dir, STAGE, device)
    checkpoint = prepare_stage_dir(config.run.dir, STAGE, resume)
    train_set = PairDataset(config.data.datalist, "training", config.data.volume_size, config.data.xray_size)
    val_set = PairDataset(config.data.datalist, "validation", config.data.volume_size, config.data.xray_size)
    schedule = NoiseSchedule(**dataclasses.asdict(section.schedule))
    loss_name = "noise_mse" if schedule.prediction == "epsilon" else "v_mse"  # the logged training loss

    seed_everything(config.run.seed)  # identical initial weights on every rank
    unet = build_unet(section.model).to(device)
    if initial is not None:
        unet.load_state_dict(initial)
    ema = EMA(unet, optim.ema_decay)
    optimizer = make_optimizer(unet.parameters(), optim)
    scaler = grad_scaler(device, config.run.precision)
    noise = torch.Generator(device).manual_seed(config.run.seed + job.rank)  # timesteps and noise of eq. 7
    step = 0
    seed_everything(config.run.seed + job.rank)
    if checkpoint is not None:
        unet.load_state_dict(checkpoint["models"]["unet"])
        ema.load_state_dict(checkpoint["models"]["ema"])
        optimizer.load_state_dict(checkpoint["optimizers"]["unet"])
        scaler.load_state_dict(checkpoint["scalers"]["unet"])
        step = checkpoint["step"]
        restore_rng_states(checkpoint["rng"], job, {"noise": noise})
    model = wrap_ddp(unet, job)

    batches = iter(
        train_loader(train_set, optim.batch_size, config.run.seed, step, job.rank, job.world_size, config.data.num_workers)
    )
    val_items = [val_set[i] for i in range(min(config.data.val_cases, len(val_set)))] if job.is_main else []
    loop = StageLoop(config, STAGE, optim, job, deadline, step)
    validation = (lambda: validate(ema, encoder, vqgan, schedule, val_items, device, config.run.precision,
                                   optim.val_sample_steps, config.run.seed)) if val_items else None

    def state() -> dict:
        return {"models": {"unet": unet.state_dict(), "ema": ema.state_dict()}, "optimizers": {"unet": optimizer.state_dict()},
                "scalers": {"unet": scaler.state_dict()}, "rng": gather_rng_states(job, {"noise": noise})}

    variants = stage_variants(config, section, train_set, vqgan, job, deadline)

    def encode(ct: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(device, config.run.precision):
            return ct_latent(vqgan, ct.to(device))

    while loop.running():
        # stored pairs, fresh variants, or variants drawn from the run's bank
        x0, xray = variants.latent_pairs(next(batches), loop.step, encode)
        x0 = x0.to(device, non_blocking=True).float()  # (B, 8, d, h, w), zero mean and unit variance per voxel
        xray = xray.to(device, non_blocking=True)  # (B, 1, H, W)
        lr = learning_rate(loop.step, optim)
        set_learning_rate(optimizer, lr)
        with torch.no_grad(), autocast(device, config.run.precision):
            cond = encoder.prior(xray, vqgan.quantize).float()  # y, same shape
            cond = augment_condition(cond, section.cond_noise, noise)
        with autocast(device, config.run.precision):
            loss = diffusion_loss(model, x0, cond, schedule, generator=noise)
        backward_step(loss, list(unet.parameters()), optimizer, scaler, optim.grad_clip)
        ema.update(unet)
        loop.end_step({loss_name: loss}, lr, state, validation)
    return loop.close()
