"""The reconstruction logic on real MRML: radiograph node -> temporary file -> child process -> CT node.

Geometry end to end: the sample CT's DRR becomes a node, an engine that speaks PROTOCOL.md
(back-projection, see test_slicer_process.py) reconstructs it, and the output node must have the
canonical axes (patient's left, posterior, superior), 128^3 voxels of 2.5 mm, and its content where the
sample CT has it. The README's console example runs as written with the real engine.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLE_CT, SAMPLE_RADIOGRAPH
from test_slicer_process import FAKE_ENGINE, MODE_VARIABLE  # the engine that speaks the protocol

from XctDiffCore.errors import XctDiffError

README = REPO / "README.md"


@pytest.fixture
def logic(slicer, scene, tmp_path, monkeypatch):
    from XctDiffSlicerLib.logic import ReconstructionLogic

    engine = tmp_path / "fake_engine.py"
    engine.write_text(FAKE_ENGINE, encoding="utf-8")
    monkeypatch.setenv(MODE_VARIABLE, "ok")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the jobs' temporary folders land here
    return ReconstructionLogic(scene, engine_command=[sys.executable, str(engine)])


@pytest.fixture(scope="module")
def sample():
    from XctDiffCore.io import read_ct
    from XctDiffCore.layout import ct_to_model_layout

    ct = read_ct(SAMPLE_CT)
    assert np.allclose(ct.direction, np.eye(3)) and ct.shape == (128, 128, 128)
    mu = np.clip((ct.array.astype(np.float32) + 1000.0) / 1000.0, 0.0, None)
    drr = ct_to_model_layout(mu).sum(axis=0)  # a PA film as read: [row (head up), col (patient's right left)]
    return ct, drr


def coronal_mean(bridge, node) -> np.ndarray:
    """The node's voxels averaged over A-P, as [S, patient's right->left] in RAS (whatever the storage)."""
    m = bridge.ijk_to_ras(node)[:3, :3]
    assert np.allclose(np.abs(m), np.diag(np.abs(np.diag(m)))), "expected an axis-aligned volume"
    array = bridge.node_array(node).astype(np.float32)  # [k, j, i]
    image = array.mean(axis=1)  # over j (A-P): [k, i]
    if m[2, 2] < 0:
        image = image[::-1, :]  # rows: k towards S
    if m[0, 0] > 0:
        image = image[:, ::-1]  # cols: i towards the patient's left (-R)
    return image


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_drr_node_reconstructs_into_a_canonical_ct_node(bridge, scene, logic, sample, tmp_path):
    ct, drr = sample
    drr_node = bridge.radiograph_to_node(scene, drr, spacing=(2.5, 2.5), name="sample DRR", is_drr=True)
    progress = []
    output = logic.reconstruct(drr_node, steps=4, samples=1, seed=3, device="cpu",
                               progress=lambda f, stage: progress.append((f, stage)))
    assert [f for f, _ in progress] == [0.0, 0.5, 1.0]

    # Axes: i to the patient's left, j to the posterior, k to the head; 128^3 voxels of 2.5 mm.
    assert output.GetImageData().GetDimensions() == (128, 128, 128)
    np.testing.assert_allclose(output.GetSpacing(), (2.5, 2.5, 2.5))
    m = bridge.ijk_to_ras(output)
    np.testing.assert_allclose(m[:3, :3], np.diag([-2.5, -2.5, 2.5]))
    bounds = np.zeros(6)
    output.GetRASBounds(bounds)  # voxel corners: 128 * 2.5 = 320 mm along every axis
    np.testing.assert_allclose(bounds[1::2] - bounds[0::2], (320.0, 320.0, 320.0), atol=1e-6)
    np.testing.assert_allclose(m[:3, 3], (158.75, 180.0, -300.0))  # the engine's LPS origin, in RAS
    assert output.GetName() == "sample DRR synthetic CT (XctDiff)"  # so would be a series Slicer exports from it
    assert output.GetAttribute("XctDiff.Synthetic") == "1" and "research use" in output.GetDescription()
    display = output.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == (bridge.CT_WINDOW, bridge.CT_LEVEL)

    # Content: the back-projection of the DRR lies where the sample CT has its anatomy, in RAS.
    sample_node = bridge.volume_to_node(scene, ct, name="sample CT")
    reference = coronal_mean(bridge, sample_node)
    got = coronal_mean(bridge, output)
    right = correlation(got, reference)
    assert right > 0.9
    assert right > correlation(got[:, ::-1], reference) + 0.05  # left-right mirrored is worse
    assert right > correlation(got[::-1, :], reference) + 0.05  # upside down is worse
    assert not list(tmp_path.glob("xctdiff-*")), "the job's temporary folder was left behind"


def test_the_ct_joins_the_films_dicom_study(bridge, scene, logic, sample):
    """A film in a patient's study (Data module, as Slicer's DICOM loader files it) gets its CT beside it, so
    that Export to DICOM writes the CT into that study; a film outside any study leaves the CT at the top."""
    _, drr = sample
    hierarchy = scene.GetSubjectHierarchyNode()
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient X")
    study = hierarchy.CreateStudyItem(patient, "Chest PA")
    film = bridge.radiograph_to_node(scene, drr, spacing=(2.5, 2.5), name="film in a study", is_drr=True)
    hierarchy.CreateItem(study, film)
    ct = logic.reconstruct(film, steps=2, seed=0, device="cpu")
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(ct)) == study

    loose = bridge.radiograph_to_node(scene, drr, spacing=(2.5, 2.5), name="loose film", is_drr=True)
    ct = logic.reconstruct(loose, steps=2, seed=0, device="cpu")
    assert hierarchy.GetItemByDataNode(ct) == 0  # slicer-core makes no item; Slicer files it at the top itself


def test_a_film_from_the_dicom_database_reaches_the_engine_as_its_file(bridge, scene, logic):
    """A node holds what its reader made of the file; here the stored values, as a reader that ignores the
    photometric interpretation keeps them: a negative of this MONOCHROME1 film (bone dark), without its VOI LUT
    and spacing. With the database's file the engine reads the film as the command line does; without one (a
    scene from disk) the node's voxels are sent."""
    import pydicom
    from pydicom.pixels import apply_modality_lut
    from skimage.transform import resize

    from XctDiffCore.io import read_radiograph

    ds = pydicom.dcmread(SAMPLE_RADIOGRAPH)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    stored = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)  # as Slicer's loader keeps it
    film = bridge.radiograph_to_node(scene, stored, spacing=(0.18, 0.18), name="CR from the DICOM module")
    film.SetAttribute("DICOM.instanceUIDs", str(ds.SOPInstanceUID))
    seen = resize(read_radiograph(SAMPLE_RADIOGRAPH).image, (128, 128), order=1, anti_aliasing=True)[::-1]  # feet up

    logic.dicom_file_for = {str(ds.SOPInstanceUID): str(SAMPLE_RADIOGRAPH)}.get
    from_file = coronal_mean(bridge, logic.reconstruct(film, steps=2, seed=0, device="cpu"))
    assert correlation(from_file, seen) > 0.95  # the engine read the file: the film, not its negative

    for resolver in (None, {str(ds.SOPInstanceUID): str(SAMPLE_RADIOGRAPH.with_name("gone.dcm"))}.get):
        logic.dicom_file_for = resolver
        from_voxels = coronal_mean(bridge, logic.reconstruct(film, steps=2, seed=0, device="cpu"))
        assert correlation(from_voxels, seen) < -0.5  # the node's voxels: a negative (the plausibility check's job)
    film.SetAttribute("DICOM.instanceUIDs", f"{ds.SOPInstanceUID} 1.2.3")  # several instances: not one film file
    assert bridge.source_file(film, {str(ds.SOPInstanceUID): str(SAMPLE_RADIOGRAPH)}.get) is None


