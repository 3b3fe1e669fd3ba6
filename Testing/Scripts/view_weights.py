"""Fit the plausibility check's frontal-view detector (is this a frontal chest film, or a lateral projection or
a cross-sectional CT slice?) and measure it on films and CTs it was not fitted on.

    python Testing/Scripts/view_weights.py [--shared ../shared/data] [--datalist .data/ds/datalist.json]
        [--variants 6] [--write XctDiffCore/plausibility_view.json]

The contrast check (:func:`XctDiffCore.plausibility.chest_contrast`) lets a lateral view through when its middle
is bright (2 of the 19 shared CTs' lateral DRRs), and about a third of axial CT slices saved as pictures; three
lateral DRRs were called "on their side", so ``--turn auto`` turned them and they then passed every check. This
detector is a linear discriminant (Fisher's, covariance shrunk by 20 % towards its mean variance) on
:func:`XctDiffCore.plausibility.view_features` (the 16 x 16 thumbnail of the preprocessed image, split into what a
left-right mirror keeps and the size of what it reverses: a lateral view is the same from either side).

Fitted on: frontal films, the 1,600 Kermany training films (pediatric AP, CC BY 4.0) and the frontal DRRs of
random variants of the training patients (``--datalist``'s training list: warps and film-like randomisation of
XctDiffCore.training.variants), against the lateral DRRs of the same variants (seen from either side) and their
axial slices (three windows), the films and the DRRs weighing alike, so that what tells a DRR from a film cannot
decide. Its threshold flags at most 0.5 % of the training films and 2 % of the training frontal DRRs (partial
chests, a phantom). Measured, never fitted, on: the 624 Kermany test films and the 4 adult films (2 NIH, the RSNA
DICOM, RG1); frontal DRRs, lateral DRRs and axial slices of the validation patients (the datalist's validation
list, variants of them too); 18 scikit-image photographs. Writes the JSON with --write; prints the figures either
way (a few minutes on a CPU).
"""
from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np
import torch

from XctDiffCore.drr import ConeGeometry, normalize_drr, render_drr
from XctDiffCore.errors import XctDiffError
from XctDiffCore.io import read_radiograph
from XctDiffCore.layout import ct_to_model_layout, hu_to_unit, unit_to_hu
from XctDiffCore.plausibility import VIEW_FILE, film_problems, view_features
from XctDiffCore.preprocess import preprocess_radiograph
from XctDiffCore.training.variants import random_films, random_views

SHRINK = 0.2
FALSE_ALARMS = 0.5  # per cent of the training films the threshold may flag
DRR_FALSE_ALARMS = 2.0  # per cent of the training CTs' frontal DRRs (their partial chests, a phantom) it may flag
WINDOWS = ((-1000.0, 400.0), (-160.0, 240.0), (-1350.0, 150.0))  # lung-ish, soft tissue, wide: (low, high) HU
PHOTOS = ("camera", "astronaut", "coffee", "brick", "moon", "text", "horse", "page", "grass", "gravel", "rocket",
          "cat", "chelsea", "clock", "coins", "hubble_deep_field", "immunohistochemistry", "retina")


def prepared(image) -> np.ndarray | None:
    """The model's 128 px input of an image, as the pipeline makes it; None where the pipeline refuses it."""
    try:
        return preprocess_radiograph(np.asarray(image, dtype=np.float32), 128)
    except XctDiffError:
        return None


def views_of(ct_hu: np.ndarray, variants: int, generator: torch.Generator) -> dict:
    """{"frontal" | "lateral" | "axial": [preprocessed images]} of the CT (``[z, y, x]`` HU, the prepared
    cube) and ``variants`` random variants of it."""
    volume = torch.from_numpy(np.ascontiguousarray(ct_to_model_layout(ct_hu.astype(np.float32))))[None, None]
    unit = hu_to_unit(volume)
    out = {"frontal": [], "lateral": [], "axial": []}
    for k in range(variants + 1):
        warped = unit if k == 0 else random_views(unit, generator)
        hu = unit_to_hu(warped)
        with torch.no_grad():
            front = normalize_drr(render_drr(hu, ConeGeometry(), 128))
            side = normalize_drr(render_drr(hu.transpose(2, 4).contiguous(), ConeGeometry(), 128))
        if k:
            front, side = random_films(front, generator), random_films(side, generator)
        out["frontal"].append(prepared(front[0, 0].numpy()))
        side = side[0, 0].numpy()
        out["lateral"] += [prepared(side), prepared(np.fliplr(side))]  # seen from the left, from the right
        ct = hu[0, 0].numpy()  # model layout; axial slices of the lungs' levels
        lungs = ((ct > -950) & (ct < -400)).mean(axis=tuple(a for a in range(3) if a != AXIAL_AXIS))
        levels = np.nonzero(lungs > 0.05)[0]
        for level in levels[np.linspace(0, len(levels) - 1, 3).astype(int)] if len(levels) else []:
            low, high = WINDOWS[int(torch.randint(0, len(WINDOWS), (1,), generator=generator))]
            out["axial"].append(prepared(np.clip((np.take(ct, level, AXIAL_AXIS) - low) / (high - low), 0, 1)))
    return {kind: [i for i in images if i is not None] for kind, images in out.items()}


AXIAL_AXIS = 1  # the model layout's axis from head to feet, H (XctDiffCore.layout): a slice is [D (front first), W]


def patients(datalist: Path, part: str, variants: int, seed: int) -> dict:
    root, listing = datalist.parent, json.loads(datalist.read_text())
    generator = torch.Generator().manual_seed(seed)
    out = {"frontal": [], "lateral": [], "axial": []}
    for entry in listing[part]:
        if entry.get("aug", 0) != 0:
            continue
        with np.load(root / entry["image"]) as npz:
            for kind, images in views_of(npz["ct"], variants, generator).items():
                out[kind] += images
    return out


