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
    assert ct is not None and panel._job is None and panel.ui.stageLabel.text.startswith("Done")
    assert parameters.outputVolume is (ct if input_now == "the same film" else None)
