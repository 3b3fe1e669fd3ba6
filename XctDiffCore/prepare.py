"""Turn CT files into a paired training set: canonical CT volumes, their DRRs and a Decathlon datalist.

The paper trains on CT + DRR pairs. Each input CT is preprocessed once (:func:`preprocess_ct`); then
the original and ``augment`` random variations (:class:`RandomChestAugment`, applied to the CT
*before* its DRR, so each pair stays consistent) are written as

* ``images/<id>_aug<k>.npz``: int16 ``ct[z, y, x]`` in HU with ``spacing``/``origin``/``direction``
  and ``axes='zyx'`` (the shared data's format: :func:`read_ct` reads it with numpy alone);
* ``xrays/<id>_aug<k>.npy``: the float32 [0, 1] DRR in display orientation, and a ``.png`` preview;
* ``datalist.json``: ``{"training": [{"image", "xray", "patient", "aug", "source_spacing"}], "validation": [...]}``
  (``source_spacing``: the input CT's own voxel size, x, y, z in mm, and ``source_slice_thickness`` where the source
  says it, a DICOM CT's, so that a scan of thick slices stays known) with
  paths relative to the datalist, split by patient so no patient's variants leak across the split:
  a seeded random share (``val_fraction``), or the patients a split file names (``split``; the
  shared data's fixed whole-chest split is ``splits/shared_whole_chest.json``).

The inputs may be a whole download (:mod:`.ct_search`: DICOM series that are not CTs are ignored and
counted); a patient with several CTs is one *subject*, all of whose CTs go to one side of the split. A CT
that cannot be read is reported and left out, and the command ends with an error after writing the rest.
The datalist is written last: it exists only when every pair in it was written. Beside each CT's pairs
``images/<id>.pairs.json`` records what made them (the source file's size and time, the settings); with
``resume=True`` (``--resume``) a CT whose record matches is not prepared again, so an interrupted run over a
large download continues where it stopped. While a prepare writes ``out_dir`` it holds ``out_dir/.lock``
(:func:`~.atomic.output_lock`): a second one into the same folder, which would write the same pairs and
datalist in turns, is refused in one line.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .atomic import atomic_path, full_suffix, make_output_folder, output_lock
from .ct_search import CT_FILE_SUFFIXES, CtInput, describe_ignored, find_ct_inputs
from .errors import XctDiffError, counted
from .volume import Volume


def split_patients(patients: list, val_fraction: float, seed: int) -> tuple:
    """(training ids, validation ids): a seeded shuffle; at least one of each when there are two or more."""
    if not 0.0 <= val_fraction < 1.0:
        raise XctDiffError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(patients)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = 0
    if val_fraction > 0 and len(ids) > 1:
        n_val = min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
    validation = {ids[i] for i in order[:n_val]}
    return [i for i in ids if i not in validation], [i for i in ids if i in validation]


SPLIT_DIR = Path(__file__).resolve().parent / "splits"


def read_split(name_or_path) -> list:
    """The validation patient ids of a split file (``{"validation": [ids], "description": why}``).

    A bare name (``shared_whole_chest``) is looked up in the engine's ``splits/`` folder.
    """
    path = _split_path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SPLIT_DIR.glob("*.json")))
        raise XctDiffError(f"split file not found: {name_or_path} (built in: {known})")
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))["validation"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise XctDiffError(f"{path}: a split file needs a 'validation' list of patient ids ({exc})") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise XctDiffError(f"{path}: 'validation' must be a list of patient ids")
    return ids


def _split_path(name_or_path) -> Path:
    """A split file given by path, or a bare name (``shared_whole_chest``) of the engine's ``splits/`` folder."""
    path = Path(name_or_path)
    return SPLIT_DIR / f"{name_or_path}.json" if not path.suffix and not path.exists() else path


def split_description(name_or_path) -> str:
    """The ``description`` of a split file (read after :func:`read_split` checked it), "" when it has none."""
    description = json.loads(_split_path(name_or_path).read_text(encoding="utf-8")).get("description", "")
    return description if isinstance(description, str) else ""


