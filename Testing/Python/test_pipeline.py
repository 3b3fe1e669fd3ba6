"""XctDiffPipeline on a tiny model with random weights (config "tiny", 32^3 grid): the contracts of the
module docstring of XctDiffCore/pipeline.py. The reconstructions are noise; their grid, seeds, samples,
progress, cancel, style rule and errors are not."""
from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import SAMPLE_CT, SAMPLE_RADIOGRAPH
from test_bad_input import CASES
from torch import nn

from XctDiffCore.diffusion import Cancelled, NoiseSchedule
from XctDiffCore.errors import XctDiffError
from XctDiffCore.io import Radiograph, read_radiograph
from XctDiffCore.model_folder import ModelInfo, create_random_model
from XctDiffCore.options import ReconstructOptions
from XctDiffCore.pipeline import STAGE_END, WRITE_START, StyleWarning, XctDiffPipeline, reconstruct_file
from XctDiffCore.volume import Volume

STEPS = 3
GRID = 128
SPACING = 2.5
ORIGIN = -(GRID - 1) / 2 * SPACING  # -158.75 mm: the first voxel's centre, the cube centred on 0
RADIOGRAPH_CASES = [name for name, (_, kind, _) in CASES.items() if kind == "radiograph"]


def listing(folder):
    """Everything under a folder, hidden temporary files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_random_model(tmp_path_factory.mktemp("model") / "tiny", "tiny")


@pytest.fixture(scope="module")
def pipe(model_dir):
    return XctDiffPipeline.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def film():
    return read_radiograph(SAMPLE_RADIOGRAPH)  # a real radiograph (no DRR tag)


@pytest.fixture(scope="module")
def two_samples(pipe, film):
    return pipe.reconstruct(film, steps=STEPS, samples=2, seed=0, device="cpu")


class UNetCalls:
    """Counts the diffusion UNet's forward passes while in a ``with`` block."""

    def __init__(self, pipe):
        self.unet, self.count = pipe.unet, 0

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------------------ output grid


def assert_output_grid(volume):
    assert volume.array.shape == (GRID, GRID, GRID)
    np.testing.assert_allclose(volume.spacing, (SPACING,) * 3)
    np.testing.assert_allclose(volume.origin, (ORIGIN,) * 3)
    np.testing.assert_array_equal(volume.direction, np.eye(3))
    centre = np.asarray(volume.origin) + (np.asarray(volume.array.shape[::-1]) - 1) / 2 * np.asarray(volume.spacing)
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)


def test_ct_is_on_the_paper_grid_although_the_model_is_32(pipe, two_samples):
    assert pipe.info.volume_size == 32 and pipe.info.xray_size == 32  # a coarse model ...
    result = two_samples
    assert_output_grid(result.ct)  # ... still gives 128^3 at 2.5 mm, centred, LPS
    assert result.ct.array.dtype == np.int16
    assert -1024 <= result.ct.array.min() < result.ct.array.max() <= 2048  # the model's HU window
    assert_output_grid(result.uncertainty)
    assert result.uncertainty.array.dtype == np.float32
    assert result.input_image.shape == result.drr.shape == (32, 32)
    for image in (result.input_image, result.drr):
        assert image.dtype == np.float32 and 0.0 <= image.min() and image.max() <= 1.0
    assert 0.0 <= result.consistency <= 1.0
    assert (result.seed, result.samples, result.steps, result.method) == (0, 2, STEPS, "diffusion")
    assert result.device.startswith("cpu")


def test_timings_cover_every_stage(two_samples):
    timings = two_samples.timings
    stages = ("preprocessing", "style", "encoder", "sampling", "decoding", "consistency")
    assert set(stages) | {"read", "total", "sampling_per_step"} == set(timings)
    assert all(timings[k] >= 0 for k in timings)
    assert timings["total"] == pytest.approx(timings["read"] + sum(timings[s] for s in stages), rel=1e-6, abs=1e-6)
    assert timings["sampling_per_step"] == pytest.approx(timings["sampling"] / STEPS)
    summary = two_samples.summary()
    assert summary["samples"] == 2 and summary["steps"] == STEPS and summary["style"] is True


class _IdentityCodebook(nn.Module):
    def lookup(self, codes):
        return codes  # the stub's codes are its latents


class _FixedVolumeVQGAN(nn.Module):
    """Decodes any latent to one fixed model-layout volume in [-1, 1]; 'quantizes' to itself."""

    def __init__(self, volume):
        super().__init__()
        self.register_buffer("volume", volume)
        self.quantizer = _IdentityCodebook()

    def quantize(self, z):
        return z, torch.zeros(()), z

    def decode(self, z_q):
        return self.volume[None, None].expand(z_q.shape[0], 1, *self.volume.shape)


class _ConstantEncoder(nn.Module):
    def forward(self, x):
        return torch.zeros(x.shape[0], 1, 2, 2, 2, device=x.device)


