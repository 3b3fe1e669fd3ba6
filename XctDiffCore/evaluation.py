"""``xctdiff evaluate``: reconstruct held-out CTs from their DRRs and score them, with baselines, in one run.

**Protocol** (the metrics themselves are pinned in :mod:`XctDiffCore.metrics`):

* **Cases.** With a datalist (``xctdiff prepare``): its ``validation`` entries without augmentation
  (``aug == 0``; patients never seen in training), their stored DRR as the input; with
  ``augmented=True`` (``--augmented``) the augmented variants of those patients too: more cases for
  comparing two models on a small validation set (they are not independent patients). With a CT file or
  folder: each CT preprocessed as for training (:func:`~XctDiffCore.preprocess.preprocess_ct`, 128^3
  at 2.5 mm) and its DRR rendered in the model's geometry (:func:`~XctDiffCore.drr.drr_of_volume`).
  Inputs are DRRs, so the style transfer is off.
* **Ground truth.** The case's prepared CT in HU on the output grid of the pipeline (128^3 at 2.5 mm,
  the paper's), whatever grid the model works on: a coarse model pays for its coarseness here.
* **Methods, same run, same cases:** ``xctdiff`` (the full pipeline: K samples, their mean scored,
  their std shown), ``direct`` (progressive encoder -> VQ decoder, no diffusion: the paper's
  ablation) and ``mean CT`` (one constant volume for every case: the mean of the datalist's
  ``training`` CTs; for a CT folder, the model folder's ``mean_ct.npy`` when it
  has one, else this baseline is left out). A method that does not beat the mean CT has learnt
  nothing case-specific.
* **Seeds.** Case ``i`` is sampled with seed ``seed + i``: a rerun gives the same numbers.

Outputs in ``--out`` (created): ``metrics.csv`` (one row per case and method), ``summary.md`` (mean ±
std over cases per method, like the paper's Table 1; std with ddof = 0), ``summary.json`` and
``figure.png`` (a few cases: input, truth, each method, the uncertainty; mid-coronal slices).
"""
from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import XctDiffError

METRICS = ("psnr", "ssim", "psnr_slices", "ssim_slices", "lpips")
METRIC_TITLES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "psnr_slices": "PSNR slices (dB)", "ssim_slices": "SSIM slices",
                 "lpips": "LPIPS"}
METHOD_TITLES = {"xctdiff": "XctDiff", "direct": "direct (no diffusion)", "mean_ct": "mean training CT"}
CSV_COLUMNS = ("case", "method", *METRICS, "consistency", "seconds")


@dataclass
class Case:
    """One evaluation case: its name, the input DRR in [0, 1] (display orientation) and the truth in HU."""

    name: str
    drr: np.ndarray  # [row, col] in [0, 1]
    truth_hu: np.ndarray  # [z, y, x] on the output grid (128^3)


def model_grid_hu(ct_hu: np.ndarray, size: int) -> np.ndarray:
    """A prepared canonical 128^3 CT -> ``size``^3 canonical HU, average-pooled as the training data loader does."""
    from .layout import model_layout_to_ct, unit_to_hu
    from .training.data import ct_to_model

    return model_layout_to_ct(unit_to_hu(ct_to_model(np.asarray(ct_hu), size)[0].numpy())).astype(np.float32)


def resample_hu(ct_hu: np.ndarray, size: int) -> np.ndarray:
    """A canonical HU cube -> ``size``^3, trilinearly (as the pipeline brings a coarse model's output to its grid)."""
    import torch
    import torch.nn.functional as F

    if ct_hu.shape == (size,) * 3:
        return np.asarray(ct_hu, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(ct_hu, dtype=np.float32))[None, None]
    return F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0].numpy()


