"""Real-radiograph -> DRR style transfer: a 2D CycleGAN (Zhu et al. 2017), as the paper uses it.

The diffusion model is trained on DRRs of CTs; real radiographs differ in contrast curve, noise,
scatter and sharpness. A CycleGAN learns the mapping from unpaired images of both domains: two
ResNet generators (real -> DRR, DRR -> real; resize-convolution upsampling, no checkerboard), two 70x70 PatchGAN critics
(:class:`~XctDiffCore.models.discriminators.PatchDiscriminator`, 2D), least-squares (LSGAN)
adversarial losses, an L1 cycle loss and an L1 identity loss, and a pool of 50 earlier fakes for the
critics (which damps oscillation); optionally the critics see randomly shifted and holed images
(DiffAugment, :func:`critic_augment`), as 15-19 DRRs are too few for them not to learn by heart.
An optional edge term (correlation of gradient magnitudes between each generator's input and output)
keeps ribs, clavicles and spine where the cycle alone lets them go.

Images are single-channel ``(B, 1, H, W)`` in ``[-1, 1]`` inside the networks (tanh output);
:func:`XctDiffCore.style.apply_style` converts from and to the product's ``[0, 1]`` radiographs.
The exported stage ``style`` is the real -> DRR generator alone (``style.safetensors`` + ``style.json``,
written by :mod:`XctDiffCore.training.style`, read by :func:`XctDiffCore.style.load_style_generator`).
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CRITIC_AUGMENTS, UPSAMPLING


# ----------------------------------------------------------------------------------------- blocks
class ResnetBlock(nn.Module):
    """Two reflect-padded 3x3 convolutions with instance norm, added to the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


# --------------------------------------------------------------------------------------- networks
def upsampling_layer(channels: int, out_channels: int, mode: str) -> list[nn.Module]:
    """x2 in-plane. ``"resize"``: nearest-neighbour doubling, then a reflect-padded 3x3 convolution, which
    cannot draw the checkerboard a stride-2 transposed convolution leaves where its kernels overlap
    unevenly (Odena et al. 2016); ``"transpose"``: CycleGAN's original layer, kept to load older weights."""
    if mode == "resize":
        return [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1), nn.Conv2d(channels, out_channels, 3)]
    if mode == "transpose":
        return [nn.ConvTranspose2d(channels, out_channels, 3, stride=2, padding=1, output_padding=1)]
    raise ValueError(f"upsample must be one of {', '.join(UPSAMPLING)}, got {mode!r}")


class ResnetGenerator(nn.Module):
    """c7s1-C, ``num_downsamples`` stride-2 convs (channels doubling), residual blocks, mirrored upsampling, c7s1-out, tanh.

    The image side must be divisible by ``2 ** num_downsamples``. With ``channels=64``,
    ``num_res_blocks=6`` (CycleGAN's choice for 128 px images) it has 7.82 M parameters.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: int = 64,
        num_res_blocks: int = 6,
        num_downsamples: int = 2,
        upsample: str = "resize",
    ):
        super().__init__()
        self.num_downsamples = num_downsamples
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, channels, 7),
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
        ]
        c = channels
        for _ in range(num_downsamples):
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * c), nn.ReLU(inplace=True)]
            c *= 2
        layers += [ResnetBlock(c) for _ in range(num_res_blocks)]
        for _ in range(num_downsamples):
            layers += [*upsampling_layer(c, c // 2, upsample), nn.InstanceNorm2d(c // 2), nn.ReLU(inplace=True)]
            c //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(c, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) in [-1, 1] -> (B, out, H, W) in [-1, 1]."""
        factor = 2 ** self.num_downsamples
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"image side {tuple(x.shape[-2:])} must be divisible by {factor}")
        return self.net(x)


