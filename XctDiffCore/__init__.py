"""XctDiffCore: the XctDiff engine (single radiograph -> 3D chest CT), importable without Slicer.

Conventions (written once, used everywhere; see ``XctDiffCore.volume`` and ``XctDiffCore.layout``):

* A CT is a :class:`~XctDiffCore.volume.Volume`: a numpy array indexed ``[z, y, x]`` in Hounsfield
  units, with spacing, origin and direction in the LPS patient frame (x: Right->Left,
  y: Anterior->Posterior, z: Inferior->Superior), exactly as SimpleITK stores images.
* A radiograph is a PA view displayed as a radiologist reads it: a 2D array ``[row, col]`` with the
  head at the top (row 0 is superior) and the patient's right on the image's left (col 0 is the
  patient's right). It faces the CT's coronal plane: rows follow -z, columns follow +x, and the
  X-rays travel along y.
"""

__version__ = "0.1.0"

from .errors import XctDiffError  # noqa: F401


def __getattr__(name):
    """``XctDiffCore.Volume`` on first use: importing the package stays stdlib-only (numpy takes 0.1 s), so
    the command line's Ctrl-C handling is in place before anything slow is imported."""
    if name == "Volume":
        from .volume import Volume

        return Volume
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
