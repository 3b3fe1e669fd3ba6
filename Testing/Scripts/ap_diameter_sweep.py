"""What knowing the chest's AP diameter is worth: the direct path without it, with the truth's (as a perfect
caliper would give it), and with that diameter off by +-ERROR mm, on a datalist's validation cases.

    python Testing/Scripts/ap_diameter_sweep.py MODEL DS/datalist.json [ERROR_MM ...] [--figure OUT.png]

The diameter is measured on the truth exactly as `--ap-diameter` measures the reconstruction
(XctDiffCore/ap_diameter.py: mid-chest, midline, the body without the table) and given to the engine's
own option. Prints each case's diameters (the truth's and the reconstruction's own), the pinned-protocol
scores per case and their means (fp32, style off, the seeds of ``xctdiff evaluate``). ``--figure``: each case's
mid-axial slice (front at the top) of the truth, the reconstruction and the same stretched, in a lung window, one
row per case in the datalist's order.
"""
from __future__ import annotations

import sys

from direct_scores import Scores, direct_reconstruction, validation_cases
from XctDiffCore.ap_diameter import measure_ap_diameter
from XctDiffCore.figures import LUNG_WINDOW_HU, compose_grid, orthogonal_slices, window, write_png
from XctDiffCore.model_folder import FIELD_OF_VIEW_MM
from XctDiffCore.options import AP_DIAMETER_MM
from XctDiffCore.pipeline import XctDiffPipeline


def main() -> None:
    args = sys.argv[1:]
    figure = args.pop(args.index("--figure") + 1) if "--figure" in args[:-1] else None
    args = [a for a in args if a != "--figure"]
    if len(args) < 2:
        raise SystemExit("usage: " + next(line.strip() for line in __doc__.splitlines() if line.strip().startswith("python")))
    pipe = XctDiffPipeline.from_pretrained(args[0])
    errors = [float(e) for e in args[2:]]
    scores, rows = Scores(), []
    for index, case, radiograph, body in validation_cases(args[1]):
        truth_mm = measure_ap_diameter(case.truth_hu, FIELD_OF_VIEW_MM / case.truth_hu.shape[1])[0]
        plain = direct_reconstruction(pipe, radiograph, index)
        known = direct_reconstruction(pipe, radiograph, index, ap_diameter=truth_mm)
        print(f"{case.name}: truth's AP diameter {truth_mm:.1f} mm, the reconstruction's own {known.learnt_ap_diameter:.1f} mm",
              flush=True)
        scores.add("direct", plain.ct.array, case, body)
        scores.add("diameter known", known.ct.array, case, body)
        rows.append([(f"truth {truth_mm:.0f} mm", window(orthogonal_slices(case.truth_hu)["axial"], LUNG_WINDOW_HU)),
                     (f"direct {known.learnt_ap_diameter:.0f} mm", window(orthogonal_slices(plain.ct.array)["axial"], LUNG_WINDOW_HU)),
                     (f"stretched {truth_mm:.0f} mm", window(orthogonal_slices(known.ct.array)["axial"], LUNG_WINDOW_HU))])
        for error in errors:
            for signed in (-error, error):
                given = min(AP_DIAMETER_MM[1], max(AP_DIAMETER_MM[0], truth_mm + signed))
                scores.add(f"diameter {signed:+g} mm", direct_reconstruction(pipe, radiograph, index,
                                                                            ap_diameter=given).ct.array, case, body)
    scores.print_means()
    if figure:
        print("wrote", write_png(compose_grid(rows), figure))


if __name__ == "__main__":
    main()
