"""Lints of the Slicer module: the .ui holds every widget the module uses, with the class its use needs;
the module's CMake lists every script and resource and nothing else; the requirements agree."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import REPO

MODULE_DIR = REPO / "XctDiffSlicer"
MODULE_FILE = MODULE_DIR / "XctDiffSlicer.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "XctDiffSlicer.ui"
CMAKE_FILE = MODULE_DIR / "CMakeLists.txt"

# Widgets the module's code drives directly (self.ui.<name>), and the class each must be.
USED_WIDGET_CLASSES = {
    "loadRadiographButton": "QPushButton",
    "reconstructButton": "QPushButton",
    "progressBar": "QProgressBar",
    "stageLabel": "QLabel",
    "consistencyLabel": "QLabel",
    "modelInfoLabel": "QLabel",
    "deviceInfoLabel": "QLabel",
    "modelPathLineEdit": "ctkPathLineEdit",
    "modelSourceComboBox": "QComboBox",
    "deviceComboBox": "QComboBox",
    "styleComboBox": "QComboBox",
    "methodComboBox": "QComboBox",
    "coarseComboBox": "QComboBox",
    "turnComboBox": "QComboBox",
}
# Parameter-node fields that no widget shows (outputs kept for the scene).
FIELDS_WITHOUT_WIDGET = {"uncertaintyVolume", "consistency"}
QT_BUILTIN = {"QWidget", "QLabel", "QPushButton", "QComboBox", "QSpinBox", "QProgressBar", "QDoubleSpinBox", "QLineEdit", "QCheckBox"}


def ui_widgets() -> tuple:
    """({name: class}, {parameter name: widget name}, declared custom classes) from the .ui file."""
    root = ET.parse(UI_FILE).getroot()
    classes, bound = {}, {}
    for widget in root.iter("widget"):
        classes[widget.get("name")] = widget.get("class")
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("name")
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    return classes, bound, custom


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def parameter_fields() -> dict:
    """{field: annotation source} of the @parameterNodeWrapper class."""
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and any(
            isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {
                stmt.target.id: ast.unparse(stmt.annotation)
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
    raise AssertionError("no @parameterNodeWrapper class in XctDiffSlicer.py")


def widget_classes_for(annotation: str) -> set:
    """The widget classes Slicer's parameterNodeWrapper GUI connectors accept for an annotation."""
    if annotation.startswith("vtkMRML") or re.fullmatch(r"Optional\[Union\[vtkMRML\w+(, vtkMRML\w+)*\]\]", annotation):
        return {"qMRMLNodeComboBox"}
    if annotation in ("Path", "pathlib.Path"):
        return {"ctkPathLineEdit", "ctkDirectoryButton"}
    if "Choice(" in annotation:
        return {"QComboBox"}
    if annotation.startswith("Annotated[int") or annotation == "int":
        return {"QSpinBox", "QSlider"}
    if annotation.startswith("Annotated[float"):
        return {"ctkSliderWidget", "QDoubleSpinBox"}
    if annotation == "str":
        return {"QLineEdit"}
    if annotation == "bool":
        return {"QCheckBox"}
    raise AssertionError(f"no GUI connector known for {annotation}")


def test_every_widget_the_module_uses_exists_with_its_class():
    classes, _, _ = ui_widgets()
    used = {
        node.attr
        for node in ast.walk(module_tree())
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }
    assert used, "the module uses no widget: the lint would prove nothing"
    assert used == set(USED_WIDGET_CLASSES), f"update the lint table: {sorted(used ^ set(USED_WIDGET_CLASSES))}"
    for name in sorted(used):
        assert name in classes, f"self.ui.{name} is not in {UI_FILE.name}"
        assert classes[name] == USED_WIDGET_CLASSES[name], f"{name} is a {classes[name]}"


