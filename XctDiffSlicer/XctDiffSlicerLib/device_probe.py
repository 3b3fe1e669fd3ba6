"""Run as a script in a child process: print one JSON line describing torch and its GPUs.

A child, so that Slicer's own process never imports torch nor opens a CUDA context (which would
hold GPU memory for the whole session). Depends on nothing but the standard library and torch.
"""
import json
import sys
from typing import Optional


def probe() -> dict:
    """torch's version, the GPUs and, per GPU, the engine's own verdict (``XctDiffCore.device.cuda_problem``:
    driver, compute capability, memory), so that the panel never says "GPU" where the engine would use the CPU."""
    try:
        import torch
    except ImportError as exc:
        return {"torch": None, "cuda": False, "gpus": [], "reason": f"PyTorch is not installed ({exc})"}
    except Exception as exc:  # noqa: BLE001 - a broken install (a missing libcudnn): say so, not "failed"
        return {"torch": None, "cuda": False, "gpus": [], "reason": f"PyTorch cannot be imported ({_first_line(exc)})"}
    info = {"torch": torch.__version__, "cuda": False, "gpus": [], "problems": [], "reason": ""}
    try:
        _probe_cuda(torch, info)
    except Exception as exc:  # noqa: BLE001 - a driver that fails while asked: the CPU is still there
        info.update(cuda=False, reason=f"the GPU check failed ({_first_line(exc)})")
    return info


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _probe_cuda(torch, info: dict) -> None:
    try:
        from XctDiffCore.device import cuda_problem  # the child has the engine on its path
    except ImportError:  # an engine that cannot be imported will say why when it runs; judge by torch alone
        cuda_problem = None
    if torch.version.cuda is None:
        info["reason"] = f"PyTorch {torch.__version__} is a CPU-only build"
    elif not torch.cuda.is_available():
        info["reason"] = f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) found no usable GPU or driver"
    else:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["problems"] = [cuda_problem(i) if cuda_problem else None for i in range(len(info["gpus"]))]
        info["cuda"] = bool(info["gpus"]) and info["problems"][0] is None
        info["reason"] = "" if info["cuda"] else (info["problems"][0] if info["problems"] else "no GPU found")


def describe_device(info: dict, device: str) -> str:
    """One line for the panel: which device ``device`` ("auto", "cpu", "cuda", "cuda:N") will use, or why no GPU."""
    if not info.get("torch"):
        return info.get("reason") or "PyTorch is not installed"
    gpus = info.get("gpus") or []
    if device == "cpu":
        return f"CPU (PyTorch {info['torch']})"
    number = device.split(":", 1)[1].strip() if device.startswith("cuda:") else "0"
    if not number.isdigit():  # a parameter node from an edited scene file: the engine refuses it at the click
        return f"No GPU: unknown device {device!r}"
    index = int(number)
    problems = info.get("problems") or [None] * len(gpus)
    if index < len(gpus) and problems[index] is None:
        return f"GPU {index}: {gpus[index]} (PyTorch {info['torch']})"
    if index < len(gpus) and problems[index]:
        reason = problems[index]  # the engine's verdict on that GPU: too old, too small
    else:
        reason = info.get("reason") or f"GPU {index} does not exist ({len(gpus)} found)"
    if device == "auto":
        return f"CPU, slow: no GPU ({reason})"
    return f"No GPU: {reason}"


def read_probe_line(text: str) -> Optional[dict]:
    """The probe's JSON line as a dict, or None for any other stdout line (a library's chatter, a broken line)."""
    if not text.startswith("{"):
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


if __name__ == "__main__":
    print(json.dumps(probe()))
    sys.stdout.flush()
