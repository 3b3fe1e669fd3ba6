"""One configuration for a whole XctDiff run: plain YAML mapped onto typed dataclasses.

A config file has one section per stage (``autoencoder``, ``encoder``, ``diffusion``), each with a
``model`` subsection whose fields are exactly the network's constructor arguments and an ``optim``
subsection, plus ``data`` (the datalist and the sizes the models see) and ``run`` (run folder, seed,
precision). Every field is written out in the dataclasses below, so a reader sees every knob and a
misspelt key fails at once with its dotted name (``autoencoder.model.chanels``) instead of being
ignored. Nothing is instantiated from a class-name string.

Configs are found by name (``tiny``, ``preview``, ``small``, ``paper``: ``XctDiffCore/configs/<name>.yaml``) or by
path. PyYAML is imported only when a ``.yaml`` file is read, so a JSON config (``.json``, same
structure) loads with the standard library alone, e.g. on a bare GPU machine.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .atomic import atomic_path
from .errors import XctDiffError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
STAGES = ("autoencoder", "encoder", "diffusion", "style", "coarse")
PRECISIONS = ("bf16", "fp16", "fp32")
PREDICTIONS = ("epsilon", "v")  # what the diffusion UNet outputs (see XctDiffCore.diffusion.NoiseSchedule)
SAMPLERS = ("ddim", "dpm-solver++")  # diffusion samplers (XctDiffCore.diffusion); here, torch-free, for the CLI's parser
METHODS = ("diffusion", "direct")  # reconstruction paths; direct: the encoder's prior decoded without diffusion
UPSAMPLING = ("resize", "transpose")  # the style generator's x2 layers (XctDiffCore.models.cyclegan.upsampling_layer)
CRITIC_AUGMENTS = ("translation", "cutout")  # what the style critics may see (XctDiffCore.models.cyclegan.critic_augment)


# ----------------------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    """Where a run lives and how it is made reproducible."""

    dir: str = "runs/paper"  # one sub-folder per stage: <dir>/<stage>/checkpoint.pt, log.csv, ...
    seed: int = 0
    precision: str = "bf16"  # autocast dtype on CUDA (CPU always trains in fp32)
    init: str = ""  # model folder whose weights start the stage (fine-tuning); --init overrides it


@dataclass
class DataConfig:
    """The datalist (from ``xctdiff prepare``) and the sizes the models see (downsampled on the fly)."""

    datalist: str = ""  # path to datalist.json; --data overrides it
    volume_size: int = 128  # CT edge in voxels (the prepared 128^3 volume is average-pooled to it)
    xray_size: int = 128  # radiograph edge in pixels (area interpolation)
    num_workers: int = 2
    val_cases: int = 4  # validation items evaluated per validation pass (the first of the list)


@dataclass
class OptimConfig:
    """Adam(W) with a linear warm-up and then a constant learning rate (so --max-steps never changes the schedule)."""

    batch_size: int = 1  # per process
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max gradient norm; 0 disables clipping
    max_steps: int = 100_000
    log_every: int = 50
    val_every: int = 2_000
    checkpoint_every: int = 1_000


@dataclass
class AveragedOptimConfig(OptimConfig):
    """``ema_decay > 0``: validate and export an exponential moving average of the network's weights (0: the
    weights themselves, as in the paper). On a few patients (and for a VQ-GAN beside its critics) the
    weights swing from step to step on the validation patients; their average is steadier than any one."""

    ema_decay: float = 0.0


@dataclass
class AutoencoderModelConfig:
    """Arguments of :class:`XctDiffCore.models.vqgan.VQGAN`."""

    in_channels: int = 1
    channels: tuple[int, ...] = (64, 128, 256)  # one level per entry; the latent is 2**(levels-1) smaller
    num_res_blocks: int = 2
    latent_channels: int = 8
    codebook_size: int = 8192
    beta: float = 0.25
    super_resolution: bool = True
    norm_groups: int = 32


@dataclass
class DiscriminatorConfig:
    """Arguments of one :class:`XctDiffCore.models.discriminators.PatchDiscriminator` (besides ``spatial_dims``)."""

    in_channels: int = 1
    channels: int = 64
    num_layers: int = 3
    norm_groups: int = 32


@dataclass
class AutoencoderLossConfig:
    """Arguments of :class:`XctDiffCore.training.losses.AutoencoderLoss` (eqs. 3-4), plus where LPIPS weights are."""

    l1_weight: float = 1.0
    bone_weight: float = 0.0  # extra L1 on the truth's bone voxels (HU > 200); 0 = the paper's loss
    ssim_weight: float = 0.0  # weight of 1 - 3D SSIM (the evaluation's); 0 = the paper's loss
    perceptual_weight: float = 1.0
    codebook_weight: float = 1.0
    gan_weight: float = 0.1
    gan_3d_weight: float = 1.0  # alpha of eq. 3
    gan_2d_weight: float = 1.0  # beta of eq. 3
    disc_start: int = 10_000  # warm-up: the critics join at this step
    slices_per_axis: int = 2
    adaptive_weight: bool = True
    lpips_weights: str = ""  # LPIPS safetensors file; "" = the default cache; LPIPS is left out if absent


@dataclass
class AugmentConfig:
    """On-the-fly random variants of the training CTs (:func:`XctDiffCore.training.variants.random_views`).

    Off unless ``enabled``; the magnitudes are its arguments: degrees, relative size per axis, share of
    the edge, mm of elastic displacement on an ``elastic_grid^3`` lattice, relative and HU jitter.
    ``bank`` (radiograph stages only): make that many variants of each training CT once, with their
    target latents, and draw from them (:mod:`XctDiffCore.training.variant_bank`); 0: fresh every step.
    """

    enabled: bool = False
    max_rotation_deg: float = 5.0
    max_scale: float = 0.10
    max_translation: float = 0.04
    elastic_mm: float = 3.0
    elastic_grid: int = 5
    max_hu_scale: float = 0.03
    max_hu_offset: float = 20.0
    bank: int = 0

    def magnitudes(self) -> dict:
        """The keyword arguments of ``random_views``; all magnitudes 0 when not ``enabled`` (a crop only)."""
        return {k: (v if self.enabled or k == "elastic_grid" else 0.0)
                for k, v in dataclasses.asdict(self).items() if k not in ("enabled", "bank")}


@dataclass
class FilmConfig:
    """Film-side randomisation of the on-the-fly DRRs (:func:`XctDiffCore.training.variants.random_films`).

    Off unless ``enabled``; each value is the largest strength drawn: gamma (relative), contrast,
    detector blur (pixels), Gaussian noise (in [0, 1] units), scatter haze (share of a blurred copy).
    """

    enabled: bool = False
    max_gamma: float = 0.25
    max_contrast: float = 0.15
    max_blur_px: float = 1.0
    max_noise: float = 0.02
    max_haze: float = 0.15

    def magnitudes(self) -> Optional[dict]:
        """The keyword arguments of ``random_films``, or None when not ``enabled`` (the plain DRR)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "enabled"} if self.enabled else None


