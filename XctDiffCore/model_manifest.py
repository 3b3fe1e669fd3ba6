"""A model folder's ``manifest.json``, read and checked without torch.

The engine (:mod:`XctDiffCore.model_folder`) and the Slicer panel, which checks a chosen folder before any
engine process starts and cannot import torch for that, share these checks, so a folder is refused with the same
sentence in both; ``xctdiff inspect MODEL_FOLDER`` prints :func:`describe_model`.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from .errors import XctDiffError, counted

MANIFEST_NAME = "manifest.json"
MODEL_CARD_NAME = "MODEL_CARD.md"
REQUIRED_STAGES = ("autoencoder", "encoder", "diffusion")
OPTIONAL_STAGES = ("style", "coarse")
MEAN_CT_NAME = "mean_ct.npy"
#: What an export writes into a model folder (the manifest last)
MODEL_FILE_NAMES = frozenset({MANIFEST_NAME, MODEL_CARD_NAME, MEAN_CT_NAME, *(f"{stage}.{kind}" for stage in
                              REQUIRED_STAGES + OPTIONAL_STAGES for kind in ("safetensors", "json"))})
#: The manifest layout this engine reads and writes; a manifest without ``format`` is format 1. A later engine
#: that changes what a folder means (a new stage the networks need, ...) raises it, and this one then refuses
#: the folder instead of loading part of it.
MODEL_FORMAT = 1


def _not_a_folder(path: Path) -> str:
    """Why a file given as a model folder is not one, and what to give instead."""
    if (path.parent / MANIFEST_NAME).is_file():
        return f"expected a model folder, got one of its files: {path}; give the folder that holds it: {path.parent}"
    if path.suffix.lower() in (".zip", ".gz", ".tgz", ".tar", ".7z"):
        return f"expected a model folder, got an archive: {path}; unpack it and give the folder that holds manifest.json"
    return f"expected a model folder, got a file: {path}"


def _models_inside(folder: Path) -> str:
    """The model folders one level down, named for a user who gave the folder an archive was unpacked into."""
    try:
        inside = sorted(str(sub) for sub in folder.iterdir() if (sub / MANIFEST_NAME).is_file())
    except OSError:
        return ""
    if not inside:
        return ""
    more = ", ..." if len(inside) > 3 else ""
    return f"; the model folder{'s' if len(inside) > 1 else ''} in it: {', '.join(inside[:3])}{more}"


def model_files_in(folder) -> list:
    """The names of the files an export writes (:data:`MODEL_FILE_NAMES`) that ``folder`` holds, sorted."""
    try:
        return sorted(entry.name for entry in Path(folder).iterdir() if entry.name in MODEL_FILE_NAMES)
    except OSError:
        return []


def as_model_folder(folder) -> Path:
    """``folder`` as a Path; an empty name (``--model "$UNSET"``), which Path would take for the working folder,
    is refused."""
    if isinstance(folder, str) and not folder.strip():
        raise XctDiffError("the model folder given is an empty name: give a model folder, or none for the bundled model")
    return Path(folder)


def read_manifest(folder, required=REQUIRED_STAGES) -> dict:
    """``manifest.json`` of a model folder as a dict, with a clear error when it is missing or malformed.

    ``required``: the stages it must have (all three for reconstruction; fewer for a partial folder,
    e.g. an autoencoder exported before the later stages were trained).
    """
    folder = as_model_folder(folder)
    if not folder.exists():
        raise XctDiffError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise XctDiffError(_not_a_folder(folder))
    if not (folder / MANIFEST_NAME).is_file():
        found = model_files_in(folder)
        if found:  # the manifest is written last
            raise XctDiffError(f"{folder} holds a model folder's files ({', '.join(found[:2])}{', ...' * (len(found) > 2)}) "
                               f"but no {MANIFEST_NAME}, which an export writes last: it was copied or written only in "
                               "part; copy the whole model folder again, or export the run again into it")
        raise XctDiffError(f"not a model folder (no {MANIFEST_NAME}): {folder}{_models_inside(folder)}")
    path = model_file(folder, MANIFEST_NAME)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: as Windows Notepad saves an edit
    except OSError as exc:
        raise XctDiffError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XctDiffError(f"cannot read {path}: {exc} (edited by hand? copy the model folder again)") from None
    if isinstance(manifest, dict):
        _check_format(path, manifest)  # first: a newer format may lay out the rest differently
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        raise XctDiffError(f"{path} has no 'stages' section: not a model manifest")
    if not isinstance(manifest.get("sha256"), dict):
        raise XctDiffError(f"{path} has no 'sha256' checksums: refusing to load unverified weights")
    missing = [s for s in required if s not in manifest["stages"]]
    if missing:
        partial = (" (a partial model folder, which cannot reconstruct: the later stages train on it with "
                   "xctdiff train STAGE --init)") if tuple(required) == REQUIRED_STAGES and manifest["stages"] else ""
        raise XctDiffError(f"{path} lacks the {', '.join(missing)} stage(s){partial}")
    return manifest


def _check_format(path: Path, manifest: dict) -> None:
    value = manifest.get("format", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise XctDiffError(f"{path}: format must be a whole number from 1, got {value!r}")
    if value > MODEL_FORMAT:
        raise XctDiffError(f"{path} is model format {value}, made by a newer XctDiff than this one (it reads format "
                           f"{MODEL_FORMAT}): update XctDiff to use this model")


def model_file(folder, name: str) -> Path:
    """The file ``name`` of a model folder with its links followed, refused unless it lies in the folder:
    neither ``../x`` nor an absolute name nor a link (to a file or to a folder on the way) may lead out."""
    folder = Path(folder)
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise XctDiffError(f"{folder / MANIFEST_NAME}: file name {name!r} leaves the model folder")
    root = folder.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise XctDiffError(f"{folder / name} leaves the model folder (a link to {path}): copy the file into the folder")
    return path


def verify_checksums(folder, manifest: dict) -> dict:
    """Every file the manifest names exists in the folder and has its recorded SHA-256; every stage file
    is listed. Returns ``{name: bytes}``: the very bytes that were hashed, for the loaders to deserialise,
    so that a file changed after the check is never what gets loaded."""
    folder = Path(folder)
    sums = manifest["sha256"]
    for stage, record in manifest["stages"].items():
        for role in ("weights", "config"):
            name = record.get(role) if isinstance(record, dict) else None
            if not name:
                raise XctDiffError(f"{folder / MANIFEST_NAME}: stage {stage} names no {role} file")
            if name not in sums:
                raise XctDiffError(f"{folder / MANIFEST_NAME}: {name} has no SHA-256: refusing to load unverified weights")
    contents = {}
    for name, expected in sums.items():
        path = model_file(folder, name)
        if not path.is_file():
            raise XctDiffError(_missing_file(folder, name))
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise XctDiffError(f"cannot read {folder / name}: {exc.strerror or exc}") from None
        data = _as_exported(data, str(expected).lower())
        if hashlib.sha256(data).hexdigest() != str(expected).lower():
            raise XctDiffError(
                f"{folder / name} does not match its SHA-256 in {MANIFEST_NAME} (corrupted or changed file): "
                "copy or export the model folder again"
            )
        contents[name] = data
    return contents


def retrain_stages(folder, manifest: dict) -> tuple:
    """The stages listed under ``retrain`` (they learnt another autoencoder's latents: Testing/Scripts/add_stage.py
    --new-autoencoder); a folder whose encoder is one of them cannot reconstruct at all."""
    folder = Path(folder)
    stale = manifest.get("retrain") or []
    if not isinstance(stale, list) or not all(isinstance(name, str) for name in stale):
        raise XctDiffError(f"{folder / MANIFEST_NAME}: retrain must be a list of stage names, got {stale!r}")
    if "encoder" in stale:  # every path starts from the encoder's latent
        raise XctDiffError(f"{folder}: its encoder learnt another autoencoder's latents; train it on this one "
                           "(xctdiff train encoder --init this folder, then Testing/Scripts/add_stage.py --encoder RUN)")
    return tuple(stale)


def check_model_folder(folder) -> dict:
    """The manifest of a folder to reconstruct with, after every check that needs neither torch nor reading the
    weights (the Slicer panel's, on the GUI's thread): a whole, known-format manifest, its grid, its files present,
    no stage that learnt another autoencoder. The engine's loading then verifies the checksums and shapes."""
    manifest = read_manifest(folder)
    manifest_data(folder, manifest)
    retrain_stages(folder, manifest)
    for name in manifest["sha256"]:
        if not model_file(folder, name).is_file():
            raise XctDiffError(_missing_file(Path(folder), name))
    return manifest


