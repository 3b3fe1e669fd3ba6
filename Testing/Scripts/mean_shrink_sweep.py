"""Score a model's direct path pulled towards (or pushed away from) its training mean CT, and mixed
with the kNN baseline's CT.

    python Testing/Scripts/mean_shrink_sweep.py MODEL DS/datalist.json [FACTOR ...]

Each validation case's direct CT ``d`` becomes ``mean + factor x (d - mean)`` (``mean`` the model
folder's mean training CT): a factor below 1 says the model's departures from the average chest are too
confident, above 1 too timid. Then ``(1 - w) x d + w x knn`` for w in 0.1 and 0.2 (``knn`` the mean of
the 3 training CTs whose DRRs are nearest the input's, as `xctdiff evaluate --knn 3`). Prints the
pinned-protocol scores per case and their means (fp32, style off, the seeds of ``xctdiff evaluate``);
factor 1 is the direct path itself, factor 0 the mean CT.
"""
from __future__ import annotations

import sys
from pathlib import Path

from direct_scores import Scores, direct_ct, validation_cases
from XctDiffCore.evaluation.reconstructions import datalist_training, knn_ct
from XctDiffCore.pipeline import XctDiffPipeline

KNN_WEIGHTS = (0.1, 0.2)


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__.strip().splitlines()[3].strip())
    pipe = XctDiffPipeline.from_pretrained(sys.argv[1])
    if pipe.mean_ct is None:
        raise SystemExit(f"error: {sys.argv[1]} has no mean_ct.npy")
    factors = [float(f) for f in sys.argv[3:]] or [0.0, 0.8, 0.9, 1.0, 1.1, 1.2]
    training = datalist_training(Path(sys.argv[2]))
    scores = Scores()
    for index, case, radiograph, body in validation_cases(sys.argv[2]):
        direct = direct_ct(pipe, radiograph, index)
        for factor in factors:
            scores.add(f"factor {factor:g}", pipe.mean_ct + factor * (direct - pipe.mean_ct), case, body)
        knn, _ = knn_ct(case.drr, training, 3, 128)
        for weight in KNN_WEIGHTS:
            scores.add(f"knn weight {weight:g}", (1.0 - weight) * direct + weight * knn, case, body)
    scores.print_means()


if __name__ == "__main__":
    main()
