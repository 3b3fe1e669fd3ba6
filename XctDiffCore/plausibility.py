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
  pass: a lateral view can have a bright middle too;
- 18 scikit-image sample photographs: 16 flagged; a clock face and a stained tissue section pass.

A flagged film is a warning (an error with ``strict``), not a
verdict: the check says "this does not look like what the model was trained on", nothing more.
"""
from __future__ import annotations

import numpy as np

CHEST_CONTRAST_MIN = 0.0  # a film at or below is flagged
ROWS = (0.30, 0.70)
CENTRE_COLUMNS = (0.44, 0.56)
LUNG_COLUMNS = ((0.20, 0.38), (0.62, 0.80))


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


def film_problems(image01: np.ndarray) -> list:
    """Readable reasons why the film looks implausible as a model input; empty when it passes."""
    contrast = chest_contrast(image01)
    if contrast > CHEST_CONTRAST_MIN:
        return []
    return [f"the input does not look like a frontal chest radiograph (the middle is not brighter than both lung "
            f"fields: chest contrast {contrast:.2f}); it may be inverted (a negative, e.g. a film wrongly stored as "
            "MONOCHROME1), a lateral view or not a chest, and the reconstruction would still look like a chest"]
