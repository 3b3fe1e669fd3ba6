"""Which device a reconstruction runs on, and why not the GPU when it is not used.

``auto`` picks CUDA when PyTorch can use a GPU that is recent and large enough, else the CPU, and says
why in one warning when GPU hardware is present but cannot be used (the common case: PyTorch is a
CPU-only build on a machine with an NVIDIA driver). An explicit ``cuda`` / ``cuda:N`` that cannot be
honoured is an :class:`XctDiffError`, never a silent CPU run. On CUDA out-of-memory the pipeline
falls back to the CPU with a warning (:func:`run_with_cpu_fallback`), unless told not to.
"""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch

from .errors import XctDiffError, warn_caller

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
# A guess until the default model is measured on GPUs (``xctdiff benchmark pipeline``): below this the
# decoder's 128^3 activations do not fit and ``auto`` prefers the CPU.
MIN_GPU_MEMORY_GIB = 4.0

T = TypeVar("T")


class DeviceWarning(UserWarning):
    """The reconstruction runs somewhere else than the user may expect (CPU instead of a GPU)."""


def gpu_hardware_present() -> bool:
    """An NVIDIA driver is installed (Linux: /proc/driver/nvidia; elsewhere: nvidia-smi on the PATH).

    Cheap and without running anything: it only tells whether "no GPU" deserves an explanation.
    """
    return Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi") is not None


def _arch_supported(capability: tuple) -> bool:
    """PyTorch carries kernels for this compute capability (same major, not newer minor), or PTX it can JIT."""
    arch_list = torch.cuda.get_arch_list()
    if not arch_list:
        return True
    major, minor = capability
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        if not number.isdigit():
            continue
        m, n = int(number[:-1]), int(number[-1])
        if kind == "sm" and m == major and n <= minor:
            return True
        if kind == "compute" and (m, n) <= (major, minor):
            return True
    return False


def cuda_problem(index: int = 0, min_memory_gib: float = MIN_GPU_MEMORY_GIB) -> Optional[str]:
    """Why GPU ``index`` cannot run a reconstruction, in one sentence, or None when it can."""
    if torch.version.cuda is None:
        hint = " although an NVIDIA driver is installed" if gpu_hardware_present() else ""
        return (f"PyTorch {torch.__version__} is a CPU-only build{hint}; install a CUDA build of PyTorch "
                "(https://pytorch.org/get-started/locally/) to use the GPU")
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver"
    count = torch.cuda.device_count()
    if index >= count:
        return f"GPU {index} does not exist ({count} found)"
    props = torch.cuda.get_device_properties(index)
    capability = (props.major, props.minor)
    if not _arch_supported(capability):
        return (f"GPU {index} ({props.name}, compute capability {props.major}.{props.minor}) is too old for "
                f"this PyTorch build (supports {' '.join(torch.cuda.get_arch_list())})")
    memory_gib = props.total_memory / 2**30
    if memory_gib < min_memory_gib:
        return f"GPU {index} ({props.name}) has {memory_gib:.1f} GiB of memory, less than the {min_memory_gib:g} GiB needed"
    return None


def _parse(name: str) -> tuple:
    """'auto' / 'cpu' / 'cuda' / 'cuda:N' -> (kind, index)."""
    text = str(name).strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text, 0
    kind, _, index = text.partition(":")
    if kind == "cuda" and index.isdigit():
        return "cuda", int(index)
    raise XctDiffError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N")


