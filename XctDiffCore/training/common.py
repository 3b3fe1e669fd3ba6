"""What every training stage shares: processes, seeds, precision, checkpoints, logs, metrics, export.

Each stage (``autoencoder.py``, ``encoder.py``, ``diffusion.py``, ``style.py``) writes its loop out
in full, top to bottom; it calls these plain functions for what all of them share: the data
(:func:`stage_data`), the checkpoint's content and its mirror (:func:`training_state`,
:func:`restore_training_state`), the log (:class:`StageLog`) and the time limit (:class:`Deadline`).

* **Processes.** Launched by ``torchrun``, a stage runs as one DDP process per device: the
  presence of torchrun's environment (``RANK``, ``WORLD_SIZE``) switches it on, as in nanoGPT;
  NCCL on CUDA, gloo on CPU. Rank 0 alone logs, validates and writes files.
* **Precision.** bf16 (or fp16 with a gradient scaler) autocast on CUDA; plain fp32 on CPU.
* **Checkpoints.** One file per stage, ``<run>/<stage>/checkpoint.pt``, written atomically. It
  holds the models, optimisers, scaler, EMA, step, every rank's RNG state and the full config,
  so ``--resume`` after a kill continues the same run from the same step with the same data order.
  Its content is tensors and plain data only, so it loads with ``torch.load(weights_only=True)``.
* **Export.** :func:`~XctDiffCore.model_folder.export_stage` writes ``<stage>.safetensors`` + ``<stage>.json``
  (the stage's constructor arguments) for the pipeline; :func:`~XctDiffCore.model_folder.write_manifest`
  records a SHA-256 per file (the model folder owns its files: reading and writing).

Only torch, numpy and scikit-image are required; tqdm and tensorboard are used when installed.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..atomic import atomic_path, make_output_folder, output_lock
from ..config import config_to_dict
from ..errors import XctDiffError, first_line
from ..model_folder import EXPORT_DTYPES, export_stage, file_sha256, write_manifest  # noqa: F401 (the stages' exports)
from ..model_folder import latents_record, non_finite_tensor, other_latents  # noqa: F401 (the stages' record)
from ..progress import is_terminal, left_at_pace
from .data import PairDataset, train_loader

CHECKPOINT_NAME = "checkpoint.pt"
# The step of each stage checkpoint this process wrote, resumed from or built on (resolved path -> step): what a
# Ctrl-C or the end of ``train`` tells the user is kept, without reading a large checkpoint again.
_checkpoint_steps: dict = {}


# --------------------------------------------------------------------------------------- processes


@dataclass
class Distributed:
    """This process's place in the job (``world_size == 1`` without torchrun)."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def setup_distributed() -> Distributed:
    """Join the torchrun job when its environment is present; otherwise one process on the best device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device = torch.device("cpu")
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        return Distributed(rank, local_rank, world_size, device)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return Distributed(0, 0, 1, device)


def cleanup_distributed(job: Distributed, finished: bool = True) -> None:
    """Leave the torchrun job. After a finished stage the ranks first wait for each other (a barrier), so
    that none tears down its connections while a slower one may still be reading the last collective's
    data (a rank of the two-process CPU test died of SIGABRT once, on a loaded machine, at that point);
    after an error no barrier: the other ranks may never come."""
    if job.enabled:
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, job: Distributed) -> nn.Module:
    """The model itself in one process, a DDP wrapper (gradient all-reduce) under torchrun."""
    if not job.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[job.device.index] if job.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


# ------------------------------------------------------------------------------ seeds and precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA; a no-op on CPU (where training is fp32) or for ``fp32``."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only (bf16 has fp32's range); a disabled scaler is a pass-through."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and precision == "fp16")


def rng_state(generators: Optional[dict] = None) -> dict:
    """Every random stream of this process as tensors and plain data (safe for ``weights_only`` loads)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def set_rng_state(state: dict, generators: Optional[dict] = None) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        g.set_state(state["generators"][k])


def gather_rng_states(job: Distributed, generators: Optional[dict] = None) -> list:
    """Every rank's RNG state (rank order) so a resumed job gives each rank its own streams back."""
    state = rng_state(generators)
    if not job.enabled:
        return [state]
    states = [None] * job.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(states: list, job: Distributed, generators: Optional[dict] = None) -> None:
    """Restore this rank's streams; a job resumed with another world size keeps its fresh seeds."""
    if len(states) == job.world_size:
        set_rng_state(states[job.rank], generators)


