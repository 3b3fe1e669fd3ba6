"""Inter-patient mixes: new training chests between the training patients.

With a dozen training CTs the encoder meets, in a new patient, a body shape, lung outline or heart
position that none of them showed, and the random affine and few-millimetre elastic warps of training
do not make new ones. A registration of patient A onto patient B (affine, then symmetric-forces demons,
both SimpleITK, on the grid halved) gives a displacement field ``d``; A sampled at ``x + alpha d(x)``,
``0 < alpha < 1``, is A's own tissue (its ribs, its HU) in a shape part of the way to B's: a plausible
chest that is neither. ``xctdiff prepare --mix K`` adds K of them per training patient; on the 15 shared
training patients they lifted the encoder's validation score (Docs/RESULTS.md, "Chests between the
training patients"). Partial or cropped scans make poor partners: leave them out with ``--mix-patients``.

Mixes stay inside the hull of the training shapes, and a new patient almost always lies outside it.
``--mix-away LOW HIGH`` (``-1 < LOW <= HIGH < 0``) adds, from the same registration, one more chest per
pair with a negative alpha: the source moved *away* from its partner, its own shape exaggerated.

Every prepared CT shares the canonical grid (isotropic, centred on the chest), so registration works in
that index space: origins are ignored, and a mix keeps its source's geometry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from .errors import XctDiffError
from .volume import Volume

AIR_HU = -1024.0


@dataclass(frozen=True)
class Mix:
    """One new chest: ``source``'s tissue moved ``alpha`` of the way to ``target``'s shape."""

    name: str
    source: str
    target: str
    alpha: float
    volume: Volume
    error_before: float  # mean |HU difference| to the target inside its body, source as it is
    error_registered: float  # the same for the source registered all the way (alpha 1): the registration's fit


def _image(array: np.ndarray, spacing: float, clip: bool = True):
    """A float SimpleITK image of ``array`` (HU); clipped to [-1000, 1500] for registration, so metal and
    the air outside the body do not dominate the fit."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray((np.clip(array, -1000, 1500) if clip else array).astype(np.float32))
    image.SetSpacing((spacing,) * 3)
    return image


def _halved(array: np.ndarray) -> np.ndarray:
    """A cheap half-resolution copy (two diagonal samples of each 2x2x2 block averaged)."""
    array = array[: array.shape[0] // 2 * 2, : array.shape[1] // 2 * 2, : array.shape[2] // 2 * 2]
    return array[::2, ::2, ::2] * 0.5 + array[1::2, 1::2, 1::2] * 0.5


def registration_field(moving: np.ndarray, fixed: np.ndarray, spacing: float):
    """The displacement field (a SimpleITK image on ``fixed``'s grid, in mm) that carries each point of
    ``fixed`` to its match in ``moving``: an affine fit, then demons with a smooth (5-voxel) field."""
    import SimpleITK as sitk

    fixed_half, moving_half = _image(_halved(fixed), 2 * spacing), _image(_halved(moving), 2 * spacing)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 150, relaxationFactor=0.7)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0])
    initial = sitk.CenteredTransformInitializer(fixed_half, moving_half, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    method.SetInitialTransform(initial, inPlace=False)
    affine = method.Execute(fixed_half, moving_half)

    moved = sitk.Resample(moving_half, fixed_half, affine, sitk.sitkLinear, -1000.0)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(80)
    demons.SetStandardDeviations(2.0)  # in voxels of the halved grid: shapes, not textures
    field = demons.Execute(fixed_half, moved)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)))

    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(_image(fixed, spacing))
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    return to_field.Execute(composite)


def warp_partway(moving: np.ndarray, field, alpha: float, spacing: float) -> np.ndarray:
    """``moving`` (HU) sampled at ``x + alpha d(x)``, as int16; what falls outside its grid is air."""
    import SimpleITK as sitk

    scaled = sitk.GetImageFromArray(sitk.GetArrayFromImage(field) * alpha, isVector=True)
    scaled.CopyInformation(field)
    image = _image(moving, spacing, clip=False)
    out = sitk.Resample(image, image, sitk.DisplacementFieldTransform(scaled), sitk.sitkLinear, AIR_HU)
    return np.rint(sitk.GetArrayFromImage(out)).astype(np.int16)


def body_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |HU difference| inside ``b``'s body (HU > -500)."""
    body = b > -500
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32))[body].mean())


def check_mix_request(per_patient: int, patients: int, alpha_range: Sequence[float] = (0.3, 0.8),
                      away_range: Optional[Sequence[float]] = None) -> None:
    """Refuse a mix request that cannot be met, before any CT is read."""
    lo, hi = (float(a) for a in alpha_range)
    if not 0.0 < lo <= hi < 1.0:
        raise XctDiffError(f"mix alphas must satisfy 0 < low <= high < 1, got {lo:g} and {hi:g}")
    if away_range is not None:
        lo, hi = (float(a) for a in away_range)
        if not -1.0 < lo <= hi < 0.0:
            raise XctDiffError(f"--mix-away alphas must satisfy -1 < low <= high < 0, got {lo:g} and {hi:g}")
        if not per_patient:
            raise XctDiffError("--mix-away moves mixes away from their partners: give --mix K too")
    if per_patient < 0:
        raise XctDiffError(f"--mix must be 0 or more, got {per_patient}")
    if per_patient and patients < 2:
        raise XctDiffError(f"--mix needs at least two training patients to mix, got {patients}")


def make_mixes(cts: dict, per_patient: int, alpha_range: Sequence[float] = (0.3, 0.8),
               seed: int = 0, away_range: Optional[Sequence[float]] = None) -> Iterator[Mix]:
    """``per_patient`` mixes of each CT of ``cts`` (patient -> canonical :class:`Volume`, in that order),
    each towards a different partner drawn at random, with alpha drawn uniformly from ``alpha_range``; with
    ``away_range`` each is followed by one moved away from the same partner (alpha drawn from it, by a
    generator of its own, so the mixes towards the partners do not change)."""
    check_mix_request(per_patient, len(cts), alpha_range, away_range)
    lo, hi = (float(a) for a in alpha_range)
    names = list(cts)
    shapes = {cts[p].array.shape for p in names}
    spacings = {cts[p].spacing for p in names}
    if len(shapes) > 1 or len(spacings) > 1 or len(set(next(iter(spacings)))) > 1:
        raise XctDiffError("mixing needs CTs on one canonical grid (one shape, one isotropic spacing)")
    spacing = float(next(iter(spacings))[0])
    rng, away_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    for source in names:
        others = [p for p in names if p != source]
        for target in rng.choice(others, size=min(per_patient, len(others)), replace=False):
            alpha = float(rng.uniform(lo, hi))
            moving, fixed = cts[source].array, cts[target].array
            field = registration_field(moving, fixed, spacing)
            before = body_error(moving, fixed)
            registered = body_error(warp_partway(moving, field, 1.0, spacing), fixed)
            alphas = [alpha] + ([float(away_rng.uniform(*away_range))] if away_range is not None else [])
            for a in alphas:
                name = f"mix_{source}_to_{target}_a{round(a * 100):02d}" if a > 0 else \
                    f"mix_{source}_away_from_{target}_a{round(-a * 100):02d}"
                yield Mix(name=name, source=source, target=str(target), alpha=a,
                          volume=cts[source].with_array(warp_partway(moving, field, a, spacing)),
                          error_before=before, error_registered=registered)
