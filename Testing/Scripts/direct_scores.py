"""The direct path scored on a datalist's validation cases, as `xctdiff evaluate` does (fp32, style off,
its seeds, the pinned protocol): shared by average_direct.py and coarse_blend_sweep.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from XctDiffCore.evaluation.reconstructions import datalist_cases
from XctDiffCore.io import Radiograph
from XctDiffCore.metrics import body_region, volume_scores
from XctDiffCore.models.lpips import LPIPS

COLUMNS = ("psnr", "ssim", "lpips", "bone_dice", "lung_dice")


def validation_cases(datalist):
    """``(index, case, radiograph, body)`` for each validation case of the datalist (128^3 truth)."""
    for index, case in enumerate(datalist_cases(Path(datalist), 128)):
        yield index, case, Radiograph(case.drr, None, True, case.name), body_region(case.truth_hu)


def direct_reconstruction(pipe, radiograph, index: int, **options):
    """The direct path as `xctdiff evaluate` runs it (its seed, CPU, fp32, style off); ``options``: e.g. guidance."""
    return pipe.reconstruct(radiograph, seed=index, device="cpu", style="off", method="direct", precision="fp32", **options)


def direct_ct(pipe, radiograph, index: int) -> np.ndarray:
    return direct_reconstruction(pipe, radiograph, index).ct.array


class Scores:
    """Score volumes against a case's truth, keep the rows per label, print each and the means."""

    def __init__(self):
        self.lpips, self.rows = LPIPS.load(), {}

    def add(self, label: str, volume: np.ndarray, case, body) -> None:
        row = volume_scores(volume, case.truth_hu, self.lpips, "cpu", body)
        self.rows.setdefault(label, []).append(row)
        print(case.name, label, " ".join(f"{k}={row[k]:.3f}" for k in COLUMNS), flush=True)

    def print_means(self) -> None:
        for label, rows in self.rows.items():
            print("mean over cases", label, " ".join(f"{k}={np.mean([r[k] for r in rows]):.3f}" for k in COLUMNS))