@dataclass
class AutoencoderConfig:
    """``patch_size > 0`` trains on random ``patch_size^3`` crops of the (augmented) volumes: the networks
    are fully convolutional and the codebook is spatial, so the VQ-GAN still encodes and decodes whole
    volumes at inference, while a step costs a fraction of a whole-volume step.

    ``decoder_only`` trains the decoder (and its super-resolution tail) with the encoder and codebook
    frozen: the latent space stays put, so an encoder and a diffusion stage trained on it stay valid
    while the decoder sharpens (fine-tuning with ``--init``)."""

    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    disc_3d: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    disc_2d: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    optim: AveragedOptimConfig = field(default_factory=lambda: AveragedOptimConfig(batch_size=1, lr=2e-4, betas=(0.5, 0.9)))
    patch_size: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    decoder_only: bool = False


@dataclass
class EncoderModelConfig:
    """Arguments of :class:`XctDiffCore.models.progressive_encoder.ProgressiveEncoder`."""

    image_size: int = 128  # = data.xray_size
    in_channels: int = 1
    channels_2d: tuple[int, ...] = (64, 128, 256)
    num_res_blocks: int = 2
    depth: int = 32  # = the VQ latent's D
    lift_channels: int = 32
    channels_3d: tuple[int, ...] = (128, 128)
    latent_channels: int = 8
    norm_groups: int = 32
    lift: str = "mlp"  # "mlp" (the paper) or "geometric" (back-projection along the DRR's rays)
    geometry: str = "cone"  # the geometric lift's rays: the training DRRs' geometry ("cone" or "parallel")
    source_to_isocenter_mm: float = 541.0  # the cone geometry: drr.ConeGeometry's defaults
    source_to_detector_mm: float = 949.0
    detector_size_mm: float = 500.0
    field_of_view_mm: float = 320.0  # the CT cube: 128 voxels x 2.5 mm


