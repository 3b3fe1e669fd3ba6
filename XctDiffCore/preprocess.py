"""The paper's preprocessing: a CT becomes a canonical 128^3, 2.5 mm, lung-centred HU volume; a
radiograph becomes a square [0, 1] image. DRRs and real films go through the same radiograph function
so that both are normalised alike.

CT recipe (the paper's LIDC preprocessing, plus the lung-centred crop the shared data uses): orient to
LPS and resample linearly to ``spacing`` mm isotropic (one SimpleITK resample onto an identity-direction
grid, which also straightens oblique scans), clip HU to ``[-1024, 3071]``, then crop or pad (with air,
-1024 HU) to ``size``^3 centred on the lungs in z and on the body in-plane.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import numpy as np

from .errors import XctDiffError
from .io import check_radiograph_image
from .volume import Volume

CT_CLIP_HU = (-1024.0, 3071.0)  # the 12-bit CT range stored in the data; the model window is in layout.py
AIR_HU = -1024.0
BODY_HU = -500.0  # tissue: the body is the largest component above this
LUNG_HU = -400.0  # air-like voxels inside the body are lung (or bowel gas, trachea: see _lung_z_centre)
AIR_TISSUE_CONTRAST = 800.0  # air (-1000 HU) to soft tissue (0 to 60 HU), less a margin
RADIOGRAPH_PERCENTILES = (0.5, 99.5)
EMPTY_LINE_LEVEL = 0.05  # a border row/column whose 95th percentile is below this (after normalising) is empty
# A chest film is about square; one more than 4 times longer than wide would be mostly padding (the
# size of the padded square is bounded by io.MAX_RADIOGRAPH_SIDE, read from the file's header).
MAX_RADIOGRAPH_ASPECT = 4.0
# Bounds of the resampling grid, checked before it is allocated: a body CT spans at most 2 m (head to
# feet) on any axis; a larger span means a wrong voxel spacing in the file (200 mm for 2 mm). 2^27
# voxels (a 512 MB float32 grid) hold a whole body at 2.5 mm.
MAX_CT_EXTENT_MM = 2000.0
MAX_GRID_VOXELS = 2**27


def preprocess_ct(volume: Volume, size: int = 128, spacing: float = 2.5) -> Volume:
    """Canonical LPS, ``spacing`` mm isotropic, HU clipped to [-1024, 3071], ``size``^3 int16, lung-centred.

    The returned volume has direction identity, ``array[z, y, x]`` and the origin of its first voxel,
    so it lies where the input lay in patient space.
    """
    _check_hounsfield(volume)
    grid_origin, grid_size = _canonical_grid(volume, spacing)
    _check_grid(volume, grid_size, spacing)
    if _on_canonical_grid(volume, spacing):  # resampling would be the identity: no SimpleITK needed
        hu = volume.array.astype(np.float32)
    else:
        hu = _resample(volume, grid_origin, grid_size, spacing)
    hu = np.clip(hu, *CT_CLIP_HU)

    body = _body_mask(hu)
    if not body.any():
        raise XctDiffError("no body found in the CT (no voxels above -500 HU)")
    _, ys, xs = np.nonzero(body)
    centre = np.array([_lung_z_centre(hu, body), (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2])
    start = np.round(centre - (size - 1) / 2).astype(int)  # [z, y, x] index of the output's first voxel
    cropped = _crop_or_pad(hu, start, size, AIR_HU)
    origin = grid_origin + spacing * start[::-1]  # identity direction: index (x, y, z) * spacing
    return Volume(np.rint(cropped).astype(np.int16), (spacing,) * 3, origin, np.eye(3))


def _check_hounsfield(volume: Volume) -> None:
    """Refuse a CT in other units than HU, whose air (-1000 HU) would be read as tissue, the whole box a block of
    body: no voxel below -500, and either air's contrast to tissue (values some 1000 apart: a scanner's raw 0..4095,
    air 0, saved without the rescale intercept -1024 that makes them HU) or values within 2 (normalised to 0..1 or
    -1..1). A CT of one value (a block of 40 HU) is no chest: the body checks say so."""
    low, high = float(np.min(volume.array)), float(np.max(volume.array))
    if low <= BODY_HU:
        return
    if high - low >= AIR_TISSUE_CONTRAST:
        raise XctDiffError(f"the CT's values run from {low:g} to {high:g}, none below {BODY_HU:g}: not in Hounsfield "
                           "units, where air is -1000 (a CT stored as 0 to 4095 without its rescale intercept reads "
                           "1024 too high); convert it to HU (add -1024; in DICOM, the Rescale Intercept (0028,1052))")
    if 0 < high - low <= 2:
        raise XctDiffError(f"the CT's values run from {low:.3g} to {high:.3g}: not in Hounsfield units (a CT "
                           "normalised to 0..1 or -1..1?); give the CT in HU, air -1000")


def _on_canonical_grid(volume: Volume, spacing: float) -> bool:
    """Identity direction and ``spacing`` mm already (a prepared CT): its voxels are the grid's."""
    return bool(np.allclose(volume.direction, np.eye(3), atol=1e-6) and np.allclose(volume.spacing, spacing, rtol=1e-6))