# ------------------------------------------------------------------------------------ optimisation


def make_optimizer(parameters: Iterable, optim) -> torch.optim.Optimizer:
    """Adam with decoupled weight decay (plain Adam when ``weight_decay`` is 0, as in the paper)."""
    return torch.optim.AdamW(parameters, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


class EMA(nn.Module):
    """Exponential moving average of a model's weights: the diffusion samples with it, the encoder can ship it.

    ``ema.module`` is the averaged copy (call it like the model); ``state_dict()`` holds its weights as
    ``module.*`` plus ``num_updates``: flat tensors, so it saves as safetensors. The decay warms up as
    ``min(decay, (1 + n) / (10 + n))`` (latent-diffusion's LitEma) so that short runs are not stuck
    near the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError("decay must be in [0, 1]")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (call after each optimiser step)."""
        n = int(self.num_updates)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        ema_params = [p for p in self.module.parameters() if p.is_floating_point()]
        new_params = [p.detach() for p in model.parameters() if p.is_floating_point()]
        torch._foreach_lerp_(ema_params, new_params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)  # running statistics, counters: copied, not averaged
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def ema_weights(state: dict) -> dict:
    """The averaged network's own weights from an :class:`EMA`'s ``state_dict()`` (its ``module.*`` entries)."""
    return {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}


def shipped_average(models: dict, name: str) -> dict:
    """The weights a checkpoint's ``models`` ship for network ``name``: their average when the run kept
    one (an ``"ema"`` entry), else the weights themselves."""
    return ema_weights(models["ema"]) if "ema" in models else models[name]


def optional_ema(model: nn.Module, decay: float, models: dict, checkpoint: Optional[dict]) -> Optional[EMA]:
    """An :class:`EMA` of ``model`` registered as ``models["ema"]`` when ``decay > 0`` (else None), restored from
    ``checkpoint`` when it holds one; it starts from the current weights (also when a run turns it on)."""
    if decay <= 0:
        return None
    ema = models["ema"] = EMA(model, decay)
    if checkpoint and "ema" in checkpoint["models"]:
        ema.load_state_dict(checkpoint["models"]["ema"])
    return ema


def learning_rate(step: int, optim) -> float:
    """Linear warm-up over ``warmup_steps``, then constant: independent of ``max_steps``."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    return optim.lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def backward_step(loss: torch.Tensor, parameters: list, optimizer, scaler, grad_clip: float, average_over: Optional[Distributed] = None) -> None:
    """Backward, (average gradients over the job), unscale, clip when ``grad_clip > 0``, step, zero.

    ``average_over`` all-reduces the gradients by hand, for modules not wrapped in DDP (the GAN
    critics, whose parameters sit idle during the generator step, which DDP cannot express).
    """
    scaler.scale(loss).backward()
    if average_over is not None and average_over.enabled:
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= average_over.world_size
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def broadcast_parameters(module: nn.Module, job: Distributed) -> None:
    """Rank 0's weights and buffers on every rank (what DDP does at wrap time, for unwrapped modules)."""
    if job.enabled:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def freeze(model: nn.Module) -> nn.Module:
    """An earlier stage used as a fixed function: eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------- checkpoints


def stage_dir(run_dir, stage: str) -> Path:
    return Path(run_dir) / stage


def checkpoint_path(run_dir, stage: str) -> Path:
    return stage_dir(run_dir, stage) / CHECKPOINT_NAME


def save_checkpoint(path, payload: dict) -> Path:
    """``torch.save`` through :func:`atomic_path`: a kill mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    make_output_folder(path.parent)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path, required: tuple = ()) -> dict:
    """A checkpoint of ``xctdiff train`` (holding the keys ``required``), or one line saying that the file is
    none (empty, truncated, foreign)."""
    path = Path(path)
    if not path.is_file():
        raise XctDiffError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's loader raises many types on a broken file
        raise XctDiffError(f"cannot read the checkpoint {path} (empty, truncated or not from `xctdiff train`): "
                           f"{first_line(exc)}") from None
    if not isinstance(checkpoint, dict) or not set(required) <= set(checkpoint):
        raise XctDiffError(f"{path} is not a checkpoint of `xctdiff train` (no {' or '.join(required) or 'content'} in it)")
    return checkpoint


