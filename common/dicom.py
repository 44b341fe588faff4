"""Reading one DICOM file into display-ready pixels.

Pixel semantics, in the order DICOM defines them (PS3.3 C.7.6.3, C.11):
1. stored values -> modality values with the Modality LUT (RescaleSlope/Intercept);
2. modality values -> display values with the VOI LUT or WindowCenter/Width;
   files without either get a robust 0.5-99.5 percentile window;
3. MONOCHROME1 (high value = dark) is inverted so dense tissue is bright at every site;
4. colour (RGB, YBR, PALETTE COLOR) becomes RGB in [0, 1].
Multi-frame files: the middle frame is used (a stated, simple policy).
"""

from __future__ import annotations

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
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _first(value: object) -> float:
    """WindowCenter/Width may be multi-valued; the first pair is the default view."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def read_dicom(path: Path) -> tuple[np.ndarray, str]:
    """Return (pixels, patient_id): pixels (H, W) or (H, W, 3) float32 in [0, 1].

    Raises ImageReadError with a one-line reason for anything unusable.
    """
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for broken headers
        raise ImageReadError(f"unreadable DICOM header ({type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise ImageReadError("no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise ImageReadError(f"cannot decode pixel data ({name}): {type(exc).__name__}") from None
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        arr = arr[arr.shape[0] // 2]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    patient = str(getattr(ds, "PatientID", "") or "")

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds).astype(np.float32)
        return rgb / max(float(rgb.max()), 1.0), patient
    if arr.ndim == 3:  # RGB, or YBR already converted to RGB by pydicom
        rgb = arr.astype(np.float32)
        return rgb / (255.0 if rgb.max() <= 255 else float(rgb.max())), patient

    values = apply_modality_lut(arr, ds).astype(np.float32)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        out = _window(values, center - width / 2.0, center + width / 2.0)
    elif "VOILUTSequence" in ds:
        shown = apply_voi_lut(values, ds, index=0).astype(np.float32)
        lut_max = float(np.max(ds.VOILUTSequence[0].LUTData)) or 1.0
        out = np.clip(shown / lut_max, 0.0, 1.0)
    else:
        lo, hi = np.percentile(values, [0.5, 99.5])
        out = _window(values, float(lo), float(hi))
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32), patient
