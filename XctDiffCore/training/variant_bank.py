"""A bank of training variants made once: for each training CT, ``augment.bank`` warped copies, each
kept as its plain DRR and its target latent ``N(q(E(ct)))`` from the frozen autoencoder.

Why: encoding a fresh 128^3 variant with the frozen VQ-GAN costs about 3.4 s on a 2-core CPU (its
encoder; the 32^3 x 8192 codebook search added 2.5 s before it became a k-d tree), so four variants cost
several times an encoder step at batch 4 (about 2 s). With
``augment.bank: N`` a radiograph stage makes N variants of every training CT before its first step
(variant 0 is the CT itself, the others :func:`~XctDiffCore.training.variants.random_views` draws),
and each step draws one variant per item and randomises its film anew
(:func:`~XctDiffCore.training.variants.random_films`), so no two inputs repeat even when anatomies do.

The bank is a file of the run (``RUN/variant_bank/KEY-RofW.pt``); the key covers everything it depends on
(the autoencoder checkpoint, the datalist, the content of the CT files it names, the warp magnitudes, N, the
seed, the sizes, the DRR geometry), so the encoder and the diffusion stage of one run share it and a resumed run
reuses it. Every draw is seeded by (seed, patient, variant), so a rebuilt bank is the same bank. Under torchrun
every process makes its share of the variants, then all load all shares; a job of another size loads them too.
Banks of other settings are left in the folder (another run of the folder may use them again), and the line
that says a new bank is made says how much disk they take. The making is bounded by ``--time-limit``,
SIGTERM and Ctrl-C like the steps: the variants made are kept one file each, and ``--resume`` makes the rest
(:func:`made_in_parts`, which the style stage's warped DRRs share: :func:`~XctDiffCore.training.style.warped_drrs`).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from ..atomic import atomic_path, make_output_folder
from ..errors import XctDiffError
from ..progress import progress_bar
from .common import (Distributed, StoppedBeforeTraining, autocast, checkpoint_path, file_sha256, load_checkpoint,
                     save_checkpoint)
from .variants import random_films, random_pairs, step_generator

BANK_DIR = "variant_bank"


class VariantBank:
    """Per patient: ``drrs`` ``(N, 1, S, S)`` in [0, 1] (plain, before the film), ``latents`` ``(N, C, d, h, w)``
    and, for ``encoder.bone_weight``, ``bones`` ``(N, 1, d, h, w)`` (:func:`~XctDiffCore.training.variants.bone_fractions`)."""

    def __init__(self, drrs: dict, latents: dict, bones: Optional[dict] = None):
        self.drrs, self.latents, self.bones = drrs, latents, bones

    def __len__(self) -> int:
        return sum(len(v) for v in self.latents.values())

    def draw(self, patients, generator: torch.Generator, film: Optional[dict]) -> tuple:
        """One random variant of each patient: ``(latents (B, C, d, h, w), radiographs (B, 1, S, S) in [-1, 1],
        bone fractions (B, 1, d, h, w) or None)``."""
        latents, drrs, bones = [], [], []
        for patient in patients:
            if patient not in self.latents:
                raise KeyError(f"the variant bank has no patient {patient!r}")
            index = int(torch.randint(len(self.latents[patient]), (), generator=generator))
            latents.append(self.latents[patient][index])
            drrs.append(self.drrs[patient][index])
            if self.bones is not None:
                bones.append(self.bones[patient][index])
        xray = torch.stack(drrs).float()
        if film is not None:
            xray = random_films(xray, generator, **film)
        return torch.stack(latents).float(), xray * 2.0 - 1.0, torch.stack(bones).float() if bones else None


def bank_settings(run_dir, datalist, augment: dict, count: int, seed: int, volume_size: int, xray_size: int, geometry,
                  bone_latent_size: int = 0) -> dict:
    """Everything a bank's content depends on but the CT files' content (:func:`keys_of`)."""
    parts = {
        "autoencoder": file_sha256(checkpoint_path(run_dir, "autoencoder")),
        "datalist": file_sha256(datalist),
        "augment": augment, "count": count, "seed": seed,
        "volume_size": volume_size, "xray_size": xray_size, "geometry": repr(geometry),
    }
    if bone_latent_size:  # a bank with bone fractions is another file; the banks made before keep their keys
        parts["bone_latent_size"] = bone_latent_size
    return parts


def keys_of(settings: dict, ct_files) -> tuple:
    """``(key, key before)``: the key of ``settings`` and the content of ``ct_files`` (what the made variants
    depend on), and the one the version before this gave them (of ``settings`` alone), for the line saying why a
    bank made by that version is made again."""
    return settings_key({**settings, "cts": files_digest(ct_files)}), settings_key(settings)


def files_digest(paths) -> str:
    """One digest of the content of ``paths``, in order.

    Why the content: ``xctdiff prepare`` run again into the same folder (a CT replaced, or prepared with other
    settings) rewrites the CT files under the same names and the datalist byte for byte the same, and a key of the
    datalist alone loaded the variants of the old CTs without a word. Cheap next to making: 19 CTs of 128^3 (62 MB)
    take 0.04 s on a 2-core CPU, reading them for the variants 0.5 s. An unreadable file raises OSError."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def settings_key(settings: dict) -> str:
    """A short digest of ``settings`` (JSON, keys sorted): the file name of what was made from them."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_variant(ct: torch.Tensor, seed: int, patient_index: int, variant: int, geometry, xray_size: int, augment: dict):
    """Variant ``variant`` of one CT ``(1, 1, N, N, N)``: the warped CT and its plain DRR in [0, 1]."""
    magnitudes = augment if variant > 0 else {k: (v if k == "elastic_grid" else 0.0) for k, v in augment.items()}
    generator = step_generator(seed, patient_index, variant)
    ct, xray = random_pairs(ct, generator, geometry, xray_size, magnitudes, None)
    return ct, (xray + 1.0) / 2.0


def _part_path(parts: Path, index: int, variant: int) -> Path:
    return parts / f"{index}-{variant}.pt"


def _made(parts: Path, cts: int, count: int) -> int:
    """How many variants ``parts`` holds (every rank's; not the temporary file of a process killed mid-write)."""
    names = {p.name for p in parts.iterdir()} if parts.is_dir() else set()
    return sum(_part_path(parts, i, v).name in names for i in range(cts) for v in range(count))


def _shares(folder: Path, key: str, world_size: int) -> list:
    """The share files to load: this job's (``KEY-RofW.pt``, W its size) when all are there, else all those of a job
    of another size (a --resume on more or fewer processes: the same entries, each seeded by its own (seed, item,
    variant), dealt round-robin), else this job's, to be made."""
    named = lambda size: [folder / f"{key}-{rank}of{size}.pt" for rank in range(size)]  # noqa: E731
    sizes = {int(m.group(1)) for p in (folder.glob(f"{key}-*of*.pt") if folder.is_dir() else ())
             if (m := re.fullmatch(rf"{key}-\d+of(\d+)\.pt", p.name))}
    for size in [world_size] + sorted(sizes - {world_size}):
        if all(path.is_file() for path in named(size)):
            return named(size)
    return named(world_size)


def _other_banks(folder: Path, key: str) -> dict:
    """``{key: bytes}`` of what ``folder`` holds that is not of ``key`` (banks of other settings, their parts)."""
    sizes = {}
    for path in (folder.iterdir() if folder.is_dir() else ()):
        other = re.match(r"[0-9a-f]{16}", path.name)
        if other and other.group() != key:
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            sizes[other.group()] = sizes.get(other.group(), 0) + sum(p.stat().st_size for p in files)
    return sizes


def _others_line(folder: Path, key: str, key_before: Optional[str]) -> Optional[str]:
    """The words for what else ``folder`` holds, when a bank of ``key`` is to be made: the banks of other settings
    are left there (another run of the folder may use them again), so say how much disk they take."""
    others = _other_banks(folder, key)
    if not others:
        return None
    why = ("its key now covers the training CT files' content, so the one made before is made again once; "
           if key_before in others else "")
    several = len(others) > 1
    them = "them" if several else "it"
    return (f"{why}{folder} also holds {len(others)} bank{'s' * several} of other settings or other training CTs "
            f"({sum(others.values()) / 1e6:.1f} MB: {', '.join(sorted(others))}), left as "
            f"{'they are' if several else 'it is'}: delete {them} if no run needs {them}")


def _make_share(tasks: list, make, parts: Path, deadline, label: str, unit: str, job: Distributed) -> Optional[str]:
    """Make this process's ``tasks`` ((item, variant) pairs) with ``make``, each entry kept at once in ``parts`` (one
    file each, written atomically) and the ones already there passed over; returns None when the share is whole, else
    what stopped it (``"--time-limit"``, ``"SIGTERM"``, ``"Ctrl-C"``: asked between variants)."""
    todo = [t for t in tasks if not _part_path(parts, *t).is_file()]
    try:
        with progress_bar(len(todo), label, unit, disable=not job.is_main) as bar:
            for index, variant in todo:
                cause = deadline.due() if deadline is not None else None
                if cause:
                    return cause
                save_checkpoint(_part_path(parts, index, variant), {"entry": make(index, variant)})
                bar.update()
    except KeyboardInterrupt:  # the variant under way is lost, those made are kept
        return "Ctrl-C"
    return None


def made_in_parts(folder: Path, key: str, items: int, count: int, make, job: Distributed, deadline, label: str,
                  unit: str, making: str, key_before: Optional[str] = None) -> list:
    """``count`` variants of each of ``items`` items (``make(item, variant)``: one entry), in that order: loaded from
    ``folder`` (``KEY-RofW.pt``, one share per rank) or made now and saved there.

    Made in slots: each entry is kept as it is made (``folder/KEY.parts/``), and ``deadline``
    (:class:`~XctDiffCore.training.common.Deadline`: --time-limit, SIGTERM, Ctrl-C) is asked between them; when it says
    stop, every rank stops and :class:`~XctDiffCore.training.common.StoppedBeforeTraining` says how many are made. The
    next call makes only the rest. Under torchrun each rank makes every world-size-th entry (its own part files and
    share: no two processes write one file), then all load all shares. ``label``, ``unit`` and ``making`` word the
    lines: ``LABEL: making MAKING (once; kept in FOLDER)``, ``... N of M UNITs made``; the banks of other keys in
    ``folder`` are named in a line then (``key_before``: the key that the version before gave these settings).
    Shares made by a job of another size are loaded as they are (:func:`_shares`). Once loaded, ``deadline.kept``
    says so, for the line of a Ctrl-C before the first step.
    """
    import shutil

    import torch.distributed as dist

    shares = _shares(folder, key, job.world_size)
    parts = folder / f"{key}.parts"
    tasks = [(i, v) for i in range(items) for v in range(count)]
    mine = tasks[job.rank::job.world_size]
    to_make, cause = len(shares) == job.world_size and not shares[job.rank].is_file(), None
    if to_make:
        if job.is_main:
            made, others = _made(parts, items, count), _others_line(folder, key, key_before)
            print(f"{label}: making {making}{f' ({made} of {len(tasks)} made before)' if made else ''} (once; kept in "
                  f"{folder})", file=sys.stderr, flush=True)
            if others:
                print(f"{label}: {others}", file=sys.stderr, flush=True)
        make_output_folder(parts)
        cause = _make_share(mine, make, parts, deadline, label, unit, job)
    if deadline is not None:  # every rank, its share made before or not: one rank stopped, all stop
        cause = deadline.agree(cause)
    if cause:
        made = _made(parts, items, count)
        raise StoppedBeforeTraining(
            f"{label}: stopped by {cause} with {made} of {len(tasks)} {unit}s made (kept in {parts}); the same "
            "command with --resume makes the rest, then trains", cause)
    if to_make:
        _save_reproducibly(shares[job.rank], {"entries": [load_checkpoint(_part_path(parts, *t))["entry"] for t in mine]})
    if job.enabled:
        dist.barrier()
    if job.is_main and parts.is_dir():  # every share is whole now
        shutil.rmtree(parts, ignore_errors=True)
    entries = [None] * len(tasks)
    for rank, path in enumerate(shares):
        entries[rank::len(shares)] = load_checkpoint(path)["entries"]
    if deadline is not None:
        deadline.kept = f"{label}: the {len(tasks)} {unit}s are kept in {folder}"
    return entries


def load_or_build_bank(run_dir, dataset, datalist, vqgan, geometry, xray_size: int, volume_size: int,
                       augment: dict, count: int, seed: int, job: Distributed, precision: str,
                       deadline=None, bone_latent_size: int = 0) -> VariantBank:
    """The run's bank for these settings: loaded from ``RUN/variant_bank`` or made now (and saved there), in slots
    (:func:`made_in_parts`). As every variant is seeded by (seed, patient, variant), a bank made in slots is the
    same, byte for byte, as one made at once.
    """
    from .encoder import ct_latent
    from .variants import bone_fractions

    loaded = {}

    def make(index: int, variant: int) -> list:
        if index not in loaded:  # the variants of one CT follow each other: read it once
            loaded.clear()
            loaded[index] = dataset[index]
        item = loaded[index]
        ct, drr = make_variant(item["image"][None], seed, index, variant, geometry, xray_size, augment)
        with torch.no_grad(), autocast(job.device, precision):
            latent = ct_latent(vqgan, ct.to(job.device)).float().cpu()
        bone = bone_fractions(ct, bone_latent_size)[0].half() if bone_latent_size else None
        return [item["patient"], variant, drr[0].half(), latent[0].clone(), bone]

    settings = bank_settings(run_dir, datalist, augment, count, seed, volume_size, xray_size, geometry,
                             bone_latent_size)
    try:
        key, key_before = keys_of(settings, [item["image"] for item in dataset.items])
    except OSError as exc:
        raise XctDiffError(f"the variant bank warps the datalist's training CTs, and one could not be read: "
                           f"{exc}") from None
    entries = made_in_parts(Path(run_dir) / BANK_DIR, key, len(dataset), count, make, job, deadline, "variant bank",
                            "variant", f"{count} variants of each of {len(dataset)} training CTs", key_before)
    drrs, latents, bones = {}, {}, {}
    for patient, _, drr, latent, *bone in sorted(entries, key=lambda e: (e[0], e[1])):  # banks made before: no bone
        drrs.setdefault(patient, []).append(drr)
        latents.setdefault(patient, []).append(latent)
        if bone and bone[0] is not None:
            bones.setdefault(patient, []).append(bone[0])
    stack = lambda values: {p: torch.stack(v) for p, v in values.items()}  # noqa: E731
    return VariantBank(stack(drrs), stack(latents), stack(bones) if bone_latent_size else None)


def _save_reproducibly(path: Path, payload: dict) -> None:
    """``torch.save`` to ``path`` atomically, the same bytes for the same payload: saved to a file name, torch names
    the archive inside after it, and the temporary file's name differs from one save to the next."""
    make_output_folder(path.parent)
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        torch.save(payload, stream)


def stage_variants(config, section, train_set, vqgan, job: Distributed, deadline):
    """A radiograph stage's :class:`~XctDiffCore.training.variants.PairVariants`, with the run's bank
    attached when ``section.augment.bank`` asks for one."""
    from .variants import PairVariants

    variants = PairVariants(section.augment, section.film, config.data.datalist, config.data.xray_size,
                            config.run.seed, job.rank, job.device)
    if getattr(section, "bone_weight", 0) > 0:  # the encoder's bone-weighted latent loss
        variants.bone_latent_size = config.latent_size()
    if section.augment.bank:
        variants.bank = load_or_build_bank(
            config.run.dir, train_set, config.data.datalist, vqgan, variants.geometry, config.data.xray_size,
            config.data.volume_size, variants.augment, section.augment.bank, config.run.seed, job,
            config.run.precision, deadline=deadline, bone_latent_size=variants.bone_latent_size)
    return variants