@dataclass
class EncoderConfig:
    """The progressive encoder learns ``F.mse_loss(encoder(xray), y_ct)`` against the frozen VQ-GAN's latents.

    ``image_weight > 0`` adds ``image_weight * L1(decode(q(encoder(xray))), ct)``: the prior decoded by
    the frozen VQ-GAN (straight-through quantiser) against the CT itself, on the training grid.
    Decoding with a gradient is the costly part, so only the first ``image_items`` pairs of each batch
    are decoded (0: all of them).

    ``bone_weight > 0`` weights each latent cell's squared error by ``1 + bone_weight x`` the fraction of
    its voxels above 200 HU (normalised by the mean weight): bone is a few per cent of a chest, and an
    MSE on the latent averages it away even on the training patients (0: off, the paper).

    ``augment``/``film`` enabled: each step trains on fresh variants of the stored pairs instead of the
    pairs themselves: the CT warped (its target latent encoded from the warp), its DRR rendered anew and
    randomised on the film side (:class:`XctDiffCore.training.variants.PairVariants`).
    """

    model: EncoderModelConfig = field(default_factory=EncoderModelConfig)
    image_weight: float = 0.0
    image_items: int = 0
    bone_weight: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    film: FilmConfig = field(default_factory=FilmConfig)
    optim: AveragedOptimConfig = field(default_factory=lambda: AveragedOptimConfig(batch_size=16, lr=1e-4))


@dataclass
class UNetConfig:
    """Arguments of :class:`XctDiffCore.models.unet.LatentUNet`."""

    latent_channels: int = 8
    channels: tuple[int, ...] = (128, 256, 512)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_heads: int = 4
    conditioning: str = "cross_attention"  # or "concat" (the reference code)
    norm_groups: int = 32


@dataclass
class ScheduleConfig:
    """Arguments of :class:`XctDiffCore.diffusion.NoiseSchedule` (the paper's betas)."""

    num_train_steps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0125
    prediction: str = "epsilon"  # what the UNet outputs: "epsilon" (the paper) or "v" (Salimans & Ho 2022)


@dataclass
class DiffusionOptimConfig(OptimConfig):
    ema_decay: float = 0.9999
    val_sample_steps: int = 50  # DDIM steps of the validation reconstructions


@dataclass
class DiffusionConfig:
    """``cond_noise > 0`` is conditioning augmentation (Ho et al. 2022, cascaded diffusion): in training,
    each prior y gets Gaussian noise of a std drawn uniformly from [0, cond_noise] (y has unit variance
    per voxel), because on the training patients the encoder's priors are much closer to their targets
    than on new patients, and a model that learns to trust them fully adds nothing at test time.
    ``augment``/``film``: fresh pair variants per step, as for the encoder."""

    model: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: DiffusionOptimConfig = field(default_factory=lambda: DiffusionOptimConfig(batch_size=8, lr=1e-4))
    cond_noise: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    film: FilmConfig = field(default_factory=FilmConfig)


@dataclass
class StyleModelConfig:
    """Arguments of :class:`XctDiffCore.models.cyclegan.ResnetGenerator` (both generators of the CycleGAN)."""

    in_channels: int = 1
    out_channels: int = 1
    channels: int = 64
    num_res_blocks: int = 6
    num_downsamples: int = 2  # data.xray_size must be a multiple of 2**num_downsamples
    upsample: str = "resize"  # "resize" (nearest + 3x3 conv, no checkerboard) or "transpose" (CycleGAN's, older weights)


