"""What ``xctdiff reconstruct`` does around the pipeline: files or folders, progress display, summary.

* One radiograph file -> one CT (``-o``, default ``<stem>_ct.nrrd`` beside the input; ``--format``
  another suffix, or ``dicom``: a DICOM series folder ``<stem>_ct``, :mod:`XctDiffCore.dicom_series`).
* A folder -> every radiograph in it (not recursive; sorted), into an output folder (``-o``, default
  ``<folder>_ct`` beside it, created when missing) of ``<stem>_ct.nrrd`` (or ``--format``'s). Under
  ``torchrun`` each process takes the files ``rank::world_size`` and, on CUDA, the GPU ``local_rank``; at the
  end they tell rank 0 what they did (:func:`_gather_at_rank_0`), which gives the whole folder's tally and status.
  A file that fails is reported and skipped; the command then ends with one error line.
* No output may be an input or another output of the run (checked before anything is loaded);
  existing files at the output paths are replaced, except with ``skip_existing`` (``--skip-existing``): then a
  film whose outputs are all there and newer than it is left out, so an interrupted batch continues where it
  stopped (every output is written whole or not at all, so one that is there is complete).
* Progress: a tqdm bar on stderr when it is a terminal, plain lines there when it is not (a log
  file, a pipe), or with ``--progress-lines`` the machine-readable ``PROGRESS`` / ``RESULT`` lines of
  ``XctDiffSlicer/XctDiffSlicerLib/PROTOCOL.md`` on stdout (flushed at once).
* One summary line per file (time, device, consistency, the seed of a diffusion run) on stdout;
  ``RESULT`` is the last line. Every line is one line: a path with a newline or another control
  character is written as a JSON string (always so with ``--progress-lines``), other text with
  escapes (:func:`one_line`), so no file name can forge a ``PROGRESS`` or ``RESULT`` line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

from ..errors import XctDiffError, a_few
from ..options import ReconstructOptions, turn_words
from . import batch_report

# Fractions of the whole command: loading the model, then the pipeline, then writing the files.
LOADED, WRITING = 0.05, 0.95


def one_line(text) -> str:
    """``text`` for a single output line: newlines and other unprintable characters as escapes (``\\n``)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


def path_text(path, protocol: bool = False) -> str:
    """A path in an output line: as it is when printable, else (and always in the protocol) a JSON string."""
    text = str(path)
    return json.dumps(text) if protocol or not text.isprintable() else text


