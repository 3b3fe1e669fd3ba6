import traceback
import warnings

import numpy as np

from XctDiffCore.errors import XctDiffError


def run_case(results: list, name: str, fn, path) -> None:
    """Run one audit case on ``path``; record and print what the engine made of it (its warnings too): the text
    ``fn`` returns, REFUSED with the engine's one line, or TRACEBACK (the worst but a silent wrong result)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn(path)
        if caught:
            out += " | warnings: " + "; ".join(str(x.message)[:120] for x in caught)
    except XctDiffError as e:
        out = f"REFUSED: {e}"
    except Exception as e:
        traceback.print_exc()
        out = f"TRACEBACK {type(e).__name__}: {e}"
    results.append((name, out))
    print(f"- {name}: {out}", flush=True)


def truth_positions(shape, spacing, origin, direction, tilt=(0, 0, 0)):
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ijk = np.stack([i, j, k], -1).reshape(-1, 3).astype(float)
    pts = np.asarray(origin) + ijk @ (np.asarray(direction) @ np.diag(spacing)).T + np.outer(ijk[:, 2], tilt)
    return pts

def compare(vol, hu, spacing, origin, direction, tilt=(0, 0, 0), expect=None):
    """-> text: where the engine's voxel at each true position differs from the truth."""
    expect = hu if expect is None else expect
    pts = truth_positions(hu.shape, spacing, origin, direction, tilt)
    m = vol.direction @ np.diag(vol.spacing)
    idx = np.linalg.solve(m, (pts - np.asarray(vol.origin)).T).T  # (i, j, k)
    off = np.abs(idx - np.rint(idx)).max()
    r = np.rint(idx).astype(int)
    inside = np.all((r >= 0) & (r < np.array(vol.shape[::-1])), axis=1)
    if off > 0.05 or not inside.all():
        return f"GEOMETRY WRONG (voxel positions off by up to {off:.2f} voxel, {np.count_nonzero(~inside)} outside)"
    got = vol.array[r[:, 2], r[:, 1], r[:, 0]].astype(float)
    bad = np.abs(got - expect.reshape(-1)) > 0.51
    if bad.any():
        w = np.argmax(np.abs(got - expect.reshape(-1)))
        return f"VALUES WRONG at {bad.sum()} voxels (e.g. truth {expect.reshape(-1)[w]:g}, got {got[w]:g})"
    return "right"



def smooth_field(pts):
    return np.rint(500 * np.sin(pts[:, 0] / 15) + 400 * np.cos(pts[:, 1] / 20) + 3 * pts[:, 2])

def compare_smooth(vol, shape, spacing, origin, direction, tilt=(0, 0, 0), tol=25.0):
    """For a resampled result: sample the engine's volume (linearly) where the truth's voxels lie."""
    from scipy.ndimage import map_coordinates
    pts = truth_positions(shape, spacing, origin, direction, tilt)
    truth = smooth_field(pts)
    m = vol.direction @ np.diag(vol.spacing)
    idx = np.linalg.solve(m, (pts - np.asarray(vol.origin)).T).T
    inside = np.all((idx >= -1e-3) & (idx <= np.array(vol.shape[::-1]) - 1 + 1e-3), axis=1)
    if not inside.all():
        return f"GEOMETRY WRONG ({(~inside).sum()} of {len(inside)} true voxels outside the volume)"
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    interior = ((k > 0) & (k < shape[0] - 1) & (j > 0) & (j < shape[1] - 1) & (i > 0) & (i < shape[2] - 1)).ravel()
    got = map_coordinates(vol.array.astype(float), idx[interior][:, ::-1].T, order=1)
    err = np.abs(got - truth[interior])
    return "right" if err.max() < tol else f"WRONG (max error {err.max():.0f} HU, median {np.median(err):.0f})"