def _missing_file(folder: Path, name: str) -> str:
    return f"model file missing: {folder / name} (the folder was copied without it): copy the whole model folder again"


def _as_exported(data: bytes, expected: str) -> bytes:
    """A text file of the folder (a stage's JSON, the model card) whose lines only got Windows' CRLF endings since
    the export, as Git for Windows' default core.autocrlf checks them out of a repository, is the file exported:
    its bytes with LF endings are returned when those, not these, have the recorded SHA-256."""
    if b"\r\n" not in data or b"\0" in data or hashlib.sha256(data).hexdigest() == expected:
        return data
    unix = data.replace(b"\r\n", b"\n")
    return unix if hashlib.sha256(unix).hexdigest() == expected else data


def manifest_data(folder, manifest: dict) -> dict:
    """The manifest's ``data`` section (the grid the model works on), each value it has checked: a hand edit that
    left a size that is not a whole number, or no number at all, is one sentence, not a crash while loading. A
    value of null counts as absent (the loader then takes it from the networks)."""
    path = Path(folder) / MANIFEST_NAME
    data = manifest.get("data") or {}
    if not isinstance(data, dict):
        raise XctDiffError(f"{path}: 'data' must be an object (volume_size, xray_size, spacing_mm, geometry), got {data!r}")
    for key in ("volume_size", "xray_size"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise XctDiffError(f"{path}: data.{key} must be a whole number of voxels or pixels, got {value!r}")
    spacing = data.get("spacing_mm")
    if spacing is not None and (isinstance(spacing, bool) or not isinstance(spacing, (int, float))
                                or not math.isfinite(spacing) or spacing <= 0):
        raise XctDiffError(f"{path}: data.spacing_mm must be a positive number of millimetres, got {spacing!r}")
    if data.get("geometry") is not None and not isinstance(data["geometry"], str):
        raise XctDiffError(f"{path}: data.geometry must be a name (cone or parallel), got {data['geometry']!r}")
    return {key: value for key, value in data.items() if value is not None}


# `xctdiff evaluate` summary rows worth a line in describe_model, and what a user calls them
FIGURE_ROWS = {"direct": "direct path", "xctdiff": "diffusion path", "mean_ct": "mean-CT baseline"}


def describe_model(folder) -> dict:
    """What ``xctdiff inspect MODEL_FOLDER`` prints: what the model is, what it can do, what it was trained on, its
    figures and its model card, from the manifest alone (:func:`checksum_words` then checks the files, so a
    corrupted folder is described before it is refused). A partial folder is described too: it trains the later
    stages."""
    folder = Path(folder)
    manifest = read_manifest(folder, required=())
    stages = manifest["stages"]
    facts = {"model": f"{manifest.get('id', folder.resolve().name)} {manifest.get('version', '')}".strip(),
             "folder": str(folder.resolve()), "format": manifest.get("format", 1),
             "stages": ", ".join(_stage_words(name, record) for name, record in stages.items())}
    data = manifest_data(folder, manifest)
    if data.get("volume_size"):
        spacing = f" of {data['spacing_mm']:g} mm" if "spacing_mm" in data else ""
        facts["grid"] = (f"{data['volume_size']}^3 voxels{spacing} from {data.get('xray_size', '?')} px radiographs "
                         f"({data.get('geometry', 'cone')}-beam DRRs)")
    missing = [stage for stage in REQUIRED_STAGES if stage not in stages]
    retrain = manifest.get("retrain") if isinstance(manifest.get("retrain"), list) else []
    diffusion = _settings(stages.get("diffusion"))
    if missing:
        facts["reconstructs"] = (f"no: a partial model folder (no {', '.join(missing)} stage); the later stages train "
                                 f"on it (xctdiff train {missing[0]} --init {folder})")
    elif "encoder" in retrain:
        facts["reconstructs"] = "no: its encoder learnt another autoencoder's latents (retrain in the manifest)"
    else:
        facts["reconstructs"] = (f"yes; default: the {diffusion.get('method', 'diffusion')} path (diffusion: "
                                 f"{diffusion.get('sampler', 'ddim')}, {diffusion.get('steps', '?')} steps)"
                                 + ("; not the diffusion path: it learnt another autoencoder's latents"
                                    if "diffusion" in retrain else ""))
    threshold = manifest.get("min_consistency")
    facts["reliability threshold"] = (f"{threshold} (a reconstruction whose DRR agrees less with its film is flagged)"
                                      if threshold is not None else "none (nothing is flagged unreliable)")
    facts.update(_training_words(manifest.get("training")))
    facts.update(_figure_words(manifest.get("metrics"), (manifest.get("training") or {}).get("validation_seen_in_training")))
    card = folder / MODEL_CARD_NAME
    if card.is_file():
        title = next((line.lstrip("# ").strip() for line in card.read_text(encoding="utf-8", errors="replace").splitlines()
                      if line.strip()), "")
        facts["model card"] = f"{card} ({title})" if title else str(card)
    else:
        facts["model card"] = "none"
    return facts


def checksum_words(folder) -> str:
    """``describe_model``'s last line: every file's SHA-256 checked (an XctDiffError naming the first that fails)."""
    return f"all {len(verify_checksums(folder, read_manifest(folder, required=())))} files match the manifest's SHA-256"


def _settings(record) -> dict:
    settings = record.get("settings") if isinstance(record, dict) else None
    return settings if isinstance(settings, dict) else {}


def _stage_words(name: str, record) -> str:
    settings = _settings(record)
    details = [f"{settings['parameters']:,} parameters" if isinstance(settings.get("parameters"), int) else "",
               str(settings.get("dtype", "")),
               f"step {settings['step']:,}" if isinstance(settings.get("step"), int) else "",
               f"fine-tuned from {settings['fine_tuned_from']}" if settings.get("fine_tuned_from") else ""]
    details = [d for d in details if d]
    return f"{name} ({', '.join(details)})" if details else name


def _training_words(training) -> dict:
    if not isinstance(training, dict):
        return {"trained on": "not recorded"}
    patients = training.get("training_patients")
    validation = training.get("validation_patients")
    count = lambda names: counted(len(names), "patient")  # noqa: E731
    words = {"trained on": count(patients) if isinstance(patients, list) else "not recorded"}
    if training.get("fine_tuned_from"):  # export of an --init run: the stages it did not train are that model's
        words["fine-tuned from"] = f"{training['fine_tuned_from']} (the stages not fine-tuned are its own)"
    if isinstance(validation, list):
        seen = training.get("validation_seen_in_training")
        words["validated on"] = count(validation) + (" (also trained on: its figures are training fit)"
                                                                  if seen else "" if seen is False else "")
    return words


def _figure_words(metrics, seen) -> dict:
    summary = metrics.get("summary") if isinstance(metrics, dict) else None
    if not isinstance(summary, dict):
        return {"figures": "none recorded (xctdiff evaluate, then export --metrics)"}
    words = {}
    for key, label in FIGURE_ROWS.items():
        row = summary.get(key)
        if not isinstance(row, dict):
            continue
        parts = [f"{name} {row[key_]['mean']:{form}}{unit}" for key_, name, form, unit in
                 (("psnr", "PSNR", ".2f", " dB"), ("ssim", "SSIM", ".3f", ""), ("lpips", "LPIPS", ".3f", ""))
                 if isinstance(row.get(key_), dict) and isinstance(row[key_].get("mean"), (int, float))]
        cases = metrics.get("cases")
        if parts:
            words[f"figures, {label}"] = ", ".join(parts) + (f" on {cases} cases" if cases else "") + \
                (" (training fit)" if seen else "")
    return words or {"figures": "none recorded"}
