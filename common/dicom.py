"""Reading one DICOM file into display-ready pixels.

Pixel semantics, in the order DICOM defines them (PS3.3 C.7.6.3, C.11):
1. stored values -> modality values with the Modality LUT (RescaleSlope/Intercept);
2. modality values -> display values with the VOI LUT or WindowCenter/Width;
   files without either get a robust 0.5-99.5 percentile window;
3. MONOCHROME1 (high value = dark) is inverted so dense tissue is bright at every site;
4. colour (RGB, YBR, PALETTE COLOR) becomes RGB in [0, 1].
A file window that misses the data (under 1% of pixels inside it) is replaced
by the percentile window. Multi-frame files: one frame by a stated policy
(``middle`` by default, ``first``, or ``max`` intensity projection).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import ImageReadError

DICOM_SUFFIXES = (".dcm", ".dicom")


def is_dicom(path: Path) -> bool:
    """True for a DICOM suffix or the 'DICM' preamble magic."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _window(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear window [lo, hi] -> [0, 1], in place on a float32 array (this is the hot path)."""
    if hi <= lo:
        hi = lo + 1.0
    values -= lo
    values *= 1.0 / (hi - lo)
    return np.clip(values, 0.0, 1.0, out=values)


def _modality(arr: np.ndarray, ds: object) -> np.ndarray:
    """Stored values -> modality values (float32): RescaleSlope/Intercept, or a Modality LUT."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float32)
    values = arr.astype(np.float32)
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    if slope != 1.0:
        values *= slope
    if intercept != 0.0:
        values += intercept
    return values


def _first(value: object) -> float:
    """WindowCenter/Width may be multi-valued; the first pair is the default view."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def pseudonym(patient_id: str) -> str:
    """A stable, non-reversible stand-in for a PatientID ('' stays '')."""
    return hashlib.sha256(patient_id.encode()).hexdigest()[:16] if patient_id else ""


@dataclass
class DicomImage:
    """Display-ready pixels and the header facts a data check reports (no patient names or dates)."""

    pixels: np.ndarray  # (H, W) or (H, W, 3) float32 in [0, 1]
    patient_id: str  # a pseudonym (hash) of PatientID: only keeps a patient's images in one split
    sop_uid: str
    modality: str
    body_part: str
    photometric: str
    transfer_syntax: str
    rows: int
    cols: int
    bits_stored: int
    frames: int
    window: str  # where the display window came from


MULTIFRAME_POLICIES = ("middle", "first", "max")

# pydicom also logs what it warns about (truncated files, odd tags); we report each problem once,
# as a skip reason, so its logger only speaks for errors.
logging.getLogger("pydicom").setLevel(logging.ERROR)


