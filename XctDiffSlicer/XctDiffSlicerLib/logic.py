"""Reconstruction logic bound to one MRML scene: radiograph node in, CT node (and uncertainty) out.

:meth:`ReconstructionLogic.start` writes the radiograph node to a temporary file and starts the
engine's child process (PROTOCOL.md); the panel polls the returned :class:`ReconstructionJob` from a
timer and calls :meth:`ReconstructionLogic.load_result` when it has finished.
:meth:`ReconstructionLogic.reconstruct` is the same thing blocking, for the Python console.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from XctDiffCore.config import METHODS as ENGINE_METHODS
from XctDiffCore.errors import XctDiffError
from XctDiffCore.io import SYNTHETIC
from XctDiffCore.options import TURN_PHRASES, TURNS, ReconstructOptions, turn_words

from . import mrml_bridge
from .models import MANIFEST_NAME, ModelChoice, choose_model
from .process import ChildProcess, Finished, Progress, engine_environment, python_executable

METHODS = ("default", *ENGINE_METHODS)  # "default": the model's own (the bundled one: direct)
OUTPUT_NAME = "ct.nrrd"
STANDBY_VARIABLE = "XCTDIFF_STANDBY"  # "0" (or false, no, off): no engine started ahead of the next job
STANDBY_OFF = ("0", "false", "no", "off")
JOB_NAME = "job.json"  # what a standby engine waits for in its folder (PROTOCOL.md)
UNCERTAINTY_NAME = "uncertainty.nrrd"


def core_parent_folder() -> str:
    """The folder that holds the ``XctDiffCore`` package in use (installed beside the module, or the repository)."""
    import XctDiffCore

    return str(Path(XctDiffCore.__file__).resolve().parent.parent)


@dataclass(frozen=True)
class ReconstructionOptions:
    """What the panel's parameter node holds, with the engine's names; None: the engine's default.

    Everything but the model choice and the panel's "default" method is the engine's own
    :class:`~XctDiffCore.options.ReconstructOptions`: checked there, turned into the child's
    command line there (one definition of each option, its default and its range).
    """

    steps: Optional[int] = None
    samples: int = 1
    seed: Optional[int] = None
    device: str = "auto"
    style: str = "auto"
    model: ModelChoice = field(default_factory=choose_model)
    method: str = "default"
    guidance: float = 0.0  # data consistency, 0 (off) to 1 (the DRR of the result fitted to the film)
    precision: str = "auto"  # the networks' arithmetic: auto, fp32 or bf16 (the engine's PRECISIONS)
    coarse: str = "auto"  # auto: the direct path averages in the model's coarse CT when it has one; off: decoder alone
    ap_diameter: Optional[float] = None  # the chest's front-to-back diameter in mm when known; None: the model's depth
    turn: str = "none"  # stand the film head up first (the engine's TURNS: none, auto, anticlockwise, half, clockwise)
    mirror: bool = False  # flip the film left to right first (a film saved mirrored)

    def __post_init__(self):
        if self.method not in METHODS:
            raise XctDiffError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        object.__setattr__(self, "model", choose_model(self.model))  # a folder's path or None (bundled) too
        self.engine_options()  # the engine's checks, before any process starts

    def engine_options(self) -> ReconstructOptions:
        return ReconstructOptions(steps=self.steps, samples=self.samples, seed=self.seed, device=self.device,
                                  style=self.style, method=None if self.method == "default" else self.method,
                                  guidance=self.guidance, precision=self.precision, coarse=self.coarse,
                                  ap_diameter=self.ap_diameter, turn=self.turn, mirror=self.mirror)

    def engine_arguments(self) -> list:
        return self.engine_options().to_argv() + self.model.engine_arguments()


@dataclass
class ReconstructionJob:
    """A running reconstruction: its child process and the temporary folder of its files."""

    process: ChildProcess
    folder: Path
    input_name: str
    options: ReconstructionOptions
    input_node_id: str = ""  # where the results are filed (the film's subject hierarchy folder: its DICOM study)

    @property
    def output_path(self) -> Path:
        return self.folder / OUTPUT_NAME

    @property
    def uncertainty_path(self) -> Path:
        return self.folder / UNCERTAINTY_NAME

    def cancel(self) -> None:
        self.process.cancel()

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def discard(self, timeout: float = 5.0) -> None:
        """Kill the child, wait for it to be gone, and remove the temporary folder (the radiograph
        written for it, any partial output): what leaving a running job behind must do."""
        self.process.cancel()
        self.process.join(timeout)
        self.cleanup()


@dataclass(frozen=True)
class ReconstructionOutput:
    ct_node: object
    uncertainty_node: Optional[object]
    consistency: Optional[float]
    device: str
    timings: dict
    seed: Optional[int] = None  # the seed the engine used (given or drawn): the same seed repeats the run
    method: str = ""  # "diffusion" or "direct" (direct has no randomness: its seed means nothing)
    unguided_consistency: Optional[float] = None  # with guidance: the consistency before it (the honest score)
    warnings: tuple = ()  # the engine's reasons to trust the result less (an implausible film, skipped guidance)
    ap_diameter: Optional[float] = None  # the AP diameter given, which the CT was stretched to (mm)
    learnt_ap_diameter: Optional[float] = None  # the reconstruction's own before (mm)
    turn: str = "none"  # how the engine turned the film before reconstructing (auto resolved)
    mirrored: bool = False  # whether it flipped it left to right first


class ReconstructionLogic:
    """Runs the engine for radiograph nodes of ``scene``; ``engine_command`` is the command that speaks
    PROTOCOL.md without its ``reconstruct ...`` arguments (default: ``python -m XctDiffCore``);
    ``dicom_file_for`` maps a DICOM SOP instance UID to its file (Slicer's DICOM database), so that a film
    loaded through the DICOM module reaches the engine as its file (:func:`mrml_bridge.source_file`).

    ``standby`` (default: on for the real engine, unless ``XCTDIFF_STANDBY=0``): :meth:`prepare_standby`
    starts the next job's engine ahead (``xctdiff standby``: torch imported, the model loaded, one unseen
    reconstruction run so its kernels and memory are ready), and :meth:`start` hands it the job. On the
    2-core CPU the sample film's CT node then comes 4.0-4.8 s after the click instead of 6.2-8.6 s
    (``Testing/Scripts/click_to_ct.py``); the idle engine holds
    about 0.8 GiB and leaves after 30 idle minutes. The panel prepares one when it opens and after each
    job; a console script only when it calls :meth:`prepare_standby`. :meth:`shutdown` stops it, and so does
    dropping the logic."""

    def __init__(self, scene, engine_command: Optional[Sequence[str]] = None,
                 dicom_file_for: Optional[Callable[[str], str]] = None, standby: Optional[bool] = None):
        self.scene = scene
        self.engine_command = list(engine_command) if engine_command else [python_executable(), "-m", "XctDiffCore"]
        self.dicom_file_for = dicom_file_for
        if standby is None:
            off = os.environ.get(STANDBY_VARIABLE, "1").strip().lower() in STANDBY_OFF
            standby = engine_command is None and not off
        self.standby = standby
        self._standby: Optional[tuple] = None  # (what it was started for, its folder, its ChildProcess)
        remove_stale_job_folders()

    def _standby_key(self, model: ModelChoice) -> tuple:
        environment = engine_environment(core_parent_folder())
        return (tuple(self.engine_command), tuple(model.engine_arguments()), tuple(sorted(environment.items())),
                _manifest_stamp(model))

    def prepare_standby(self, model: ModelChoice) -> None:
        """Start an engine for the next reconstruction with ``model``, unless one is ready (or standby is off).
        It waits for ``job.json`` in its own temporary folder, which becomes its job's folder."""
        if not self.standby:
            return
        model = choose_model(model)
        key = self._standby_key(model)
        if self._standby is not None and self._standby[0] == key and self._standby[2].running:
            return
        self.shutdown()
        try:
            folder = Path(tempfile.mkdtemp(prefix="xctdiff-"))
        except OSError:  # an unwritable temporary folder: no engine ahead; the click reports it
            return
        command = self.engine_command + ["standby", "--job-file", str(folder / JOB_NAME), "--parent-pid", str(os.getpid()),
                                         *model.engine_arguments()]
        try:
            process = ChildProcess(command, env=dict(key[2])).start()
        except OSError:  # no engine ahead then: the click starts one and reports what stops it
            shutil.rmtree(folder, ignore_errors=True)
            return
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._standby = (key, folder, process)

    def _take_standby(self, model: ModelChoice) -> Optional[tuple]:
        """``(folder, process)`` of the standby engine when it was started for this model and environment and
        still runs; else None (and a mismatched or ended one is stopped and its folder removed)."""
        if self._standby is None:
            return None
        key, folder, process = self._standby
        self._standby = None
        if key == self._standby_key(model) and process.running:
            return folder, process
        process.cancel()
        shutil.rmtree(folder, ignore_errors=True)
        return None

    def __del__(self):  # a logic dropped without shutdown() (a console script) leaves no engine waiting
        if getattr(self, "_standby", None) is not None:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop the standby engine, if any (leaving the module, closing Slicer, another model chosen)."""
        if self._standby is not None:
            _, folder, process = self._standby
            self._standby = None
            process.cancel()
            process.join(5.0)
            shutil.rmtree(folder, ignore_errors=True)

    def start(self, input_node, options: ReconstructionOptions, output_node=None,
              uncertainty_node=None) -> ReconstructionJob:
        """Start a job for ``input_node``; the output nodes it will be loaded into, when given, are checked first
        (:meth:`load_result` checks them again: they may change while it runs)."""
        self._check_input_node(input_node)
        self._check_output_nodes(output_node, uncertainty_node, input_node.GetID())
        source = mrml_bridge.source_file(input_node, self.dicom_file_for)
        # a node that is no film is refused before the waiting engine is taken (it would be lost to the error)
        film = mrml_bridge.radiograph_from_node(input_node) if source is None else None
        if film is not None:  # its size and NaN said with the node's name, before anything is written
            from XctDiffCore.io import check_radiograph_image

            check_radiograph_image(film[0], f"'{input_node.GetName()}'")
        standby = self._take_standby(options.model)
        try:
            folder, process = standby if standby is not None else (Path(tempfile.mkdtemp(prefix="xctdiff-")), None)
        except OSError as exc:  # FileNotFoundError: no usable temporary folder at all (gettempdir raises too)
            from XctDiffCore.atomic import temporary_folder_problem

            problem = temporary_folder_problem()
            raise XctDiffError(f"cannot make a temporary folder for the job: {problem}" if problem else
                               f"cannot make a temporary folder for the job in {tempfile.gettempdir()}: "
                               f"{exc.strerror or exc}") from None
        try:
            radiograph_path = source or mrml_bridge.write_radiograph_file(input_node, folder / "radiograph.nrrd", film)
            arguments = [str(radiograph_path), "-o", str(folder / OUTPUT_NAME), "--progress-lines"]
            if options.samples >= 2:
                arguments += ["--uncertainty", str(folder / UNCERTAINTY_NAME)]
            arguments += self._resolved_style(input_node, options).engine_arguments()
            if process is not None and not _hand_over(folder, arguments):
                process.cancel()  # it gave up waiting in this very instant (PROTOCOL.md): a fresh engine instead
                process = None
            if process is None:
                process = ChildProcess(self.engine_command + ["reconstruct", *arguments],
                                       env=engine_environment(core_parent_folder())).start()
        except BaseException as exc:
            if process is not None:
                process.cancel()
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, OSError):  # the job file on a full disk; an engine command that cannot run
                where = f": {exc.filename}" if exc.filename else ""
                raise XctDiffError(f"cannot prepare the job: {exc.strerror or exc}{where}") from None
            raise
        return ReconstructionJob(process, folder, input_node.GetName(), options, input_node.GetID() or "")

    def _check_input_node(self, node) -> None:
        """A volume node of this scene, or one sentence (a name typed for a node, a model, a removed node)."""
        if node is None:
            raise XctDiffError("select an input radiograph first")
        if not _is_node(node, "vtkMRMLVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise XctDiffError(f"{_describe(node)} is not a radiograph: choose the volume node of a film")
        if not self.scene.IsNodePresent(node):
            raise XctDiffError(f"'{node.GetName()}' is not in the scene (was it removed?): choose a film of the scene")

    def _check_output_nodes(self, output_node, uncertainty_node, input_node_id: str) -> None:
        """Nodes the results can go to, before any is touched: a plain volume of this scene, not the film, empty or
        made by XctDiff (never a scan, which would be lost under its own name), and not one node for both the CT and
        its uncertainty."""
        for node in (output_node, uncertainty_node):
            if node is None:
                continue
            if not _is_node(node, "vtkMRMLNode"):
                raise XctDiffError(f"an output must be a volume node, or None for a new one; got {_describe(node)}")
            if node.GetClassName() != "vtkMRMLScalarVolumeNode":
                raise XctDiffError(f"'{node.GetName()}' ({node.GetClassName()}) cannot hold a CT: choose a plain "
                                   "volume or \"Create new volume\"")
            if not self.scene.IsNodePresent(node):
                raise XctDiffError(f"'{node.GetName()}' is not in the scene (was it removed?): choose another output "
                                   "or \"Create new volume\"")
            if input_node_id and node.GetID() == input_node_id:
                raise XctDiffError(f"'{node.GetName()}' is the input film: choose another output or "
                                   "\"Create new volume\"")
            if node.GetImageData() is not None and node.GetAttribute(ATTRIBUTE_SYNTHETIC) != "1":
                raise XctDiffError(f"'{node.GetName()}' holds a volume XctDiff did not make (a scan?), which the "
                                   "result would replace: choose \"Create new volume\" or a CT XctDiff made")
        if output_node is not None and output_node is uncertainty_node:
            raise XctDiffError(f"'{output_node.GetName()}' cannot hold both the CT and its uncertainty: "
                               "choose two nodes")

    @staticmethod
    def _resolved_style(input_node, options: ReconstructionOptions) -> ReconstructionOptions:
        """A DRR node needs no real-to-DRR style transfer: "auto" becomes "off" for it."""
        if options.style == "auto" and input_node.GetAttribute(mrml_bridge.ATTRIBUTE_IS_DRR) == "1":
            return dataclasses.replace(options, style="off")
        return options

    def load_result(self, job: ReconstructionJob, finished: Finished, output_node=None,
                    uncertainty_node=None) -> ReconstructionOutput:
        """Turn a finished job into nodes (then delete its files); a failure or cancel raises XctDiffError, and
        then no node is left half made: a new one is removed, and a given node that cannot hold a CT (a label
        map, the film itself, a node removed from the scene meanwhile) is refused before it is touched."""
        if not isinstance(finished, Finished):  # the job's files are kept: it may still be running
            raise XctDiffError(f"load_result takes the job's Finished event (job.process.wait()), got {finished!r}")
        made = []
        try:
            if not finished.succeeded:
                raise XctDiffError(finished.error or f"reconstruction {finished.status}")
            result = _result_fields(finished.result)  # checked before any node is touched
            self._check_output_nodes(output_node, uncertainty_node, job.input_node_id)
            # the engine's warnings stay with the nodes (saved with the scene): the panel shows the last run's alone
            warned = "".join(f"; warning: {warning}" for warning in result["warnings"])
            ct_node = self._read_output(job.output_path, output_node, f"{job.input_name} {SYNTHETIC_CT}", made,
                                        SYNTHETIC + warned)
            mrml_bridge.set_ct_window(ct_node)
            if job.uncertainty_path.is_file():
                uncertainty_node = self._read_output(job.uncertainty_path, uncertainty_node,
                                                     f"{job.input_name} uncertainty (XctDiff)", made,
                                                     f"voxel-wise std over the samples of a {SYNTHETIC}{warned}")
                mrml_bridge.set_uncertainty_display(uncertainty_node)
            else:
                if uncertainty_node is not None:  # an earlier run's map, beside a CT it no longer belongs to
                    self._mark_earlier(uncertainty_node, ct_node)
                uncertainty_node = None
            film = self.scene.GetNodeByID(job.input_node_id) if job.input_node_id else None
            for node in (ct_node, uncertainty_node):
                if node is not None:
                    mrml_bridge.file_beside(self.scene, node, film)
        except BaseException as exc:
            for node in made:
                self.scene.RemoveNode(node)
            if isinstance(exc, (OSError, RuntimeError)):  # an unreadable output file (SimpleITK, the disk)
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                raise XctDiffError(f"the reconstruction could not be loaded: {reason}") from None
            raise
        finally:
            job.cleanup()
        return ReconstructionOutput(ct_node=ct_node, uncertainty_node=uncertainty_node, **result)

    def _mark_earlier(self, uncertainty_node, ct_node) -> None:
        """An uncertainty map given to a run that made none (one sample) belongs to the CT that run replaced:
        renamed and described as an earlier run's, so that nobody reads it as the new CT's."""
        suffix = " (earlier run)"
        if uncertainty_node.GetAttribute(ATTRIBUTE_MADE_FOR) is None or uncertainty_node.GetName().endswith(suffix):
            return  # not a map XctDiff made (left alone), or marked already
        uncertainty_node.SetName(self.scene.GenerateUniqueName(uncertainty_node.GetName() + suffix))
        uncertainty_node.SetDescription(f"of an earlier reconstruction, not of the CT now in '{ct_node.GetName()}': "
                                        + (uncertainty_node.GetDescription() or ""))

    def _read_output(self, path, node, name: str, made: list, description: str = SYNTHETIC):
        """An output file into ``node``, or into a new node (listed in ``made``) named after the film. A node
        an earlier film's CT was made in is renamed for this one (its old name would name another patient).
        Either way it is marked as no scan (an attribute, and ``description`` in its description)."""
        if node is None:
            node = mrml_bridge.read_volume_file(self.scene, path, None, name)
            made.append(node)
        else:
            earlier = node.GetAttribute(ATTRIBUTE_MADE_FOR)
            mrml_bridge.read_volume_file(self.scene, path, node, name)
            if earlier is not None and earlier != name:
                node.SetName(self.scene.GenerateUniqueName(name))
        node.SetAttribute(ATTRIBUTE_MADE_FOR, name)
        node.SetAttribute(ATTRIBUTE_SYNTHETIC, "1")
        node.SetDescription(description)  # what the file said (io.volume_notes), kept where the scene keeps it
        return node

    def reconstruct(self, inputNode, outputNode=None, steps: Optional[int] = None, samples: int = 1,
                    seed: Optional[int] = None, device: str = "auto", style: str = "auto", model=None,
                    uncertaintyNode=None, progress: Optional[Callable[[float, str], None]] = None,
                    method: str = "default", guidance: float = 0.0, precision: str = "auto", coarse: str = "auto",
                    ap_diameter: Optional[float] = None, turn: str = "none", mirror: bool = False):
        """Blocking reconstruction for the Python console; returns the output CT node. ``ap_diameter``: the
        chest's front-to-back diameter in mm when known (a frontal film does not show it); ``turn``
        (``"auto"``, ``"anticlockwise"``, ``"half"``, ``"clockwise"``) and ``mirror`` stand a film the wrong way
        round head up first."""
        options = ReconstructionOptions(steps, samples, seed, device, style, model, method, guidance,
                                        precision, coarse, ap_diameter, turn, mirror)
        if progress is not None and not callable(progress):
            raise XctDiffError(f"progress must be a function of (fraction, stage), got {progress!r}")
        self._check_input_node(inputNode)
        self._check_output_nodes(outputNode, uncertaintyNode, inputNode.GetID())  # before the minutes of a run
        job = self.start(inputNode, options)

        def on_event(event):
            if progress is not None and isinstance(event, Progress):
                progress(event.fraction, event.stage)

        try:
            finished = job.process.wait(on_event)
        except BaseException:  # Ctrl-C in the console: leave no child running, no radiograph behind
            job.discard()
            raise
        output = self.load_result(job, finished, outputNode, uncertaintyNode)
        for warning in output.warnings:  # what the panel shows under the score: a script is told too
            logging.getLogger(__name__).warning("XctDiff: %s", warning)
        return output.ct_node


#: A job folder untouched this long is a crashed session's (jobs take seconds to minutes; a standby leaves
#: after 30 idle minutes): its radiograph, a patient's pixels, is removed when a logic starts.
STALE_JOB_HOURS = 24.0


def _hand_over(folder: Path, arguments: list) -> bool:
    """Give a waiting engine its job: the file appears whole (written beside it, then renamed). False when the
    engine closed its door first (its job file's name is a folder: it left, idle or orphaned), nothing left."""
    written = folder / (JOB_NAME + ".part")
    written.write_text(json.dumps(arguments), encoding="utf-8")
    try:
        os.replace(written, folder / JOB_NAME)
    except (IsADirectoryError, PermissionError):  # Windows refuses a rename onto a folder as "access denied"
        if not (folder / JOB_NAME).is_dir():
            raise
        written.unlink()
        return False
    return True


def remove_stale_job_folders(root: Optional[str] = None, hours: float = STALE_JOB_HOURS) -> list:
    """Remove ``xctdiff-*`` job folders (``tempfile.mkdtemp``'s, this user's) older than ``hours``; return them."""
    import time

    removed = []
    try:  # gettempdir raises FileNotFoundError where no temporary folder is usable: then there is nothing to clean
        root = Path(root or tempfile.gettempdir())
        candidates = list(root.glob("xctdiff-*"))
    except OSError:
        return removed
    getuid = getattr(os, "getuid", None)  # none on Windows, whose temporary folder is the user's own (%TEMP%)
    for folder in candidates:
        try:
            stat = folder.stat()
            if (folder.is_dir() and not folder.is_symlink() and (getuid is None or stat.st_uid == getuid())
                    and time.time() - stat.st_mtime > hours * 3600):
                shutil.rmtree(folder, ignore_errors=True)
                if not folder.exists():
                    removed.append(folder)
        except OSError:  # gone meanwhile
            continue
    return removed


ATTRIBUTE_MADE_FOR, ATTRIBUTE_SYNTHETIC = mrml_bridge.ATTRIBUTE_MADE_FOR, mrml_bridge.ATTRIBUTE_SYNTHETIC
SYNTHETIC_CT = "synthetic CT (XctDiff)"


def _manifest_stamp(model: ModelChoice) -> str:
    """A model folder's manifest as last written: a model exported again into the same folder, while an engine
    waited with the old one loaded, is another model."""
    try:
        stat = (model.folder / MANIFEST_NAME).stat() if model.folder is not None else None
    except OSError:
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}" if stat is not None else ""


