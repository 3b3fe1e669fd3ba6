"""Fit the plausibility check's two orientation detectors (upside down, mirrored) on real films and measure them.

    python Testing/Scripts/orientation_weights.py [--shared ../shared/data] [--datalist .data/ds/datalist.json]
        [--write XctDiffCore/plausibility_orientation.json]

Each detector is a linear discriminant (Fisher's, with the covariance shrunk by 5 % towards its mean
variance) on what a flip reverses: the preprocessed film's 8 x 8 thumbnail minus its mirror image
(:func:`XctDiffCore.plausibility.orientation_features`). A flip negates those features, so a film and its
flipped copy score s and -s, and the discriminant needs only the films the right way round: it is fitted
on the 1,600 Kermany training films of ../shared/data (pediatric AP films, CC BY 4.0; for the upside-down
check their mirror images too, upright as well), scaled so that their median scores 1, and its threshold is the 0.5th percentile of their scores, at most 0 (at most 0.5 % of
the training films flagged). Measured, never fitted, on: the 624 Kermany test films, the 4 adult films
(2 NIH PA, the RSNA DICOM, the bundled RG1), the frontal DRRs of the shared CTs (from --datalist), each
as it is, flipped, turned half round and turned a quarter either way (the quarter-turn check,
:func:`XctDiffCore.plausibility.quarter_turn`, has its margin chosen on the training films: the largest of
0, 0.05, 0.1, ... that finds every one of the first 600 turned either way), and how often ``--turn auto``
names the turn that stands each of them head up again. Writes the JSON with --write; prints the figures either way
(about a minute on a CPU).
"""
from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np

from XctDiffCore.io import read_radiograph
from XctDiffCore.plausibility import (ORIENTATION_FILE, chest_contrast, film_problems, head_up_turn,
                                      orientation_features, orientation_scores)
from XctDiffCore.preprocess import preprocess_radiograph

SHRINK = 0.05
FALSE_ALARMS = 0.5  # per cent of the training films a threshold may flag
CHECKS = {"up_down": 0, "left_right": 1}  # the flip's axis on the film


def fit(films: list, axis: int) -> tuple:
    """(weights scaled so the films' median scores 1, the films' scores). For the upside-down check the films
    mirrored left to right count as the right way round too (a mirrored film is still upright), so that it
    does not answer for the mirror check; that one runs only on films found upright."""
    if axis == 0:
        films = films + [np.fliplr(f) for f in films]
    features = np.stack([orientation_features(f, axis) for f in films]).astype(np.float64)
    covariance = np.cov(features.T)
    covariance += SHRINK * np.eye(len(covariance)) * np.trace(covariance) / len(covariance)
    weights = np.linalg.solve(covariance, features.mean(axis=0))
    weights /= np.median(features @ weights)
    return weights, features @ weights


def flagged(films: list, change=lambda f: f) -> str:
    """How many of ``films`` (each passed through ``change``) film_problems flags, and for what."""
    reasons = [film_problems(change(f)) for f in films]
    kinds = {"upside down": 0, "on its side": 0, "mirrored": 0, "not a frontal chest": 0}
    for problems in reasons:
        for problem in problems:
            kinds[next((k for k in kinds if k in problem), "not a frontal chest")] += 1
    return f"{sum(bool(r) for r in reasons)} of {len(films)} flagged (" + ", ".join(f"{k} {v}" for k, v in kinds.items()) + ")"


