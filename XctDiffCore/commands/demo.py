"""``xctdiff demo``: the main job on the bundled sample, runnable right after installing.

With a model (the bundled default in ``Resources/Models/``, or ``--model DIR``): reconstruct the
bundled real radiograph into a CT (``.nrrd``) and its views PNG, as ``xctdiff reconstruct`` does.
Without one, the half of the job that needs no model: the DRR of the sample CT (the kind of
radiograph the models are trained on) beside coronal and axial slices.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import make_output_folder
from ..errors import XctDiffError
from ..layout import ct_to_model_layout

SAMPLE_CT_NAME = "LIDC-IDRI-0001_ct.nrrd"
SAMPLE_RADIOGRAPH_NAME = "RG1_UNCR_chest_PA.dcm"  # NEMA DICOM WG04 sample RG1, a PA chest CR (Resources/Samples/README.md)
# Slices are shown in a wide soft-tissue-to-bone window, in HU.
SLICE_WINDOW_HU = (-1000.0, 1000.0)


def sample_path(name: str) -> Path:
    """A bundled sample: ``Resources/Samples`` in the repository, or installed beside the package."""
    package = Path(__file__).resolve().parent.parent  # XctDiffCore/
    for root in (package.parent, package):
        candidate = root / "Resources" / "Samples" / name
        if candidate.is_file():
            return candidate
    raise XctDiffError(f"the bundled sample {name} is missing from this installation")


def sample_ct_path() -> Path:
    return sample_path(SAMPLE_CT_NAME)


def run_demo(out_dir, model=None) -> dict:
    """Reconstruct the sample radiograph into ``out_dir`` (created), or render the sample's DRR without a model."""
    from ..model_folder import bundled_model_folder

    out_dir = Path(out_dir)
    if model is None:
        try:
            model = bundled_model_folder()
        except XctDiffError:
            make_output_folder(out_dir)
            return render_sample_drr(out_dir)
    from ..options import ReconstructOptions
    from .reconstruct_job import run_reconstruct

    make_output_folder(out_dir)
    radiograph = sample_path(SAMPLE_RADIOGRAPH_NAME)
    paths = {"ct": out_dir / f"{radiograph.stem}_ct.nrrd", "views": out_dir / f"{radiograph.stem}_views.png"}
    run_reconstruct(radiograph, paths["ct"], model=model, options=ReconstructOptions(seed=0), views=paths["views"])
    print(f"wrote the reconstruction of {radiograph.name} to {paths['ct']} and its views to {paths['views']}")
    return paths


def render_sample_drr(out_dir: Path) -> dict:
    """The sample CT's DRR and an overview figure (DRR | coronal | axial) in ``out_dir``; returns the paths."""
    from ..drr import drr_of_volume
    from ..io import drr_tag_metadata, read_ct, write_image_png
    from ..preprocess import preprocess_ct

    ct = preprocess_ct(read_ct(sample_ct_path()))
    drr = drr_of_volume(ct, "cone", size=ct.shape[0])
    paths = {
        "drr": write_image_png(drr, out_dir / "sample_drr.png", metadata=drr_tag_metadata()),
        "overview": write_image_png(overview_figure(ct.array, drr), out_dir / "sample_overview.png", bits=8),
    }
    print(
        "No trained model is installed, so reconstruction is not available; "
        f"wrote the sample's DRR to {paths['drr']} and an overview (DRR | coronal | axial) to {paths['overview']}"
    )
    return paths


def overview_figure(ct_zyx: np.ndarray, drr: np.ndarray) -> np.ndarray:
    """DRR | mid-coronal slice | mid-axial slice of a canonical ``[z, y, x]`` CT, side by side, [0, 1].

    The coronal slice is oriented like the radiograph (head up, patient's right on the left); the
    axial slice as radiologists view it (anterior up, patient's right on the left).
    """
    low, high = SLICE_WINDOW_HU
    window = lambda hu: np.clip((np.asarray(hu, dtype=np.float32) - low) / (high - low), 0.0, 1.0)  # noqa: E731
    model = ct_to_model_layout(ct_zyx)  # [D=A->P, H=S->I, W=R->L]
    coronal = window(model[model.shape[0] // 2])
    axial = window(ct_zyx[ct_zyx.shape[0] // 2])  # [y=A->P, x=R->L]
    panels = [np.asarray(drr, dtype=np.float32), coronal, axial]
    height = max(p.shape[0] for p in panels)
    gap = np.ones((height, 2), dtype=np.float32)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 0))) for p in panels]
    return np.concatenate([padded[0], gap, padded[1], gap, padded[2]], axis=1)