def test_a_loaded_film_reaches_the_engine_as_its_file_until_the_file_changes(bridge, scene, logic, tmp_path):
    """The header's facts (a child's age here) are lost in the node's voxels: the engine reads the file, so the
    panel warns as the command line does; a file changed since it was loaded is not used."""
    import pydicom

    from XctDiffSlicerLib.logic import ReconstructionOptions

    film_file = tmp_path / "child.dcm"
    ds = pydicom.dcmread(SAMPLE_RADIOGRAPH)
    ds.PatientAge = "006Y"
    ds.save_as(film_file)
    node = bridge.load_radiograph(scene, film_file)
    assert bridge.source_file(node) == film_file.resolve()
    job = logic.start(node, ReconstructionOptions())
    command = job.process.command
    job.discard()
    assert command[command.index("reconstruct") + 1] == str(film_file.resolve())
    film_file.write_bytes(film_file.read_bytes() + b"\0")  # changed on disk: the node's voxels are sent instead
    assert bridge.source_file(node) is None
    job = logic.start(node, ReconstructionOptions())
    command = job.process.command
    job.discard()
    assert command[command.index("reconstruct") + 1].endswith("radiograph.nrrd")


def test_samples_give_an_uncertainty_node_and_drr_turns_style_off(bridge, scene, logic, sample):
    from XctDiffSlicerLib.logic import ReconstructionOptions

    _, drr = sample
    drr_node = bridge.radiograph_to_node(scene, drr, spacing=(2.5, 2.5), name="drr", is_drr=True)
    job = logic.start(drr_node, ReconstructionOptions(samples=3, seed=7))
    command = job.process.command
    assert command[command.index("--style") + 1] == "off"  # auto -> off for a DRR
    assert command[command.index("--samples") + 1] == "3" and "--uncertainty" in command
    assert "--steps" not in command and "--model" not in command
    finished = job.process.wait(timeout=60)
    output = logic.load_result(job, finished)
    assert output.uncertainty_node is not None
    assert output.uncertainty_node.GetImageData().GetDimensions() == (128, 128, 128)
    assert output.consistency == pytest.approx(0.875) and output.device == "cpu"
    np.testing.assert_allclose(bridge.ijk_to_ras(output.uncertainty_node), bridge.ijk_to_ras(output.ct_node))

    film = bridge.radiograph_to_node(scene, drr, name="film")
    job = logic.start(film, ReconstructionOptions(samples=1, steps=10, style="auto"))
    command = job.process.command
    assert command[command.index("--style") + 1] == "auto" and "--uncertainty" not in command
    assert command[command.index("--steps") + 1] == "10" and "--method" not in command  # the model's default
    job.cancel()
    assert job.process.wait(timeout=10).status == "cancelled"
    with pytest.raises(XctDiffError, match="cancelled"):
        logic.load_result(job, job.process.finished)
    assert not job.folder.exists()


