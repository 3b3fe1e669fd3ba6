"""Audit: the engine's radiograph readers against a known truth. Run: python Testing/Scripts/dicom_audit/run.py (all three)"""
import os, shutil, sys, warnings
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).parent))
from mk import *
from cmp import run_case
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from XctDiffCore.io import read_radiograph, inspect_path
from XctDiffCore.errors import XctDiffError
from XctDiffCore.preprocess import preprocess_radiograph
from XctDiffCore.plausibility import film_problems, size_problems

ROOT = Path(os.environ.get("DICOM_AUDIT_DIR", "/tmp/dicomaudit")) / "film"
shutil.rmtree(ROOT, ignore_errors=True); ROOT.mkdir(parents=True)
results = []
TRUTH = chest_film()  # display orientation, bone bright, 12 bit

def same_picture(image, truth=TRUTH):
    """Is the engine's image the truth up to a monotone increasing grey map? (correlation on the picture)."""
    if image.shape != truth.shape:
        return f"SHAPE {image.shape} != {truth.shape}"
    from scipy.stats import spearmanr
    c = spearmanr(image.ravel(), truth.ravel())[0]  # any monotone grey map (window, LUT) keeps the ranks
    if c > 0.98:
        return "right"
    if c < -0.98:
        return "WRONG: NEGATIVE (inverted)"
    for name, t in (("mirrored", truth[:, ::-1]), ("upside down", truth[::-1]), ("rotated 180", truth[::-1, ::-1])):
        if abs(np.corrcoef(image.ravel().astype(float), t.ravel().astype(float))[0, 1]) > 0.98:
            return f"WRONG: {name}"
    return f"WRONG: correlation {c:.2f}"

def plaus(image):
    p = film_problems(preprocess_radiograph(image))
    return "" if not p else " | plausibility: flagged"

def case(name, fn):
    run_case(results, name, fn, ROOT / (name.replace(" ", "_").replace("/", "_") + ".dcm"))

def std(path, **kw):
    r = read_radiograph(path)
    return same_picture(r.image, kw.get("truth", TRUTH)) + plaus(r.image)

case("MONOCHROME2 plain", lambda p: std(film(p, TRUTH)))
case("MONOCHROME1", lambda p: std(film(p, 4095 - TRUTH, "MONOCHROME1")))
case("MONOCHROME1 + window", lambda p: std(film(p, 4095 - TRUTH, "MONOCHROME1", WindowCenter=2000, WindowWidth=4000)))
case("MONOCHROME1 + PresentationLUTShape INVERSE (DX rule)", lambda p: std(film(p, 4095 - TRUTH, "MONOCHROME1", PresentationLUTShape="INVERSE")))
case("MONOCHROME2 + PresentationLUTShape IDENTITY", lambda p: std(film(p, TRUTH, PresentationLUTShape="IDENTITY")))
case("MONOCHROME2 + PresentationLUTShape INVERSE", lambda p: std(film(p, 4095 - TRUTH, PresentationLUTShape="INVERSE")))

def voi_lut(path, photometric="MONOCHROME2", inverted=False):
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    from pydicom.dataelem import DataElement
    data = np.clip(np.sqrt(np.arange(4096) / 4095) * 4095, 0, 4095).astype("<u2")  # monotone increasing
    lut["LUTData"] = DataElement(0x00283006, "OW", data.tobytes())
    lut.LUTExplanation = "audit"
    pix = 4095 - TRUTH if inverted else TRUTH
    ds_path = film(path, pix, photometric, VOILUTSequence=Sequence([lut]))
    return std(ds_path)
case("VOI LUT Sequence (no window)", lambda p: voi_lut(p))
case("MONOCHROME1 + VOI LUT Sequence", lambda p: voi_lut(p, "MONOCHROME1", True))
case("multiple window values", lambda p: std(film(p, TRUTH, WindowCenter=[2000, 1000], WindowWidth=[4000, 500])))
case("MONOCHROME1 + multiple windows", lambda p: std(film(p, 4095 - TRUTH, "MONOCHROME1", WindowCenter=[2000, 1000], WindowWidth=[4000, 500])))
case("window SIGMOID", lambda p: std(film(p, TRUTH, WindowCenter=2000, WindowWidth=4000, VOILUTFunction="SIGMOID")))

