"""Seconds from the panel's click to the CT node, with and without the engine started ahead (`xctdiff standby`).

Runs the module's own logic (``XctDiffSlicerLib.logic.ReconstructionLogic``) under the ``slicer-core`` wheel
(``make slicer``) in the module's environment for its child (passive OpenMP threads, a core left to the GUI),
on the bundled sample film with the bundled model, alternating a child started at the click ("fresh") and
one started ahead ("standby", given ``--wait`` seconds to load and warm up, as a user picking a film would).

    PYTHONPATH=.:XctDiffSlicer python Testing/Scripts/click_to_ct.py [--repeats 3] [--wait 20] [--film FILE]
"""
from __future__ import annotations

import argparse
import time

import slicer
from XctDiffSlicerLib.logic import ReconstructionLogic, ReconstructionOptions
from XctDiffSlicerLib.mrml_bridge import load_radiograph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wait", type=float, default=20.0, help="seconds the standby engine gets before the click")
    parser.add_argument("--film", default="Resources/Samples/RG1_UNCR_chest_PA.dcm")
    args = parser.parse_args()
    scene = slicer.vtkMRMLScene()
    film = load_radiograph(scene, args.film)
    options = ReconstructionOptions()
    for _ in range(args.repeats):
        for mode in ("fresh", "standby"):
            logic = ReconstructionLogic(scene, standby=mode == "standby")
            try:
                if mode == "standby":
                    logic.prepare_standby(options.model)
                    time.sleep(args.wait)
                start = time.perf_counter()
                job = logic.start(film, options)
                output = logic.load_result(job, job.process.wait(timeout=600))
                print(f"{mode:8s} click to CT node {time.perf_counter() - start:.2f} s "
                      f"(consistency {output.consistency}, {output.device})", flush=True)
            finally:
                logic.shutdown()


if __name__ == "__main__":
    main()
