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
  ablation; with the model's coarse CT blended in when it has that stage, and then also
  ``direct_decoder``, the decoded CT alone, to show what the blend adds), ``knn`` and ``mean CT``.
  A folder whose diffusion stage learnt another autoencoder's latents (``retrain`` in its manifest) is
  scored without the ``xctdiff`` rows.
  The two baselines learn nothing but a lookup:

  - ``knn`` (``--knn K``, default 3, 0 = off): the mean (HU) of the K training CTs whose DRRs are
    nearest to the case's input DRR. Training set: the datalist's ``training`` entries with
    ``aug == 0``, one per patient, so K counts patients (fewer when the datalist has fewer; the
    summary states the K used). Distance: the mean squared difference of the two DRRs, both
    area-resized to 128 x 128 (the DRRs of one datalist share one rendering and normalisation,
    so plain pixel differences compare like with like, and it is cheap and has no window to pick,
    unlike 1 - SSIM). A model that does not beat kNN has learnt no more than a lookup table.
  - ``mean CT``: one constant volume for every case: the mean of the datalist's training patients (the
    entries kNN draws from: ``aug == 0``, no mix). A method that does not beat it has learnt nothing
    case-specific. When the training list holds more (``--augment`` variants, ``--mix`` mixes), the mean of
    the whole list is scored beside it (``mean_ct_list``): the mixes of whole chests weigh them more, and
    that mean was the stronger lookup on both folds of the shared data (+0.6 and +1.1 dB).
  - ``atlas`` (``--atlas K``, default 0 = off; :mod:`XctDiffCore.evaluation.atlas`): the kNN candidates
    each warped until its DRR matches the input, the K that fit best averaged. It uses all that the
    film says about the frontal plane and learns nothing about depth: a model that does not beat it
    has learnt the outline and no more.

  With ``guidance=G`` (``--guidance``), ``xctdiff_guided`` and ``direct_guided`` are the same two
  paths with data-consistency guidance of strength G (:mod:`XctDiffCore.guidance`), same seeds: guided
  beside unguided.

  A CT folder has no training set: kNN and the atlas are left out, and the mean CT is the model folder's
  ``mean_ct.npy`` when it has one, else left out too.
* **Scores** per case and method: PSNR, SSIM (3D and slice-averaged), LPIPS, and bone and lung
  Dice (HU thresholds: bone > 200, -1000 < lung < -400), which say whether ribs, spine and the
  lungs' shape are where they belong; the lung Dice also inside the truth's body only (the air
  around a patient is lung by that threshold in some CTs: :mod:`XctDiffCore.metrics`, item 8).
* **Seeds.** Case ``i`` is sampled with seed ``seed + i``: a rerun gives the same numbers.

* **Caveats, said before the long run and kept in the outputs** (:func:`case_notes`): a case whose patient is in
  the model's training list (its manifest's ``training.training_patients``, as ``xctdiff inspect`` counts them) is
  *training fit*; a truth whose body spans less than a whole chest
  (:func:`~XctDiffCore.metrics.whole_chest_problem`) is *not a whole chest*. A kNN that averages every training
  patient (the mean CT again) is said too, and so is a datalist of another grid than the prepared 128^3 cube
  (scored stretched); a case scanned coarser than 3 mm (a CT file's voxels, or a datalist entry's ``source_spacing``
  from ``prepare``: :func:`~XctDiffCore.metrics.low_resolution_problem`) is *low resolution*.

Outputs in ``--out`` (created; one that holds the model folder, the datalist or the CT folder is refused, as
``evaluate-autoencoder`` and ``evaluate-style`` refuse theirs: :func:`~XctDiffCore.atomic.refuse_own_output`):
``metrics.csv`` (one row per case and method; for kNN its
neighbours' patient ids; the case's notes), ``summary.md`` (what made it: the date, XctDiff's version, the
device and the command that repeats it; the caveats; mean ± std over cases per method, like the paper's Table
1, std with ddof = 0; then one row per case and method with its notes), ``summary.json`` (the means and stds, the
K used, the settings, date, command, case names and caveats) and ``figure.png`` (a few cases, two rows each: input,
truth, each method and the uncertainty, mid-coronal slices in a lung window, W 1500 / L -600, then in a bone
window, W 1800 / L 450; a caption names both windows and every case in full). ``xctdiff evaluate-compare``
(:mod:`XctDiffCore.evaluation.compare`) puts two or more such folders side by side.