def test_a_one_sample_run_marks_the_earlier_uncertainty_map_as_the_earlier_runs(bridge, scene, logic, sample):
    """Two samples made 'drr uncertainty (XctDiff)' beside 'drr synthetic CT'; a second run of one sample into the
    same CT node made no map and left the first one named as the new CT's, its std from another reconstruction."""
    from XctDiffSlicerLib.logic import ReconstructionOptions

    _, drr = sample
    drr_node = bridge.radiograph_to_node(scene, drr, spacing=(2.5, 2.5), name="drr", is_drr=True)
    job = logic.start(drr_node, ReconstructionOptions(samples=2, seed=1))
    first = logic.load_result(job, job.process.wait(timeout=60))
    name = first.uncertainty_node.GetName()
    job = logic.start(drr_node, ReconstructionOptions(samples=1), first.ct_node, first.uncertainty_node)
    second = logic.load_result(job, job.process.wait(timeout=60), first.ct_node, first.uncertainty_node)
    assert second.ct_node is first.ct_node and second.uncertainty_node is None
    stale = first.uncertainty_node
    assert stale.GetName() == f"{name} (earlier run)"
    assert stale.GetDescription().startswith(f"of an earlier reconstruction, not of the CT now in '{second.ct_node.GetName()}'")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")  # chosen as the map, never filled: untouched
    job = logic.start(drr_node, ReconstructionOptions(samples=1), first.ct_node, empty)
    logic.load_result(job, job.process.wait(timeout=60), first.ct_node, empty)
    assert empty.GetName() == "empty" and not empty.GetDescription()


def test_the_seed_of_the_run_reaches_the_panel(bridge, scene, logic, sample):
    from XctDiffSlicerLib.logic import ReconstructionOptions

    drr_node = bridge.radiograph_to_node(scene, sample[1], spacing=(2.5, 2.5), is_drr=True)
    for given, reported in ((None, 1234), (7, 7)):  # drawn by the engine, or given
        job = logic.start(drr_node, ReconstructionOptions(seed=given))
        output = logic.load_result(job, job.process.wait(timeout=60))
        assert (output.seed, output.method) == (reported, "diffusion")


def test_discarding_a_running_job_kills_it_and_removes_its_files(bridge, scene, logic, sample, monkeypatch):
    """What the panel's cleanup() does with a running job: no child left, no radiograph left in /tmp."""
    from XctDiffSlicerLib.logic import ReconstructionOptions

    monkeypatch.setenv(MODE_VARIABLE, "hang")
    job = logic.start(bridge.radiograph_to_node(scene, sample[1]), ReconstructionOptions())
    assert (job.folder / "radiograph.nrrd").is_file() and job.process.running
    job.discard()
    assert not job.folder.exists()
    assert job.process._process.poll() is not None  # the child is gone, not merely signalled


def test_into_an_existing_output_node(bridge, scene, logic, sample):
    _, drr = sample
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my CT")
    drr_node = bridge.radiograph_to_node(scene, drr, spacing=(2.5, 2.5), is_drr=True)
    assert logic.reconstruct(drr_node, outputNode=target) is target
    assert target.GetName() == "my CT" and target.GetImageData().GetDimensions() == (128, 128, 128)


def test_a_ct_node_of_an_earlier_film_is_renamed_and_leaves_that_patients_study(bridge, scene, logic, sample):
    """The panel offers the last CT node as the output: the next film's CT must not keep the first patient's
    name, nor stay in the first patient's study (Export to DICOM would file it there)."""
    _, drr = sample
    hierarchy = scene.GetSubjectHierarchyNode()
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient A"), "Chest")
    film_a = bridge.radiograph_to_node(scene, drr, spacing=(2.5, 2.5), name="film A", is_drr=True)
    hierarchy.CreateItem(study, film_a)
    ct = logic.reconstruct(film_a, steps=2, seed=0, device="cpu")
    assert ct.GetName() == "film A synthetic CT (XctDiff)" and hierarchy.GetItemParent(hierarchy.GetItemByDataNode(ct)) == study
    film_b = bridge.radiograph_to_node(scene, drr, spacing=(2.5, 2.5), name="film B", is_drr=True)
    assert logic.reconstruct(film_b, outputNode=ct, steps=2, seed=0, device="cpu") is ct
    assert ct.GetName() == "film B synthetic CT (XctDiff)"
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(ct)) == hierarchy.GetSceneItemID()