def split_cases(cts: list, split, val_fraction: float, seed: int) -> tuple:
    """(training ids, validation ids) of the :class:`~.ct_search.CtInput` ``cts``, split by subject: all of one
    person's CTs on one side. A split file may name a CT or its subject; either holds out the subject."""
    subject_of = {c.patient: c.subject for c in cts}
    subjects = sorted(set(subject_of.values()))
    if split is not None:
        _, named = fixed_split(sorted(set(subjects) | set(subject_of)), read_split(split))
        held = {subject_of.get(n, n) for n in named}
    else:
        if val_fraction > 0 and len(subjects) == 1 and len(cts) > 1:
            raise XctDiffError(
                f"the {len(cts)} CTs all carry the DICOM PatientID {subjects[0]!r}, so they are one patient and none "
                "can be held out for validation: give --val-fraction 0, or --ids folder if they are different people")
        _, held = split_patients(subjects, val_fraction, seed)
        held = set(held)
    ids = sorted(subject_of)
    return [i for i in ids if subject_of[i] not in held], [i for i in ids if subject_of[i] in held]


def fixed_split(patients: list, validation_ids: list) -> tuple:
    """(training ids, validation ids) with the validation named by the split; every named id must be present."""
    missing = sorted(set(validation_ids) - set(patients))
    if missing:
        raise XctDiffError(f"the split names patients that are not among the inputs: {', '.join(missing)}")
    ids = sorted(patients)
    return [i for i in ids if i not in validation_ids], [i for i in ids if i in validation_ids]


