"""Random geometric and intensity augmentation of a canonical CT, applied before its DRR.

With 14 patients instead of the paper's 916, every training pair is multiplied by small, plausible
variations: a few degrees of rotation, about 5 % isotropic scaling, a smooth elastic deformation and
a small HU jitter (air stays air). Augmenting the CT and then rendering its DRR keeps each (CT, radiograph) pair
exactly consistent. numpy + scipy only (no SimpleITK), so it also runs on the training machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

AIR_HU = -1024.0
MAX_HU = 3071.0


@dataclass(frozen=True)
class RandomChestAugment:
    """Draws one random variation of a canonical CT ``[z, y, x]`` (HU) per call, from a given generator.

    Angles in degrees about each axis; ``max_scale`` is the largest relative size change; the elastic
    field is Gaussian noise on a coarse ``elastic_grid``^3 lattice (std ``elastic_mm``), cubically
    interpolated to a smooth displacement; the HU jitter is ``-1024 + (HU + 1024) * s + offset * t`` with
    ``t`` rising from 0 (air) to 1 (water and denser).
    """

    max_rotation_deg: float = 4.0
    max_scale: float = 0.05
    elastic_mm: float = 3.0
    elastic_grid: int = 5
    max_hu_offset: float = 20.0
    max_hu_scale: float = 0.03
    spacing_mm: float = 2.5

    def __call__(self, ct: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A deformed, jittered float32 copy of ``ct`` (same shape), clipped to [-1024, 3071] HU."""
        ct = np.asarray(ct, dtype=np.float32)
        coords = self._sample_coordinates(ct.shape, rng)
        out = ndimage.map_coordinates(ct, coords, order=1, mode="constant", cval=AIR_HU, output=np.float32)
        scale = 1.0 + rng.uniform(-self.max_hu_scale, self.max_hu_scale)
        offset = rng.uniform(-self.max_hu_offset, self.max_hu_offset)
        tissue = np.clip((out - AIR_HU) / -AIR_HU, 0.0, 1.0)  # 0 for air, 1 from water up: air stays air
        out = AIR_HU + (out - AIR_HU) * scale + offset * tissue
        return np.clip(out, AIR_HU, MAX_HU, out=out)

    def _sample_coordinates(self, shape: tuple, rng: np.random.Generator) -> np.ndarray:
        """For each output voxel, the input index it is read from: ``(3, z, y, x)`` float32."""
        centre = (np.array(shape, dtype=np.float64) - 1.0) / 2.0
        angles = np.deg2rad(rng.uniform(-self.max_rotation_deg, self.max_rotation_deg, size=3))
        scale = 1.0 + rng.uniform(-self.max_scale, self.max_scale)
        # Output -> input mapping: inverse rotation and inverse scale about the centre.
        matrix = _rotation_zyx(angles).T / scale
        grid = np.indices(shape, dtype=np.float32).reshape(3, -1) - centre[:, None].astype(np.float32)
        coords = (matrix.astype(np.float32) @ grid + centre[:, None].astype(np.float32)).reshape(3, *shape)
        coords += self._elastic_displacement(shape, rng)
        return coords

    def _elastic_displacement(self, shape: tuple, rng: np.random.Generator) -> np.ndarray:
        """A smooth random displacement in voxels, ``(3, z, y, x)``: coarse Gaussian lattice, cubic upsampling."""
        g = self.elastic_grid
        lattice = rng.normal(0.0, self.elastic_mm / self.spacing_mm, size=(3, g, g, g))
        # Cubic-spline upsampling is separable: one small (n, g) matrix per axis, then a tensor product.
        mz, my, mx = (_upsampling_matrix(g, n) for n in shape)
        return np.einsum("ia,jb,kc,vabc->vijk", mz, my, mx, lattice, optimize=True).astype(np.float32)


def _upsampling_matrix(g: int, n: int) -> np.ndarray:
    """``(n, g)`` matrix whose product with a length-``g`` vector is its cubic-spline zoom to length ``n``."""
    return np.stack([ndimage.zoom(np.eye(g)[a], n / g, order=3) for a in range(g)], axis=1)


def _rotation_zyx(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix acting on (z, y, x) index vectors: about z, then y, then x, by ``angles`` radians."""
    a, b, c = angles
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])  # in the y-x plane
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])  # in the z-x plane
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])  # in the z-y plane
    return rx @ ry @ rz
