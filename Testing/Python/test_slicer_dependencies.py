"""First-use checks of the Slicer module: packages to install (never Slicer's own), the model folder
choice, and the device probe that runs torch in a child process."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from XctDiffCore.errors import XctDiffError
from XctDiffSlicerLib import dependencies, device_probe
from XctDiffSlicerLib.models import BUNDLED, choose_model


def write_requirements(tmp_path, text: str):
    path = tmp_path / "requirements.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_read_requirements_and_normalise_names(tmp_path):
    path = write_requirements(tmp_path, "# comment\nPyYAML >= 6  # inline\n\nscikit_image>=0.20\ntorch\n")
    requirements = dependencies.read_requirements(path)
    assert [(r.name, r.specifier, r.key) for r in requirements] == [
        ("PyYAML", ">=6", "pyyaml"), ("scikit_image", ">=0.20", "scikit-image"), ("torch", "", "torch"),
    ]


def test_module_requirements_are_met_in_the_test_environment():
    assert dependencies.unmet(dependencies.read_requirements()) == []


def test_unmet_lists_missing_and_out_of_range_but_never_slicer_packages_or_torch(tmp_path):
    path = write_requirements(
        tmp_path,
        "xctdiff-surely-not-installed>=1\ntqdm>=999\ntqdm>=4\nnumpy>=999\nSimpleITK>=999\nvtk>=1\ntorch>=999\n",
    )
    assert [str(r) for r in dependencies.unmet(dependencies.read_requirements(path))] == [
        "xctdiff-surely-not-installed>=1", "tqdm>=999",
    ]


def slicer_pip_arguments(requirements) -> list:
    """What ``slicer.util.pip_install`` makes of its argument: a string split by shlex as a POSIX shell would, a
    list taken as it is."""
    return shlex.split(requirements) if isinstance(requirements, str) else list(requirements)


def test_install_is_constrained_to_the_installed_slicer_packages(tmp_path, monkeypatch):
    """The temporary folder of a Windows network profile (%TEMP% on \\\\server\\...): a string for pip_install
    lost half its backslashes in Slicer's shlex split, and pip could not find the constraints file."""
    calls = []

    def pip_install(requirements):
        arguments = slicer_pip_arguments(requirements)
        calls.append((arguments, open(arguments[1], encoding="utf-8").read()))

    backslashed = tmp_path / "\\\\server\\temp"  # a legal name on Linux, with a UNC path's backslashes
    backslashed.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(backslashed))
    requirements = dependencies.read_requirements(write_requirements(tmp_path, "pynrrd>=1.0\nnumpy>=2\ntorch\n"))
    dependencies.install_requirements(requirements, pip_install)
    (arguments, constraints), = calls
    assert arguments[0] == "-c" and arguments[2:] == ["pynrrd>=1.0"]
    assert "numpy>=2" not in arguments and "torch" not in arguments
    assert f"numpy=={dependencies.installed_version('numpy')}" in constraints.splitlines()
    assert f"SimpleITK=={dependencies.installed_version('SimpleITK')}".lower() in constraints.lower()


def test_pip_failure_and_refusal_are_one_sentence(tmp_path, monkeypatch):
    def failing_pip(arguments):
        raise subprocess.CalledProcessError(1, ["pip", "install"])

    requirements = [dependencies.Requirement("xctdiff-surely-not-installed", ">=1")]
    with pytest.raises(XctDiffError, match="pip could not install xctdiff-surely-not-installed>=1"):
        dependencies.install_requirements(requirements, failing_pip)

    def chatty_pip(arguments):
        raise RuntimeError("ERROR: No matching distribution found\n  Collecting ...\n  (traceback follows)")

    with pytest.raises(XctDiffError) as info:
        dependencies.install_requirements(requirements, chatty_pip)
    assert str(info.value) == ("pip could not install xctdiff-surely-not-installed>=1: "
                               "ERROR: No matching distribution found")  # one line, as the panel shows it

    path = write_requirements(tmp_path, "torch\nxctdiff-surely-not-installed>=1\n")
    asked = []
    with pytest.raises(XctDiffError, match="missing Python packages: xctdiff-surely-not-installed>=1"):
        dependencies.ensure_dependencies(lambda text: asked.append(text) or False, failing_pip, path)
    assert "Install them now?" in asked[0]


def test_missing_torch_without_the_pytorch_extension_says_what_to_do(tmp_path, monkeypatch):
    real = dependencies.installed_version
    monkeypatch.setattr(dependencies, "installed_version", lambda name: None if name == "torch" else real(name))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the extension is not installed: import fails
    path = write_requirements(tmp_path, "torch>=2.1\n")
    with pytest.raises(XctDiffError, match="'PyTorch' extension"):
        dependencies.ensure_dependencies(lambda text: True, lambda arguments: None, path)


