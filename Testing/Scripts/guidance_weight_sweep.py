"""Where guidance puts the film's correction: the density power of its weight, swept on the validation cases.

``w = STEP_HU * clip((HU + 1000) / 1000, 0, 2) ** power`` (XctDiffCore/guidance.py): power 1 is the
shipped rule; a higher power moves the correction from soft tissue towards what the decoder already
made denser (faint ribs, spine), a lower one spreads it more evenly (power 0: along
whole rays, air included). Scored like `xctdiff
evaluate` (direct path, fp32, style off):

    python Testing/Scripts/guidance_weight_sweep.py MODEL DS/datalist.json [STRENGTH] [POWER ...]
"""
import sys

from XctDiffCore import guidance
from XctDiffCore.pipeline import XctDiffPipeline

from direct_scores import Scores, direct_ct, direct_reconstruction, validation_cases

model, datalist = sys.argv[1], sys.argv[2]
strength = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
powers = [float(p) for p in sys.argv[4:]] or [1.0, 2.0, 3.0]
pipe, scores = XctDiffPipeline.from_pretrained(model), Scores()
for index, case, radiograph, body in validation_cases(datalist):
    scores.add("unguided", direct_ct(pipe, radiograph, index), case, body)
    for power in powers:
        guidance.DENSITY_POWER = power
        result = direct_reconstruction(pipe, radiograph, index, guidance=strength)
        scores.add(f"power {power:g}", result.ct.array, case, body)
        print(case.name, f"power {power:g} consistency {result.consistency:.3f} (unguided {result.unguided_consistency:.3f})")
scores.print_means()
