"""Find the CTs among files and folders as a user has them: CT files, DICOM series, whole downloads.

Why: a TCIA download (LIDC-IDRI, for one) nests each series in ``<patient>/<study>/<series>/`` and puts
the CTs beside the patient's radiographs (CR, DX), localizers and annotation files; some patients have
several CTs. So every DICOM series found is judged by its header: CT image series are kept, anything else
is ignored and counted (:class:`IgnoredSeries`). A DICOM CT is named by its PatientID, and the CTs of one
person share a *subject*, which the training split keeps on one side (:func:`~XctDiffCore.prepare.split_cases`)
so that nobody is trained on and validated on at once. Two reconstructions of one scan (a soft-tissue and a lung
kernel; two files converted from them) would each be a CT of their own: they are named in one warning line.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .atomic import full_suffix, in_folder, refuse_own_output
from .errors import XctDiffError, a_few

CT_FILE_SUFFIXES = (".npz", ".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
MIN_SERIES_IMAGES = 3  # fewer images than this is a localizer, a key image or a lone slice, not a volume
NAMING = ("patient-id", "folder")  # how a DICOM CT is named and grouped (``xctdiff prepare --ids``)


@dataclass(frozen=True)
class CtInput:
    """One CT: where it is read from, the id its outputs are named by, and whose it is."""

    path: Path  # a CT file, a DICOM series folder, or one file of a DICOM series (its series is read)
    patient: str  # unique among the inputs: names the pairs (``<patient>_aug<k>``) and the datalist entries
    subject: str  # the person scanned (the DICOM PatientID, else ``patient``): one side of the split each


@dataclass(frozen=True)
class IgnoredSeries:
    """A DICOM series that is not a CT volume (a radiograph, a localizer, ...): where, and why not."""

    folder: Path
    reason: str


@dataclass(frozen=True)
class _Found:
    path: Path
    name: str  # the file's stem or the series folder's name
    above: tuple  # the names of the folders above, nearest first (put in front of a name that collides)
    patient_id: str = ""  # DICOM PatientID, when it names the CT
    scan: tuple = ()  # a DICOM CT's (StudyInstanceUID, FrameOfReferenceUID): reconstructions of one scan share them
    label: str = ""  # what tells a DICOM CT from another reconstruction of its scan: kernel, slice thickness


def find_ct_inputs(paths: Iterable, ignored: Optional[list] = None, naming: str = "patient-id",
                   progress: bool = False, output: Optional[Path] = None) -> list:
    """The CTs named by ``paths``: files as given; in folders (searched to any depth), CT files and every
    DICOM CT series. Series that are not CT volumes are appended to ``ignored`` (:class:`IgnoredSeries`).

    ``naming``: ``patient-id`` names a DICOM CT by its PatientID (numbered ``_2``, ``_3`` when one person has
    several) and groups one person's CTs as one subject; ``folder`` names each by its folder, every CT its
    own subject (for data whose PatientIDs were blanked or made alike). Other names that collide get the names
    of the folders above them in front, as many as it takes. ``progress``: a bar over the folders searched (a
    download of a thousand patients takes minutes to search: every DICOM header is read). ``output``: the
    calling job's output folder, passed over whatever it holds (an interrupted ``prepare`` leaves pairs there
    without the datalist that marks a data set, and read back they would be CTs); a path given inside it is an
    error. Compared resolved: a link to it, or a path through one, is the same folder.
    """
    if naming not in NAMING:
        raise XctDiffError(f"--ids must be one of {', '.join(NAMING)}, got {naming!r}")
    ignored = [] if ignored is None else ignored
    found = []
    own = None if output is None else Path(os.path.realpath(output))
    for path in (Path(p) for p in paths):
        if not path.exists():
            raise XctDiffError(f"file not found: {path}")
        if output is not None:
            refuse_own_output(path, output)
        if path.is_file():
            found.append(_Found(path, _stem(path), _above(path.parent)))
            continue
        ignored_here = []
        from .io import walk_below  # numpy: not imported with the command line's parser (`xctdiff --help`)

        tree = _outside_prepared_sets(path, _outside_folder(path, sorted(walk_below(path)), own))  # one walk for all
        cts_here = [_Found(p, _stem(p), _above(p.parent)) for p in tree
                    if p.is_file() and full_suffix(p).lower() in CT_FILE_SUFFIXES]
        cts_here += _dicom_ct_series([path, *(p for p in tree if p.is_dir())], ignored_here,
                                     use_patient_id=naming == "patient-id", progress=progress)
        cts_here.sort(key=lambda f: f.path)
        ignored.extend(ignored_here)
        if not cts_here:
            raise XctDiffError(f"no CT (DICOM CT series, {', '.join(CT_FILE_SUFFIXES)}) found in {path}"
                               + (f"; {describe_ignored(ignored_here)}" if ignored_here else _sitk_hint())
                               + _unreadable_hint([path, *(p for p in tree if p.is_dir())]))
        found.extend(cts_here)
    unique = [dataclasses.replace(f, path=p) for p, f in {f.path.resolve(): f for f in found}.items()]
    cts = _name_inputs(unique)
    _warn_of_one_scan_twice(unique, cts)
    return cts


def _outside_folder(root: Path, tree: list, folder: Optional[Path]) -> list:
    """The paths of ``tree`` (all below ``root``, as walked: links named, not entered) whose resolved path is not
    in the resolved ``folder``. Only links are resolved one by one: the walk enters no link, so the rest are real."""
    if folder is None:
        return tree
    real_root = Path(os.path.realpath(root))
    return [p for p in tree
            if not in_folder(Path(os.path.realpath(p)) if p.is_symlink() else real_root / p.relative_to(root), folder,
                             resolved=True)]


def _outside_prepared_sets(root: Path, tree: list) -> list:
    """The paths of ``tree`` (all below ``root``) outside a data set ``xctdiff prepare`` wrote there (a
    ``datalist.json`` beside ``images/``): its pairs are CTs by suffix, and read again they would enter a new data
    set as patients of their own, its augmented copies and mixes too. Each set passed over is one warning line."""
    sets = [p.parent for p in tree if p.name == "datalist.json" and p.parent != root and (p.parent / "images").is_dir()]
    for folder in sets:
        warnings.warn(f"passed over {folder}: a data set written by `xctdiff prepare` (datalist.json), not CTs",
                      stacklevel=3)
    return [p for p in tree if not any(p == folder or folder in p.parents for folder in sets)]


def describe_ignored(ignored: list) -> str:
    """One line: how many series were ignored and why, with one of them as an example."""
    counts = Counter(i.reason for i in ignored)
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    verb = "is" if len(ignored) == 1 else "are"
    return f"ignored {len(ignored)} DICOM series that {verb} not a CT volume ({reasons}), e.g. {ignored[0].folder}"


def _unreadable_hint(folders: list, most: int = 200) -> str:
    """``; N DICOM files below it could not be read (...), e.g. PATH`` when some of the first ``most`` ``folders``
    hold DICOM files that read into no series (cut short: a copy that stopped), else "": why no CT was found."""
    if not importlib.util.find_spec("SimpleITK"):
        return ""
    from .io.ct import unreadable_dicom_files

    damaged = [folder / name for folder in folders[:most] for name in unreadable_dicom_files(folder)]
    if not damaged:
        return ""
    return (f"; {len(damaged)} DICOM file{'s' * (len(damaged) > 1)} below it could not be read (damaged or cut short; "
            f"copy, download or export {'them' if len(damaged) > 1 else 'it'} again), e.g. {damaged[0]}")


def _sitk_hint() -> str:
    return "" if importlib.util.find_spec("SimpleITK") else " (DICOM series need SimpleITK: pip install SimpleITK)"


def _above(folder: Path) -> tuple:
    return tuple(p.name for p in (folder, *folder.parents) if p.name)


def _stem(path: Path) -> str:
    return path.name[: len(path.name) - len(full_suffix(path))] if path.is_file() else path.name


def ct_series_below(folder: Path, most: int = 3, folders: int = 500) -> list:
    """Up to ``most`` folders below ``folder`` holding a DICOM CT series, looking into at most ``folders``
    folders (a hint for an error message: quick even when given the root of a large tree)."""
    from .io import walk_below

    tree = itertools.islice(itertools.chain([folder], (d for d in walk_below(folder) if d.is_dir())), folders)
    return [f.path.parent for f in _dicom_ct_series(tree, [], use_patient_id=False, most=most)]


def _dicom_ct_series(folders: Iterable[Path], ignored: list, use_patient_id: bool, most: Optional[int] = None,
                     progress: bool = False) -> list:
    """Every DICOM CT series in ``folders`` (each looked into, not below it), as the path of its first file
    (reading that file reads its series); other series go to ``ignored``. Without SimpleITK none is found.
    ``most``: stop after that many series; ``progress``: a bar."""
    try:
        import SimpleITK as sitk
    except ImportError:
        return []
    import pydicom

    found = []
    bar = None
    if progress:
        from .progress import progress_bar  # a bar on a terminal, plain lines in a log file

        folders = list(folders)
        bar = progress_bar(len(folders), "search", "folder", leave=False)
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on stderr for every folder without a series
    try:
        for folder in folders:
            if most is not None and len(found) >= most:
                break
            _series_in_folder(folder, sitk, pydicom, ignored, found, use_patient_id)
            if bar is not None:  # counted once looked into, its series with it (not at the next folder's start)
                bar.set_postfix_str(f"{len(found)} CT series", refresh=False)
                bar.update()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
        if bar is not None:
            bar.close()
    return found


def _series_in_folder(folder: Path, sitk, pydicom, ignored: list, found: list, use_patient_id: bool) -> None:
    """The DICOM CT series of one folder (not below it) appended to ``found``; the others to ``ignored``."""
    from .io import special_files

    special = special_files(folder)
    if special:  # GDCM would open it: a pipe (or /proc/kmsg) blocks for ever
        ignored.append(IgnoredSeries(folder, f"holds {special[0].name}, which is not a file (a pipe, socket "
                                             "or device)"))
        return
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        if not files:
            continue
        try:
            header = pydicom.dcmread(files[0], stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable header: the series is reported, not read
            ignored.append(IgnoredSeries(folder, f"unreadable header ({type(exc).__name__})"))
            continue
        reason = _not_a_ct_volume(header, len(files))
        if reason:
            ignored.append(IgnoredSeries(folder, reason))
            continue
        patient_id = str(header.get("PatientID", "") or "").strip() if use_patient_id else ""
        scan = tuple(str(header.get(key, "") or "").strip() for key in ("StudyInstanceUID", "FrameOfReferenceUID"))
        found.append(_Found(Path(files[0]), folder.name, _above(folder.parent), patient_id,
                            scan if all(scan) else (), _reconstruction_label(header)))


def _reconstruction_label(header) -> str:
    """``B70f, 1 mm``: a DICOM CT's kernel and slice thickness, what tells it from another reconstruction of its
    scan ("" when the header gives neither)."""
    kernel = header.get("ConvolutionKernel") or ""
    kernel = "/".join(str(k).strip() for k in kernel) if not isinstance(kernel, str) else kernel.strip()
    try:
        thickness = f"{float(header.get('SliceThickness')):g} mm"
    except (TypeError, ValueError):
        thickness = ""
    return ", ".join(part for part in (kernel, thickness) if part)


def _warn_of_one_scan_twice(found: list, cts: list) -> None:
    """One warning line naming the CTs that are reconstructions of one scan, as far as their headers tell: DICOM CTs
    of one study and frame of reference (a soft-tissue and a lung-kernel series of one acquisition), or CT files in
    one folder that cover one field of view (:func:`_same_field_of_view`). Why: each is a CT of its own here, so that
    scan weighs twice in training and in a score, and CTs of two subjects (``--ids folder``, files) may even be
    split apart, one trained on and the other validated on. Nothing is left out: which to keep is the user's."""
    labels = {ct.patient: f.label for f, ct in zip(found, cts)}
    scans = {}
    for f, ct in zip(found, cts):
        if f.scan:
            scans.setdefault(f.scan, []).append(ct)
    named = [(members, "one DICOM study and frame of reference") for members in scans.values() if len(members) > 1]
    named += [(members, f"one field of view in {members[0].path.parent}")
              for members in _same_field_of_view([ct for f, ct in zip(found, cts) if not f.scan])]
    if not named:
        return

    def listed(members: list) -> str:
        names = [f"{c.patient} ({labels[c.patient]})" if labels[c.patient] else c.patient for c in members]
        return ", ".join(names[:-1]) + " and " + names[-1]

    shown = "; ".join(f"{listed(members)}: {why}" for members, why in named[:3]) + ("; ..." if len(named) > 3 else "")
    apart = any(len({c.subject for c in members}) > 1 for members, _ in named)  # each file a patient of its own
    apart = ", and may be trained on and validated on at once" if apart else ""
    warnings.warn(f"{sum(len(m) for m, _ in named)} CTs look like reconstructions of {len(named)} "
                  f"scan{'s' * (len(named) > 1)} ({shown}): each is taken as a CT of its own, so that scan weighs "
                  f"twice in training and in a score{apart}; keep one (the thinnest slices and the softest kernel, as "
                  "a rule) and move the others out", stacklevel=3)