def prepare_dataset(
    inputs: Iterable,
    out_dir,
    augment: int = 0,
    val_fraction: float = 0.2,
    split=None,
    seed: int = 0,
    size: int = 128,
    geometry: str = "cone",
    progress: bool = True,
    mix: int = 0,
    mix_patients: Optional[list] = None,
    train_on_all: bool = False,
    mix_away: Optional[Sequence[float]] = None,
    naming: str = "patient-id",
    report: Optional[Callable[[str], None]] = None,
    workers: int = 1,
    resume: bool = False,
) -> Path:
    """Write the pairs and ``datalist.json`` for the CTs named by ``inputs`` under ``out_dir``; return the datalist.

    ``mix`` > 0 adds that many inter-patient mixes of each training patient (:mod:`.mixing`), among
    ``mix_patients`` (default: every training patient), to the training list; ``mix_away`` ``(low, high)``
    adds one mix per pair moved away from the partner (:func:`~.mixing.make_mixes`). ``train_on_all`` trains on the
    validation patients too (how a recipe chosen on a split is retrained on all the data); their pairs stay in
    the validation list, so a training log still shows them, as training fit. ``naming``: how DICOM CTs are named
    and grouped (:func:`~.ct_search.find_ct_inputs`). ``report`` gets one line for each CT left out and for the
    series ignored (default: stderr). CTs that cannot be read are left out; the datalist holds the rest, and
    its ``"left_out"`` lists them (``prepare`` then exits with an error). ``workers`` > 1 prepares that many
    CTs at once, each in its own process on one thread (0: one per core); the output is the same (byte for byte
    in the tests). The mixes are made afterwards, here: their registration's sums follow the thread count.
    ``resume``: a CT whose pairs this folder holds from the same file with the same settings is not prepared again."""
    from .drr import make_geometry
    from .mixing import check_mix_request
    from .progress import progress_bar

    if augment < 0:
        raise XctDiffError(f"--augment must be 0 or more, got {augment}")
    if not 16 <= size <= 512:
        raise XctDiffError(f"--size must be between 16 and 512, got {size}")
    if workers < 0:
        raise XctDiffError(f"--workers must be 0 (one per core) or more, got {workers}")
    if seed < 0:
        raise XctDiffError(f"--seed must be 0 or more, got {seed}")
    out_dir = Path(out_dir)
    with output_lock(out_dir, "xctdiff prepare"):  # a second prepare into it (its pairs, its datalist) is refused
        report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        geom = make_geometry(geometry)
        ignored = []
        cts = find_ct_inputs(inputs, ignored, naming=naming, progress=progress, output=out_dir)  # never its own pairs
        if ignored:
            report(describe_ignored(ignored))
        from .io import warn_if_synthetic

        warn_if_synthetic([c.path for c in cts], "a model trained on them learns its own output, not anatomy")
        training, validation = split_cases(cts, split, val_fraction, seed)
        if train_on_all:
            training = sorted(training + validation)
        if mix_patients and not mix:
            raise XctDiffError("--mix-patients names the patients to mix: give --mix K too")
        mix_patients = list(mix_patients or training) if mix else []
        strangers = [p for p in mix_patients if p not in training]
        if strangers:
            raise XctDiffError(f"--mix-patients must be training patients; not: {', '.join(strangers)}")
        check_mix_request(mix, len(mix_patients), away_range=mix_away)
        for folder in (out_dir / "images", out_dir / "xrays"):
            make_output_folder(folder)

        jobs = [_CtJob(c, augment, seed, size, geometry, out_dir, c.patient in mix_patients, resume) for c in cts]
        entries, to_mix, left_out = {}, {}, []
        try:
            with progress_bar(len(cts) * (augment + 1), "prepare", "pair", disable=not progress) as bar, \
                    _worker_pool(workers, len(jobs)) as pool:
                for job, (pairs, ct, error) in zip(jobs, pool.map(_prepare_ct, jobs) if pool else map(_prepare_ct, jobs)):
                    bar.set_postfix_str(job.ct.patient)
                    if error is not None:
                        left_out.append({"path": str(job.ct.path), "patient": job.ct.patient, "reason": error})
                        bar.clear()
                        report(f"left out {job.ct.patient}: {error}")
                    else:
                        entries[job.ct.patient] = pairs
                        if ct is not None:
                            to_mix[job.ct.patient] = ct
                    bar.update(augment + 1)
        except BaseException as exc:  # Ctrl-C or SIGTERM (not an error): what is kept, and how to go on
            if not isinstance(exc, Exception):
                print(f"prepare: stopped with {len(entries)} of {len(cts)} CTs prepared in {out_dir}; the same command "
                      "with --resume keeps them and prepares the rest", file=sys.stderr, flush=True)
            raise
        if not entries:
            raise XctDiffError(f"none of the {len(cts)} CTs could be read (each named above)")
        training, validation = [p for p in training if p in entries], [p for p in validation if p in entries]
        _warn_about_validation(out_dir, validation, entries, split_description(split) if split else "")
        mix_patients = [p for p in mix_patients if p in to_mix]
        check_mix_request(mix, len(mix_patients), away_range=mix_away)
        mixes = _write_mixes({p: to_mix[p] for p in mix_patients}, mix, seed, out_dir, geom, size, progress, mix_away)

        datalist = {
            "description": "CT + DRR pairs from `xctdiff prepare`, split by patient",
            "settings": {
                "geometry": geometry, "size": size, "augment": augment, "val_fraction": val_fraction, "seed": seed,
                "split": None if split is None else str(split), "mix": mix, "train_on_all": train_on_all,
                **({"mix_away": [float(a) for a in mix_away]} if mix_away is not None else {}),
                **({"ids": naming} if naming != "patient-id" else {}),
            },
            "training": [e for p in training for e in entries[p]] + mixes,
            "validation": [e for p in validation for e in entries[p]],
            **({"left_out": left_out} if left_out else {}),
        }
        path = out_dir / "datalist.json"
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(datalist, indent=2) + "\n")
        return path


def _warn_about_validation(out_dir: Path, validation: list, entries: dict, described: str = "") -> None:
    """The evaluation protocol scores whole chests of 3 mm slices or finer: a validation patient whose CT is no whole
    chest (a crop, a slab: its body under :data:`~XctDiffCore.metrics.WHOLE_CHEST_MM`) or a scan of low resolution
    (:func:`~XctDiffCore.metrics.low_resolution_problem`: 5 mm slices look whole at 2.5 mm, blurred head to foot) is
    said here, when the split is made, not only when a model is scored on it (``evaluate`` says it again).
    ``described``: the split file's description; a patient it names was held out knowingly (the built-in
    ``shared_whole_chest`` keeps tcga_thca_de_a4ma's 5 mm slices), so the line does not ask for another split."""
    from .metrics import low_resolution_problem, whole_chest_problem

    partial, coarse = {}, {}
    for patient in validation:
        original = next((e for e in entries[patient] if e.get("aug", 0) == 0), entries[patient][0])
        with np.load(out_dir / original["image"]) as data:
            problem = whole_chest_problem(data["ct"], float(np.asarray(data["spacing"])[0]))
        if problem:
            partial[patient] = problem
        problem = low_resolution_problem(original.get("source_spacing"), original.get("source_slice_thickness"))
        if problem:
            coarse[patient] = problem
    _warn_validation_patients(partial, len(validation), "no whole chest", "no whole chest", "the evaluation protocol "
                              "scores whole chests, so a model's scores on them say little", "name whole chests for "
                              "validation (--split FILE)", described)
    _warn_validation_patients(coarse, len(validation), "a scan of low resolution", "scans of low resolution",
                              "the evaluation protocol scores scans of 3 mm or finer, and a blurred truth scores a "
                              "model's bone against bone it does not show", "name finer scans for validation (--split "
                              "FILE)", described)


