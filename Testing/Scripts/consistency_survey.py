"""Measure a model's consistency scores on ../shared/data, to choose its `min_consistency` (the manifest key
below which the pipeline flags a result as unreliable; see XctDiffCore/plausibility.py).

    python Testing/Scripts/consistency_survey.py [--model DIR] [--threshold T] [--films 30] [--out consistency_survey.json]

Reconstructs (default path, seed 0, style off or auto as the model will be used) real frontal
films, the same films inverted, frontal and lateral DRRs of the shared CTs, and scikit-image photographs,
and prints the distribution of the data-consistency score of each kind. About 3 s a reconstruction on a
quiet 2-core CPU. Needs `xctdiff prepare ../shared/data/ct --out .data/ds` done first (the CTs and DRRs).
"""
from __future__ import annotations

import argparse
import glob
import json
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from skimage import data

from XctDiffCore.drr import ConeGeometry, normalize_drr, render_drr
from XctDiffCore.io import Radiograph, read_radiograph
from XctDiffCore.layout import ct_to_model_layout
from XctDiffCore.model_folder import bundled_model_folder
from XctDiffCore.pipeline import XctDiffPipeline
from XctDiffCore.preprocess import preprocess_radiograph

KINDS = ("real films", "real films inverted", "frontal DRRs", "lateral DRRs", "photographs")
PHOTOS = ("camera", "astronaut", "coffee", "brick", "moon", "text", "horse", "page", "grass", "gravel", "rocket",
          "cat", "chelsea", "clock", "coins", "hubble_deep_field", "immunohistochemistry", "retina")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--datalist", default=".data/ds/datalist.json")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled one)")
    parser.add_argument("--films", type=int, default=30, help="random Kermany test films (plus the NIH, RSNA, RG1 films)")
    parser.add_argument("--threshold", type=float, default=None, help="count the scores below (default: the model's own)")
    parser.add_argument("--style", default="off", choices=("off", "auto"),
                        help="auto: real films, negatives and photographs go through the model's style stage, DRRs do not")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="the kinds of image to score")
    parser.add_argument("--out", default="consistency_survey.json")
    args = parser.parse_args()
    pipe = XctDiffPipeline.from_pretrained(args.model or bundled_model_folder())
    threshold = args.threshold if args.threshold is not None else pipe.info.min_consistency or 0.5
    cxr = Path(args.shared) / "cxr"
    random.seed(0)
    paths = random.sample(sorted(glob.glob(str(cxr / "kermany/test/*/*.jpeg"))), args.films)
    paths += sorted(glob.glob(str(cxr / "nih/*.png"))) + [str(cxr / "dicom/rsna_pneumonia_sample.dcm"),
                                                         "Resources/Samples/RG1_UNCR_chest_PA.dcm"]
    films = {Path(p).name: preprocess_radiograph(read_radiograph(p).image, 128) for p in paths}
    root = Path(args.datalist).parent
    listing = json.loads(Path(args.datalist).read_text(encoding="utf-8"))
    frontal, lateral = {}, {}
    for entry in listing["training"] + listing["validation"]:
        if entry.get("aug", 0):
            continue
        frontal[entry["patient"]] = np.load(root / entry["xray"])
        with np.load(root / entry["image"]) as npz:
            volume = torch.from_numpy(np.ascontiguousarray(ct_to_model_layout(npz["ct"].astype(np.float32))))[None, None]
        side = normalize_drr(render_drr(volume.transpose(2, 4).contiguous(), ConeGeometry(), 128))[0, 0].numpy()
        lateral[entry["patient"]] = preprocess_radiograph(side, 128)
    photos = {}
    for name in PHOTOS:
        image = getattr(data, name)().astype(np.float32)
        photos[name] = preprocess_radiograph(image[..., :3].mean(-1) if image.ndim == 3 else image, 128)
    kinds = {"real films": films, "real films inverted": {k: 1.0 - v for k, v in films.items()},
             "frontal DRRs": frontal, "lateral DRRs": lateral, "photographs": photos}

    scores = {}
    for kind in args.kinds:
        scores[kind] = {}
        is_drr = kind.endswith("DRRs")  # what `xctdiff drr` files say of themselves
        for name, image in kinds[kind].items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = pipe.reconstruct(Radiograph(image.astype(np.float32), None, is_drr, name), seed=0,
                                          device="cpu", style=args.style)
            scores[kind][name] = round(float(result.consistency), 4)
        values = np.asarray(list(scores[kind].values()))
        print(f"{kind} ({len(values)}): min {values.min():.3f}, 5th percentile {np.percentile(values, 5):.3f}, "
              f"median {np.median(values):.3f}, max {values.max():.3f}; below {threshold}: {int((values < threshold).sum())}",
              flush=True)
    Path(args.out).write_text(json.dumps({"model": pipe.info.model_id, "version": pipe.info.version,
                                          "style": args.style, "scores": scores},
                                         indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
