"""The panel's own decisions (XctDiffSlicer.py), run on slicer-core with its Qt and scripted-module imports stubbed:
the module file is thin, but what it does with a finished job's nodes is the clinician's to see."""
from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO
from test_slicer_process import FAKE_ENGINE, MODE_VARIABLE  # the engine that speaks the protocol

MODULE_FILE = REPO / "XctDiffSlicer" / "XctDiffSlicer.py"


@pytest.fixture
def module(slicer, monkeypatch):
    """XctDiffSlicer.py imported without Slicer's application: qt, i18n, the parameter node wrapper and the
    scripted-module base classes stubbed (the widget's methods are then called on a stand-in ``self``)."""
    def stub(name, **attributes):
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)

    stub("qt", QTimer=object)
    stub("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
    stub("slicer.parameterNodeWrapper", Choice=lambda *a: None, WithinRange=lambda *a: None,
         parameterNodeWrapper=lambda cls: cls)
    bases = {name: type(name, (), {}) for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic",
                                                    "ScriptedLoadableModuleTest", "ScriptedLoadableModuleWidget")}
    stub("slicer.ScriptedLoadableModule", **bases)
    spec = importlib.util.spec_from_file_location("XctDiffSlicer_under_test", MODULE_FILE)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


@pytest.mark.parametrize("input_now", ["the same film", "another film"])
def test_a_job_finishing_after_another_film_was_chosen_leaves_that_films_outputs_new(module, bridge, scene, tmp_path,
                                                                                   monkeypatch, input_now):
    """Film A runs; meanwhile film B is chosen, which sets the outputs back to "Create new volume". A's CT became the
    panel's output all the same, and the click for B then overwrote A's CT (renamed for B: A's result lost)."""
    from XctDiffSlicerLib.logic import ReconstructionLogic, ReconstructionOptions

    engine = tmp_path / "fake_engine.py"
    engine.write_text(FAKE_ENGINE, encoding="utf-8")
    monkeypatch.setenv(MODE_VARIABLE, "ok")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    logic = ReconstructionLogic(scene, engine_command=[sys.executable, str(engine)])
    image = np.random.default_rng(0).random((64, 60)).astype(np.float32)
    film_a = bridge.radiograph_to_node(scene, image, (2.5, 2.5), name="film A", is_drr=True)
    film_b = bridge.radiograph_to_node(scene, image, (2.5, 2.5), name="film B", is_drr=True)
    job = logic.start(film_a, ReconstructionOptions())
    finished = job.process.wait(timeout=60)
    parameters = SimpleNamespace(inputVolume=film_a if input_now == "the same film" else film_b, outputVolume=None,
                                 uncertaintyVolume=None, uncertaintyOpacity=0.5, consistency="")
    panel = SimpleNamespace(
        _job=job, _parameterNode=None, updateGUI=lambda: None,
        ui=SimpleNamespace(progressBar=SimpleNamespace(value=0), stageLabel=SimpleNamespace(text="")),
        logic=SimpleNamespace(getParameterNode=lambda: parameters,
                              finish=lambda job, event, output, uncertainty, opacity:
                              logic.load_result(job, event, output, uncertainty)))
    module.XctDiffSlicerWidget._handleJobEvent(panel, finished)
    ct = scene.GetFirstNodeByName("film A synthetic CT (XctDiff)")
    assert ct is not None and panel._job is None
    assert panel.ui.stageLabel.text.startswith("Done" if input_now == "the same film" else "film A: done")  # not B's
    assert parameters.outputVolume is (ct if input_now == "the same film" else None)
    assert bool(parameters.consistency) == (input_now == "the same film")  # A's score is not B's (A's CT says it)


def panel_for_update(module, parameters, shown_film):
    """A stand-in ``self`` for XctDiffSlicerWidget.updateGUI, which last showed ``shown_film``."""
    ui = SimpleNamespace(**{name: SimpleNamespace(text="", enabled=True) for name in (
        "reconstructButton", "modelPathLineEdit", "modelInfoLabel", "deviceInfoLabel", "consistencyLabel")})
    panel = SimpleNamespace(_parameterNode=parameters, _job=None, _deviceInfo=None, ui=ui,
                            _diameterInput=shown_film.GetID(), _diameterCt=None,
                            logic=SimpleNamespace(sliceLogics=lambda: []))
    panel.modelChoice = lambda: module.choose_model(None)
    return panel


def test_another_film_chosen_clears_the_score_and_warnings_of_the_last_one(module, bridge, scene):
    """The score line of film A ("warning: the film looks upside down; turn it head up, half round") stayed under
    film B once B was chosen, while B's turn was set back to "As loaded": read as B's, it asked to turn B."""
    image = np.ones((40, 30), np.float32)
    film_a = bridge.radiograph_to_node(scene, image, name="film A")
    film_b = bridge.radiograph_to_node(scene, image, name="film B")
    parameters = SimpleNamespace(inputVolume=film_b, outputVolume=None, uncertaintyVolume=None, apDiameterCt=None,
                                 apDiameter=0.0, turn="half", mirror=False, modelSource="bundled", device="auto",
                                 uncertaintyOpacity=0.5,
                                 consistency="0.412\nwarning: the film looks upside down; turn it head up, half round")
    module.XctDiffSlicerWidget.updateGUI(panel_for_update(module, parameters, film_a))
    assert parameters.consistency == "" and parameters.turn == "none"
    parameters.consistency = "0.875"  # the film shown already: kept
    module.XctDiffSlicerWidget.updateGUI(panel_for_update(module, parameters, film_b))
    assert parameters.consistency == "0.875"


def connector_node_types(annotation) -> tuple:
    """The classes Slicer's qMRMLNodeComboBox connector lists for a parameter (parameterNodeWrapper's getNodeTypes:
    it sets the combo box's nodeTypes from the annotation, whatever the .ui says)."""
    import typing

    if isinstance(annotation, type):
        return (annotation.__name__,)
    assert typing.get_origin(annotation) is typing.Union, annotation
    return tuple(arg.__name__ for arg in typing.get_args(annotation) if arg is not type(None))


def test_the_radiograph_selector_lists_a_colour_film_and_no_label_map(module):
    """A colour PNG or JPEG dropped into Slicer is a vector volume (what the README's Radiograph input says is made
    grey); the selector listed plain scalar volumes alone (its nodeTypes come from the annotation, child classes
    hidden by the .ui), so the film could not be chosen in the panel."""
    import xml.etree.ElementTree as ET

    types_listed = connector_node_types(module.XctDiffSlicerParameterNode.__annotations__["inputVolume"])
    assert set(types_listed) == {"vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"}
    ui = ET.parse(MODULE_FILE.parent / "Resources" / "UI" / "XctDiffSlicer.ui").getroot()
    selector = next(w for w in ui.iter("widget") if w.get("name") == "inputSelector")
    show_children = next(p for p in selector.findall("property") if p.get("name") == "showChildNodeTypes")
    assert show_children.findtext("bool") == "false"  # label maps, DWIs and other child classes stay out
