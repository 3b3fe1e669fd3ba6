"""``XctDiffPipeline``: the one public entry point from a radiograph to a CT.

    pipe = XctDiffPipeline.from_pretrained("models/xctdiff")      # None: the bundled default model
    result = pipe.reconstruct("chest.png", samples=4, seed=0)
    result.ct, result.uncertainty, result.consistency, result.timings

**Stages** (the paper's inference, each timed in ``result.timings``):

1. *preprocessing*: read the radiograph (a path, a :class:`~XctDiffCore.io.Radiograph` or a 2D array),
   :func:`~XctDiffCore.preprocess.preprocess_radiograph` at 128 px (the size the training DRRs were
   made at), area-resized to the model's input size: ``input`` in [0, 1]; ``mirror=True`` flips the
   film left to right first and ``turn`` stands it head up (a quarter turn either way or half round;
   ``"auto"``: the turn the plausibility checks name, noted in ``result.warnings``; ``result.turn`` says
   which was applied); then the plausibility check (:mod:`XctDiffCore.plausibility`: an inverted,
   lateral, non-chest, turned or mirrored image gets a :class:`~XctDiffCore.plausibility.PlausibilityWarning`,
   or an error with ``strict=True``; the reasons are kept in ``result.warnings``);
2. *style*: real films go through the CycleGAN real -> DRR generator (``style="auto"``: not for
   images tagged as DRRs; see :mod:`XctDiffCore.style`);
3. *encoder*: the progressive encoder's prior ``y = N(q(Conv(x)))`` (and, on the direct path of a model
   with a coarse CT stage, :mod:`XctDiffCore.models.coarse`, the CT at the latent grid);
4. *sampling*: K samples of the latent diffusion, batched, conditioned on y (``method="direct"``
   skips it and decodes y itself: the paper's no-diffusion ablation; ``steps`` or ``sampler`` given
   with it are ignored, with a :class:`MethodWarning`). ``method=None`` is the model's
   default, except that ``samples >= 2`` asks for the diffusion (the only path that samples);
5. *decoding*: each latent snapped to the codebook and decoded by the VQ-GAN (on the direct path
   blended with the upsampled coarse CT, its stage's ``blend`` the weight, unless ``coarse="off"``), to HU;
   with ``ap_diameter`` (mm, when the user knows the chest's depth, which a frontal film does not show)
   stretched front to back to it (:mod:`XctDiffCore.ap_diameter`);
6. *guidance* (``guidance > 0``, off by default): each decoded sample is moved until its DRR matches
   the input (:mod:`XctDiffCore.guidance`: the strength is the fraction of that correction applied;
   a sample whose unguided result disagrees grossly with the film is left as it is, with a
   :class:`~XctDiffCore.guidance.GuidanceWarning` that counts such samples);
7. *consistency*: the DRR of the result, rendered in the training geometry and normalised like the
   input, compared with the input by 2D SSIM (:func:`~XctDiffCore.metrics.ssim_2d`); with guidance,
   ``result.unguided_consistency`` keeps the score before it (a guided score says the DRR was fitted).
   A score (the unguided one with guidance) below the model's ``info.min_consistency`` flags the
   result as unreliable: a :class:`~XctDiffCore.plausibility.PlausibilityWarning` kept in
   ``result.warnings``, or an error with ``strict=True``.

**Output geometry.** ``result.ct`` is the voxel-wise mean of the K samples in HU (int16), always on
the paper's grid: 128^3 voxels of 2.5 mm, a 320 mm cube (a model that works on a coarser grid, such
as the 64^3 ``preview`` configuration, has each decoded sample resampled trilinearly to it), canonical LPS (direction identity, ``array[z, y, x]``), **centred on the LPS origin**
(the origin is the first voxel's centre, ``-(n - 1) / 2 * spacing``). The coronal plane faces the
radiograph: the PA film lies in the x-z plane, its rows along -z, its columns along +x. A film's
pixel spacing does not scale the CT: the preprocessing crops its empty border and rescales it to the
model's input, so the CT always has the scale of the (adult) training CTs, not of the film; a DICOM
Patient's Age under 16 or a film under 250 mm by its spacing gets a warning that says so
(:func:`~XctDiffCore.plausibility.size_problems`).
``result.uncertainty`` is the voxel-wise standard deviation (HU, ddof = 0) over the K samples, on
the same grid, when K >= 2.

**Devices.** ``device="auto"`` uses CUDA when usable, else the CPU (:mod:`XctDiffCore.device` says
why not the GPU). On CUDA: bf16 autocast, ``torch.inference_mode``; a CUDA out-of-memory falls back to
the CPU with a warning unless ``cpu_fallback=False``. ``from_pretrained(compile=True)`` compiles the
UNet with ``torch.compile``. The initial noise is drawn on the CPU from ``seed``, so one seed gives
the same samples on every device (to floating-point precision).

**Progress and cancel.** ``progress(fraction, stage)`` rises monotonically to 1.0 with the stage's
name ("sampling 3/50"); setting the ``cancel`` event stops the run within one sampler step (or
between stages; one sample's decoding is not interrupted: seconds for a 128^3 model on a CPU) by
raising :class:`~XctDiffCore.diffusion.Cancelled`; nothing is written then.
"""
from __future__ import annotations

import contextlib
import dataclasses
import secrets
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .diffusion import Cancelled
from .errors import XctDiffError, warn_caller
from .guidance import MIN_UNGUIDED_CONSISTENCY, GuidanceWarning
from .options import CT_FORMATS, MAX_SAMPLES, MethodWarning, ReconstructOptions  # noqa: F401 (re-exported)
from .options import TURN_NAMES, TURN_PHRASES, TURNS, turn_words
from .plausibility import PlausibilityWarning, consistency_problems, head_up_turn, input_problems, view_problems
from .io import Radiograph
from .model_folder import FIELD_OF_VIEW_MM, PREPARED_SIZE, ModelFolder, ModelInfo
from .model_inputs import area_resize
from .volume import Volume