def checked_stage(checkpoint: dict, path, stage: str) -> dict:
    """The checkpoint, when it is one of ``stage`` (or says no stage, as the oldest did): another stage's file,
    copied or renamed, is one line, not a ``KeyError`` deep inside the loop."""
    if checkpoint.get("stage", stage) != stage:
        raise XctDiffError(f"{path} is a checkpoint of the {checkpoint['stage']} stage, not of the {stage} stage")
    return checkpoint


def prepare_stage_dir(run_dir, stage: str, resume: bool, datalist=None) -> Optional[dict]:
    """Make ``<run>/<stage>``; return the checkpoint to resume, refusing to overwrite one silently (and saying when it
    trained on another ``datalist``)."""
    path = checkpoint_path(run_dir, stage)
    if path.exists() and not path.is_file():
        raise XctDiffError(f"{path} is not a file: move it away")
    if resume:
        checkpoint = None
        if path.is_file():
            checkpoint = checked_stage(load_checkpoint(path, required=("stage", "step", "config", "models")), path, stage)
            _checkpoint_steps[path.resolve()] = checkpoint["step"]
            if datalist is not None:
                warn_other_data(checkpoint, datalist, f"the {stage} checkpoint", f"--resume goes on from step "
                                f"{checkpoint['step']} on {datalist}")
        elif _rank_zero():  # a misspelt --out would otherwise start hours of training again without a word
            print(f"{stage}: no checkpoint to resume in {path.parent}: starting at step 0", file=sys.stderr, flush=True)
        if checkpoint is not None and "imported_from" in checkpoint:
            raise XctDiffError(
                f"{path} holds only the weights copied from {checkpoint['imported_from']} by --init and cannot be "
                f"resumed: train the {stage} stage with --init in a new run folder"
            )
        return checkpoint
    if path.exists():
        raise XctDiffError(f"{path} already exists: pass --resume to continue it, or choose another --out")
    make_output_folder(path.parent)
    return None


def stage_lock(run_dir, stage: str):
    """Hold ``<run>/<stage>/.lock`` while the stage trains (:func:`~XctDiffCore.atomic.output_lock`): a second
    ``xctdiff train`` of the same stage and folder (a job submitted twice, a ``--resume`` while the first still
    runs) is refused in one line, where the two wrote one checkpoint and one log in turns. Makes the stage folder."""
    return output_lock(stage_dir(run_dir, stage), "xctdiff train", busy="trained", lock_of="the run's lock")


def trained_stage_checkpoint(run_dir, stage: str, needed_by: str) -> dict:
    """The checkpoint of an earlier stage that a later one builds on, or a clear instruction."""
    path = checkpoint_path(run_dir, stage)
    if not path.is_file():
        raise XctDiffError(
            f"the {needed_by} stage needs the trained {stage} stage, but {path} does not exist "
            f"(run `xctdiff train {stage}` with the same --out first)"
        )
    checkpoint = checked_stage(load_checkpoint(path, required=("config", "models")), path, stage)
    if isinstance(checkpoint.get("step"), int):
        _checkpoint_steps[path.resolve()] = checkpoint["step"]
    return checkpoint


def warn_other_data(checkpoint: dict, datalist, whose: str, what_now: str) -> None:
    """Warn (once, from rank 0) when ``checkpoint`` trained on another datalist than ``datalist`` (a new split or
    data set): its patients and this one's validation patients may overlap, unseen by the scores. Checkpoints
    record their datalist's SHA-256 (``datalist_sha256``); older ones are not judged."""
    recorded = checkpoint.get("datalist_sha256")
    if not recorded or not _rank_zero() or recorded == _datalist_sha256(datalist):
        return
    theirs = checkpoint.get("config", {}).get("data", {}).get("datalist") or "another datalist"
    same_name = Path(str(theirs)).resolve() == Path(datalist).resolve()
    warnings.warn(f"{whose} trained on {theirs}{' as it was then (the file has changed since)' if same_name else ''}, "
                  f"not on {datalist}: {what_now}; the validation scores and the manifest's patients hold only for the "
                  "last datalist (a new data set or split belongs in a new run folder, --out)", stacklevel=3)