def test_model_choice(tmp_path):
    assert choose_model(None) is BUNDLED and choose_model("") is BUNDLED
    assert BUNDLED.engine_arguments() == [] and "bundled" in BUNDLED.label
    with pytest.raises(XctDiffError, match="model folder not found"):
        choose_model(tmp_path / "nowhere")
    with pytest.raises(XctDiffError, match="no manifest.json"):
        choose_model(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(XctDiffError, match="cannot read"):
        choose_model(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"id": "xctdiff-tiny", "version": "0.1.0"}), encoding="utf-8")
    with pytest.raises(XctDiffError, match="has no 'stages' section"):  # the engine would refuse it: so does the panel
        choose_model(tmp_path)
    stages = {stage: {"weights": f"{stage}.safetensors", "config": f"{stage}.json"} for stage in ("autoencoder", "encoder", "diffusion")}
    names = [name for record in stages.values() for name in record.values()]
    for name in names:  # the panel checks that they are there; their SHA-256 is the engine's to verify
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "manifest.json").write_text(json.dumps({"id": "xctdiff-tiny", "version": "0.1.0", "stages": stages,
                                                        "sha256": dict.fromkeys(names, "0" * 64)}), encoding="utf-8")
    model = choose_model(tmp_path)
    assert (model.model_id, model.version) == ("xctdiff-tiny", "0.1.0")
    assert model.engine_arguments() == ["--model", str(tmp_path.resolve())]


def test_device_probe_runs_torch_in_a_child_and_explains_a_missing_gpu():
    from XctDiffSlicerLib.logic import core_parent_folder
    from XctDiffSlicerLib.process import engine_environment

    done = subprocess.run([sys.executable, device_probe.__file__], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=120, env=engine_environment(core_parent_folder()))
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    import torch

    assert info["torch"] == torch.__version__
    from XctDiffCore.device import cuda_problem

    assert info["cuda"] == (torch.cuda.is_available() and cuda_problem(0) is None)  # the engine's verdict
    line = device_probe.describe_device(info, "auto")
    if info["cuda"]:
        assert line.startswith("GPU 0: ")
    else:
        assert line.startswith("CPU, slow: no GPU (") and info["reason"] in line


@pytest.mark.parametrize(
    "info, device, expected",
    [
        ({"torch": "2.13.0", "cuda": True, "gpus": ["NVIDIA H100"], "reason": ""}, "auto", "GPU 0: NVIDIA H100 (PyTorch 2.13.0)"),
        ({"torch": "2.13.0", "cuda": True, "gpus": ["A", "B"], "reason": ""}, "cuda:1", "GPU 1: B (PyTorch 2.13.0)"),
        ({"torch": "2.13.0", "cuda": True, "gpus": ["A"], "reason": ""}, "cpu", "CPU (PyTorch 2.13.0)"),
        ({"torch": "2.13.0+cpu", "cuda": False, "gpus": [], "reason": "PyTorch 2.13.0+cpu is a CPU-only build"},
         "cuda", "No GPU: PyTorch 2.13.0+cpu is a CPU-only build"),
        ({"torch": None, "cuda": False, "gpus": [], "reason": "PyTorch is not installed (x)"}, "auto", "PyTorch is not installed (x)"),
        # the engine's verdict per GPU (too old, too small) wins over "torch sees a GPU"
        ({"torch": "2.13.0", "cuda": False, "gpus": ["K80"], "problems": ["GPU 0 (K80) is too old"], "reason": "GPU 0 (K80) is too old"},
         "auto", "CPU, slow: no GPU (GPU 0 (K80) is too old)"),
        ({"torch": "2.13.0", "cuda": True, "gpus": ["A", "B"], "problems": [None, "GPU 1 (B) has 2.0 GiB"], "reason": ""},
         "cuda:1", "No GPU: GPU 1 (B) has 2.0 GiB"),
    ],
)
def test_describe_device(info, device, expected):
    assert device_probe.describe_device(info, device) == expected


def test_a_broken_probe_line_or_device_name_is_no_traceback_in_the_panel():
    """The panel's timer read every stdout line starting with "{" with json.loads (a broken one raised there, and
    the probe's end was lost); a device from an edited scene file raised ValueError in describe_device."""
    assert device_probe.read_probe_line('{"torch": "2.13.0", "gpus": []}') == {"torch": "2.13.0", "gpus": []}
    assert [device_probe.read_probe_line(line) for line in ("{broken", "[1]", "Loading...", "{}")] == [None] * 3 + [{}]
    info = {"torch": "2.13.0", "cuda": True, "gpus": ["A"], "reason": ""}
    assert device_probe.describe_device(info, "cuda:x") == "No GPU: unknown device 'cuda:x'"


def test_a_broken_torch_is_said_as_such_not_as_a_failed_reconstruction(monkeypatch):
    """`import torch` raising OSError (a missing libcudnn) or a driver failing while asked: the probe's own line."""
    import builtins

    real_import = builtins.__import__

    def broken_torch(name, *args, **kwargs):
        if name == "torch":
            raise OSError("libcudnn.so.9: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken_torch)
    info = device_probe.probe()
    assert info["torch"] is None and info["reason"] == ("PyTorch cannot be imported "
                                                        "(libcudnn.so.9: cannot open shared object file)")
    monkeypatch.setattr(builtins, "__import__", real_import)

    import torch

    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: (_ for _ in ()).throw(RuntimeError("CUDA driver error")))
    info = device_probe.probe()
    assert info["torch"] == torch.__version__ and not info["cuda"]
    assert info["reason"] == "the GPU check failed (CUDA driver error)"
