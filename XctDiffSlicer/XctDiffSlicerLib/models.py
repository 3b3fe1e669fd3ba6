"""The model manager: which model folder a reconstruction uses, and what to show about it.

A model folder holds ``manifest.json`` (id, version, per-stage files with SHA-256) beside its
``.safetensors`` files. The panel offers the bundled default (the engine resolves it:
``XctDiffPipeline.from_pretrained(None)``) or a folder of the user's. Here a chosen folder is checked
early (:func:`XctDiffCore.model_manifest.check_model_folder`: torch-free, the engine's own sentences), so that a
wrong folder (a partial one, a file of it, one copied without a file, a manifest edited by hand or of a newer
format) is a one-line message in the panel before any process starts; the checksums themselves are verified by
the engine when it loads the model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from XctDiffCore.errors import XctDiffError
from XctDiffCore.model_manifest import MANIFEST_NAME, check_model_folder  # noqa: F401 (logic imports the name)


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
    manifest = check_model_folder(folder)  # the engine's own checks and sentences, short of the weights' SHA-256
    return ModelChoice(folder=folder.resolve(), model_id=str(manifest.get("id", folder.resolve().name)),
                       version=str(manifest.get("version", "")))
