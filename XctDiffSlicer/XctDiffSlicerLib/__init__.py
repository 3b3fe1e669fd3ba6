"""The work behind the XctDiffSlicer panel, importable without Slicer's GUI (the ``slicer-core`` wheel suffices).

* :mod:`.mrml_bridge` -- engine objects to volume nodes and back; the scene is always an argument.
* :mod:`.process` -- the child-process runner (PROTOCOL.md): progress lines, cancel, readable errors.
* :mod:`.logic` -- :class:`ReconstructionLogic`: radiograph node in, CT node out (threaded or blocking).
* :mod:`.models` -- which model folder to use.
* :mod:`.dependencies` -- the first-use check of torch and the other packages.
"""
from .logic import ReconstructionLogic, ReconstructionOptions  # noqa: F401
