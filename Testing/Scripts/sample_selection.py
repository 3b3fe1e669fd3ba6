"""Can the film pick the better diffusion sample? (an experiment for "use the film at inference")

    python Testing/Scripts/sample_selection.py MODEL DS/datalist.json K [PRECISION]

Each validation DRR is reconstructed by the diffusion path K times (DDIM 10, style off, seeds
1000 * case + k, PRECISION bf16 by default: the question is a ranking, not the fp32 figures); every
sample is scored with the pinned protocol (PSNR, SSIM, bone Dice) beside its consistency with the
film. Prints, per case, the spread of both and their correlation, then the mean scores of the first
sample, of the one whose DRR agrees best with the film (what `--samples K` could return instead of
their mean), and of the best by PSNR (an oracle: the most any selection could gain).
"""
from __future__ import annotations

import sys

import numpy as np

from direct_scores import validation_cases
from XctDiffCore import metrics
from XctDiffCore.pipeline import XctDiffPipeline


def main() -> None:
    if len(sys.argv) < 4:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    pipe, k = XctDiffPipeline.from_pretrained(sys.argv[1]), int(sys.argv[3])
    precision = sys.argv[4] if len(sys.argv) > 4 else "bf16"
    picks = {"first sample": [], "best consistency": [], "best PSNR (oracle)": []}
    for index, case, radiograph, _ in validation_cases(sys.argv[2]):
        truth01 = metrics.window01(case.truth_hu)
        rows = []
        for seed in range(1000 * index, 1000 * index + k):
            result = pipe.reconstruct(radiograph, method="diffusion", steps=10, seed=seed, style="off", device="cpu",
                                      precision=precision)
            guess01 = metrics.window01(result.ct.array)
            rows.append((result.consistency, metrics.psnr(guess01, truth01), metrics.ssim_3d(guess01, truth01),
                         metrics.bone_dice(result.ct.array, case.truth_hu)))
        rows = np.array(rows)
        consistency, psnr = rows[:, 0], rows[:, 1]
        print(f"{case.name}: consistency {consistency.min():.3f}-{consistency.max():.3f}, PSNR {psnr.min():.2f}-"
              f"{psnr.max():.2f} dB, correlation with PSNR {np.corrcoef(consistency, psnr)[0, 1]:.2f}, "
              f"with SSIM {np.corrcoef(consistency, rows[:, 2])[0, 1]:.2f}", flush=True)
        for label, row in zip(picks, (0, int(np.argmax(consistency)), int(np.argmax(psnr)))):
            picks[label].append(rows[row, 1:])
    for label, rows in picks.items():
        psnr, ssim, bone = np.mean(rows, axis=0)
        print(f"mean over cases, {label}: PSNR {psnr:.2f} dB, SSIM {ssim:.3f}, bone Dice {bone:.3f}")


if __name__ == "__main__":
    main()
