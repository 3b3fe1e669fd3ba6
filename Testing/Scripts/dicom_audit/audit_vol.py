"""Audit: NIfTI / NRRD / MetaImage CTs against a known truth. Run: python Testing/Scripts/dicom_audit/run.py (all three)"""
import os, shutil, struct, sys, warnings
from pathlib import Path
import numpy as np
import SimpleITK as sitk
import nrrd
sys.path.insert(0, str(Path(__file__).parent))
from mk import phantom
from cmp import compare, compare_smooth, run_case, smooth_field, truth_positions
from XctDiffCore.io import read_ct, read_radiograph
from XctDiffCore.errors import XctDiffError

ROOT = Path(os.environ.get("DICOM_AUDIT_DIR", "/tmp/dicomaudit")) / "vol"
shutil.rmtree(ROOT, ignore_errors=True); ROOT.mkdir(parents=True)
results = []
HU = phantom()
S, O = (0.8, 0.9, 2.5), (-20.0, -18.0, -100.0)

def case(name, fn):
    run_case(results, name, fn, ROOT / name.replace(" ", "_").replace("/", "_"))

def nrrd_ras(p):
    p = p.with_suffix(".nrrd")
    # RAS space: LPS direction diag(-1,-1,1) means RAS directions diag(1,1,1) for... write axis i along R->L (LPS +x) = RAS -x
    hdr = {"space": "right-anterior-superior", "space directions": np.diag([-S[0], -S[1], S[2]]),
           "space origin": np.array([-O[0], -O[1], O[2]]), "kinds": ["domain"] * 3}
    nrrd.write(str(p), HU, hdr, index_order="C")
    return compare(read_ct(p), HU, S, O, np.eye(3))
case("NRRD space right-anterior-superior", nrrd_ras)

def nrrd_lps(p):
    p = p.with_suffix(".nrrd")
    hdr = {"space": "left-posterior-superior", "space directions": np.diag(S), "space origin": np.array(O), "kinds": ["domain"] * 3}
    nrrd.write(str(p), HU, hdr, index_order="C")
    return compare(read_ct(p), HU, S, O, np.eye(3))
case("NRRD space left-posterior-superior", nrrd_lps)

SHEAR = (0.0, 0.6, 0.0)  # each slice 0.6 mm further along y (a gantry-tilt export): resampled, so a smooth truth
SHEARED = smooth_field(truth_positions(HU.shape, S, O, np.eye(3), SHEAR)).reshape(HU.shape).astype(np.int16)

def nrrd_nonortho(p):
    p = p.with_suffix(".nrrd")
    dirs = np.diag(S).astype(float); dirs[2, 1] = SHEAR[1]
    hdr = {"space": "left-posterior-superior", "space directions": dirs, "space origin": np.array(O), "kinds": ["domain"] * 3}
    nrrd.write(str(p), SHEARED, hdr, index_order="C")
    return compare_smooth(read_ct(p), HU.shape, S, O, np.eye(3), tilt=SHEAR)
case("NRRD non-orthogonal (sheared) directions", nrrd_nonortho)

def nrrd_no_space(p):
    p = p.with_suffix(".nrrd")
    nrrd.write(str(p), HU, {"spacings": list(S), "kinds": ["domain"] * 3}, index_order="C")
    return compare(read_ct(p), HU, S, (0, 0, 0), np.eye(3))
case("NRRD without space (spacings only)", nrrd_no_space)

def nifti(p, hu=HU, spacing=S, origin=O, direction=np.eye(3)):
    img = sitk.GetImageFromArray(hu); img.SetSpacing(spacing); img.SetOrigin(origin); img.SetDirection(tuple(np.ravel(direction)))
    sitk.WriteImage(img, str(p)); return p

def patch(p, offset, fmt, *values):
    b = bytearray(p.read_bytes()); struct.pack_into("<" + fmt, b, offset, *values); p.write_bytes(bytes(b))

def qs_disagree(p):
    p = nifti(p.with_suffix(".nii"))
    # sform says the origin is 50 mm further up (RAS srow_z[3])
    srow_z = struct.unpack_from("<4f", p.read_bytes(), 312)
    patch(p, 312, "4f", srow_z[0], srow_z[1], srow_z[2], srow_z[3] + 50.0)
    q, s = struct.unpack_from("<h", p.read_bytes(), 252)[0], struct.unpack_from("<h", p.read_bytes(), 254)[0]
    v = read_ct(p)
    which = "qform" if abs(v.origin[2] - O[2]) < 1e-3 else ("sform" if abs(v.origin[2] - O[2] - 50) < 1e-3 else f"neither ({v.origin})")
    return f"qform_code {q}, sform_code {s}: engine took the {which}, silently (nibabel takes the sform)"
