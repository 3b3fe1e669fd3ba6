"""Training pairs from a Decathlon datalist: a CT volume and its radiograph, as model tensors.

The datalist is the one ``xctdiff prepare`` writes::

    {"training":   [{"image": "images/<id>_aug<k>.npz", "xray": "xrays/<id>_aug<k>.npy", "patient": "<id>"}, ...],
     "validation": [...]}

with paths relative to the datalist's folder. An image ``.npz`` holds ``ct``: int16 HU, canonical
``[z, y, x]``; an xray ``.npy`` holds float32 in [0, 1], display orientation ``[row, col]``.

Model tensors (see :mod:`XctDiffCore.layout`): the CT is ``(1, D, H, W)`` in [-1, 1] (fixed HU
window); the radiograph is ``(1, H, W)`` **also in [-1, 1]** (``2 * x - 1``): one input range for every
network, decided once in :mod:`XctDiffCore.model_inputs`, whose conversions the pipeline uses at
inference too; the datalist reader is :mod:`XctDiffCore.datalist`'s (shared with the evaluation).
Both are downsampled on the fly to the config's sizes (CT: average pooling; radiograph: area
interpolation), so one prepared 128^3 data set serves the 32^3 tiny config as well as the paper's.

Only numpy and torch are imported: this runs on a bare GPU machine.
"""
from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..datalist import load_entry_ct, load_entry_xray, read_datalist
from ..errors import XctDiffError
from ..model_inputs import ct_to_model, xray_to_model


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
        return {
            "image": ct_to_model(load_entry_ct(item["image"]), self.volume_size),
            "xray": xray_to_model(load_entry_xray(item["xray"]), self.xray_size),
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
        worker_init_fn=_ignore_stop_signals if num_workers else None,
    )


def _ignore_stop_signals(worker_id: int) -> None:
    """A loader worker leaves Ctrl-C and SIGTERM to the main process, which checkpoints and stops its workers:
    killed by the signal sent to the whole process group (a terminal, ``timeout``, a scheduler), a worker
    turned the clean stop into a ``DataLoader worker is killed`` traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