ProgressCallback = Callable[[float, str], None]
Method = Literal["diffusion", "direct"]
OUTPUT_SIZE = PREPARED_SIZE  # result.ct: 128^3 voxels of FIELD_OF_VIEW_MM / 128 = 2.5 mm, whatever the model's grid

# Where each stage ends on the progress scale (sampling takes the most time by far).
STAGE_END = {"preprocessing": 0.02, "style transfer": 0.04, "encoding": 0.07, "sampling": 0.86, "decoding": 0.95, "consistency": 1.0}
# The direct method has no sampling: the decoding is most of its work.
DIRECT_STAGE_END = {**STAGE_END, "encoding": 0.10, "sampling": 0.10, "decoding": 0.85}


class APDiameterWarning(UserWarning):
    """The given AP diameter could not be applied: the reconstruction has no body to measure."""


class StyleWarning(UserWarning):
    """A real radiograph goes into a model without a style stage."""


@dataclass
class Reconstruction:
    """What :meth:`XctDiffPipeline.reconstruct` returns (see the module docstring for the geometry)."""

    ct: Volume  # HU, int16, 128^3 at 2.5 mm, canonical LPS, centred on the origin
    uncertainty: Optional[Volume]  # std over the samples in HU (float32), K >= 2; else None
    consistency: float  # SSIM in [0, 1] of the input vs the DRR of ct
    timings: dict  # seconds per stage, plus "total" and "sampling_per_step"
    device: str  # e.g. "cuda:0 (NVIDIA H100 80GB HBM3)"
    seed: int
    samples: int
    steps: Optional[int]  # None for method="direct"
    method: str
    styled: bool  # whether the real -> DRR style transfer was applied
    input_image: np.ndarray = field(repr=False)  # the model's input in [0, 1] (after style), [row, col]
    drr: np.ndarray = field(repr=False)  # the normalised DRR of ct, like input_image
    guidance: float = 0.0  # the strength the mean CT received: asked x share of samples guided (0: off or skipped)
    unguided_consistency: Optional[float] = None  # with guidance asked for: the mean consistency of the samples before it
    warnings: list = field(default_factory=list)  # why the result deserves less trust (plausibility, skipped guidance)
    ap_diameter: Optional[float] = None  # the chest's AP diameter given (mm), which the CT was stretched to
    learnt_ap_diameter: Optional[float] = None  # with it: the reconstruction's own diameter before (mm, mean over samples)
    precision: str = "fp32"  # the networks' arithmetic: "bf16" (autocast) or "fp32"
    turn: str = "none"  # how the film was turned before reconstructing (options.TURNS' name; auto resolved)
    mirrored: bool = False  # whether it was flipped left to right first
    flops: dict = field(default_factory=dict)  # operations per stage, only inside counting_flops()
    flops_by_dtype: dict = field(default_factory=dict)  # the same split by arithmetic: {stage: {"bfloat16": n, ...}}
    model: Optional[ModelInfo] = field(default=None, repr=False)  # the model that made it: write_ct records it

    def summary(self) -> dict:
        """Plain data for the ``RESULT`` line and JSON logs."""
        return {
            "consistency": round(float(self.consistency), 4),
            "timings": {k: round(float(v), 4) for k, v in self.timings.items()},
            "device": self.device,
            "seed": self.seed,
            "samples": self.samples,
            "steps": self.steps,
            "method": self.method,
            "style": self.styled,
            "guidance": self.guidance,
            "unguided_consistency": None if self.unguided_consistency is None else round(float(self.unguided_consistency), 4),
            "warnings": list(self.warnings),
            "precision": self.precision,
            "ap_diameter_mm": self.ap_diameter,
            "learnt_ap_diameter_mm": None if self.learnt_ap_diameter is None else round(float(self.learnt_ap_diameter), 1),
            "turn": self.turn,
            "mirror": self.mirrored,
        }


class _Progress:
    """Monotonic fractions in [0, 1] with stage names, forwarded to the caller's callback."""

    def __init__(self, callback: Optional[ProgressCallback]):
        self.callback, self.fraction = callback, 0.0

    def report(self, fraction: float, stage: str) -> None:
        self.fraction = min(1.0, max(self.fraction, float(fraction)))
        if self.callback is not None:
            self.callback(self.fraction, stage)