**Long runs.** After each case the rows so far (and the figure's slices) are saved in ``--out`` as
``progress.npz``; an interrupted or failed run keeps it, and the same command with ``resume=True``
(``--resume``) continues at the first case not done, refusing one whose settings differ. The four outputs
are written as a set at the end (never a new ``metrics.csv`` beside an earlier run's summary), and then
``progress.npz`` is removed. While a run writes ``--out`` it holds ``--out/.lock``
(:func:`~XctDiffCore.atomic.output_lock`): a second run into the same folder, which would score the same
cases and write the same files in turns, is refused in one line.
"""
from __future__ import annotations

import csv
import io
import json
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .. import __version__
from ..atomic import check_output_folder, output_lock, output_set, refuse_own_output
from ..datalist import load_entry_ct, load_entry_xray
from ..errors import XctDiffError, a_few, first_line

METRICS = ("psnr", "ssim", "psnr_slices", "ssim_slices", "lpips", "bone_dice", "lung_dice", "lung_dice_body")
METRIC_TITLES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "psnr_slices": "PSNR slices (dB)", "ssim_slices": "SSIM slices",
                 "lpips": "LPIPS", "bone_dice": "bone Dice", "lung_dice": "lung Dice", "lung_dice_body": "lung Dice in body"}
CASE_METRICS = ("psnr", "ssim", "bone_dice", "lung_dice", "lung_dice_body", "lpips")  # the per-case table's columns
METHOD_TITLES = {"xctdiff": "XctDiff", "direct": "direct (no diffusion)", "xctdiff_guided": "XctDiff + guidance",
                 "direct_guided": "direct + guidance", "knn": "kNN, nearest training CTs by DRR",
                 "atlas": "atlas: nearest training CTs registered to the DRR",
                 "mean_ct": "mean training CT",
                 "mean_ct_list": "mean of the whole training list (variants and mixes too)",
                 "direct_decoder": "direct, decoder alone (no coarse CT)"}
CSV_COLUMNS = ("case", "method", *METRICS, "consistency", "seconds", "neighbours", "notes")
KNN_DRR_SIZE = 128  # DRRs are compared at this size (area resize)
PROGRESS_NAME = "progress.npz"  # an unfinished run's cases, for --resume
PROTOCOL = "the protocol of the README's \"Evaluation protocol\" (XctDiffCore/metrics.py)"


@dataclass
class Case:
    """One evaluation case: its name, the input DRR in [0, 1] (display orientation) and the truth in HU."""

    name: str
    drr: np.ndarray  # [row, col] in [0, 1]
    truth_hu: np.ndarray  # [z, y, x] on the output grid (128^3)
    patient: str = ""  # the patient id (a datalist's ``patient``), to match the model's training list
    native_spacing_mm: Optional[tuple] = None  # the scan's own voxel size (a CT file's; a datalist entry's source_spacing)
    slice_thickness_mm: Optional[float] = None  # a DICOM scan's Slice Thickness (a datalist's source_slice_thickness)


@dataclass
class TrainingPatient:
    """One kNN candidate: the patient id, its CT file and its DRR at ``KNN_DRR_SIZE`` (the CT is read only when chosen)."""

    patient: str
    image: Path
    drr: np.ndarray


def model_grid_hu(ct_hu: np.ndarray, size: int) -> np.ndarray:
    """A prepared canonical 128^3 CT -> ``size``^3 canonical HU, average-pooled as the training data loader does."""
    from ..layout import model_layout_to_ct, unit_to_hu
    from ..model_inputs import ct_to_model

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


def warn_of_another_grid(datalist: Path, sizes: list) -> None:
    """One warning when the datalist's CTs are not the pipeline's prepared cube (128^3 of 2.5 mm): a CT of
    ``xctdiff prepare --size 64`` covers 160 mm, and brought to 128^3 it is scored as a chest stretched twice over,
    which compares only with a model trained on such CTs (the small test models are)."""
    from ..model_folder import FIELD_OF_VIEW_MM, PREPARED_SIZE, PREPARED_SPACING_MM

    other = sorted({size for size in sizes if size != PREPARED_SIZE})
    if other:
        size = other[0]
        warnings.warn(f"the validation CTs of {datalist} are {size}^3 (`xctdiff prepare --size {size}`: "
                      f"{size * PREPARED_SPACING_MM:g} mm across), not the pipeline's {PREPARED_SIZE}^3 of "
                      f"{PREPARED_SPACING_MM:g} mm ({FIELD_OF_VIEW_MM:g} mm): they are scored brought to {PREPARED_SIZE}^3, "
                      "stretched, which compares only with a model trained on such CTs; prepare them again without "
                      "--size to score a model of the whole chest", stacklevel=3)


def datalist_cases(datalist: Path, volume_size: int, max_cases: Optional[int] = None, augmented: bool = False) -> list:
    from ..datalist import read_datalist

    validation = read_datalist(datalist, "validation")  # checks the file and the entries
    raw = json.loads(datalist.read_text(encoding="utf-8")).get("validation", [])
    items = [{**item, "source_spacing": entry.get("source_spacing"),  # prepare keeps the scan's own voxel size
              "source_slice_thickness": entry.get("source_slice_thickness")}  # and a DICOM scan's slice thickness
             for entry, item in zip(raw, validation) if augmented or int(entry.get("aug", 0)) == 0]
    if not items and validation:  # every entry a variant (aug > 0): the originals were left out by hand
        raise XctDiffError(f"every validation entry of {datalist} ({len(validation)}) is an augmented variant (aug > 0), "
                           "which is scored only with --augmented")
    if not items:
        raise XctDiffError(f"{datalist} has no validation entries to evaluate (make one with `xctdiff prepare`)")
    cases, sizes = [], []
    for item in items[:max_cases]:
        ct, drr = load_entry_ct(item["image"]), load_entry_xray(item["xray"])
        sizes.append(ct.shape[0])
        cases.append(Case(Path(item["image"]).stem, drr.astype(np.float32), model_grid_hu(ct, volume_size), item["patient"],
                          item["source_spacing"], item["source_slice_thickness"]))
    warn_of_another_grid(datalist, sizes)
    return cases


def datalist_mean_cts(datalist: Path, volume_size: int) -> tuple:
    """(mean of the training patients, mean of the whole training list) on a ``volume_size``^3 grid (HU), in one
    pass over the CTs. The patients are kNN's candidates (``aug == 0``, no mix); the second is None when the list
    holds nothing else (no variants, no mixes), the first None when it holds no patient."""
    from ..datalist import read_datalist

    items = read_datalist(datalist, "training")
    raw = json.loads(Path(datalist).read_text(encoding="utf-8")).get("training", [])
    totals, counts = {True: 0.0, False: 0.0}, {True: 0, False: 0}
    for entry, item in zip(raw, items):
        patient = _is_patient(entry)
        totals[patient] = totals[patient] + model_grid_hu(load_entry_ct(item["image"]), volume_size).astype(np.float64)
        counts[patient] += 1
    patients = (totals[True] / counts[True]).astype(np.float32) if counts[True] else None
    whole = ((totals[True] + totals[False]) / (counts[True] + counts[False])).astype(np.float32) if counts[False] else None
    return patients, whole


def datalist_mean_ct(datalist: Path, volume_size: int, patients_only: bool = False) -> Optional[np.ndarray]:
    """Mean of the datalist's training CTs on a ``volume_size``^3 grid (HU), or None without training entries;
    with ``patients_only`` of the patients alone (``aug == 0``, no mix: kNN's candidates)."""
    patients, whole = datalist_mean_cts(datalist, volume_size)
    return patients if patients_only or whole is None else whole


def drr_thumbnail(drr01: np.ndarray, size: int = KNN_DRR_SIZE) -> np.ndarray:
    """Area-resize a DRR to ``size`` x ``size``, so that DRRs of any size compare pixel by pixel."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(drr01, dtype=np.float32))[None, None]
    if tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area")
    return x[0, 0].numpy()


def datalist_training(datalist: Path) -> list:
    """The kNN candidates: the datalist's training entries with ``aug == 0``, the first of each patient; the
    inter-patient mixes of ``xctdiff prepare --mix`` are not patients, so the lookup leaves them out."""
    from ..datalist import read_datalist

    items = read_datalist(datalist, "training")
    raw = json.loads(Path(datalist).read_text(encoding="utf-8")).get("training", [])
    patients = {}
    for entry, item in zip(raw, items):
        if _is_patient(entry) and item["patient"] not in patients:
            patients[item["patient"]] = TrainingPatient(item["patient"], item["image"], drr_thumbnail(load_entry_xray(item["xray"])))
    return list(patients.values())


def _is_patient(entry: dict) -> bool:
    """A training entry that is a patient's own CT: not an augmented variant, not an inter-patient mix."""
    return int(entry.get("aug", 0)) == 0 and "mix" not in entry


def nearest_training(drr01: np.ndarray, training: list, k: int) -> list:
    """The ``k`` training patients whose DRRs are nearest to ``drr01`` (mean squared difference), nearest first.

    Ties keep the datalist's order, so a run is reproducible.
    """
    thumbnail = drr_thumbnail(drr01).astype(np.float64)
    distances = [float(np.mean((thumbnail - t.drr) ** 2)) for t in training]
    return [training[i] for i in np.argsort(distances, kind="stable")[:k]]


def knn_ct(drr01: np.ndarray, training: list, k: int, volume_size: int) -> tuple:
    """(mean HU of the ``k`` nearest training CTs on a ``volume_size``^3 grid, their patient ids nearest first)."""
    neighbours = nearest_training(drr01, training, k)
    total = None
    for neighbour in neighbours:
        hu = model_grid_hu(load_entry_ct(neighbour.image), volume_size).astype(np.float64)
        total = hu if total is None else total + hu
    return (total / len(neighbours)).astype(np.float32), [n.patient for n in neighbours]


def ct_folder_cases(path: Path, volume_size: int, geometry: str, max_cases: Optional[int] = None,
                    output: Optional[Path] = None) -> list:
    """The cases of a CT file or folder; ``output``, the evaluation's own folder, is passed over (an interrupted
    run's progress.npz there is a CT by its suffix)."""
    from ..drr import drr_of_volume
    from ..io import read_ct, warn_if_synthetic
    from ..io.ct import dicom_slice_thickness
    from ..model_folder import PREPARED_SIZE, PREPARED_SPACING_MM
    from ..ct_search import describe_ignored, find_ct_inputs
    from ..preprocess import preprocess_ct

    cases, ignored = [], []
    found = find_ct_inputs([path], ignored, output=output)
    if ignored:
        warnings.warn(describe_ignored(ignored), stacklevel=2)
    warn_if_synthetic([c.path for c in found[:max_cases]], "scored as the truth, they measure a model against itself")
    for ct_input in found[:max_cases]:
        scan = read_ct(ct_input.path)
        ct = preprocess_ct(scan, size=PREPARED_SIZE, spacing=PREPARED_SPACING_MM)
        drr = drr_of_volume(ct, geometry, PREPARED_SIZE)
        cases.append(Case(ct_input.patient, drr, model_grid_hu(ct.array, volume_size), ct_input.patient, scan.spacing,
                          dicom_slice_thickness(ct_input.path)))
    return cases


def model_training_patients(folder) -> Optional[set]:
    """The patients a model folder was trained on (its manifest's ``training.training_patients``, as ``xctdiff
    inspect`` counts them), or None when the manifest does not record them. A partial folder (only the autoencoder,
    for ``evaluate-autoencoder``) has them too: the stages were checked by whoever loaded it."""
    from ..model_manifest import read_manifest

    training = read_manifest(folder, required=()).get("training")
    patients = training.get("training_patients") if isinstance(training, dict) else None
    return {str(p) for p in patients} if isinstance(patients, list) else None


def measured_weights(folder) -> dict:
    """stage -> ``{"file", "sha256", "float16_sha256"}``: which weights an evaluation measured (summary.json's
    ``weights``), so that ``xctdiff export --metrics`` can tell a summary of the weights it ships from one of other
    weights under the same id and version (a run trained on after it was evaluated). ``sha256`` is the manifest's
    (checked when the model was loaded); ``float16_sha256`` digests the file's tensors with the floating ones rounded
    to float16 first, as export casts them: the same for a float32 and a float16 export of one run, so an evaluation
    of either compares with the other. The style stage is left out: evaluation scores DRRs, without it."""
    from safetensors.torch import load_file

    from ..model_folder import FOLDER_LATENTS_DTYPE, state_digest
    from ..model_manifest import as_model_folder, read_manifest

    folder = as_model_folder(folder)
    manifest = read_manifest(folder, required=())
    weights = {}
    for stage, record in manifest.get("stages", {}).items():
        if stage == "style" or not isinstance(record, dict) or "weights" not in record:
            continue
        rounded = {name: tensor.to(FOLDER_LATENTS_DTYPE) if tensor.is_floating_point() else tensor
                   for name, tensor in load_file(str(folder / record["weights"])).items()}
        weights[stage] = {"file": record["weights"], "sha256": manifest.get("sha256", {}).get(record["weights"]),
                          "float16_sha256": state_digest(rounded)}
    return weights


def case_notes(cases: list, trained_on: Optional[set]) -> dict:
    """case name -> what a reader must know before trusting its scores: "training fit" (a patient the model was
    trained on) and "not a whole chest: ..." (:func:`~XctDiffCore.metrics.whole_chest_problem`)."""
    from ..metrics import low_resolution_problem, whole_chest_problem
    from ..model_folder import FIELD_OF_VIEW_MM

    notes = {}
    for case in cases:
        # a datalist without patient ids (made by hand) names the patient by its image, `<id>_aug<k>` from prepare
        ids = {case.patient or case.name, re.sub(r"_aug\d+$", "", case.patient or case.name)}
        words = ["training fit"] if trained_on and ids & trained_on else []
        problem = whole_chest_problem(case.truth_hu, FIELD_OF_VIEW_MM / case.truth_hu.shape[0])
        if problem:
            words.append(f"not a whole chest: {problem}")
        coarse = low_resolution_problem(case.native_spacing_mm, case.slice_thickness_mm)
        if coarse:
            words.append(f"low resolution: {coarse}")
        notes[case.name] = words
    return notes


def warn_about_cases(notes: dict) -> None:
    """One warning line for the training-fit cases, one for those that are no whole chest, one for low-resolution
    scans, before the long run."""
    fit = [name for name, words in notes.items() if "training fit" in words]
    if fit:
        warnings.warn(f"{len(fit)} of the {len(notes)} cases {'is a patient' if len(fit) == 1 else 'are patients'} the "
                      f"model was trained on ({a_few(fit)}): {'its' if len(fit) == 1 else 'their'} scores are training "
                      "fit, not what it does on new patients (summary.md marks them)", stacklevel=3)
    partial = [name for name, words in notes.items() if any(w.startswith("not a whole chest") for w in words)]
    if partial:
        first = next(w for w in notes[partial[0]] if w.startswith("not a whole chest"))[len("not a whole chest: "):]
        others = f"; also {a_few(partial[1:])}" if len(partial) > 1 else ""
        warnings.warn(f"{len(partial)} of the {len(notes)} cases {'is' if len(partial) == 1 else 'are'} no whole chest "
                      f"({partial[0]}: {first}{others}): the protocol scores whole chests, and a cropped truth scores "
                      "the body a reconstruction draws beyond it (summary.md marks them)", stacklevel=3)
    coarse = {name: w for name, words in notes.items() for w in words if w.startswith("low resolution")}
    if coarse:
        name, words = next(iter(coarse.items()))
        warnings.warn(f"{len(coarse)} of the {len(notes)} cases {'is a scan' if len(coarse) == 1 else 'are scans'} of "
                      f"low resolution ({name}: {words[len('low resolution: '):]}"
                      f"{f'; also {a_few(list(coarse)[1:])}' if len(coarse) > 1 else ''}): a blurred truth scores a "
                      "model's bone against bone it does not show (summary.md marks them)", stacklevel=3)


def flagged_cases(notes: dict) -> tuple:
    """(the training-fit cases, {case: why it is no whole chest}) of :func:`case_notes`."""
    fit = [name for name, words in notes.items() if "training fit" in words]
    partial = {name: w for name, words in notes.items() for w in words if w.startswith("not a whole chest")}
    return fit, partial


def notes_markdown(notes: dict) -> str:
    """The summary's paragraphs on the cases whose scores need a caveat (none: empty)."""
    from ..metrics import LOW_RESOLUTION_MM

    fit, partial = flagged_cases(notes)
    text = ""
    if fit:
        text += (f"**Training fit:** {len(fit)} of the {len(notes)} cases ({', '.join(fit)}) are patients the model "
                 "was trained on (its manifest's training list): their scores are not what it does on new patients.\n\n")
    if partial:
        text += (f"**Not whole chests:** {', '.join(partial)}: the protocol scores whole chests (a cropped truth "
                 "scores the body a reconstruction draws beyond it); see the per-case notes.\n\n")
    coarse = [name for name, words in notes.items() if any(w.startswith("low resolution") for w in words)]
    if coarse:
        text += (f"**Low resolution:** {', '.join(coarse)}: scans of voxels coarser than {LOW_RESOLUTION_MM:g} mm; "
                 "see the per-case notes.\n\n")
    return text


def made_on(device, command: str, protocol: str = PROTOCOL) -> tuple:
    """``(date, paragraph)``: the summary's words on what made it (the date, XctDiff's version, the device, the
    protocol and the command that repeats the run), one wording for every evaluation's report."""
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return date, f"Made on {date} by XctDiff {__version__} on {device}, by {protocol}:\n\n    {command}\n\n"


def equivalent_command(settings: dict, out_dir: Path, device: str, max_cases: Optional[int]) -> str:
    """The ``xctdiff evaluate`` command line that repeats this run (for the report: what made these numbers)."""
    import shlex

    words = ["xctdiff", "evaluate", "--model", settings["model"], "--data", settings["data"], "--out", str(out_dir)]
    for option, key in (("--steps", "steps"), ("--sampler", "sampler")):
        if settings[key] is not None:
            words += [option, str(settings[key])]
    words += ["--samples", str(settings["samples"]), "--seed", str(settings["seed"]), "--knn", str(settings["knn"])]
    if settings["atlas"]:
        words += ["--atlas", str(settings["atlas"])]
    if settings["guidance"]:
        words += ["--guidance", f"{settings['guidance']:g}"]
    if settings["augmented"]:
        words.append("--augmented")
    if max_cases is not None:
        words += ["--max-cases", str(max_cases)]
    words += ["--device", device, "--precision", settings["precision"]]
    return shlex.join(words)


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
    knn: int = 3,
    guidance: float = 0.0,
    precision: str = "auto",
    atlas: int = 0,
    resume: bool = False,
) -> dict:
    """Run the protocol of the module docstring; write the outputs; return the summary (method -> metric -> mean/std)."""
    from tqdm import tqdm

    from ..guidance import GuidanceWarning
    from ..options import check_guidance
    from ..io import Radiograph
    from ..plausibility import PlausibilityWarning
    from ..metrics import BONE_HU, LUNG_HU, body_region, volume_scores
    from ..models.lpips import LPIPS
    from ..pipeline import OUTPUT_SIZE, XctDiffPipeline

    data, out_dir = Path(data), Path(out_dir)
    if not data.exists():
        raise XctDiffError(f"evaluation data not found: {data}")
    if max_cases is not None and max_cases < 1:
        raise XctDiffError(f"--max-cases must be at least 1, got {max_cases}")
    if knn < 0:
        raise XctDiffError(f"--knn must be 0 (off) or more, got {knn}")
    if atlas < 0:
        raise XctDiffError(f"--atlas must be 0 (off) or more, got {atlas}")
    guidance = check_guidance(guidance)
    check_output_folder(out_dir, parents=True)  # `--out eval/lidc` makes eval/ too, as train and export do
    for given in (model, data):  # the report would be written among them (a CT folder's search passes over --out)
        if given is not None and Path(given).exists():
            refuse_own_output(given, out_dir)
    with output_lock(out_dir, "xctdiff evaluate"):  # a second evaluation into it is refused
        pipe = XctDiffPipeline.from_pretrained(model)
        size = OUTPUT_SIZE
        training, mean_ct_list = [], None  # a CT folder: no training list
        if _is_datalist(data):
            cases = datalist_cases(data, size, max_cases, augmented)
            mean_ct, mean_ct_list = datalist_mean_cts(data, size)  # the list's mean: None without variants or mixes
            training = datalist_training(data) if knn or atlas else []
        else:
            cases = ct_folder_cases(data, size, pipe.info.geometry, max_cases, output=out_dir)
            mean_ct = None if pipe.mean_ct is None else resample_hu(pipe.mean_ct, size)
            if atlas:
                warnings.warn("--atlas registers a datalist's training CTs, and a CT folder has none: the atlas is left out",
                              stacklevel=2)
        k = min(knn, len(training))  # 0: kNN left out
        if _is_datalist(data) and knn and not training:
            warnings.warn(f"{data.name} has no training patients: the kNN baseline is left out", stacklevel=2)
        elif k and k == len(training):  # every candidate averaged: the mean training CT again
            every = f"averages all {k} training patients" if k > 1 else "is the one training patient"
            warnings.warn(f"kNN with k = {k} {every} of {data.name}"
                          + (f" (--knn {knn} asks for more than there are)" if knn > k else "")
                          + ": the same CT as the mean training CT, so its row repeats that baseline", stacklevel=2)
        k_atlas = min(atlas, len(training))  # 0: the atlas left out
        if k_atlas:
            from .atlas import CANDIDATE_FACTOR, atlas_ct
        settings = {"model": str(Path(pipe.info.folder).resolve()), "model_id": pipe.info.model_id,
                    "version": pipe.info.version, "data": str(data.resolve()), "steps": steps, "samples": samples,
                    "seed": seed, "sampler": sampler, "knn": knn, "atlas": atlas, "guidance": guidance,
                    "precision": precision, "augmented": augmented, "figure_cases": figure_cases}
        weights = measured_weights(pipe.info.folder)  # what the rows measure: a resume of other weights is refused
        saved = read_progress(out_dir, settings, [case.name for case in cases], weights) if resume else None
        notes = case_notes(cases, model_training_patients(pipe.info.folder))
        warn_about_cases(notes)
        lpips = LPIPS.load()

        rows, figure, done, used_precision = saved or ([], [], 0, precision)  # used_precision: what "auto" became
        if resume:
            print(f"evaluate: {done} of {len(cases)} cases done before, continuing" if saved else
                  f"evaluate: no interrupted evaluation in {out_dir}: starting at the first case", file=sys.stderr)
        elif (out_dir / PROGRESS_NAME).is_file():
            print(f"evaluate: {out_dir} holds an interrupted evaluation; starting again (--resume would continue it)",
                  file=sys.stderr)
        sampled = "diffusion" not in pipe.info.retrain  # a diffusion stage of other latents is left out, not scored

        def score_case(index: int, case: Case) -> str:
            """Reconstruct one case by every path, score it and the baselines, keep its rows and figure panels;
            return the arithmetic the networks used."""
            radiograph = Radiograph(case.drr, None, True, case.name)
            outputs = {}

            def doing(words: str) -> None:  # scoring is most of a case's time (3D SSIM, LPIPS of 384 slices a row)
                bar.set_postfix_str(f"{case.name}: {words}")

            doing("reconstructing")
            if sampled:
                outputs["xctdiff"] = pipe.reconstruct(radiograph, steps=steps, samples=samples, seed=seed + index, device=device,
                                                      style="off", method="diffusion", sampler=sampler, precision=precision)
            outputs["direct"] = pipe.reconstruct(radiograph, seed=seed + index, device=device, style="off", method="direct",
                                                 precision=precision)
            if pipe.coarse is not None:  # the direct path without its coarse CT: what the blend adds
                outputs["direct_decoder"] = pipe.reconstruct(radiograph, seed=seed + index, device=device, style="off",
                                                             method="direct", precision=precision, coarse="off")
            if guidance > 0:
                if sampled:
                    outputs["xctdiff_guided"] = pipe.reconstruct(radiograph, steps=steps, samples=samples, seed=seed + index,
                                                                 device=device, style="off", method="diffusion",
                                                                 sampler=sampler, guidance=guidance, precision=precision)
                outputs["direct_guided"] = pipe.reconstruct(radiograph, seed=seed + index, device=device, style="off",
                                                            method="direct", guidance=guidance, precision=precision)
            volumes = {method: result.ct.array for method, result in outputs.items()}
            body = body_region(case.truth_hu)  # one truth, every method

            def scores(volume, method):
                doing(f"scoring {method}")
                return volume_scores(volume, case.truth_hu, lpips, pipe.device, body)

            first_row = len(rows)
            for method, result in outputs.items():
                flagged.extend(f"{case.name} ({method}): {w}" for w in result.warnings)
                rows.append({"case": case.name, "method": method, **scores(result.ct.array, method),
                             "consistency": result.consistency, "seconds": result.timings["total"]})
            if k:
                doing("kNN")
                volumes["knn"], neighbours = knn_ct(case.drr, training, k, size)
                rows.append({"case": case.name, "method": "knn", **scores(volumes["knn"], "kNN"),
                             "neighbours": " ".join(neighbours)})
            if k_atlas:
                doing("registering the atlas")
                volumes["atlas"], neighbours = atlas_ct(case.drr, training, k_atlas, size, pipe.info.geometry)
                rows.append({"case": case.name, "method": "atlas", **scores(volumes["atlas"], "atlas"),
                             "neighbours": " ".join(neighbours)})
            if mean_ct is not None:
                volumes["mean_ct"] = mean_ct
                rows.append({"case": case.name, "method": "mean_ct", **scores(mean_ct, "mean CT")})
            if mean_ct_list is not None:
                rows.append({"case": case.name, "method": "mean_ct_list", **scores(mean_ct_list, "mean CT of the list")})
            for row in rows[first_row:]:
                row["notes"] = "; ".join(notes[case.name]) or None
            if index < figure_cases:
                uncertainty = outputs["xctdiff"].uncertainty if sampled else None  # no samples, no spread
                figure.append(figure_case(case, volumes, None if uncertainty is None else uncertainty.array))
            return outputs["direct"].precision

        bar = tqdm(total=len(cases), initial=done, desc="evaluate", unit="case", file=sys.stderr, disable=not progress)
        flagged = []  # each reconstruction's warnings: one line at the end, not one per case and method
        try:
            for index, case in enumerate(cases[done:], start=done):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", PlausibilityWarning)
                    warnings.simplefilter("ignore", GuidanceWarning)
                    used_precision = score_case(index, case)
                bar.update()
                done = index + 1
                write_progress(out_dir, settings, [case.name for case in cases[:done]], rows, figure, used_precision,
                               weights)
        except BaseException:
            bar.close()
            if done:
                print(f"evaluate: {done} of {len(cases)} cases kept in {out_dir / PROGRESS_NAME}; the same command with "
                      "--resume continues", file=sys.stderr)
            raise
        bar.close()
        if flagged:
            warnings.warn(f"{len(flagged)} warning{'s' * (len(flagged) > 1)} on the reconstructions scored (each one's "
                          f"consistency is in metrics.csv), e.g. {flagged[0]}", stacklevel=2)

        summary = summarize(rows)
        baselines = f"kNN with k = {k} of {len(training)} training patient(s) (DRR mean squared difference)" if k else "no kNN"
        if k_atlas:
            candidates = min(len(training), CANDIDATE_FACTOR * k_atlas)
            baselines += f"; atlas: the {k_atlas} of {candidates} nearest that fit the DRR best after registration"
        header = (f"Model `{pipe.info.model_id}` {pipe.info.version}, {len(cases)} case{'s' * (len(cases) != 1)} from `{data.name}`, "
                  f"{samples} sample(s), {steps or pipe.info.steps} {sampler or pipe.info.sampler} steps, "
                  f"model grid {pipe.info.volume_size}^3, scored on {size}^3 at 2.5 mm; {baselines}; "
                  f"{f'guidance {guidance:g} beside none' if guidance else 'no guidance'}; networks in {used_precision}; "
                  f"bone: HU > {BONE_HU:.0f}, lung: {LUNG_HU[0]:.0f} < HU < {LUNG_HU[1]:.0f} (in body: inside the truth's body). "
                  "Mean ± std over cases.\n\n")
        command = equivalent_command(settings, out_dir, str(pipe.device), max_cases)
        date, made = made_on(pipe.device, command)
        header += made
        fit, partial = flagged_cases(notes)
        header += notes_markdown(notes)
        with output_set():  # all four or none: never a new metrics.csv beside an earlier run's summary
            _write_text(out_dir / "metrics.csv", metrics_csv(rows))
            table = markdown_table(summary, k, k_atlas) + "\nPer case:\n\n" + case_table(rows, notes)
            _write_text(out_dir / "summary.md", header + table)
            _write_text(out_dir / "summary.json", json.dumps({"model": pipe.info.model_id, "version": pipe.info.version,
                                                              "cases": len(cases), "knn": k or None, "atlas": k_atlas or None,
                                                              "guidance": guidance or None, "precision": used_precision,
                                                              "steps": steps or pipe.info.steps,
                                                              "sampler": sampler or pipe.info.sampler, "samples": samples,
                                                              "seed": seed, "device": str(pipe.device), "date": date,
                                                              "xctdiff": __version__, "command": command,
                                                              "case_names": [case.name for case in cases],
                                                              "training_fit": fit, "not_whole_chest": partial,
                                                              "weights": weights,
                                                              "summary": summary}, indent=2) + "\n")
            if figure:
                from ..figures import compose_grid, with_caption, write_png

                caption = figure_caption(figure, f"{pipe.info.model_id} {pipe.info.version}", notes)
                write_png(with_caption(compose_grid(figure_rows(figure, k, k_atlas)), caption), out_dir / "figure.png")
        (out_dir / PROGRESS_NAME).unlink(missing_ok=True)
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


def method_title(method: str, knn: Optional[int] = None, atlas: Optional[int] = None) -> str:
    """The table's name of a method; kNN's and the atlas's say their k when known."""
    if method == "knn" and knn:
        return f"kNN, k={knn} nearest training CTs by DRR"
    if method == "atlas" and atlas:
        return f"atlas, k={atlas} training CTs registered to the DRR"
    return METHOD_TITLES.get(method, method)


def _cell(metric: str, value: float) -> str:
    return f"{value:.{2 if metric.startswith('psnr') else 3}f}"


def markdown_table(summary: dict, knn: Optional[int] = None, atlas: Optional[int] = None) -> str:
    """The paper's Table 1 layout: one row per method, mean ± std per metric; an empty cell where absent."""
    lines = ["| method | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |",
             "| --- |" + " ---: |" * len(METRICS)]
    for method, metrics in summary.items():
        cells = [f"{_cell(m, metrics[m]['mean'])} ± {_cell(m, metrics[m]['std'])}" if m in metrics else "" for m in METRICS]
        lines.append(f"| {method_title(method, knn, atlas)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def case_table(rows: list, notes: Optional[dict] = None) -> str:
    """One row per case and method (CASE_METRICS; methods as in metrics.csv), so that each patient shows; with
    ``notes`` (:func:`case_notes`) a last column says, on a case's first row, what its scores must be read with."""
    notes = notes or {}
    lines = ["| case | method | " + " | ".join(METRIC_TITLES[m] for m in CASE_METRICS) + " | notes |",
             "| --- | --- |" + " ---: |" * len(CASE_METRICS) + " --- |"]
    seen = set()
    for row in rows:
        cells = [_cell(m, row[m]) if row.get(m) is not None else "" for m in CASE_METRICS]
        note = "" if row["case"] in seen else "; ".join(notes.get(row["case"], []))
        seen.add(row["case"])
        lines.append(f"| {row['case']} | {row['method']} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines) + "\n"


def metrics_csv(rows: list, columns=CSV_COLUMNS) -> str:
    """One CSV line per row (``columns``; floats to 6 significant digits, absent values empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                         for k in columns})
    return buffer.getvalue()


def figure_case(case: Case, volumes: dict, uncertainty: Optional[np.ndarray]) -> tuple:
    """What the figure needs of one case (mid-coronal slices only, so that no volume is kept)."""
    from ..figures import orthogonal_slices

    coronal = lambda hu: orthogonal_slices(hu)["coronal"]  # noqa: E731
    slices = {"truth": coronal(case.truth_hu), **{method: coronal(hu) for method, hu in volumes.items()}}
    return case.name, case.drr, slices, None if uncertainty is None else coronal(uncertainty)


def figure_rows(figure: list, knn: Optional[int] = None, atlas: Optional[int] = None) -> list:
    """Two rows per case, mid-coronal slices: input | truth | each method | XctDiff std in a lung window, then
    truth | each method in a bone window (one window cannot show both the parenchyma and the ribs)."""
    from ..figures import BONE_WINDOW_HU, LUNG_WINDOW_HU, scale_to_unit, window

    titles = {"truth": "truth", "xctdiff": "XctDiff", "direct": "direct", "xctdiff_guided": "XctDiff guided",
              "direct_guided": "direct guided", "knn": f"kNN k={knn}" if knn else "kNN", "mean_ct": "mean CT",
              "atlas": f"atlas k={atlas}" if atlas else "atlas",
              "direct_decoder": "decoder alone"}
    rows = []
    for name, drr, slices, std in figure:
        for low_high, label in ((LUNG_WINDOW_HU, "lung"), (BONE_WINDOW_HU, "bone")):
            low, high = low_high
            first = (name[:22], drr) if label == "lung" else (f"{label} W{high - low:.0f} L{(high + low) / 2:.0f}", None)
            row = [first] + [(f"{titles.get(m, m)} {label}", window(image, low_high)) for m, image in slices.items()]
            if std is not None and label == "lung":
                row.append(("XctDiff std", scale_to_unit(std)))
            rows.append(row)
    return rows


def figure_caption(figure: list, model: str, notes: dict) -> list:
    """The figure's lines of text: what each row shows (both windows), every case's full name (a panel's label
    holds 22 characters) with its notes, and the model, so that the PNG alone says what it is (no date: the same
    settings draw the same figure, a resumed run's too; summary.md has the date)."""
    from ..figures import BONE_WINDOW_HU, LUNG_WINDOW_HU

    def words(low_high):
        low, high = low_high
        return f"W {high - low:.0f} / L {(high + low) / 2:.0f}"

    names = [name + (f" ({'; '.join(notes[name])})" if notes.get(name) else "") for name, *_ in figure]
    return [f"Mid-coronal slices, two rows per case: its input DRR, then each CT in a lung window ({words(LUNG_WINDOW_HU)}); "
            f"below, a bone window ({words(BONE_WINDOW_HU)}).",
            f"Cases, top to bottom: {', '.join(names)}.", f"Model {model}, xctdiff evaluate (summary.md: what made it)."]


def write_progress(out_dir: Path, settings: dict, done: list, rows: list, figure: list, precision: str,
                   weights: dict) -> None:
    """Save what a run has done so far (its settings, the names of the cases done, their rows, the figure's
    slices, the weights measured: ``measured_weights``), atomically, in one ``.npz`` that loads without pickle."""
    from ..atomic import atomic_path

    arrays, panels = {}, []
    for i, (name, drr, slices, std) in enumerate(figure):
        arrays[f"figure{i}_input"] = drr
        arrays.update({f"figure{i}_{method}": image for method, image in slices.items()})
        if std is not None:
            arrays[f"figure{i}_std"] = std
        panels.append({"name": name, "slices": list(slices), "std": std is not None})
    state = {"settings": settings, "done": done, "rows": rows, "figure": panels, "precision": precision,
             "weights": weights}
    with atomic_path(out_dir / PROGRESS_NAME) as tmp:
        np.savez(tmp, state=np.array(json.dumps(state, default=float)), **arrays)


def read_progress(out_dir: Path, settings: dict, cases: list, weights: dict) -> Optional[tuple]:
    """(rows, figure, cases done, precision used) of an interrupted run in ``out_dir``, None when it has none;
    an error when its settings, its cases or its model's weights (a model exported again in place, same id and
    version) are not this run's: its rows would not belong in one table. A run saved before the weights were
    recorded is not judged on them."""
    path = out_dir / PROGRESS_NAME
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            state = json.loads(str(saved["state"]))
            figure = [(panel["name"], saved[f"figure{i}_input"],
                       {method: saved[f"figure{i}_{method}"] for method in panel["slices"]},
                       saved[f"figure{i}_std"] if panel["std"] else None) for i, panel in enumerate(state["figure"])]
        rows, done, before, weights_before = state["rows"], state["done"], state["settings"], state.get("weights")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise XctDiffError(f"cannot resume from {path}: it is not an evaluation's progress ({first_line(exc)}); "
                           "remove it to start again") from exc
    changed = [f"{key} {before.get(key)!r} -> {value!r}" for key, value in settings.items() if before.get(key) != value]
    if changed:
        raise XctDiffError(f"cannot resume the evaluation in {out_dir}: it ran with other settings "
                           f"({'; '.join(changed)}); use them, or another --out")
    if weights_before is not None and weights_before != weights:
        stages = [stage for stage in dict.fromkeys([*weights_before, *weights])
                  if weights_before.get(stage) != weights.get(stage)]
        raise XctDiffError(f"cannot resume the evaluation in {out_dir}: the model's weights changed since it began "
                           f"({', '.join(stages)} differ{'s' * (len(stages) == 1)}: exported again in place?), and its "
                           "rows would mix the scores of two sets of weights; give another --out, or evaluate without "
                           "--resume to start again")
    if done != cases[:len(done)]:
        raise XctDiffError(f"cannot resume the evaluation in {out_dir}: its cases ({', '.join(done[:3])}, ...) are not "
                           "the first of this data's")
    return rows, figure, len(done), state["precision"]


def _write_text(path: Path, text: str) -> Path:
    from ..atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