def high(bits):
    def fn(p):
        t = (TRUTH.astype(np.int64) * (2 ** bits - 1) // 4095).astype(np.uint16)
        garbage = t | np.uint16((0xFFFF << bits) & 0xFFFF) if bits < 16 else t
        return std(film(p, garbage, bits_stored=bits, bits_allocated=16), truth=t)
    return fn
for b in (10, 12, 14):
    case(f"BitsStored {b} in 16, high bits set", high(b))
case("MONOCHROME1 BitsStored 12, high bits set", lambda p: std(film(p, (4095 - TRUTH) | 0xF000, "MONOCHROME1")))
case("signed 16-bit with rescale", lambda p: std(film(p, TRUTH.astype(np.int16) - 2048, bits_stored=16, signed=1, RescaleSlope=1, RescaleIntercept=2048)))
case("8-bit", lambda p: std(film(p, (TRUTH // 16).astype(np.uint8), bits_stored=8), truth=TRUTH // 16))

def spacing_case(p):
    film(p, TRUTH, ImagerPixelSpacing=[0.2, 0.2], EstimatedRadiographicMagnificationFactor=1.1)
    r = read_radiograph(p)
    return f"spacing {r.spacing} (Imager 0.2 at the detector; at the patient 0.2/1.1 = {0.2/1.1:.4f})"
case("ImagerPixelSpacing + magnification 1.1", spacing_case)

def spacing_both(p):
    film(p, TRUTH, ImagerPixelSpacing=[0.2, 0.2], PixelSpacing=[0.18, 0.18], PixelSpacingCalibrationType="GEOMETRY", EstimatedRadiographicMagnificationFactor=1.1)
    return f"spacing {read_radiograph(p).spacing} (PixelSpacing 0.18 calibrated)"
case("PixelSpacing (calibrated) + ImagerPixelSpacing", spacing_both)

def nonsquare(p):
    t = TRUTH[:, ::2]  # columns twice as far apart
    film(p, t, PixelSpacing=[0.2, 0.4])
    r = read_radiograph(p)
    from XctDiffCore.preprocess import square_pixels  # what the pipeline does before preprocessing
    image, spacing = square_pixels(r.image, r.spacing)
    if image.shape == t.shape:
        return f"WRONG: pixels stay non-square {spacing} (the model sees the chest squeezed 2x)"
    return f"made square for the model: {image.shape} at {spacing}: " + same_picture(image, TRUTH[::2, ::2])
case("non-square pixels 0.2 x 0.4", nonsquare)

def multiframe(p):
    pix = np.stack([TRUTH, TRUTH])
    ds = film(p, TRUTH, NumberOfFrames=2)
    import pydicom
    d = pydicom.dcmread(p); d.PixelData = pix.astype("<u2").tobytes(); d.save_as(p)
    return std(p)
case("multi-frame film (2 frames)", multiframe)
def oneframe(p):
    return std(film(p, TRUTH, NumberOfFrames=1))
case("multi-frame film with NumberOfFrames 1", oneframe)

def rgb(p):
    g = (TRUTH // 16).astype(np.uint8)
    return std(film(p, np.stack([g, g, g], -1), "RGB", bits_stored=8, modality="OT"), truth=g)
case("RGB secondary capture", rgb)

def ybr(p):
    g = (TRUTH // 16).astype(np.uint8)
    from pydicom.pixels import convert_color_space
    ycc = convert_color_space(np.stack([g, g, g], -1), "RGB", "YBR_FULL")
    return std(film(p, ycc, "YBR_FULL", bits_stored=8, modality="OT"), truth=g)
case("YBR_FULL secondary capture", ybr)

def palette(p):
    g = (TRUTH // 16).astype(np.uint8)
    idx = (255 - g).astype(np.uint8)  # palette index i -> grey 255 - i (a reversed palette)
    lut = ((255 - np.arange(256)) * 257).astype("<u2")
    return std(film(p, idx, "PALETTE COLOR", bits_stored=8, modality="OT",
                    RedPaletteColorLookupTableDescriptor=[256, 0, 16], GreenPaletteColorLookupTableDescriptor=[256, 0, 16],
                    BluePaletteColorLookupTableDescriptor=[256, 0, 16], RedPaletteColorLookupTableData=lut.tobytes(),
                    GreenPaletteColorLookupTableData=lut.tobytes(), BluePaletteColorLookupTableData=lut.tobytes()), truth=g)
case("PALETTE COLOR (reversed grey palette)", palette)

def collimation(p):
    t = TRUTH.copy(); t[:20] = 0; t[-20:] = 0; t[:, :15] = 0; t[:, -15:] = 0
    return std(film(p, t), truth=t)
case("black collimation border", collimation)

def white_collimation_shutter(p):
    t = TRUTH.copy(); t[:20] = 4095; t[-20:] = 4095; t[:, :15] = 4095; t[:, -15:] = 4095  # unexposed = white
    r = read_radiograph(film(p, t, ShutterShape="RECTANGULAR", ShutterLeftVerticalEdge=16, ShutterRightVerticalEdge=165,
                             ShutterUpperHorizontalEdge=21, ShutterLowerHorizontalEdge=180, ShutterPresentationValue=0))
    inner = r.image[20:180, 15:165]
    border = r.image[:20].mean()
    ok = "right" if border <= r.image.min() else "WRONG"
    return f"{ok}: border mean {border:.0f} (a viewer shows the shutter black), inner: {same_picture(inner, TRUTH[20:180, 15:165])}" + plaus(r.image)
case("white collimation with a rectangular display shutter", white_collimation_shutter)

def circular_shutter(p):
    t = TRUTH.copy(); r, c = np.mgrid[0:200, 0:180]; out = (r + 1 - 100) ** 2 + (c + 1 - 90) ** 2 > 85 ** 2  # DICOM counts from 1; t[out] = 4095
    rr = read_radiograph(film(p, t, ShutterShape="CIRCULAR", CenterOfCircularShutter=[100, 90], RadiusOfCircularShutter=85))
    return ("right" if rr.image[out].max() <= rr.image.min() else "WRONG: shutter not applied") + plaus(rr.image)
case("circular display shutter", circular_shutter)

def transposed(p):
    return std(film(p, TRUTH.T.copy(), PatientOrientation=["F", "L"]))
case("stored transposed (PatientOrientation F\\L)", transposed)
def transposed2(p):
    return std(film(p, TRUTH.T[::-1, ::-1].copy(), PatientOrientation=["H", "R"]))
case("stored transposed + flipped (PatientOrientation H\\R)", transposed2)
def mirrored(p):
    return std(film(p, TRUTH[:, ::-1].copy(), PatientOrientation=["R", "F"]))
case("stored mirrored (PatientOrientation R\\F)", mirrored)
def ap_view(p):
    return std(film(p, TRUTH, PatientOrientation=["L", "F"], ViewPosition="AP"))
case("AP view, L\\F", ap_view)
def for_processing(p):
    film(p, TRUTH, PresentationIntentType="FOR PROCESSING"); return str(inspect_path(p).get("presentation_intent_type"))
case("DX for processing (inspect fact)", for_processing)
def j2k_gdcm(p):
    import pydicom, SimpleITK as sitk
    plain = film(p.with_name("plainls.dcm"), TRUTH)
    w = sitk.ImageFileWriter(); w.SetFileName(str(p)); w.SetUseCompression(True); w.SetCompressor("JPEG2000")
    w.Execute(sitk.GetImageFromArray(TRUTH))
    ds, px = pydicom.dcmread(plain), pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = px.file_meta.TransferSyntaxUID; ds.PixelData = px.PixelData
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.save_as(p)
    return str(px.file_meta.TransferSyntaxUID.name) + ": " + std(p)
case("JPEG 2000 film (GDCM-encoded)", j2k_gdcm)

print("\nSUMMARY")
for name, out in results:
    print(f"{name:55s} {out[:200]}")
