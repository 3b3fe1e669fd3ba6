"""How far real radiographs are from DRRs before and after the real -> DRR style transfer.

Real films of the evaluation set have no CT, so nothing can be compared pixel by pixel. The domain
distance is instead the accuracy of a classifier trained to tell the two kinds of images apart,
measured on held-out images (stratified k-fold cross-validation; balanced accuracy, since there are
far fewer DRRs than films): 100% means the styles are trivially separable, 50% indistinguishable. It is a logistic regression on
*style* features (histograms of intensity, gradient magnitude and Laplacian, and the radial power
spectrum), deliberately without a thumbnail of the image: the evaluation films (Kermany: children,
AP) and the DRRs (adults) differ in anatomy too, and a layout feature would measure that instead of
style. No pretrained feature network is used (none can be loaded offline), so there is no KID/FID.

Anatomy kept is measured separately: the correlation of gradient magnitudes of each film and its
transfer inside the lung fields (:func:`edge_preservation`).

Outputs: ``style_eval.json``, ``style_eval.md`` (what made it: the model's id and version, the device and
precision of the transfer and of the reconstructions, the date, XctDiff's version and the command; then the
tables) and ``style_eval.png``: rows of real |
transferred | the nearest DRR (smallest distance between 32 x 32 thumbnails of the transferred
film and the DRRs, each standardised); with a whole model, the DRR of the reconstruction from the
film and from its transfer follow each, so that what the transfer changes in the result shows. A caption
below names the columns, the films (top to bottom) and the model, so that the PNG alone says what it shows.

The data-consistency of reconstructions with and without the transfer is measured by
:func:`consistency_with_and_without_style`, given a callable from the pipeline
(``evaluate_style(..., consistency=...)``), beside the referee of that score, the reconstruction's
:func:`layout_agreement` with the film as loaded (the score itself rewards a transfer that smooths).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import __version__
from ..atomic import atomic_path, check_output_folder, output_lock, output_set
from ..errors import XctDiffError, a_few, first_line

FEATURE_GROUPS = (("intensity histogram", 32), ("gradient-magnitude histogram", 16), ("|Laplacian| histogram", 16), ("radial log power spectrum", 16))
FEATURES = tuple(f"{name} ({width})" for name, width in FEATURE_GROUPS)
FIGURE_ROWS = 6
# where the lungs of a centred frontal film lie after the pipeline's square resize (fractions of the side:
# rows, then columns): the box in which the bone-edge preservation is measured, so that the film's
# border, collimation and labels do not count. A fixed approximation: no segmentation of real films here.
LUNG_BOX = ((0.15, 0.80), (0.12, 0.88))
LAYOUT_SIDE = 32  # px of the layout agreement's thumbnails: 1 cm at the 128 px input, coarser than any film texture


# ------------------------------------------------------------------------------------------ images


def load_real_images(patterns, size: int, max_images: Optional[int] = None, seed: int = 0,
                     output: Optional[Path] = None, drr_datalist=None,
                     passed_over: Optional[list] = None) -> tuple[np.ndarray, list]:
    """Real films (folders or globs) -> ``[N, size, size]`` in [0, 1] as the pipeline preprocesses them, and their
    paths. ``output``, the evaluation's own folder, is passed over: read back, its figure would be a real film.
    Films that are DRRs of ``drr_datalist`` or the PNG previews ``xctdiff prepare`` writes beside them (``--real``
    naming the prepared folder) are one error line: the report would compare DRRs with themselves. A film that
    cannot be read is passed over with one warning (all of them: one error line) and appended to ``passed_over``
    (``{"file", "why"}``)."""
    from tqdm import tqdm

    from ..io import read_radiograph
    from ..preprocess import preprocess_radiograph
    from ..style import find_real_films

    files = find_real_films(patterns, output)
    refuse_drrs_as_films(files, drr_datalist, "the report would compare DRRs with DRRs; give real radiographs")
    if max_images is not None and len(files) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(files), max_images, replace=False))
        files = [files[i] for i in keep]
    images, read, unreadable = [], [], []
    for f in tqdm(files, desc="reading the real films", unit="film", file=sys.stderr):
        try:
            images.append(preprocess_radiograph(read_radiograph(f).image, size))
            read.append(f)
        except XctDiffError as exc:  # one film cut short among hundreds: passed over, as `reconstruct FOLDER` does
            unreadable.append({"file": str(f), "why": first_line(exc)})
    if unreadable and not read:
        more = f" and {len(unreadable) - 1} more" if len(unreadable) > 1 else ""
        raise XctDiffError(f"none of the {len(files)} real films named could be read: {unreadable[0]['file']} "
                           f"({unreadable[0]['why']}){more}")
    if unreadable:
        first = unreadable[0]
        more = f"; also {a_few([Path(u['file']).name for u in unreadable[1:]])}" if len(unreadable) > 1 else ""
        warnings.warn(f"passed over {len(unreadable)} of the {len(files)} real films, which could not be read: "
                      f"{first['file']} ({first['why']}){more}", stacklevel=3)
    if passed_over is not None:
        passed_over.extend(unreadable)
    return np.stack(images).astype(np.float32), read


def load_drr_images(datalist, size: int, sections=("training", "validation")) -> np.ndarray:
    """Every ``xray`` of the datalist's ``sections`` -> ``[N, size, size]`` in [0, 1], as the encoder sees them."""
    from ..datalist import load_entry_xray
    from ..model_inputs import xray_to_model

    files = drr_files(datalist, sections)
    if not files:
        raise XctDiffError(f"the datalist {datalist} lists no DRRs")
    return np.stack([(xray_to_model(load_entry_xray(f), size)[0].numpy() + 1) / 2 for f in files]).astype(np.float32)