def _is_node(value, class_name: str) -> bool:
    return callable(getattr(value, "IsA", None)) and bool(value.IsA(class_name))


def _describe(value) -> str:
    """A node as its name and class; anything else as what it is (a node's name typed for the node)."""
    if _is_node(value, "vtkMRMLNode"):
        return f"'{value.GetName()}' ({value.GetClassName()})"
    hint = " (slicer.util.getNode(name) gives the node of a name)" if isinstance(value, str) else ""
    return f"{type(value).__name__} {value!r}{hint}"


def _result_fields(result: dict) -> dict:
    """The RESULT line's fields for :class:`ReconstructionOutput`, or one sentence when the engine's line is
    not what PROTOCOL.md says (a newer or broken engine)."""
    consistency, seed, timings = result.get("consistency"), result.get("seed"), result.get("timings") or {}
    if not (consistency is None or _optional_float(consistency) is not None) or not isinstance(timings, dict):
        raise XctDiffError(f"the engine's RESULT line is not understood (consistency {consistency!r}, "
                           f"timings {type(timings).__name__}): is the engine the module's version?")
    return dict(
        consistency=_optional_float(consistency),
        device=str(result.get("device", "")),
        timings=dict(timings),
        seed=int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else None,
        method=str(result.get("method", "")),
        unguided_consistency=_optional_float(result.get("unguided_consistency")),
        warnings=tuple(w for w in _list(result.get("warnings")) if isinstance(w, str)),
        ap_diameter=_optional_float(result.get("ap_diameter_mm")),
        learnt_ap_diameter=_optional_float(result.get("learnt_ap_diameter_mm")),
        turn=result["turn"] if isinstance(result.get("turn"), str) and result["turn"] in TURNS else "none",
        mirrored=result.get("mirror") is True,
    )


