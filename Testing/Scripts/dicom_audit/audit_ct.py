"""Audit: the engine's CT readers against a known truth. Run: python Testing/Scripts/dicom_audit/run.py (all three)"""
import os, shutil, sys, traceback, warnings
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).parent))
from mk import *
from XctDiffCore.io import read_ct, inspect_path
from XctDiffCore.errors import XctDiffError

ROOT = Path(os.environ.get("DICOM_AUDIT_DIR", "/tmp/dicomaudit")) / "ct"
shutil.rmtree(ROOT, ignore_errors=True); ROOT.mkdir(parents=True)
results = []

from cmp import *

def case(name, fn):
    run_case(results, name, fn, ROOT / name.replace(" ", "_").replace("/", "_"))

S, O = (0.8, 0.9, 2.5), (-20.0, -18.0, -100.0)
HU = phantom()

def plain(folder):
    ct_series(folder, HU); return compare(read_ct(folder), HU, S, O, np.eye(3))
case("plain axial signed", plain)

def unsigned_intercept(folder):
    ct_series(folder, HU, stored=lambda k, h: ((h + 1024).astype("<u2"), dict(PixelRepresentation=0, RescaleIntercept=-1024)))
    return compare(read_ct(folder), HU, S, O, np.eye(3))
case("unsigned + intercept -1024", unsigned_intercept)

def circle_fov(shape):
    j, i = np.mgrid[0:shape[1], 0:shape[2]]
    return ((j - shape[1] / 2 + .5) ** 2 + (i - shape[2] / 2 + .5) ** 2) > (min(shape[1:]) / 2) ** 2

OUT = circle_fov(HU.shape)
def padding(value, unsigned, intercept, hu_air=-1000):
    def fn(folder):
        def enc(k, h):
            s = (h - intercept)
            s = s.astype("<u2" if unsigned else "<i2")
            s[OUT] = np.array(value).astype("<u2" if unsigned else "<i2")
            return s, dict(PixelRepresentation=int(not unsigned), RescaleIntercept=intercept, PixelPaddingValue=int(value) if unsigned else int(value))
        ct_series(folder, HU, stored=enc)
        vol = read_ct(folder)
        geo = compare(vol, np.where(OUT, vol.array, HU), S, O, np.eye(3))
        if geo != "right":
            return geo
        a = vol.array  # same order as truth (axial, identity) when geometry is right
        pad = a[:, OUT]; body = a[:, ~OUT]
        msg = "right" if (np.all(body == HU[:, ~OUT]) and pad.max() <= -1000) else \
              f"WRONG: padding reads {pad.min()}..{pad.max()} HU (must be air <= -1000), inside exact: {np.all(body == HU[:, ~OUT])}"
        return msg
    return fn
case("padding -2000 signed intercept 0", padding(-2000, False, 0))
case("padding -3024 signed intercept 0", padding(-3024, False, 0))
case("padding 0 unsigned intercept -1024", padding(0, True, -1024))
case("padding 63536 (=-2000 as int16) unsigned intercept -1024", padding(63536, True, -1024))
case("padding -2000 signed intercept -1024", padding(-2000, False, -1024))

def padding_range(folder):
    def enc(k, h):
        s = (h + 1024).astype("<u2")
        s[OUT] = np.where(np.arange(OUT.sum()) % 2, 65535, 63000)  # anywhere in the padding range
        return s, dict(PixelRepresentation=0, RescaleIntercept=-1024, PixelPaddingValue=65535, PixelPaddingRangeLimit=62000)
    ct_series(folder, HU, stored=enc)
    a = read_ct(folder).array
    return "right" if a[:, OUT].max() <= -1000 and np.all(a[:, ~OUT] == HU[:, ~OUT]) else f"WRONG: padding reads {a[:, OUT].min()}..{a[:, OUT].max()} HU"
case("padding range 62000..65535 unsigned intercept -1024", padding_range)