def test_orientation_of_the_ct_and_of_its_drr():
    """A model whose decoder draws one octant, anterior-superior-right in its (D, H, W) layout: the CT
    has it at low y (anterior), high z (superior), low x (right) and its DRR in the film's top left."""
    size = 32
    volume = torch.full((size, size, size), -1.0)
    volume[: size // 2, : size // 2, : size // 2] = 0.0  # D = A->P, H = S->I, W = R->L; 0.0 = 512 HU
    info = ModelInfo("octant", "0", SAMPLE_CT.parent, size, size, 10.0, "cone", "ddim", 2)
    stub = XctDiffPipeline(_FixedVolumeVQGAN(volume), _ConstantEncoder(), nn.Identity(), NoiseSchedule(), info)
    image = np.random.default_rng(0).uniform(0, 1, (64, 64)).astype(np.float32)
    result = stub.reconstruct(image, method="direct", device="cpu", style="off")
    ct = result.ct.array  # [z, y, x], LPS: z inferior -> superior, y anterior -> posterior, x right -> left
    assert_output_grid(result.ct)
    bright = ct[72:, :56, :56]
    assert np.all(bright == 512)
    for dark in (ct[:56], ct[:, 72:], ct[:, :, 72:]):
        assert np.all(dark == -1024)
    drr = result.drr  # [row, col]: rows superior -> inferior, columns the patient's right -> left
    assert drr[:12, :12].mean() > 0.8
    assert max(drr[20:, :].max(), drr[:, 20:].max()) < 0.2


# ------------------------------------------------------------------------------------------ seeds, samples


def test_same_seed_same_ct_other_seed_other_ct(pipe, model_dir, film):
    first = pipe.reconstruct(film, steps=STEPS, seed=7, device="cpu")
    again = XctDiffPipeline.from_pretrained(model_dir).reconstruct(film, steps=STEPS, seed=7, device="cpu")
    other = pipe.reconstruct(film, steps=STEPS, seed=8, device="cpu")
    np.testing.assert_array_equal(first.ct.array, again.ct.array)
    assert first.consistency == again.consistency
    difference = np.abs(first.ct.array.astype(np.float64) - other.ct.array)
    assert difference.mean() > 1.0  # HU: another seed is another sample, not a rounding difference


def test_random_seed_is_reported_and_reproduces(pipe, film):
    free = pipe.reconstruct(film, steps=STEPS, device="cpu")
    assert isinstance(free.seed, int) and 0 <= free.seed < 2**31
    replay = pipe.reconstruct(film, steps=STEPS, seed=free.seed, device="cpu")
    np.testing.assert_array_equal(free.ct.array, replay.ct.array)


def test_one_sample_has_no_uncertainty(pipe, film, two_samples):
    one = pipe.reconstruct(film, steps=STEPS, samples=1, seed=0, device="cpu")
    assert one.uncertainty is None and one.samples == 1
    assert not np.array_equal(one.ct.array, two_samples.ct.array)  # the CT is the mean of the samples


def test_two_samples_give_a_standard_deviation(two_samples):
    std = two_samples.uncertainty.array
    assert np.all(np.isfinite(std)) and std.min() >= 0.0
    assert (std > 1.0).mean() > 0.1  # two noise samples disagree in many voxels (HU)
    assert std.max() <= (2048 + 1024) / 2  # the std of two values in the HU window is at most half of it


def test_equal_samples_have_zero_std_and_give_the_direct_ct(pipe, film, monkeypatch):
    """Every 'sample' is the prior itself: the mean is the direct CT, the std exactly 0."""
    import XctDiffCore.diffusion as diffusion

    def prior_as_sample(model, cond, shape, schedule, **options):
        options["progress"](1.0)
        return cond.expand(shape).clone()

    monkeypatch.setattr(diffusion, "sample", prior_as_sample)
    three = pipe.reconstruct(film, steps=STEPS, samples=3, seed=0, device="cpu")
    direct = pipe.reconstruct(film, method="direct", device="cpu")
    np.testing.assert_array_equal(three.ct.array, direct.ct.array)
    assert np.all(three.uncertainty.array == 0.0)


@pytest.mark.parametrize("samples", [0, 65])
def test_samples_out_of_range(pipe, film, samples):
    with pytest.raises(XctDiffError, match="samples must be between 1 and 64"):
        pipe.reconstruct(film, samples=samples, device="cpu")


# ------------------------------------------------------------------------------------------ methods, samplers


def test_direct_method_skips_the_diffusion(pipe, film, two_samples):
    with UNetCalls(pipe) as calls:
        direct = pipe.reconstruct(film, method="direct", seed=1, device="cpu")
        other_seed = pipe.reconstruct(film, method="direct", seed=2, device="cpu")
    assert calls.count == 0
    assert (direct.method, direct.samples, direct.steps, direct.uncertainty) == ("direct", 1, None, None)
    assert "sampling" not in direct.timings and "sampling_per_step" not in direct.timings
    assert_output_grid(direct.ct)
    np.testing.assert_array_equal(direct.ct.array, other_seed.ct.array)  # deterministic: no noise
    assert not np.array_equal(direct.ct.array, two_samples.ct.array)
    with pytest.raises(XctDiffError, match="the direct method makes one deterministic CT, not 4 samples"):
        pipe.reconstruct(film, method="direct", samples=4, device="cpu")


def test_direct_path_blends_the_coarse_ct_and_the_diffusion_does_not(tmp_path, film):
    """A model with a coarse CT stage: its direct path is (1 - blend) x decoded + blend x the upsampled
    coarse CT, linear in the blend (to the 1 HU of the int16 output); coarse="off" is the decoder alone, as a model
    without the stage; the samples of the diffusion are left alone."""
    folder = create_random_model(tmp_path / "coarse", "tiny", with_coarse=True)
    pipe = XctDiffPipeline.from_pretrained(folder)
    assert pipe.coarse is not None and pipe.coarse_blend == 0.5
    with torch.no_grad():  # a coarse CT inside the HU window (the output is clipped to it), as a trained one is
        pipe.coarse.encoder_3d[-1].weight.mul_(0.01)
        pipe.coarse.mean.fill_(-0.3)
    run = dict(method="direct", device="cpu", style="off", precision="fp32")
    blended = {}
    for weight in (0.0, 0.5, 1.0):
        pipe.coarse_blend = weight
        blended[weight] = pipe.reconstruct(film, **run).ct.array.astype(np.float64)
    decoded = pipe.reconstruct(film, **run, coarse="off").ct.array  # the decoder alone, whatever the blend
    coarse_net, pipe.coarse = pipe.coarse, None
    np.testing.assert_array_equal(pipe.reconstruct(film, **run).ct.array, decoded)  # a model without the stage
    np.testing.assert_array_equal(blended[0.0], decoded)
    with pytest.raises(XctDiffError, match="coarse must be one of auto, off"):
        pipe.reconstruct(film, **run, coarse="on")
    assert np.abs(blended[1.0] - decoded).mean() > 50  # the random coarse CT is another volume
    from XctDiffCore.layout import HU_MAX, HU_MIN

    inside = (blended[0.0] > HU_MIN + 1) & (blended[0.0] < HU_MAX - 1)  # a random decoder leaves the window: clipped
    assert inside.mean() > 0.1
    np.testing.assert_allclose(blended[0.5][inside], ((blended[0.0] + blended[1.0]) / 2)[inside], atol=1.01)
    sampled = pipe.reconstruct(film, method="diffusion", steps=2, seed=0, device="cpu", style="off").ct.array
    pipe.coarse = coarse_net
    np.testing.assert_array_equal(pipe.reconstruct(film, method="diffusion", steps=2, seed=0, device="cpu",
                                                   style="off").ct.array, sampled)


def test_steps_or_sampler_with_the_direct_method_warn_that_they_are_ignored(pipe, film):
    from XctDiffCore.pipeline import MethodWarning

    with pytest.warns(MethodWarning, match="the direct method does not sample: the number of steps given is ignored"):
        pipe.reconstruct(film, method="direct", steps=5, device="cpu")
    with pytest.warns(MethodWarning, match="the number of steps and the sampler given are ignored"):
        pipe.reconstruct(film, method="direct", steps=5, sampler="ddim", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.reconstruct(film, method="direct", device="cpu")  # nothing given: nothing to say
        pipe.reconstruct(film, method="diffusion", steps=2, sampler="ddim", seed=0, device="cpu")


def test_direct_progress_rises_while_it_decodes_not_before(pipe, film, monkeypatch):
    """The direct method has no sampling: the bar must not jump to the sampling's end before the decoder runs."""
    calls, at_decode = [], []
    decode = pipe.vqgan.decode
    monkeypatch.setattr(pipe.vqgan, "decode", lambda z: at_decode.append(calls[-1][0]) or decode(z))
    pipe.reconstruct(film, method="direct", device="cpu", progress=lambda f, s: calls.append((f, s)))
    assert at_decode and at_decode[0] <= 0.15, f"the decoder starts at {at_decode[0]:.0%}"
    fractions = [f for f, _ in calls]
    assert all(b >= a for a, b in zip(fractions, fractions[1:])) and fractions[-1] == 1.0


def test_diffusion_calls_the_unet_once_per_step_for_all_samples(pipe, film):
    with UNetCalls(pipe) as calls:
        pipe.reconstruct(film, steps=4, samples=3, seed=0, device="cpu")
    assert calls.count == 4  # the samples are batched


def test_sampler_choice(pipe, film):
    ddim = pipe.reconstruct(film, steps=STEPS, seed=3, device="cpu", sampler="ddim")
    default = pipe.reconstruct(film, steps=STEPS, seed=3, device="cpu")
    dpm = pipe.reconstruct(film, steps=STEPS, seed=3, device="cpu", sampler="dpm-solver++")
    np.testing.assert_array_equal(ddim.ct.array, default.ct.array)  # the model's default sampler is DDIM
    assert not np.array_equal(ddim.ct.array, dpm.ct.array)
    with pytest.raises(XctDiffError, match="sampler must be one of"):
        pipe.reconstruct(film, sampler="euler", device="cpu")


@pytest.mark.parametrize(
    "options, words",
    [
        ({"method": "unet-only"}, "method must be one of"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"steps": 1001}, "steps must be between 1 and 1000"),
        ({"style": "sometimes"}, "style must be one of"),
        ({"device": "tpu"}, "unknown device"),
        ({"seed": 2**64}, "seed must fit in 64 bits"),
    ],
)
def test_bad_settings(pipe, film, options, words):
    with pytest.raises(XctDiffError, match=words):
        pipe.reconstruct(film, **{"device": "cpu", **options})


def test_cuda_without_a_gpu_is_an_error(pipe, film):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    with pytest.raises(XctDiffError, match="cannot use cuda"):
        pipe.reconstruct(film, steps=1, device="cuda")


def test_cuda_gives_the_cpu_samples(pipe, film):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cpu = pipe.reconstruct(film, steps=STEPS, seed=5, device="cpu")
    gpu = pipe.reconstruct(film, steps=STEPS, seed=5, device="cuda")
    pipe.to("cpu")
    assert gpu.device.startswith("cuda")
    assert_output_grid(gpu.ct)
    a, b = cpu.ct.array.astype(np.float64).ravel(), gpu.ct.array.astype(np.float64).ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.98  # the same initial noise (drawn on the CPU), bf16 aside


# ------------------------------------------------------------------------------------------ progress


def test_progress_rises_to_exactly_one(pipe, film):
    calls = []
    pipe.reconstruct(film, steps=STEPS, samples=2, seed=0, device="cpu", progress=lambda f, s: calls.append((f, s)))
    fractions = [f for f, _ in calls]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and calls[-1][1] == "reconstructed"
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert all(0.0 <= f <= 1.0 for f in fractions)
    stages = [s for _, s in calls]
    assert [s for s in stages if s.startswith("sampling ")] == [f"sampling {i}/{STEPS}" for i in range(1, STEPS + 1)]
    assert "decoding 1/2" in stages and "decoding 2/2" in stages
    sampling = [f for f, s in calls if s.startswith("sampling ")]
    assert sampling[-1] == pytest.approx(STAGE_END["sampling"])


def test_progress_of_reconstruct_file_ends_with_the_writing(pipe, film, tmp_path):
    calls = []
    reconstruct_file(pipe, SAMPLE_RADIOGRAPH, tmp_path / "ct.nrrd", method="direct", device="cpu",
                     progress=lambda f, s: calls.append((f, s)))
    fractions = [f for f, _ in calls]
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert (WRITE_START, "writing") in calls and calls[-1] == (1.0, "written")
    assert (tmp_path / "ct.nrrd").is_file()


# ------------------------------------------------------------------------------------------ cancel


def cancel_at(stage_prefix):
    """A progress callback that sets the returned event when a stage starting with ``stage_prefix`` is reported."""
    event, seen = threading.Event(), []

    def progress(fraction, stage):
        seen.append(fraction)
        if stage.startswith(stage_prefix):
            event.set()

    return event, progress, seen


def test_cancel_stops_within_one_sampler_step(pipe, film):
    event, progress, seen = cancel_at("sampling 3/")
    with UNetCalls(pipe) as calls, pytest.raises(Cancelled):
        pipe.reconstruct(film, steps=20, seed=0, device="cpu", progress=progress, cancel=event)
    assert calls.count == 3  # set after step 3: step 4 never ran
    assert max(seen) < STAGE_END["sampling"]


@pytest.mark.parametrize("stage", ["preprocessing", "style transfer", "encoding", "decoding 1/", "consistency"])
def test_cancel_between_stages(pipe, film, stage):
    event, progress, seen = cancel_at(stage)
    with pytest.raises(Cancelled):
        pipe.reconstruct(film, steps=STEPS, samples=2, seed=0, device="cpu", progress=progress, cancel=event)
    assert max(seen) < 1.0


def test_cancel_set_before_the_start(pipe, film):
    event = threading.Event()
    event.set()
    with UNetCalls(pipe) as calls, pytest.raises(Cancelled):
        pipe.reconstruct(film, steps=STEPS, device="cpu", cancel=event)
    assert calls.count == 0


@pytest.mark.parametrize("stage", ["sampling 1/", "decoding 2/", "reconstructed"])
def test_cancelled_reconstruct_file_writes_nothing(pipe, tmp_path, stage):
    source = tmp_path / "film.dcm"
    source.write_bytes(SAMPLE_RADIOGRAPH.read_bytes())
    before = listing(tmp_path)
    event, progress, _ = cancel_at(stage)
    with pytest.raises(Cancelled):
        reconstruct_file(pipe, source, tmp_path / "ct.nrrd", uncertainty=tmp_path / "std.nrrd", views=tmp_path / "views.png",
                         steps=STEPS, samples=2, seed=0, device="cpu", progress=progress, cancel=event)
    assert listing(tmp_path) == before



def test_an_interrupt_while_writing_keeps_the_earlier_outputs_as_a_set(pipe, tmp_path, monkeypatch):
    """Ctrl-C after the CT is written but before the views are: the earlier run's CT and views both stay
    (not a new CT beside old views); nothing temporary is left."""
    import XctDiffCore.figures as figures
    from XctDiffCore.io import write_image_png, write_volume

    ct, views = tmp_path / "ct.nrrd", tmp_path / "views.png"
    write_volume(Volume(np.zeros((4, 4, 4), np.int16), (2.5, 2.5, 2.5)), ct)  # an earlier run's outputs
    write_image_png(np.zeros((40, 40)), views)
    before = {path: path.read_bytes() for path in (ct, views)}
    real = figures.write_reconstruction_views

    def write_then_interrupt(result, path):
        real(result, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "write_reconstruction_views", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        reconstruct_file(pipe, SAMPLE_RADIOGRAPH, ct, views=views, method="direct", device="cpu")
    assert {path: path.read_bytes() for path in (ct, views)} == before
    assert listing(tmp_path) == ["ct.nrrd", "views.png"]


# ------------------------------------------------------------------------------------------ style


def test_style_auto_applies_the_generator_to_a_real_film(pipe, film):
    auto = pipe.reconstruct(film, method="direct", style="auto", device="cpu")
    on = pipe.reconstruct(film, method="direct", style="on", device="cpu")
    off = pipe.reconstruct(film, method="direct", style="off", device="cpu")
    assert auto.styled and on.styled and not off.styled
    np.testing.assert_array_equal(off.input_image, pipe.preprocess(film))
    np.testing.assert_array_equal(auto.input_image, on.input_image)
    assert np.abs(auto.input_image - off.input_image).mean() > 0.01  # the generator changed the image


def test_style_auto_leaves_a_drr_alone(pipe, drr_png):
    drr = read_radiograph(drr_png)
    assert drr.is_drr  # the tag written by `xctdiff drr`
    auto = pipe.reconstruct(drr_png, method="direct", style="auto", device="cpu")
    forced = pipe.reconstruct(drr_png, method="direct", style="on", device="cpu")
    assert not auto.styled and forced.styled
    np.testing.assert_array_equal(auto.input_image, pipe.preprocess(drr))
    untagged = Radiograph(drr.image, drr.spacing, False, "array")  # the same pixels without the tag count as real
    assert pipe.reconstruct(untagged, method="direct", device="cpu").styled


def test_model_without_style_stage(tmp_path, film):
    bare = XctDiffPipeline.from_pretrained(create_random_model(tmp_path / "bare", "tiny", with_style=False))
    assert bare.style is None
    with pytest.warns(StyleWarning, match="no style stage"):
        result = bare.reconstruct(film, method="direct", device="cpu")
    assert not result.styled
    with warnings.catch_warnings():
        warnings.simplefilter("error", StyleWarning)  # said once per pipeline, not per call
        bare.reconstruct(film, method="direct", device="cpu")
    with pytest.raises(XctDiffError, match="has no style stage"):
        bare.reconstruct(film, method="direct", style="on", device="cpu")


# ------------------------------------------------------------------------------------------ inputs


def test_path_radiograph_and_arrays_give_the_same_ct(pipe, film):
    from_path = pipe.reconstruct(SAMPLE_RADIOGRAPH, method="direct", device="cpu")
    for other in (film, film.image, torch.from_numpy(film.image)):
        result = pipe.reconstruct(other, method="direct", device="cpu")
        np.testing.assert_array_equal(result.ct.array, from_path.ct.array)
    # a colour array (RGB, RGBA) is made grey as a colour file is; it was refused as "an array of shape (H, W, 3)"
    grey = np.stack([film.image] * 3, axis=-1)
    for colour in (grey, np.concatenate([grey, np.ones_like(grey[..., :1])], axis=-1)):
        result = pipe.reconstruct(colour, method="direct", device="cpu")
        assert np.abs(result.ct.array.astype(np.int32) - from_path.ct.array).max() <= 1  # luma weights: float rounding


@pytest.mark.parametrize(
    "image, words",
    [
        (np.zeros((8, 40, 40), np.float32), r"^expected a 2D radiograph, got an array of shape \(8, 40, 40\) \(radiograph "
                                            r"given as an array\)$"),
        (np.zeros((40, 40, 5), np.float32), "expected a 2D radiograph"),
        (np.zeros((20, 40), np.float32), "32x32"),
        (np.full((64, 64), np.nan, np.float32), "NaN"),
        ([[0.0] * 64] * 64, "expected a radiograph path, Radiograph or 2D array"),
    ],
    ids=["3D array", "5 channels", "small array", "NaN array", "list"],
)
def test_bad_arrays(pipe, image, words):
    with pytest.raises(XctDiffError, match=words):
        pipe.reconstruct(image, device="cpu")


@pytest.mark.parametrize("case", RADIOGRAPH_CASES)
def test_bad_input_file_raises_one_sentence(pipe, tmp_path, case):
    build, _, words = CASES[case]
    path = build(tmp_path)
    with pytest.raises(XctDiffError) as info:
        pipe.reconstruct(path, steps=1, device="cpu")
    message = str(info.value)
    assert words in message and path.name in message and "\n" not in message


@pytest.mark.parametrize("case", RADIOGRAPH_CASES)
def test_bad_input_file_writes_nothing(pipe, tmp_path, case):
    build, _, words = CASES[case]
    path = build(tmp_path)
    before = listing(tmp_path)
    with pytest.raises(XctDiffError, match=words):
        reconstruct_file(pipe, path, tmp_path / "ct.nrrd", uncertainty=tmp_path / "std.nrrd", views=tmp_path / "v.png",
                         steps=1, samples=2, device="cpu")
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    "outputs, options, words",
    [
        ({"output": "no/such/folder/ct.nrrd"}, {}, "output folder does not exist"),
        ({"output": "ct.vtk"}, {}, "cannot write a volume as '.vtk'"),
        ({"output": "."}, {}, "output path is a folder"),
        ({"uncertainty": "no/such/std.nrrd"}, {"samples": 2}, "output folder does not exist"),
        ({"uncertainty": "std.nrrd"}, {"samples": 1}, "needs --samples 2 or more"),
        ({"uncertainty": "std.nrrd"}, {"samples": 2, "method": "direct"}, "the direct method makes one deterministic CT"),
        ({"views": "views.jpg"}, {}, "must be a .png file"),
        ({"views": "no/such/views.png"}, {}, "output folder does not exist"),
    ],
)
def test_bad_outputs_are_refused_before_any_work(pipe, tmp_path, outputs, options, words):
    paths = {"output": tmp_path / "ct.nrrd", **{k: tmp_path / v for k, v in outputs.items()}}
    with UNetCalls(pipe) as calls, pytest.raises(XctDiffError, match=words):
        reconstruct_file(pipe, SAMPLE_RADIOGRAPH, steps=1, device="cpu", **paths, **options)
    assert calls.count == 0
    assert listing(tmp_path) == []


def test_reconstruct_file_default_output_and_all_files(pipe, tmp_path):
    source = tmp_path / "chest.dcm"
    source.write_bytes(SAMPLE_RADIOGRAPH.read_bytes())
    result, written = reconstruct_file(pipe, source, uncertainty=tmp_path / "std.nii.gz", views=tmp_path / "views.png",
                                       steps=STEPS, samples=2, seed=0, device="cpu")
    assert written == [tmp_path / "chest_ct.nrrd", tmp_path / "std.nii.gz", tmp_path / "views.png"]
    assert listing(tmp_path) == ["chest.dcm", "chest_ct.nrrd", "std.nii.gz", "views.png"]
    assert result.timings["write"] > 0


def test_a_reconstruction_through_the_python_api_loads_no_training_code(model_dir):
    """Inference must not depend on training (issue 16): a fresh process reconstructs, then lists what it imported."""
    import subprocess
    import sys

    script = (
        "import sys, warnings; warnings.simplefilter('ignore')\n"
        "from XctDiffCore.pipeline import XctDiffPipeline\n"
        f"pipe = XctDiffPipeline.from_pretrained({str(model_dir)!r})\n"
        f"pipe.reconstruct({str(SAMPLE_RADIOGRAPH)!r}, steps=1, seed=0, device='cpu', guidance=0.5)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('XctDiffCore'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert "XctDiffCore.pipeline" in loaded and "XctDiffCore.guidance" in loaded
    assert [m for m in loaded if m.startswith(("XctDiffCore.training", "XctDiffCore.training.losses", "XctDiffCore.augment"))] == []


def test_settings_come_as_options_or_as_keywords(pipe, film):
    from XctDiffCore.options import ReconstructOptions

    by_keywords = pipe.reconstruct(film, method="direct", device="cpu", style="off")
    by_options = pipe.reconstruct(film, options=ReconstructOptions(method="direct", device="cpu", style="off"))
    np.testing.assert_array_equal(by_keywords.ct.array, by_options.ct.array)
    with pytest.raises(XctDiffError, match="not both"):
        pipe.reconstruct(film, samples=2, options=ReconstructOptions())
    with pytest.raises(XctDiffError, match="samples must be a whole number"):
        ReconstructOptions(samples=1.5)


@pytest.mark.parametrize("arguments, words", [
    ({"options": {"steps": 2}}, "options must be a ReconstructOptions, got dict"),
    ({"cancel": True}, "cancel must be a threading.Event or None, got bool"),
    ({"progress": 5}, "progress must be a function of"),
])
def test_arguments_of_the_wrong_kind_are_one_sentence_before_any_work(pipe, film, arguments, words):
    """Not an AttributeError from deep in the run (cancel=True failed only after the preprocessing)."""
    with UNetCalls(pipe) as calls, pytest.raises(TypeError, match=words):
        pipe.reconstruct(film, **arguments)
    assert calls.count == 0


def test_bf16_on_the_cpu_is_close_to_fp32_and_fp32_comes_back_exactly(pipe, film):
    """--precision (issue 20): bf16 autocast with channels-last 3D weights on the CPU; the result says
    which arithmetic ran, stays near fp32, and a later fp32 run is bit-identical to one before it."""
    before = pipe.reconstruct(film, method="direct", device="cpu", style="off", precision="fp32")
    half = pipe.reconstruct(film, method="direct", device="cpu", style="off", precision="bf16")
    after = pipe.reconstruct(film, method="direct", device="cpu", style="off", precision="fp32")
    assert (before.precision, half.precision, after.precision) == ("fp32", "bf16", "fp32")
    assert half.summary()["precision"] == "bf16"
    np.testing.assert_array_equal(before.ct.array, after.ct.array)
    full, low = before.ct.array.astype(np.float32), half.ct.array.astype(np.float32)
    # bf16 keeps 8 bits of mantissa: on the trained model a few HU (README); random weights, whose
    # nearest codes are close calls, flip more of them, but it must stay the same CT
    assert 0 < np.abs(full - low).mean() < 0.25 * np.abs(full - full.mean()).mean()
    assert np.corrcoef(full.ravel(), low.ravel())[0, 1] > 0.95
    with pytest.raises(XctDiffError, match="precision must be one of auto, fp32, bf16"):
        pipe.reconstruct(film, method="direct", device="cpu", precision="fp16")


def test_two_threads_on_one_pipeline_run_one_at_a_time(pipe, film):
    """A run sets the pipeline's precision and weight layout: a second thread's fp32 run that started while a
    bf16 run was under way made the bf16 one finish in fp32 and say so, silently. Calls now take turns."""
    settings = dict(method="direct", device="cpu", style="off")
    alone = {p: pipe.reconstruct(film, precision=p, **settings) for p in ("bf16", "fp32")}
    results = {}
    other = threading.Thread(target=lambda: results.update(fp32=pipe.reconstruct(film, precision="fp32", **settings)))

    def progress(fraction, stage):  # the bf16 run, between its encoding and its decoding: the fp32 one starts
        if stage == "decoding" and other.ident is None:
            other.start()
            other.join(timeout=3)  # without turns it runs to its end here; with them it waits for this run

    results["bf16"] = pipe.reconstruct(film, precision="bf16", progress=progress, **settings)
    other.join()
    assert {p: r.precision for p, r in results.items()} == {"bf16": "bf16", "fp32": "fp32"}
    for p in ("bf16", "fp32"):
        np.testing.assert_array_equal(results[p].ct.array, alone[p].ct.array)


def test_auto_precision_follows_the_measured_verdict_and_the_cpu(monkeypatch):
    from XctDiffCore import device as devices

    cpu = torch.device("cpu")
    assert devices.autocast_dtype(cpu, "fp32") is None and devices.autocast_dtype(cpu, "bf16") == torch.bfloat16
    for verdict, native, expected in ((True, True, torch.bfloat16), (True, False, None), (False, True, None)):
        monkeypatch.setattr(devices, "CPU_BF16_AUTO", verdict)
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
        assert devices.autocast_dtype(cpu, "auto") == expected


def test_a_cpu_is_described_with_its_thread_count_in_words():
    """Reports and the Slicer panel said 'cpu (1 threads)' for the Slicer child process's one thread."""
    from XctDiffCore.device import describe_device

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert describe_device(torch.device("cpu")) == "cpu (1 thread)"
        torch.set_num_threads(2)
        assert describe_device(torch.device("cpu")) == "cpu (2 threads)"
    finally:
        torch.set_num_threads(before)


def test_bf16_asked_for_on_an_emulating_cpu_warns_once(monkeypatch):
    """Emulated bf16 took minutes where fp32 takes seconds: the user who forces it hears why, once."""
    import warnings

    from XctDiffCore import device as devices

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    devices._warn_emulated_bf16.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert devices.autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert [str(w.message)[:40] for w in caught] == ["this CPU has no native bf16 (AVX512-BF16"]
    devices._warn_emulated_bf16.cache_clear()


def test_the_direct_path_searches_the_codebook_once_and_decodes_the_same(pipe, film, monkeypatch):
    """The direct path decodes the prior's codebook entries as they are: a second search of the
    codebook (which finds the same entries) is skipped, and the CT is bit-identical to searching again."""
    from XctDiffCore.models.quantize import HomogeneousQuantizer

    searches = []
    nearest = HomogeneousQuantizer.nearest
    monkeypatch.setattr(HomogeneousQuantizer, "nearest", lambda self, *a: searches.append(1) or nearest(self, *a))
    once = pipe.reconstruct(film, method="direct", device="cpu", style="off", precision="fp32")
    assert len(searches) == 1
    decode = XctDiffPipeline._decode
    monkeypatch.setattr(XctDiffPipeline, "_decode", lambda self, *a, **k: decode(self, *a, **{**k, "quantized": False}))
    twice = pipe.reconstruct(film, method="direct", device="cpu", style="off", precision="fp32")
    assert len(searches) == 3
    np.testing.assert_array_equal(once.ct.array, twice.ct.array)


# ------------------------------------------------------------------------------- the API's odd values


def test_reconstruct_file_never_writes_over_its_input_or_another_output(pipe, tmp_path):
    """`write_drr_file` and the command line refused it; the API's reconstruct_file replaced the film with the CT."""
    from XctDiffCore.io import write_radiograph_nrrd
    from XctDiffCore.pipeline import reconstruct_file

    film = write_radiograph_nrrd(np.random.default_rng(0).random((64, 64)).astype(np.float32), tmp_path / "film.nrrd")
    before = film.read_bytes()
    with pytest.raises(XctDiffError, match="is the input"):
        reconstruct_file(pipe, film, output=tmp_path / "." / "film.nrrd", method="direct", device="cpu")
    with pytest.raises(XctDiffError, match="are the same file"):
        reconstruct_file(pipe, film, output=tmp_path / "a.nrrd", uncertainty=tmp_path / "a.nrrd", samples=2,
                         steps=STEPS, device="cpu")
    assert film.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["film.nrrd"]


@pytest.mark.parametrize("image, words", [
    (np.full((64, 64), "a"), "holds <U1 values, not grey levels"),
    (np.ones((64, 64)) + 1j, "holds complex128 values"),
    (np.array([[object()] * 64] * 64), "holds object values"),
], ids=["strings", "complex", "objects"])
def test_a_film_of_no_grey_levels_is_one_sentence(pipe, image, words):
    with pytest.raises(XctDiffError, match=words):
        pipe.reconstruct(image, method="direct", device="cpu")


def test_a_bf16_tensor_is_a_film(pipe):
    image = torch.rand(64, 64, dtype=torch.bfloat16)  # numpy has no bf16: converted on the way in
    assert pipe.reconstruct(image, method="direct", device="cpu").ct.shape == (GRID,) * 3


def test_option_values_are_checked_and_normalised():
    assert ReconstructOptions(device=" CPU\n").device == "cpu"  # said as cpu, not as the raw value in two lines
    with pytest.raises(XctDiffError, match="strict must be True or False, got 'false'"):
        ReconstructOptions(strict="false")  # a truthy string would switch strict mode on


def test_writers_refuse_what_no_reader_takes_back(two_samples, tmp_path):
    from XctDiffCore.io import write_radiograph_nrrd, write_volume
    from XctDiffCore.pipeline import write_ct

    nan = Volume(np.full((4, 4, 4), np.nan, np.float32))
    with pytest.raises(XctDiffError, match="NaN or infinite values"):
        write_volume(nan, tmp_path / "nan.nrrd")
    with pytest.raises(XctDiffError, match="give it the suffix .nrrd"):
        write_radiograph_nrrd(np.zeros((40, 40), np.float32), tmp_path / "film.png")
    with pytest.raises(XctDiffError, match="unknown CT format 'bogus'"):
        write_ct(two_samples, tmp_path / "ct.nrrd", "bogus")
    assert write_volume(Volume(np.zeros((4, 4, 4), np.int16)), tmp_path / "CT.NII.GZ").is_file()  # ITK wants .nii.gz
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CT.NII.GZ"]


@pytest.mark.parametrize("spacing, age, words", [
    ((-1.0, 0.0), None, "spacing must be .row, col. positive mm or None, got .-1.0, 0.0."),
    ((0.1,), None, "spacing must be"),
    ("abc", None, "spacing must be"),
    (None, -5, "age_years must be 0 to 150 or None, got -5"),
], ids=["negative spacing", "one value", "text", "negative age"])
def test_a_radiograph_made_in_code_is_checked_as_a_read_one(pipe, spacing, age, words):
    """read_radiograph refuses these; a Radiograph built by hand gave "a film -256 x 0 mm" and "-60 months old"."""
    image = np.random.default_rng(0).random((64, 64))
    with pytest.raises(XctDiffError, match=words):
        pipe.reconstruct(Radiograph(image, spacing, False, "film", age), method="direct", device="cpu")


def test_compiling_the_unet_says_nothing_of_torch_jit():
    """`reconstruct --compile` printed "warning: `torch.jit.script_method` is deprecated" (raised by the compiler's
    own imports), a line the user can do nothing about. A fresh process: the compiler's modules import once."""
    import subprocess
    import sys

    from conftest import REPO

    code = "import torch; from XctDiffCore.pipeline import _compiled; _compiled(torch.nn.Linear(2, 2))"
    done = subprocess.run([sys.executable, "-W", "error:`torch.jit.script_method` is deprecated:DeprecationWarning",
                           "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-500:]


def test_the_engines_warnings_name_the_callers_line_not_the_engines(pipe, film, tmp_path, monkeypatch):
    """A notebook shows a warning's file and line: it was pipeline.py's ``result = run_with_cpu_fallback(`` for the
    plausibility and guidance warnings (their stacklevels counted too few frames), pipeline.py's ``target =
    choose_device(...)`` for the GPU that cannot be used, and options.py's for a steps given to the direct method
    through reconstruct_file."""
    from XctDiffCore import device as devices

    monkeypatch.setattr(devices, "cuda_problem", lambda *args, **kwargs: "this GPU is out of reach")
    monkeypatch.setattr(devices, "gpu_hardware_present", lambda: True)
    side = np.rot90(film.image).copy()  # a film on its side: plausibility, then guidance skipped for it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.reconstruct(side, method="direct", device="auto", guidance=0.5)
        pipe.reconstruct(side, method="direct", device="cpu", turn="auto")
        reconstruct_file(pipe, SAMPLE_RADIOGRAPH, tmp_path / "ct.nrrd", method="direct", steps=2, device="cpu")
    kinds = {w.category.__name__ for w in caught}
    assert {"PlausibilityWarning", "GuidanceWarning", "MethodWarning", "DeviceWarning"} <= kinds
    assert {(w.category.__name__, w.filename) for w in caught} == {(kind, __file__) for kind in kinds}


def test_a_ct_written_without_naming_the_model_still_records_it(pipe, two_samples, tmp_path):
    """README's ``write_ct(result, "chest_ct.nii.gz")`` wrote 'model: not recorded' although the pipeline that made the
    result knew it: the result carries its model, and write_ct records it unless told another."""
    from XctDiffCore.io import volume_notes
    from XctDiffCore.pipeline import output_notes, write_ct

    made_by = f"{pipe.info.model_id} {pipe.info.version}"
    assert volume_notes(write_ct(two_samples, tmp_path / "ct.nrrd"))["model"] == made_by
    assert made_by in volume_notes(write_ct(two_samples, tmp_path / "ct.nii.gz"))["summary"]
    assert output_notes(two_samples, uncertainty=True)["model"] == made_by  # for write_volume(result.uncertainty, ...)
