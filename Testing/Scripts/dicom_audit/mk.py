"""Builders for the audit: CT series and films written with pydicom from a known truth."""
import numpy as np
from pathlib import Path
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

def phantom(shape=(10, 40, 48), seed=0):
    """[k, j, i] HU: air outside an ellipse, body 40, a bright marker in a corner of the body (asymmetric)."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    body = (i / 0.8) ** 2 + (j / 0.6) ** 2 < 1
    hu[body] = 40
    hu[(i > 0.2) & (i < 0.5) & (j > 0.1) & (j < 0.4)] = 900  # bone marker: +i, +j side
    hu += (np.arange(shape[0]) * 10)[:, None, None] * body  # slice-dependent: a z flip shows
    return np.rint(hu).astype(np.int16)

def base_ct(series_uid, study_uid, frame_uid):
    ds = Dataset()
    ds.Modality = "CT"
    ds.SOPClassUID = CT_STORAGE
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.PatientName, ds.PatientID = "Audit^Case", "AUD1"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.SeriesNumber = "20260101", "120000", "1", 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
    return ds

def save(ds, path):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(str(path), enforce_file_format=True)

def ct_series(folder, hu, spacing=(0.8, 0.9, 2.5), origin=(-20.0, -18.0, -100.0), direction=np.eye(3),
              stored=None, per_slice=None, names=None, tilt_shift=(0.0, 0.0, 0.0), series_uid=None,
              positions=None, suffix=".dcm"):
    """Write hu[k, j, i] as one CT file per k. stored(k, hu_k) -> (pixels, tags) overrides the encoding;
    per_slice(k, ds) edits each dataset; tilt_shift: extra LPS offset per slice (gantry tilt)."""
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study, frame = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    d = np.asarray(direction, float)
    files = []
    for k in range(hu.shape[0]):
        ds = base_ct(series_uid, study, frame)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])]
        pos = np.asarray(origin) + d[:, 2] * spacing[2] * k + np.asarray(tilt_shift) * k
        if positions is not None:
            pos = positions[k]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.SliceLocation = f"{pos[2]:.4f}"
        pixels = hu[k].astype("<i2")
        if stored is not None:
            pixels, tags = stored(k, hu[k])
            for key, v in tags.items():
                setattr(ds, key, v)
        if per_slice is not None:
            per_slice(k, ds)
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        name = names(k) if names else f"IM{k:04d}{suffix}"
        save(ds, folder / name)
        files.append(folder / name)
    return files

def film(path, pixels, photometric="MONOCHROME2", bits_stored=12, bits_allocated=None, modality="DX", signed=0, **tags):
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else 3
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated or (8 if bits_stored <= 8 else 16)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, signed
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    for key, value in tags.items():
        setattr(ds, key, value)
    dt = {8: np.uint8, 16: np.uint16}[ds.BitsAllocated]
    if signed:
        dt = {8: np.int8, 16: np.int16}[ds.BitsAllocated]
    ds.PixelData = np.ascontiguousarray(pixels.astype(dt)).tobytes()
    save(ds, path)
    return Path(path)

def chest_film(rows=200, cols=180, top=4095):
    """A crude PA chest in display orientation (bone bright): bright mediastinum, dark lungs, a marker
    at the patient's left shoulder (image top right), brighter towards the feet."""
    r, c = np.mgrid[0:rows, 0:cols] / np.array([rows, cols])[:, None, None]
    img = 0.5 + 0.2 * r
    img = np.where((np.abs(c - 0.5) > 0.08) & (np.abs(c - 0.5) < 0.35) & (r > 0.2) & (r < 0.75), 0.2, img)
    img[int(rows * .05):int(rows * .12), int(cols * .75):int(cols * .85)] = 1.0
    return np.rint(img / img.max() * top).astype(np.uint16)