def per_slice_rescale(folder):
    def enc(k, h):
        slope, icpt = (1, -1024) if k % 2 == 0 else (2, -2048)
        return ((h - icpt) / slope).astype("<u2"), dict(PixelRepresentation=0, RescaleSlope=slope, RescaleIntercept=icpt)
    hu = (HU // 2) * 2  # representable with slope 2
    ct_series(folder, hu, stored=enc)
    return compare(read_ct(folder), hu, S, O, np.eye(3))
case("per-slice rescale slope/intercept", per_slice_rescale)

def fractional_slope(folder):
    def enc(k, h):
        return np.rint((h + 1024) / 0.5).astype("<u2"), dict(PixelRepresentation=0, RescaleSlope=0.5, RescaleIntercept=-1024)
    ct_series(folder, HU, stored=enc)
    return compare(read_ct(folder), HU, S, O, np.eye(3))
case("slope 0.5 (float HU)", fractional_slope)

def per_slice_fractional(folder):
    def enc(k, h):
        slope = 1 if k == 0 else 0.5
        return np.rint((h + 1024) / slope).astype("<u2"), dict(PixelRepresentation=0, RescaleSlope=slope, RescaleIntercept=-1024)
    ct_series(folder, HU, stored=enc)
    return compare(read_ct(folder), HU, S, O, np.eye(3))
case("first slice slope 1, others 0.5", per_slice_fractional)

def high_bits(folder):
    def enc(k, h):
        s = (h + 1024).astype("<u2") | 0xF000  # garbage (overlay) in bits 12-15
        return s, dict(PixelRepresentation=0, BitsStored=12, HighBit=11, RescaleIntercept=-1024)
    hu = np.clip(HU, -1024, 3071)
    ct_series(folder, hu, stored=enc)
    return compare(read_ct(folder), hu, S, O, np.eye(3))
case("BitsStored 12, garbage high bits (unsigned)", high_bits)

def high_bits_signed(folder):
    def enc(k, h):
        s = (h.astype("<i2").view("<u2") & 0x0FFF) | 0x5000  # 12-bit two's complement, garbage above
        return s, dict(PixelRepresentation=1, BitsStored=12, HighBit=11, RescaleIntercept=0)
    hu = np.clip(HU, -2048, 2047)
    ct_series(folder, hu, stored=enc)
    return compare(read_ct(folder), hu, S, O, np.eye(3))
case("BitsStored 12 signed, garbage high bits", high_bits_signed)

def pixel_spacing_varies(folder):
    ct_series(folder, HU, per_slice=lambda k, ds: setattr(ds, "PixelSpacing", [0.9, 0.8] if k < 5 else [1.8, 1.6]))
    read_ct(folder); return "WRONG: accepted a series whose slices have two pixel spacings (read with the first)"
case("pixel spacing differs between slices", pixel_spacing_varies)

def orientation_varies(folder):
    a = np.radians(10)
    ct_series(folder, HU, per_slice=lambda k, ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0] if k < 5 else [np.cos(a), np.sin(a), 0, -np.sin(a), np.cos(a), 0]))
    read_ct(folder); return "WRONG: accepted a series whose slices have two orientations"
case("orientation differs between slices", orientation_varies)

def reverse_files(folder):
    ct_series(folder, HU, names=lambda k: f"IM{HU.shape[0]-k:04d}.dcm"); return compare(read_ct(folder), HU, S, O, np.eye(3))
case("reverse file order", reverse_files)

def shuffled(folder):
    perm = np.random.default_rng(3).permutation(HU.shape[0])
    ct_series(folder, HU, names=lambda k: f"IM{perm[k]:04d}.dcm", per_slice=lambda k, ds: setattr(ds, "InstanceNumber", int(perm[k]) + 1))
    return compare(read_ct(folder), HU, S, O, np.eye(3))
case("shuffled files and instance numbers", shuffled)

def tilt(folder):
    # gantry tilt 15 deg: positions move along y by tan(15) * dz per slice, orientation still axial
    shift = (0.0, np.tan(np.radians(15)) * S[2], 0.0)
    hu = smooth_field(truth_positions(HU.shape, S, O, np.eye(3), shift)).reshape(HU.shape).astype(np.int16)
    ct_series(folder, hu, tilt_shift=shift, per_slice=lambda k, ds: setattr(ds, "GantryDetectorTilt", 15))
    return compare_smooth(read_ct(folder), HU.shape, S, O, np.eye(3), tilt=shift)
case("gantry tilt 15 deg (sheared positions)", tilt)

def tilted_iop(folder):
    # the other way scanners record tilt: orientation tilted (rows x, columns y-z), slices stacked along z
    a = np.radians(15); col = np.array([0, np.cos(a), -np.sin(a)]); d = np.column_stack([[1, 0, 0], col, [0, 0, 1]])
    pos = [np.asarray(O) + np.array([0, 0, S[2] * k]) for k in range(HU.shape[0])]
    shift = np.array([0, 0, S[2]]) - d[:, 2] * S[2]
    hu = smooth_field(truth_positions(HU.shape, S, O, d, shift)).reshape(HU.shape).astype(np.int16)
    ct_series(folder, hu, direction=d, positions=pos)
    return compare_smooth(read_ct(folder), HU.shape, S, O, d, tilt=shift)
case("gantry tilt 15 deg (tilted orientation, z stacking)", tilted_iop)

