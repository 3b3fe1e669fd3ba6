"""XctDiffSlicer: reconstruct a 3D chest CT from one frontal radiograph (XctDiff, Bai et al.).

Thin on purpose: Module, parameter node, Widget, Logic and Test. The work is in ``XctDiffSlicerLib``
(MRML bridge, child-process runner, model choice, dependency check) and in the ``XctDiffCore``
engine, which runs in a child process so that the panel never freezes.
"""
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional, Union

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _put_engine_on_path() -> None:
    """XctDiffCore lies beside this file (extension build) or one folder up (the repository, "Add module path")."""
    here = Path(__file__).resolve().parent
    for folder in (here, here.parent):
        if (folder / "XctDiffCore" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            return


_put_engine_on_path()

from XctDiffCore.errors import XctDiffError  # noqa: E402
from XctDiffSlicerLib import dependencies, device_probe, mrml_bridge  # noqa: E402
from XctDiffSlicerLib.logic import (  # noqa: E402
    ReconstructionLogic,
    ReconstructionOptions,
    consistency_text,
    core_parent_folder,
)
from XctDiffSlicerLib.models import choose_model  # noqa: E402
from XctDiffSlicerLib.process import (  # noqa: E402
    ChildProcess,
    Finished,
    LogLine,
    Progress,
    engine_environment,
    python_executable,
)

POLL_INTERVAL_MS = 100
# Labels shown for the parameter node's choices (the values are the engine's own names).
DEVICE_LABELS = {"auto": "Auto", "cpu": "CPU", "cuda": "GPU"}
STYLE_LABELS = {"auto": "Auto (on for real radiographs)", "on": "On", "off": "Off"}
METHOD_LABELS = {"default": "Model default", "diffusion": "Diffusion (samples)", "direct": "Direct (encoder only)"}
COARSE_LABELS = {"auto": "Auto (averaged in, as the model says)", "off": "Off (decoded CT alone, sharper)"}
MODEL_SOURCE_LABELS = {"bundled": "Bundled default", "folder": "Folder..."}
TURN_LABELS = {"none": "As loaded", "auto": "Auto (stand it head up when the check says it is not)",
               "anticlockwise": "A quarter anticlockwise", "half": "Half round", "clockwise": "A quarter clockwise"}


class XctDiffSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("XctDiff CT from radiograph")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Reconstruction")]
        self.parent.dependencies = []
        self.parent.contributors = ["XctDiffSlicer developers"]
        self.parent.helpText = _(
            "Reconstructs a 3D chest CT (128^3 voxels of 2.5 mm, in HU) from one frontal (PA) radiograph "
            "with the XctDiff latent diffusion model. Research use only, not for diagnosis."
        )
        self.parent.acknowledgementText = _(
            "After XctDiff (Bai et al.). The model runs in PyTorch in a separate process."
        )


@parameterNodeWrapper
class XctDiffSlicerParameterNode:
    """The panel's state. 0 steps: the model's default; seed -1: random; AP diameter 0: not known; turn and
    mirror: how the film is stood head up before reconstructing (one film's, forgotten for another)."""

    inputVolume: Optional[Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]]  # a colour film: a vector volume
    outputVolume: vtkMRMLScalarVolumeNode
    uncertaintyVolume: vtkMRMLScalarVolumeNode
    modelSource: Annotated[str, Choice(["bundled", "folder"])] = "bundled"
    modelFolder: Path
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    samples: Annotated[int, WithinRange(1, 32)] = 1
    seed: Annotated[int, WithinRange(-1, 2**31 - 1)] = -1
    style: Annotated[str, Choice(["auto", "on", "off"])] = "auto"
    method: Annotated[str, Choice(["default", "diffusion", "direct"])] = "default"
    guidance: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    precision: Annotated[str, Choice(["auto", "fp32", "bf16"])] = "auto"
    coarse: Annotated[str, Choice(["auto", "off"])] = "auto"
    apDiameter: Annotated[float, WithinRange(0.0, 300.0)] = 0.0
    apDiameterCt: vtkMRMLScalarVolumeNode
    turn: Annotated[str, Choice(["none", "auto", "anticlockwise", "half", "clockwise"])] = "none"
    mirror: bool = False
    uncertaintyOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    consistency: str = ""


class XctDiffSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._deviceProbe = None
        self._deviceInfo = None
        self._dependenciesChecked = False
        self._diameterInput = None  # the ID of the radiograph node the AP diameter was given for
        self._diameterCt = None  # the ID of the CT node the AP diameter was last measured on
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/XctDiffSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = XctDiffSlicerLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.loadRadiographButton.connect("clicked(bool)", self.onLoadRadiograph)
        self.ui.reconstructButton.connect("clicked(bool)", self.onReconstructOrCancel)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.discard()  # kill the child and remove its temporary folder (the radiograph in it)
            self._job = None
        if self._deviceProbe is not None:
            self._deviceProbe.cancel()
        self.logic.reconstruction.shutdown()  # the engine started ahead of a next job
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        if self._deviceProbe is None:
            probe = Path(device_probe.__file__)
            # with the engine on its path: the probe asks the engine's own device check (one verdict)
            self._deviceProbe = ChildProcess([python_executable(), str(probe)],
                                             env=engine_environment(core_parent_folder())).start()
            self._timer.start()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:  # its CT belongs to the scene being closed, not to the next one
            job, self._job = self._job, None
            job.discard()
            self.ui.progressBar.value = 0
            self.ui.stageLabel.text = _("Cancelled: the scene was closed")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node --------------------------------------------------------------------------

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = mrml_bridge.first_film_node(slicer.mrmlScene)

    def setParameterNode(self, inputParameterNode: Optional[XctDiffSlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            for combo, labels in (
                (self.ui.deviceComboBox, DEVICE_LABELS),
                (self.ui.styleComboBox, STYLE_LABELS),
                (self.ui.methodComboBox, METHOD_LABELS),
                (self.ui.coarseComboBox, COARSE_LABELS),
                (self.ui.turnComboBox, TURN_LABELS),
                (self.ui.modelSourceComboBox, MODEL_SOURCE_LABELS),
            ):
                for index, label in enumerate(labels.values()):
                    combo.setItemText(index, label)  # the connector maps indices, not texts
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
            self.updateGUI()

    def updateGUI(self, caller=None, event=None) -> None:
        node = self._parameterNode
        running = self._job is not None
        self.ui.reconstructButton.text = _("Cancel") if running else _("Reconstruct")
        self.ui.reconstructButton.enabled = running or node.inputVolume is not None
        self.ui.modelPathLineEdit.enabled = node.modelSource == "folder"
        try:
            self.ui.modelInfoLabel.text = self.modelChoice().label
        except XctDiffError as exc:
            self.ui.modelInfoLabel.text = str(exc)
        if self._deviceInfo is not None:
            self.ui.deviceInfoLabel.text = device_probe.describe_device(self._deviceInfo, node.device)
        self.ui.consistencyLabel.text = node.consistency or "-"
        inputId = node.inputVolume.GetID() if node.inputVolume is not None else None
        if inputId != self._diameterInput:  # a diameter and a CT are one patient's: another film forgets them
            forget, self._diameterInput = self._diameterInput is not None, inputId
            if forget and node.apDiameterCt is not None:
                node.apDiameterCt = None
            if forget and node.apDiameter:
                node.apDiameter = 0.0
            if forget and node.turn not in ("none", "auto"):  # a turn asked for one film is wrong for the next
                node.turn = "none"
            if forget and node.mirror:
                node.mirror = False
            if forget and node.consistency:  # the last film's score and warnings ("turn it head up") are not this one's
                node.consistency = ""
            if forget and (node.outputVolume is not None or node.uncertaintyVolume is not None):
                node.outputVolume, node.uncertaintyVolume = None, None  # "Create new volume": never overwrite A's CT
        ctId = node.apDiameterCt.GetID() if node.apDiameterCt is not None else None
        if ctId != self._diameterCt:  # an earlier CT chosen: its diameter fills in the field
            self._diameterCt = ctId
            if node.apDiameterCt is not None:
                self._measureDiameter(node.apDiameterCt)
        if node.outputVolume is not None and node.uncertaintyVolume is not None:
            mrml_bridge.set_foreground_opacity(self.logic.sliceLogics(), node.uncertaintyOpacity)

    def modelChoice(self):
        node = self._parameterNode
        return choose_model(node.modelFolder if node.modelSource == "folder" else None)

    # -- actions ---------------------------------------------------------------------------------

    def _measureDiameter(self, ctNode) -> None:
        """The AP diameter of an earlier CT of the patient, as the engine measures it, into the field."""
        try:
            self._ensureDependencies()
            with slicer.util.WaitCursor():
                self._parameterNode.apDiameter = mrml_bridge.ap_diameter_of_node(ctNode)
        except XctDiffError as exc:
            slicer.util.errorDisplay(str(exc))

    def _ensureDependencies(self) -> None:
        """The engine's Python packages (asked once per session; installing them needs the user's consent)."""
        if not self._dependenciesChecked:
            with slicer.util.WaitCursor():
                dependencies.ensure_dependencies(slicer.util.confirmOkCancelDisplay, slicer.util.pip_install)
            self._dependenciesChecked = True

    def onLoadRadiograph(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Load radiograph"), "",
            _("Radiographs (*.png *.jpg *.jpeg *.tif *.tiff *.dcm *.nrrd *.nii *.nii.gz *.mha);;All files (*)"),
        )
        if not path:
            return
        try:
            node = mrml_bridge.load_radiograph(slicer.mrmlScene, path)
        except XctDiffError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self._parameterNode.inputVolume = node
        slicer.util.setSliceViewerLayers(background=node, fit=True)

    def onReconstructOrCancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.stageLabel.text = _("Cancelling...")
            return
        node = self._parameterNode
        try:
            self._ensureDependencies()
            options = ReconstructionOptions(
                steps=node.steps or None,
                samples=node.samples,
                seed=None if node.seed < 0 else node.seed,
                device=node.device,
                style=node.style,
                model=self.modelChoice(),
                method=node.method,
                guidance=node.guidance,
                precision=node.precision,
                coarse=node.coarse,
                ap_diameter=node.apDiameter or None,
                turn=node.turn,
                mirror=node.mirror,
            )
            self._job = self.logic.start(node.inputVolume, options, node.outputVolume, node.uncertaintyVolume)
        except XctDiffError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.progressBar.value = 0
        self.ui.stageLabel.text = _("Starting...")
        node.consistency = ""
        self._timer.start()
        self.updateGUI()

    def onTimer(self) -> None:
        if self._deviceProbe is not None and self._deviceInfo is None:
            self._pollDeviceProbe()
        if self._job is not None:
            for event in self._job.process.poll():
                self._handleJobEvent(event)
        if self._job is None and (self._deviceProbe is None or self._deviceInfo is not None):
            self._timer.stop()

    def _pollDeviceProbe(self) -> None:
        for event in self._deviceProbe.poll():
            info = device_probe.read_probe_line(event.text) if isinstance(event, LogLine) and event.stream == "stdout" else None
            if info is not None:
                self._deviceInfo = info
            elif isinstance(event, Finished) and self._deviceInfo is None:
                self._deviceInfo = {"torch": None, "reason": _("the device check failed: ") + event.error}
        if self._deviceInfo is not None and self._parameterNode is not None:
            self.updateGUI()
            if self._deviceInfo.get("torch"):
                self._prepareStandby()

    def _prepareStandby(self) -> None:
        """Start the first job's engine ahead, once the device check is done (not two torch imports at once)."""
        try:
            self.logic.reconstruction.prepare_standby(self.modelChoice())
        except XctDiffError:  # a wrong model folder: the click says so
            pass

    def _handleJobEvent(self, event) -> None:
        if isinstance(event, Progress):
            self.ui.progressBar.value = int(round(100 * event.fraction))
            self.ui.stageLabel.text = event.stage
        elif isinstance(event, LogLine):
            logging.info("XctDiff: %s", event.text)
        elif isinstance(event, Finished):
            job, self._job = self._job, None
            node = self.logic.getParameterNode()  # the panel may have been left while it ran
            try:
                output = self.logic.finish(job, event, node.outputVolume, node.uncertaintyVolume, node.uncertaintyOpacity)
            except Exception as exc:  # noqa: BLE001 - whatever failed, the panel must come back to Reconstruct
                if not isinstance(exc, XctDiffError):
                    logging.exception("XctDiff: loading the reconstruction failed")
                self.ui.stageLabel.text = _("Cancelled") if event.status == "cancelled" else _("Failed")
                if event.status != "cancelled":
                    slicer.util.errorDisplay(str(exc) if isinstance(exc, XctDiffError)
                                             else _("Loading the reconstruction failed: {error}").format(error=exc))
            else:
                film = node.inputVolume.GetID() if node.inputVolume is not None else None
                if film == job.input_node_id:  # another film chosen meanwhile keeps "Create new volume": never A's CT
                    node.outputVolume = output.ct_node
                    node.uncertaintyVolume = output.uncertainty_node
                    if output.consistency is not None:  # A's score and warnings: in A's CT's description otherwise
                        node.consistency = consistency_text(output)
                self.ui.progressBar.value = 100
                status = _("Done on {device}").format(device=output.device or _("the engine's device"))
                if film != job.input_node_id:  # the status line sits under film B: say whose CT this is
                    status = _("{film}: done on {device}").format(
                        film=job.input_name, device=output.device or _("the engine's device"))
                if output.seed is not None and output.method != "direct":
                    status += _(", seed {seed}").format(seed=output.seed)  # the seed reproduces the run
                self.ui.stageLabel.text = status
            if self._parameterNode is not None:
                self.updateGUI()


def dicomFileForInstance(instanceUID: str) -> str:
    """The file of a DICOM instance in Slicer's DICOM database ("" without an open database)."""
    database = getattr(slicer, "dicomDatabase", None)
    if database is None or not database.isOpen:
        return ""
    return database.fileForInstance(instanceUID) or ""


class XctDiffSlicerLogic(ScriptedLoadableModuleLogic):
    """Slicer's face of :class:`XctDiffSlicerLib.logic.ReconstructionLogic` on ``slicer.mrmlScene``."""

    def __init__(self, engineCommand=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.reconstruction = ReconstructionLogic(slicer.mrmlScene, engineCommand, dicomFileForInstance)

    def getParameterNode(self):
        return XctDiffSlicerParameterNode(super().getParameterNode())

    def sliceLogics(self) -> list:
        """The Red, Yellow and Green slice logics; none when Slicer runs without its main window."""
        if slicer.app.layoutManager() is None:
            return []
        return mrml_bridge.slice_logics_by_name(slicer.app.applicationLogic().GetSliceLogics())

    def start(self, inputNode, options: ReconstructionOptions, outputNode=None, uncertaintyNode=None):
        return self.reconstruction.start(inputNode, options, outputNode, uncertaintyNode)

    def finish(self, job, finished, outputNode=None, uncertaintyNode=None, opacity=0.5):
        """Load a finished job's outputs into nodes and show them in the Red, Yellow and Green views; the
        next job's engine starts meanwhile (the panel's, not the console's ``reconstruct``)."""
        try:
            output = self.reconstruction.load_result(job, finished, outputNode, uncertaintyNode)
            mrml_bridge.show_in_slice_views(self.sliceLogics(), output.ct_node, output.uncertainty_node, opacity)
            return output
        finally:
            self.reconstruction.prepare_standby(job.options.model)  # after the nodes: they come first

    def reconstruct(self, inputNode, outputNode=None, steps=None, samples=1, seed=None, device="auto",
                    style="auto", model=None, uncertaintyNode=None, progress=None, method="default", guidance=0.0,
                    precision="auto", coarse="auto", ap_diameter=None, turn="none", mirror=False):
        """Blocking reconstruction for the Python console; returns the output CT node, shown in the slice views.
        ``ap_diameter``: the chest's front-to-back diameter in mm when known (a frontal film does not show it);
        ``turn`` ("auto", "anticlockwise", "half", "clockwise") and ``mirror`` stand a film the wrong way round head up."""
        ctNode = self.reconstruction.reconstruct(
            inputNode, outputNode, steps=steps, samples=samples, seed=seed, device=device, style=style,
            model=model, uncertaintyNode=uncertaintyNode, progress=progress, method=method, guidance=guidance,
            precision=precision, coarse=coarse, ap_diameter=ap_diameter, turn=turn, mirror=mirror,
        )
        mrml_bridge.show_in_slice_views(self.sliceLogics(), ctNode)
        return ctNode


class XctDiffSlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (CTest: ``slicer_add_python_unittest``); the pytest suite covers the same
    ground on the ``slicer-core`` wheel."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ct_node_geometry()
        self.setUp()
        self.test_radiograph_round_trip()
        self.setUp()
        self.test_reconstruct_sample()

    def test_ct_node_geometry(self):
        import numpy as np

        from XctDiffCore.volume import Volume

        volume = Volume(np.zeros((4, 5, 6), np.int16), (2.5, 2.5, 2.5), (10.0, 20.0, 30.0))
        node = mrml_bridge.volume_to_node(slicer.mrmlScene, volume)
        np.testing.assert_allclose(mrml_bridge.ijk_to_ras(node), volume.ijk_to_ras())
        self.assertEqual(node.GetImageData().GetDimensions(), (6, 5, 4))

    def test_radiograph_round_trip(self):
        import numpy as np

        image = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
        node = mrml_bridge.radiograph_to_node(slicer.mrmlScene, image, (0.5, 0.4))
        back, spacing = mrml_bridge.radiograph_from_node(node)
        np.testing.assert_array_equal(back, image)
        np.testing.assert_allclose(spacing, (0.5, 0.4))

    def test_reconstruct_sample(self):
        sample = Path(__file__).resolve().parent.parent / "Resources" / "Samples" / "RG1_UNCR_chest_PA.dcm"
        if not sample.is_file():  # installed extension: the samples stay in the repository
            self.delayDisplay("sample radiograph not found; reconstruction test not run")
            return
        if dependencies.installed_version("torch") is None:
            self.delayDisplay("PyTorch is not installed (PyTorch extension); reconstruction test not run")
            return
        inputNode = mrml_bridge.load_radiograph(slicer.mrmlScene, sample)
        outputNode = XctDiffSlicerLogic().reconstruct(inputNode, steps=2, samples=1, seed=0, device="cpu")
        self.assertEqual(outputNode.GetImageData().GetDimensions(), (128, 128, 128))
        self.assertEqual(tuple(round(s, 3) for s in outputNode.GetSpacing()), (2.5, 2.5, 2.5))
        self.delayDisplay("reconstruction test passed")
