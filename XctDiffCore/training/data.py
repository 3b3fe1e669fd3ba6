"""Training pairs from a Decathlon datalist: a CT volume and its radiograph, as model tensors.

The datalist is the one ``xctdiff prepare`` writes::

    {"training":   [{"image": "images/<id>_aug<k>.npz", "xray": "xrays/<id>_aug<k>.npy", "patient": "<id>"}, ...],
     "validation": [...]}

with paths relative to the datalist's folder. An image ``.npz`` holds ``ct``: int16 HU, canonical
``[z, y, x]``; an xray ``.npy`` holds float32 in [0, 1], display orientation ``[row, col]``.

Model tensors (see :mod:`XctDiffCore.layout`): the CT is ``(1, D, H, W)`` in [-1, 1] (fixed HU
window); the radiograph is ``(1, H, W)`` **also in [-1, 1]** (``2 * x - 1``): one input range for every
network, decided here once; :func:`xray_to_model` is the conversion the pipeline uses at inference.
Both are downsampled on the fly to the config's sizes (CT: average pooling; radiograph: area
interpolation), so one prepared 128^3 data set serves the 32^3 tiny config as well as the paper's.

Only numpy and torch are imported: this runs on a bare GPU machine.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..errors import XctDiffError
from ..layout import ct_to_model_layout, hu_to_unit


def ct_to_model(ct_hu: np.ndarray, size: int) -> torch.Tensor:
    """Canonical ``[z, y, x]`` HU -> ``(1, size, size, size)`` float32 in [-1, 1] (model layout, avg-pooled)."""
    x = torch.from_numpy(hu_to_unit(np.ascontiguousarray(ct_to_model_layout(ct_hu)).astype(np.float32)))
    x = x[None]  # (1, D, H, W)
    if tuple(x.shape[1:]) != (size, size, size):
        x = F.adaptive_avg_pool3d(x, size)
    return x.contiguous()


def xray_to_model(xray01: np.ndarray, size: int) -> torch.Tensor:
    """Display-oriented ``[row, col]`` radiograph in [0, 1] -> ``(1, size, size)`` float32 in [-1, 1] (area resize)."""
    x = torch.from_numpy(np.asarray(xray01, dtype=np.float32).clip(0.0, 1.0))[None, None]  # (1, 1, H, W)
    if tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area")
    return (x[0] * 2.0 - 1.0).contiguous()


def read_datalist(path, section: str) -> list[dict]:
    """The entries of one section with absolute paths; a clear error for a missing file or key."""
    path = Path(path)
    if not path.is_file():
        raise XctDiffError(f"datalist not found: {path} (make one with `xctdiff prepare`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise XctDiffError(f"{path} is not valid JSON: {exc}") from None
    entries = data.get(section, [])
    items = []
    for entry in entries:
        if "image" not in entry or "xray" not in entry:
            raise XctDiffError(f"{path}: every {section} entry needs 'image' and 'xray', got {sorted(entry)}")
        items.append(
            {
                "image": path.parent / entry["image"],
                "xray": path.parent / entry["xray"],
                "patient": str(entry.get("patient", Path(entry["image"]).stem)),
            }
        )
    return items


def datalist_geometry(path) -> str:
    """The DRR geometry a datalist's radiographs were rendered in (``settings.geometry``; cone by default)."""
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return "cone"
    return str(settings.get("geometry", "cone")) if isinstance(settings, dict) else "cone"


class PairDataset(Dataset):
    """One datalist section as ``{"image": (1, D, H, W), "xray": (1, H, W), "patient": str}`` items."""

    def __init__(self, datalist, section: str, volume_size: int, xray_size: int):
        self.items = read_datalist(datalist, section)
        self.volume_size = volume_size
        self.xray_size = xray_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        with np.load(item["image"]) as npz:
            ct = npz["ct"]
        return {
            "image": ct_to_model(ct, self.volume_size),
            "xray": xray_to_model(np.load(item["xray"]), self.xray_size),
            "patient": item["patient"],
        }


class StepSampler(Sampler):
    """An endless stream of indices for one process, starting at a given optimisation step.

    Epoch ``e`` is :class:`DistributedSampler`'s shuffle for ``seed`` and ``e`` (so ranks see disjoint
    shares), cut to whole batches; step ``s`` reads batch ``s mod batches_per_epoch`` of epoch
    ``s // batches_per_epoch``. A run resumed at step ``s`` therefore reads exactly the batches an
    uninterrupted run would have read, without loading the skipped ones.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1):
        if num_items < 1:
            raise XctDiffError("the datalist has no training items")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        per_rank = -(-num_items // world_size)
        self.batches_per_epoch = max(1, per_rank // batch_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        sampler = DistributedSampler(
            range(self.num_items), num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.seed
        )
        sampler.set_epoch(epoch)
        indices = list(sampler)
        need = self.batches_per_epoch * self.batch_size
        while len(indices) < need:  # fewer items than one batch: repeat them
            indices += indices
        return indices[:need]

    def __iter__(self):
        epoch, skip = divmod(self.start_step, self.batches_per_epoch)
        while True:
            yield from self.epoch_indices(epoch)[skip * self.batch_size :]
            epoch, skip = epoch + 1, 0


def train_loader(dataset: Dataset, batch_size: int, seed: int, start_step: int, rank: int, world_size: int, num_workers: int) -> DataLoader:
    """Batches for steps ``start_step, start_step + 1, ...`` (iterate with ``zip(range(...), loader)``)."""
    sampler = StepSampler(len(dataset), batch_size, seed, start_step, rank, world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        # a private generator: creating the iterator must not draw from the global RNG (resume parity)
        generator=torch.Generator().manual_seed(seed),
    )