def _pick_frame(arr: np.ndarray, frames: int, samples: int, policy: str) -> np.ndarray:
    """Multi-frame files become one image: the middle frame (default), the first, or the
    maximum intensity projection over frames ("max")."""
    if frames <= 1:
        return arr
    if policy == "first":
        return arr[0]
    if policy == "max":
        return arr.max(axis=0)
    return arr[frames // 2]


def _grey_window(values: np.ndarray, ds: object) -> tuple[np.ndarray, str]:
    from pydicom.pixels import apply_voi_lut

    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        lo, hi = center - width / 2.0, center + width / 2.0
        # A window that misses the data (seen in real exports) would give a blank image.
        sample = values[::4, ::4]
        if np.mean((sample > lo) & (sample < hi)) >= 0.01:
            return _window(values, lo, hi), "file window"
        source = "percentile (file window misses the data)"
    elif "VOILUTSequence" in ds:
        shown = apply_voi_lut(values, ds, index=0).astype(np.float32)
        lut_max = float(np.max(ds.VOILUTSequence[0].LUTData)) or 1.0
        return np.clip(shown / lut_max, 0.0, 1.0), "VOI LUT"
    else:
        source = "percentile"
    lo, hi = np.percentile(values[::2, ::2], [0.5, 99.5])  # a quarter of the pixels gives the same window
    return _window(values, float(lo), float(hi)), source


def read_dicom(path: Path, multiframe: str = "middle") -> DicomImage:
    """Decode one file with the pixel semantics above.

    Raises ImageReadError with a one-line reason for anything unusable.
    """
    import pydicom
    from pydicom.pixels import apply_color_lut

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            raise ImageReadError("not DICOM (no 'DICM' preamble or file meta header)") from None
        except Exception as exc:  # pydicom raises many types for broken headers
            raise ImageReadError(f"unreadable DICOM header ({type(exc).__name__})") from None
    truncated = any("End of file" in str(w.message) for w in caught)
    if "PixelData" not in ds:
        raise ImageReadError("truncated file: pixel data incomplete" if truncated else "no pixel data")
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    syntax_name = getattr(syntax, "name", str(syntax or "unknown"))
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise ImageReadError(f"cannot decode pixel data ({syntax_name}): {type(exc).__name__}") from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    arr = _pick_frame(arr, frames, samples, multiframe)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds).astype(np.float32)
        pixels, window = rgb / max(float(rgb.max()), 1.0), "palette"
    elif arr.ndim == 3:  # RGB, or YBR already converted to RGB by pydicom
        rgb = arr.astype(np.float32)
        pixels, window = rgb / (255.0 if rgb.max() <= 255 else float(rgb.max())), "colour"
    else:
        pixels, window = _grey_window(_modality(arr, ds), ds)
        if photometric == "MONOCHROME1":
            np.subtract(1.0, pixels, out=pixels)
    return DicomImage(
        pixels=pixels.astype(np.float32),
        patient_id=pseudonym(str(getattr(ds, "PatientID", "") or "")),
        sop_uid=str(getattr(ds, "SOPInstanceUID", "") or ""),
        modality=str(getattr(ds, "Modality", "") or "unknown"),
        body_part=str(getattr(ds, "BodyPartExamined", "") or "unknown"),
        photometric=photometric,
        transfer_syntax=syntax_name,
        rows=int(getattr(ds, "Rows", 0) or 0),
        cols=int(getattr(ds, "Columns", 0) or 0),
        bits_stored=int(getattr(ds, "BitsStored", 0) or 0),
        frames=frames,
        window=window,
    )


WRITABLE_SYNTAXES = ("explicit", "implicit", "big-endian", "deflated", "rle", "jpeg2000-lossless")


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    transfer_syntax: str = "explicit",
    window: bool = True,
    patient_id: str = "ANON",
    modality: str = "DX",
    body_part: str = "CHEST",
    comment: str = "",
) -> None:
    """Write a grey image (H, W) in [0, 1] (bright = dense) as a DICOM file.

    ``bits_stored`` sets the stored range; MONOCHROME1 stores inverted values
    (as some CR/DX systems do); ``transfer_syntax`` is one of WRITABLE_SYNTAXES
    (JPEG 2000 lossless needs pylibjpeg-openjpeg's encoder and images of at least 64 x 64).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        RLELossless,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    if transfer_syntax not in WRITABLE_SYNTAXES:
        raise ValueError(f"transfer syntax '{transfer_syntax}': choose from {', '.join(WRITABLE_SYNTAXES)}")
    top = (1 << bits_stored) - 1
    stored = np.round(np.clip(pixels, 0, 1) * top).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (top - stored).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = {
        "implicit": ImplicitVRLittleEndian,
        "big-endian": ExplicitVRBigEndian,
        "deflated": DeflatedExplicitVRLittleEndian,
    }.get(transfer_syntax, ExplicitVRLittleEndian)
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = modality, body_part
    ds.PatientID, ds.PatientName = patient_id, "ANON^" + patient_id
    ds.StudyDate, ds.PatientBirthDate = "20240115", "19700101"
    if comment:
        ds.ImageComments = comment
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = top / 2, top
    big = transfer_syntax == "big-endian"
    ds.PixelData = stored.astype(">u2" if big else "<u2").tobytes()
    if transfer_syntax == "rle":
        ds.compress(RLELossless)
    elif transfer_syntax == "jpeg2000-lossless":
        ds.compress(JPEG2000Lossless)
    ds.save_as(path, enforce_file_format=True, little_endian=not big, implicit_vr=transfer_syntax == "implicit")
