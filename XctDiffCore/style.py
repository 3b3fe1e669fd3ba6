"""When and how a radiograph is moved into the DRR style before reconstruction.

The diffusion model only ever saw DRRs. A real radiograph goes through the CycleGAN's real -> DRR
generator first; a DRR must not (the generator would alter an image already in the right domain).

The rule for ``style="auto"``: an image is a DRR exactly when :func:`XctDiffCore.io.read_radiograph`
reports ``is_drr``, which it does for files that carry the ``xctdiff_drr`` tag written by
``xctdiff drr``; everything else (PNG/JPEG/DICOM from a scanner or a dataset) counts as real.
``style="on"`` and ``style="off"`` override the rule.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import XctDiffError
from .options import STYLE_CHOICES

STYLE_WEIGHTS = "style.safetensors"  # with style.json beside it: written by training.common.export_stage


def find_real_films(patterns, output=None) -> list:
    """The real films of folders and glob patterns (:func:`~.io.find_real_radiographs`), the files of ``output``, the
    job's own folder, passed over: a figure or preview the job wrote there, read back, would be a real film. A folder
    named inside ``output`` is one error line, and so are patterns whose films all lie in it. Figures XctDiff wrote
    elsewhere (an earlier run's views PNGs among the films: :func:`~.figures.is_xctdiff_figure`) are passed over
    with one warning line."""
    import warnings

    from .atomic import in_folder, refuse_own_output
    from .figures import is_xctdiff_figure
    from .io import find_real_radiographs

    if output is not None:
        for pattern in patterns:
            if Path(pattern).expanduser().is_dir():
                refuse_own_output(pattern, output)
    files = find_real_radiographs(patterns)
    if output is not None:
        files = [f for f in files if not in_folder(f, output)]
        if not files:
            raise XctDiffError(f"the real films named are all in the output folder {output}: a job does not read its "
                               "own outputs back as inputs")
    figures = [f for f in files if is_xctdiff_figure(f)]
    if figures:
        tagged = set(figures)
        files = [f for f in files if f not in tagged]
        if not files:
            raise XctDiffError(f"the real films named are all PNG figures that XctDiff wrote, e.g. {figures[0]}")
        warnings.warn(f"passed over {len(figures)} PNG figure{'s' * (len(figures) > 1)} that XctDiff wrote (views, "
                      f"evaluation figures) among the real films: not radiographs (e.g. {figures[0]})", stacklevel=2)
    return files


def load_style_generator(path, device="cpu"):
    """A model folder or a ``style.safetensors`` file (``style.json`` beside it) -> (real -> DRR generator in eval mode, image size).

    A model folder (with ``manifest.json``) is verified like any model: its style files must match their
    SHA-256 and lie inside the folder, and the bytes that were hashed are the bytes deserialised. A bare
    file (or a run's stage folder, which has no manifest) has no checksum to meet: it is read once and
    those bytes are loaded, so it cannot change between the read and the load.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from .model_folder import MANIFEST_NAME, read_manifest, verify_checksums
    from .models.cyclegan import ResnetGenerator

    path = Path(path)
    if not path.exists():  # not "no style weights": a mistyped or relative path is the likelier cause
        raise XctDiffError(f"no such model folder or style file: {path}")
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        manifest = read_manifest(path, required=("style",))
        record = manifest["stages"]["style"]
        contents = verify_checksums(path, manifest)
        weights, config_path = path / record["weights"], path / record["config"]
        weight_bytes, config_bytes = contents[record["weights"]], contents[record["config"]]
    else:
        weights = path / STYLE_WEIGHTS if path.is_dir() else path
        config_path = weights.with_suffix(".json")
        if not weights.is_file():
            raise XctDiffError(f"no style weights at {weights} (train them with `xctdiff train style`)")
        if not config_path.is_file():
            raise XctDiffError(f"style weights {weights.name} have no {config_path.name} beside them")
        weight_bytes, config_bytes = weights.read_bytes(), config_path.read_bytes()
    try:
        config = json.loads(config_bytes.decode("utf-8"))
        # weights written before the option existed have CycleGAN's transposed convolutions
        generator = ResnetGenerator(**{"upsample": "transpose", **config["model"]})
        generator.load_state_dict(load_safetensors(weight_bytes))
        image_size = int(config["image_size"])
    except (KeyError, TypeError, RuntimeError, ValueError, UnicodeDecodeError, SafetensorError) as exc:
        raise XctDiffError(f"{weights} is not a style generator matching {config_path.name}: {exc}") from None
    return generator.float().to(device).eval(), image_size


def should_apply_style(style: str, radiograph) -> bool:
    """``"auto"``: only when ``radiograph.is_drr`` is false; ``"on"``: always; ``"off"``: never."""
    if style == "on":
        return True
    if style == "off":
        return False
    if style == "auto":
        return not bool(radiograph.is_drr)
    raise XctDiffError(f"style must be one of {', '.join(STYLE_CHOICES)}, got {style!r}")


@torch.no_grad()
def apply_style(generator: torch.nn.Module, image01):
    """Real -> DRR style: ``(..., H, W)`` numpy array or tensor in [0, 1] -> the same kind, shape and place, in [0, 1].

    Runs in float32 on the generator's device; H and W must suit the generator (the model's input
    size, 128 for the shipped models).
    """
    is_numpy = isinstance(image01, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(image01, dtype=np.float32)) if is_numpy else image01
    shape, device = x.shape, x.device
    if x.ndim < 2:
        raise XctDiffError(f"a radiograph must be 2D, got shape {tuple(shape)}")
    param = next(generator.parameters())
    x = x.reshape(-1, 1, *shape[-2:]).to(param.device, torch.float32)  # (N, 1, H, W)
    factor = 2 ** generator.num_downsamples
    if shape[-1] % factor or shape[-2] % factor:
        raise XctDiffError(f"style transfer needs a side divisible by {factor}, got {tuple(shape[-2:])}")
    was_training = generator.training
    generator.eval()
    y = generator(x.clamp(0, 1) * 2 - 1).float()
    generator.train(was_training)
    y = ((y + 1) / 2).clamp(0, 1).reshape(shape)
    return y.cpu().numpy() if is_numpy else y.to(device)