def test_every_parameter_has_a_widget_of_a_class_its_connector_accepts():
    classes, bound, _ = ui_widgets()
    fields = parameter_fields()
    assert set(bound) <= set(fields), f"widgets bound to unknown parameters: {sorted(set(bound) - set(fields))}"
    assert set(fields) - set(bound) == FIELDS_WITHOUT_WIDGET
    for parameter, widget in bound.items():
        accepted = widget_classes_for(fields[parameter])
        assert classes[widget] in accepted, f"{widget} ({classes[widget]}) cannot show {parameter}: {fields[parameter]}"


def test_combo_labels_follow_the_parameter_choices():
    """The module relabels the connector's items by index: labels and choices must line up."""
    labels = {}
    for node in module_tree().body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and node.targets[0].id.endswith("_LABELS"):
            labels[node.targets[0].id] = [ast.literal_eval(k) for k in node.value.keys]
    fields = parameter_fields()
    pairs = {"DEVICE_LABELS": "device", "STYLE_LABELS": "style", "METHOD_LABELS": "method", "COARSE_LABELS": "coarse",
             "MODEL_SOURCE_LABELS": "modelSource", "TURN_LABELS": "turn"}
    assert set(labels) == set(pairs)
    for constant, field_name in pairs.items():
        choices = ast.literal_eval(re.search(r"Choice\((\[.*?\])\)", fields[field_name]).group(1))
        assert labels[constant] == choices, constant


def test_ui_declares_its_custom_widgets_and_scene_connections():
    classes, _, custom = ui_widgets()
    assert set(classes.values()) - QT_BUILTIN <= custom
    root = ET.parse(UI_FILE).getroot()
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("signal").startswith("mrmlSceneChanged")}
    assert receivers == {name for name, cls in classes.items() if cls == "qMRMLNodeComboBox"}


def cmake_list(text: str, variable: str) -> list:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, flags=re.S)
    assert match, f"{variable} not set in {CMAKE_FILE}"
    return [item.replace("${MODULE_NAME}", "XctDiffSlicer") for item in match.group(1).split()]


def test_cmake_lists_every_script_and_resource_and_nothing_else():
    text = CMAKE_FILE.read_text(encoding="utf-8")
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    for item in scripts + resources:
        assert (MODULE_DIR / item).is_file(), f"listed but missing: {item}"
    present_scripts = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    present_resources = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert set(scripts) == present_scripts, f"unlisted or stale scripts: {sorted(set(scripts) ^ present_scripts)}"
    assert set(resources) == present_resources, f"unlisted or stale resources: {sorted(set(resources) ^ present_resources)}"
    assert len(scripts) == len(set(scripts)) and len(resources) == len(set(resources))
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}", text)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_the_extension_installs_the_engine_data_files_the_wheel_does():
    """pyproject's package data (configs, splits, the orientation checks' weights) is what the engine reads
    beside its code; the extension's glob had only the configs, so an installed Slicer engine lacked the rest."""
    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"]["XctDiffCore"]
    text = CMAKE_FILE.read_text(encoding="utf-8")
    globbed = re.search(r"file\(GLOB_RECURSE XCTDIFFCORE_RESOURCES RELATIVE \S+ CONFIGURE_DEPENDS(.*?)\)", text, re.S)
    assert globbed, "XCTDIFFCORE_RESOURCES is not globbed"
    assert sorted(item.replace("${PROJECT_SOURCE_DIR}/XctDiffCore/", "") for item in globbed.group(1).split()) == \
        sorted(patterns)
    for pattern in patterns:
        assert list((REPO / "XctDiffCore").glob(pattern)), f"package data {pattern} matches no file"