def gap(folder):
    pos = [np.asarray(O) + [0, 0, S[2] * k + (S[2] if k >= 5 else 0)] for k in range(HU.shape[0])]
    ct_series(folder, HU, positions=pos); read_ct(folder); return "ACCEPTED (should refuse)"
case("non-uniform spacing (one gap)", gap)

def overlap(folder):
    pos = [np.asarray(O) + [0, 0, 1.25 * k] for k in range(HU.shape[0])]  # 1.25 mm apart, 2.5 mm thick
    ct_series(folder, HU, positions=pos)
    return compare(read_ct(folder), HU, (S[0], S[1], 1.25), O, np.eye(3))
case("overlapping slices (1.25 mm apart, 2.5 thick)", overlap)

def localizer(folder):
    files = ct_series(folder, HU)
    import pydicom
    ds = pydicom.dcmread(files[0]); ds.SOPInstanceUID = generate_uid(); ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]; ds.ImagePositionPatient = [-20, 0, 50]; ds.InstanceNumber = 99
    save(ds, folder / "scout.dcm")
    return compare(read_ct(folder), HU, S, O, np.eye(3))
case("localizer in the same series", localizer)

def localizer_other_size(folder):
    files = ct_series(folder, HU)
    import pydicom
    ds = pydicom.dcmread(files[0]); ds.SOPInstanceUID = generate_uid(); ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]; ds.ImagePositionPatient = [-20, 0, 50]; ds.InstanceNumber = 99
    ds.Rows, ds.Columns = 64, 48; ds.PixelData = np.zeros((64, 48), "<i2").tobytes()
    save(ds, folder / "scout.dcm")
    return compare(read_ct(folder), HU, S, O, np.eye(3))
case("localizer (other size) in the same series", localizer_other_size)

def two_series(folder):
    ct_series(folder, HU, names=lambda k: f"A{k:03d}.dcm")
    ct_series(folder, HU[:6] + 7, names=lambda k: f"B{k:03d}.dcm")
    return compare(read_ct(folder), HU, S, O, np.eye(3))
case("two series in one folder (10 vs 6 slices)", two_series)

def two_series_equal(folder):
    ct_series(folder, HU, names=lambda k: f"A{k:03d}.dcm")
    ct_series(folder, HU + 7, names=lambda k: f"B{k:03d}.dcm")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        vol = read_ct(folder)
    said = any("holds 2 DICOM series" in str(x.message) for x in w)
    a, b = compare(vol, HU, S, O, np.eye(3)), compare(vol, HU + 7, S, O, np.eye(3))
    which = "the first" if a == "right" else "the second" if b == "right" else "NEITHER (WRONG)"
    return f"read {which} of two equal series; " + ("right: a warning names it" if said else "WRONG: silently")
case("two series of equal length in one folder", two_series_equal)

def feet_first_prone(folder):
    d = np.diag([-1.0, -1.0, -1.0])  # prone (rows to the patient's right, columns anterior), stacked towards the feet
    ct_series(folder, HU, direction=d)
    return compare(read_ct(folder), HU, S, O, d)
case("feet-first prone", feet_first_prone)