def _warn_validation_patients(problems: dict, total: int, one: str, many: str, why: str, advice: str,
                              described: str = "") -> None:
    """One warning line: how many validation patients ``is {one}`` / ``are {many}``, the first three named with their
    problem (``problems``: patient -> why), why it matters and what to do (``advice``), unless the split's
    description (``described``) names every one of them: then that they were held out knowingly."""
    if not problems:
        return
    import warnings

    names = "; ".join(f"{p}: {w}" for p, w in list(problems.items())[:3]) + ("; ..." if len(problems) > 3 else "")
    if described and all(re.search(rf"(?<![\w-]){re.escape(patient)}(?![\w-])", described) for patient in problems):
        advice = (f"the split's description names {'it' if len(problems) == 1 else 'them'}: held out knowingly, so "
                  f"read {'its' if len(problems) == 1 else 'their'} scores with that in mind")
    warnings.warn(f"{len(problems)} of the {total} validation patients {f'is {one}' if len(problems) == 1 else f'are {many}'} "
                  f"({names}): {why}; {advice}", stacklevel=3)


@dataclass(frozen=True)
class _CtJob:
    """One input CT to prepare: what :func:`_prepare_ct` needs, picklable for a worker process."""

    ct: CtInput
    augment: int
    seed: int
    size: int
    geometry: str
    out_dir: Path
    keep_ct: bool  # return the canonical CT, for the mixes
    resume: bool = False  # pairs written before from the same file with the same settings are kept

    def record(self) -> dict:
        """What makes this CT's pairs: its source (path, size, time) and the settings that shape them."""
        return {"source": str(self.ct.path), "stamp": _source_stamp(self.ct.path), "augment": self.augment,
                "seed": self.seed, "size": self.size, "geometry": self.geometry}

    @property
    def record_path(self) -> Path:
        return self.out_dir / "images" / f"{self.ct.patient}.pairs.json"


def _prepare_ct(job: _CtJob) -> tuple:
    """Write the pairs of one CT (the original and ``augment`` variants); return ``(entries, CT or None,
    error or None)``: a CT that cannot be read is an error message, not an exception, so the others go on.
    Each variant's randomness comes from (seed, patient, k), so the result does not depend on the order."""
    from .augment import RandomChestAugment
    from .drr import make_geometry
    from .io import read_ct
    from .preprocess import preprocess_ct

    kept = _kept_pairs(job) if job.resume else None
    if kept is not None:
        return kept
    try:
        source = read_ct(job.ct.path)  # its errors name the file
    except XctDiffError as exc:
        return [], None, str(exc)
    try:
        ct = preprocess_ct(source, size=job.size)
    except XctDiffError as exc:  # the CT's voxels, not the file: say which file
        return [], None, f"{exc} ({job.ct.path})"
    resolution = _source_resolution(job.ct.path, source)
    geometry, augmenter, patient = make_geometry(job.geometry), RandomChestAugment(), job.ct.patient
    subject = {} if job.ct.subject == patient else {"subject": job.ct.subject}
    entries = []
    for k in range(job.augment + 1):
        array = ct.array
        if k > 0:
            rng = np.random.default_rng([job.seed, zlib.crc32(patient.encode()), k])
            array = np.rint(augmenter(ct.array, rng)).astype(np.int16)
        entry = _write_pair(ct.with_array(array), f"{patient}_aug{k}", job.out_dir, geometry, job.size)
        entries.append({**entry, "patient": patient, **subject, "aug": k, **resolution})
    with atomic_path(job.record_path) as tmp:  # after the pairs: a record names only pairs that were written
        tmp.write_text(json.dumps({**job.record(), "entries": entries}, indent=1) + "\n")
    return entries, (ct if job.keep_ct else None), None