def _resample(volume: Volume, grid_origin, grid_size, spacing: float) -> np.ndarray:
    """Linear resampling onto the identity-direction grid (float32 HU ``[z, y, x]``; air outside)."""
    import SimpleITK as sitk

    resampler = sitk.ResampleImageFilter()
    resampler.SetOutputOrigin(tuple(float(o) for o in grid_origin))
    resampler.SetOutputSpacing((float(spacing),) * 3)
    resampler.SetOutputDirection(tuple(np.eye(3).ravel()))
    resampler.SetSize([int(n) for n in grid_size])
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(AIR_HU)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    source = Volume(volume.array.astype(np.float32), volume.spacing, volume.origin, volume.direction)
    return sitk.GetArrayFromImage(resampler.Execute(source.to_sitk()))


def _canonical_grid(volume: Volume, spacing: float):
    """Origin (x, y, z) and size of an identity-direction grid covering the volume's voxel centres."""
    low, high = volume.extent_lps()
    size = np.floor((high - low) / spacing + 1e-6).astype(int) + 1
    return np.asarray(low, dtype=float), size


def _check_grid(volume: Volume, grid_size, spacing: float) -> None:
    """Refuse, before any allocation, a CT whose span or resampling grid no body CT has."""
    low, high = volume.extent_lps()
    span = " x ".join(f"{v:.4g}" for v in high - low)
    voxel = " x ".join(f"{v:.4g}" for v in volume.spacing)
    if np.any(high - low > MAX_CT_EXTENT_MM):
        raise XctDiffError(
            f"the CT spans {span} mm (x, y, z; voxel spacing {voxel} mm): more than the {MAX_CT_EXTENT_MM:g} mm "
            "a body CT can span; check the voxel spacing in the file"
        )
    if int(np.prod(grid_size, dtype=np.int64)) > MAX_GRID_VOXELS:
        raise XctDiffError(
            f"the CT spans {span} mm: resampled to {spacing:g} mm that is "
            f"{' x '.join(str(int(n)) for n in grid_size)} voxels, more than the {MAX_GRID_VOXELS} allowed"
        )


def body_component(hu: np.ndarray, level: float = BODY_HU) -> np.ndarray:
    """The largest connected region above ``level`` (-500 HU): the patient's tissue, without the table or stray blobs."""
    from scipy import ndimage

    labels, count = ndimage.label(np.asarray(hu) > level)
    if count == 0:
        return np.zeros(np.shape(hu), dtype=bool)
    return labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)


def _body_mask(hu: np.ndarray) -> np.ndarray:
    """:func:`body_component` with its holes filled slice by slice (lungs become inside)."""
    from scipy import ndimage

    # Axial slices: in 3D the lungs reach the volume's edge through the trachea and would stay open.
    return np.stack([ndimage.binary_fill_holes(axial) for axial in body_component(hu)])


def _lung_z_centre(hu: np.ndarray, body: np.ndarray) -> float:
    """Middle of the z range whose air-inside-body area exceeds 10% of the largest (drops trachea, bowel gas).

    Falls back to the middle of the body when there is no air inside it (not a chest, or a phantom).
    """
    area = ((hu < LUNG_HU) & body).sum(axis=(1, 2))
    if area.max() == 0:
        zs = np.nonzero(body.any(axis=(1, 2)))[0]
    else:
        zs = np.nonzero(area > 0.1 * area.max())[0]
    return (zs.min() + zs.max()) / 2


