"""The settings of one reconstruction, defined, defaulted and checked in one place. Torch-free.

Every front door builds a :class:`ReconstructOptions`: the command line (:meth:`add_arguments`,
:meth:`from_args`), the Python API (:meth:`XctDiffPipeline.reconstruct` turns its keywords into
one), the file-level job and the Slicer module, which passes it to its child process as
:meth:`to_argv` (so the panel and the engine cannot disagree on a name, a default or a range).
Checks that need no model happen when the object is made (:class:`XctDiffError` with one sentence);
the one that needs the model (the number of diffusion steps it was trained with) and the defaults
it supplies happen in :meth:`for_model`.
"""
from __future__ import annotations

import dataclasses
import numbers
import re
from dataclasses import dataclass
from typing import Optional

from .config import METHODS, SAMPLERS
from .errors import XctDiffError, warn_caller

MAX_SAMPLES = 64
STYLE_CHOICES = ("auto", "on", "off")
PRECISIONS = ("auto", "fp32", "bf16")
COARSE_CHOICES = ("auto", "off")
CT_FORMATS = ("nrrd", "nii.gz", "nii", "mha", "dicom")  # --format: a file of that suffix, or a DICOM series folder
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
MAX_GUIDANCE = 1.0
AP_DIAMETER_MM = (100.0, 300.0)  # a newborn's chest to a large adult's; the CT is a 320 mm cube
# --turn: quarter turns anticlockwise (np.rot90's k) that stand the film head up; auto: what the checks say
TURNS = {"none": 0, "auto": None, "anticlockwise": 1, "half": 2, "clockwise": 3}
TURN_NAMES = {k: name for name, k in TURNS.items() if k is not None}  # quarter turns -> --turn's name
TURN_PHRASES = {1: "a quarter anticlockwise", 2: "half round", 3: "a quarter clockwise"}


def turn_words(turn: str, mirrored: bool) -> str:
    """How the film was flipped and turned before reconstructing ("mirrored and turned half round"), or ""."""
    words = (["mirrored"] if mirrored else []) + ([f"turned {TURN_PHRASES[TURNS[turn]]}"] if TURNS.get(turn) else [])
    return " and ".join(words)


class MethodWarning(UserWarning):
    """A setting that the chosen method does not use (steps or sampler with the direct method)."""