def _source_resolution(path: Path, volume: Volume) -> dict:
    """The scan's own voxel size (``source_spacing``: x, y, z mm) and, where the source says it, its slice thickness
    (``source_slice_thickness``, mm: :func:`_source_thickness`), kept in the datalist: a CT of thick slices looks
    whole at 2.5 mm, and prepare and evaluate say it is of low resolution
    (:func:`~XctDiffCore.metrics.low_resolution_problem`). The CT's spacing; for a .npz that a ``manifest.csv``
    beside it lists (the shared data: CTs already resampled to 2.5 mm), the ``native_spacing`` recorded there."""
    spacing = volume.spacing
    if full_suffix(path).lower() == ".npz":
        spacing = (_manifest_resolution(path) or (spacing, None))[0]
    return {"source_spacing": [round(float(s), 4) for s in spacing], **_source_thickness(path)}


def _source_thickness(path: Path) -> dict:
    """``{"source_slice_thickness": mm}`` where the source says it: a DICOM CT's Slice Thickness (0018,0050), the
    ``(5 mm thick)`` of a shared .npz's ``native_spacing`` (``0.977x0.977x2.5 (5 mm thick)``); else ``{}`` (NIfTI,
    NRRD and MetaImage record none: their spacing alone decides)."""
    from .io.ct import dicom_slice_thickness

    thickness = None
    if full_suffix(path).lower() == ".npz":
        thickness = (_manifest_resolution(path) or (None, None))[1]
    elif path.is_file() and full_suffix(path).lower() not in CT_FILE_SUFFIXES:  # a file of a DICOM series
        thickness = dicom_slice_thickness(path)
    return {"source_slice_thickness": round(thickness, 4)} if thickness else {}


def _manifest_resolution(path: Path) -> Optional[tuple]:
    """``(native spacing, slice thickness or None)`` of the row of ``manifest.csv`` (beside ``path``) whose ``id`` is
    the file's name (``0.977x0.977x2.5 (5 mm thick)``: the spacing, then the thickness where it differs); None when
    there is no such file, row or usable spacing."""
    import csv

    name = path.name[: -len(".npz")]
    try:
        with open(path.parent / "manifest.csv", newline="", encoding="utf-8") as f:
            row = next((r for r in csv.DictReader(f) if r.get("id") == name), None)
        text = (row or {}).get("native_spacing", "")
        values = [float(v) for v in text.split("(")[0].split("x")]
    except (OSError, ValueError, UnicodeDecodeError, csv.Error):
        return None
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        return None
    thick = re.search(r"\(\s*([0-9]*\.?[0-9]+)\s*mm thick\s*\)", text)
    return values, (float(thick.group(1)) if thick and float(thick.group(1)) > 0 else None)


def _kept_pairs(job: _CtJob) -> Optional[tuple]:
    """``_prepare_ct``'s result from the pairs an earlier run wrote, if its record says they were made from this
    very file with these settings and they are all there; else None (prepare it again). Entries written before
    prepare kept the scan's voxel size, or a slice thickness the source gives, are prepared again (once)."""
    from .io import read_ct

    try:
        record = json.loads(job.record_path.read_text(encoding="utf-8"))
        entries = record.pop("entries")
        if record != json.loads(json.dumps(job.record())) or not all(
                (job.out_dir / entry[key]).is_file() for entry in entries for key in ("image", "xray")):
            return None
        thickness = _source_thickness(job.ct.path)
        if any("source_spacing" not in entry or entry.get("source_slice_thickness") != thickness.get(
                "source_slice_thickness") for entry in entries):
            return None
        ct = read_ct(job.out_dir / entries[0]["image"]) if job.keep_ct else None  # the canonical CT, for the mixes
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, XctDiffError):
        return None
    return entries, ct, None


