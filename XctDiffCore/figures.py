"""Overview images of reconstructions: labelled grey panels composed with numpy and Pillow (no matplotlib).

Orientation of the slices of a canonical ``[z, y, x]`` CT, as radiologists view them: *coronal* like
the PA film (head up, the patient's right on the image's left), *axial* from the feet (anterior up,
right on the left), *sagittal* head up, anterior on the left.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .layout import ct_to_model_layout
from .options import turn_words

CT_WINDOW_HU = (-1000.0, 1000.0)  # display only: lungs to bone in one window
BONE_WINDOW_HU = (-450.0, 1350.0)  # width 1800, level 450: ribs, spine and sternum
LUNG_WINDOW_HU = (-1350.0, 150.0)  # width 1500, level -600: lung parenchyma and vessels
PANEL_SIZE = 160  # pixels per panel side
LABEL_HEIGHT = 14
GAP = 2
FIGURE_TAG_KEY = "xctdiff_figure"  # a PNG text chunk: every figure XctDiff writes carries it (what it shows)


def figure_tag_metadata(kind: str) -> dict:
    """The metadata that marks a PNG as a figure XctDiff wrote (:func:`is_xctdiff_figure`): ``kind`` says which."""
    return {FIGURE_TAG_KEY: kind}


def is_xctdiff_figure(path) -> bool:
    """Whether ``path`` is a PNG that XctDiff wrote as a figure (views, an evaluation's figure, a training preview),
    from its header alone. Why: a folder searched for films may hold an earlier run's output folder, and a figure read
    as a film is reconstructed (or scored as a real film) without a word."""
    if Path(path).suffix.lower() != ".png":
        return False
    from PIL import Image

    try:
        with Image.open(path) as img:  # the text chunks before the pixels: nothing is decoded
            return FIGURE_TAG_KEY in img.info
    except Exception:  # noqa: BLE001 - not judged here: reading it as a film names the problem
        return False


def window(hu, low_high=CT_WINDOW_HU) -> np.ndarray:
    low, high = low_high
    return np.clip((np.asarray(hu, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


def orthogonal_slices(volume_zyx: np.ndarray) -> dict:
    """Middle axial, coronal and sagittal slices of a canonical ``[z, y, x]`` array, display-oriented."""
    volume_zyx = np.asarray(volume_zyx)
    z, y, x = (n // 2 for n in volume_zyx.shape)
    model = ct_to_model_layout(volume_zyx)  # [D = A->P, H = S->I, W = R->L]
    return {
        "axial": volume_zyx[z],  # rows A->P, columns R->L
        "coronal": model[y],  # rows S->I, columns R->L
        "sagittal": volume_zyx[::-1, :, x],  # rows S->I, columns A->P
    }


def scale_to_unit(image: np.ndarray, top: Optional[float] = None) -> np.ndarray:
    """[0, top] -> [0, 1] (``top``: the image's 99th percentile when not given): for uncertainty maps."""
    image = np.asarray(image, dtype=np.float32)
    top = float(np.percentile(image, 99)) if top is None else float(top)
    return np.clip(image / top, 0.0, 1.0) if top > 0 else np.zeros_like(image)


def _fit(image01: np.ndarray, size: int) -> np.ndarray:
    """Resize a panel so that its longer side is ``size``, then centre it on a black square."""
    from skimage.transform import resize

    image01 = np.asarray(image01, dtype=np.float32)
    rows, cols = image01.shape
    scale = size / max(rows, cols)
    shape = (max(1, round(rows * scale)), max(1, round(cols * scale)))
    resized = resize(image01, shape, order=0 if scale >= 1 else 1, anti_aliasing=scale < 1, preserve_range=True)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - shape[0]) // 2, (size - shape[1]) // 2
    out[top : top + shape[0], left : left + shape[1]] = resized
    return out


def label_font():
    """Pillow's bitmap font (11 px, fits LABEL_HEIGHT): its spaces are a character wide, where the
    default FreeType font at 10 px draws them 2 px wide and "CT axial" reads "CTaxial"."""
    from PIL import ImageFont

    bitmap = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1; before, the default is it
    return bitmap() if bitmap is not None else ImageFont.load_default()


def compose_grid(rows: Sequence[Sequence[Optional[tuple]]], panel: int = PANEL_SIZE):
    """A grey PIL image of labelled panels: ``rows`` of ``(label, image in [0, 1])`` cells; a ``None``
    cell is left out (black, no label), so that a shorter row can line up under the columns it belongs to."""
    from PIL import Image, ImageDraw

    columns = max(len(r) for r in rows)
    cell_h = panel + LABEL_HEIGHT
    canvas = Image.new("L", (columns * (panel + GAP) - GAP, len(rows) * (cell_h + GAP) - GAP), 0)
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            label, image = cell
            x, y = c * (panel + GAP), r * (cell_h + GAP)
            if image is not None:
                pixels = np.round(_fit(image, panel) * 255).astype(np.uint8)
                canvas.paste(Image.fromarray(pixels), (x, y + LABEL_HEIGHT))
            if label:
                draw.text((x + 2, y + 1), str(label), fill=255, font=font)
    return canvas


def write_png(image, path, kind: str = "figure") -> Path:
    """Save a PIL image as PNG through :func:`~XctDiffCore.atomic.atomic_path`, tagged as a figure (``kind``)."""
    from PIL import PngImagePlugin

    from .atomic import atomic_path

    info = PngImagePlugin.PngInfo()
    for key, value in figure_tag_metadata(kind).items():
        info.add_text(key, value)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def reconstruction_rows(input01: np.ndarray, drr01: np.ndarray, ct_hu: np.ndarray, uncertainty_hu: Optional[np.ndarray] = None) -> list:
    """Row 1: input, DRR of the result, axial / coronal / sagittal CT; row 2: the uncertainty's slices,
    under the CT's, each label with the grey scale's range (black 0 HU, white the 99th percentile)."""
    slices = orthogonal_slices(ct_hu)
    rows = [[("input", input01), ("DRR of result", drr01)] + [(f"CT {k}", window(v)) for k, v in slices.items()]]
    if uncertainty_hu is not None:
        top = float(np.percentile(uncertainty_hu, 99))
        std = orthogonal_slices(uncertainty_hu)
        rows.append([None, None] + [(f"std {k} 0-{top:.0f} HU", scale_to_unit(v, top)) for k, v in std.items()])
    return rows


def reconstruction_caption(result) -> list:
    """The lines under the views: what was run and how far to trust it, so the picture says it without the log.

    The consistency (with guidance: the score before it too), the method, and every warning of the result (an
    implausible film, a child's size, skipped guidance), then the research-use line."""
    score = f"consistency {result.consistency:.3f}"
    if result.unguided_consistency is not None:
        score += f" (guided {result.guidance:g}; {result.unguided_consistency:.3f} before guidance)"
    run = result.method + (f", {result.steps} steps, seed {result.seed}" if result.method == "diffusion" else "")
    if result.samples > 1:
        run += f", mean of {result.samples} samples"
    handled = turn_words(result.turn, result.mirrored)
    lines = [f"{score}; {run}; style transfer {'on' if result.styled else 'off'}; {result.precision}"
             + (f"; film {handled}" if handled else "")]
    if result.ap_diameter is not None and result.learnt_ap_diameter is not None:
        lines.append(f"stretched front to back to the given AP diameter, {result.ap_diameter:g} mm "
                     f"(the model's own: {result.learnt_ap_diameter:.0f} mm)")
    lines += [f"warning: {w}" for w in result.warnings]
    return lines + ["XctDiff reconstruction from one radiograph: research use, not diagnosis"]


def with_caption(image, lines: Sequence[str]):
    """``image`` (a grey PIL image) with ``lines`` of text below it, each wrapped to the image's width."""
    import textwrap

    from PIL import Image, ImageDraw

    font = label_font()
    per_line = max(20, (image.width - 4) // max(1, int(font.getlength("x"))))
    wrapped = [part for line in lines for part in textwrap.wrap(line, per_line, subsequent_indent="  ") or [""]]
    canvas = Image.new("L", (image.width, image.height + GAP + len(wrapped) * LABEL_HEIGHT + 2), 0)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(wrapped):
        draw.text((2, image.height + GAP + 1 + k * LABEL_HEIGHT), line, fill=255, font=font)
    return canvas


def write_reconstruction_views(result, path) -> Path:
    """The ``--views`` PNG of a :class:`~XctDiffCore.pipeline.Reconstruction`: its panels and its caption."""
    uncertainty = result.uncertainty.array if result.uncertainty is not None else None
    rows = reconstruction_rows(result.input_image, result.drr, result.ct.array, uncertainty)
    return write_png(with_caption(compose_grid(rows), reconstruction_caption(result)), path, kind="views")