case("NIfTI qform and sform disagree (50 mm)", qs_disagree)

def nifti_sheared(p):
    p = nifti(p.with_suffix(".nii"), hu=SHEARED)  # SimpleITK's writer would rotate a sheared matrix: the sform by hand
    axes = np.diag(S).astype(float); axes[:, 2] += SHEAR
    patch(p, 280, "12f", *(np.diag([-1.0, -1.0, 1.0]) @ np.column_stack([axes, O])).ravel())
    return compare_smooth(read_ct(p), HU.shape, S, O, np.eye(3), tilt=SHEAR)
case("NIfTI sheared sform (a tilted CT saved as scanned)", nifti_sheared)

def scl(p):
    p = nifti(p.with_suffix(".nii"), hu=(HU + 1024).astype(np.int16))
    patch(p, 112, "2f", 1.0, -1024.0)  # scl_slope, scl_inter
    return compare(read_ct(p), HU, S, O, np.eye(3))
case("NIfTI scl_slope 1 scl_inter -1024", scl)

def scl_half(p):
    p = nifti(p.with_suffix(".nii"), hu=((HU + 1024) * 2).astype(np.int16))
    patch(p, 112, "2f", 0.5, -1024.0)
    return compare(read_ct(p), HU, S, O, np.eye(3))
case("NIfTI scl_slope 0.5", scl_half)

def scl_zero(p):
    p = nifti(p.with_suffix(".nii"))
    patch(p, 112, "2f", 0.0, 0.0)  # scl_slope 0: "no scaling" by the standard
    return compare(read_ct(p), HU, S, O, np.eye(3))
case("NIfTI scl_slope 0 (no scaling)", scl_zero)

def no_codes(p):
    p = nifti(p.with_suffix(".nii"), direction=np.diag([-1.0, -1.0, 1.0]), origin=(0, 0, 0))
    patch(p, 252, "2h", 0, 0)  # qform_code = sform_code = 0: method 1, "no particular spatial orientation"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        v = read_ct(p)
    said = any("records no orientation" in str(x.message) for x in w)
    return (f"orientation undefined by the standard (ITK: LPS, nibabel: LAS); engine direction diag "
            f"{np.diag(v.direction)}, " + ("right: a warning says so" if said else "WRONG: silently"))
case("NIfTI qform_code = sform_code = 0 (ANALYZE method 1)", no_codes)

def only_qform(p):
    p = nifti(p.with_suffix(".nii"))
    patch(p, 254, "h", 0)  # sform_code 0: the qform alone
    return compare(read_ct(p), HU, S, O, np.eye(3))
case("NIfTI qform only", only_qform)

def four_d(p):
    p = p.with_suffix(".nii.gz")
    img = sitk.GetImageFromArray(HU[None], isVector=False)  # 4D, one volume
    img.SetSpacing((*S, 1.0)); img.SetOrigin((*O, 0.0))
    sitk.WriteImage(img, str(p))
    return compare(read_ct(p), HU, S, O, np.eye(3))
case("NIfTI 4D with one volume", four_d)

def nifti_radiological(p):
    d = np.diag([-1.0, 1.0, 1.0])
    p = nifti(p.with_suffix(".nii.gz"), direction=d)
    return compare(read_ct(p), HU, S, O, d)
case("NIfTI flipped x (det -1)", nifti_radiological)

def mha_oblique(p):
    a = np.radians(30); d = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    p = nifti(p.with_suffix(".mha"), direction=d)
    return compare(read_ct(p), HU, S, O, d)
case("MHA oblique", mha_oblique)

def nifti_2d_film(p):
    from mk import chest_film
    f = chest_film().astype(np.int16)
    img = sitk.GetImageFromArray(f); img.SetSpacing((0.2, 0.3)); p = p.with_suffix(".nii")
    sitk.WriteImage(img, str(p))
    r = read_radiograph(p)
    # a 2D NIfTI: ITK gives it LPS x/y; NIfTI i is RAS x. What does the engine show?
    ok = np.array_equal(r.image, f); return f"image as stored: {ok}, spacing {r.spacing}"
case("2D NIfTI film", nifti_2d_film)

print("\nSUMMARY")
for name, out in results:
    print(f"{name:45s} {out[:200]}")