@dataclass(frozen=True)
class ReconstructOptions:
    """One reconstruction's settings; None means "the model's default"."""

    steps: Optional[int] = None  # diffusion sampler steps (the direct path has none)
    samples: int = 1  # CTs sampled and averaged; 2 or more choose the diffusion and give an uncertainty map
    seed: Optional[int] = None  # None: drawn at random (and reported, so the run can be repeated)
    device: str = "auto"  # auto (CUDA when usable, else CPU), cpu, cuda, cuda:N
    style: str = "auto"  # real -> DRR style transfer: auto = on for real films, off for DRRs
    method: Optional[str] = None  # diffusion or direct; None: the model's default (diffusion for samples >= 2)
    sampler: Optional[str] = None  # ddim or dpm-solver++; None: the model's default
    guidance: float = 0.0  # data consistency, 0 (off) to 1 (XctDiffCore.guidance)
    strict: bool = False  # refuse a film that fails the plausibility check, or a result flagged unreliable, instead of warning
    precision: str = "auto"  # auto (bf16 where the device computes it natively and it was measured harmless), fp32, bf16
    coarse: str = "auto"  # auto: the direct path averages in the model's coarse CT when it has one; off: the decoder alone
    ap_diameter: Optional[float] = None  # the chest's front-to-back diameter in mm when known (XctDiffCore.ap_diameter)
    turn: str = "none"  # stand the film head up first: TURNS' names; auto: the turn the plausibility checks name
    mirror: bool = False  # flip the film left to right first (a film saved mirrored), before any turn

    def __post_init__(self):
        for name in ("steps", "samples", "seed"):
            self._whole_number(name)
        if self.steps is not None and self.steps < 1:
            raise XctDiffError(f"steps must be at least 1, got {self.steps}")
        if not 1 <= self.samples <= MAX_SAMPLES:
            raise XctDiffError(f"samples must be between 1 and {MAX_SAMPLES}, got {self.samples}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise XctDiffError(f"seed must fit in 64 bits, got {self.seed}")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.match(self.device.strip().lower()):
            raise XctDiffError(f"unknown device {self.device!r}; choose auto, cpu, cuda or cuda:N")
        object.__setattr__(self, "device", self.device.strip().lower())  # " CUDA:0\n" is cuda:0, said as such
        for name in ("strict", "mirror"):
            if not isinstance(getattr(self, name), bool):  # strict="false" would switch it on
                raise XctDiffError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.turn not in TURNS:
            raise XctDiffError(f"turn must be one of {', '.join(TURNS)}, got {self.turn!r}")
        if self.style not in STYLE_CHOICES:
            raise XctDiffError(f"style must be one of {', '.join(STYLE_CHOICES)}, got {self.style!r}")
        if self.coarse not in COARSE_CHOICES:
            raise XctDiffError(f"coarse must be one of {', '.join(COARSE_CHOICES)}, got {self.coarse!r}")
        if self.precision not in PRECISIONS:
            raise XctDiffError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.method is not None and self.method not in METHODS:
            raise XctDiffError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise XctDiffError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.method == "direct" and self.samples > 1:
            raise XctDiffError(f"the direct method makes one deterministic CT, not {self.samples} samples: "
                               "use method='diffusion' (--method diffusion) for several")
        object.__setattr__(self, "guidance", check_guidance(self.guidance))
        object.__setattr__(self, "ap_diameter", check_ap_diameter(self.ap_diameter))

    def _whole_number(self, name: str) -> None:
        """``name`` as a Python int (numpy integers too), None where allowed, or a readable error."""
        value = getattr(self, name)
        if value is None and name != "samples":
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise XctDiffError(f"{name} must be a whole number, got {value!r}")
        object.__setattr__(self, name, int(value))

    # ------------------------------------------------------------------------------ with a model

    def for_model(self, default_method: str, default_sampler: str, default_steps: int,
                  num_train_steps: int) -> "ReconstructOptions":
        """The options with the model's defaults filled in and checked against it; warns (:class:`MethodWarning`)
        when steps or a sampler are given to the direct method, which does not use them."""
        method = self.method or ("diffusion" if self.samples > 1 else default_method)
        steps = default_steps if self.steps is None else self.steps
        if not 1 <= steps <= num_train_steps:
            raise XctDiffError(f"steps must be between 1 and {num_train_steps}, got {steps}")
        unused = [name for name, value in (("number of steps", self.steps), ("sampler", self.sampler)) if value is not None]
        if method == "direct" and unused:
            warn_caller(f"the direct method does not sample: the {' and the '.join(unused)} given "
                        f"{'is' if len(unused) == 1 else 'are'} ignored (--method diffusion uses them)", MethodWarning)
        return dataclasses.replace(self, method=method, steps=steps, sampler=self.sampler or default_sampler)

    # ------------------------------------------------------------------------------ command line

    def to_argv(self) -> list:
        """The ``xctdiff reconstruct`` options that give these settings (defaults left out)."""
        argv = ["--samples", str(self.samples), "--device", self.device, "--style", self.style]
        for flag, value in (("--steps", self.steps), ("--seed", self.seed), ("--method", self.method),
                            ("--sampler", self.sampler)):
            if value is not None:
                argv += [flag, str(value)]
        if self.guidance > 0:
            argv += ["--guidance", f"{self.guidance:g}"]
        if self.strict:
            argv.append("--strict")
        if self.precision != "auto":
            argv += ["--precision", self.precision]
        if self.coarse != "auto":
            argv += ["--coarse", self.coarse]
        if self.ap_diameter is not None:
            argv += ["--ap-diameter", f"{self.ap_diameter:g}"]
        if self.turn != "none":
            argv += ["--turn", self.turn]
        if self.mirror:
            argv.append("--mirror")
        return argv

    @classmethod
    def from_args(cls, args) -> "ReconstructOptions":
        """From the namespace of a parser that :meth:`add_arguments` filled."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @staticmethod
    def add_arguments(parser) -> None:
        """The reconstruction options of ``xctdiff reconstruct`` (one definition: names, defaults, help)."""
        parser.add_argument("--steps", type=int, help="sampler steps of the diffusion (default: the model's; the direct "
                            "method has none)")
        parser.add_argument("--samples", type=int, default=1, help="samples averaged into the CT (default 1); 2 or more "
                            "choose the diffusion method (whatever the model's default) and allow --uncertainty")
        parser.add_argument("--seed", type=int, help="random seed (default: random; the summary line and RESULT report it)")
        parser.add_argument("--device", default="auto", help="auto (CUDA when usable, else CPU), cpu, cuda or cuda:N")
        parser.add_argument("--style", choices=STYLE_CHOICES, default="auto",
                            help="real -> DRR style transfer: auto = on for real films, off for DRRs")
        parser.add_argument("--method", choices=METHODS, help="diffusion (XctDiff), or direct: encoder prior decoded "
                            "without diffusion (default: the model's)")
        parser.add_argument("--sampler", choices=SAMPLERS, help="diffusion sampler (default: the model's, DDIM)")
        add_guidance_argument(parser)
        add_precision_argument(parser)
        parser.add_argument("--coarse", choices=COARSE_CHOICES, default="auto",
                            help="the direct path of a model with a coarse CT stage averages it in (auto, default: "
                            "closer to the truth voxel by voxel, smoother); off: the decoded CT alone (sharper)")
        parser.add_argument("--ap-diameter", type=float, metavar="MM", dest="ap_diameter",
                            help="the chest's front-to-back diameter at mid-chest, sternum to the skin over the spine, "
                            f"when known ({AP_DIAMETER_MM[0]:g}-{AP_DIAMETER_MM[1]:g} mm: a caliper, a lateral film, an earlier CT): the CT is "
                            "stretched front to back to it; a frontal film does not show it (default: the depth the "
                            "model learnt; for a folder, every film gets this one)")
        parser.add_argument("--turn", choices=tuple(TURNS), default="none",
                            help="stand the film head up before reconstructing: a quarter turn anticlockwise or "
                            "clockwise, or half round; auto: the turn the plausibility check names for a film on its "
                            "side or upside down, none for one upright (it never mirrors; for a folder, each film its own); default "
                            "none: such a film is only warned about")
        parser.add_argument("--mirror", action="store_true", help="flip the film left to right before reconstructing "
                            "(a film saved mirrored; before --turn); the check cannot tell it from dextrocardia, so "
                            "this is never automatic")
        parser.add_argument("--strict", action="store_true", help="refuse a film that fails the plausibility check "
                            "(inverted, lateral, not a chest) or whose result's consistency is below the reliability "
                            "threshold, instead of warning; in a folder it is skipped and counted")


def add_guidance_argument(parser) -> None:
    parser.add_argument("--guidance", type=float, default=0.0, metavar="STRENGTH",
                        help="data consistency: move each decoded CT until its DRR matches the film; the fraction of "
                        "that correction applied, 0 (off, default) to 1 (2-10 s more on a 2-core CPU)")


def add_precision_argument(parser) -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="arithmetic of the networks: auto (bf16 on a GPU and, where measured harmless, on a CPU "
                        "with native bf16; else fp32), fp32, or bf16 (default auto)")


def check_guidance(strength) -> float:
    """``strength`` as a float in [0, 1], or an :class:`XctDiffError` naming the range."""
    return _number_in_range(strength, 0.0, MAX_GUIDANCE,
                            f"guidance must be a number between 0 (off) and {MAX_GUIDANCE:g}, got {strength!r}",
                            f"guidance must be between 0 (off) and {MAX_GUIDANCE:g}, got {strength!r}")


def check_ap_diameter(value) -> Optional[float]:
    """``value`` (mm) as a float in :data:`AP_DIAMETER_MM`, None for "not known", or an :class:`XctDiffError`."""
    low, high = AP_DIAMETER_MM
    message = (f"ap_diameter must be the chest's front-to-back diameter in mm, between {low:g} and {high:g} "
               f"(the CT is a 320 mm cube), got {value!r}")
    return None if value is None else _number_in_range(value, low, high, message, message)


def _number_in_range(value, low: float, high: float, not_a_number: str, out_of_range: str) -> float:
    """``value`` as a float in [low, high] (a bool is no number; NaN is out of range), else XctDiffError."""
    if isinstance(value, bool):
        raise XctDiffError(not_a_number)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise XctDiffError(not_a_number) from None
    if not low <= number <= high:  # NaN fails this too
        raise XctDiffError(out_of_range)
    return number