_FIELD_OF_VIEW_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")  # their headers say where they lie


def _same_field_of_view(cts: list) -> list:
    """Groups (two or more) of the CT files among ``cts`` that lie in one folder and cover one field of view: the
    same box in the patient's frame, every side within the coarser file's voxel (thin and thick slices of one scan
    start half a slice apart). A file that records no position (origin 0, 0, 0: written without geometry) is passed
    over, as are .npz files (the shared data, resampled) and files whose header does not read (prepare says so)."""
    if not importlib.util.find_spec("SimpleITK"):
        return []
    by_folder = {}
    for ct in cts:
        if ct.path.is_file() and full_suffix(ct.path).lower() in _FIELD_OF_VIEW_SUFFIXES:
            by_folder.setdefault(ct.path.parent, []).append(ct)
    groups = []
    for members in (m for m in by_folder.values() if len(m) > 1):
        boxes = [(ct, box) for ct in members if (box := _field_of_view(ct.path)) is not None]
        found = []  # [(first box, [cts])]
        for ct, box in boxes:
            group = next((g for first, g in found if _one_box(first, box)), None)
            if group is None:
                found.append((box, [ct]))
            else:
                group.append(ct)
        groups += [g for _, g in found if len(g) > 1]
    return groups


def _field_of_view(path: Path):
    """``(lowest corner, highest corner, coarsest voxel)`` in mm (LPS) of a CT file's voxel centres, from its header;
    None when it records no position or does not read as a 3D image."""
    import numpy as np

    from .io.common import _sitk_header

    try:
        reader = _sitk_header(path, "a CT volume")
        if reader.GetDimension() != 3:
            return None
        origin, spacing = np.array(reader.GetOrigin()), np.array(reader.GetSpacing())
        direction = np.array(reader.GetDirection()).reshape(3, 3)
        far = spacing * (np.array(reader.GetSize()) - 1)
    except Exception:  # noqa: BLE001 - a header that does not read: the CT's own read says why
        return None
    if not np.any(origin) or not np.all(np.isfinite(origin)):
        return None
    corners = np.array([origin + direction @ (far * np.array(c)) for c in itertools.product((0, 1), repeat=3)])
    return corners.min(axis=0), corners.max(axis=0), float(spacing.max())


