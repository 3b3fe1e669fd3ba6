"""``xctdiff evaluate-compare EVAL_A EVAL_B ...``: two or more ``xctdiff evaluate`` folders side by side.

Why: a researcher comparing two models (or two recipes, two seeds) had two ``summary.md`` files to hold side by side
by hand, with nothing to say whether they scored the same cases. This reads each folder's ``summary.json`` (what
made it) and ``metrics.csv`` (its rows per case), and writes one Markdown report:

* one line per evaluation: its label (the folder's name), the model and version, the cases, the date and command;
* the table: one row per method and evaluation, mean ± std over its cases (the metrics of ``summary.md``);
* per method scored by all, each later evaluation against the first **on the cases both scored** (paired): the
  mean difference ± its std, and on how many cases it is better. Means over different cases do not compare, so a
  warning says when the case lists differ, and the paired rows use the shared cases only.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..errors import XctDiffError
from .reconstructions import METRIC_TITLES, _cell, method_title

COMPARED = ("psnr", "ssim", "lpips", "bone_dice", "lung_dice_body")  # the columns a reader weighs
LOWER_IS_BETTER = {"lpips"}


def read_evaluation(folder) -> dict:
    """One finished evaluation: {"label", "folder", "summary" (summary.json), "rows" (metrics.csv), "cases"}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise XctDiffError(f"evaluation folder not found: {folder} (the --out of `xctdiff evaluate`)")
    summary_path, csv_path = folder / "summary.json", folder / "metrics.csv"
    if not summary_path.is_file() or not csv_path.is_file():
        interrupted = " (it holds an interrupted run: finish it with `xctdiff evaluate ... --resume`)" \
            if (folder / "progress.npz").is_file() else ""
        raise XctDiffError(f"{folder} is not a finished `xctdiff evaluate` folder: no summary.json and metrics.csv"
                           f"{interrupted}")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not isinstance(summary.get("summary"), dict) or any("case" not in r or "method" not in r for r in rows):
            raise ValueError("not the layout `xctdiff evaluate` writes")
    except (OSError, ValueError, AttributeError) as exc:
        raise XctDiffError(f"cannot read the evaluation in {folder}: {exc}") from None
    if "source" in summary:  # evaluate-autoencoder's: other methods, other columns
        raise XctDiffError(f"{folder} is an `xctdiff evaluate-autoencoder` folder: compare `xctdiff evaluate` folders")
    cases = list(dict.fromkeys(r["case"] for r in rows))
    return {"label": folder.name, "folder": folder, "summary": summary, "rows": rows, "cases": cases}


def _number(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _describe(evaluation: dict) -> str:
    summary = evaluation["summary"]
    model = " ".join(str(summary[k]) for k in ("model", "version") if summary.get(k))
    made = f", {summary['date']}" if summary.get("date") else ""
    command = f": `{summary['command']}`" if summary.get("command") else ""
    return f"- **{evaluation['label']}**: model `{model or 'not recorded'}`, {len(evaluation['cases'])} cases{made}{command}"


def compare_evaluations(folders) -> tuple:
    """(the Markdown report, its warnings) of two or more evaluation folders; the first is the reference."""
    evaluations = [read_evaluation(folder) for folder in folders]
    if len(evaluations) < 2:
        raise XctDiffError("give two or more evaluation folders to compare")
    labels = [e["label"] for e in evaluations]
    if len(set(labels)) < len(labels):  # eval/a and other/a: name them by their paths
        for e in evaluations:
            e["label"] = str(e["folder"])
    warnings_ = []
    shared = [c for c in evaluations[0]["cases"] if all(c in e["cases"] for e in evaluations[1:])]
    if any(e["cases"] != evaluations[0]["cases"] for e in evaluations[1:]):
        warnings_.append(f"the evaluations scored different cases ({', '.join(str(len(e['cases'])) for e in evaluations)}; "
                         f"{len(shared)} shared): their means do not compare; the paired differences use the shared ones")
    lines = ["Evaluations (the first is the reference of the differences):", ""]
    lines += [_describe(e) for e in evaluations] + [""]
    lines += ["| method | evaluation | " + " | ".join(METRIC_TITLES[m] for m in COMPARED) + " |",
              "| --- | --- |" + " ---: |" * len(COMPARED)]
    methods = list(dict.fromkeys(m for e in evaluations for m in e["summary"]["summary"]))
    for method in methods:
        for e in evaluations:
            metrics = e["summary"]["summary"].get(method)
            if metrics is None:
                continue
            knn, atlas = e["summary"].get("knn"), e["summary"].get("atlas")
            cells = [f"{_cell(m, metrics[m]['mean'])} ± {_cell(m, metrics[m]['std'])}" if isinstance(metrics.get(m), dict)
                     else "" for m in COMPARED]
            lines.append(f"| {method_title(method, knn, atlas)} | {e['label']} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired, on the {len(shared)} cases all scored: each evaluation minus **{evaluations[0]['label']}**, "
              "mean ± std over the cases (better on: how many cases it is better on; LPIPS: lower is better).", "",
              "| method | evaluation | " + " | ".join(f"Δ {METRIC_TITLES[m]}" for m in COMPARED) + " | better on (PSNR) |",
              "| --- | --- |" + " ---: |" * (len(COMPARED) + 1)]
    for method in methods:
        per_case = [{r["case"]: r for r in e["rows"] if r["method"] == method} for e in evaluations]
        cases = [c for c in shared if all(c in rows for rows in per_case)]
        if not cases:
            continue
        for e, rows in zip(evaluations[1:], per_case[1:]):
            cells, better = [], ""
            for m in COMPARED:
                pairs = [(_number(rows[c].get(m)), _number(per_case[0][c].get(m))) for c in cases]
                differences = [b - a for b, a in pairs if a is not None and b is not None]
                if not differences:
                    cells.append("")
                    continue
                cells.append(f"{_signed(m, np.mean(differences))} ± {_cell(m, float(np.std(differences)))}")
                if m == "psnr":
                    better = f"{sum(d > 0 for d in differences)} of {len(differences)}"
            reference = evaluations[0]["summary"]
            lines.append(f"| {method_title(method, reference.get('knn'), reference.get('atlas'))} | {e['label']} | "
                         + " | ".join(cells) + f" | {better} |")
    return "\n".join(lines) + "\n", warnings_


def _signed(metric: str, value: float) -> str:
    text = _cell(metric, float(value))
    return text if text.startswith("-") else "+" + text


def write_comparison(folders, out=None) -> str:
    """:func:`compare_evaluations`, its warnings warned; the report written to ``out`` (atomically) when given."""
    import warnings

    report, notes = compare_evaluations(folders)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    if out is not None:
        from ..atomic import atomic_path

        with atomic_path(Path(out)) as tmp:
            tmp.write_text(report, encoding="utf-8")
    return report