def refuse_drrs_as_films(files, drr_datalist, consequence: str) -> None:
    """One error line when any of the real ``files`` is a DRR of ``drr_datalist`` or the PNG preview ``xctdiff
    prepare`` writes beside one (the prepared folder named as real films), or lies in the ``xrays/`` of any other
    folder ``prepare`` wrote (:func:`prepared_data_set`: another data set's DRRs are no real films either): what
    ``consequence`` says would follow. evaluate-style and ``xctdiff train style`` (its ``style.real``) share it."""
    stem = lambda f: Path(os.path.realpath(f)).with_suffix("")  # noqa: E731; prepare writes NAME.png beside NAME.npy
    drrs = {stem(f) for f in drr_files(drr_datalist)} if drr_datalist is not None else set()
    same = [f for f in files if stem(f) in drrs]
    if same:
        raise XctDiffError(f"{len(same)} of the {len(files)} real films named are DRRs of {drr_datalist} or their PNG "
                           f"previews (e.g. {same[0]}): {consequence}")
    prepared = [(f, prepared_data_set(f)) for f in files]
    prepared = [(f, datalist) for f, datalist in prepared if datalist is not None]
    if prepared:
        f, datalist = prepared[0]
        raise XctDiffError(f"{len(prepared)} of the {len(files)} real films named are DRRs of the data set {datalist} "
                           f"(the xrays/ `xctdiff prepare` wrote, e.g. {f}), not real radiographs: {consequence}")


def prepared_data_set(path) -> Optional[Path]:
    """The ``datalist.json`` of the data set folder ``xctdiff prepare`` wrote (its ``xrays/`` beside it, and
    ``images/``) whose ``xrays/`` holds ``path``, or None: its DRRs and PNG previews are no real films, whatever
    datalist is in use. A copy without ``images/`` is one still."""
    folder = Path(os.path.realpath(path)).parent
    datalist = folder.parent / "datalist.json"
    return datalist if folder.name == "xrays" and datalist.is_file() else None


def drr_files(datalist, sections=("training", "validation")) -> list:
    """The ``xray`` files of the datalist's ``sections``."""
    from ..datalist import read_datalist

    return [item["xray"] for section in sections for item in read_datalist(datalist, section)]


