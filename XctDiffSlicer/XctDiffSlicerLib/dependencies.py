"""The dependency check on first use: torch (through the SlicerPyTorch extension), then the rest.

The packages come from ``Resources/requirements.txt`` beside the module. What Slicer itself ships
(numpy, SimpleITK, vtk) is never installed nor upgraded: those names are skipped, and every pip call
is constrained to their installed versions so that no other package can drag them along.
"""
from __future__ import annotations

import importlib.metadata
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from XctDiffCore.errors import XctDiffError, first_line

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
SLICER_SHIPPED = ("numpy", "simpleitk", "vtk")
TORCH = "torch"
PYTORCH_EXTENSION_MESSAGE = (
    "PyTorch is not installed. Install the 'PyTorch' extension from the Extensions Manager, "
    "restart Slicer, and reconstruct again (it then installs the right PyTorch for your GPU)."
)


@dataclass(frozen=True)
class Requirement:
    name: str  # as written in the file
    specifier: str  # e.g. ">=0.4", or ""

    @property
    def key(self) -> str:
        return normalize(self.name)

    def __str__(self) -> str:
        return f"{self.name}{self.specifier}"


def normalize(name: str) -> str:
    """PEP 503 name normalisation: ``PyYAML`` and ``pyyaml``, ``scikit_image`` and ``scikit-image`` match."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path=REQUIREMENTS_FILE) -> list:
    """``name[specifier]`` lines; comments and blank lines skipped."""
    requirements = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$", line)
        if match is None:
            raise ValueError(f"cannot parse requirement line {raw!r} in {path}")
        requirements.append(Requirement(match.group(1), match.group(2).replace(" ", "")))
    return requirements


def installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def satisfied(requirement: Requirement) -> bool:
    version = installed_version(requirement.name)
    if version is None:
        return False
    if not requirement.specifier:
        return True
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(requirement.specifier).contains(version, prereleases=True)


def unmet(requirements: Iterable[Requirement]) -> list:
    """The requirements to install: missing or out of range, torch and Slicer's own packages excepted."""
    skipped = set(SLICER_SHIPPED) | {TORCH}
    return [r for r in requirements if r.key not in skipped and not satisfied(r)]


def torch_requirement(requirements: Iterable[Requirement]) -> Requirement:
    for requirement in requirements:
        if requirement.key == TORCH:
            return requirement
    return Requirement(TORCH, "")


def shipped_constraints() -> list:
    """``name==version`` for each Slicer-shipped package that is installed: pip may not touch them."""
    pins = []
    for name in SLICER_SHIPPED:
        version = installed_version(name)
        if version is not None:
            pins.append(f"{name}=={version}")
    return pins


def install_requirements(requirements: Iterable[Requirement], pip_install: Callable[[list], None]) -> None:
    """Install ``requirements`` with ``pip_install`` (``slicer.util.pip_install`` in Slicer), constrained. Its
    arguments go as a list: a string is split as a POSIX shell would, which halves the backslashes of a Windows
    network path (``%TEMP%`` on ``\\\\server\\profiles``, where the constraints file is written)."""
    requirements = [r for r in requirements if r.key not in set(SLICER_SHIPPED) | {TORCH}]
    if not requirements:
        return
    with tempfile.TemporaryDirectory(prefix="xctdiff-pip-") as folder:
        constraints = Path(folder) / "constraints.txt"
        constraints.write_text("\n".join(shipped_constraints()) + "\n", encoding="utf-8")
        arguments = ["-c", str(constraints)] + [str(r) for r in requirements]
        try:
            pip_install(arguments)
        except Exception as exc:  # noqa: BLE001 - pip's failures are many; the user gets one sentence
            raise XctDiffError(f"pip could not install {', '.join(str(r) for r in requirements)}: "
                               f"{first_line(exc)}") from exc


def install_torch_with_pytorchutils(requirement: Requirement) -> None:
    """Offer PyTorch through the SlicerPyTorch extension's ``PyTorchUtils``; a clear message without it."""
    try:
        import PyTorchUtils
    except ImportError as exc:
        raise XctDiffError(PYTORCH_EXTENSION_MESSAGE) from exc
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if torch_logic.torchInstalled():
        return
    torch = torch_logic.installTorch(askConfirmation=True, torchVersionRequirement=requirement.specifier or None)
    if torch is None:
        raise XctDiffError("PyTorch was not installed; the reconstruction needs it.")


def ensure_dependencies(confirm: Callable[[str], bool], pip_install: Callable[[list], None],
                        requirements_path=REQUIREMENTS_FILE) -> None:
    """The first-use check: torch first, then the other packages after the user agrees."""
    requirements = read_requirements(requirements_path)
    torch = torch_requirement(requirements)
    if not satisfied(torch):
        install_torch_with_pytorchutils(torch)
    missing = unmet(requirements)
    if not missing:
        return
    names = ", ".join(str(r) for r in missing)
    if not confirm(f"XctDiff needs these Python packages: {names}. Install them now?"):
        raise XctDiffError(f"missing Python packages: {names}")
    install_requirements(missing, pip_install)
    still = unmet(requirements)
    if still:
        raise XctDiffError(f"could not install: {', '.join(str(r) for r in still)}")
