"""Score the voxel-wise mean of several models' direct CTs on a datalist's validation cases (an experiment).

    python Testing/Scripts/average_direct.py DS/datalist.json MODEL_A MODEL_B [...]

Each model reconstructs every validation DRR by its direct path (fp32, style off, the seeds of
`xctdiff evaluate`); each model and their mean are scored with the pinned protocol. Used in the README
("Encoders on a GPU") to ask whether two encoders err differently (they did not).
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
    if len(sys.argv) < 4:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    datalist, models = Path(sys.argv[1]), sys.argv[2:]
    pipes = [XctDiffPipeline.from_pretrained(m) for m in models]
    lpips, scores = LPIPS.load(), {}
    for index, case in enumerate(datalist_cases(datalist, 128)):
        radiograph = Radiograph(case.drr, None, True, case.name)
        volumes = [p.reconstruct(radiograph, seed=index, device="cpu", style="off", method="direct", precision="fp32").ct.array
                   for p in pipes]
        body = body_region(case.truth_hu)
        for name, volume in [*zip(models, volumes), ("mean", np.mean(volumes, axis=0))]:
            row = volume_scores(volume, case.truth_hu, lpips, pipes[0].device, body)
            scores.setdefault(name, []).append(row)
            print(case.name, name, " ".join(f"{k}={row[k]:.3f}" for k in COLUMNS), flush=True)
    for name, rows in scores.items():
        print("mean over cases", name, " ".join(f"{k}={np.mean([r[k] for r in rows]):.3f}" for k in COLUMNS))


if __name__ == "__main__":
    main()
