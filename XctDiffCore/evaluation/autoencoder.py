"""``xctdiff evaluate-autoencoder``: how much of a CT survives the VQ-GAN alone (encode, quantise, decode).

No reconstruction can be sharper than what the autoencoder decodes from the *true* latent, so this is
the ceiling of the whole product. Per validation case (the same cases as ``xctdiff evaluate``: the
datalist's un-augmented validation CTs, or a folder of CTs preprocessed to 128^3 at 2.5 mm):

* **autoencoder**: the CT on the model's grid -> ``encode`` -> ``quantize`` -> ``decode`` -> HU,
  trilinearly brought to 128^3 when the model works coarser, scored against the CT with the pinned
  protocol (:mod:`XctDiffCore.metrics`: PSNR/SSIM in 3D on the [-1024, 2048] HU window, bone and lung
  Dice, LPIPS where its weights exist), with the codebook's use on that case (share of entries used,
  perplexity);
* **resample bounds** (no learning at all): the CT average-pooled to a coarser grid and trilinearly
  resampled back, at the latent's resolution (what the latent grid could hold with unquantised,
  one-number voxels) and at 64^3. An autoencoder below the 64^3 bound blurs more than a 5 mm grid.

Outputs in ``--out``: ``metrics.csv`` (one row per case and method), ``summary.md`` (what made it: the
model's id and version or the run and its step, the device, the precision, the date, XctDiff's version and
the command; per-case rows, then mean ± std), ``summary.json`` and ``figure.png`` (truth vs decoded, coronal
and axial mid-slices in a bone window and a lung window, a row per case; a caption names the windows, the
cases in full and the model). The cases' caveats are
``xctdiff evaluate``'s (:func:`~.reconstructions.case_notes`): *training fit* (a patient of the model
folder's training list, or of the run's training datalist, read where training read it: :func:`run_datalist`), *not a
whole chest*, *low resolution*.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..atomic import check_output_folder, output_lock, output_set
from ..errors import XctDiffError

COLUMNS = ("psnr", "ssim", "bone_dice", "lung_dice", "lung_dice_body", "lpips", "codebook_use", "perplexity")
TITLES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "bone_dice": "bone Dice", "lung_dice": "lung Dice",
          "lung_dice_body": "lung Dice in body", "lpips": "LPIPS",
          "codebook_use": "codes used", "perplexity": "perplexity"}
BOUND_SIZE = 64  # the reference bound: a 5 mm grid


def load_vqgan(model=None, run=None) -> tuple:
    """``(vqgan, volume_size, source, training patients or None)`` from a model folder (possibly partial; its
    manifest's id, version and training list) or a training run's checkpoint (its step; its datalist's training
    patients when that file is still there)."""
    if (model is None) == (run is None):
        raise XctDiffError("give one of --model FOLDER or --run RUN")
    if model is not None and (Path(model) / "autoencoder" / "checkpoint.pt").is_file():  # said 'not a model folder'
        raise XctDiffError(f"{model} is a training run, not a model folder: give --run {model}")
    if run is not None and (Path(run) / "manifest.json").is_file():  # said 'no autoencoder checkpoint in RUN'
        raise XctDiffError(f"{run} is a model folder, not a training run: give --model {run}")
    if model is not None:
        from ..model_manifest import read_manifest
        from ..model_folder import load_autoencoder
        from .reconstructions import model_training_patients

        vqgan, size = load_autoencoder(model)
        manifest = read_manifest(model, required=("autoencoder",))
        name = f"{manifest.get('id', Path(model).name)} {manifest.get('version', '')}".strip()
        return vqgan, size, f"{name} ({Path(model).resolve()})", model_training_patients(model)
    from ..config import config_from_dict
    from ..models.vqgan import VQGAN
    from ..training.autoencoder import shipped_weights
    from ..training.common import load_checkpoint

    path = Path(run) / "autoencoder" / "checkpoint.pt"
    if not path.is_file():
        raise XctDiffError(f"no autoencoder checkpoint in {run} (expected {path})")
    checkpoint = load_checkpoint(path, required=("config", "models"))
    try:
        config = config_from_dict(checkpoint["config"])
        state = shipped_weights(checkpoint["models"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise XctDiffError(f"cannot read the autoencoder checkpoint {path}: {str(exc).splitlines()[0]}") from None
    vqgan = VQGAN(**dataclasses.asdict(config.autoencoder.model))
    vqgan.load_state_dict(state)
    source = f"run {Path(run).resolve()} (step {checkpoint.get('step', '?')})"
    datalist = run_datalist(run, config.run.dir, config.data.datalist, checkpoint.get("datalist_sha256"),
                            checkpoint.get("datalist_path"))
    return vqgan.eval().requires_grad_(False), config.data.volume_size, source, run_training_patients(datalist)


def run_datalist(run, recorded_run, recorded, sha256: Optional[str] = None, resolved=None) -> Optional[Path]:
    """The run's training datalist where training read it (:func:`~XctDiffCore.datalist.find_run_datalist`); None,
    said in one warning, when it is not found: the run's patients cannot be marked training fit."""
    import warnings

    from ..datalist import find_run_datalist

    if not recorded:
        return None
    found, why = find_run_datalist(run, recorded_run, recorded, sha256, resolved)
    if why:
        warnings.warn(f"the run {run} trained on {recorded}, and {why}: no case can be marked training fit (the run's "
                      "own training patients would be scored as new ones); put the datalist back where it was, or "
                      "evaluate an exported model folder, whose manifest lists the patients", stacklevel=3)
    return found


def run_training_patients(datalist) -> Optional[set]:
    """The patients of a run's training datalist (its ``training`` entries), or None when it is gone or unreadable."""
    from ..datalist import read_datalist

    if not datalist or not Path(datalist).is_file():
        return None
    try:
        return {str(item["patient"]) for item in read_datalist(datalist, "training")}
    except XctDiffError:
        return None


def pool_and_resample(ct_hu: np.ndarray, size: int) -> np.ndarray:
    """The resample bound: average-pool a ``N^3`` HU volume to ``size^3``, trilinearly back to ``N^3``."""
    x = torch.from_numpy(np.ascontiguousarray(ct_hu, dtype=np.float32))[None, None]
    coarse = F.adaptive_avg_pool3d(x, size)
    return F.interpolate(coarse, size=ct_hu.shape, mode="trilinear", align_corners=False)[0, 0].numpy()


@torch.no_grad()
def autoencode(vqgan, ct_hu: np.ndarray, volume_size: int) -> tuple:
    """A canonical HU CT through the VQ-GAN on its grid: ``(decoded HU on the CT's grid, code indices)``."""
    from ..layout import model_layout_to_ct, unit_to_hu
    from ..model_inputs import ct_to_model

    x = ct_to_model(ct_hu, volume_size)[None]  # (1, 1, s, s, s) in [-1, 1], model layout
    z_q, _, indices = vqgan.quantize(vqgan.encode(x))
    decoded = model_layout_to_ct(unit_to_hu(vqgan.decode(z_q)[0, 0].numpy()))
    if decoded.shape != ct_hu.shape:
        decoded = F.interpolate(torch.from_numpy(np.ascontiguousarray(decoded))[None, None], size=ct_hu.shape,
                                mode="trilinear", align_corners=False)[0, 0].numpy()
    return decoded.astype(np.float32), indices


def evaluate_autoencoder(data, out_dir, model=None, run=None, max_cases: Optional[int] = None, progress: bool = True,
                         figure_cases: int = 4) -> dict:
    """Run the protocol of the module docstring; write the outputs; return ``{"rows", "summary"}``."""
    from tqdm import tqdm

    from ..atomic import refuse_own_output
    from .reconstructions import (_is_datalist, _write_text, case_notes, ct_folder_cases, datalist_cases, flagged_cases,
                                  made_on, metrics_csv, notes_markdown, summarize, warn_about_cases)
    from ..metrics import body_region, volume_scores
    from ..model_folder import PREPARED_SIZE
    from ..models.lpips import LPIPS
    from ..models.quantize import code_histogram, codebook_perplexity, codebook_utilisation

    data, out_dir = Path(data), Path(out_dir)
    if not data.exists():
        raise XctDiffError(f"evaluation data not found: {data}")
    if max_cases is not None and max_cases < 1:
        raise XctDiffError(f"--max-cases must be at least 1, got {max_cases}")
    check_output_folder(out_dir, parents=True)  # `--out eval/lidc` makes eval/ too, as train and export do
    for given in (model, run, data if _is_datalist(data) else None):  # the report would be written among them
        if given is not None and Path(given).exists():
            refuse_own_output(given, out_dir)
    with output_lock(out_dir, "xctdiff evaluate-autoencoder"):  # a second evaluation into it is refused
        vqgan, volume_size, source, trained_on = load_vqgan(model, run)
        cases = (datalist_cases(data, PREPARED_SIZE, max_cases) if _is_datalist(data)
                 else ct_folder_cases(data, PREPARED_SIZE, "cone", max_cases, output=out_dir))
        notes = case_notes(cases, trained_on)
        warn_about_cases(notes)
        lpips = LPIPS.load()
        latent = volume_size // vqgan.downsample_factor

        rows, figure, histogram = [], [], torch.zeros(vqgan.codebook_size, dtype=torch.long)
        bar = tqdm(cases, desc="evaluate-autoencoder", unit="case", file=sys.stderr, disable=not progress)
        for case in bar:
            def doing(words: str) -> None:  # a row's scores take seconds (3D SSIM, LPIPS of 384 slices), as in evaluate
                bar.set_postfix_str(f"{case.name}: {words}")

            doing("autoencoding")
            decoded, indices = autoencode(vqgan, case.truth_hu, volume_size)
            histogram += code_histogram(indices, vqgan.codebook_size)
            body = body_region(case.truth_hu)
            doing("scoring the autoencoder")
            rows.append({"case": case.name, "method": "autoencoder", **volume_scores(decoded, case.truth_hu, lpips, body=body),
                         "codebook_use": codebook_utilisation(indices, vqgan.codebook_size),
                         "perplexity": codebook_perplexity(indices, vqgan.codebook_size)})
            for size in dict.fromkeys((latent, BOUND_SIZE)):
                doing(f"scoring resample {size}^3")
                bound = pool_and_resample(case.truth_hu, size)
                rows.append({"case": case.name, "method": f"resample {size}^3",
                             **volume_scores(bound, case.truth_hu, lpips, body=body)})
            if len(figure) < figure_cases:
                figure.append((case, decoded))

        summary = summarize_rows(rows, summarize)
        summary["autoencoder"]["codebook_use_all_cases"] = float((histogram > 0).float().mean())
        dtype = next(vqgan.parameters()).dtype  # on the CPU, as built
        precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
        header = (f"Autoencoder of `{source}` in {precision}: {volume_size}^3 grid, latent {latent}^3 x {vqgan.latent_channels}, "
                  f"codebook {vqgan.codebook_size}; {len(cases)} case{'s' * (len(cases) != 1)} from `{data.name}`, scored on "
                  f"{PREPARED_SIZE}^3 at 2.5 mm (bone: HU > 200, lung: -1000 < HU < -400; in body: inside the truth's body). "
                  f"Codebook entries used over all cases: {summary['autoencoder']['codebook_use_all_cases']:.1%}.\n\n")
        command = shlex.join(["xctdiff", "evaluate-autoencoder", "--run" if run is not None else "--model",
                              str(Path(run if run is not None else model).resolve()),
                              "--data", str(data.resolve()), "--out", str(out_dir)]
                             + ([] if max_cases is None else ["--max-cases", str(max_cases)]))
        date, made = made_on("cpu", command)
        header += made + notes_markdown(notes)
        for row in rows:
            row["notes"] = "; ".join(notes[row["case"]]) or None
        with output_set():  # all four or none (a full disk at the figure): never a new metrics.csv beside an old figure
            _write_text(out_dir / "metrics.csv", metrics_csv(rows, ("case", "method", *COLUMNS, "notes")))
            _write_text(out_dir / "summary.md", header + per_case_table(rows) + "\n" + mean_table(summary))
            fit, partial = flagged_cases(notes)
            _write_text(out_dir / "summary.json", json.dumps({"source": source, "cases": len(cases), "date": date,
                                                              "device": "cpu", "precision": precision,
                                                              "xctdiff": __version__, "command": command,
                                                              "training_fit": fit, "not_whole_chest": partial,
                                                              "summary": summary, "rows": rows}, indent=2) + "\n")
            if figure:
                from ..figures import compose_grid, with_caption, write_png

                image = with_caption(compose_grid(figure_rows(figure)), figure_caption(figure, source, notes))
                write_png(image, out_dir / "figure.png")
        return {"rows": rows, "summary": summary}


def summarize_rows(rows: list, summarize) -> dict:
    """method -> column -> mean/std/n, over the protocol's metrics and the codebook columns."""
    summary = summarize(rows)
    for method in summary:
        for column in ("codebook_use", "perplexity"):  # the protocol's metrics are summarize's
            values = [r[column] for r in rows if r["method"] == method and r.get(column) is not None]
            if values:
                summary[method][column] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
    return summary


def _cell(column: str, value) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if column in ("psnr", "perplexity") else f"{value:.3f}"


def per_case_table(rows: list) -> str:
    lines = ["| case | method | " + " | ".join(TITLES[c] for c in COLUMNS) + " |", "| --- | --- |" + " ---: |" * len(COLUMNS)]
    for row in rows:
        lines.append(f"| {row['case']} | {row['method']} | " + " | ".join(_cell(c, row.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def mean_table(summary: dict) -> str:
    lines = ["| method (mean ± std) | " + " | ".join(TITLES[c] for c in COLUMNS) + " |", "| --- |" + " ---: |" * len(COLUMNS)]
    for method, metrics in summary.items():
        cells = [f"{_cell(c, metrics[c]['mean'])} ± {_cell(c, metrics[c]['std'])}" if isinstance(metrics.get(c), dict) else ""
                 for c in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure_rows(figure: list) -> list:
    """Per case: truth | decoded, coronal and axial, in a bone window, then in a lung window (the case's name, which
    a label of a panel's width cannot hold, is in :func:`figure_caption`)."""
    from ..figures import BONE_WINDOW_HU, LUNG_WINDOW_HU, orthogonal_slices, window

    rows = []
    for case, decoded in figure:
        truth, ours = orthogonal_slices(case.truth_hu), orthogonal_slices(decoded)
        row = []
        for name, low_high in (("bone", BONE_WINDOW_HU), ("lung", LUNG_WINDOW_HU)):
            for plane in ("coronal", "axial"):
                row += [(f"truth {plane} {name}", window(truth[plane], low_high)),
                        (f"decoded {plane} {name}", window(ours[plane], low_high))]
        rows.append(row)
    return rows


def figure_caption(figure: list, source: str, notes: dict) -> list:
    """The figure's lines of text: the windows, every case in full with its notes, top to bottom, and the model."""
    from ..figures import BONE_WINDOW_HU, LUNG_WINDOW_HU

    def words(low_high):
        low, high = low_high
        return f"W {high - low:.0f} / L {(high + low) / 2:.0f}"

    names = [case.name + (f" ({'; '.join(notes[case.name])})" if notes.get(case.name) else "") for case, _ in figure]
    return [f"Mid-slices, a row per case: truth | decoded, coronal and axial, in a bone window ({words(BONE_WINDOW_HU)}), "
            f"then in a lung window ({words(LUNG_WINDOW_HU)}).", f"Cases, top to bottom: {', '.join(names)}.",
            f"Autoencoder of {source}, xctdiff evaluate-autoencoder (summary.md: what made it)."]