# ------------------------------------------------------------------------------------------ losses
def lsgan_loss(scores: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Least-squares GAN loss: mean squared distance of the critic's scores to 1 (real) or 0 (fake)."""
    scores = scores.float()
    target = torch.ones_like(scores) if target_is_real else torch.zeros_like(scores)
    return F.mse_loss(scores, target)


def gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, H - 2, W - 2): Sobel gradient magnitude (the valid part, no padding)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device) / 8
    kernels = torch.stack([kx, kx.t()])[:, None].to(images.dtype)
    g = F.conv2d(images, kernels)
    return torch.sqrt(g.square().sum(1, keepdim=True) + 1e-8)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 1, H, W) -> the same, smoothed by a Gaussian of ``sigma`` pixels (separable, reflect-padded)."""
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    return F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))


def gradient_correlation(a: torch.Tensor, b: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
    """(B, 1, H, W) twice -> (B,): Pearson correlation of the two images' gradient magnitudes.

    1 when every edge of one is an edge of the other with proportional strength, whatever the contrast
    curves of the two images: the style may change, the bones and the lung borders may not. ``sigma``
    > 0 compares the images smoothed by a Gaussian of that many pixels: the edges of structures wider
    than it (ribs, clavicles) still count, pixel-scale texture (film grain, noise) no longer does.
    """
    a, b = a.float(), b.float()
    if sigma > 0:
        a, b = gaussian_blur(a, sigma), gaussian_blur(b, sigma)
    ga, gb = gradient_magnitude(a).flatten(1), gradient_magnitude(b).flatten(1)
    ga, gb = ga - ga.mean(1, keepdim=True), gb - gb.mean(1, keepdim=True)
    return (ga * gb).sum(1) / (ga.norm(dim=1) * gb.norm(dim=1)).clamp_min(1e-8)


def critic_augment(images: torch.Tensor, policy: tuple = ()) -> torch.Tensor:
    """(B, 1, H, W) -> the same, each image shifted and/or holed at random, differentiably (DiffAugment).

    Zhao et al. 2020: with few images in a domain (here 15-19 DRRs) a critic memorises them and wins
    outright, and the generator learns nothing more about the style. Showing the critic real and
    generated images through the same kind of random transformation (drawn per image), in its update
    and in the generator's, keeps it from memorising without teaching the generator to produce the
    transformation. ``translation``
    shifts by up to 1/8 of the size (zero-filled), ``cutout`` blanks a square of half the size to 0
    (mid-grey); only geometric changes, as a change of intensity would hide the very style judged.
    """
    unknown = set(policy) - set(CRITIC_AUGMENTS)
    if unknown:
        raise ValueError(f"unknown critic augmentation {sorted(unknown)}; known: {', '.join(CRITIC_AUGMENTS)}")
    b, _, h, w = images.shape
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    if "translation" in policy:
        dy = torch.randint(-(h // 8), h // 8 + 1, (b, 1, 1), device=images.device)
        dx = torch.randint(-(w // 8), w // 8 + 1, (b, 1, 1), device=images.device)
        src_r, src_c = rows - dy, cols - dx  # output pixel (r, c) shows input pixel (r - dy, c - dx)
        inside = ((src_r >= 0) & (src_r < h) & (src_c >= 0) & (src_c < w)).unsqueeze(1)
        index = (src_r.clamp(0, h - 1) * w + src_c.clamp(0, w - 1)).flatten(1).unsqueeze(1)
        images = images.flatten(2).gather(2, index).view(b, 1, h, w) * inside
    if "cutout" in policy:
        cy = torch.randint(0, h, (b, 1, 1), device=images.device)
        cx = torch.randint(0, w, (b, 1, 1), device=images.device)
        hole = ((rows - cy).abs() < h // 4) & ((cols - cx).abs() < w // 4)
        images = images * (~hole).unsqueeze(1)
    return images


class ImagePool:
    """The last ``size`` generated images; the critic sees a 50/50 mix of new and stored fakes.

    Shrivastava et al. 2017: training the critic on a history of fakes instead of only the newest
    ones stops the two players from chasing each other. ``size=0`` passes images through.
    """

    def __init__(self, size: int = 50, seed: int = 0):
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = random.Random(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) new fakes (detached) -> (B, C, H, W) fakes to show the critic."""
        if self.size == 0:
            return images.detach()
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif self.rng.random() < 0.5:
                i = self.rng.randrange(self.size)
                out.append(self.images[i].clone())
                self.images[i] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        """Everything needed to resume bit-exactly: the stored fakes (on CPU) and the RNG state."""
        return {"images": [im.cpu() for im in self.images], "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.images = [im.to(device) for im in state["images"]]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


def generator_loss(
    real_to_drr: nn.Module,
    drr_to_real: nn.Module,
    drr_critic: nn.Module,
    real_critic: nn.Module,
    real: torch.Tensor,
    drr: torch.Tensor,
    cycle_weight: float = 10.0,
    identity_weight: float = 5.0,
    edge_weight: float = 0.0,
    augment: tuple = (),
    edge_sigma: float = 0.0,
) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """Unpaired batches ``(B, 1, H, W)`` in [-1, 1] -> (total, named parts, fake DRRs, fake reals).

    CycleGAN's weights: lambda = 10 for each cycle, identity at half of that (0 leaves it out).
    ``edge_weight`` adds ``1 - gradient_correlation`` between each generator's input and output: the
    cycle alone lets a generator hide the ribs in a code the other one undoes (0 leaves it out).
    Networks are arguments so that the trainer can pass DDP-wrapped generators and the bare critics:
    the critics only judge here, with ``requires_grad`` off. ``augment``: :func:`critic_augment`'s
    policy for what the critics see (the same as in :func:`critic_loss`).
    """
    fake_drr = real_to_drr(real)
    fake_real = drr_to_real(drr)
    parts = {
        "adv_drr": lsgan_loss(drr_critic(critic_augment(fake_drr, augment)), True),
        "adv_real": lsgan_loss(real_critic(critic_augment(fake_real, augment)), True),
        "cycle_real": F.l1_loss(drr_to_real(fake_drr).float(), real.float()),
        "cycle_drr": F.l1_loss(real_to_drr(fake_real).float(), drr.float()),
    }
    total = parts["adv_drr"] + parts["adv_real"] + cycle_weight * (parts["cycle_real"] + parts["cycle_drr"])
    if identity_weight > 0:  # a generator fed its own target domain should leave it alone
        parts["identity_drr"] = F.l1_loss(real_to_drr(drr).float(), drr.float())
        parts["identity_real"] = F.l1_loss(drr_to_real(real).float(), real.float())
        total = total + identity_weight * (parts["identity_drr"] + parts["identity_real"])
    if edge_weight > 0:
        parts["edge_drr"] = 1 - gradient_correlation(real, fake_drr, edge_sigma).mean()
        parts["edge_real"] = 1 - gradient_correlation(drr, fake_real, edge_sigma).mean()
        total = total + edge_weight * (parts["edge_drr"] + parts["edge_real"])
    return total, parts, fake_drr, fake_real


def critic_loss(
    drr_critic: nn.Module,
    real_critic: nn.Module,
    real: torch.Tensor,
    drr: torch.Tensor,
    fake_real: torch.Tensor,
    fake_drr: torch.Tensor,
    augment: tuple = (),
) -> tuple[torch.Tensor, dict]:
    """Each critic: half the LSGAN loss on its own domain plus half on (pooled) fakes, which are detached here.

    ``augment``: :func:`critic_augment`'s policy, applied to real and fake images alike.
    """

    def judge(critic, images, is_real):
        return lsgan_loss(critic(critic_augment(images, augment)), is_real)

    parts = {
        "critic_drr": 0.5 * (judge(drr_critic, drr, True) + judge(drr_critic, fake_drr.detach(), False)),
        "critic_real": 0.5 * (judge(real_critic, real, True) + judge(real_critic, fake_real.detach(), False)),
    }
    return parts["critic_drr"] + parts["critic_real"], parts
