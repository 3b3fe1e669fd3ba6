"""Score a model's direct path beside the registered-atlas baseline and blends of the two.

    python Testing/Scripts/atlas_blend.py MODEL DS/datalist.json [K]

The atlas (`xctdiff evaluate --atlas K`, default 3; XctDiffCore/evaluation/atlas.py) uses everything the
film says about the frontal plane and nothing else; the direct path learnt the rest from the training
patients. If they erred differently, as the direct path and the coarse CT do, a blend would beat both.
Prints the pinned-protocol scores per case and their means for kNN, the atlas, the direct path, and
``(1 - w) direct + w atlas`` for w in 1/3 and 1/2 (fp32, style off, the seeds of ``xctdiff evaluate``).
"""
from __future__ import annotations

import sys
from pathlib import Path

from direct_scores import Scores, direct_ct, validation_cases
from XctDiffCore.evaluation.atlas import atlas_ct
from XctDiffCore.evaluation.reconstructions import datalist_training, knn_ct
from XctDiffCore.pipeline import XctDiffPipeline

ATLAS_WEIGHTS = (1 / 3, 1 / 2)


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    pipe = XctDiffPipeline.from_pretrained(sys.argv[1])
    k = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    training = datalist_training(Path(sys.argv[2]))
    scores = Scores()
    for index, case, radiograph, body in validation_cases(sys.argv[2]):
        direct = direct_ct(pipe, radiograph, index)
        knn, _ = knn_ct(case.drr, training, k, 128)
        atlas, neighbours = atlas_ct(case.drr, training, k, 128, pipe.info.geometry)
        print(case.name, "atlas of", " ".join(neighbours), flush=True)
        scores.add(f"knn k={k}", knn, case, body)
        scores.add(f"atlas k={k}", atlas, case, body)
        scores.add("direct", direct, case, body)
        for weight in ATLAS_WEIGHTS:
            scores.add(f"atlas weight {weight:.2f}", (1.0 - weight) * direct + weight * atlas, case, body)
    scores.print_means()


if __name__ == "__main__":
    main()
