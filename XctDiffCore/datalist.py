"""The datalist `xctdiff prepare` writes (CT + DRR pairs, split by patient): reading it, torch-free.

Training, evaluation and the style evaluation read the same file; this module is theirs to share, so
evaluation never imports the training package.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import XctDiffError


def read_datalist(path, section: str) -> list[dict]:
    """The entries of one section with absolute paths; a clear error for a missing file or key."""
    path = Path(path)
    if not path.is_file():
        raise XctDiffError(f"datalist not found: {path} (make one with `xctdiff prepare`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise XctDiffError(f"{path} is not valid JSON: {exc}") from None
    entries = data.get(section, [])
    items = []
    for entry in entries:
        if "image" not in entry or "xray" not in entry:
            raise XctDiffError(f"{path}: every {section} entry needs 'image' and 'xray', got {sorted(entry)}")
        items.append(
            {
                "image": path.parent / entry["image"],
                "xray": path.parent / entry["xray"],
                "patient": str(entry.get("patient", Path(entry["image"]).stem)),
            }
        )
    return items


def datalist_geometry(path) -> str:
    """The DRR geometry a datalist's radiographs were rendered in (``settings.geometry``; cone by default)."""
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return "cone"
    return str(settings.get("geometry", "cone")) if isinstance(settings, dict) else "cone"
