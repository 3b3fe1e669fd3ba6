"""Run as a script in a child process: print one JSON line describing torch and its GPUs.

A child, so that Slicer's own process never imports torch nor opens a CUDA context (which would
hold GPU memory for the whole session). Depends on nothing but the standard library and torch.
"""
import json
import sys


def probe() -> dict:
    try:
        import torch
    except ImportError as exc:
        return {"torch": None, "cuda": False, "gpus": [], "reason": f"PyTorch is not installed ({exc})"}
    info = {"torch": torch.__version__, "cuda": False, "gpus": [], "reason": ""}
    if torch.version.cuda is None:
        info["reason"] = f"PyTorch {torch.__version__} is a CPU-only build"
    elif not torch.cuda.is_available():
        info["reason"] = f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) found no usable GPU or driver"
    else:
        info["cuda"] = True
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def describe_device(info: dict, device: str) -> str:
    """One line for the panel: which device ``device`` ("auto", "cpu", "cuda", "cuda:N") will use, or why no GPU."""
    if not info.get("torch"):
        return info.get("reason") or "PyTorch is not installed"
    gpus = info.get("gpus") or []
    if device == "cpu":
        return f"CPU (PyTorch {info['torch']})"
    index = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
    if info.get("cuda") and index < len(gpus):
        return f"GPU {index}: {gpus[index]} (PyTorch {info['torch']})"
    reason = info.get("reason") or f"GPU {index} does not exist ({len(gpus)} found)"
    if device == "auto":
        return f"CPU, slow: no GPU ({reason})"
    return f"No GPU: {reason}"


if __name__ == "__main__":
    print(json.dumps(probe()))
    sys.stdout.flush()