def _list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


def _optional_float(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def consistency_text(output: ReconstructionOutput) -> str:
    """The panel's consistency: with guidance, the score before it beside (the guided one says only that
    the DRR was fitted to the film)."""
    if output.consistency is None:
        return ""
    text = f"{output.consistency:.3f}"
    if output.unguided_consistency is not None:
        text += f" ({output.unguided_consistency:.3f} before guidance)"
    if output.ap_diameter is not None and output.learnt_ap_diameter is not None:
        text += f"\nAP diameter {output.ap_diameter:g} mm as given (the model's own {output.learnt_ap_diameter:.0f} mm)"
    handled = turn_words(output.turn, output.mirrored)
    if handled:
        text += f"\nthe film was {handled} before reconstructing"
    for warning in output.warnings:  # shown next to the score they qualify
        text += f"\nwarning: {panel_words(warning)}"
    return text


def panel_words(warning: str) -> str:
    """An engine warning with the panel's controls in place of the command line's flags ("turn it head up, half
    round (Turn film: half round, or Auto)", not "(--turn half, or --turn auto)"), for a clinician in Slicer."""
    warning = re.sub(r"\(--turn (anticlockwise|half|clockwise), or --turn auto\)",
                     lambda m: f"(Turn film: {TURN_PHRASES[TURNS[m.group(1)]]}, or Auto)", warning)
    return warning.replace("(--mirror flips it back)", "(Flip left to right flips it back)")