def fit(frontal_groups: list, other_groups: list) -> tuple:
    """Fisher's discriminant between two classes, each the average of its groups (films and DRRs weigh alike, so
    that it cannot tell the classes apart by what tells a DRR from a film), frontal scoring high."""
    features = lambda images: np.stack([view_features(i) for i in images]).astype(np.float64)  # noqa: E731
    frontal, other = [features(g) for g in frontal_groups], [features(g) for g in other_groups]
    means = [np.mean([g.mean(axis=0) for g in groups], axis=0) for groups in (frontal, other)]
    covariance = sum(np.cov(g.T) for g in frontal + other) / len(frontal + other)
    covariance += SHRINK * np.eye(len(covariance)) * np.trace(covariance) / len(covariance)
    return np.linalg.solve(covariance, means[0] - means[1])


def score(images: list, weights, bias=0.0) -> np.ndarray:
    return np.array([view_features(i) @ weights + bias for i in images])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--datalist", default=".data/ds/datalist.json")
    parser.add_argument("--variants", type=int, default=6)
    parser.add_argument("--write", default=None, help=f"write the weights here (the engine reads {VIEW_FILE.name})")
    args = parser.parse_args()
    cxr = Path(args.shared) / "cxr"
    torch.set_num_threads(1)

    def films(pattern) -> list:
        return [prepared(read_radiograph(p).image) for p in sorted(glob.glob(str(cxr / pattern)))]

    train_films = films("kermany/train/*/*.jpeg")
    train = patients(Path(args.datalist), "training", args.variants, seed=0)
    weights = fit([train_films, train["frontal"]], [train["lateral"], train["axial"]])
    raw = score(train_films, weights)
    threshold = min(float(np.percentile(raw, FALSE_ALARMS)), float(np.percentile(score(train["frontal"], weights),
                                                                                 DRR_FALSE_ALARMS)))
    scale = 1.0 / (float(np.median(raw)) - threshold)  # the training films' median scores 1, the threshold 0
    weights, bias = weights * scale, -threshold * scale
    print(f"training films flagged {np.mean(score(train_films, weights, bias) < 0):.2%}, training frontal DRRs "
          f"{np.mean(score(train['frontal'], weights, bias) < 0):.2%}, laterals caught "
          f"{np.mean(score(train['lateral'], weights, bias) < 0):.2%}, axial slices caught "
          f"{np.mean(score(train['axial'], weights, bias) < 0):.2%}")
    document = {
        "about": "XctDiffCore.plausibility's frontal-view check: a linear discriminant on view_features (the 16 x 16 "
                 "thumbnail of a preprocessed film, its mirror-symmetric part and the size of its antisymmetric "
                 "part), frontal films at or above the threshold; made by Testing/Scripts/view_weights.py",
        "fitted_on": "the 1,600 Kermany training films of ../shared/data/cxr (ChestXray2017, Kermany et al., Mendeley "
                     "Data, CC BY 4.0) and DRRs and axial slices of random variants of the 15 training CTs of the "
                     "shared_whole_chest split: statistics of them, no image",
        "weights": [round(float(w), 5) for w in weights], "bias": round(bias, 5), "threshold": 0.0,
    }
    if args.write:
        Path(args.write).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        from XctDiffCore.plausibility import view_check

        view_check.cache_clear()
        print(f"wrote {args.write}")

    def flagged(images: list) -> str:
        below = int((score(images, weights, bias) < 0).sum())
        by_all = sum(bool(film_problems(i)) for i in images) if args.write else None
        return f"{below} of {len(images)}" + (f" (by every check of a film: {by_all})" if by_all is not None else "")

    def missed_before(images: list) -> list:
        """The images that the checks without this one (and without its part in the quarter-turn rule) let through or
        called on their side."""
        import XctDiffCore.plausibility as plausibility

        real = plausibility.looks_frontal, plausibility.QUARTER_TURN_FRONTAL
        plausibility.looks_frontal, plausibility.QUARTER_TURN_FRONTAL = (lambda image: True), -np.inf
        try:
            return [i for i in images if not film_problems(i) or "on its side" in film_problems(i)[0]]
        finally:
            plausibility.looks_frontal, plausibility.QUARTER_TURN_FRONTAL = real

    validation = patients(Path(args.datalist), "validation", args.variants, seed=1)
    test = films("kermany/test/*/*.jpeg")
    adult = [prepared(read_radiograph(p).image) for p in (cxr / "nih/00000001_000.png", cxr / "nih/00027426_000.png",
                                                         cxr / "dicom/rsna_pneumonia_sample.dcm",
                                                         Path("Resources/Samples/RG1_UNCR_chest_PA.dcm"))]
    from skimage import data

    photos = []
    for name in PHOTOS:
        image = getattr(data, name)().astype(np.float32)
        photos.append(prepared(image[..., :3].mean(-1) if image.ndim == 3 else image))
    print(f"flagged as not frontal: Kermany test films {flagged(test)}; adult films {flagged(adult)}; validation "
          f"patients' frontal DRRs {flagged(validation['frontal'])}, lateral DRRs {flagged(validation['lateral'])}, "
          f"axial slices {flagged(validation['axial'])}; photographs {flagged([p for p in photos if p is not None])}")
    print(f"of those the other checks let through or called on their side: validation lateral DRRs "
          f"{flagged(missed_before(validation['lateral']))}, axial slices {flagged(missed_before(validation['axial']))}")

if __name__ == "__main__":
    main()