def test_an_output_that_cannot_be_loaded_leaves_no_node(bridge, scene, logic, sample):
    """A label map chosen as the output, or a RESULT line the module does not understand: one sentence, the
    label map untouched, no new node."""
    import dataclasses

    from XctDiffSlicerLib.logic import ReconstructionOptions

    film = bridge.radiograph_to_node(scene, sample[1], spacing=(2.5, 2.5), is_drr=True)
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    with pytest.raises(XctDiffError, match="'labels' .vtkMRMLLabelMapVolumeNode. cannot hold a CT"):
        logic.reconstruct(film, outputNode=labels, steps=2, seed=0, device="cpu")
    assert labels.GetImageData() is None
    job = logic.start(film, ReconstructionOptions(steps=2, seed=0, device="cpu"))
    finished = job.process.wait(timeout=300)
    broken = dataclasses.replace(finished, result={**finished.result, "timings": None, "consistency": "high"})
    before = scene.GetNumberOfNodes()
    with pytest.raises(XctDiffError, match="RESULT line is not understood"):
        logic.load_result(job, broken)
    assert scene.GetNumberOfNodes() == before and not job.folder.exists()


def test_a_node_that_is_no_film_does_not_cost_the_waiting_engine(bridge, scene, logic, sample, monkeypatch):
    """The engine started ahead is taken only for a film: a 3D CT clicked by mistake is refused before."""
    from XctDiffSlicerLib.logic import ReconstructionOptions

    taken = []
    monkeypatch.setattr(logic, "_take_standby", lambda model: taken.append(model))
    ct = bridge.volume_to_node(scene, sample[0], name="earlier CT")
    with pytest.raises(XctDiffError, match="'earlier CT' is not a radiograph"):
        logic.start(ct, ReconstructionOptions())
    assert taken == []


def test_engine_error_reaches_the_console_as_one_sentence(bridge, scene, logic, sample, monkeypatch):
    monkeypatch.setenv(MODE_VARIABLE, "error")
    drr_node = bridge.radiograph_to_node(scene, sample[1])
    with pytest.raises(XctDiffError) as info:
        logic.reconstruct(drr_node)
    assert str(info.value) == "cannot read radiograph.nrrd as a radiograph: not an image"
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1  # no half output node


@pytest.mark.parametrize(
    "options, message",
    [
        ({"samples": 0}, "samples"),
        ({"steps": 0}, "steps"),
        ({"device": "tpu"}, "device"),
        ({"style": "maybe"}, "style"),
        ({"method": "guess"}, "method must be one of default, diffusion, direct"),
        ({"method": "direct", "samples": 2}, "the direct method makes one deterministic CT"),
    ],
)
def test_bad_options_are_refused_before_any_process(slicer, options, message):
    from XctDiffSlicerLib.logic import ReconstructionOptions

    with pytest.raises(XctDiffError, match=message):
        ReconstructionOptions(**options)


def test_a_chosen_method_reaches_the_engine(slicer):
    from XctDiffSlicerLib.logic import ReconstructionOptions

    for method in ("diffusion", "direct"):
        args = ReconstructionOptions(method=method).engine_arguments()
        assert args[args.index("--method") + 1] == method


def test_no_input_node_is_a_readable_error(logic):
    with pytest.raises(XctDiffError, match="radiograph"):
        logic.reconstruct(None)


def readme_console_example() -> str:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    examples = [block for block in blocks if "ReconstructionLogic" in block]
    assert len(examples) == 1, "README.md must hold exactly one console example"
    return examples[0]