def test_top_level_cmake_builds_the_module_and_icons_exist():
    from PIL import Image

    assert "add_subdirectory(XctDiffSlicer)" in (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for icon in (REPO / "Resources" / "XctDiffSlicer.png", MODULE_DIR / "Resources" / "Icons" / "XctDiffSlicer.png"):
        with Image.open(icon) as image:
            assert image.format == "PNG" and image.size == (128, 128), icon


def requirement_names(lines) -> dict:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.match(r"[A-Za-z0-9._-]+", line).group(0)
            out[re.sub(r"[-_.]+", "-", name).lower()] = line[len(name):].replace(" ", "")
    return out


def test_slicer_requirements_are_the_engine_dependencies_less_what_slicer_ships():
    import tomllib

    engine = requirement_names(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"])
    slicer = requirement_names((MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines())
    shipped = {"numpy", "simpleitk", "vtk"}
    assert "torch" in slicer
    assert not shipped & set(slicer), "never install what Slicer ships"
    assert {k: v for k, v in slicer.items() if k != "torch"} == {k: v for k, v in engine.items() if k not in shipped}


@pytest.mark.parametrize("path", [MODULE_DIR / "XctDiffSlicerLib" / "PROTOCOL.md", REPO / "README.md"])
def test_docs_name_the_protocol_keywords(path):
    text = path.read_text(encoding="utf-8")
    for word in ("PROGRESS", "--progress-lines") if path.name == "PROTOCOL.md" else ("PyTorchUtils", "slicer-core"):
        assert word in text, f"{word} missing from {path}"


def test_leaving_the_module_removes_a_running_job_and_the_panel_shows_the_seed():
    """cleanup() must discard (kill + remove the temporary folder with the radiograph), not only cancel;
    the status after a run names the seed, so that the run can be repeated."""
    widget = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == "XctDiffSlicerWidget")
    methods = {f.name: f for f in widget.body if isinstance(f, ast.FunctionDef)}
    calls = {n.func.attr for n in ast.walk(methods["cleanup"]) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert "discard" in calls, "cleanup() leaves the job's temporary folder behind"
    source = ast.unparse(methods["_handleJobEvent"])
    assert "output.seed" in source and "seed {seed}" in source


def test_pyproject_license_is_an_spdx_string_and_the_build_backend_supports_it():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["license"] == "Apache-2.0"  # a table makes setuptools >= 77 print a deprecation box
    assert "setuptools>=77" in project["build-system"]["requires"]


def test_make_slicer_installs_the_slicer_core_of_the_test_environment():
    """`make slicer` (the README's console example without the test suite) and requirements-test.txt
    (trame-slicer's pin) must give the same slicer-core."""
    from importlib.metadata import PackageNotFoundError, requires

    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^slicer: \$\(VENV\)/\.installed-slicer$", makefile, flags=re.M)
    pinned = re.search(r"^SLICER_CORE \?= (.+)$", makefile, flags=re.M).group(1).strip()
    assert '$(PY) -m pip install -q "$(SLICER_CORE)"' in makefile
    try:
        trame = [r.split(";")[0] for r in requires("trame-slicer") if r.startswith("slicer-core")]
    except PackageNotFoundError:
        pytest.skip("trame-slicer is not installed")
    spec = lambda text: sorted(text.replace(" ", "").removeprefix("slicer-core").split(","))
    assert spec(pinned) == spec(trame[0])


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_the_standalone_ctest_refuses_a_python_without_the_test_dependencies_in_one_line(tmp_path):
    """`cmake -S . -B build && ctest` by hand took the first Python on PATH: without torch, 39 tests failed,
    each with its own `No module named torch`. Configuring now names what is missing and how to get it."""
    bare = tmp_path / "bare-python"  # this interpreter without its site-packages: no torch, no pytest
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    bare.chmod(0o755)
    configured = subprocess.run(["cmake", "-S", str(REPO), "-B", str(tmp_path / "build"), f"-DPython3_EXECUTABLE={bare}"],
                                capture_output=True, text=True, timeout=300)
    assert configured.returncode != 0
    assert re.search(r"bare-python lacks pytest, torch, numpy.*run `make test`", " ".join(configured.stderr.split())), \
        configured.stderr
    assert not (tmp_path / "build" / "CTestTestfile.cmake").exists()
    configured = subprocess.run(["cmake", "-S", str(REPO), "-B", str(tmp_path / "good"), f"-DPython3_EXECUTABLE={sys.executable}"],
                                capture_output=True, text=True, timeout=300)
    assert configured.returncode == 0, configured.stderr
    assert "test_training" in (tmp_path / "good" / "CTestTestfile.cmake").read_text()
