"""Where the direct path's error lives: its squared error split by region of the truth, beside the mean CT's.

    python Testing/Scripts/error_by_region.py MODEL DS/datalist.json

For each validation case (the direct path as `xctdiff evaluate` runs it) and each region of the truth
(outside the body, lung: -1000 < HU < -400 inside the body, bone: HU > 200, the rest of the body), the
fraction of voxels, the region's share of the volume's squared error on the pinned [-1024, 2048] HU
window (the mean CT's share beside it) and the mean signed error in HU. Used in Docs/RESULTS.md ("Where
the error lives") to ask whether the direct path misplaces anatomy or blurs it.
"""
from __future__ import annotations

import sys

import numpy as np

from direct_scores import direct_ct, validation_cases
from XctDiffCore.evaluation.reconstructions import datalist_mean_ct
from XctDiffCore.metrics import BONE_HU, lung_mask, psnr, window01
from XctDiffCore.pipeline import XctDiffPipeline

WINDOW_HU = 3072.0  # [-1024, 2048]


def regions(truth_hu: np.ndarray, body: np.ndarray) -> dict:
    lung = lung_mask(truth_hu) & body
    bone = truth_hu > BONE_HU
    return {"outside": ~body, "lung": lung, "bone": bone, "soft": body & ~lung & ~bone}


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    pipe = XctDiffPipeline.from_pretrained(sys.argv[1])
    mean_ct = datalist_mean_ct(sys.argv[2], 128)
    for index, case, radiograph, body in validation_cases(sys.argv[2]):
        truth = window01(case.truth_hu)
        direct = window01(direct_ct(pipe, radiograph, index)) - truth
        baseline = window01(mean_ct) - truth
        print(f"{case.name}: PSNR direct {psnr(direct + truth, truth):.2f} dB, mean CT {psnr(baseline + truth, truth):.2f} dB")
        for name, mask in regions(case.truth_hu, body).items():
            share = (direct[mask] ** 2).sum() / (direct ** 2).sum()
            share_mean = (baseline[mask] ** 2).sum() / (baseline ** 2).sum()
            print(f"  {name:8s} voxels {mask.mean():.2f}  error share {share:.2f} (mean CT {share_mean:.2f})  "
                  f"mean error {direct[mask].mean() * WINDOW_HU:+.0f} HU", flush=True)


if __name__ == "__main__":
    main()
