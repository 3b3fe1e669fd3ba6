"""The autoencoder objective of XctDiff (eqs. 3-4): L1 + LPIPS on slices + codebook + two-critic GAN.

Generator step (eq. 4)::

    L = w_l1 * |x - x_rec|_1 + w_bone * |x - x_rec|_1,bone + w_p * LPIPS(slices) + w_ssim * (1 - SSIM_3D)
        + w_c * L_codebook + w_gan * lambda * L_GAN
    L_GAN = alpha * L_3D + beta * L_2D                                          (eq. 3)

with ``L_3D = -mean(D_3D(x_rec))`` on whole volumes and ``L_2D = -mean(D_2D(slices of x_rec))`` on
slices sampled along the three axes (hinge-GAN generator terms). ``lambda`` is the adaptive weight of
taming-transformers (ratio of the gradient norms of the reconstruction and GAN terms at the decoder's
last layer) when ``adaptive_weight`` is on and the last layer is given, else 1. Before
``disc_start`` steps the GAN term is exactly 0 and the critics are not even evaluated, so the
autoencoder first learns to reconstruct (warm-up).

Discriminator step: hinge loss ``alpha * hinge(D_3D) + beta * hinge(D_2D)`` on real vs detached
reconstructions.

``|.|_1,bone`` is the mean L1 over the voxels the *truth* calls bone (above
:data:`XctDiffCore.metrics.BONE_HU`): not in the paper, it is XctDiff's answer to a small CPU model
that spends its capacity on air and soft tissue, where almost every voxel is, and blurs the ribs
away (issue 13). ``bone_weight = 0`` is the paper's loss.

``SSIM_3D`` is the evaluation's SSIM (:func:`ssim_3d`: scikit-image's 3D definition, 7-voxel uniform
window, on the [0, 1] HU window), not in the paper either: L1 and the critics leave a faint texture in
flat air and soft tissue that costs SSIM more than PSNR (issue 13's SSIM target). ``ssim_weight = 0``
(the default) leaves it out.

LPIPS is 2D: it is computed on ``slices_per_axis`` random slices along each of D, H and W (the same
positions in ``x`` and ``x_rec``); with no LPIPS weights (``lpips=None``) the term is left out.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..layout import hu_to_unit
from ..metrics import BONE_HU
from ..models.discriminators import PatchDiscriminator
from ..models.lpips import LPIPS

BONE_LEVEL = float(hu_to_unit(np.float64(BONE_HU)))  # the bone threshold on the [-1, 1] intensity scale


def sample_slices(volumes: Tuple[torch.Tensor, ...], slices_per_axis: int, generator: Optional[torch.Generator] = None) -> List[Tuple[torch.Tensor, ...]]:
    """Random 2D slices at the same positions of each ``(B, C, D, H, W)`` volume, one group per axis.

    Returns ``[(s_1, s_2, ...) for axis D, H, W]``, each slice batch ``(B * slices_per_axis, C, *plane)``.
    """
    ref = volumes[0]
    groups = []
    for axis in (2, 3, 4):
        idx = torch.randint(0, ref.shape[axis], (slices_per_axis,), generator=generator, device="cpu").to(ref.device)
        group = []
        for v in volumes:
            s = v.index_select(axis, idx).movedim(axis, 1)  # (B, k, C, ...) with the sliced axis next to B
            group.append(s.reshape(-1, *s.shape[2:]))
        groups.append(tuple(group))
    return groups


def ssim_3d(a01: torch.Tensor, b01: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean 3D SSIM of ``(B, 1, D, H, W)`` volumes in [0, 1], as :func:`XctDiffCore.metrics.ssim_3d` scores
    it (scikit-image's defaults: uniform window, sample covariance, K1 0.01, K2 0.03, ``data_range=1``,
    the map's border of half a window left out), in float32 and differentiable."""
    a01, b01 = a01.float(), b01.float()

    def mean(t):  # the window's mean where it fits (skimage's cropped map), one axis at a time: 3 x 7 sums, not 7^3
        for kernel in ((window, 1, 1), (1, window, 1), (1, 1, window)):
            t = F.avg_pool3d(t, kernel, stride=1)
        return t

    n = window**3
    mu_a, mu_b = mean(a01), mean(b01)
    var_a = (mean(a01 * a01) - mu_a * mu_a) * (n / (n - 1))
    var_b = (mean(b01 * b01) - mu_b * mu_b) * (n / (n - 1))
    cov = (mean(a01 * b01) - mu_a * mu_b) * (n / (n - 1))
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    return ssim.mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class AutoencoderLoss(nn.Module):
    """Generator and discriminator objectives of the VQ-GAN; holds the two critics and LPIPS.

    The training loop optimises ``vqgan.parameters()`` with :meth:`generator_loss` and
    ``loss.discriminator_parameters()`` with :meth:`discriminator_loss` (the latter only while
    :meth:`gan_active`).
    """

    def __init__(
        self,
        disc_3d: PatchDiscriminator,
        disc_2d: PatchDiscriminator,
        lpips: Optional[LPIPS],
        l1_weight: float = 1.0,
        bone_weight: float = 0.0,
        ssim_weight: float = 0.0,
        perceptual_weight: float = 1.0,
        codebook_weight: float = 1.0,
        gan_weight: float = 1.0,
        gan_3d_weight: float = 1.0,
        gan_2d_weight: float = 1.0,
        disc_start: int = 10_000,
        slices_per_axis: int = 2,
        adaptive_weight: bool = True,
    ):
        super().__init__()
        if disc_3d.spatial_dims != 3 or disc_2d.spatial_dims != 2:
            raise ValueError("disc_3d must be a 3D critic and disc_2d a 2D critic")
        self.disc_3d = disc_3d
        self.disc_2d = disc_2d
        self.lpips = lpips
        self.l1_weight = l1_weight
        self.bone_weight = bone_weight
        self.ssim_weight = ssim_weight
        self.perceptual_weight = perceptual_weight if lpips is not None else 0.0
        self.codebook_weight = codebook_weight
        self.gan_weight = gan_weight
        self.gan_3d_weight = gan_3d_weight  # alpha of eq. 3
        self.gan_2d_weight = gan_2d_weight  # beta of eq. 3
        self.disc_start = disc_start
        self.slices_per_axis = slices_per_axis
        self.adaptive_weight = adaptive_weight

    def discriminator_parameters(self):
        return list(self.disc_3d.parameters()) + list(self.disc_2d.parameters())

    def gan_active(self, step: int) -> bool:
        return self.gan_weight > 0 and step >= self.disc_start

    def _adaptive_lambda(self, rec: torch.Tensor, gan: torch.Tensor, last_layer: Optional[torch.Tensor]) -> torch.Tensor:
        if not (self.adaptive_weight and last_layer is not None and torch.is_grad_enabled() and gan.requires_grad):
            return torch.ones((), device=rec.device)
        g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
        g_gan = torch.autograd.grad(gan, last_layer, retain_graph=True)[0]
        return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def generator_loss(
        self,
        x: torch.Tensor,
        x_rec: torch.Tensor,
        codebook_loss: torch.Tensor,
        step: int,
        last_layer: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Eq. 4 for ``x``, ``x_rec`` ``(B, C, D, H, W)``; returns ``(loss, detached terms for logging)``."""
        zero = x_rec.new_zeros(())
        error = (x - x_rec).abs()
        l1, bone = error.mean(), zero
        if self.bone_weight > 0:
            is_bone = (x > BONE_LEVEL).to(error.dtype)
            bone = (error * is_bone).sum() / is_bone.sum().clamp_min(1.0)
        ssim_loss = zero
        if self.ssim_weight > 0:
            with torch.autocast(x.device.type, enabled=False):  # variances as differences of means: not in bf16
                ssim_loss = 1.0 - ssim_3d((x.float() + 1) / 2, (x_rec.float().clamp(-1, 1) + 1) / 2)
        slices = sample_slices((x, x_rec), self.slices_per_axis)
        perceptual = zero
        if self.perceptual_weight > 0:
            perceptual = torch.stack([self.lpips(a, b).mean() for a, b in slices]).mean()
        rec = self.l1_weight * l1 + self.bone_weight * bone + self.ssim_weight * ssim_loss + self.perceptual_weight * perceptual

        gan_3d = gan_2d = gan = lam = zero
        if self.gan_active(step):
            gan_3d = -self.disc_3d(x_rec).mean()
            gan_2d = torch.stack([-self.disc_2d(b).mean() for _, b in slices]).mean()
            gan = self.gan_3d_weight * gan_3d + self.gan_2d_weight * gan_2d
            lam = self._adaptive_lambda(rec, gan, last_layer)
        total = rec + self.codebook_weight * codebook_loss + self.gan_weight * lam * gan
        logs = {
            "l1": l1, "bone_l1": bone, "ssim_loss": ssim_loss, "lpips": perceptual, "codebook": codebook_loss, "gan_3d": gan_3d, "gan_2d": gan_2d,
            "gan_lambda": lam, "total": total,
        }
        return total, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, step: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Hinge loss of both critics (eq. 3 weights); 0 before ``disc_start``. ``x_rec`` is detached here."""
        x_rec = x_rec.detach()
        factor = 1.0 if self.gan_active(step) else 0.0
        d_3d = hinge_d_loss(self.disc_3d(x), self.disc_3d(x_rec))
        slices = sample_slices((x, x_rec), self.slices_per_axis)
        d_2d = torch.stack([hinge_d_loss(self.disc_2d(a), self.disc_2d(b)) for a, b in slices]).mean()
        total = factor * (self.gan_3d_weight * d_3d + self.gan_2d_weight * d_2d)
        return total, {"d_3d": d_3d.detach(), "d_2d": d_2d.detach(), "d_total": total.detach()}