def _one_box(a, b) -> bool:
    """Two fields of view (:func:`_field_of_view`) that coincide to the coarser one's voxel."""
    import numpy as np

    tolerance = max(a[2], b[2])
    return bool(np.all(np.abs(a[0] - b[0]) <= tolerance) and np.all(np.abs(a[1] - b[1]) <= tolerance))


def _not_a_ct_volume(header, images: int) -> str:
    """Why a DICOM series is not a CT volume to train on ("" when it is one)."""
    modality = str(header.get("Modality", "") or "").strip().upper()
    if modality and modality != "CT":
        return f"modality {modality}"
    image_type = [str(v).upper() for v in (header.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "CT localizer"
    if images < MIN_SERIES_IMAGES:
        return f"fewer than {MIN_SERIES_IMAGES} images"
    return ""


def _safe_id(text: str) -> str:
    """A PatientID as a file-name part: letters, digits, '.', '_' and '-' kept, the rest '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip("._") or "patient"


def _name_inputs(found: list) -> list:
    """Ids in the order found: a PatientID (numbered from its second CT on), else the file or folder name,
    with the names of the folders above in front, as many as it takes, where two collide."""
    seen = Counter()
    names, subjects = [], []
    for f in found:
        if f.patient_id:
            subject = _safe_id(f.patient_id)
            seen[subject] += 1
            names.append(subject if seen[subject] == 1 else f"{subject}_{seen[subject]}")
            subjects.append(subject)
        else:
            names.append(f.name)
            subjects.append(None)
    for level in range(max((len(f.above) for f in found), default=0)):
        plain = [n for n, s in zip(names, subjects) if s is None]
        if len(set(plain)) == len(plain):
            break
        names = [f"{f.above[level]}_{n}" if s is None and plain.count(n) > 1 and level < len(f.above) else n
                 for f, n, s in zip(found, names, subjects)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        same = [str(f.path) for f, n in zip(found, names) if n == duplicates[0]]
        raise XctDiffError(f"several inputs would share the patient id {duplicates[0]!r} ({a_few(same)}): rename or "
                           "move one")
    return [CtInput(f.path, n, s or n) for f, n, s in zip(found, names, subjects)]