def turned_back(films: list) -> str:
    """How often ``--turn auto`` (:func:`head_up_turn`) stands each film head up again, as it is and turned: the
    turn it names is the one that undoes the change (none for a film as it is or mirrored; half round for one
    flipped upside down, which then stays mirrored, as the mirror check says)."""
    changes = {"as they are": (lambda f: f, 0), "mirrored": (np.fliplr, 0), "upside down": (np.flipud, 2),
               "half round": (lambda f: np.rot90(f, 2), 2), "anticlockwise": (np.rot90, 3),
               "clockwise": (lambda f: np.rot90(f, 3), 1)}
    counts = []
    for label, (change, k) in changes.items():
        named = [head_up_turn(change(f)) for f in films]
        wrong = sum(n not in (0, k) for n in named)  # turned, but not back: worse than leaving it (and warning)
        counts.append(f"{label} {named.count(k)}" + (f" ({wrong} turned wrongly)" if wrong else ""))
    return "; ".join(counts) + f" (of {len(films)})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--datalist", default=".data/ds/datalist.json")
    parser.add_argument("--write", default=None, help=f"write the weights here (the engine reads {ORIENTATION_FILE.name})")
    args = parser.parse_args()
    cxr = Path(args.shared) / "cxr"

    def films(pattern_or_paths) -> list:
        paths = sorted(glob.glob(str(cxr / pattern_or_paths))) if isinstance(pattern_or_paths, str) else \
            [cxr / p for p in pattern_or_paths]
        return [preprocess_radiograph(read_radiograph(p).image, 128) for p in paths]

    train = films("kermany/train/*/*.jpeg")
    checks = {}
    for name, axis in CHECKS.items():
        weights, scores = fit(train, axis)
        threshold = min(0.0, float(np.percentile(scores, FALSE_ALARMS)))
        checks[name] = {"weights": [round(float(w), 5) for w in weights], "threshold": round(threshold, 3)}
        print(f"{name}: threshold {threshold:.3f}; training films flagged {np.mean(scores < threshold):.2%}, "
              f"flipped caught {np.mean(-scores < threshold):.2%}")
    def gain(film) -> float:  # how much the better upright quarter turn raises the chest contrast
        turns = [np.rot90(film, k) for k in (1, 3)]
        return max([chest_contrast(t) for t in turns if orientation_scores(t)["up_down"] > 0] or [-9.0]) - \
            chest_contrast(film)

    if args.write:  # the quarter-turn check's margin: the weights above decide which turn is upright
        Path(args.write).write_text(json.dumps({"checks": checks}), encoding="utf-8")
        from XctDiffCore.plausibility import orientation_checks

        orientation_checks.cache_clear()
    turned = np.array([gain(np.rot90(f, k)) for f in train[:600] for k in (1, 3)])
    upright = np.array([gain(f) for f in train[:600]])
    print("quarter-turn margin (the code's QUARTER_TURN_MARGIN is the largest finding all the turned): " + ", ".join(
        f"{m}: turned found {np.mean(turned > m):.2%}, upright flagged {np.mean(upright > m):.2%}"
        for m in (0.0, 0.05, 0.1, 0.15)))
    document = {
        "about": "XctDiffCore.plausibility's orientation checks: linear discriminants on the 8 x 8 thumbnail of a "
                 "preprocessed film minus its mirror image; made by Testing/Scripts/orientation_weights.py",
        "fitted_on": "the 1,600 Kermany training films of ../shared/data/cxr (ChestXray2017, Kermany et al., "
                     "Mendeley Data, CC BY 4.0): statistics of them, no image",
        "checks": checks,
    }
    if args.write:
        Path(args.write).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        from XctDiffCore.plausibility import orientation_checks

        orientation_checks.cache_clear()
        print(f"wrote {args.write}")

    test = films("kermany/test/*/*.jpeg")
    adult = films(["nih/00000001_000.png", "nih/00027426_000.png", "dicom/rsna_pneumonia_sample.dcm"])
    adult += [preprocess_radiograph(read_radiograph("Resources/Samples/RG1_UNCR_chest_PA.dcm").image, 128)]
    root = Path(args.datalist).parent
    listing = json.loads(Path(args.datalist).read_text())
    drrs = [np.load(root / e["xray"]) for e in listing["training"] + listing["validation"] if "_aug0." in e["xray"]]
    for label, group in (("Kermany test films", test), ("adult films", adult), ("frontal DRRs", drrs)):
        print(f"{label}: as they are {flagged(group)}; upside down {flagged(group, np.flipud)}; "
              f"mirrored {flagged(group, np.fliplr)}; turned half round {flagged(group, lambda f: np.rot90(f, 2))}; "
              f"a quarter turn anticlockwise {flagged(group, np.rot90)}; clockwise "
              f"{flagged(group, lambda f: np.rot90(f, 3))}")
        print(f"{label}, --turn auto stands them head up: {turned_back(group)}")


if __name__ == "__main__":
    main()