@torch.no_grad()
def transfer(generator: torch.nn.Module, images01: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """:func:`~XctDiffCore.style.apply_style` over ``[N, H, W]`` in batches."""
    from ..style import apply_style

    return np.concatenate([apply_style(generator, images01[i : i + batch_size]) for i in range(0, len(images01), batch_size)])


# ---------------------------------------------------------------------------------- the classifier


def style_features(images01: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` in [0, 1] -> ``[N, 80]``: see :data:`FEATURES` (each histogram sums to 1)."""
    from skimage.filters import laplace, sobel

    def hist(values, bins, top):
        h = np.histogram(np.clip(values, 0, top), bins=bins, range=(0, top))[0].astype(np.float64)
        return h / max(h.sum(), 1)

    rows = []
    for image in images01.astype(np.float64):
        rows.append(
            np.concatenate(
                [
                    hist(image, 32, 1.0),
                    hist(sobel(image), 16, 0.25),
                    hist(np.abs(laplace(image)), 16, 0.25),
                    np.log(radial_power(image) + 1e-12),
                ]
            )
        )
    return np.asarray(rows, dtype=np.float32)


def radial_power(image: np.ndarray, rings: int = 16) -> np.ndarray:
    """Mean power of the mean-free ``[H, W]`` image in ``rings`` rings up to Nyquist, normalised to sum 1."""
    fy, fx = np.meshgrid(np.fft.fftfreq(image.shape[-2]), np.fft.fftfreq(image.shape[-1]), indexing="ij")
    band = np.minimum((np.hypot(fy, fx) / 0.5 * rings).astype(int), rings - 1).ravel()
    power = np.abs(np.fft.fft2(image - image.mean())) ** 2
    ring = np.bincount(band, power.ravel(), rings) / np.bincount(band, minlength=rings)
    return ring / max(ring.sum(), 1e-12)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """L2-regularised logistic regression by L-BFGS, each class weighted by the inverse of its count; bias last."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    weight = torch.where(y > 0.5, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    w = torch.zeros(xb.shape[1], dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xb @ w, y, weight=weight) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def domain_accuracy(features_a: np.ndarray, features_b: np.ndarray, folds: int = 5, seed: int = 0, l2: float = 1e-2) -> dict:
    """Cross-validated balanced accuracy (mean of the two per-kind recalls) of telling ``a`` from ``b``.

    Every image is used; folds are stratified (each kind split evenly) and the classes are weighted by
    their counts, so 0.5 means indistinguishable however unequal the two sets are.
    """
    if min(len(features_a), len(features_b)) < folds:
        raise XctDiffError(f"need at least {folds} images of each kind for {folds}-fold cross-validation")
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.concatenate([features_a, features_b])).double()
    y = torch.cat([torch.zeros(len(features_a)), torch.ones(len(features_b))]).double()
    fold_of = np.concatenate([rng.permutation(len(features_a)) % folds, rng.permutation(len(features_b)) % folds])
    scores = []
    for k in range(folds):
        test = torch.from_numpy(fold_of == k)
        mean, std = x[~test].mean(0), x[~test].std(0).clamp_min(1e-6)
        w = _fit_logistic((x[~test] - mean) / std, y[~test], l2)
        xt = torch.cat([(x[test] - mean) / std, torch.ones(int(test.sum()), 1, dtype=x.dtype)], 1)
        hit = ((xt @ w > 0).double() == y[test]).double()
        scores.append(float((hit[y[test] == 0].mean() + hit[y[test] == 1].mean()) / 2))
    return {"accuracy": float(np.mean(scores)), "std": float(np.std(scores)), "folds": scores, "counts": [len(features_a), len(features_b)]}


def accuracy_by_feature_group(features_a: np.ndarray, features_b: np.ndarray, folds: int = 5, seed: int = 0) -> dict:
    """:func:`domain_accuracy` on each group of :data:`FEATURE_GROUPS` alone: which kind of style still differs."""
    result, start = {}, 0
    for name, width in FEATURE_GROUPS:
        result[name] = domain_accuracy(features_a[:, start : start + width], features_b[:, start : start + width], folds, seed)["accuracy"]
        start += width
    return result


def edge_preservation(real01: np.ndarray, transferred01: np.ndarray) -> np.ndarray:
    """``[N]``: correlation of the gradient magnitude of each film and its transfer inside :data:`LUNG_BOX`.

    1 when every rib, clavicle and lung border of the film is still an edge of the same relative strength
    after the transfer, whatever the new contrast curve; the training's edge term uses the same measure.
    """
    from ..models.cyclegan import gradient_correlation

    (r0, r1), (c0, c1) = LUNG_BOX
    h, w = real01.shape[-2:]
    crop = (slice(None), None, slice(int(r0 * h), int(r1 * h)), slice(int(c0 * w), int(c1 * w)))
    a, b = torch.from_numpy(real01)[crop], torch.from_numpy(transferred01)[crop]
    return gradient_correlation(a.double(), b.double()).numpy()


# ---------------------------------------------------------------------------------------- the hook


def layout_agreement(film01: np.ndarray, drr01: np.ndarray, side: int = LAYOUT_SIDE) -> float:
    """Correlation of a film's and a DRR's intensity ranks at ``side`` px: do they put the same things in the same places?

    The referee of a transfer: the consistency score compares a reconstruction with the image it was
    given, so a transfer that merely smooths the film raises it (a DRR is smooth). This compares with
    the film as loaded instead, blind to any monotone contrast curve (ranks) and to texture (area
    average to ``side`` px, 1 cm at 128 px): what is left is the layout of lungs, heart, diaphragm and
    body. It favours the untransferred film (the reference is that film), so it ranks transfers
    against each other; it cannot say whether to transfer at all.
    """
    import torch.nn.functional as F
    from scipy.stats import rankdata

    def thumb(image):
        ranks = rankdata(np.asarray(image, dtype=np.float64), method="average").reshape(np.shape(image))
        return F.adaptive_avg_pool2d(torch.from_numpy(ranks)[None, None], side).flatten().numpy()

    a, b = thumb(film01), thumb(drr01)
    if a.std() == 0 or b.std() == 0:
        return 0.0  # a blank image has no layout to agree with
    return float(np.corrcoef(a, b)[0, 1])


def consistency_with_and_without_style(score: Callable, real01: np.ndarray, transferred01: np.ndarray,
                                       return_drrs: bool = False):
    """Mean data-consistency of reconstructions from the films as they are and after the transfer.

    ``score(image01)`` reconstructs a CT from one ``[H, W]`` radiograph in [0, 1] and returns its
    data-consistency (defined by the pipeline: e.g. the similarity of the reconstruction's DRR to that
    input), or ``(consistency, drr01)`` with that DRR, which adds each reconstruction's
    :func:`layout_agreement` with the film as loaded. It is called once per image of each kind, in this order.
    With ``return_drrs``: ``(result, {"without_style": [N, H, W], "with_style": [N, H, W]})`` (None without DRRs).
    """
    from tqdm import tqdm

    def scored(images, which):  # two reconstructions a film: a minute or more for 60 films on a CPU
        results = [score(image) for image in tqdm(images, desc=f"reconstructing the films {which}", unit="film",
                                                  file=sys.stderr)]
        pairs = [r if isinstance(r, tuple) else (r, None) for r in results]
        consistency = [float(c) for c, _ in pairs]
        drrs = [d for _, d in pairs]
        if any(d is None for d in drrs):
            return consistency, None, None
        return consistency, [layout_agreement(f, d) for f, d in zip(real01, drrs)], np.stack(drrs).astype(np.float32)

    without, layout_without, drrs_without = scored(real01, "as loaded")
    with_style, layout_with, drrs_with = scored(transferred01, "transferred")
    result = {
        "without_style": float(np.mean(without)),
        "with_style": float(np.mean(with_style)),
        "with_not_worse": float(np.mean(np.asarray(with_style) >= np.asarray(without))),  # share of films
        "per_image": {"without_style": without, "with_style": with_style},
        "layout": None,
    }
    if layout_with is not None:
        result["layout"] = {"without_style": float(np.mean(layout_without)), "with_style": float(np.mean(layout_with)),
                            "side": LAYOUT_SIDE, "per_image": {"without_style": layout_without, "with_style": layout_with}}
    if not return_drrs:
        return result
    return result, None if drrs_with is None else {"without_style": drrs_without, "with_style": drrs_with}


def pipeline_consistency(model_folder, steps: Optional[int] = None, device: str = "auto", seed: int = 0) -> Callable:
    """``score(image01)`` for :func:`consistency_with_and_without_style`: reconstruct with a whole model
    folder (no style stage: the image is scored as given) and return the reconstruction's consistency and DRR.
    Its ``made_with`` says for the report what reconstructed: the options that repeat it, then (once it has run)
    the device and the precision. The model is loaded at the first call, after the evaluation's own checks."""
    from ..io import Radiograph
    from ..pipeline import XctDiffPipeline

    loaded = []

    def score(image01: np.ndarray) -> tuple:
        if not loaded:
            loaded.append(XctDiffPipeline.from_pretrained(model_folder))
        pipe = loaded[0]
        film = Radiograph(np.asarray(image01, dtype=np.float32), None, False, "style evaluation")
        result = pipe.reconstruct(film, steps=steps, seed=seed, device=device, style="off")
        score.made_with.update(device=result.device, precision=result.precision,
                               options=options + ["--device", str(pipe.device)])  # what "auto" became
        return result.consistency, pipe.render_drr(result.ct, "cpu")

    options = ["--steps", str(steps)] if steps is not None else []
    score.made_with = {"options": options + ["--device", device], "device": None, "precision": None}
    return score


# ------------------------------------------------------------------------------------------- figure


def nearest_drr(images01: np.ndarray, drrs01: np.ndarray) -> np.ndarray:
    """Index of the most similar DRR for each image: Euclidean distance of standardised 32 x 32 thumbnails."""
    import torch.nn.functional as F

    def thumbs(x):
        t = F.adaptive_avg_pool2d(torch.from_numpy(x)[:, None].float(), 32).flatten(1)
        return (t - t.mean(1, keepdim=True)) / t.std(1, keepdim=True).clamp_min(1e-6)

    return torch.cdist(thumbs(images01), thumbs(drrs01)).argmin(1).numpy()


def figure(*columns: np.ndarray) -> np.ndarray:
    """Columns of ``[rows, S, S]`` images side by side, 2-pixel white gaps: ``[rows * (S + 2) - 2, C * (S + 2) - 2]``."""
    rows = []
    for images in zip(*columns):
        rows.append(np.concatenate([np.pad(im, ((0, 0), (0, 2)), constant_values=1.0) for im in images], 1)[:, :-2])
    grid = np.concatenate([np.pad(r, ((0, 2), (0, 0)), constant_values=1.0) for r in rows], 0)[:-2]
    return grid.astype(np.float32)


# ------------------------------------------------------------------------------------------- report


def evaluate_style(
    model,
    real,
    drr_datalist,
    out_dir,
    max_images: Optional[int] = None,
    seed: int = 0,
    folds: int = 5,
    consistency: Optional[Callable] = None,
    device: str = "cpu",
) -> dict:
    """Domain distance of real films to DRRs before and after the style transfer; writes JSON, Markdown, PNG."""
    from PIL import Image

    from ..atomic import refuse_own_output
    from ..figures import with_caption, write_png
    from ..style import load_style_generator
    from .reconstructions import made_on

    if max_images is not None and max_images < folds:
        raise XctDiffError(f"--max-images must be at least the number of folds ({folds}), got {max_images}")
    if folds < 2:
        raise XctDiffError(f"--folds must be at least 2, got {folds}")
    if seed < 0:
        raise XctDiffError(f"--seed must be 0 or more, got {seed}")
    out_dir = check_output_folder(out_dir, parents=True)
    model = run_style_folder(model)
    for given in (model, drr_datalist):  # the report would be written among them
        if Path(given).exists():
            refuse_own_output(given, out_dir)
    with output_lock(out_dir, "xctdiff evaluate-style"):  # a second evaluation into it is refused
        patterns = [real] if isinstance(real, (str, Path)) else list(real)
        refuse_a_model_without_style(model)
        generator, size = load_style_generator(model, device)
        unreadable = []
        real01, files = load_real_images(patterns, size, max_images, seed, output=out_dir, drr_datalist=drr_datalist,
                                         passed_over=unreadable)
        drr01 = load_drr_images(drr_datalist, size)
        if min(len(real01), len(drr01)) < folds:  # before the transfer, and saying what was found
            raise XctDiffError(f"{folds}-fold cross-validation needs {folds} images of each kind, found {len(real01)} real "
                               f"film{'s' * (len(real01) != 1)} and {len(drr01)} DRR{'s' * (len(drr01) != 1)}: give more, "
                               "or a smaller --folds (2 at least)")
        moved01 = transfer(generator, real01)
        drr_restyled = transfer(generator, drr01)

        f_real, f_moved, f_drr = style_features(real01), style_features(moved01), style_features(drr01)
        result = {
            "model": model_name(model),
            "real": [str(p) for p in patterns],
            "drr_datalist": str(drr_datalist),
            "image_size": size,
            "n_real": len(real01),
            "real_passed_over": unreadable,  # films that could not be read, each with why
            "n_drr": len(drr01),
            "classifier": {"method": "logistic regression (L2, class-weighted), stratified k-fold, balanced accuracy", "folds": folds, "features": list(FEATURES), "seed": seed},
            "before": domain_accuracy(f_real, f_drr, folds, seed),
            "after": domain_accuracy(f_moved, f_drr, folds, seed),
            "after_by_feature": accuracy_by_feature_group(f_moved, f_drr, folds, seed),  # what still gives it away
            "drr_change": float(np.abs(drr_restyled - drr01).mean()),  # what style="on" does to a DRR
            "edge_preservation": _summary(edge_preservation(real01, moved01)),
            "figure": "style_eval.png",
            "consistency": None,
        }
        reconstructed = None
        if consistency is not None:
            result["consistency"], reconstructed = consistency_with_and_without_style(consistency, real01, moved01, return_drrs=True)
        rng = np.random.default_rng(seed)
        shown = np.sort(rng.choice(len(real01), min(FIGURE_ROWS, len(real01)), replace=False))
        nearest = nearest_drr(moved01[shown], drr01)
        made_with = getattr(consistency, "made_with", None) or {"options": []}
        command = shlex.join(["xctdiff", "evaluate-style", "--model", os.path.abspath(model), "--real",
                              *(os.path.abspath(p) for p in patterns), "--drr", os.path.abspath(drr_datalist), "--out",
                              str(out_dir)] + ([] if max_images is None else ["--max-images", str(max_images)])
                             + ["--folds", str(folds), "--seed", str(seed), *made_with["options"]])
        transfer_on = f"{device}, fp32"  # the generator's, as load_style_generator builds it
        on = transfer_on if consistency is None else (f"{transfer_on} (the transfer); {made_with.get('device')}, "
                                                      f"{made_with.get('precision')} (the reconstructions)")
        result["date"], result["made"] = made_on(on, command, protocol="XctDiffCore/evaluation/style.py")
        result.update(xctdiff=__version__, command=command, device=device, precision="fp32",
                      reconstructions=None if consistency is None else {k: made_with.get(k) for k in ("device", "precision")})
        result["figure_rows"] = [{"real": str(files[i]), "nearest_drr_index": int(j)} for i, j in zip(shown, nearest)]
        if reconstructed is None:
            result["figure_columns"] = ["real film", "transferred", "nearest DRR"]
            columns = (real01[shown], moved01[shown], drr01[nearest])
        else:  # what each input makes of the patient, side by side
            result["figure_columns"] = ["real film", "DRR of its reconstruction", "transferred", "DRR of its reconstruction", "nearest DRR"]
            columns = (real01[shown], reconstructed["without_style"][shown], moved01[shown], reconstructed["with_style"][shown], drr01[nearest])
        result["figure_caption"] = [f"Columns: {' | '.join(result['figure_columns'])}.",
                                    f"Films, top to bottom: {', '.join(Path(files[i]).name for i in shown)}.",
                                    f"Model {result['model']}, xctdiff evaluate-style (style_eval.md: what made it)."]
        image = Image.fromarray(np.round(np.clip(figure(*columns), 0, 1) * 255).astype(np.uint8))
        with output_set():  # the three or none (a full disk at the last): never a new figure beside an old table
            write_png(with_caption(image, result["figure_caption"]), out_dir / "style_eval.png", "style evaluation")
            with atomic_path(out_dir / "style_eval.json") as tmp:
                tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            with atomic_path(out_dir / "style_eval.md") as tmp:
                tmp.write_text(markdown_table(result), encoding="utf-8")
        return result


def run_style_folder(model):
    """A training run folder given as ``--model`` -> its ``RUN/style`` (where `xctdiff train style` writes the
    weights); anything else as given. It was 'no style weights at RUN/style.safetensors (train them ...)'."""
    from ..model_folder import MANIFEST_NAME
    from ..style import STYLE_WEIGHTS

    path = Path(model)
    if path.is_dir() and not (path / MANIFEST_NAME).is_file() and not (path / STYLE_WEIGHTS).is_file() \
            and (path / "style" / STYLE_WEIGHTS).is_file():
        return path / "style"
    return model


def refuse_a_model_without_style(model) -> None:
    """A model folder exported without a style stage: one line that says so and what to give instead (the manifest's
    own words were 'manifest.json lacks the style stage(s)')."""
    from ..model_folder import MANIFEST_NAME, read_manifest

    path = Path(model)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        stages = read_manifest(path, required=()).get("stages") or {}
        if "style" not in stages:
            raise XctDiffError(f"{path} has no style stage (its stages: {', '.join(stages) or 'none'}): nothing for "
                               "evaluate-style to measure; train one (`xctdiff train style`) and export the run again, or "
                               "give a run's RUN/style/style.safetensors")


def model_name(model) -> str:
    """A model folder's id and version with its path (the report's words), or a bare style file's path."""
    from ..model_folder import MANIFEST_NAME, read_manifest

    path = Path(model)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        manifest = read_manifest(path, required=("style",))
        return f"{manifest.get('id', path.name)} {manifest.get('version', '')}".strip() + f" ({path.resolve()})"
    return str(path.resolve())


def _summary(values: np.ndarray) -> dict:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "median": float(np.median(values)),
            "per_image": [float(v) for v in values]}


def markdown_table(result: dict) -> str:
    """The report as Markdown: accuracies with their spread over folds, counts, and what they mean."""
    def cell(r):
        return f"{100 * r['accuracy']:.1f}% ± {100 * r['std']:.1f}"

    lines = [
        "# Style transfer: real radiographs -> DRR style",
        "",
        result.get("made", "").rstrip("\n") + "\n",
        f"Model `{result['model']}`, {result['n_real']} real films ({', '.join(result['real'])}), "
        f"{result['n_drr']} DRRs ({result['drr_datalist']}), {result['image_size']} px."
        + (f" Passed over {len(result['real_passed_over'])} film(s) that could not be read: "
           + ", ".join(f"{u['file']} ({u['why']})" for u in result["real_passed_over"]) + "."
           if result.get("real_passed_over") else ""),
        "",
        f"| comparison | balanced accuracy of a style classifier ({result['classifier']['folds']}-fold, held out) |",
        "| --- | --- |",
        f"| real vs DRR | {cell(result['before'])} |",
        f"| real -> DRR style vs DRR | {cell(result['after'])} |",
        "",
        "50% = the classifier cannot tell the kinds apart; 100% = trivially separable. "
        f"Logistic regression on style features ({'; '.join(result['classifier']['features'])}), "
        "trained and tested on all images (mean ± std over folds). Anatomy differences between the sets "
        "(e.g. children's films vs adult CTs) can keep the accuracy above 50% even after a perfect transfer.",
        "",
        "Each feature group alone, after the transfer (what still tells the kinds apart): "
        + ", ".join(f"{name} {100 * value:.1f}%" for name, value in result["after_by_feature"].items()) + ".",
        "",
        f"Mean absolute change the generator makes to a DRR (should be small): {result['drr_change']:.4f} (intensity in [0, 1]).",
        "",
        f"Bone-edge preservation (correlation of gradient magnitude, film vs transfer, inside the lung fields' box; "
        f"1 = every edge kept): mean {result['edge_preservation']['mean']:.3f}, median "
        f"{result['edge_preservation']['median']:.3f}, lowest {result['edge_preservation']['min']:.3f}.",
        "",
        f"Figure `{result['figure']}`: rows of {' | '.join(result['figure_columns'])}.",
    ]
    if result.get("consistency"):
        c = result["consistency"]
        lines += ["", "| data consistency of the reconstruction | value |", "| --- | --- |",
                  f"| without style transfer | {c['without_style']:.4f} |", f"| with style transfer | {c['with_style']:.4f} |",
                  f"| films whose consistency the transfer did not lower | {100 * c['with_not_worse']:.0f}% |"]
        if c.get("layout"):
            lay = c["layout"]
            lines += [f"| layout agreement of the reconstruction with the film as loaded ({lay['side']} px ranks), "
                      f"without / with the transfer | {lay['without_style']:.4f} / {lay['with_style']:.4f} |", "",
                      "The consistency compares each reconstruction with the image it was given, so a transfer that only "
                      "smooths raises it; the layout agreement compares with the film as loaded (ranks at "
                      f"{lay['side']} px: no contrast curve, no texture) and ranks transfers against each other. It favours "
                      "the untransferred film, which is its reference."]
    else:  # a bare style file has no model to reconstruct with: the report says what it leaves out
        lines += ["", "Data consistency of reconstructions with and without the transfer: not measured (`--model` named "
                  "style weights, not a whole model folder, which it takes to reconstruct)."]
    return "\n".join(lines) + "\n"
