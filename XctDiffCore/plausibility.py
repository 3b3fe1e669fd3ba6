"""Is the input a frontal chest film in the grey scale the model knows? A cheap check before reconstructing.

A model trained on PA DRRs turns anything into a chest, silently: a negative (a film wrongly
labelled MONOCHROME1 is inverted by a correct reader), a lateral view or a photograph comes out as
a confident-looking CT, with a consistency score no lower than that of a real film. Guidance would
then fit that garbage. So the pipeline looks first for the one pattern every frontal chest film
shares, whatever its exposure, age or disease: **the middle (spine and mediastinum) is brighter than
each lung field**. On the preprocessed input (128 px, [0, 1], border cropped) it takes the medians
of three boxes over rows 30-70 % (a central band of columns 44-56 % and the two lung bands 20-38 % and
62-80 %); ``chest_contrast`` is the smaller of the two differences centre - lung.

Measured (``../shared/data``, preprocessed as the pipeline does;
``python Testing/Scripts/plausibility_survey.py`` re-measures it):

- 604 real films (600 random Kermany pediatric AP films, the 2 NIH PA films, the RSNA DICOM, the
  bundled RG1 film): none flagged; the lowest contrast 0.008, the 1st percentile 0.039;
- the same films inverted: all flagged (highest -0.092); the wrongly-MONOCHROME1 DICOM: -0.42;
- frontal DRRs of the 19 shared CTs: 18 pass (> 0.06); the IBSI phantom, not a chest, is flagged;
- lateral DRRs of the 19 shared CTs: 17 flagged; LIDC-IDRI-0001 (0.009) and the phantom (0.012)
  pass: a lateral view can have a bright middle too (the frontal-view check below flags them);
- 18 scikit-image sample photographs: 16 flagged; a clock face and a stained tissue section pass.

A flagged film is a warning (an error with ``strict``), not a
verdict: the check says "this does not look like what the model was trained on", nothing more.

**Orientation** (in :func:`film_problems`, for a film that passes the contrast check). A film hung upside
down, turned half round or mirrored (a flipped scan, a photograph of a film from behind) is still a chest
with a bright middle, and the model reconstructs it upside down or mirrored. Two linear checks look at what
a flip reverses, the film's 8 x 8 thumbnail minus its mirror image (:func:`orientation_features`): a flip
negates their scores exactly (about 1 for a typical film, -1 flipped). Their weights and thresholds are in
``plausibility_orientation.json``, fitted on the 1,600 Kermany training films (Fisher's discriminant; the
threshold at most 0.5 % of those films flagged) by ``python Testing/Scripts/orientation_weights.py``,
which re-measures (2026-12-07), on films it was not fitted on:

- 624 Kermany test films: 1 flagged as they are (mirrored); upside down 624 flagged, turned half round
  624, mirrored 577 (92 %);
- the 4 adult films (2 NIH, the RSNA DICOM, RG1): none flagged as they are; upside down and turned 4 of 4,
  mirrored 3 of 4 (RG1's mirror image passes);
- frontal DRRs of the 19 shared CTs: 2 flagged, the IBSI phantom (contrast) and chest_pe_stepha10, a 76 mm
  slab of a chest (upside down); upside down 17 of the other 17 whole or partial chests, mirrored 14 of 17.

The mirror check is the weaker (the heart's shadow is the only left-right cue at 8 x 8) and a patient
whose heart is on the right (dextrocardia) looks mirrored to it: its message says both.

A film **turned a quarter** (on its side) fails the contrast check only three times in four (a child's
film on its side often has a bright middle band too), and then with a reason that names no turn.
:func:`quarter_turn` asks whether turning it back a quarter, either way, raises the chest contrast by more
than :data:`QUARTER_TURN_MARGIN` (0.05: the largest margin that finds all of 600 training films turned
either way; none of them upright is flagged at any margin tried) to a passing one, into a film the
upside-down check calls upright, and says which way to turn it; a film that inverted would pass the
contrast check is left to that check's message (without this rule 50 of 1,224 Kermany negatives were called
on their side). Measured: of the 624 Kermany test films turned a quarter anticlockwise, 600 are called on
their side (all 624 flagged); clockwise 604 (619 flagged); the 4 adult films 4 of 4 either way; the 19
frontal DRRs 16 of 19 either way, and as they are only the 76 mm slab; no negative. With these checks all
18 photographs above are flagged (16 by the contrast check alone).

**Turning it back** (``turn="auto"``, :func:`head_up_turn`): a film these checks call on its side or upside
down is turned as they say before reconstructing (never mirrored). Measured by the same script: of the 624
Kermany test films, as they are or mirrored none is turned; turned half round or flipped upside down 623 are
turned half round (the flipped ones then stay mirrored, and the mirror check says so); turned a quarter
anticlockwise 600 are turned back, 1 wrongly (half round), clockwise 604, none wrongly; the rest are left as
they are, with their warning. The 4 adult films: every change undone. The 19 frontal DRRs: 16-17 of 19 each
way; the 76 mm slab is turned as it is.

**A lateral view or a cross-section** (:func:`looks_frontal`, in :func:`film_problems` after the contrast
check). A lateral view whose middle is bright (the sample CT's, LIDC-IDRI-0001) and about a third of axial CT
slices saved as pictures pass the contrast check; three lateral DRRs were called on their side, and ``--turn auto``
turned them into films that passed every check. The frontal-view check is a linear discriminant on
:func:`view_features` (a 16 x 16 thumbnail, blind to which side a lateral is seen from), fitted by
``python Testing/Scripts/view_weights.py --write XctDiffCore/plausibility_view.json`` on the 1,600 Kermany
training films and the frontal DRRs of random variants of the 15 training CTs of the shared_whole_chest split
(films and DRRs weighing alike) against the lateral DRRs and axial slices of the same variants; its threshold
flags at most 0.5 % of those films and 2 % of those DRRs (partial chests). Measured on what it was not fitted on
(2026-12-07): 1 of the 624 Kermany test films (a film no other check flagged), none of the 4 adult films, none of
the 20 frontal DRRs of the 4 validation patients' variants; their lateral DRRs 40 of 40 flagged by the checks
together, axial slices 58 of 59 (the 24 the other checks let through or called on their side: 22 caught by this
check, 23 flagged in all). A film turned half round is judged as the upside-down check finds it, and a film
called on its side must, turned back, score at least :data:`QUARTER_TURN_FRONTAL` (real films: 0.5th percentile
0.37-0.39; the laterals that rule would turn: 0.0-0.27). With it (``plausibility_survey.py``): the 19 shared CTs'
lateral DRRs 19 flagged, none called on its side or turned by ``--turn auto``; ``orientation_weights.py``: of the 624
Kermany test films turned a quarter, 599 and 603 called on their side (600 and 604 before), the rest flagged.

**Consistency** (:func:`consistency_problems`). After reconstructing, the pipeline scores how well the
DRR of the result matches the input (SSIM); below the model's ``min_consistency`` (its manifest; a
property of the model, since every model scores differently) the result is flagged as unreliable (a
warning, an error with ``strict``); a model without one flags nothing. The bundled xctdiff-cpu has
0.5, from these scores (default path, seed 0; ``python Testing/Scripts/consistency_survey.py --style
auto --threshold 0.5`` re-measures them, for any model folder with ``--model``):

- with its style stage (0.4.0, the default for real films): 64 real frontal films (60 random Kermany
  test films, the 2 NIH films, the RSNA DICOM, RG1) 0.601 to 0.798: none flagged; 18 scikit-image
  photographs 0.302 to 0.823, median 0.582: 5 flagged (with the contrast check, 16 of 18 are caught);
  the 64 films inverted: 0.466 to 0.662, 3 flagged;
- without it (0.3.0, or ``--style off``): 34 real films 0.519 to 0.797 (but 2 of 60 Kermany test films
  scored 0.45 and 0.48: ``--style off`` on a real film can be flagged); frontal DRRs of the 19 shared
  CTs 0.768 to 0.908; photographs 15 of 18 flagged; lateral DRRs 0.626 to 0.819, none flagged.

The score cannot tell a negative or a lateral view from a frontal film (the model draws a chest whose
DRR resembles either): the contrast check above is what catches those.

**Size** (:func:`size_problems`). The model was trained on adult chests and always reconstructs an
adult-sized chest in its 320 mm cube: the film is cropped and rescaled to the model's input, so a
child's film comes out adult-sized. When the file says so, the pipeline warns (never refuses: the
film itself is fine): a DICOM Patient's Age under 16 years, or a pixel spacing by which the whole
film is under 250 mm on its longer side (adult chest films are 350-430 mm; 18 x 24 cm and 24 x 30 cm
cassettes are children's). A resized image that kept its original pixel spacing (the RSNA sample of
``../shared/data``: 1024 px at 0.168 mm, 172 mm, for a 62-year-old) is flagged too, and the warning
names both causes. A PNG or JPEG records neither age nor spacing: nothing can be said, and nothing is.

**The DICOM header** (:func:`view_problems`, :func:`processing_problems`). A DICOM film says what it shows,
and where it does the pipeline believes it before any pixel: a View Position of LL or RL (lateral) or RLO or
LLO (oblique), or a Body Part Examined that is a part other than the chest (a defined term such as KNEE or
SKULL; free text the check does not know, "PORT CHEST" say, passes), or a Secondary Capture's Conversion Type
that is no film (WSD, a workstation's screenshot such as a dose sheet; SD, a scanned document; DRW; SYN: a
digitized film, DF, passes), is flagged like a film that fails the contrast check (an error with ``strict``). The contrast check let 2 of 19 lateral DRRs through; the header
lets none through that says it is lateral. A film marked For Processing (Presentation Intent Type: the
detector's raw image, before the processing that makes it the film a radiologist reads) gets a warning and
is never refused: its contrast is not the one the model was trained on.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

CHEST_CONTRAST_MIN = 0.0  # a film at or below is flagged
ADULT_AGE_YEARS = 16.0  # a younger patient gets the adult-size warning
SMALL_FILM_MM = 250.0  # a whole film shorter than this on its longer side gets it too
ROWS = (0.30, 0.70)
CENTRE_COLUMNS = (0.44, 0.56)
LUNG_COLUMNS = ((0.20, 0.38), (0.62, 0.80))
# the linear orientation checks' weights, thresholds and provenance (Testing/Scripts/orientation_weights.py)
ORIENTATION_FILE = Path(__file__).with_name("plausibility_orientation.json")
# the frontal-view check's weights, bias and threshold (Testing/Scripts/view_weights.py)
VIEW_FILE = Path(__file__).with_name("plausibility_view.json")
VIEW_THUMBNAIL = 16  # the frontal-view check looks at a 16 x 16 thumbnail
THUMBNAIL = 8  # the orientation checks look at an 8 x 8 thumbnail of the preprocessed film
QUARTER_TURN_MARGIN = 0.05  # a quarter turn that raises the chest contrast by more than this: the film is on its side
# ... and turned, it must look frontal by this much (a real film's frontal-view score: 0.5th percentile 0.37-0.39;
# lateral DRRs that the contrast rule would turn: 0.0-0.27)
QUARTER_TURN_FRONTAL = 0.3


LATERAL_VIEWS = {"LL": "lateral", "RL": "lateral", "LATERAL": "lateral", "LLO": "oblique", "RLO": "oblique"}
# Secondary Capture Conversion Types (PS3.3 C.8.6.1) of an image that is no film: a screenshot, a scan of a document
NOT_FILM = {"WSD": "a workstation's screen capture", "SD": "a scanned document", "DRW": "a drawing",
            "SYN": "a synthetic image"}
# DICOM defined terms for Body Part Examined (PS3.16 Annex L) that are not the chest
NOT_CHEST = {
    "ABDOMEN", "ANKLE", "ARM", "CSPINE", "CLAVICLE", "ELBOW", "EXTREMITY", "FINGER", "FOOT", "FOREARM", "HAND",
    "HEAD", "HEEL", "HIP", "JAW", "KNEE", "LEG", "LSPINE", "PELVIS", "SACRUM", "SKULL", "SSPINE", "THUMB", "TOE",
    "WRIST", "BREAST", "FEMUR", "HUMERUS", "TIBIA", "FIBULA", "NECK", "SELLA", "SINUS", "ORBIT", "TMJ", "COCCYX",
}


class PlausibilityWarning(UserWarning):
    """The input does not look like a frontal chest film in the grey scale the model was trained on."""


def chest_contrast(image01: np.ndarray) -> float:
    """min(median(centre) - median(lung)) over the two lung bands of a preprocessed film ``[row, col]`` in [0, 1]."""
    image = np.asarray(image01, dtype=np.float32)
    rows, cols = image.shape
    band = image[int(ROWS[0] * rows): int(ROWS[1] * rows)]
    box = lambda span: band[:, int(span[0] * cols): int(span[1] * cols)]  # noqa: E731
    centre = float(np.median(box(CENTRE_COLUMNS)))
    return min(centre - float(np.median(box(span))) for span in LUNG_COLUMNS)


def thumbnail(image01: np.ndarray, size: int = THUMBNAIL) -> np.ndarray:
    """The film's ``size`` x ``size`` block means, over their norm (blind to overall brightness)."""
    image = np.asarray(image01, dtype=np.float32)
    rows, cols = (n - n % size for n in image.shape)
    thumb = image[:rows, :cols].reshape(size, rows // size, size, cols // size).mean(axis=(1, 3))
    return thumb / (float(np.linalg.norm(thumb)) + 1e-6)


def orientation_features(image01: np.ndarray, axis: int) -> np.ndarray:
    """What a flip reverses: the film's 8 x 8 thumbnail minus its mirror image along ``axis`` (0: top to bottom,
    1: left to right), one half of it (the other half is its negative), over the thumbnail's norm."""
    thumb = thumbnail(image01)
    half = (thumb - np.flip(thumb, axis))[: THUMBNAIL // 2] if axis == 0 else \
        (thumb - np.flip(thumb, axis))[:, : THUMBNAIL // 2]
    return half.ravel()


def view_features(image01: np.ndarray) -> np.ndarray:
    """What tells a frontal film from a lateral view or a cross-section, whichever side it is seen from: the
    16 x 16 thumbnail's mirror-symmetric half, then the size of its antisymmetric half (a lateral view has its
    spine at one edge, a frontal film in the middle)."""
    thumb = thumbnail(image01, VIEW_THUMBNAIL)
    mirror = np.fliplr(thumb)
    half = VIEW_THUMBNAIL // 2
    return np.concatenate([((thumb + mirror) / 2)[:, :half].ravel(), np.abs(thumb - mirror)[:, :half].ravel()])


@functools.lru_cache(maxsize=1)
def orientation_checks() -> dict:
    """{"up_down" | "left_right": (weights, threshold)} from :data:`ORIENTATION_FILE`."""
    checks = json.loads(ORIENTATION_FILE.read_text(encoding="utf-8"))["checks"]
    return {name: (np.asarray(check["weights"], dtype=np.float32), float(check["threshold"]))
            for name, check in checks.items()}


@functools.lru_cache(maxsize=1)
def view_check() -> tuple:
    """(weights, bias, threshold) of the frontal-view check, from :data:`VIEW_FILE`."""
    check = json.loads(VIEW_FILE.read_text(encoding="utf-8"))
    return np.asarray(check["weights"], dtype=np.float32), float(check["bias"]), float(check["threshold"])


def frontal_score(image01: np.ndarray) -> float:
    """Above 0 for a typical frontal chest film, below for a lateral view or an axial CT slice (either side)."""
    weights, bias, _ = view_check()
    return float(view_features(image01) @ weights + bias)


def looks_frontal(image01: np.ndarray) -> bool:
    """Whether the frontal-view check passes the film, or, where the upside-down check finds it more likely upside
    down than not, the film turned half round (a frontal film upside down, which that check names)."""
    image = np.asarray(image01)
    if frontal_score(image) >= view_check()[2]:
        return True
    return orientation_scores(image)["up_down"] < 0 and frontal_score(np.rot90(image, 2)) >= view_check()[2]


def orientation_scores(image01: np.ndarray) -> dict:
    """{"up_down": s, "left_right": s}: about 1 for a typical film the right way round, about -1 for one flipped
    (a flip negates the features, so it negates the score)."""
    return {name: float(orientation_features(image01, 0 if name == "up_down" else 1) @ weights)
            for name, (weights, _) in orientation_checks().items()}


def quarter_turn(image01: np.ndarray) -> tuple:
    """``(k, contrast)`` when ``np.rot90(image01, k)`` (k = 1: a quarter turn anticlockwise, 3: clockwise) stands the
    film head up: that turn raises the chest contrast by more than :data:`QUARTER_TURN_MARGIN`, to one that passes,
    and the upside-down check finds it upright, and the film is not more likely a negative (inverted, it would pass
    the contrast check); else ``(0, None)``."""
    own, best = chest_contrast(image01), (0, None)
    if chest_contrast(1.0 - np.asarray(image01)) > CHEST_CONTRAST_MIN:  # a negative: the contrast check says so
        return best
    for k in (1, 3):
        turned = np.rot90(np.asarray(image01), k)
        contrast = chest_contrast(turned)
        if contrast > max(own + QUARTER_TURN_MARGIN, CHEST_CONTRAST_MIN) and (best[1] is None or contrast > best[1]) \
                and orientation_scores(turned)["up_down"] > 0 and frontal_score(turned) >= QUARTER_TURN_FRONTAL:
            best = (k, contrast)
    return best


def upside_down(image01: np.ndarray) -> bool:
    """Whether a film that passes the contrast check stands on its head (the upside-down check)."""
    return chest_contrast(image01) > CHEST_CONTRAST_MIN and \
        orientation_scores(image01)["up_down"] < orientation_checks()["up_down"][1]


def head_up_turn(image01: np.ndarray) -> int:
    """The quarter turns anticlockwise (``np.rot90``'s ``k``: 0 as it is, 1, 2 or 3) that stand the film head up,
    as the checks judge it: a film on its side (:func:`quarter_turn`), or one upside down (half round) unless a
    quarter turn either way would raise its chest contrast (then it may be on its side, where the upside-down
    check means nothing: 6 of 624 Kermany test films turned a quarter anticlockwise were turned half round
    without this rule, 1 with it); 0 leaves the film as it is, and its warning stands. What ``turn="auto"``
    applies. Never a mirror: a mirrored film and a patient with dextrocardia look alike."""
    turns = quarter_turn(image01)[0]
    if turns or not upside_down(image01) or not looks_frontal(image01):
        return turns
    own = chest_contrast(image01)
    return 0 if max(chest_contrast(np.rot90(np.asarray(image01), k)) for k in (1, 3)) > own else 2


def film_problems(image01: np.ndarray) -> list:
    """Readable reasons why the film looks implausible as a model input; empty when it passes."""
    contrast = chest_contrast(image01)
    turn, turned = quarter_turn(image01)
    if turn:
        way = "anticlockwise" if turn == 1 else "clockwise"
        return [f"the film looks turned on its side (chest contrast {contrast:.2f}; turned a quarter {way}, "
                f"{turned:.2f}): stand it head up, a quarter turn {way} (--turn {way}, or --turn auto); the model "
                "would reconstruct a chest lying on its side"]
    if contrast <= CHEST_CONTRAST_MIN:
        return [f"the input does not look like a frontal chest radiograph (the middle is not brighter than both lung "
                f"fields: chest contrast {contrast:.2f}); it may be inverted (a negative, e.g. a film wrongly stored as "
                "MONOCHROME1), a lateral view or not a chest, and the reconstruction would still look like a chest"]
    if not looks_frontal(image01):
        return [f"the input does not look like a frontal chest radiograph but like a lateral view or a cross-section "
                f"(a CT slice) (frontal-view score {frontal_score(image01):.2f}); the model reconstructs from frontal (PA "
                "or AP) chest films only, and would still draw a chest"]
    scores, checks = orientation_scores(image01), orientation_checks()
    if upside_down(image01):
        return [f"the film looks upside down (its bright abdomen above its lungs: orientation score "
                f"{scores['up_down']:.2f}); turn it head up, half round (--turn half, or --turn auto): the model "
                "would reconstruct a chest upside down"]
    if scores["left_right"] < checks["left_right"][1]:
        return [f"the film may be mirrored left to right (the heart's shadow on the image's left, the patient's right: "
                f"orientation score {scores['left_right']:.2f}): a flipped film gives a mirrored CT (--mirror flips it back); "
                "a patient whose heart is on the right (dextrocardia) would look the same"]
    return []


def input_problems(radiograph, image01: np.ndarray) -> tuple:
    """What the checks before a reconstruction say of a :class:`~XctDiffCore.io.Radiograph` whose model input is
    ``image01``: ``(refusable, advisory)``. The first (its header, its contrast and orientation) are errors with
    ``strict``; the second (a raw detector image, a child's size) are only ever warnings: the film itself is fine."""
    refusable = view_problems(radiograph.header) + film_problems(image01)
    advisory = processing_problems(radiograph.header) + size_problems(radiograph.age_years, radiograph.image.shape,
                                                                      radiograph.spacing)
    return refusable, advisory


def view_problems(header: dict) -> list:
    """Why a DICOM film's header says it is not a frontal chest film (lateral, oblique, another body part, a Secondary
    Capture that is a screenshot or a scanned document rather than a digitized film)."""
    problems = []
    view = header.get("ViewPosition", "")
    if view in LATERAL_VIEWS:
        problems.append(f"the DICOM header says this is a {LATERAL_VIEWS[view]} view (View Position {view}); the model "
                        "reconstructs from frontal (PA or AP) chest films only, and would still draw a chest")
    part = header.get("BodyPartExamined", "")
    if part in NOT_CHEST:
        problems.append(f"the DICOM header says this film shows the {part.lower()} (Body Part Examined {part}), not the "
                        "chest; the model would still draw a chest")
    conversion = header.get("ConversionType", "")
    if conversion in NOT_FILM:
        problems.append(f"the DICOM header says this is {NOT_FILM[conversion]} (Conversion Type {conversion}), not a "
                        "film: its grey levels are not a radiograph's; the model would still draw a chest")
    return problems


def processing_problems(header: dict) -> list:
    """Why a DICOM film's contrast may not be the one the model knows: a raw detector image (For Processing)."""
    if header.get("PresentationIntentType", "") != "FOR PROCESSING":
        return []
    return ["the DICOM header marks this image For Processing (the detector's raw image, before the processing "
            "that makes the film a radiologist reads); the model was trained on processed films, so expect a "
            "poorer reconstruction: use the For Presentation image of the same exposure if there is one"]


def consistency_problems(consistency: float, minimum=None) -> list:
    """Why the finished reconstruction should not be trusted: its DRR disagrees with the film (its consistency
    is below the model's calibrated ``minimum``); empty when it is not, or when the model has no minimum."""
    if minimum is None or consistency >= minimum:
        return []
    return [f"the reconstruction is unreliable: its DRR agrees poorly with the input (consistency {consistency:.3f} < "
            f"{minimum:g}, the model's reliability threshold); the input may not be a frontal chest film the model can read"]


def size_problems(age_years=None, film_shape=None, spacing=None) -> list:
    """Why the adult-sized reconstruction may not have the patient's size: the patient's age, the
    film's size by its pixel spacing ``(row, col)`` mm; empty when neither is known or both look adult."""
    problems = []
    if age_years is not None and age_years < ADULT_AGE_YEARS:
        age = f"{age_years:.0f} years" if age_years >= 2 else f"{age_years * 12:.0f} months"
        problems.append(f"the patient is {age} old (DICOM Patient's Age): the model was trained on adult chests and "
                        "reconstructs an adult-sized chest (a 320 mm cube), not the child's size or proportions")
    if film_shape is not None and spacing is not None:
        rows_mm, cols_mm = (n * s for n, s in zip(film_shape, spacing))
        if max(rows_mm, cols_mm) < SMALL_FILM_MM:
            problems.append(f"by its pixel spacing the film is {rows_mm:.0f} x {cols_mm:.0f} mm, smaller than an adult "
                            "chest film (350-430 mm): a child's film (the reconstruction is adult-sized) or an image "
                            "resized without correcting its pixel spacing")
    return problems