def _rank_zero() -> bool:
    """Whether this process says things (the only one without torchrun, rank 0 under it)."""
    from ..device import torchrun_rank

    return torchrun_rank()[0] == 0


def _datalist_sha256(datalist) -> Optional[str]:
    try:
        return file_sha256(datalist)
    except OSError:
        return None


def latents_changed(stages: str, recorded: Optional[dict], current: dict) -> Optional[str]:
    """None when a stage learnt the ``current`` autoencoder's latents (or recorded none: made before the record);
    else the words saying that it learnt another one's (``stages``: ``"the encoder stage"``, ...), for a run (a
    model folder's own words: :func:`~XctDiffCore.model_folder.check_same_latents`). Both :func:`latents_record`
    of a checkpoint (float32)."""
    if not other_latents(recorded, current):
        return None
    then, now, folder = recorded.get("autoencoder_step"), current.get("autoencoder_step"), recorded.get("folder")
    learnt = f" of {folder}" if folder else "" if then is None else f" at step {then}"
    return (f"{stages} learnt the latents of the autoencoder{learnt}, but the run's autoencoder"
            f"{'' if now is None else f' (step {now})'} makes other ones"
            f"{'' if folder else ' (trained further or replaced since)'}")


# ---------------------------------------------------------------------------------- logs, progress


class RunLogger:
    """CSV (always) and TensorBoard (when installed) scalars of one stage; a no-op on ranks > 0.

    The CSV has one row per step and one column per quantity; it is rewritten atomically at each
    call, and a resumed run first drops the rows after its checkpoint's step.
    """

    def __init__(self, directory, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(directory) / "log.csv"
        self.rows: dict[int, dict] = {}
        self.writer = None
        if not enabled:
            return
        if self.path.is_file() and start_step > 0:
            try:
                with open(self.path, newline="", encoding="utf-8") as f:
                    for row in csv.DictReader(f):
                        step = int(row.pop("step"))
                        if step <= start_step:
                            self.rows[step] = {k: float(v) for k, v in row.items() if v != ""}
            except (ValueError, KeyError, TypeError, csv.Error) as exc:  # UnicodeDecodeError is a ValueError
                raise XctDiffError(f"{self.path} is not a training log ({type(exc).__name__}: "
                                   f"{first_line(exc, 80)}): move it away to resume") from None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional (the `train` extra)
            return
        self.writer = SummaryWriter(str(Path(directory) / "tensorboard"), purge_step=start_step or None)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        self.rows.setdefault(step, {}).update(metrics)
        columns = sorted({k for row in self.rows.values() for k in row})
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=["step", *columns])
                writer.writeheader()
                for s in sorted(self.rows):
                    writer.writerow({"step": s, **{k: f"{v:.6g}" for k, v in self.rows[s].items()}})
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Meter:
    """Running means of scalar tensors between two log lines (one device sync per log, not per step).

    ``means()`` also gives ``seconds_per_step``: the wall time since the previous log line over the
    steps in between (after the sync, so queued GPU work counts; a validation or checkpoint written
    in between counts too).
    """

    def __init__(self):
        self.sums: dict = {}
        self.count = 0
        self.start = time.perf_counter()

    def add(self, values: dict) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.count += 1

    def means(self) -> dict:
        means = {k: float(v) / max(self.count, 1) for k, v in self.sums.items()}
        now = time.perf_counter()
        means["seconds_per_step"] = (now - self.start) / max(self.count, 1)
        self.sums, self.count, self.start = {}, 0, now
        return means