def test_readme_console_example_runs_as_written_under_slicer_core(slicer, tmp_path):
    """The README's console example, verbatim, with the real engine and the bundled model."""
    script = tmp_path / "example.py"
    script.write_text(readme_console_example(), encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "XctDiffSlicer"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    assert done.returncode == 0, f"README example failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert "(128, 128, 128) (2.5, 2.5, 2.5)" in done.stdout


def test_the_next_job_runs_in_the_engine_started_ahead(slicer, bridge, scene, sample, tmp_path, monkeypatch):
    """With the real engine the logic starts the next job's engine ahead (`xctdiff standby`) when asked (the
    panel asks when it opens and after each job): a job is handed to it instead of a new process. One started
    for another model is not used but stopped; XCTDIFF_STANDBY=0 turns the whole thing off."""
    from XctDiffSlicerLib.logic import STANDBY_VARIABLE, ReconstructionLogic, ReconstructionOptions
    from XctDiffSlicerLib.models import BUNDLED, choose_model

    from XctDiffCore.model_folder import create_random_model

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setenv(STANDBY_VARIABLE, "0")
    assert not ReconstructionLogic(scene).standby
    monkeypatch.delenv(STANDBY_VARIABLE)
    logic = ReconstructionLogic(scene)
    options = ReconstructionOptions(model=choose_model(create_random_model(tmp_path / "tiny", "tiny")), steps=2,
                                    seed=0, device="cpu")
    try:
        logic.prepare_standby(options.model)
        _, folder, standby = logic._standby
        logic.prepare_standby(options.model)  # one is ready: no second engine
        assert logic._standby[2] is standby and standby.command[-2:] == ["--model", str(options.model.folder)]
        job = logic.start(bridge.radiograph_to_node(scene, sample[1], spacing=(2.5, 2.5), is_drr=True), options)
        assert job.process is standby and job.folder == folder
        output = logic.load_result(job, job.process.wait(timeout=300))
        assert output.ct_node.GetImageData().GetDimensions() == (128, 128, 128) and output.seed == 0
        assert logic._standby is None and not folder.exists()  # a console call leaves no engine, no files behind
        logic.prepare_standby(options.model)
        _, folder, following = logic._standby
        assert following is not standby and following.running
        assert logic._take_standby(BUNDLED) is None  # started for another model: stopped, not used
        assert following.join(10) and logic._standby is None and not folder.exists()
        logic.prepare_standby(options.model)
        _, folder, last = logic._standby
        logic.shutdown()  # the panel closes
        assert last.join(0) and not folder.exists()
    finally:
        logic.shutdown()


def test_an_engine_that_cannot_start_ahead_leaves_the_click_to_say_why(slicer, scene, monkeypatch):
    """prepare_standby is called after every job: a launcher that cannot start (a broken install) must not
    hide the result being loaded; no standby, no folder left, and the next click reports the problem."""
    from XctDiffSlicerLib import logic as logic_module
    from XctDiffSlicerLib.models import BUNDLED

    folders = []
    real_mkdtemp = logic_module.tempfile.mkdtemp
    monkeypatch.setattr(logic_module.tempfile, "mkdtemp", lambda **k: folders.append(real_mkdtemp(**k)) or folders[-1])
    logic = logic_module.ReconstructionLogic(scene, standby=True)
    logic.engine_command = ["/no/such/python", "-m", "XctDiffCore"]
    logic.prepare_standby(BUNDLED)
    assert logic._standby is None and folders and not any(os.path.exists(f) for f in folders)


def test_job_folders_of_a_crashed_session_are_removed(slicer, tmp_path):
    """A crash leaves `xctdiff-*` folders holding a patient's film: the next logic removes those a day old."""
    import time

    from XctDiffSlicerLib.logic import remove_stale_job_folders

    old, new, other = tmp_path / "xctdiff-old", tmp_path / "xctdiff-new", tmp_path / "other-old"
    for folder in (old, new, other):
        folder.mkdir()
        (folder / "radiograph.nrrd").write_bytes(b"pixels")
    day_ago = time.time() - 25 * 3600
    for folder in (old, other):
        os.utime(folder, (day_ago, day_ago))
    elsewhere = tmp_path / "elsewhere"  # a link named like a job folder is not one: never followed, not listed
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("x")
    os.utime(elsewhere, (day_ago, day_ago))
    (tmp_path / "xctdiff-link").symlink_to(elsewhere)
    assert remove_stale_job_folders(str(tmp_path)) == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "other-old", "xctdiff-link", "xctdiff-new"]
    assert (elsewhere / "keep").is_file()


STANDBY_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-m", "XctDiffCore", "standby", "--job-file", sys.argv[1], "--model",
                          sys.argv[2], "--idle-minutes", "10"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # no closed pipe to end it instead
