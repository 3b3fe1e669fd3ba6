"""``xctdiff reconstruct FOLDER --report FILE.csv``: one row per radiograph of the run, for a spreadsheet.

A folder of a thousand films leaves a thousand summary lines in a terminal or a log; a researcher sorting the
films by consistency, or listing those flagged or skipped, wants them as a table. One row per film: its path
below the folder, what became of it (``reconstructed``, ``skipped`` with the reason, ``already done`` under
``--skip-existing``, ``not reached`` in a run stopped by Ctrl-C or SIGTERM), its CT, the consistency, the method,
seed, precision and device, its seconds, and its warnings. Written whole or not at all (:mod:`XctDiffCore.atomic`),
sorted by film; under ``torchrun`` rank 0 writes every rank's rows.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

COLUMNS = ("film", "status", "output", "consistency", "method", "seed", "precision", "device", "seconds",
           "warnings", "reason")


def row(film: str, status: str, output=None, result=None, seconds: Optional[float] = None, reason: str = "") -> dict:
    """A row of the report (plain strings, JSON-safe: it crosses torchrun's store as it is)."""
    values = {"film": film, "status": status, "output": "" if output is None else str(output), "reason": reason}
    if result is not None:
        values.update(consistency=f"{result.consistency:.3f}", method=result.method, precision=result.precision,
                      seed="" if result.method == "direct" else str(result.seed), device=result.device,
                      warnings=" | ".join(result.warnings))
    if seconds is not None:
        values["seconds"] = f"{seconds:.2f}"
    return {column: values.get(column, "") for column in COLUMNS}


def write_report(path, rows: list) -> Path:
    """The rows, sorted by film, as a CSV file with a header (UTF-8, as spreadsheets open it)."""
    from ..atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8-sig") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(sorted(rows, key=lambda r: r["film"]))
    return path