@dataclass
class StyleLossConfig:
    """Weights of the CycleGAN objective (Zhu et al. 2017 defaults) and the critics' pool of past fakes."""

    cycle_weight: float = 10.0
    identity_weight: float = 5.0  # 0 leaves the identity term out
    edge_weight: float = 0.0  # 1 - correlation of gradient magnitudes, input vs output, per generator; 0: the paper's CycleGAN
    pool_size: int = 50
    edge_sigma: float = 0.0  # the edge term on images smoothed by this Gaussian (pixels): bones count, film grain does not
    critic_augment: tuple[str, ...] = ()  # DiffAugment for the critics: "translation", "cutout" (models.cyclegan.critic_augment)


@dataclass
class StyleConfig:
    """Real radiograph -> DRR style transfer; the DRR domain is the datalist's ``xray`` images at ``data.xray_size``."""

    real: tuple[str, ...] = ()  # folders (searched recursively) or glob patterns of real films, from the working directory
    # enabled: the DRR domain is augment.bank DRRs of each training CT (the first of the CT itself, the others of
    # random warps), made once at the start, instead of the datalist's one each (:class:`~.training.style.WarpedDrrs`)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: StyleModelConfig = field(default_factory=StyleModelConfig)
    critic: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: StyleLossConfig = field(default_factory=StyleLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(batch_size=1, lr=2e-4, betas=(0.5, 0.999)))


@dataclass
class CoarseConfig:
    """The coarse CT (:mod:`XctDiffCore.models.coarse`): the film -> the CT average-pooled to the latent grid,
    a residual over the training mean, MSE in the model's units, on fresh variants of the pairs
    (``augment``/``film``; no bank: the target needs no autoencoder). Its network is the encoder's
    (``encoder.model`` with one output channel, :meth:`Config.coarse_model`) and starts from the run's
    trained encoder, with a new head. ``blend``: its weight in the direct path's CT."""

    blend: float = 0.5
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(enabled=True))
    film: FilmConfig = field(default_factory=lambda: FilmConfig(enabled=True))
    optim: AveragedOptimConfig = field(default_factory=lambda: AveragedOptimConfig(batch_size=4, lr=3e-4, ema_decay=0.99))