def _source_stamp(path: Path) -> list:
    """[files, bytes, newest modification in ns] of a CT file or of the files of a series folder (a DICOM series is
    found as one of its files: its folder counts): changes when the source does (a re-download, an edit), as far
    as sizes and times tell."""
    try:
        if path.is_file() and full_suffix(path).lower() not in CT_FILE_SUFFIXES:
            path = path.parent  # one file of a DICOM series, which is read whole
        files = [path] if not path.is_dir() else [p for p in path.iterdir() if p.is_file()]
        stats = [f.stat() for f in files]
    except OSError:
        return []
    return [len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]


@contextlib.contextmanager
def _worker_pool(workers: int, jobs: int):
    """A pool of ``workers`` processes (0: one per core), each on one thread; None (work here) for one."""
    workers = min(workers or os.cpu_count() or 1, jobs)
    if workers <= 1:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error or Ctrl-C, start no further CT


def _one_thread() -> None:
    """A worker's initialiser: one thread each, so that N workers use N cores and not N x N."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _write_mixes(cts: dict, per_patient: int, seed: int, out_dir: Path, geometry, size: int, progress: bool,
                 away_range: Optional[Sequence[float]] = None) -> list:
    """Write ``per_patient`` inter-patient mixes of each CT of ``cts`` (twice as many with ``away_range``);
    return their datalist entries."""
    if not per_patient:
        return []
    from .mixing import make_mixes
    from .progress import progress_bar

    entries = []
    total = len(cts) * min(per_patient, len(cts) - 1) * (1 if away_range is None else 2)
    with progress_bar(total, "mix", "chest", disable=not progress) as bar:
        for mix in make_mixes(cts, per_patient, seed=seed, away_range=away_range):
            entry = _write_pair(mix.volume, mix.name, out_dir, geometry, size)
            entries.append({**entry, "patient": mix.name, "aug": 0,
                            "mix": {"source": mix.source, "target": mix.target, "alpha": round(mix.alpha, 4)}})
            bar.set_postfix_str(f"{mix.name}: |HU error| to the target {mix.error_before:.0f} -> "
                                f"{mix.error_registered:.0f} registered")
            bar.update()
    return entries


def _write_pair(volume: Volume, name: str, out_dir: Path, geometry, size: int) -> dict:
    """Write a CT, its DRR and the DRR's preview under ``name``; return the datalist paths of the pair."""
    from .drr import drr_of_volume
    from .io import drr_tag_metadata, write_image_png

    drr = drr_of_volume(volume, geometry, size)
    _write_ct_npz(volume, out_dir / "images" / f"{name}.npz")
    _write_npy(drr, out_dir / "xrays" / f"{name}.npy")
    write_image_png(drr, out_dir / "xrays" / f"{name}.png", metadata=drr_tag_metadata())
    return {"image": f"images/{name}.npz", "xray": f"xrays/{name}.npy"}


def _write_ct_npz(volume: Volume, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            ct=np.asarray(volume.array, dtype=np.int16),
            axes=np.array("zyx"),
            spacing=np.asarray(volume.spacing, dtype=np.float64),
            origin=np.asarray(volume.origin, dtype=np.float64),
            direction=np.asarray(volume.direction, dtype=np.float64),
        )


def _write_npy(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array, dtype=np.float32))


def summarize(datalist_path) -> str:
    """One line: how many pairs and patients went to each side."""
    datalist = json.loads(Path(datalist_path).read_text(encoding="utf-8"))
    parts = []
    for side in ("training", "validation"):
        items = datalist[side]
        mixes = sum(1 for e in items if "mix" in e)
        patients = len({e.get("subject", e["patient"]) for e in items if "mix" not in e})
        parts.append(f"{side} {counted(len(items), 'pair')} / {counted(patients, 'patient')}"
                     + (f" + {counted(mixes, 'mix', 'mixes')}" if mixes else ""))
    if datalist.get("settings", {}).get("train_on_all") and datalist["validation"]:
        parts[-1] += " (also trained on: training fit)"
    left_out = len(datalist.get("left_out", []))
    if left_out:
        parts[-1] += f"; left out: {left_out} CT{'s' * (left_out > 1)}"
    return f"wrote {datalist_path}: " + ", ".join(parts)
