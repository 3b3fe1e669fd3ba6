"""Would a blurred reconstruction gain from real CT intensities? The direct path's voxels remapped, by rank,
to the value distribution of real chests (quantile mapping), fully or in part, scored beside it.

    python Testing/Scripts/histogram_remap_sweep.py MODEL DS/datalist.json [--coarse auto|off]

The direct path predicts, voxel by voxel, something close to the average of what the film allows: lungs too
dense, bone at soft tissue's level, grey air (Docs/RESULTS.md, "Where the error lives"). A monotone remap
keeps the prediction's order (what is denser than what) and gives it the histogram of a real chest: that of
the 3 training CTs whose DRRs are nearest (kNN's), or of all training CTs. ``alpha`` blends the remapped
volume with the prediction (0 = the prediction). Printed per case and as means (PSNR, SSIM, LPIPS, bone and
lung Dice on the pinned protocol). Used in Docs/RESULTS.md ("Real intensities for a blurred prediction?").
"""
from __future__ import annotations

import argparse

import numpy as np

from direct_scores import Scores, direct_reconstruction, validation_cases
from XctDiffCore.evaluation.reconstructions import datalist_training, model_grid_hu, nearest_training
from XctDiffCore.pipeline import XctDiffPipeline

ALPHAS = (0.5, 1.0)


def quantile_remap(volume: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``volume`` with its sorted values replaced by the same quantiles of ``reference`` (ties by position)."""
    flat = volume.ravel()
    order = np.argsort(flat, kind="stable")
    levels = np.sort(reference.ravel())
    quantiles = np.interp(np.linspace(0.0, 1.0, flat.size), np.linspace(0.0, 1.0, levels.size), levels)
    out = np.empty_like(flat)
    out[order] = quantiles
    return out.reshape(volume.shape)


def training_volumes(patients: list) -> np.ndarray:
    volumes = []
    for patient in patients:
        with np.load(patient.image) as npz:
            volumes.append(model_grid_hu(npz["ct"], 128))
    return np.stack(volumes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("datalist")
    parser.add_argument("--coarse", default="auto", choices=("auto", "off"))
    args = parser.parse_args()
    pipe = XctDiffPipeline.from_pretrained(args.model)
    training = datalist_training(args.datalist)
    everyone = training_volumes(training)
    scores = Scores()
    for index, case, radiograph, body in validation_cases(args.datalist):
        direct = direct_reconstruction(pipe, radiograph, index, coarse=args.coarse).ct.array.astype(np.float32)
        scores.add("direct", direct, case, body)
        nearest = {t.patient for t in nearest_training(case.drr, training, 3)}
        references = {"knn3": everyone[[t.patient in nearest for t in training]], "all": everyone}
        for name, reference in references.items():
            remapped = quantile_remap(direct, reference)
            for alpha in ALPHAS:
                scores.add(f"remap-{name}-{alpha:g}", (1 - alpha) * direct + alpha * remapped, case, body)
    scores.print_means()


if __name__ == "__main__":
    main()