class Deadline:
    """``--time-limit``, SIGTERM or Ctrl-C: end a stage cleanly, checkpoint first, once its wall-clock
    allowance is spent or the process is asked to stop.

    For jobs with a fixed slot (a cluster's wall time, a 10-minute call to a shared GPU; a scheduler
    sends SIGTERM before it kills): the same command with ``--resume`` continues where it stopped.
    Rank 0's clock decides for every rank, and a signal received by any rank stops all of them, so
    all stop after the same step. From construction to :meth:`report` (the end of the stage) SIGTERM
    only sets a flag (in the main thread; elsewhere it keeps its handler). Ctrl-C does the same from
    the first step's end on (before it there is nothing new to keep): the step under way finishes and
    is checkpointed, then the command exits as interrupted; a second Ctrl-C stops at once, as before.
    Under torchrun every Ctrl-C only sets the flag: the agent passes the terminal's Ctrl-C on to its
    workers a moment after they got it themselves, and kills them itself if they take over 30 s.
    """

    def __init__(self, minutes: Optional[float], job: Distributed, stage: str = "the stage"):
        if minutes is not None and not minutes > 0:  # NaN too: it would never end the stage
            raise XctDiffError(f"--time-limit must be a positive number of minutes, got {minutes}")
        self.end = None if minutes is None else time.monotonic() + 60.0 * minutes
        self.job, self.stage = job, stage
        self.reached, self.terminated, self.interrupted = False, False, False
        self.signalled, self.ctrl_c = False, False  # set by the handlers; the others agreed on by every rank
        self.kept = None  # what the work before the first step keeps on disk (made_in_parts): a Ctrl-C's line says it
        self._installed = threading.current_thread() is threading.main_thread()
        self._previous = {}
        if self._installed:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True

    def _on_ctrl_c(self, signum, frame) -> None:
        if self.ctrl_c and not self._under_torchrun():
            raise KeyboardInterrupt  # the second one: at once, the checkpoint of the step before kept
        first, self.ctrl_c = not self.ctrl_c, True
        if first and self.job.is_main:
            again = ("torchrun ends the job if it takes over 30 s" if self._under_torchrun()
                     else "Ctrl-C again stops at once, without it")
            _write_line(f"Ctrl-C: {self.stage} stops after this step, with a checkpoint ({again})")

    @staticmethod
    def _under_torchrun() -> bool:
        return "TORCHELASTIC_RUN_ID" in os.environ

    def passed(self) -> bool:
        """Whether the time is up or SIGTERM or Ctrl-C came (the same answer on every rank); call once per step."""
        if self._installed and signal.SIGINT not in self._previous:  # the first step is done: Ctrl-C checkpoints
            current = signal.getsignal(signal.SIGINT)  # not where it is ignored (a job started in the background)
            self._previous[signal.SIGINT] = current
            if current is signal.default_int_handler:
                signal.signal(signal.SIGINT, self._on_ctrl_c)
        self.reached = self.end is not None and self.job.is_main and time.monotonic() >= self.end
        self.terminated, self.interrupted = self.signalled, self.ctrl_c
        if self.job.enabled:  # one tiny all-reduce (and host sync) per step, only under torchrun
            flags = torch.tensor([float(self.reached), float(self.terminated), float(self.interrupted)],
                                 device=self.job.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            self.reached, self.terminated, self.interrupted = (bool(f) for f in flags.tolist())
        return self.stopped_early

    @property
    def stopped_early(self) -> bool:
        return self.reached or self.terminated or self.interrupted

    def due(self) -> Optional[str]:
        """For the work before the first step (the variant bank), asked between items: ``"--time-limit"``,
        ``"SIGTERM"`` or ``"Ctrl-C"`` when this process should stop, else None. No collective (the ranks' shares
        differ in length): the ranks agree afterwards with :meth:`agree`."""
        if self.ctrl_c:
            return "Ctrl-C"
        if self.signalled:
            return "SIGTERM"
        if self.end is not None and time.monotonic() >= self.end:
            return "--time-limit"
        return None

    def agree(self, cause: Optional[str]) -> Optional[str]:
        """The cause of stopping the whole job (collective under torchrun): any rank's stop stops every rank, and
        every rank gets the same answer (the first of Ctrl-C, SIGTERM, --time-limit that any rank saw)."""
        causes = ("Ctrl-C", "SIGTERM", "--time-limit")
        if not self.job.enabled:
            return cause
        flags = torch.tensor([float(cause == c) for c in causes], device=self.job.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return next((c for c, f in zip(causes, flags.tolist()) if f), None)

    def restore(self) -> None:
        """SIGTERM and SIGINT get their handlers back (the stage is over, or failed)."""
        if self._installed:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            self._installed = False

    def report(self, stage: str, step: int, max_steps: int, checkpoint) -> None:
        """Say why the stage stopped early and where its checkpoint is (rank 0; Ctrl-C's line is the command's last,
        see ``train``)."""
        self.restore()
        if (self.reached or self.terminated) and not self.interrupted and self.job.is_main:
            cause = "SIGTERM" if self.terminated else "--time-limit"
            print(f"{stage}: stopped by {cause} at step {step} of {max_steps}; checkpoint {checkpoint}; "
                  "the same command with --resume continues from it", file=sys.stderr, flush=True)


class StoppedBeforeTraining(Exception):
    """A stage stopped by --time-limit, SIGTERM or Ctrl-C before its first step (in the variant bank), its work so far
    kept for ``--resume``; ``cause``: which of the three, ``str()``: the line that says so."""

    def __init__(self, line: str, cause: str):
        super().__init__(line)
        self.cause = cause


def _write_line(line: str) -> None:
    """One line on stderr, below a progress bar if one is drawn (tqdm's own lock keeps the bar whole)."""
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    except ImportError:
        print(line, file=sys.stderr, flush=True)


def is_due(step: int, every: int, max_steps: int) -> bool:
    """Log/validate/checkpoint after ``step`` optimiser steps: every ``every`` steps and at the end."""
    return step % every == 0 or step == max_steps


class Progress:
    """A tqdm bar on stderr when it is a terminal (rank 0 only) and one text line per log step, saying the step of
    how many and the time left (``encoder step 200 of 2000, 1 h 05 min left: ...``). In a log file (a cluster job's,
    ``nohup``) the lines alone: a bar's carriage returns made it one long line of redrawn bars.

    A stage that fails leaves its bar open; :meth:`close_open` (called by ``train``) ends it, so that the
    error line starts a line of its own instead of trailing the bar."""

    _open: set = set()

    def __init__(self, stage: str, total: int, initial: int, enabled: bool):
        self.enabled, self.stage, self.bar = enabled, stage, None
        self.total, self.initial, self.started = total, initial, time.monotonic()
        if not enabled or not is_terminal(sys.stderr):
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=initial, desc=stage, file=sys.stderr, dynamic_ncols=True)
        Progress._open.add(self)

    @classmethod
    def close_open(cls) -> None:
        for progress in list(cls._open):
            progress.close()

    def update(self, metrics: Optional[dict] = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if metrics:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        line = f"{self.stage} step {step} of {self.total}{self._left(step)}: " + " ".join(
            f"{k}={v:.4g}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def _left(self, step: int) -> str:
        """``, 12 min 05 s left`` at this run's pace so far (validations included); nothing at the end."""
        return left_at_pace(self.started, step - self.initial, self.total - self.initial)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        Progress._open.discard(self)


class StageLog:
    """What a stage reports while it runs (rank 0 only): the progress bar, the running means of its
    losses between two log lines, and the CSV/TensorBoard log. Plain calls from the stage's loop."""

    def __init__(self, config, stage: str, optim, job: Distributed, step: int):
        self.config, self.stage, self.optim = config, stage, optim
        self.logger = RunLogger(stage_dir(config.run.dir, stage), job.is_main, step)
        if step >= optim.max_steps and job.is_main:  # a resumed run with nothing left: say so, not just exit 0
            print(f"{stage}: the checkpoint is at step {step}, max_steps is {optim.max_steps}: nothing to train "
                  "(raise --max-steps to continue)", file=sys.stderr, flush=True)
        self.progress = Progress(stage, optim.max_steps, step, job.is_main)
        self.meter = Meter()

    def add(self, losses: dict) -> None:
        """One optimiser step done: its loss tensors join the running means; the bar moves."""
        self.meter.add(losses)
        self.progress.update()

    def means(self) -> dict:
        """``train/<loss>`` means (and ``train/seconds_per_step``) since the previous log line."""
        return {f"train/{k}": v for k, v in self.meter.means().items()}

    def write(self, step: int, metrics: dict, shown=None) -> None:
        """Log ``metrics`` at ``step`` and print them (``shown``: only these names on the progress line).
        A non-finite training loss ends the stage here (its last checkpoint kept), not hours later."""
        self.logger.log(step, metrics)
        diverged = sorted(k for k, v in metrics.items() if k.startswith("train/") and not np.isfinite(v))
        if diverged:
            raise XctDiffError(f"{self.stage}: training diverged at step {step} ({diverged[0]} = "
                               f"{metrics[diverged[0]]}); the last checkpoint is kept: lower the learning rate "
                               "or check the data")
        self.progress.write(step, metrics if shown is None else {k: metrics[k] for k in shown})

    def close(self, deadline: "Deadline", step: int) -> Path:
        """Close the bar and the log, say whether --time-limit or SIGTERM stopped the stage; the checkpoint's path."""
        self.progress.close()
        path = checkpoint_path(self.config.run.dir, self.stage)
        deadline.report(self.stage, step, self.optim.max_steps, path)
        self.logger.close()
        return path


# ------------------------------------------------------------------------ a stage's start and state


def stage_data(config, job: Distributed):
    """The training pairs of the datalist and, on rank 0, the first ``data.val_cases`` validation items."""
    sizes = (config.data.volume_size, config.data.xray_size)
    train_set = PairDataset(config.data.datalist, "training", *sizes)
    if not job.is_main:
        return train_set, []
    val_set = PairDataset(config.data.datalist, "validation", *sizes)
    return train_set, [val_set[i] for i in range(min(config.data.val_cases, len(val_set)))]


def training_batches(dataset, config, optim, step: int, job: Distributed):
    """This rank's batches for steps ``step, step + 1, ...`` (the same order after a resume)."""
    return iter(train_loader(dataset, optim.batch_size, config.run.seed, step, job.rank, job.world_size,
                             config.data.num_workers))


def training_state(job: Distributed, models: dict, optimizers: dict, scalers: dict, generators: Optional[dict] = None) -> dict:
    """A checkpoint's content besides stage, step and config: every network, optimiser and scaler by
    name and every rank's random streams. Collective under torchrun: every rank calls it."""
    return {"models": {name: m.state_dict() for name, m in models.items()},
            "optimizers": {name: o.state_dict() for name, o in optimizers.items()},
            "scalers": {name: s.state_dict() for name, s in scalers.items()},
            "rng": gather_rng_states(job, generators)}


def restore_training_state(checkpoint: dict, job: Distributed, models: dict, optimizers: dict, scalers: dict,
                           generators: Optional[dict] = None, *, config, said: tuple = ()) -> int:
    """The mirror of :func:`training_state`: each object gets back its state by the same name; returns the step.
    ``config`` is the one the run goes on with: its optimiser settings replace the checkpoint's (Adam's state
    brings back the betas and weight decay it began with) and what differs from the run's is said
    (:func:`say_config_changes`; ``said``: keys the stage has a line of its own for)."""
    try:
        for kind, objects in (("models", models), ("optimizers", optimizers), ("scalers", scalers)):
            for name, thing in objects.items():
                thing.load_state_dict(checkpoint[kind][name])
        restore_rng_states(checkpoint["rng"], job, generators)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:  # another config's widths, an older layout
        raise XctDiffError(f"the checkpoint does not fit this config (trained with another one? resume with the config "
                           f"it was trained with): {first_line(exc)}") from None
    optim = getattr(config, checkpoint["stage"]).optim
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group.update(betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    say_config_changes(checkpoint, config, said)
    return checkpoint["step"]


# What a resumed run may change without a word: its length, its logging, where it is (the resume is of that folder),
# the datalist's path (other contents: warn_other_data) and --init (the weights come from the checkpoint).
EXPECTED_ON_RESUME = ("optim.max_steps", "optim.log_every", "optim.val_every", "optim.checkpoint_every",
                      "data.num_workers", "run.dir", "data.datalist", "run.init")


def say_config_changes(checkpoint: dict, config, said: tuple = ()) -> None:
    """One line (rank 0) naming each key of the run's settings and the stage's section (loss weights, learning rate,
    augmentation, ...) whose value differs from the checkpoint's, old -> new: the run goes on with the new ones,
    which the next checkpoint records. Keys a checkpoint predates are not judged; a width that no longer fits
    was refused by :func:`restore_training_state` already, and the keys ``said`` have their own line."""
    stage = checkpoint["stage"]

    def flat(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    def shown(value):
        return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)

    sections = ("run", "data", stage)
    before = dict(flat({key: checkpoint["config"].get(key, {}) for key in sections}))
    now = dict(flat({key: value for key, value in config_to_dict(config).items() if key in sections}))
    changed = [f"{key} {shown(before[key])} -> {shown(value)}" for key, value in sorted(now.items())
               if key in before and before[key] != value and not key.endswith(EXPECTED_ON_RESUME) and key not in said]
    if changed and _rank_zero():
        warnings.warn(f"{stage}: this config differs from the run's in {len(changed)} key{'s' * (len(changed) > 1)}: "
                      f"{', '.join(changed)}; the run goes on from step {checkpoint['step']} with the new values",
                      stacklevel=3)


def save_stage_checkpoint(config, stage: str, step: int, job: Distributed, state: dict) -> None:
    """``<run>/<stage>/checkpoint.pt`` with the stage, step and full config beside ``state`` (rank 0 writes)."""
    broken = non_finite_tensor(state["models"])
    if broken:  # NaN weights would replace the last good checkpoint and export as a model
        raise XctDiffError(f"{stage}: training diverged before step {step} (NaN or infinite weights in {broken}); "
                           "the last checkpoint is kept: lower the learning rate or check the data")
    if job.is_main:
        path = save_checkpoint(checkpoint_path(config.run.dir, stage),
                               {"stage": stage, "step": step, "config": config_to_dict(config),
                                "datalist_sha256": _datalist_sha256(config.data.datalist),
                                "datalist_path": str(Path(config.data.datalist).resolve()), **state})
        _checkpoint_steps[path.resolve()] = step


def checkpoint_step(run_dir, stage: str) -> Optional[int]:
    """The step of the stage's checkpoint as this process last wrote or resumed it (None: not known here)."""
    return _checkpoint_steps.get(checkpoint_path(run_dir, stage).resolve())


# ----------------------------------------------------------------------------------------- metrics


def volume_metrics(prediction: torch.Tensor, target: torch.Tensor) -> dict:
    """Mean PSNR (dB), SSIM, bone and lung Dice (also in the body) of ``(B, 1, D, H, W)`` volumes in [-1, 1].

    PSNR/SSIM on the fixed HU window of :mod:`XctDiffCore.layout` ([-1024, 2048] HU) as [0, 1], the same
    for every case, so numbers compare across cases and runs (SSIM: scikit-image's 3D SSIM, CPU); the
    Dice scores with :mod:`XctDiffCore.metrics`' thresholds, so a training log shows the bone and lung
    that ``xctdiff evaluate`` will score (checkpoints of a run with critics can differ a lot on bone).
    """
    from skimage.metrics import structural_similarity

    from ..layout import model_layout_to_ct, unit_to_hu
    from ..metrics import bone_dice, lung_dice, lung_dice_in_body

    pred = ((prediction.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    true = ((target.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    scores = {"psnr": [], "ssim": [], "bone_dice": [], "lung_dice": [], "lung_dice_body": []}
    for p, t in zip(pred[:, 0], true[:, 0]):
        mse = float(np.mean((p - t) ** 2))
        scores["psnr"].append(10 * np.log10(1.0 / max(mse, 1e-10)))
        scores["ssim"].append(structural_similarity(t, p, data_range=1.0))
        p_hu, t_hu = (model_layout_to_ct(unit_to_hu(v * 2.0 - 1.0)) for v in (p, t))  # the body's axial slices first
        scores["bone_dice"].append(bone_dice(p_hu, t_hu))
        scores["lung_dice"].append(lung_dice(p_hu, t_hu))
        scores["lung_dice_body"].append(lung_dice_in_body(p_hu, t_hu))
    return {name: float(np.mean(values)) for name, values in scores.items()}


def mean_scores(scores: list) -> dict:
    """``val/psnr``, ``val/ssim``, ``val/bone_dice``, ``val/lung_dice``, ``val/lung_dice_body``: means of
    :func:`volume_metrics` over the cases."""
    return {f"val/{name}": sum(s[name] for s in scores) / len(scores) for name in scores[0]}


# ------------------------------------------------------------------------------------------ export


