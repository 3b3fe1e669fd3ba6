"""The volume type: a numpy array in Hounsfield units plus its place in the LPS patient frame.

Axis order is SimpleITK's: ``array[k, j, i]`` with ``i`` the fastest (x) index. ``spacing`` and
``origin`` are given in (x, y, z) order, in millimetres; ``direction`` is a 3x3 matrix whose column
``d`` is the LPS direction of index axis ``d`` (i, j, k). The physical LPS position of a voxel is
``origin + direction @ (spacing * (i, j, k))``. A canonical CT (direction = identity) therefore has
``array[z, y, x]`` with x running Right->Left, y Anterior->Posterior and z Inferior->Superior.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import XctDiffError

# RAS = diag(-1, -1, 1) @ LPS: the one place where LPS (DICOM, ITK) meets RAS (Slicer, NIfTI).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Volume:
    """A 3D image: ``array[k, j, i]`` (usually HU) with spacing/origin (x, y, z) and direction (LPS)."""

    array: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self):
        self.array = np.asarray(self.array)
        self.spacing = tuple(float(s) for s in np.asarray(self.spacing, dtype=float).ravel())
        self.origin = tuple(float(o) for o in np.asarray(self.origin, dtype=float).ravel())
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        self.validate()

    def validate(self) -> "Volume":
        """Refuse geometry that no reader should hand on: wrong rank, bad spacing, non-finite values."""
        if self.array.ndim != 3:
            raise XctDiffError(f"expected a 3D volume, got an array of shape {self.array.shape}")
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise XctDiffError("spacing and origin must have three values (x, y, z)")
        if not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise XctDiffError(f"voxel spacing must be positive, got {self.spacing}")
        if not np.all(np.isfinite(self.origin)) or not np.all(np.isfinite(self.direction)):
            raise XctDiffError("origin and direction must be finite")
        if abs(abs(np.linalg.det(self.direction)) - 1.0) > 1e-3:
            raise XctDiffError("direction matrix must be orthonormal")
        return self

    @property
    def shape(self) -> tuple:
        return self.array.shape

    def __repr__(self) -> str:
        """The geometry, not two million voxels: ``result.ct`` typed at a prompt printed the whole array."""
        direction = "identity" if np.allclose(self.direction, np.eye(3)) else repr(self.direction.round(6).tolist())
        return (f"Volume(shape={self.shape}, dtype={self.array.dtype}, spacing={self.spacing}, origin={self.origin}, "
                f"direction={direction})")

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry, new voxels (same shape)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} differs from {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) to RAS millimetres (Slicer's IJKToRAS, the NIfTI affine)."""
        m = self.ijk_to_lps()
        m[:3, :] = LPS_TO_RAS @ m[:3, :]
        return m

    def extent_lps(self) -> tuple:
        """(min corner, max corner) of the voxel centres in LPS millimetres."""
        k, j, i = self.array.shape
        corners = np.array([[a, b, c, 1.0] for a in (0, i - 1) for b in (0, j - 1) for c in (0, k - 1)])
        pts = (self.ijk_to_lps() @ corners.T).T[:, :3]
        return pts.min(axis=0), pts.max(axis=0)

    # SimpleITK interop (imported lazily: the training machines may not have it).
    def to_sitk(self):
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))
        return image

    @classmethod
    def from_sitk(cls, image) -> "Volume":
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise XctDiffError(f"expected a 3D volume, got a {image.GetDimension()}D image")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise XctDiffError("expected a scalar (single-component) volume")
        return cls(
            sitk.GetArrayFromImage(image),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=np.array(image.GetDirection()).reshape(3, 3),
        )
