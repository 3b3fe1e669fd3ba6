"""Score a model's direct path at several coarse-CT blend weights on a datalist's validation cases.

    python Testing/Scripts/coarse_blend_sweep.py MODEL DS/datalist.json [BLEND ...]

The direct path of a model with a coarse stage is ``(1 - blend) x decoded + blend x coarse``
(``coarse.blend`` in its coarse.json, 0.5 in the ``cpu`` config); this prints the pinned-protocol
scores per case and their means for each weight (fp32, style off, the seeds of ``xctdiff evaluate``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from XctDiffCore.evaluation.reconstructions import datalist_cases
from XctDiffCore.io import Radiograph
from XctDiffCore.metrics import body_region, volume_scores
from XctDiffCore.models.lpips import LPIPS
from XctDiffCore.pipeline import XctDiffPipeline

COLUMNS = ("psnr", "ssim", "lpips", "bone_dice", "lung_dice")


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    pipe = XctDiffPipeline.from_pretrained(sys.argv[1])
    if pipe.coarse is None:
        raise SystemExit(f"error: {sys.argv[1]} has no coarse stage")
    blends = [float(b) for b in sys.argv[3:]] or [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    lpips, scores = LPIPS.load(), {b: [] for b in blends}
    for index, case in enumerate(datalist_cases(Path(sys.argv[2]), 128)):
        radiograph, body = Radiograph(case.drr, None, True, case.name), body_region(case.truth_hu)
        for blend in blends:
            pipe.coarse_blend = blend
            volume = pipe.reconstruct(radiograph, seed=index, device="cpu", style="off", method="direct", precision="fp32").ct.array
            row = volume_scores(volume, case.truth_hu, lpips, pipe.device, body)
            scores[blend].append(row)
            print(case.name, f"blend {blend:g}", " ".join(f"{k}={row[k]:.3f}" for k in COLUMNS), flush=True)
    for blend, rows in scores.items():
        print(f"mean over cases, blend {blend:g}", " ".join(f"{k}={np.mean([r[k] for r in rows]):.3f}" for k in COLUMNS))


if __name__ == "__main__":
    main()
