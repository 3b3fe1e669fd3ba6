"""Re-measure the figures in XctDiffCore/plausibility.py's docstring on ../shared/data (a few minutes on a CPU).

    python Testing/Scripts/plausibility_survey.py [--shared ../shared/data] [--films 600]

Needs `xctdiff prepare ../shared/data/ct --out .data/ds` done first (for the DRRs and CTs of the
shared patients, read from .data/ds/datalist.json).
"""
from __future__ import annotations

import argparse
import glob
import json
import random
from pathlib import Path

import numpy as np
import torch
from skimage import data

from XctDiffCore.drr import ConeGeometry, normalize_drr, render_drr
from XctDiffCore.io import read_radiograph
from XctDiffCore.layout import ct_to_model_layout
from XctDiffCore.plausibility import CHEST_CONTRAST_MIN, chest_contrast, film_problems, head_up_turn
from XctDiffCore.preprocess import preprocess_radiograph

PHOTOS = ("camera", "astronaut", "coffee", "brick", "moon", "text", "horse", "page", "grass", "gravel", "rocket",
          "cat", "chelsea", "clock", "coins", "hubble_deep_field", "immunohistochemistry", "retina")


def flagged(values) -> str:
    values = np.asarray(values)
    return f"{int((values <= CHEST_CONTRAST_MIN).sum())} of {len(values)} flagged"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--datalist", default=".data/ds/datalist.json")
    parser.add_argument("--films", type=int, default=600)
    args = parser.parse_args()
    cxr = Path(args.shared) / "cxr"
    random.seed(0)
    paths = random.sample(sorted(glob.glob(str(cxr / "kermany/*/*/*.jpeg"))), args.films)
    paths += sorted(glob.glob(str(cxr / "nih/*.png"))) + [str(cxr / "dicom/rsna_pneumonia_sample.dcm"),
                                                         "Resources/Samples/RG1_UNCR_chest_PA.dcm"]
    films = [preprocess_radiograph(read_radiograph(p).image, 128) for p in paths]
    real = [chest_contrast(f) for f in films]
    print(f"real films: {flagged(real)}; lowest {min(real):.3f}, 1st percentile {np.percentile(real, 1):.3f}")
    inverted = [chest_contrast(1.0 - f) for f in films]
    print(f"the same inverted: {flagged(inverted)}; highest {max(inverted):.3f}")
    variant = preprocess_radiograph(read_radiograph(cxr / "dicom/monochrome1_variant.dcm").image, 128)
    print(f"monochrome1_variant.dcm: {chest_contrast(variant):.3f}")
    root = Path(args.datalist).parent
    listing = json.loads(Path(args.datalist).read_text())
    frontal, lateral, lateral_problems = {}, {}, {}
    for entry in listing["training"] + listing["validation"]:
        frontal[entry["patient"]] = chest_contrast(np.load(root / entry["xray"]))
        with np.load(root / entry["image"]) as npz:
            volume = torch.from_numpy(np.ascontiguousarray(ct_to_model_layout(npz["ct"].astype(np.float32))))[None, None]
        side = normalize_drr(render_drr(volume.transpose(2, 4).contiguous(), ConeGeometry(), 128))[0, 0].numpy()
        side = preprocess_radiograph(side, 128)
        lateral[entry["patient"]] = chest_contrast(side)
        lateral_problems[entry["patient"]] = (film_problems(side), head_up_turn(side))
    for name, values in (("frontal DRRs", frontal), ("lateral DRRs", lateral)):
        print(f"{name}: {flagged(list(values.values()))}; " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(values.items(), key=lambda kv: kv[1])[:3]))
    called = [p for p, (problems, _) in lateral_problems.items() if problems]
    sideways = [p for p, (problems, _) in lateral_problems.items() if problems and "on its side" in problems[0]]
    turned = [p for p, (_, turn) in lateral_problems.items() if turn]
    print(f"lateral DRRs by every check of a film: {len(called)} of {len(lateral_problems)} flagged; called on their side: "
          f"{', '.join(sideways) or 'none'}; turned by --turn auto: {', '.join(turned) or 'none'}")
    photos = {}
    for name in PHOTOS:
        image = getattr(data, name)().astype(np.float32)
        image = image[..., :3].mean(-1) if image.ndim == 3 else image
        photos[name] = chest_contrast(preprocess_radiograph(image, 128))
    print(f"photographs: {flagged(list(photos.values()))}; passing: " +
          ", ".join(k for k, v in photos.items() if v > CHEST_CONTRAST_MIN))


if __name__ == "__main__":
    main()
