"""Draw a prepared data set's inter-patient mixes beside their two partners.

    python Testing/Scripts/mix_figure.py DS/datalist.json OUT.png [ROWS] [--away]

For the first ``ROWS`` mixes (default 4, one per source patient) of a datalist written by ``xctdiff
prepare --mix K``: the source CT, the mix and the target CT, mid-coronal slices in a soft-tissue window
(W 1500 / L -250), head up. A look at whether the mixes are plausible chests before training on them.
``--away``: the mixes moved away from their partners (``--mix-away``) instead.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def coronal(path: Path) -> np.ndarray:
    with np.load(path) as data:
        ct = data["ct"]
    return ct[::-1, ct.shape[1] // 2, :]  # [z, x], head up


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    away = "--away" in sys.argv
    arguments = [a for a in sys.argv[1:] if a != "--away"]
    datalist_path, out = Path(arguments[0]), Path(arguments[1])
    rows_wanted = int(arguments[2]) if len(arguments) > 2 else 4
    datalist = json.loads(datalist_path.read_text())
    originals = {e["patient"]: e["image"] for e in datalist["training"] if "mix" not in e and e.get("aug", 0) == 0}
    rows, sources = [], set()
    for entry in (e for e in datalist["training"] if "mix" in e and (e["mix"]["alpha"] < 0) == away):
        if entry["mix"]["source"] not in sources and len(rows) < rows_wanted:
            sources.add(entry["mix"]["source"])
            rows.append(entry)
    if not rows:
        raise SystemExit(f"error: {datalist_path} has no such mixes (`xctdiff prepare --mix K [--mix-away LOW HIGH]`)")
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    for row, entry in zip(axes, rows):
        mix = entry["mix"]
        panels = ((originals[mix["source"]], mix["source"]),
                  (entry["image"], f"mix, alpha {mix['alpha']:.2f}"),
                  (originals[mix["target"]], mix["target"]))
        for ax, (image, title) in zip(row, panels):
            ax.imshow(coronal(datalist_path.parent / image), cmap="gray", vmin=-1000, vmax=500)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle("source  |  mix  |  target (mid-coronal)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    Image.open(out).convert("L").save(out, optimize=True)  # grey slices: an 8-bit grey PNG is a third the size
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