def _crop_or_pad(array: np.ndarray, start: np.ndarray, size: int, fill: float) -> np.ndarray:
    """``array[start : start + size]`` on every axis, with ``fill`` where that window leaves the array."""
    out = np.full((size,) * array.ndim, fill, dtype=array.dtype)
    src, dst = [], []
    for s, n in zip(start, array.shape):
        lo, hi = max(s, 0), min(s + size, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def preprocess_radiograph(image: np.ndarray, size: int = 128) -> np.ndarray:
    """A radiograph ``[row, col]`` -> float32 ``[size, size]`` in [0, 1]: crop the empty border, pad square, resize.

    Intensities are mapped to [0, 1] by the 0.5 and 99.5 percentiles of the cropped film (robust to
    burned-in labels and dead pixels); the square padding is black (0), as the empty border was.
    """
    image = check_radiograph_image(image)
    check_radiograph_aspect(image.shape)
    unit = _percentile_unit(image)
    keep = [np.nonzero(_lines_above(unit, EMPTY_LINE_LEVEL, axis))[0] for axis in (1, 0)]  # rows, columns
    if all(k.size >= image.shape[a] // 4 for a, k in enumerate(keep)):  # else keep the film whole
        crop = slice(keep[0].min(), keep[0].max() + 1), slice(keep[1].min(), keep[1].max() + 1)
        if unit[crop].shape != unit.shape:  # only a smaller film needs its percentiles again
            unit = _percentile_unit(image[crop])
    rows, cols = unit.shape
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    resize = resize_operator(side, size)  # (size, side): the same along both axes
    # R @ square @ R.T of the film padded square with zeros, without the padding: only the operator's
    # columns that meet the film count (no 15 MB padded copy, fewer products).
    if "torch" in sys.modules:  # in torch's threads, not NumPy's: OpenBLAS's own threads keep spinning after a
        import torch  # product and slowed the encoder that follows by 40 % on the 2-core CPU

        resize = torch.from_numpy(resize)
        out = ((resize[:, top : top + rows] @ torch.from_numpy(unit)) @ resize[:, left : left + cols].T).numpy()
    else:  # no network follows (`xctdiff inspect`'s checks): not 1.4 s of importing torch for two products
        out = (resize[:, top : top + rows] @ unit) @ resize[:, left : left + cols].T
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# Pixels whose row and column spacings differ by more than this (relative) are made square.
SQUARE_PIXEL_TOLERANCE = 0.01


def square_pixels(image: np.ndarray, spacing: Optional[tuple]):
    """``(image, spacing)`` with square pixels: a film whose rows lie farther apart than its columns (or the
    other way round) is resampled along the finer axis to the coarser spacing (anti-aliased, as
    :func:`preprocess_radiograph` resizes). Why: the model's input is a square grid of square pixels, and the
    preprocessing pads and resizes the pixel grid as it is: a film of 0.2 x 0.4 mm pixels would reach the
    model squeezed to half its width. Square pixels, or no spacing, are returned as they are."""
    if spacing is None:
        return image, spacing
    row, col = (float(v) for v in spacing)
    if abs(row - col) <= SQUARE_PIXEL_TOLERANCE * max(row, col):
        return image, spacing
    coarse = max(row, col)
    axis = 0 if row < col else 1  # the finer axis
    n = image.shape[axis]
    size = max(1, int(round(n * min(row, col) / coarse)))
    operator = resize_operator(n, size)
    image = operator @ image if axis == 0 else image @ operator.T
    return np.ascontiguousarray(image, dtype=np.float32), (coarse, coarse)


def turn_film(radiograph, quarter_turns: int = 0, mirror: bool = False):
    """A :class:`~XctDiffCore.io.Radiograph` flipped left to right (``mirror``), then turned ``quarter_turns``
    times anticlockwise as displayed (``np.rot90``), its pixel spacing turned with it: what ``--mirror`` and
    ``--turn`` do to a film saved mirrored or the wrong way up, before anything else sees it."""
    image = np.fliplr(radiograph.image) if mirror else radiograph.image
    spacing = radiograph.spacing
    if quarter_turns % 2 and spacing is not None:
        spacing = (spacing[1], spacing[0])
    return dataclasses.replace(radiograph, image=np.ascontiguousarray(np.rot90(image, quarter_turns)),
                               spacing=spacing)


def resize_operator(n: int, size: int) -> np.ndarray:
    """``(size, n)`` float32 matrix ``R`` with ``R @ x`` = ``skimage.transform.resize`` of ``x`` along axis 0:
    its anti-aliasing Gaussian (sigma ``(n / size - 1) / 2`` when shrinking, truncated at 4 sigma) and
    its linear interpolation (``scipy.ndimage.zoom``, ``grid_mode``), both with SciPy's ``mirror``
    boundary, which skimage's default ``mode="reflect"`` maps to.

    Why: both steps are linear and separable, so a square film resizes as ``R @ image @ R.T``; only the
    output pixels' rows and columns are computed, not the whole blurred film. For the 1955 px sample
    film, 0.13 s of SciPy's Gaussian on every pixel become two matrix products of 6 ms. A test checks it
    against skimage's resize.
    """
    scale = n / size
    sigma = max(0.0, (scale - 1.0) / 2.0)
    radius = int(4.0 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (taps / sigma) ** 2) if sigma > 0 else np.ones(1)
    weights /= weights.sum()
    centres = (np.arange(size) + 0.5) * scale - 0.5  # where each output pixel samples the input
    below = np.floor(centres).astype(np.int64)
    above_weight = centres - below
    operator = np.zeros((size, n))
    rows = np.arange(size)[:, None]
    for start, share in ((below, 1.0 - above_weight), (below + 1, above_weight)):
        columns = _mirror(start[:, None] + taps[None, :], n)  # (size, taps)
        np.add.at(operator, (np.broadcast_to(rows, columns.shape), columns), share[:, None] * weights[None, :])
    return operator.astype(np.float32)


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Indices outside ``[0, n)`` reflected about the edge pixels (``d c b | a b c d | c b a``)."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def check_radiograph_aspect(shape, source: str = "the radiograph") -> None:
    """Refuse a film more than 4 times longer than wide: no chest film, and mostly padding once square."""
    rows, cols = (int(n) for n in shape)
    if max(rows, cols) > MAX_RADIOGRAPH_ASPECT * min(rows, cols):
        raise XctDiffError(
            f"{source} is {rows}x{cols} pixels: a chest film is not more than {MAX_RADIOGRAPH_ASPECT:g} times longer than wide"
        )


def _lines_above(unit: np.ndarray, level: float, axis: int, q: float = 95.0) -> np.ndarray:
    """``np.percentile(unit, q, axis=axis) > level`` per line, from counts instead of a sort of every line.

    With ``k = floor(q/100 (n - 1))`` the percentile lies between the line's order statistics ``k`` and
    ``k + 1``: it is above ``level`` when ``s_k`` is (at least ``n - k`` values above it) and not when
    ``s_{k+1}`` is not (fewer than ``n - k - 1``). Only a line with exactly ``n - k - 1`` values above
    ``level`` depends on the interpolation, and only those are sorted. Why: sorting every row and column
    of a 2,000 px film took 0.04 s, a third of its preprocessing; the counts take 3 ms.
    """
    n = unit.shape[axis]
    k = int(np.floor(q / 100.0 * (n - 1)))
    count = np.count_nonzero(unit > level, axis=axis)
    above = count >= n - k
    unsure = np.nonzero(count == n - k - 1)[0]
    if unsure.size:
        lines = np.take(unit, unsure, axis=1 - axis)
        above[unsure] = np.percentile(lines, q, axis=axis) > level
    return above


def film_percentiles(image: np.ndarray, qs=RADIOGRAPH_PERCENTILES, bins: int = 4096) -> np.ndarray:
    """``np.percentile(image, qs)`` (its default linear interpolation), with a partial sort of a few pixels only.

    The order statistics the percentiles need are located in a histogram of ``bins`` equal bins (value
    to bin is monotone, so the r-th smallest pixel is in the bin where the counts pass r) and found among
    that bin's pixels alone. Why (issue 20): the exact partial sort of a 3.6 M pixel film was 32 of the 48
    ms of its preprocessing on the 2-core CPU; this takes about 15. The same value as NumPy's to
    float64 rounding (the model sees it in float32: identical there; tested).
    """
    flat = np.asarray(image).ravel()
    lo, hi = flat.min(), flat.max()
    if not hi > lo:
        return np.percentile(flat, qs)
    scale = np.float32(bins / (float(hi) - float(lo)))
    index = ((flat - lo) * scale).astype(np.int32)
    np.minimum(index, bins - 1, out=index)
    passed = np.cumsum(np.bincount(index, minlength=bins))  # pixels in bins 0..b
    found = {}

    def order_statistic(rank: int) -> float:
        if rank not in found:
            b = int(np.searchsorted(passed, rank, side="right"))
            members = flat[index == b]
            within = rank - (int(passed[b - 1]) if b else 0)
            found[rank] = float(np.partition(members, within)[within])
        return found[rank]

    n, out = flat.size, []
    for q in np.atleast_1d(qs):
        virtual = float(q) / 100.0 * (n - 1)
        k = int(np.floor(virtual))
        below, above = order_statistic(k), order_statistic(min(k + 1, n - 1))
        out.append(below + (above - below) * (virtual - k))
    return np.array(out)


def _percentile_unit(image: np.ndarray) -> np.ndarray:
    low, high = film_percentiles(image, RADIOGRAPH_PERCENTILES)
    # in the image's float32 (check_radiograph_image): float64 scalars would make a float64 copy of the film
    low, span = np.float32(low), np.float32(high - low)
    if not span > 0:
        raise XctDiffError("the radiograph is blank: its pixel values are (almost) all the same")
    return np.clip((image - low) / span, 0.0, 1.0, dtype=np.float32)