def _is_datalist(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".json"


def datalist_cases(datalist: Path, volume_size: int, max_cases: Optional[int] = None, augmented: bool = False) -> list:
    from .training.data import read_datalist

    validation = read_datalist(datalist, "validation")  # checks the file and the entries
    raw = json.loads(datalist.read_text(encoding="utf-8")).get("validation", [])
    items = [item for entry, item in zip(raw, validation) if augmented or int(entry.get("aug", 0)) == 0]
    if not items:
        raise XctDiffError(f"{datalist} has no validation entries to evaluate (make one with `xctdiff prepare`)")
    cases = []
    for item in items[:max_cases]:
        with np.load(item["image"]) as npz:
            ct = npz["ct"]
        cases.append(Case(Path(item["image"]).stem, np.load(item["xray"]).astype(np.float32), model_grid_hu(ct, volume_size)))
    return cases


def datalist_mean_ct(datalist: Path, volume_size: int) -> Optional[np.ndarray]:
    """Mean of the datalist's training CTs on a ``volume_size``^3 grid (HU), or None without training entries."""
    from .training.data import read_datalist

    items = read_datalist(datalist, "training")
    if not items:
        return None
    total = None
    for item in items:
        with np.load(item["image"]) as npz:
            hu = model_grid_hu(npz["ct"], volume_size).astype(np.float64)
        total = hu if total is None else total + hu
    return (total / len(items)).astype(np.float32)


def ct_folder_cases(path: Path, volume_size: int, geometry: str, max_cases: Optional[int] = None) -> list:
    from .drr import drr_of_volume
    from .io import read_ct
    from .model_folder import PREPARED_SIZE, PREPARED_SPACING_MM
    from .prepare import find_ct_inputs
    from .preprocess import preprocess_ct

    cases = []
    for ct_input in find_ct_inputs([path])[:max_cases]:
        ct = preprocess_ct(read_ct(ct_input.path), size=PREPARED_SIZE, spacing=PREPARED_SPACING_MM)
        drr = drr_of_volume(ct, geometry, PREPARED_SIZE)
        cases.append(Case(ct_input.patient, drr, model_grid_hu(ct.array, volume_size)))
    return cases


def evaluate(
    model,
    data,
    out_dir,
    steps: Optional[int] = None,
    samples: int = 1,
    seed: int = 0,
    device: str = "auto",
    max_cases: Optional[int] = None,
    sampler: Optional[str] = None,
    figure_cases: int = 4,
    progress: bool = True,
    augmented: bool = False,
) -> dict:
    """Run the protocol of the module docstring; write the outputs; return the summary (method -> metric -> mean/std)."""
    from tqdm import tqdm

    from .io import Radiograph
    from .metrics import volume_scores
    from .models.lpips import LPIPS
    from .pipeline import OUTPUT_SIZE, XctDiffPipeline

    data, out_dir = Path(data), Path(out_dir)
    if not data.exists():
        raise XctDiffError(f"evaluation data not found: {data}")
    if max_cases is not None and max_cases < 1:
        raise XctDiffError(f"--max-cases must be at least 1, got {max_cases}")
    if not out_dir.parent.is_dir():
        raise XctDiffError(f"output folder does not exist: {out_dir.parent}")
    out_dir.mkdir(exist_ok=True)
    pipe = XctDiffPipeline.from_pretrained(model)
    size = OUTPUT_SIZE
    if _is_datalist(data):
        cases = datalist_cases(data, size, max_cases, augmented)
        mean_ct = datalist_mean_ct(data, size)
    else:
        cases = ct_folder_cases(data, size, pipe.info.geometry, max_cases)
        mean_ct = None if pipe.mean_ct is None else resample_hu(pipe.mean_ct, size)
    lpips = LPIPS.load()

    rows, figure = [], []
    for index, case in enumerate(tqdm(cases, desc="evaluate", unit="case", file=sys.stderr, disable=not progress)):
        radiograph = Radiograph(case.drr, None, True, case.name)
        outputs = {
            "xctdiff": pipe.reconstruct(radiograph, steps=steps, samples=samples, seed=seed + index, device=device, style="off",
                                        method="diffusion", sampler=sampler),
            "direct": pipe.reconstruct(radiograph, seed=seed + index, device=device, style="off", method="direct"),
        }
        for method, result in outputs.items():
            scores = volume_scores(result.ct.array, case.truth_hu, lpips, pipe.device)
            rows.append({"case": case.name, "method": method, **scores, "consistency": result.consistency,
                         "seconds": result.timings["total"]})
        if mean_ct is not None:
            rows.append({"case": case.name, "method": "mean_ct", **volume_scores(mean_ct, case.truth_hu, lpips, pipe.device),
                         "consistency": None, "seconds": None})
        if index < figure_cases:
            figure.append((case, outputs))

    summary = summarize(rows)
    _write_text(out_dir / "metrics.csv", metrics_csv(rows))
    header = (f"Model `{pipe.info.model_id}` {pipe.info.version}, {len(cases)} cases from `{data.name}`, "
              f"{samples} sample(s), {steps or pipe.info.steps} {sampler or pipe.info.sampler} steps, "
              f"model grid {pipe.info.volume_size}^3, scored on {size}^3 at 2.5 mm. Mean ± std over cases.\n\n")
    _write_text(out_dir / "summary.md", header + markdown_table(summary))
    _write_text(out_dir / "summary.json", json.dumps({"model": pipe.info.model_id, "cases": len(cases), "summary": summary},
                                                     indent=2) + "\n")
    if figure:
        from .views import compose_grid, write_png

        write_png(compose_grid(figure_rows(figure, mean_ct)), out_dir / "figure.png")
    return summary


def summarize(rows: list) -> dict:
    """method -> metric -> {"mean", "std", "n"} over the cases (metrics absent for a method are left out)."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        summary[method] = {}
        for metric in (*METRICS, "consistency"):
            values = [r[metric] for r in rows if r["method"] == method and r.get(metric) is not None]
            if values:
                summary[method][metric] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
    return summary


def markdown_table(summary: dict) -> str:
    """The paper's Table 1 layout: one row per method, mean ± std per metric; an empty cell where absent."""
    lines = ["| method | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |",
             "| --- |" + " ---: |" * len(METRICS)]
    for method, metrics in summary.items():
        cells = []
        for m in METRICS:
            if m in metrics:
                digits = 2 if m.startswith("psnr") else 3
                cells.append(f"{metrics[m]['mean']:.{digits}f} ± {metrics[m]['std']:.{digits}f}")
            else:
                cells.append("")
        lines.append(f"| {METHOD_TITLES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def metrics_csv(rows: list) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                         for k in CSV_COLUMNS})
    return buffer.getvalue()


def figure_rows(figure: list, mean_ct: Optional[np.ndarray]) -> list:
    """Per case: input DRR | truth | XctDiff | direct | mean CT | XctDiff std (mid-coronal slices)."""
    from .views import orthogonal_slices, scale_to_unit, window

    rows = []
    for case, outputs in figure:
        coronal = lambda hu: window(orthogonal_slices(hu)["coronal"])  # noqa: E731
        row = [(f"{case.name[:22]}", case.drr), ("truth", coronal(case.truth_hu)),
               ("XctDiff", coronal(outputs["xctdiff"].ct.array)), ("direct", coronal(outputs["direct"].ct.array))]
        if mean_ct is not None:
            row.append(("mean CT", coronal(mean_ct)))
        uncertainty = outputs["xctdiff"].uncertainty
        if uncertainty is not None:
            row.append(("XctDiff std", scale_to_unit(orthogonal_slices(uncertainty.array)["coronal"])))
        rows.append(row)
    return rows


def _write_text(path: Path, text: str) -> Path:
    from .atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