@dataclass
class Config:
    """A whole run. A later section (e.g. ``style``) is one more dataclass field here and in the YAML."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    style: StyleConfig = field(default_factory=StyleConfig)
    coarse: CoarseConfig = field(default_factory=CoarseConfig)

    def validate(self) -> "Config":
        """Refuse values that no run can use, in one sentence each."""
        if self.run.precision not in PRECISIONS:
            raise XctDiffError(f"run.precision must be one of {', '.join(PRECISIONS)}, got {self.run.precision!r}")
        if self.diffusion.model.conditioning not in ("cross_attention", "concat"):
            raise XctDiffError(
                f"diffusion.model.conditioning must be 'cross_attention' or 'concat', got {self.diffusion.model.conditioning!r}"
            )
        for stage in STAGES:
            optim = getattr(self, stage).optim
            for name in ("batch_size", "max_steps", "log_every", "val_every", "checkpoint_every"):
                if getattr(optim, name) < 1:
                    raise XctDiffError(f"{stage}.optim.{name} must be at least 1, got {getattr(optim, name)}")
            if optim.lr <= 0:
                raise XctDiffError(f"{stage}.optim.lr must be positive, got {optim.lr}")
            if min(optim.weight_decay, optim.warmup_steps, optim.grad_clip) < 0:
                raise XctDiffError(f"{stage}.optim.weight_decay, warmup_steps and grad_clip must be 0 or more")
            if not all(0.0 <= beta < 1.0 for beta in optim.betas):
                raise XctDiffError(f"{stage}.optim.betas must lie in [0, 1), got {list(optim.betas)}")
        if self.data.num_workers < 0 or self.data.val_cases < 0:
            raise XctDiffError("data.num_workers and data.val_cases must be 0 or more")
        self._check_non_negative()
        self._check_diffusion_schedule()
        for name in ("volume_size", "xray_size"):
            if getattr(self.data, name) < 8:
                raise XctDiffError(f"data.{name} must be at least 8, got {getattr(self.data, name)}")
        self._check_shapes()
        patch, factor = self.autoencoder.patch_size, 2 ** (len(self.autoencoder.model.channels) - 1)
        smallest = 3 * 2 ** self.autoencoder.disc_3d.num_layers  # the volume critic's smallest input
        if patch and (patch % factor or not smallest <= patch <= self.data.volume_size):
            raise XctDiffError(f"autoencoder.patch_size must be 0 (whole volumes) or a multiple of {factor} "
                               f"between {smallest} and data.volume_size ({self.data.volume_size}), got {patch}")
        style_factor = 2**self.style.model.num_downsamples
        if self.data.xray_size % style_factor:
            raise XctDiffError(f"data.xray_size ({self.data.xray_size}) must be a multiple of {style_factor} (style.model.num_downsamples)")
        if set(self.style.loss.critic_augment) - set(CRITIC_AUGMENTS):
            raise XctDiffError(f"style.loss.critic_augment may name {', '.join(CRITIC_AUGMENTS)}, got {list(self.style.loss.critic_augment)}")
        if self.style.augment.enabled and self.style.augment.bank < 1:
            raise XctDiffError("style.augment.enabled needs style.augment.bank >= 1 (DRRs per training CT, made once)")
        if self.style.model.upsample not in UPSAMPLING:
            raise XctDiffError(f"style.model.upsample must be one of {', '.join(UPSAMPLING)}, got {self.style.model.upsample!r}")
        if self.diffusion.schedule.prediction not in PREDICTIONS:
            raise XctDiffError(f"diffusion.schedule.prediction must be one of {', '.join(PREDICTIONS)}, "
                               f"got {self.diffusion.schedule.prediction!r}")
        if self.encoder.image_weight < 0 or self.encoder.image_items < 0 or self.encoder.bone_weight < 0:
            raise XctDiffError("encoder.image_weight, encoder.image_items and encoder.bone_weight must be 0 or more")
        for stage in ("autoencoder", "encoder", "coarse", "diffusion"):
            if not 0.0 <= getattr(self, stage).optim.ema_decay < 1.0:
                raise XctDiffError(f"{stage}.optim.ema_decay must be in [0, 1) (0: no average), got {getattr(self, stage).optim.ema_decay}")
        if self.diffusion.cond_noise < 0:
            raise XctDiffError("diffusion.cond_noise must be 0 or more")
        for stage in ("encoder", "diffusion"):
            if getattr(self, stage).augment.bank < 0:
                raise XctDiffError(f"{stage}.augment.bank must be 0 (fresh variants) or more, got {getattr(self, stage).augment.bank}")
        if not 0.0 <= self.coarse.blend <= 1.0:
            raise XctDiffError(f"coarse.blend must be in [0, 1], got {self.coarse.blend}")
        if self.coarse.augment.bank:
            raise XctDiffError("coarse.augment.bank must be 0: the coarse CT draws fresh variants")
        if self.autoencoder.augment.bank:
            raise XctDiffError("autoencoder.augment.bank must be 0: the autoencoder draws fresh variants (no latents to keep)")
        if self.encoder.augment.bank and self.encoder.image_weight > 0:
            raise XctDiffError("encoder.image_weight needs the warped CTs: use it with encoder.augment.bank 0")
        return self

    def _check_non_negative(self) -> None:
        """Loss weights and augmentation magnitudes: a negative weight turns a loss into a reward (the total
        runs to minus infinity), a magnitude is a size."""
        sections = {"autoencoder.loss": self.autoencoder.loss, "style.loss": self.style.loss}
        for stage in ("autoencoder", "encoder", "diffusion", "style", "coarse"):
            sections[f"{stage}.augment"] = getattr(self, stage).augment
        for stage in ("encoder", "diffusion", "coarse"):
            sections[f"{stage}.film"] = getattr(self, stage).film
        for where, section in sections.items():
            for key, value in dataclasses.asdict(section).items():  # (a bank has its own sentence below)
                if key != "bank" and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                    raise XctDiffError(f"{where}.{key} must be 0 or more, got {value}")
        model = self.autoencoder.model
        if model.codebook_size < 1 or model.latent_channels < 1 or model.beta < 0:
            raise XctDiffError("autoencoder.model.codebook_size and latent_channels must be at least 1, beta 0 or more")

    def _check_diffusion_schedule(self) -> None:
        """The noise schedule and the validation sampler, before the first step rather than at the first
        validation (a run of the paper's config would lose 10,000 steps)."""
        schedule = self.diffusion.schedule
        if schedule.num_train_steps < 2 or not 0.0 < schedule.beta_start < schedule.beta_end < 1.0:
            raise XctDiffError("diffusion.schedule needs num_train_steps >= 2 and 0 < beta_start < beta_end < 1, got "
                               f"{schedule.num_train_steps}, {schedule.beta_start}, {schedule.beta_end}")
        steps = self.diffusion.optim.val_sample_steps
        if not 1 <= steps <= schedule.num_train_steps:
            raise XctDiffError(f"diffusion.optim.val_sample_steps must be between 1 and diffusion.schedule.num_train_steps "
                               f"({schedule.num_train_steps}), got {steps}")

    def coarse_model(self) -> EncoderModelConfig:
        """The coarse CT's network: the encoder's, with one output channel (the CT at the latent grid)."""
        return dataclasses.replace(self.encoder.model, latent_channels=1)

    def latent_size(self) -> int:
        """Edge of the VQ latent grid: ``data.volume_size / 2**(levels - 1)``."""
        return self.data.volume_size // 2 ** (len(self.autoencoder.model.channels) - 1)

    def _check_shapes(self) -> None:
        """The three stages must agree on the latent's shape; say which key to change when they do not."""
        ae, enc, unet = self.autoencoder.model, self.encoder.model, self.diffusion.model
        factor = 2 ** (len(ae.channels) - 1)
        if self.data.volume_size % factor:
            raise XctDiffError(f"data.volume_size ({self.data.volume_size}) must be a multiple of {factor} (autoencoder levels)")
        latent = self.latent_size()
        checks = [
            (enc.image_size == self.data.xray_size, f"encoder.model.image_size must equal data.xray_size ({self.data.xray_size})"),
            (enc.depth == latent, f"encoder.model.depth must equal the latent size {latent}"),
            (
                enc.image_size // 2 ** (len(enc.channels_2d) - 1) == latent,
                f"encoder.model.image_size / 2**(len(channels_2d) - 1) must equal the latent size {latent}",
            ),
            (enc.latent_channels == ae.latent_channels, "encoder.model.latent_channels must equal autoencoder.model.latent_channels"),
            (unet.latent_channels == ae.latent_channels, "diffusion.model.latent_channels must equal autoencoder.model.latent_channels"),
            (
                latent % 2 ** (len(unet.channels) - 1) == 0,
                f"the latent size {latent} must be a multiple of 2**(len(diffusion.model.channels) - 1)",
            ),
            (len(unet.attention_levels) == len(unet.channels), "diffusion.model.attention_levels needs one flag per level of channels"),
        ]
        for ok, message in checks:
            if not ok:
                raise XctDiffError(message)


# ---------------------------------------------------------------------------------- dict <-> config


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check one YAML value against a field's type hint; lists become tuples, ints become floats."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise XctDiffError(f"config section {key} must be a mapping, got {type(value).__name__}")
        return _from_dict(hint, value, key)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise XctDiffError(f"config key {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise XctDiffError(f"config key {key} must have {len(args)} entries, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is float:
        if isinstance(value, str) and _looks_like_number(value):  # PyYAML reads 1e-3 as text, 1.0e-3 as a number
            raise XctDiffError(f"config key {key} must be a number, got the text {value!r} (YAML wants a dot: write "
                               f"{_yaml_number(value)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise XctDiffError(f"config key {key} must be a number, got {value!r}")
        if not math.isfinite(value):  # a NaN learning rate or weight trains every weight to NaN, silently
            raise XctDiffError(f"config key {key} must be a finite number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise XctDiffError(f"config key {key} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise XctDiffError(f"config key {key} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise XctDiffError(f"config key {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {hint!r} for {key}")


def _looks_like_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _yaml_number(text: str) -> str:
    """``1e-3`` -> ``1.0e-3``: how YAML 1.1 (PyYAML) wants a float in exponent form."""
    mantissa, _, exponent = text.lower().partition("e")
    if exponent and "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{exponent}" if exponent else mantissa


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise XctDiffError(
            f"unknown config key {where}{unknown[0]} (known keys{' of ' + prefix if prefix else ''}: {', '.join(names)})"
        )
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def section_from_dict(cls, data: dict, where: str = ""):
    """One config dataclass (e.g. :class:`UNetConfig`) from plain data: defaults filled, unknown keys raise."""
    return _from_dict(cls, data, where)


def config_from_dict(data: dict) -> Config:
    """A :class:`Config` from nested plain data; missing keys take the defaults, unknown keys raise."""
    if not isinstance(data, dict):
        raise XctDiffError("a config must be a mapping of sections (run, data, autoencoder, encoder, diffusion, style)")
    return _from_dict(Config, data).validate()


def config_to_dict(config) -> dict:
    """Nested plain data (lists, not tuples) for YAML/JSON; the inverse of :func:`config_from_dict`."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


# ------------------------------------------------------------------------------------------- files


def resolve_config_path(name_or_path) -> Path:
    """``tiny`` -> the bundled ``configs/tiny.yaml``; anything with a suffix or a folder is a path."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix or path.parent != Path("."):
        if not path.is_file():
            _refuse_folder(path)
            raise XctDiffError(f"config file not found: {path}")
        return path
    bundled = CONFIG_DIR / f"{text}.yaml"
    if not bundled.is_file():
        _refuse_folder(path)
        known = ", ".join(bundled_config_names()) or "none"
        raise XctDiffError(f"unknown config {text!r} (bundled configs: {known}; or give a path to a .yaml file)")
    return bundled


def _refuse_folder(path: Path) -> None:
    """A folder given for a config (a model folder, most often) is said as such, not as a config "not found"."""
    from .model_manifest import model_files_in

    if path.is_dir():
        model = f": `xctdiff inspect {path}` describes the model" if model_files_in(path) else ""
        raise XctDiffError(f"{path} is a {'model ' if model else ''}folder, not a configuration (a name such as "
                           f"tiny, or a .yaml file){model}")


def bundled_config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _unique_key_loader(yaml):
    """PyYAML's safe loader, refusing a key given twice in one mapping (which YAML forbids and PyYAML lets the last
    win): a section appended to a copied config (``style:`` with only ``real:``) silently replaced the whole one
    above it, its networks and steps falling back to the defaults."""
    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                lines = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden: not a duplicate
                        continue
                    key = self.construct_object(key_node, deep=True)
                    if key in lines:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"the key {key!r} is given twice (first on line {lines[key]})", key_node.start_mark)
                    lines[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_config(name_or_path) -> Config:
    """Read a config by bundled name or path (``.yaml``/``.yml`` with PyYAML, ``.json`` with the stdlib)."""
    path = resolve_config_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise XctDiffError(f"{path} is not a config: not a text file") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise XctDiffError(f"{path} is not valid JSON: {exc}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise XctDiffError(
                f"reading {path.name} needs PyYAML (pip install pyyaml), or pass the same config as .json"
            ) from None
        try:
            data = yaml.load(text, Loader=_unique_key_loader(yaml))
        except yaml.YAMLError as exc:  # its str() spans lines with a quote of the text: keep the problem and where
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or " ".join(str(exc).split())  # never an IndexError on an empty message
            raise XctDiffError(f"{path} is not valid YAML: {problem}{where}") from None
    if not data:  # an empty file would otherwise train the paper's full-size defaults without a word
        raise XctDiffError(f"{path} is empty: a config names its sections (run, data, autoencoder, ...; see "
                           f"{CONFIG_DIR / 'tiny.yaml'})")
    try:
        return config_from_dict(data)
    except XctDiffError as exc:
        raise XctDiffError(f"{path.name}: {exc}") from None


def save_config(config: Config, path) -> Path:
    """Write a config as YAML (``.yaml``) or JSON (``.json``), atomically; :func:`load_config` reads it back."""
    path = Path(path)
    data = config_to_dict(config)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".json":
            tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        else:
            import yaml

            tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