@contextlib.contextmanager
def plain_warnings():
    """Warnings as one ``warning: <message>`` line on stderr (no file names, no source lines).

    The one way the CLI shows a warning: :func:`XctDiffCore.commands.cli.main` runs every command inside it, so
    that a library's warning (numpy, Pillow's DecompressionBombWarning) looks like the engine's own. A progress bar
    drawn meanwhile (tqdm's, when loaded) is lifted for the line and drawn again below it, where the line would have
    ended the bar's ("...reconstructing]warning: ...")."""

    def show(message, category, filename, lineno, file=None, line=None):
        bars = sys.modules.get("tqdm")  # not imported here: the parser stays quick to build
        lifted = bars.tqdm.external_write_mode(file=sys.stderr) if bars is not None else contextlib.nullcontext()
        with lifted:
            print(f"warning: {one_line(message)}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressDisplay:
    """``PROGRESS <fraction> <stage>`` lines on stdout (``lines``), else on stderr a tqdm bar when it is a
    terminal, or plain lines when it is not (a log file): one per stage and per tenth of the work, so
    that a log holds readable lines, not a pile of carriage returns (and without ``bar``: the ranks of a torchrun
    job, whose bars would overwrite each other on one terminal). Fractions never fall.

    ``films`` > 1 (a folder): the plain lines come once per tenth of the whole run alone, each naming the film under
    way (``film``), so a log of a thousand films is not a dozen lines per film beside its summary line."""

    def __init__(self, lines: bool, description: str = "reconstruct", stream=None, films: int = 1, bar: bool = True):
        self.lines, self.fraction, self.bar = lines, 0.0, None
        self.description, self.films, self.film = description, films, ""
        self.stream = sys.stderr if stream is None else stream
        self.start = time.monotonic()
        self._shown = None  # (tenth, stage name) of the last plain line
        if not lines and bar and _is_terminal(self.stream):
            from tqdm import tqdm

            # tqdm puts ", " before the postfix itself.
            self.bar = tqdm(total=1000, desc=description, file=self.stream, dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}")

    def __call__(self, fraction: float, stage: str) -> None:
        fraction = min(1.0, max(self.fraction, float(fraction)))
        stage = one_line(stage)
        if self.lines:
            print(f"PROGRESS {fraction:.4f} {stage}", flush=True)
        elif self.bar is not None:
            self.bar.update(round(fraction * 1000) - self.bar.n)
            self.bar.set_postfix_str(stage, refresh=True)
        else:
            key = (int(fraction * 10), re.sub(r" \d+/\d+$", "", stage))  # "sampling 3/50" -> "sampling"
            if self.films > 1 and 0.0 < fraction < 1.0:
                key, stage = (key[0],), f"{self.film}: {stage}" if self.film else stage
            if key != self._shown:
                self._shown = key
                elapsed = time.monotonic() - self.start
                print(f"{self.description}: {fraction * 100:3.0f}% {stage} "
                      f"({int(elapsed // 60):02d}:{int(elapsed % 60):02d})", file=self.stream, flush=True)
        self.fraction = fraction

    def scaled(self, low: float, high: float):
        """A callback for a part of the work that reports its own fraction in [0, 1]."""
        return lambda fraction, stage: self(low + (high - low) * fraction, stage)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def find_radiographs(folder: Path, recursive: bool = False) -> list:
    """Radiograph files in ``folder`` (``recursive``: and in its sub-folders, hidden ones skipped), sorted: by
    suffix, and DICOM files whatever their name (a PACS or DICOMDIR export names them without a suffix, or by
    their UID); hidden files and the DICOMDIR index skipped. DICOM slices of a CT (MR, PET, NM) series, as a
    study's export holds beside its films or as ``--format dicom`` wrote beside a film, are passed over with one
    warning line: each would have been an error line of its own; so are the DICOM objects that hold no image (the
    presentation states, key object selections and reports a PACS exports with a study's films), and in a DICOM
    export's sub-folders (below a folder holding a DICOMDIR) the image files that are not DICOM: the icons and
    pictures of the viewer a CD or PACS export ships beside its DICOM files. So are XctDiff's own outputs of an earlier run in
    the folder searched: its figures (views PNGs), which would have been reconstructed as chests, and its CTs and
    uncertainty maps (NRRD, NIfTI, MetaImage), each an error line of its own."""
    from ..figures import is_xctdiff_figure
    from ..io import (FILM_FILE_SUFFIXES, SITK_VOLUME_SUFFIXES, dicom_not_a_film, film_stem, is_dicom_file,
                      volume_notes, walk_below)

    slices = {}  # modality -> count of DICOM files that are a volume's slices
    objects = {}  # modality -> count of DICOM files that hold no image (PR, KO, SR...)
    figures, volumes = set(), set()  # XctDiff's own figures (views PNGs) and reconstructions
    viewer = set()  # image files that are not DICOM in a DICOM export's sub-folders: a viewer's, not films

    def is_film(p: Path) -> bool:
        if not p.is_file() or p.name.startswith(".") or p.name.upper() == "DICOMDIR":
            return False
        try:
            dicom = is_dicom_file(p)
        except XctDiffError:  # cannot be opened (a copy still being made): reading it as a film says so, one line
            return True
        if not dicom:
            if is_xctdiff_figure(p):
                figures.add(p)
                return False
            if p.name.lower().endswith(SITK_VOLUME_SUFFIXES) and {"note", "summary"} & set(volume_notes(p)):
                volumes.add(p)  # a CT or uncertainty map XctDiff wrote (a DRR it wrote is a film: its notes differ)
                return False
            if film_stem(p) != p.name and exports.intersection(p.parent.parents):  # in a sub-folder of an export
                viewer.add(p)
                return False
            return film_stem(p) != p.name or _empty_without_file_type(p)
        kind, modality = dicom_not_a_film(p)
        if kind:
            counts = slices if kind == "slices" else objects
            counts[modality] = counts.get(modality, 0) + 1
        return not kind

    def below() -> Iterator[Path]:  # the tree, hidden folders left out
        return (p for p in walk_below(folder) if not any(x.startswith(".") for x in p.relative_to(folder).parts[:-1]))

    entries = sorted(below() if recursive else folder.iterdir())
    exports = {p.parent for p in entries if p.name.upper() == "DICOMDIR" and p.is_file()}  # DICOM exports' tops
    files = [p for p in entries if is_film(p)]
    passed = ", ".join(f"{n} {m}" for m, n in sorted(slices.items()))
    imageless = ", ".join(f"{n} {m}" for m, n in sorted(objects.items()))
    own = [f"{len(found)} {what} that XctDiff wrote ({kind})" for found, what, kind in (
        (sorted(figures), "PNG figure" + "s" * (len(figures) > 1), "views, evaluation figures"),
        (sorted(volumes), "volume" + "s" * (len(volumes) > 1), "reconstructed CTs, uncertainty maps")) if found]
    examples = sorted(figures) + sorted(volumes)  # those of the folder searched (the hint below looks further)
    if not files:
        where = f"in {folder} or below it" if recursive else f"in {folder}"
        if not recursive and any(is_film(p) for p in below()):  # stops at the first one
            where += " (its sub-folders hold some: add --recursive)"
        elif passed or imageless or own or viewer:
            notes = [f"DICOM slices of volumes passed over: {passed}"] * bool(passed)
            notes += [f"DICOM files without an image passed over: {imageless}"] * bool(imageless)
            notes += [f"{len(viewer)} image files of a DICOM export that are not DICOM passed over"] * bool(viewer)
            where += f" ({'; '.join(notes + [f'{what} passed over' for what in own])})"
        raise XctDiffError(f"no radiograph files ({', '.join(FILM_FILE_SUFFIXES)}, or DICOM files) {where}")
    below_it = " or below it" if recursive else ""
    if passed:
        warnings.warn(f"passed over {sum(slices.values())} DICOM files in {folder}{below_it} "
                      f"that are slices of a volume, not radiographs ({passed})", stacklevel=2)
    if imageless:
        warnings.warn(f"passed over {sum(objects.values())} DICOM files in {folder}{below_it} "
                      f"that hold no image, not radiographs ({imageless})", stacklevel=2)
    if own:
        warnings.warn(f"passed over {' and '.join(own)} in {folder}{below_it}: not radiographs "
                      f"(e.g. {examples[0]})", stacklevel=2)
    if viewer:
        tops = sorted(top for top in exports if any(top in p.parents for p in viewer))
        where = (f"the DICOM export {tops[0]} (beside its DICOMDIR" if len(tops) == 1
                 else f"{len(tops)} DICOM exports below {folder} (beside their DICOMDIR")
        many = len(viewer) > 1
        warnings.warn(f"passed over {len(viewer)} image file{'s' * many} that {'are' if many else 'is'} not DICOM in "
                      f"{where}: a viewer's icons and pictures?), e.g. {sorted(viewer)[0]}: give their own folder to "
                      "reconstruct them", stacklevel=2)
    return files


def _empty_without_file_type(path: Path) -> bool:
    """A zero-byte file named as a PACS export names its DICOM films (``IM000002``, a UID ``1.2.840.5``): a film
    whose copy failed, counted so that it is skipped with its reason (``file is empty``), not passed over unseen."""
    try:
        return (not path.suffix or path.suffix[1:].isdigit()) and path.stat().st_size == 0
    except OSError:
        return False


def _refuse_shared_stems(files: list, output_format: Optional[str] = None) -> None:
    """Two radiographs with one stem in one folder (``a.png``, ``a.dcm``) would write one ``a_ct.nrrd``: the
    second would replace the first."""
    from ..io import film_stem
    from ..pipeline import default_output_path

    seen = {}
    for f in files:
        other = seen.setdefault((f.parent, film_stem(f)), f)
        if other is not f:
            raise XctDiffError(f"{other.name} and {f.name} in {f.parent} would both be written to "
                               f"{default_output_path(f, output_format).name}: rename one")


def default_batch_folder(folder: Path) -> Path:
    """Where a folder of films is reconstructed to without ``-o``: ``<folder>_ct`` beside it."""
    folder = Path(folder).resolve()  # "." and ".." have no name of their own
    return folder.with_name(folder.name + "_ct")


def _refuse_output_inside(folder: Path, outputs, recursive: bool) -> None:
    """The films' own folder as the output folder (or, with ``--recursive``, any folder inside it) mixes the
    CTs with the films: the next run of the same command would take them for films."""
    for out in outputs:
        if out is None:
            continue
        if out.resolve() == folder:
            raise XctDiffError(f"the output folder {out} is the input folder: give another one (default {folder.name}_ct)")
        if recursive and folder in out.resolve().parents:
            raise XctDiffError(f"with --recursive the output folder {out} must not lie inside the input folder {folder}")


def _refuse_outputs_searched(folder: Path, jobs: list, recursive: bool) -> None:
    """An output that lands where the films are searched (``folder`` itself, and with ``--recursive`` any folder
    below it) would be taken for a film by the next run: refused. The output folders' own checks miss one way:
    with ``--recursive`` into a folder above the films, a sub-folder named as the films' folder leads back into it."""
    for _, *outputs in jobs:
        for out in outputs:
            if out is not None and (folder in out.resolve().parents if recursive else out.resolve().parent == folder):
                raise XctDiffError(f"the output {out} would be written inside the input folder {folder}, where the next "
                                   "run would take it for a film: give an output folder outside it")


def _output_folder(path: Path, parents: bool = False) -> Path:
    if path.exists() and not path.is_dir():
        raise XctDiffError(f"the input is a folder, so the output must be a folder too, got the file {path}")
    if not parents and not path.parent.is_dir():
        raise XctDiffError(f"output folder does not exist: {path.parent}")
    from ..atomic import make_output_folder

    return make_output_folder(path, parents=parents)


def _refuse_overlaps(inputs: list, jobs: list) -> None:
    """Refuse an output that is an input (it would be destroyed) or another output of the run (one would
    replace the other): by file identity, so links and ``./`` spellings count."""
    from ..atomic import file_identity

    sources = {file_identity(f): f for f in inputs}
    written = {}
    for _, *outputs in jobs:
        for out in outputs:
            if out is None:
                continue
            key = file_identity(out)
            if key in sources:
                raise XctDiffError(f"the output {out} is the input {sources[key]}: write the output elsewhere")
            if key in written:
                raise XctDiffError(f"the outputs {written[key]} and {out} are the same file: give each its own path")
            written[key] = out


_PRELOADED: dict = {}  # model folder (resolved; "" the bundled one) -> a pipeline loaded ahead of its job


def _model_key(model) -> str:
    return str(Path(model).resolve()) if model else ""


def preload_model(model=None, warm_up: bool = True) -> None:
    """Load ``model`` (a folder; None: the bundled one) before the job that names it: ``xctdiff standby``.
    A folder that does not load is left to the job, which reports it as any run would."""
    from ..pipeline import XctDiffPipeline

    try:
        pipe = XctDiffPipeline.from_pretrained(model)
    except XctDiffError:
        return
    if warm_up:
        _warm_up(pipe)
    _PRELOADED[_model_key(model)] = pipe


def _warm_up(pipe) -> None:
    """One unseen reconstruction at the model's defaults, of its mean CT's DRR: a first run sets up its
    kernels and maps its memory (kept for the next run by the memory policy), which the job then skips.
    On the CPU only: a waiting process should not hold GPU memory that Slicer's views or another job need.
    Silent: its warnings (a device note, the film's checks) are the job's to give, about the job's film."""
    import numpy as np

    from ..device import choose_device

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if choose_device("auto").type != "cpu":
            return
        size = pipe.info.xray_size
        film = (pipe.render_drr(pipe._volume(pipe.mean_ct)) if pipe.mean_ct is not None
                else np.outer(np.hanning(size), np.hanning(size)).astype(np.float32))
        try:
            pipe.reconstruct(film, style="off")
        except XctDiffError:
            pass


def _load_pipeline(model, compile: bool):
    """The pipeline of ``model``: the one :func:`preload_model` loaded (taken: one job), else loaded now."""
    from ..pipeline import XctDiffPipeline

    preloaded = None if compile else _PRELOADED.pop(_model_key(model), None)
    return preloaded if preloaded is not None else XctDiffPipeline.from_pretrained(model, compile=compile)


def run_reconstruct(
    input_path,
    output=None,
    model=None,
    options: Optional[ReconstructOptions] = None,
    views=None,
    uncertainty=None,
    progress_lines: bool = False,
    cpu_fallback: bool = True,
    compile: bool = False,
    output_format: Optional[str] = None,
    recursive: bool = False,
    skip_existing: bool = False,
    report=None,
) -> int:
    """The ``xctdiff reconstruct`` command; returns the exit status (errors raise :class:`XctDiffError`).
    ``recursive``: a folder's sub-folders too, each film's outputs in the same sub-folder of the output folders.
    ``skip_existing``: leave out the films whose outputs are all there, newer than the film. ``report``: a CSV file
    of one row per film (:mod:`XctDiffCore.commands.batch_report`)."""
    from ..device import torchrun_rank
    from ..io import film_stem
    from ..pipeline import check_volume_output, default_output_path, reconstruct_file

    options = ReconstructOptions() if options is None else options  # checked when made: before the model loads
    device = options.device
    input_path = Path(input_path)
    if not input_path.exists():
        raise XctDiffError(f"file not found: {input_path}")
    if uncertainty is not None and options.samples < 2:  # the command line says so: before the model loads
        raise XctDiffError("an uncertainty map needs --samples 2 or more")
    if recursive and not input_path.is_dir():
        raise XctDiffError(f"--recursive searches a folder, got the file {input_path}")
    rank, world_size, local_rank = torchrun_rank()
    jobs = []  # (input, output, uncertainty, views)
    if input_path.is_dir():
        found = find_radiographs(input_path, recursive)
        _refuse_shared_stems(found, output_format)
        files = found[rank::world_size]
        folder = input_path.resolve()  # "." and ".." have no name of their own
        out_dir = Path(output) if output else default_batch_folder(folder)
        unc_dir = Path(uncertainty) if uncertainty else None
        views_dir = Path(views) if views else None
        _refuse_output_inside(folder, (out_dir, unc_dir, views_dir), recursive)
        for f in files:
            stem, sub = film_stem(f), f.parent.relative_to(input_path)  # sub: "." unless recursive (f may be a link)
            jobs.append((f, out_dir / sub / default_output_path(f, output_format).name,
                         unc_dir / sub / f"{stem}_uncertainty.nrrd" if unc_dir else None,
                         views_dir / sub / f"{stem}_views.png" if views_dir else None))
        _refuse_overlaps(found, jobs)
        _refuse_outputs_searched(folder, jobs, recursive)
        share = f"rank {rank} of {world_size}: " if world_size > 1 else ""  # under torchrun: this process's share
        planned, jobs = jobs, (_left_to_do(jobs, share) if skip_existing else jobs)  # all done: no folder need be
        # made or writable
        for top in (out_dir, unc_dir, views_dir):
            if top is not None and (jobs or not skip_existing):  # a torchrun rank without films makes them too
                _output_folder(top)
                for sub in sorted({source.parent.relative_to(input_path) for source, *_ in jobs} - {Path(".")}):
                    _output_folder(top / sub, parents=True)
        if output_format == "dicom":  # each series folder: before any work, not after the first reconstruction
            for _, out, *_ in jobs:
                check_volume_output(out, output_format)
        if report is not None and rank == 0:  # rank 0 writes it: its folder there and writable, before any work
            _check_report(report, found, planned)
        if world_size > 1 and device in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{local_rank % torch.cuda.device_count()}"
    else:
        if rank != 0:  # one film is rank 0's: every rank would write the same files at once
            print(f"rank {rank} of {world_size}: one radiograph, reconstructed by rank 0", file=sys.stderr, flush=True)
            return 0
        from ..atomic import check_output_path
        from ..io import read_radiograph

        output = Path(output) if output else default_output_path(input_path, output_format)
        jobs.append((input_path, output, Path(uncertainty) if uncertainty else None, Path(views) if views else None))
        _refuse_overlaps([input_path], jobs)
        planned, jobs = jobs, (_left_to_do(jobs) if skip_existing else jobs)
        if report is not None:
            _check_report(report, [input_path], planned)
        if jobs:  # fail before loading the model, on the outputs (folder there and writable) ...
            check_volume_output(output, output_format)
            for extra in jobs[0][2:]:
                if extra is not None:
                    check_output_path(extra)
            from ..preprocess import check_radiograph_aspect

            # ... and on the input (read again by the pipeline: a few ms)
            check_radiograph_aspect(read_radiograph(input_path).image.shape, f"radiograph {input_path}")

    def named(path) -> str:  # as below the folder: with --recursive two sub-folders may hold one name
        return str(Path(path).relative_to(input_path)) if input_path.is_dir() else Path(path).name

    rows = [batch_report.row(named(job[0]), "already done", job[1]) for job in planned if job not in jobs]
    if skip_existing and not jobs and world_size == 1:  # every output current (a torchrun rank goes on: its
        if report is not None:  # RESULT is awaited, and the other ranks wait for it at the end)
            _write_report(report, rows)
        return 0
    display = ProgressDisplay(progress_lines, description=f"rank {rank}" if world_size > 1 else "reconstruct",
                              films=len(jobs), bar=world_size == 1)
    results, failures, shown = [], [], set()  # shown: the warnings about the run given so far
    started = time.perf_counter()
    with plain_warnings():
        try:
            display(0.0, "loading model")
            pipe = _load_pipeline(model, compile) if jobs else None  # a torchrun rank without films loads none
            display(LOADED, "model loaded")
            for i, (source, out, unc, view) in enumerate(jobs):
                low = LOADED + (WRITING - LOADED) * i / len(jobs)
                high = LOADED + (WRITING - LOADED) * (i + 1) / len(jobs)
                start = time.perf_counter()
                display.film = f"film {i + 1} of {len(jobs)}"
                held = []  # a folder's warnings, shown when its film is done (_show_held_warnings)
                try:
                    with _held_warnings(held) if input_path.is_dir() else contextlib.nullcontext():
                        result, written = reconstruct_file(
                            pipe, source, out, uncertainty=unc, views=view, output_format=output_format,
                            options=dataclasses.replace(options, device=device),
                            progress=display.scaled(low, high), cpu_fallback=cpu_fallback,
                        )
                except XctDiffError as exc:
                    _show_held_warnings(held, source, None, shown)
                    if len(jobs) == 1 and world_size == 1:
                        raise
                    if _output_disk_refuses(exc):
                        raise XctDiffError(
                            f"{exc}: stopped here, as every later film would fail alike ({len(results)} of {len(jobs)} "
                            f"reconstructed); make room, then the same command with --skip-existing continues with "
                            f"the other {len(jobs) - len(results)}") from exc
                    failures.append(source)
                    rows.append(batch_report.row(named(source), "skipped", reason=one_line(exc)))
                    print(f"skipped {path_text(source)}: {one_line(exc)}", file=sys.stderr, flush=True)
                    continue
                _show_held_warnings(held, source, result.warnings, shown)
                result.timings["load"] = pipe.load_seconds
                seconds = time.perf_counter() - start
                results.append((source, written, result))
                rows.append(batch_report.row(named(source), "reconstructed", written[0], result, seconds))
                _print_line(display, summary_line(source, written[0], seconds, result, protocol=progress_lines))
            display(1.0, "done")
        except BaseException as exc:
            display.close()
            if input_path.is_dir() and not isinstance(exc, Exception):  # Ctrl-C, SIGTERM: what is done, how to go on
                share = f"rank {rank} of {world_size}: " if world_size > 1 else ""  # each says its own share
                print(share + stopped_batch_line(results, failures, len(jobs), time.perf_counter() - started),
                      file=sys.stderr, flush=True)
                if report is not None and world_size == 1:  # what is done, and what is not (torchrun's ranks do not
                    finished = {row["film"] for row in rows}  # meet once stopped: no report then)
                    _write_report(report, rows + [batch_report.row(named(source), "not reached")
                                                  for source, *_ in jobs if named(source) not in finished])
            raise
        finally:
            display.close()
    if progress_lines:
        print("RESULT " + json.dumps(_result_record(results, failures, batch=input_path.is_dir())), flush=True)
    if not input_path.is_dir():
        if report is not None:
            _write_report(report, rows)
        return 0
    record = {"done": len(results), "warned": [named(source) for source, _, result in results if result.warnings],
              "failed": [named(source) for source in failures], "films": len(jobs), "rows": rows}  # JSON: it may
    ranks = _gather_at_rank_0(record, rank, world_size)  # cross torchrun's store
    if ranks is None:  # one process (or a rank on its own): its share is the whole
        ranks = [record]
    elif rank != 0:
        return 0  # rank 0 tells the whole folder's outcome, and ends with its status
    failed = sorted(f for r in ranks for f in r["failed"])
    print(batch_tally(sum(r["done"] for r in ranks), sorted(f for r in ranks for f in r["warned"]), failed,
                      sum(r["films"] for r in ranks), time.perf_counter() - started,
                      processes=world_size if len(ranks) > 1 else 1), file=sys.stderr, flush=True)
    if report is not None:
        _write_report(report, [row for r in ranks for row in r["rows"]])
    if failed:
        raise XctDiffError(f"{len(failed)} of {sum(r['films'] for r in ranks)} radiographs could not be reconstructed "
                           "(see the lines above)")
    return 0


@contextlib.contextmanager
def _held_warnings(into: list):
    """The warnings given meanwhile, into the list ``into`` instead of the screen, every one (not once per place)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            into.extend(caught)


def _show_held_warnings(held: list, source, about_the_film, shown: set) -> None:
    """A folder's film's warnings, when it is done: those about the film (``about_the_film``, its result's warnings;
    None: all but the run's own, for a film that failed) name it, each film's every time; the others, about the run
    (--steps with the direct method), once a run. Python's own rule, once per place, showed one line for eight films
    with the same warning, and no film's name: under torchrun two processes' lines interleave."""
    for caught in held:
        text = str(caught.message)
        if text in shown:
            continue
        if about_the_film is None or text in about_the_film:
            text = f"{path_text(source)}: {text}"
        else:
            shown.add(text)
        warnings.showwarning(text, caught.category, caught.filename, caught.lineno)


def _output_disk_refuses(exc: XctDiffError) -> bool:
    """Whether a film failed because its output's disk takes no more (full, a quota, read-only, ``ulimit -f``): every
    later film would be reconstructed only to fail alike, so the folder stops at the first."""
    import errno
    import os

    text = str(exc)
    reasons = [os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)]
    return text.startswith("cannot write ") and any(reason in text for reason in reasons + ["is the disk full"])


def _gather_at_rank_0(record, rank: int, world_size: int) -> Optional[list]:
    """Under torchrun: give rank 0 every rank's ``record`` once it has done its share of the folder (the other ranks
    get an empty list; None where torchrun's own store is not there to meet in: ranks started by hand).

    Why: torchrun stops every process (SIGTERM) as soon as one ends with a non-zero status, so a rank whose share
    held a bad film, ending first, stopped the other ranks' reconstructions midway. Now the other ranks leave their
    record in the store of torchrun's agent (it outlives them) and end with 0; rank 0, last, ends with the status of
    the whole folder and its tally. Rank 0 waits by looking every fraction of a second, not in a collective, so
    that Ctrl-C or SIGTERM stops it at once (a gloo barrier held it until torchrun's SIGKILL, 30 s later)."""
    from ..device import agent_store

    found = agent_store(timeout_s=300) if world_size > 1 else None
    if found is None:
        return None
    store, prefix = found[0], f"xctdiff-reconstruct/{found[1]}"
    if rank != 0:
        store.set(prefix + str(rank), json.dumps(record))
        return []
    keys = [prefix + str(other) for other in range(1, world_size)]
    while not store.check(keys):
        time.sleep(0.2)
    return [record] + [json.loads(store.get(key)) for key in keys]


def _check_report(report, films: list, jobs: list) -> None:
    """The report's folder there and writable, and the report neither a film nor an output of the run (it would
    replace it): before any work."""
    from ..atomic import check_output_path, file_identity

    check_output_path(report)
    taken = {file_identity(p): p for p in [*films, *(p for job in jobs for p in job[1:] if p is not None)]}
    if file_identity(report) in taken:
        raise XctDiffError(f"the report {report} is {taken[file_identity(report)]}, a file of the run: write it elsewhere")


def _write_report(path, rows: list) -> None:
    print(f"report: {path_text(batch_report.write_report(path, rows))} (one row per radiograph)", file=sys.stderr,
          flush=True)


def _outputs_current(source: Path, *outputs: Optional[Path]) -> bool:
    """Whether every output asked for (the CT; the uncertainty and views when given) is there and no older
    than the film: written by an earlier run of the same job, whole (outputs are written atomically); and, where the
    CT's header records its film (NRRD, MetaImage), made from a film of the size and SHA-256 it has now (one replaced
    under the same name and an older date, by ``cp -p`` or an archive, is not its film; a CT of an earlier version
    records the size alone)."""
    from ..atomic import file_sha256
    from ..io import volume_notes

    try:
        film = source.stat()
        if not all(path.stat().st_mtime_ns >= film.st_mtime_ns for path in outputs if path is not None):
            return False
        notes = volume_notes(outputs[0])
        if notes.get("film_bytes", str(film.st_size)) != str(film.st_size):
            return False
        return notes.get("film_sha256") in (None, file_sha256(source))
    except OSError:
        return False


def _left_to_do(jobs: list, share: str = "") -> list:
    """``--skip-existing``: the jobs whose outputs are not all there newer than the film; says how many it left out
    (``share``: which torchrun process's films these are)."""
    current = [_outputs_current(*job) for job in jobs]
    if any(current):
        print(f"{share}left out {sum(current)} of {len(jobs)} radiographs: their outputs are there, newer than the film "
              "(--skip-existing)", file=sys.stderr, flush=True)
    return [job for job, done in zip(jobs, current) if not done]


def summary_line(source, output, seconds: float, result, protocol: bool = False) -> str:
    """``<input> -> <output> in <s> s on <device> in <precision>, consistency <c>, seed <seed>``: the seed of a
    diffusion run (given or drawn) reproduces it with ``--seed``; the direct method has none to give. The
    precision says which arithmetic ``--precision auto`` chose (bf16 or fp32), as RESULT does."""
    seed = f"seed {result.seed}" if result.method == "diffusion" else "direct method (no seed)"
    guided = ""
    if result.unguided_consistency is not None:  # guidance asked for: the score before it says more
        guided = (f" (guided {result.guidance:g}; {result.unguided_consistency:.3f} unguided)" if result.guidance
                  else " (guidance skipped)")
    depth = ""
    if result.ap_diameter is not None and result.learnt_ap_diameter is not None:
        depth = f", AP diameter {result.learnt_ap_diameter:.0f} -> {result.ap_diameter:g} mm"
    precision = getattr(result, "precision", None)
    arithmetic = f" in {precision}" if precision else ""
    handled = turn_words(getattr(result, "turn", "none"), getattr(result, "mirrored", False))
    handled = f", film {handled}" if handled else ""
    return (f"{path_text(source, protocol)} -> {path_text(output, protocol)} in {seconds:.1f} s on "
            f"{one_line(result.device)}{arithmetic}, consistency {result.consistency:.3f}{guided}, {seed}{depth}"
            f"{handled}")


def _print_line(display: ProgressDisplay, text: str) -> None:
    if display.bar is not None:
        display.bar.write(text, file=sys.stdout)
    else:
        print(text, flush=True)


def batch_tally(done: int, flagged: list, skipped: list, total: int, seconds: float, processes: int = 1) -> str:
    """The last line of a folder's run: how many films were reconstructed (``done``), in what time, and which were
    flagged and which skipped (names: their lines are above, among hundreds of lines, and under torchrun among
    several processes' lines), so a long batch need not be read line by line."""
    line = f"reconstructed {done} of {total} radiographs in {seconds:.0f} s"
    line += f" by {processes} processes" if processes > 1 else ""
    line += f" ({seconds / done:.1f} s each, the model's loading included)" if done else ""
    if flagged:
        line += f"; {len(flagged)} with warnings (above): {a_few(flagged, 5)}"
    return line + (f"; {len(skipped)} skipped (above): {a_few(skipped, 5)}" if skipped else "")


def stopped_batch_line(results: list, failures: list, total: int, seconds: float) -> str:
    """The tally of a folder's run that Ctrl-C or SIGTERM stopped, and how to go on: every CT finished is whole
    (written atomically), so ``--skip-existing`` continues with the rest instead of reconstructing all again."""
    flagged = [Path(source).name for source, _, result in results if result.warnings]
    tally = batch_tally(len(results), flagged, [Path(f).name for f in failures], total, seconds)
    return f"stopped: {tally}; the same command with --skip-existing continues with the {total - len(results)} not reconstructed"


def _result_record(results: list, failures: list, batch: bool = False) -> dict:
    """The ``RESULT`` object: the protocol's keys for one file; for a folder, also every file's summary.

    A folder always gets the folder form (``cases``, ``failed``), even when it (or this torchrun rank's
    share of it) holds a single radiograph, so that readers of the line need not guess its shape.
    """
    if not batch and len(results) == 1 and not failures:
        source, written, result = results[0]
        return {**result.summary(), "output": str(written[0]), "files": [str(p) for p in written]}
    return {
        "consistency": sum(r.consistency for _, _, r in results) / len(results) if results else None,
        "timings": {},
        "device": results[0][2].device if results else "",
        "cases": [{"input": str(s), "output": str(w[0]), **r.summary()} for s, w, r in results],
        "failed": [str(f) for f in failures],
    }