def oblique(folder):
    a, b = np.radians(20), np.radians(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    d = rz @ rx
    ct_series(folder, HU, direction=d)
    return compare(read_ct(folder), HU, S, O, d)
case("oblique orientation", oblique)

def coronal(folder):
    d = np.column_stack([[1, 0, 0], [0, 0, -1], [0, 1, 0]])  # coronal slices, stacked anterior->posterior
    ct_series(folder, HU, direction=d)
    return compare(read_ct(folder), HU, S, O, d)
case("coronal acquisition", coronal)

def no_suffix_dicomdir(folder):
    ct_series(folder, HU, names=lambda k: f"{k:08d}")
    from pydicom.fileset import FileSet
    import pydicom
    try:
        fs = FileSet()
        for p in sorted(folder.iterdir()):
            fs.add(pydicom.dcmread(p))
        fs.write(folder / "export")
    except Exception as e:
        return f"(could not build DICOMDIR: {e})"
    return compare(read_ct(folder), HU, S, O, np.eye(3))
case("files without suffix (and a DICOMDIR export below)", no_suffix_dicomdir)
case("the export folder (holding DICOMDIR) given", lambda folder: compare(read_ct(ROOT / "files_without_suffix_(and_a_DICOMDIR_export_below)" / "export"), HU, S, O, np.eye(3)))

def dicomdir_file(folder):
    ct_series(folder / "src", HU, names=lambda k: f"{k:08d}")
    from pydicom.fileset import FileSet
    import pydicom
    fs = FileSet()
    for p in sorted((folder / "src").iterdir()):
        fs.add(pydicom.dcmread(p))
    fs.write(folder / "export")
    return compare(read_ct(folder / "export" / "DICOMDIR"), HU, S, O, np.eye(3))
case("the DICOMDIR file given as the CT", dicomdir_file)

def one_file_of_series(folder):
    files = ct_series(folder, HU)
    ct_series(folder, HU[:12] + 7, names=lambda k: f"B{k:03d}.dcm")
    return "given one file of the 10-slice series: " + compare(read_ct(files[3]), HU, S, O, np.eye(3))
case("one file of a series (folder holds another, longer one)", one_file_of_series)

def transfer_syntax(uid_name):
    def fn(folder):
        import pydicom
        from pydicom import uid as U
        files = ct_series(folder, HU, stored=lambda k, h: ((h + 1024).astype("<u2"), dict(PixelRepresentation=0, RescaleIntercept=-1024)))
        for f in files:
            ds = pydicom.dcmread(f)
            if uid_name == "RLELossless":
                ds.compress(U.RLELossless)
            elif uid_name == "ImplicitVRLittleEndian":
                ds.file_meta.TransferSyntaxUID = U.ImplicitVRLittleEndian
            elif uid_name == "DeflatedExplicitVRLittleEndian":
                ds.file_meta.TransferSyntaxUID = U.DeflatedExplicitVRLittleEndian
            ds.save_as(f)
        return str(pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID.name) + ": " + compare(read_ct(folder), HU, S, O, np.eye(3))
    return fn
for name in ("RLELossless", "ImplicitVRLittleEndian", "DeflatedExplicitVRLittleEndian"):
    case(f"CT series, transfer syntax {name}", transfer_syntax(name))

def j2k_series(folder):
    import pydicom, SimpleITK as sitk
    files = ct_series(folder, HU)
    for k, f in enumerate(files):
        tmp = folder / "tmp_j2k.dcm"
        w = sitk.ImageFileWriter(); w.SetFileName(str(tmp)); w.SetUseCompression(True); w.SetCompressor("JPEG2000")
        w.Execute(sitk.GetImageFromArray(HU[k]))
        ds, px = pydicom.dcmread(f), pydicom.dcmread(tmp)
        ds.file_meta.TransferSyntaxUID = px.file_meta.TransferSyntaxUID; ds.PixelData = px.PixelData
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        ds.save_as(f); tmp.unlink()
    return compare(read_ct(folder), HU, S, O, np.eye(3))
case("CT series, JPEG 2000 lossless (GDCM-encoded)", j2k_series)

def single_file(folder):
    files = ct_series(folder, HU[:1]); read_ct(files[0]); return "ACCEPTED"
case("single-slice CT", single_file)

def enhanced(folder):
    import pydicom
    from pydicom.sequence import Sequence
    ds = base_ct(generate_uid(), "1.2.3", "1.2.3.4")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    del ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType
    n = HU.shape[0]
    ds.NumberOfFrames = n; ds.Rows, ds.Columns = HU.shape[1:]
    shared = Dataset()
    pm = Dataset(); pm.PixelSpacing = [S[1], S[0]]; pm.SliceThickness = S[2]
    po = Dataset(); po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    pvt = Dataset(); pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = -1024, 1, "HU"
    shared.PixelMeasuresSequence = Sequence([pm]); shared.PlaneOrientationSequence = Sequence([po])
    shared.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in range(n):
        f = Dataset(); pp = Dataset(); pp.ImagePositionPatient = [O[0], O[1], O[2] + S[2] * k]
        f.PlanePositionSequence = Sequence([pp]); frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelRepresentation = 0
    ds.PixelData = (HU + 1024).astype("<u2").tobytes()
    folder.mkdir(parents=True)
    save(ds, folder / "enhanced.dcm")
    return compare(read_ct(folder / "enhanced.dcm"), HU, S, O, np.eye(3))
case("enhanced multi-frame CT (one file)", enhanced)

def tilt_unfixed_check(folder):
    """Sanity check of the smooth comparison: the same tilted data read as if unsheared must be found wrong."""
    shift = (0.0, np.tan(np.radians(15)) * S[2], 0.0)
    hu = smooth_field(truth_positions(HU.shape, S, O, np.eye(3), shift)).reshape(HU.shape).astype(np.int16)
    from XctDiffCore.volume import Volume
    return "(control, must be WRONG): " + compare_smooth(Volume(hu, S, O, np.eye(3)), HU.shape, S, O, np.eye(3), tilt=shift)
case("control: tilted data read unsheared", tilt_unfixed_check)

print("\nSUMMARY")
for name, out in results:
    print(f"{name:60s} {out[:160]}")
