"""Score a model's direct path beside a second estimate and blends of the two, on a datalist's validation cases.

    python Testing/Scripts/blend_sweep.py MODEL DS/datalist.json {atlas[:K],mean,diffusion,self} [WEIGHT ...]

The direct path is the conditional mean: the best PSNR, and smooth. The second estimate is sharper and errs
differently: ``atlas``, the registered-atlas baseline (`xctdiff evaluate --atlas K`, K 3 unless ``atlas:K``;
XctDiffCore/evaluation/atlas.py; kNN with the same K is scored beside it), ``mean``, the datalist's mean
training CT registered to the film by the same warp (one CT that is no patient's: what a model folder could
carry, as its ``mean_ct.npy``), or ``diffusion``, the model's own diffusion sample
(DDIM 10, unguided), or ``self``, the direct path's own output registered to the film by that warp (a refinement
that needs no training CT). ``(1 - w) direct + w other`` for each weight (default 1/4, 1/3, 1/2) asks whether a little
of the other's texture buys perceptual sharpness (LPIPS) for no PSNR. Prints the pinned-protocol scores per case
and their means (fp32, style off, the seeds of ``xctdiff evaluate``).
"""
from __future__ import annotations

import sys
from pathlib import Path

from direct_scores import Scores, direct_ct, validation_cases
from XctDiffCore.pipeline import XctDiffPipeline

DEFAULT_WEIGHTS = (1 / 4, 1 / 3, 1 / 2)


def main() -> None:
    other, _, k = sys.argv[3].partition(":") if len(sys.argv) > 3 else ("", "", "")
    if other not in ("atlas", "mean", "diffusion", "self") or (k and not (other == "atlas" and k.isdigit() and int(k) > 0)):
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    atlas_k = int(k or 3)
    pipe = XctDiffPipeline.from_pretrained(sys.argv[1])
    weights = [float(w) for w in sys.argv[4:]] or DEFAULT_WEIGHTS
    if other == "atlas":
        from XctDiffCore.evaluation.atlas import atlas_ct
        from XctDiffCore.evaluation.reconstructions import datalist_training, knn_ct

        training = datalist_training(Path(sys.argv[2]))
    if other in ("mean", "self"):
        from XctDiffCore.evaluation.atlas import registered_ct
    if other == "mean":
        from XctDiffCore.evaluation.reconstructions import datalist_mean_ct

        mean_ct = datalist_mean_ct(Path(sys.argv[2]), 128)
    scores = Scores()
    for index, case, radiograph, body in validation_cases(sys.argv[2]):
        direct = direct_ct(pipe, radiograph, index)
        if other == "atlas":
            scores.add(f"knn k={atlas_k}", knn_ct(case.drr, training, atlas_k, 128)[0], case, body)
            estimate, neighbours = atlas_ct(case.drr, training, atlas_k, 128, pipe.info.geometry)
            print(case.name, "atlas of", " ".join(neighbours), flush=True)
        elif other == "mean":
            estimate, _ = registered_ct(mean_ct, case.drr, pipe.info.geometry)
        elif other == "self":
            estimate, _ = registered_ct(direct, case.drr, pipe.info.geometry)
        else:
            estimate = pipe.reconstruct(radiograph, steps=10, seed=index, device="cpu", style="off", method="diffusion",
                                        precision="fp32").ct.array
        scores.add(other, estimate, case, body)
        scores.add("direct", direct, case, body)
        for weight in weights:
            scores.add(f"{other} weight {weight:.2f}", (1.0 - weight) * direct + weight * estimate, case, body)
    scores.print_means()


if __name__ == "__main__":
    main()