def _compiled(module: torch.nn.Module):
    """``torch.compile(module)``, without the DeprecationWarning (``torch.jit.script_method``) that the compiler's
    own imports raise: it is torch's business, and a user could do nothing about its ``warning:`` line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method.* is deprecated", category=DeprecationWarning)
        return torch.compile(module)


def _check_cancel(cancel: Optional[threading.Event]) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("reconstruction was cancelled")


def _checked_spacing(radiograph: Radiograph) -> Optional[tuple]:
    """A Radiograph made in code: its spacing as the readers give it, (row, col) positive mm, or None."""
    if radiograph.spacing is None:
        return None
    try:
        row, col = (float(v) for v in radiograph.spacing)
    except (TypeError, ValueError):
        row = col = float("nan")
    if not (np.isfinite(row) and np.isfinite(col) and row > 0 and col > 0):
        raise XctDiffError(f"radiograph {radiograph.source}: spacing must be (row, col) positive mm or None, "
                           f"got {radiograph.spacing!r}")
    return row, col


def _checked_age(radiograph: Radiograph) -> Optional[float]:
    age = radiograph.age_years
    if age is None:
        return None
    if isinstance(age, bool) or not isinstance(age, (int, float)) or not 0 <= age < 150:
        raise XctDiffError(f"radiograph {radiograph.source}: age_years must be 0 to 150 or None, got {age!r}")
    return float(age)


def as_radiograph(radiograph) -> Radiograph:
    """A path, a :class:`Radiograph` or a 2D array (numpy or torch) -> a checked :class:`Radiograph`."""
    from .io import check_radiograph_image, read_radiograph

    if isinstance(radiograph, Radiograph):
        return Radiograph(check_radiograph_image(radiograph.image, radiograph.source), _checked_spacing(radiograph),
                          radiograph.is_drr, radiograph.source, _checked_age(radiograph), dict(radiograph.header or {}))
    if isinstance(radiograph, (str, Path)):
        return read_radiograph(radiograph)
    if isinstance(radiograph, torch.Tensor):
        if radiograph.is_complex():
            raise XctDiffError(f"radiograph given as a tensor holds {radiograph.dtype} values, not grey levels")
        radiograph = radiograph.detach().cpu().float().numpy()  # bf16 and fp16 too: numpy has no bf16
    if isinstance(radiograph, np.ndarray):
        return Radiograph(check_radiograph_image(radiograph, "given as an array"), None, False, "array")
    raise XctDiffError(f"expected a radiograph path, Radiograph or 2D array, got {type(radiograph).__name__}")


class XctDiffPipeline:
    """A loaded model: VQ-GAN, progressive encoder, diffusion UNet (+ noise schedule), optional style generator.

    Build it with :meth:`from_pretrained`; the constructor takes the networks themselves.
    """

    def __init__(self, vqgan: torch.nn.Module, encoder: torch.nn.Module, unet: torch.nn.Module, schedule,
                 info: ModelInfo, style: Optional[torch.nn.Module] = None, mean_ct: Optional[np.ndarray] = None,
                 compile: bool = False, coarse: Optional[torch.nn.Module] = None, coarse_blend: float = 0.5):
        self.vqgan, self.encoder, self.unet, self.style = vqgan, encoder, unet, style
        self.coarse, self.coarse_blend = coarse, coarse_blend  # the coarse CT the direct path blends in (optional)
        self.schedule, self.info = schedule, info
        self.mean_ct = mean_ct  # the model folder's mean training CT [z, y, x] in HU, when it has one
        self.device = torch.device("cpu")
        self.load_seconds = 0.0
        self._denoiser = _compiled(unet) if compile else unet
        self._warned_style = False
        self._amp_dtype = None  # the autocast dtype of the run in progress (None: fp32); see _autocast
        self._memory_format = torch.contiguous_format  # of the 3D networks' weights; see _set_memory_format
        self._lock = threading.RLock()  # one run at a time: a run sets the device, precision and weights' layout

    @classmethod
    def from_pretrained(cls, path=None, compile: bool = False) -> "XctDiffPipeline":
        """Load and verify a model folder (``None``: the bundled default in ``Resources/Models/<id>/``)."""
        from .model_folder import bundled_model_folder, load_model_folder

        start = time.perf_counter()
        folder: ModelFolder = load_model_folder(bundled_model_folder() if path is None else path)
        pipe = cls(folder.vqgan, folder.encoder, folder.unet, folder.schedule, folder.info, folder.style,
                   mean_ct=folder.mean_ct, compile=compile, coarse=folder.coarse,
                   coarse_blend=float(folder.settings.get("coarse", {}).get("blend", 0.5)))
        pipe.load_seconds = time.perf_counter() - start
        return pipe

    # ------------------------------------------------------------------------------------ public

    def reconstruct(
        self,
        radiograph,
        steps: Optional[int] = None,
        samples: int = 1,
        seed: Optional[int] = None,
        device: str = "auto",
        style: str = "auto",
        method: Optional[Method] = None,
        sampler: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[threading.Event] = None,
        cpu_fallback: bool = True,
        guidance: float = 0.0,
        strict: bool = False,
        precision: str = "auto",
        options: Optional[ReconstructOptions] = None,
        coarse: str = "auto",
        ap_diameter: Optional[float] = None,
        turn: str = "none",
        mirror: bool = False,
    ) -> Reconstruction:
        """Reconstruct a CT from one frontal radiograph (see the module docstring for every argument's effect).

        The settings are those of :class:`~XctDiffCore.options.ReconstructOptions` (defined and checked
        there), given as keywords or as ``options``.

        Raises :class:`XctDiffError` for bad input or settings, :class:`Cancelled` when ``cancel`` is set.
        Calls from several threads take turns (a run moves the networks to its device and sets their precision);
        for runs side by side, load one pipeline per thread.
        """
        from .device import choose_device, run_with_cpu_fallback

        if options is not None and not isinstance(options, ReconstructOptions):
            raise TypeError(f"options must be a ReconstructOptions, got {type(options).__name__}")
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise TypeError(f"cancel must be a threading.Event or None, got {type(cancel).__name__}")
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a function of (fraction, stage) or None, got {type(progress).__name__}")
        given = ReconstructOptions(steps=steps, samples=samples, seed=seed, device=device, style=style, method=method,
                                   sampler=sampler, guidance=guidance, strict=strict, precision=precision,
                                   coarse=coarse, ap_diameter=ap_diameter, turn=turn, mirror=mirror)
        if options is not None:
            if given != ReconstructOptions():
                raise XctDiffError("give the settings either as options=ReconstructOptions(...) or as keywords, not both")
            given = options
        run = given.for_model(self.info.method, self.info.sampler, self.info.steps, self.schedule.num_train_steps)
        steps, samples, style, method, sampler, guidance, strict = (
            run.steps, run.samples, run.style, run.method, run.sampler, run.guidance, run.strict)
        if method == "diffusion" and "diffusion" in self.info.retrain:
            raise XctDiffError(f"{self.info.folder}: its diffusion stage learnt another autoencoder's latents; train it on "
                               "this one (Testing/Scripts/add_stage.py --diffusion RUN) or use --method direct")
        seed = secrets.randbits(31) if run.seed is None else run.seed
        reporter = _Progress(progress)
        reporter.report(0.0, "reading")
        start = time.perf_counter()
        radiograph = as_radiograph(radiograph)
        read_seconds = time.perf_counter() - start
        target = choose_device(run.device)
        with self._lock:
            result = run_with_cpu_fallback(
                lambda dev: self._reconstruct_on(dev, radiograph, steps, samples, seed, style, method, sampler,
                                                 reporter, cancel, guidance, strict, run.precision, run.coarse,
                                                 run.ap_diameter, run.turn, run.mirror),
                target,
                fallback=cpu_fallback,
            )
        result.timings = {"read": read_seconds, **result.timings, "total": result.timings["total"] + read_seconds}
        return result

    def to(self, device) -> "XctDiffPipeline":
        """Move every network to ``device`` (done by :meth:`reconstruct` as needed)."""
        device = torch.device(device)
        if device != self.device:
            for net in (self.vqgan, self.encoder, self.unet, self.style, self.coarse):
                if net is not None:
                    net.to(device)
            self.device = device
        return self

    # ---------------------------------------------------------------------------------- stages

    def preprocess(self, radiograph: Radiograph) -> np.ndarray:
        """The model's input image in [0, 1], ``xray_size``^2, before style transfer."""
        from .preprocess import preprocess_radiograph, square_pixels

        # the model's grid has square pixels: a film of other pixels would reach it stretched
        image01 = preprocess_radiograph(square_pixels(radiograph.image, radiograph.spacing)[0], PREPARED_SIZE)
        return area_resize(image01, self.info.xray_size)

    def stand_up(self, radiograph: Radiograph, turn: str = "none", mirror: bool = False) -> tuple:
        """``(radiograph, model input, quarter turns applied, notes)``: the film flipped left to right when
        ``mirror``, then turned as ``turn`` names (:data:`~XctDiffCore.options.TURNS`; ``auto``: the turn the
        plausibility checks name, :func:`~XctDiffCore.plausibility.head_up_turn`, with a note saying so; none for
        a film whose DICOM header says it is a lateral view or another body part)."""
        from .preprocess import turn_film

        if mirror:
            radiograph = turn_film(radiograph, 0, mirror=True)
        input01 = self.preprocess(radiograph)
        if turn == "auto":  # a film whose header says lateral or another body part is no chest on its side
            quarter_turns = 0 if view_problems(radiograph.header) else head_up_turn(input01)
        else:
            quarter_turns = TURNS[turn]
        if not quarter_turns:
            return radiograph, input01, 0, []
        radiograph = turn_film(radiograph, quarter_turns)
        notes = []
        if turn == "auto":
            notes.append(f"the film looked {'upside down' if quarter_turns == 2 else 'turned on its side'}: it was "
                         f"turned {TURN_PHRASES[quarter_turns]} before reconstructing (turn auto); check the result's "
                         "orientation")
            warn_caller(notes[-1], PlausibilityWarning)
        return radiograph, self.preprocess(radiograph), quarter_turns, notes

    @staticmethod
    def _flag(problems: list, strict: bool = False) -> list:
        """Each reason of the plausibility checks warned once and returned (for ``result.warnings``); with
        ``strict``, the first one is an XctDiffError instead (the adult-size reasons are never refused)."""
        if problems and strict:
            raise XctDiffError(problems[0] + " (refused: strict)")
        for problem in problems:
            warn_caller(problem, PlausibilityWarning)
        return problems

    def apply_style(self, radiograph: Radiograph, image01: np.ndarray, style: str) -> tuple:
        """(image in [0, 1], whether the real -> DRR generator was applied)."""
        from .style import apply_style, should_apply_style

        if not should_apply_style(style, radiograph):
            return image01, False
        if self.style is None:
            if style == "on":
                raise XctDiffError(f"style transfer was asked for, but the model {self.info.model_id} has no style stage")
            if not self._warned_style:
                warn_caller(f"the model {self.info.model_id} has no style stage: the real radiograph goes in as it is",
                            StyleWarning)
                self._warned_style = True
            return image01, False
        return apply_style(self.style, image01).astype(np.float32), True

    def _set_memory_format(self, memory_format: torch.memory_format) -> None:
        """The 3D networks' weights in ``memory_format``: channels-last makes oneDNN's bf16 3D convolutions
        about 1.4x faster on a CPU (and fp32 ones slower, hence contiguous for fp32 and on CUDA)."""
        if memory_format != self._memory_format:
            for net in (self.vqgan, self.encoder, self.unet, self.coarse):
                for tensor in (*net.parameters(), *net.buffers()) if net is not None else ():
                    if tensor.dim() == 5:  # 3D convolution weights (Module.to refuses the 2D ones' 4-D)
                        tensor.data = tensor.data.contiguous(memory_format=memory_format)
            self._memory_format = memory_format

    def _autocast(self, device: torch.device):
        """bf16 autocast when this run computes in bf16 (:attr:`_amp_dtype`, set per run), else nothing."""
        dtype = self._amp_dtype
        return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _reconstruct_on(self, device, radiograph, steps, samples, seed, style, method, sampler, reporter,
                        cancel, guidance: float = 0.0, strict: bool = False, precision: str = "auto",
                        coarse_choice: str = "auto", ap_diameter: Optional[float] = None, turn: str = "none",
                        mirror: bool = False) -> Reconstruction:
        from .device import autocast_dtype, describe_device
        from .diffusion import sample
        from .metrics import ssim_2d

        ends = STAGE_END if method == "diffusion" else DIRECT_STAGE_END
        reporter.report(0.0, "preprocessing")
        timer = _Timer(device)
        self.to(device)
        self._amp_dtype = autocast_dtype(device, precision)
        self._set_memory_format(torch.channels_last_3d if self._amp_dtype is not None and device.type == "cpu"
                                else torch.contiguous_format)
        with torch.inference_mode():
            radiograph, input01, quarter_turns, turn_notes = self.stand_up(radiograph, turn, mirror)
            refusable, advisory = input_problems(radiograph, input01)
            notes, size_notes = turn_notes + self._flag(refusable, strict), self._flag(advisory)
            timer.lap("preprocessing")
            reporter.report(ends["preprocessing"], "style transfer")
            _check_cancel(cancel)

            input01, styled = self.apply_style(radiograph, input01, style)
            timer.lap("style")
            reporter.report(ends["style transfer"], "encoding")
            _check_cancel(cancel)

            x = torch.from_numpy(np.ascontiguousarray(input01) * 2.0 - 1.0).to(device)[None, None]  # (1, 1, S, S)
            with self._autocast(device):
                z = self.encoder(x)
                # the direct path's CT is blended with the coarse CT (learnt in HU), when the model has one
                use_coarse = self.coarse is not None and method == "direct" and coarse_choice == "auto"
                coarse = self.coarse(x).float() if use_coarse else None
            prior, _, codes = self.vqgan.quantize(z.float())  # (1, C, d, h, w), float32: codes are searched in fp32
            timer.lap("encoder")
            reporter.report(ends["encoding"], "sampling" if method == "diffusion" else "decoding")
            _check_cancel(cancel)

            if method == "diffusion":
                generator = torch.Generator("cpu").manual_seed(seed)
                start, span = ends["encoding"], ends["sampling"] - ends["encoding"]

                def on_step(fraction: float) -> None:
                    reporter.report(start + span * fraction, f"sampling {round(fraction * steps)}/{steps}")

                with self._autocast(device):
                    latents = sample(self._denoiser, prior, (samples, *prior.shape[1:]), self.schedule,
                                     sampler=sampler, steps=steps, generator=generator,
                                     progress=on_step, cancel=cancel)
                timer.lap("sampling")
            else:
                # the codebook entries themselves (the prior is them plus straight-through rounding), so the
                # decoding needs no second search
                latents = self.vqgan.quantizer.lookup(codes).expand(samples, *prior.shape[1:])
            reporter.report(ends["sampling"], "decoding")

            if guidance > 0 and notes:  # guidance would fit an implausible film: confident garbage
                notes.append("guidance skipped: the input failed the plausibility check")
                warn_caller(notes[-1], GuidanceWarning)
                guidance = 0.0
            film = x.float() * 0.5 + 0.5 if guidance > 0 else None  # the input in [0, 1], as the DRRs are compared
            scores = []  # each sample's consistency before guidance
            diameters = []  # with ap_diameter: each sample's own diameter before it was stretched
            mean_hu, std_hu = self._decode(latents, device, reporter, cancel, ends, film, guidance, timer, scores,
                                           quantized=method == "direct", coarse=coarse, ap_diameter=ap_diameter,
                                           diameters=diameters)
            if ap_diameter is not None and None in diameters:
                notes.append(f"the AP diameter was not applied to {diameters.count(None)} of {len(diameters)} "
                             "samples: no body crosses their mid-chest midline")
                warn_caller(notes[-1], APDiameterWarning)
            measured = [d for d in diameters if d is not None]  # the samples' own diameters, before the stretch
            unguided = float(np.mean(scores)) if scores else None
            guided = sum(score >= MIN_UNGUIDED_CONSISTENCY for score in scores)
            if scores and guided < len(scores):
                which = "" if guided == 0 else f" on {len(scores) - guided} of {len(scores)} samples"
                notes.append(f"guidance skipped{which}: the film agrees poorly with the unguided reconstruction "
                             f"(consistency {min(scores):.2f} < {MIN_UNGUIDED_CONSISTENCY}); it may not be a frontal "
                             "chest film the model can read, and fitting it would only make the result look consistent")
                warn_caller(notes[-1], GuidanceWarning)
            timer.lap("decoding")
            reporter.report(ends["decoding"], "consistency")
            _check_cancel(cancel)

            ct = self._volume(np.rint(mean_hu).astype(np.int16))
            drr = self.render_drr(ct, device)
            consistency = max(0.0, ssim_2d(drr, input01))  # SSIM < 0 (anti-correlated) means no agreement: 0
            timer.lap("consistency")
            # judged on the score before guidance: a guided DRR was fitted to the film and says nothing
            notes += self._flag(consistency_problems(consistency if unguided is None else unguided,
                                                     self.info.min_consistency), strict)
        reporter.report(1.0, "reconstructed")
        timings = timer.timings()
        if method == "diffusion":
            timings["sampling_per_step"] = timings["sampling"] / steps
        return Reconstruction(
            ct=ct,
            uncertainty=self._volume(std_hu.astype(np.float32)) if samples > 1 else None,
            consistency=consistency,
            timings=timings,
            device=describe_device(device),
            seed=seed,
            samples=samples,
            steps=steps if method == "diffusion" else None,
            method=method,
            styled=styled,
            input_image=input01.astype(np.float32),
            drr=drr,
            guidance=guidance * guided / len(scores) if scores else 0.0,  # the strength the mean CT received
            unguided_consistency=unguided,
            warnings=notes + size_notes,
            ap_diameter=ap_diameter,
            learnt_ap_diameter=float(np.mean(measured)) if measured else None,
            precision="bf16" if self._amp_dtype == torch.bfloat16 else "fp32",
            turn=TURN_NAMES[quarter_turns],
            mirrored=mirror,
            flops=timer.flops,
            flops_by_dtype=timer.flops_by_dtype,
            model=self.info,
        )

    def _decode(self, latents: torch.Tensor, device, reporter: _Progress, cancel, ends: dict = STAGE_END,
                film: Optional[torch.Tensor] = None, guidance: float = 0.0, timer: Optional["_Timer"] = None,
                scores: Optional[list] = None, quantized: bool = False, coarse: Optional[torch.Tensor] = None,
                ap_diameter: Optional[float] = None, diameters: Optional[list] = None) -> tuple:
        """Each latent -> codebook -> decoder -> HU (-> guided towards ``film``) -> canonical: the running mean
        and std over samples (Welford). With guidance, each sample's consistency before it goes to ``scores``.

        ``ends``: the progress scale of the method (:data:`STAGE_END` or :data:`DIRECT_STAGE_END`);
        ``timer``: gets a "decoding" and a "guidance" lap per sample when guiding; ``quantized``: the latents
        are codebook entries already (the direct path's prior), so the search is not repeated; ``coarse``: the
        coarse CT to blend into each decoded volume with weight :attr:`coarse_blend` (before guidance);
        ``ap_diameter``: each volume is stretched front to back to it (before guidance; its own diameter
        before goes to ``diameters``, None where it has no body to measure)."""
        from .models.coarse import blend_coarse
        from .layout import model_layout_to_ct, unit_to_hu

        count = latents.shape[0]
        start, span = ends["sampling"], ends["decoding"] - ends["sampling"]
        mean = m2 = None
        scores = [] if scores is None else scores
        for k in range(count):
            _check_cancel(cancel)
            z_q = latents[k : k + 1].float() if quantized else self.vqgan.quantize(latents[k : k + 1].float())[0]
            z_q = z_q.contiguous(memory_format=self._memory_format)
            with self._autocast(device):
                volume = self.vqgan.decode(z_q).float()  # (1, 1, D, H, W) in about [-1, 1]
            if volume.shape[-1] != OUTPUT_SIZE:
                volume = F.interpolate(volume, size=(OUTPUT_SIZE,) * 3, mode="trilinear", align_corners=False)
            if coarse is not None:
                volume = blend_coarse(volume, coarse, self.coarse_blend)
            hu_model = unit_to_hu(volume)
            if ap_diameter is not None:
                hu_model = self._fit_ap_diameter(hu_model, ap_diameter, [] if diameters is None else diameters)
            if guidance > 0 and film is not None:
                if timer is not None:
                    timer.lap("decoding")
                hu_model = self._guide(hu_model, film, guidance, scores, cancel)
                if timer is not None:
                    timer.lap("guidance")
            hu = model_layout_to_ct(hu_model[0, 0]).cpu().numpy().astype(np.float64)  # [z, y, x]
            if not np.all(np.isfinite(hu)):  # finite weights overflowing (fp16 on a GPU, a model pushed too far)
                raise XctDiffError("the networks produced NaN or infinite values for this film: the CT would be "
                                   "meaningless (try --precision fp32)")
            if mean is None:
                mean, m2 = np.zeros_like(hu), np.zeros_like(hu)
            delta = hu - mean
            mean += delta / (k + 1)
            m2 += delta * (hu - mean)
            reporter.report(start + span * (k + 1) / count, f"decoding {k + 1}/{count}")
        return mean, np.sqrt(m2 / count)

    @staticmethod
    def _fit_ap_diameter(hu_model: torch.Tensor, diameter_mm: float, diameters: list) -> torch.Tensor:
        """One decoded volume (model layout, HU) stretched front to back to ``diameter_mm``; its own before goes
        to ``diameters`` (:mod:`XctDiffCore.ap_diameter` works on ``[rows, AP, columns]``: D and H swapped)."""
        from .ap_diameter import fit_ap_diameter

        rows_ap_columns = hu_model[0, 0].transpose(0, 1).cpu().numpy()
        fitted, before = fit_ap_diameter(rows_ap_columns, diameter_mm, FIELD_OF_VIEW_MM / hu_model.shape[-1])
        diameters.append(before)
        return torch.from_numpy(np.ascontiguousarray(fitted.transpose(1, 0, 2)))[None, None].to(hu_model)

    def _guide(self, hu_model: torch.Tensor, film: torch.Tensor, guidance: float, scores: list, cancel) -> torch.Tensor:
        """One decoded sample guided towards the film; its consistency before guidance goes to ``scores``.

        Left as it is when that consistency shows a gross disagreement (the caller says so, once)."""
        from .drr import make_geometry
        from .guidance import film_drr, guide_to_film
        from .metrics import ssim_2d

        geometry, spacing = make_geometry(self.info.geometry), (FIELD_OF_VIEW_MM / OUTPUT_SIZE,) * 3
        drr = film_drr(hu_model, geometry, film.shape[-1], PREPARED_SIZE, spacing)
        score = max(0.0, ssim_2d(drr[0, 0].cpu().numpy(), film[0, 0].cpu().numpy()))
        scores.append(score)
        if score < MIN_UNGUIDED_CONSISTENCY:
            return hu_model
        return guide_to_film(hu_model, film, geometry, guidance, PREPARED_SIZE, spacing, cancel=cancel)

    @staticmethod
    def _volume(array: np.ndarray) -> Volume:
        """The output grid: canonical LPS, isotropic 2.5 mm (for 128^3), centred on the origin."""
        spacing = FIELD_OF_VIEW_MM / array.shape[0]
        origin = [-(n - 1) / 2.0 * spacing for n in array.shape[::-1]]  # (x, y, z)
        return Volume(array, (spacing,) * 3, origin, np.eye(3))

    def render_drr(self, ct: Volume, device=None) -> np.ndarray:
        """The DRR of a canonical CT as the model's input would look: ``xray_size``^2 in [0, 1].

        Rendered at 128 px in the training geometry, normalised (:func:`~XctDiffCore.drr.normalize_drr`,
        the rule of ``preprocess_radiograph``) and area-resized, exactly as the training DRRs were.
        """
        from .drr import make_geometry
        from .guidance import film_drr
        from .layout import ct_to_model_layout

        device = self.device if device is None else torch.device(device)
        volume = torch.from_numpy(np.ascontiguousarray(ct_to_model_layout(np.asarray(ct.array, dtype=np.float32))))
        sx, sy, sz = ct.spacing
        image = film_drr(volume[None, None].to(device), make_geometry(self.info.geometry), self.info.xray_size,
                         PREPARED_SIZE, spacing_mm=(sy, sz, sx))
        return image[0, 0].cpu().numpy().astype(np.float32)


_FLOP_COUNTER = None  # the _DtypeFlopCounter of counting_flops(), while one is active


def extra_flop_formulas() -> dict:
    """``FlopCounterMode(custom_mapping=...)`` for what torch's table lacks: the models' float32 CPU
    convolutions call oneDNN directly (:func:`XctDiffCore.models.blocks.conv3d`)."""
    from torch.utils.flop_counter import conv_flop_count

    def mkldnn_conv_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return conv_flop_count(x_shape, w_shape, out_shape)

    return {torch.ops.aten.mkldnn_convolution: mkldnn_conv_flop}


def _dtype_flop_counter():
    """A ``FlopCounterMode`` that also tallies each operation under the dtype it ran in (``by_dtype``).

    Why: on the CPU bf16 path the networks run in bf16 but the style generator in fp32, whose peak
    is half as high; a stage's distance to the hardware is its operations at each precision's own peak.
    The split hooks a private method of torch's counter: where a torch lacks it, ``by_dtype`` stays empty
    and the benchmark falls back to one peak."""
    from collections import Counter

    from torch.utils.flop_counter import FlopCounterMode

    extra = extra_flop_formulas()

    class _DtypeFlopCounter(FlopCounterMode):
        def __init__(self):
            super().__init__(display=False, custom_mapping=extra)
            self.by_dtype = Counter()

        def _count_flops(self, func_packet, out, args, kwargs):
            if func_packet in self.flop_registry:
                tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
                dtype = str(tensor.dtype).replace("torch.", "") if tensor is not None else "unknown"
                self.by_dtype[dtype] += self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            return super()._count_flops(func_packet, out, args, kwargs)

    return (_DtypeFlopCounter() if hasattr(FlopCounterMode, "_count_flops")
            else FlopCounterMode(display=False, custom_mapping=extra))


@contextlib.contextmanager
def counting_flops():
    """Inside: each reconstruction's ``flops`` holds the floating-point operations per stage (convolutions,
    matrix products, attention, as ``torch.utils.flop_counter`` counts them) and ``flops_by_dtype`` their
    split by precision, so ``xctdiff benchmark pipeline`` can print the achieved GFLOP/s and the share of
    peak beside each time. Slow: for one counting run, not timing."""
    global _FLOP_COUNTER
    counter = _dtype_flop_counter()
    with counter:
        _FLOP_COUNTER = counter
        try:
            yield counter
        finally:
            _FLOP_COUNTER = None


class _Timer:
    """Seconds per stage, with the device synchronised at each lap (CUDA runs asynchronously); the
    operations per stage too (in total and by dtype), inside :func:`counting_flops`."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.start = self.last = time.perf_counter()
        self.laps: dict = {}
        self.counter = _FLOP_COUNTER
        self.flops: dict = {}
        self.flops_by_dtype: dict = {}
        self.last_flops = self.counter.get_total_flops() if self.counter is not None else 0
        self.last_by_dtype = dict(getattr(self.counter, "by_dtype", {}))

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now
        if self.counter is not None:
            total = self.counter.get_total_flops()
            self.flops[name] = self.flops.get(name, 0) + total - self.last_flops
            self.last_flops = total
            by_dtype = dict(getattr(self.counter, "by_dtype", {}))
            stage = self.flops_by_dtype.setdefault(name, {})
            for dtype, count in by_dtype.items():
                if count - self.last_by_dtype.get(dtype, 0):
                    stage[dtype] = stage.get(dtype, 0) + count - self.last_by_dtype.get(dtype, 0)
            self.last_by_dtype = by_dtype

    def timings(self) -> dict:
        return {**self.laps, "total": self.last - self.start}


# ------------------------------------------------------------------------------------------ files


def default_output_path(input_path, output_format: Optional[str] = None) -> Path:
    """``<stem>_ct.nrrd`` beside the input (``chest.nii.gz`` -> ``chest_ct.nrrd``); another ``output_format``
    (:data:`CT_FORMATS`) gives its suffix, ``dicom`` the series folder ``<stem>_ct``."""
    from .io import film_stem

    output_format = output_format or "nrrd"
    path = Path(input_path)
    stem = film_stem(path)
    return path.with_name(f"{stem}_ct" if output_format == "dicom" else f"{stem}_ct.{output_format}")


def check_volume_output(path, output_format: Optional[str] = None) -> Path:
    """Refuse, before any work, an output whose folder is missing or whose type cannot hold a volume; with
    ``output_format`` (:data:`CT_FORMATS`) also one whose suffix says another format. ``dicom``: a series folder."""
    from .atomic import check_output_path, full_suffix
    from .io import VOLUME_WRITE_SUFFIXES

    if output_format is not None and output_format not in CT_FORMATS:
        raise XctDiffError(f"unknown CT format '{output_format}': use one of {', '.join(CT_FORMATS)}")
    suffix = full_suffix(Path(path)).lower()
    if output_format == "dicom":
        from .dicom_series import check_series_output

        if suffix in VOLUME_WRITE_SUFFIXES:
            raise XctDiffError(f"a DICOM series is a folder: give -o a folder name, not the {suffix} file {path}")
        return check_series_output(path)
    path = check_output_path(path)
    if suffix not in VOLUME_WRITE_SUFFIXES:
        raise XctDiffError(f"cannot write a volume as '{suffix or path.name}': use .nrrd, .nii, .nii.gz or .mha "
                           "(or --format dicom for a DICOM series folder)")
    if output_format is not None and suffix != f".{output_format}":
        raise XctDiffError(f"--format {output_format} but the output {path} is a {suffix} file")
    return path


def write_ct(result: "Reconstruction", path, output_format: Optional[str] = None, source=None,
             model: Optional[ModelInfo] = None) -> Path:
    """Write a reconstruction's CT: a volume file (by ``path``'s suffix), or with ``output_format="dicom"`` a
    DICOM series folder that joins the study of a DICOM ``source`` film; either way it records that it is
    synthetic, ``model`` (default: the one that made ``result``) and the settings (:func:`output_notes`)."""
    from .io import write_volume

    check_volume_output(path, output_format)  # an unknown format, or a suffix that says another one
    model = getattr(result, "model", None) if model is None else model
    notes = output_notes(result, model, source)
    if output_format != "dicom":
        return write_volume(result.ct, path, notes=notes)
    from .dicom_series import write_dicom_series

    made_by = f"XctDiff model {notes['model']}" if model is not None else "XctDiff"
    derivation = f"reconstructed from one radiograph by {made_by}: {notes['settings']}"
    return write_dicom_series(result.ct, path, source=source, derivation=derivation)


def output_notes(result: "Reconstruction", model: Optional[ModelInfo] = None, source=None,
                 uncertainty: bool = False) -> dict:
    """What a written CT (or, ``uncertainty``, its voxel-wise std over the samples) says about itself, so that it is
    never taken for a scan: :func:`XctDiffCore.io.write_volume` puts it in the header, ``inspect`` prints it."""
    from . import __version__
    from .io import SYNTHETIC

    model = getattr(result, "model", None) if model is None else model  # default: the model that made it
    model_name = f"{model.model_id} {model.version}" if model is not None else "not recorded"
    seed = f", seed {result.seed}, {result.steps} steps" if result.method == "diffusion" else ""
    what = "uncertainty (std over samples, HU) of a synthetic CT" if uncertainty else "synthetic CT"
    score = result.consistency  # a result made by hand may have none
    consistency = f", consistency {score:.3f}" if isinstance(score, (int, float)) else ""
    handled = turn_words(getattr(result, "turn", "none"), getattr(result, "mirrored", False))
    consistency += f", film {handled}" if handled else ""  # the CT of a film stood head up: say so
    return {"summary": f"XctDiff {what}, research use only: {model_name}, {result.method}",
            "note": f"voxel-wise std over the samples of a {SYNTHETIC}" if uncertainty else SYNTHETIC,
            "model": model_name, "engine": __version__,
            "settings": (f"{result.method} method{seed}, style {'on' if result.styled else 'off'}, guidance "
                         f"{result.guidance:g}{consistency}"),
            **(_film_notes(Path(source)) if isinstance(source, (str, Path)) else {})}


def _film_notes(source: Path) -> dict:
    """The film a CT was made from: its name, size and SHA-256, by which ``--skip-existing`` tells a film replaced
    since under the same name and an older date (``cp -p``, ``rsync -a``, an archive unpacked) from the one it was
    made of, even one of the same size (two exports' ``IM000001``)."""
    from .atomic import file_sha256

    notes = {"film": source.name}
    with contextlib.suppress(OSError):
        notes["film_bytes"] = str(source.stat().st_size)
        notes["film_sha256"] = file_sha256(source)
    return notes


WRITE_START = 0.97  # reconstruct_file's progress: the pipeline up to here, then writing


def _refuse_overlapping_outputs(input_path, outputs: list) -> None:
    """An output that is the input film (it would be replaced by a CT) or another output (one would replace the
    other), by file identity: links and ``./`` spellings count."""
    from .atomic import file_identity

    if isinstance(input_path, (str, Path)):
        source = file_identity(input_path)
        for out in outputs:
            if out is not None and file_identity(out) == source:
                raise XctDiffError(f"the output {out} is the input {input_path}: write it elsewhere")
    written = {}
    for out in outputs:
        if out is not None:
            other = written.setdefault(file_identity(out), out)
            if other is not out:
                raise XctDiffError(f"the outputs {other} and {out} are the same file")


def reconstruct_file(
    pipeline: XctDiffPipeline,
    input_path,
    output=None,
    uncertainty=None,
    views=None,
    output_format: Optional[str] = None,
    **options,
) -> tuple:
    """Reconstruct one radiograph file and write the CT (and the uncertainty, the views PNG), atomically.

    Output paths are checked before the (long) reconstruction; nothing is written when it fails or
    is cancelled, and the outputs replace earlier ones as a set (:func:`~XctDiffCore.atomic.output_set`).
    ``output_format``: one of :data:`CT_FORMATS` (default: ``output``'s suffix, else nrrd;
    ``dicom``: a DICOM series folder, see :func:`write_ct`). ``options`` go to
    :meth:`XctDiffPipeline.reconstruct` (the settings as ``options=``
    :class:`~XctDiffCore.options.ReconstructOptions` or as keywords). Returns (result, written paths).
    """
    from .atomic import check_output_path, output_set
    from .io import write_volume

    settings = options.pop("options", None)
    if settings is None:  # the settings given as keywords
        names = {f.name for f in dataclasses.fields(ReconstructOptions)}
        settings = ReconstructOptions(**{name: options.pop(name) for name in list(options) if name in names})
    options["options"] = settings
    output = check_volume_output(default_output_path(input_path, output_format) if output is None else output,
                                 output_format)
    if uncertainty is not None:
        uncertainty = check_volume_output(uncertainty)
        if settings.samples < 2:
            raise XctDiffError("an uncertainty map needs --samples 2 or more")
    if views is not None:
        views = check_output_path(views)
        if Path(views).suffix.lower() != ".png":
            raise XctDiffError(f"the views image must be a .png file, got {views}")
    _refuse_overlapping_outputs(input_path, [output, uncertainty, views])
    progress = options.pop("progress", None)
    if progress is not None:
        options["progress"] = lambda fraction, stage: progress(WRITE_START * fraction, stage)
    result = pipeline.reconstruct(input_path, **options)
    _check_cancel(options.get("cancel"))  # a cancel during the last stage: still nothing written
    if progress is not None:
        progress(WRITE_START, "writing")
    start = time.perf_counter()
    with output_set():  # all written before any is renamed: never a new CT beside an earlier run's views
        written = [write_ct(result, output, output_format, source=input_path, model=pipeline.info)]
        if uncertainty is not None:
            notes = output_notes(result, pipeline.info, input_path, uncertainty=True)
            written.append(write_volume(result.uncertainty, uncertainty, notes=notes))
        if views is not None:
            from .figures import write_reconstruction_views

            written.append(write_reconstruction_views(result, views))
    result.timings["write"] = time.perf_counter() - start
    if progress is not None:
        progress(1.0, "written")
    return result, written