print(child.pid, flush=True)
time.sleep(5)  # the child notes its parent first thing; then the parent ends, as a crashed Slicer would
"""


def test_an_engine_waiting_ahead_ends_with_the_process_that_started_it(slicer, tmp_path):
    """Started in its own session, a standby engine would hold its memory for its 30 idle minutes after a
    Slicer crash; it watches its parent and leaves with it."""
    import time

    from XctDiffCore.model_folder import create_random_model

    model = create_random_model(tmp_path / "tiny", "tiny")
    parent = subprocess.run([sys.executable, "-c", STANDBY_PARENT, str(tmp_path / "job.json"), str(model)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    pid = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{pid}/status", encoding="utf-8").read()
        except OSError:
            break  # gone
        if "\nState:\tZ" in state:
            break  # ended; nobody has reaped it yet
        time.sleep(0.5)
    else:
        os.kill(pid, 9)
        pytest.fail("the standby engine outlived the process that started it by 2 minutes")


# --- what a console script or a changed scene can hand the logic (a reliability fuzz's findings) ----------


@pytest.mark.parametrize("what, message", [
    ("model", "'model' .vtkMRMLModelNode. is not a radiograph"),
    ("name", "str 'film' .slicer.util.getNode.name. gives the node of a name. is not a radiograph"),
    ("labels", "'labels' .vtkMRMLLabelMapVolumeNode. is not a radiograph"),
    ("removed", "'film' is not in the scene .was it removed.."),
    ("other scene", "'film' is not in the scene"),
])
def test_an_input_that_is_no_film_of_the_scene_is_one_sentence(slicer, bridge, scene, logic, what, message):
    """A name typed for a node, a model or a label map, a node removed or of another scene: one sentence, no
    process (they raised AttributeError, or reconstructed a label map, or a film the scene no longer holds)."""
    from XctDiffSlicerLib.logic import ReconstructionOptions

    image = np.ones((40, 30), np.float32)
    if what == "model":
        node = scene.AddNewNodeByClass("vtkMRMLModelNode", "model")
    elif what == "name":
        node = bridge.radiograph_to_node(scene, image, name="film").GetName()
    elif what == "labels":
        labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        node = bridge.radiograph_to_node(scene, image, node=labels)
    elif what == "removed":
        node = bridge.radiograph_to_node(scene, image, name="film")
        scene.RemoveNode(node)
    else:
        node = bridge.radiograph_to_node(slicer.vtkMRMLScene(), image, name="film")
    with pytest.raises(XctDiffError, match=message):
        logic.start(node, ReconstructionOptions())
    assert not list(Path(tempfile.gettempdir()).glob("xctdiff-*"))  # no job folder made


@pytest.mark.parametrize("output, uncertainty, message", [
    ("film", None, "'film' is the input film"),
    (None, "film", "'film' is the input film"),
    ("text", None, "an output must be a volume node, or None for a new one; got str 'my CT'"),
    ("removed", None, "'old CT' is not in the scene"),
    ("other scene", None, "'old CT' is not in the scene"),
    ("ct", "ct", "'ct' cannot hold both the CT and its uncertainty"),
])
def test_outputs_that_cannot_take_the_result_are_refused_before_the_run(slicer, bridge, scene, logic, output,
                                                                         uncertainty, message, monkeypatch):
    """The film as its own output (it was overwritten by its CT), one node for both results (the CT was lost to
    the map), a name, a removed node or one of another scene (AttributeError, or a CT no view can show)."""
    film = bridge.radiograph_to_node(scene, np.arange(1200, dtype=np.float32).reshape(40, 30), name="film")
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    removed = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "old CT")
    scene.RemoveNode(removed)
    nodes = {None: None, "film": film, "text": "my CT", "removed": removed, "ct": ct,
             "other scene": slicer.vtkMRMLScene().AddNewNodeByClass("vtkMRMLScalarVolumeNode", "old CT")}
    monkeypatch.setattr(logic, "start", lambda *a: pytest.fail("a job started"))
    before = scene.GetNumberOfNodes()
    with pytest.raises(XctDiffError, match=message):
        logic.reconstruct(film, outputNode=nodes[output], uncertaintyNode=nodes[uncertainty], samples=2)
    assert scene.GetNumberOfNodes() == before and bridge.node_array(film).shape == (1, 40, 30)


def test_an_output_node_removed_while_the_job_ran_leaves_nothing(bridge, scene, logic, sample):
    from XctDiffSlicerLib.logic import ReconstructionOptions

    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my CT")
    job = logic.start(bridge.radiograph_to_node(scene, sample[1], spacing=(2.5, 2.5), is_drr=True),
                      ReconstructionOptions())
    scene.RemoveNode(target)
    finished = job.process.wait(timeout=60)
    before = scene.GetNumberOfNodes()
    with pytest.raises(XctDiffError, match="'my CT' is not in the scene"):
        logic.load_result(job, finished, target)  # was AttributeError from the removed node's display
    assert scene.GetNumberOfNodes() == before and not job.folder.exists()


def test_load_result_before_the_job_has_finished_keeps_its_files(bridge, scene, logic, sample, monkeypatch):
    from XctDiffSlicerLib.logic import ReconstructionOptions

    monkeypatch.setenv(MODE_VARIABLE, "hang")
    job = logic.start(bridge.radiograph_to_node(scene, sample[1]), ReconstructionOptions())
    try:
        with pytest.raises(XctDiffError, match="load_result takes the job's Finished event"):
            logic.load_result(job, None)
        assert job.folder.is_dir() and job.process.running
    finally:
        job.discard()


def test_the_model_is_a_folder_a_choice_or_none_everywhere(slicer, scene, tmp_path):
    """ReconstructionOptions(model=<path>), reconstruct(model=<ModelChoice>), prepare_standby(None): each was an
    AttributeError or TypeError; a number is one sentence."""
    from XctDiffSlicerLib.logic import ReconstructionLogic, ReconstructionOptions
    from XctDiffSlicerLib.models import BUNDLED, choose_model

    bundled = REPO / "Resources" / "Models" / "xctdiff-cpu"
    assert ReconstructionOptions(model=str(bundled)).model == choose_model(bundled)
    assert ReconstructionOptions(model=None).model is BUNDLED
    assert choose_model(choose_model(bundled)) == choose_model(bundled)
    with pytest.raises(XctDiffError, match="model must be a model folder's path .or None for the bundled .*, got 123"):
        ReconstructionOptions(model=123)
    ReconstructionLogic(scene, engine_command=["true"]).prepare_standby(None)  # standby off: nothing, no error


def test_a_progress_that_is_no_function_is_refused_before_the_run(bridge, scene, logic, monkeypatch):
    monkeypatch.setattr(logic, "start", lambda *a: pytest.fail("a job started"))
    with pytest.raises(XctDiffError, match="progress must be a function of .fraction, stage., got 'yes'"):
        logic.reconstruct(bridge.radiograph_to_node(scene, np.ones((40, 30), np.float32)), progress="yes")


def test_a_result_line_with_odd_warnings_is_read(slicer):
    from XctDiffSlicerLib.logic import _result_fields

    assert _result_fields({"consistency": 0.5, "warnings": 5})["warnings"] == ()  # was TypeError
    assert _result_fields({"warnings": ["small film", 3]})["warnings"] == ("small film",)


def test_an_engine_that_cannot_start_is_named(bridge, scene, tmp_path, monkeypatch):
    from XctDiffSlicerLib.logic import ReconstructionLogic

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    logic = ReconstructionLogic(scene, engine_command=["/no/such/python"])
    with pytest.raises(XctDiffError, match="cannot prepare the job: No such file or directory: /no/such/python"):
        logic.reconstruct(bridge.radiograph_to_node(scene, np.ones((40, 40), np.float32)))
    assert not list(tmp_path.iterdir())


def test_standby_spellings_an_unwritable_temp_folder_and_a_dropped_logic(slicer, scene, tmp_path, monkeypatch):
    """XCTDIFF_STANDBY=false left standby on; a temporary folder that cannot be made raised from prepare_standby
    (after every job, in the panel); a console logic dropped without shutdown() left its engine waiting."""
    import gc

    from XctDiffSlicerLib import logic as logic_module
    from XctDiffSlicerLib.models import BUNDLED

    for value, on in (("false", False), (" OFF", False), ("no", False), ("0", False), ("1", True)):
        monkeypatch.setenv(logic_module.STANDBY_VARIABLE, value)
        assert logic_module.ReconstructionLogic(scene).standby is on
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]  # waits as a standby engine would
    logic = logic_module.ReconstructionLogic(scene, engine_command=sleeper, standby=True)

    def refused(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(logic_module.tempfile, "mkdtemp", refused)
    logic.prepare_standby(BUNDLED)
    assert logic._standby is None
    monkeypatch.undo()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    logic.prepare_standby(BUNDLED)
    _, folder, process = logic._standby
    del logic
    gc.collect()
    assert process.join(10) and not folder.exists()


def test_the_engines_warnings_reach_a_console_script(bridge, scene, logic, sample, monkeypatch, caplog):
    """The panel shows the engine's warnings (an implausible film) under the score; reconstruct() returned the CT
    node alone, and a script was never told."""
    monkeypatch.setenv(MODE_VARIABLE, "warn")
    with caplog.at_level("WARNING"):
        logic.reconstruct(bridge.radiograph_to_node(scene, sample[1], spacing=(2.5, 2.5), is_drr=True))
    assert [record.getMessage() for record in caplog.records] == ["XctDiff: a warning for the test"]


def test_a_model_exported_again_into_its_folder_is_not_run_by_the_engine_waiting_with_the_old_one(slicer, scene,
                                                                                                   tmp_path, monkeypatch):
    """The waiting engine loaded the model when it started; a model written over it since (a new export into the
    same folder) was run with the old weights, silently. Its manifest changed: that engine is stopped instead."""
    import json

    from XctDiffSlicerLib.logic import ReconstructionLogic
    from XctDiffSlicerLib.models import choose_model

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    folder = tmp_path / "model"
    folder.mkdir()
    stages = {stage: {"weights": f"{stage}.safetensors", "config": f"{stage}.json"} for stage in ("autoencoder", "encoder", "diffusion")}
    names = [name for record in stages.values() for name in record.values()]
    for name in names:  # the panel's choice checks that they are there, not what they hold
        (folder / name).write_bytes(b"")
    manifest = {"id": "mine", "version": "1", "stages": stages, "sha256": dict.fromkeys(names, "0" * 64)}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    model = choose_model(folder)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]  # waits as a standby engine would
    logic = ReconstructionLogic(scene, engine_command=sleeper, standby=True)
    try:
        logic.prepare_standby(model)
        _, job_folder, first = logic._standby
        (folder / "manifest.json").write_text(json.dumps({**manifest, "version": "2.0"}), encoding="utf-8")
        assert logic._take_standby(choose_model(folder)) is None  # not handed the job: stopped, folder removed
        assert first.join(10) and not job_folder.exists()
    finally:
        logic.shutdown()


def test_a_job_handed_as_the_waiting_engine_leaves_runs_in_a_fresh_one(bridge, scene, logic, sample, tmp_path):
    """The engine waiting ahead gives up (30 idle minutes) in the very instant the click hands it the job: it makes
    its job file's name a folder first (`xctdiff standby`), so the job cannot land there, and the click starts a
    fresh engine instead of waiting on one that is gone ("ended without a result")."""
    import tempfile

    from XctDiffSlicerLib.logic import JOB_NAME
    from XctDiffSlicerLib.models import choose_model
    from XctDiffSlicerLib.process import ChildProcess

    folder = Path(tempfile.mkdtemp(prefix="xctdiff-"))
    leaving = ChildProcess([sys.executable, "-c", "import time; time.sleep(60)"]).start()  # still running...
    (folder / JOB_NAME).mkdir()  # ... but its door is closed
    logic._standby = (logic._standby_key(choose_model()), folder, leaving)
    node = logic.reconstruct(bridge.radiograph_to_node(scene, sample[1], spacing=(2.5, 2.5), is_drr=True))
    assert node.GetImageData().GetDimensions() == (128, 128, 128)
    assert leaving.join(10) and not folder.exists()


def test_the_engines_warnings_stay_with_the_ct_node(bridge, scene, logic, sample, monkeypatch):
    """A CT the engine warned about (an implausible film, an unreliable result) says so in its node's description,
    which the scene saves: the panel's score line shows the last run's alone, and it was the only place they were.
    A node reused for a run without warnings loses them."""
    _, drr = sample
    monkeypatch.setenv(MODE_VARIABLE, "warn")
    film = bridge.radiograph_to_node(scene, drr, spacing=(2.5, 2.5), name="film", is_drr=True)
    ct = logic.reconstruct(film, samples=2)
    uncertainty = scene.GetFirstNodeByName("film uncertainty (XctDiff)")
    for node in (ct, uncertainty):
        assert node.GetDescription().endswith("research use, not diagnosis; warning: a warning for the test")
    monkeypatch.setenv(MODE_VARIABLE, "ok")
    assert logic.reconstruct(film, outputNode=ct) is ct
    assert "warning" not in ct.GetDescription()


@pytest.mark.parametrize("which", ["output", "uncertainty"])
def test_an_output_node_holding_a_scan_is_refused_before_the_run(bridge, scene, logic, sample, which):
    """The output selector lists every volume, the patient's real CT (loaded for its AP diameter) too: chosen as the
    output it was replaced by the synthetic CT under its own name ('LIDC CT'), the scan lost to the scene and, saved,
    to its file. Refused in one sentence before any process (the panel's start too); an empty node is taken."""
    from XctDiffSlicerLib.logic import ReconstructionOptions

    ct, drr = sample
    film = bridge.radiograph_to_node(scene, drr, spacing=(2.5, 2.5), name="film", is_drr=True)
    scan = bridge.volume_to_node(scene, ct, name="LIDC CT")
    outputs = {"outputNode": scan} if which == "output" else {"uncertaintyNode": scan, "samples": 2}
    message = "'LIDC CT' holds a volume XctDiff did not make .a scan.., which the result would replace"
    with pytest.raises(XctDiffError, match=message):
        logic.reconstruct(film, **outputs)
    with pytest.raises(XctDiffError, match=message):
        logic.start(film, ReconstructionOptions(), **{"output_node" if which == "output" else "uncertainty_node": scan})
    assert not list(Path(tempfile.gettempdir()).glob("xctdiff-*"))  # no job started
    np.testing.assert_array_equal(bridge.node_array(scan), ct.array)
    assert scan.GetName() == "LIDC CT" and scan.GetAttribute("XctDiff.Synthetic") is None


def _partial(folder):
    """An autoencoder-only folder (Resources/Pretrained/xctdiff-cpu-autoencoder's kind)."""
    import json

    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    for stage in ("encoder", "diffusion"):
        manifest["stages"].pop(stage)
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def _edited(key, value):
    def edit(folder):
        import json

        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        manifest[key] = value
        (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        return folder

    return edit


PANEL_REFUSALS = {  # what a clinician may be handed as a model folder -> (how it is made, words of the sentence)
    "partial (autoencoder only)": (_partial, "a partial model folder, which cannot reconstruct"),
    "its manifest": (lambda folder: folder / "manifest.json", "give the folder that holds it"),
    "a zip of it": (lambda folder: Path(__import__("shutil").make_archive(str(folder), "zip", folder)), "unpack it"),
    "copied without a file": (lambda folder: (folder / "style.safetensors").unlink() or folder, "model file missing"),
    "a newer model format": (_edited("format", 2), "made by a newer XctDiff"),
    "grid edited by hand": (_edited("data", {"volume_size": "128"}), "data.volume_size must be a whole number"),
    "encoder of another autoencoder": (_edited("retrain", ["encoder", "diffusion"]), "learnt another autoencoder's latents"),
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from XctDiffCore.model_folder import create_random_model

    return create_random_model(tmp_path_factory.mktemp("model") / "tiny model é", "tiny")


@pytest.mark.parametrize("case", list(PANEL_REFUSALS))
def test_the_panel_refuses_a_bad_model_folder_with_the_engines_sentence(slicer, tiny_model, tmp_path, case):
    """The panel's model choice accepted a partial folder, a folder of a newer format, one copied without a file or
    with a grid edited by hand, and one whose encoder learnt another autoencoder (only the engine refused them, after
    the click had started it), and called a file of the folder or a zip of it 'model folder not found'. It now says
    what the engine would, before any process starts."""
    import shutil

    from XctDiffSlicerLib.logic import ReconstructionOptions
    from XctDiffSlicerLib.models import choose_model

    from XctDiffCore.model_folder import load_model_folder

    make, words = PANEL_REFUSALS[case]
    given = make(Path(shutil.copytree(tiny_model, tmp_path / "shared model")))
    with pytest.raises(XctDiffError) as panel:
        choose_model(given)
    assert words in str(panel.value) and "\n" not in str(panel.value)
    with pytest.raises(XctDiffError) as engine:
        load_model_folder(given)
    assert str(panel.value) == str(engine.value)
    with pytest.raises(XctDiffError, match=re.escape(str(panel.value))):
        ReconstructionOptions(model=str(given))  # the console's reconstruct(model=...) too
    assert choose_model(tiny_model).label == f"random seed0 ({tiny_model.resolve()})"  # a whole folder, non-ASCII path
