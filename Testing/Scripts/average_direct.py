"""Score the voxel-wise mean of several models' direct CTs on a datalist's validation cases (an experiment).

    python Testing/Scripts/average_direct.py DS/datalist.json MODEL_A MODEL_B [...]

Each model reconstructs every validation DRR by its direct path (fp32, style off, the seeds of
`xctdiff evaluate`); each model and their mean are scored with the pinned protocol. Used in the README
("Encoders on a GPU") to ask whether two encoders err differently (they did not).
"""
from __future__ import annotations

import sys

import numpy as np

from direct_scores import Scores, direct_ct, validation_cases
from XctDiffCore.pipeline import XctDiffPipeline


def main() -> None:
    if len(sys.argv) < 4:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    models = sys.argv[2:]
    pipes = [XctDiffPipeline.from_pretrained(m) for m in models]
    scores = Scores()
    for index, case, radiograph, body in validation_cases(sys.argv[1]):
        volumes = [direct_ct(pipe, radiograph, index) for pipe in pipes]
        for label, volume in [*zip(models, volumes), ("mean", np.mean(volumes, axis=0))]:
            scores.add(label, volume, case, body)
    scores.print_means()


if __name__ == "__main__":
    main()
