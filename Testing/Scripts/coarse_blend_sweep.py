"""Score a model's direct path at several coarse-CT blend weights on a datalist's validation cases.

    python Testing/Scripts/coarse_blend_sweep.py MODEL DS/datalist.json [BLEND ...]

The direct path of a model with a coarse stage is ``(1 - blend) x decoded + blend x coarse``
(``coarse.blend`` in its coarse.json, 0.5 in the ``cpu`` config); this prints the pinned-protocol
scores per case and their means for each weight (fp32, style off, the seeds of ``xctdiff evaluate``).
"""
from __future__ import annotations

import sys

from direct_scores import Scores, direct_ct, validation_cases
from XctDiffCore.pipeline import XctDiffPipeline


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    pipe = XctDiffPipeline.from_pretrained(sys.argv[1])
    if pipe.coarse is None:
        raise SystemExit(f"error: {sys.argv[1]} has no coarse stage")
    blends = [float(b) for b in sys.argv[3:]] or [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    scores = Scores()
    for index, case, radiograph, body in validation_cases(sys.argv[2]):
        for blend in blends:
            pipe.coarse_blend = blend
            scores.add(f"blend {blend:g}", direct_ct(pipe, radiograph, index), case, body)
    scores.print_means()


if __name__ == "__main__":
    main()
