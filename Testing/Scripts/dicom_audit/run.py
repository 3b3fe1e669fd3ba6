"""The reader audit: valid but unusual clinical files (DICOM CT series and films as scanners and PACS write
them; NIfTI / NRRD / MetaImage CTs), each made from a known truth and read by the engine, with the outcome:
``right``, ``REFUSED: <the one line>``, ``WRONG ...`` (a silent wrong result) or ``TRACEBACK``.

    python Testing/Scripts/dicom_audit/run.py          # files in /tmp/dicomaudit (DICOM_AUDIT_DIR to move them)

Quick (a minute on 2 cores, no GPU, no ../shared). The regression tests of what it found wrong:
Testing/Python/test_dicom_clinical.py. Exits 1 when any case is WRONG or a TRACEBACK.
"""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
bad = 0
for script in ("audit_ct.py", "audit_film.py", "audit_vol.py"):
    result = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True)
    summary = result.stdout.split("\nSUMMARY\n", 1)[-1]
    print(f"== {script}\n{summary}")
    if result.returncode:
        print(result.stderr[-2000:])
        bad += 1
    bad += sum(1 for line in summary.splitlines() if " WRONG" in line.split("(control", 1)[0] or "TRACEBACK" in line)
sys.exit(1 if bad else 0)