def choose_device(name: str = "auto", min_memory_gib: float = MIN_GPU_MEMORY_GIB) -> torch.device:
    """The torch device for ``name`` ('auto', 'cpu', 'cuda', 'cuda:N').

    ``auto``: the first GPU when usable, else the CPU, with one :class:`DeviceWarning` when GPU
    hardware exists but cannot be used. ``cuda``: that GPU or an :class:`XctDiffError` saying why not
    (a GPU below ``min_memory_gib`` is used anyway, with a warning: the out-of-memory fallback remains).
    """
    kind, index = _parse(name)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "auto":
        problem = cuda_problem(0, min_memory_gib)
        if problem is None:
            return torch.device("cuda", 0)
        if gpu_hardware_present() or torch.cuda.is_available():
            warn_caller(f"running on the CPU (slow): {problem}", DeviceWarning)
        return torch.device("cpu")
    problem = cuda_problem(index, min_memory_gib=0.0)
    if problem is not None:
        raise XctDiffError(f"cannot use {name}: {problem}")
    small = cuda_problem(index, min_memory_gib)
    if small is not None:
        warn_caller(small, DeviceWarning)
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    """'cuda:0 (NVIDIA H100 80GB HBM3)' or 'cpu (2 threads)': for summaries and the Slicer panel."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    threads = torch.get_num_threads()
    return f"{device.type} ({threads} thread{'s' * (threads != 1)})"


# Whether ``precision="auto"`` computes in bf16 on a CPU with native bf16 instructions. Decided by
# `xctdiff evaluate --precision fp32|bf16` on the validation patients (README, "Performance"): with
# xctdiff-cpu 0.2.0, every path, bf16 - fp32 was at most -0.002 dB PSNR, -0.0013 SSIM and -0.0013 bone
# Dice (the limits: 0.1 / 0.005 / 0.01).
CPU_BF16_AUTO = True


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16; Linux ``/proc/cpuinfo``).

    Without them oneDNN emulates bf16 and it is slower than fp32, so ``auto`` never picks it there."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def autocast_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """The inference precision on ``device``: ``torch.bfloat16`` (autocast) or None (fp32).

    ``auto``: bf16 on a CUDA device that supports it natively, and on a CPU with native bf16 when
    :data:`CPU_BF16_AUTO` (the measured verdict); fp32 otherwise. ``bf16`` asks for it anywhere (an
    emulating CPU or GPU is slower, not wrong); ``fp32`` switches autocast off."""
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cpu" and not cpu_has_native_bf16():
            _warn_emulated_bf16()
        return torch.bfloat16
    if device.type == "cuda":
        with torch.cuda.device(device):  # emulated bf16 (before Ampere) is slower than fp32
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    if device.type == "cpu" and CPU_BF16_AUTO and cpu_has_native_bf16():
        return torch.bfloat16
    return None


@functools.lru_cache(maxsize=None)
def _warn_emulated_bf16() -> None:
    """Once per process: bf16 asked for on a CPU that emulates it (a reconstruction took minutes, not seconds)."""
    warn_caller("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated and many times slower than "
                "fp32 here; --precision auto chooses fp32 on it")


def is_cuda_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def run_with_cpu_fallback(fn: Callable[[torch.device], T], device: torch.device, fallback: bool = True) -> T:
    """``fn(device)``; on CUDA out-of-memory, free the cache, warn and return ``fn(cpu)`` (when ``fallback``).

    Without ``fallback`` the out-of-memory becomes an :class:`XctDiffError` that says what to try.
    """
    device = torch.device(device)
    try:
        return fn(device)
    except Exception as exc:  # noqa: BLE001 - only CUDA OOM is handled, everything else re-raised
        if device.type != "cuda" or not is_cuda_oom(exc):
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not fallback:
        raise XctDiffError(
            f"the GPU ({device}) ran out of memory; try fewer --samples, close other GPU programs, or use --device cpu"
        )
    warn_caller(f"the GPU ({device}) ran out of memory: continuing on the CPU (slow)", DeviceWarning)
    return fn(torch.device("cpu"))


def torchrun_rank() -> tuple:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def under_torchrun_agent() -> bool:
    """Whether this is one of several ranks started by torchrun, whose agent keeps a store (ranks started by hand
    have none)."""
    return torchrun_rank()[1] > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"


def agent_store(timeout_s: float):
    """``(store, prefix)``: the key-value store of torchrun's agent (it outlives the ranks) and a prefix for this job's
    keys (its run and restart), where ranks leave word for each other without a collective that a signal cannot stop;
    None unless :func:`under_torchrun_agent`."""
    if not under_torchrun_agent():
        return None
    import datetime

    from torch.distributed import TCPStore

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    return store, f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
