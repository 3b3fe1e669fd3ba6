"""The model manager: which model folder a reconstruction uses, and what to show about it.

A model folder holds ``manifest.json`` (id, version, per-stage files with SHA-256) beside its
``.safetensors`` files. The panel offers the bundled default (the engine resolves it:
``XctDiffPipeline.from_pretrained(None)``) or a folder of the user's. Here a chosen folder is checked
early, so that a wrong folder is a one-line message in the panel before any process starts; the
checksums themselves are verified by the engine when it loads the model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from XctDiffCore.errors import XctDiffError

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ModelChoice:
    """``folder`` None means the bundled default model."""

    folder: Optional[Path]
    model_id: str
    version: str

    @property
    def label(self) -> str:
        if self.folder is None:
            return "bundled default model"
        return f"{self.model_id} {self.version} ({self.folder})"

    def engine_arguments(self) -> list:
        return [] if self.folder is None else ["--model", str(self.folder)]


BUNDLED = ModelChoice(folder=None, model_id="bundled", version="")


def choose_model(folder=None) -> ModelChoice:
    """The bundled default for None or "", else the folder after a quick manifest check (a ModelChoice: itself)."""
    if isinstance(folder, ModelChoice):
        return folder
    if folder is not None and not isinstance(folder, (str, os.PathLike)):
        raise XctDiffError(f"model must be a model folder's path (or None for the bundled model), got {folder!r}")
    if folder is None or str(folder).strip() in ("", "."):
        return BUNDLED
    folder = Path(folder).expanduser()
    manifest_path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise XctDiffError(f"model folder not found: {folder}")
    if not manifest_path.is_file():
        raise XctDiffError(f"not a model folder (no {MANIFEST_NAME}): {folder}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XctDiffError(f"cannot read {manifest_path}: {exc}") from exc
    if not isinstance(manifest, dict) or "id" not in manifest or "version" not in manifest:
        raise XctDiffError(f"{manifest_path} lacks the model's 'id' and 'version'")
    return ModelChoice(folder=folder.resolve(), model_id=str(manifest["id"]), version=str(manifest["version"]))
