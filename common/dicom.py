"""Reading one DICOM file into display-ready pixels.

Pixel semantics, in the order DICOM defines them (PS3.3 C.7.6.3, C.11):
1. stored values -> modality values with the Modality LUT (RescaleSlope/Intercept);
2. uniform borders are found on the modality values (``DicomImage.content_box``) and
   the 0.5-99.5 percentile window of the content inside them maps to display values:
   the model-input rule of common/preprocess.py, so every site's export of one image
   gives the same display values. The file's VOI LUT or WindowCenter/Width is a site's
   display choice, used only for flat content (where a percentile window is empty);
3. MONOCHROME1 (high value = dark) is inverted so dense tissue is bright at every site;
4. colour (RGB, YBR, PALETTE COLOR) becomes RGB in [0, 1].
``pixels`` keep the whole frame, borders included; the model input is cropped to
``content_box``. Multi-frame files: one frame by a stated policy
(``middle`` by default, ``first``, or ``max`` intensity projection).
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import ImageReadError
from common.preprocess import Box, border_box, content_window

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


def _modality(arr: np.ndarray, ds: object, notes: list[str]) -> np.ndarray:
    """Stored values -> modality values (float32): a Modality LUT, else RescaleSlope/Intercept.

    A malformed Modality LUT Sequence (an item without LUT Descriptor or LUT Data, seen in a valid JPEG
    Lossless file of a public test suite) is ignored and the rescale used, with a note; so is a rescale
    that is not a finite number (slope 1, intercept 0 then)."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        try:
            values = apply_modality_lut(arr, ds).astype(np.float32)
            if values.shape == arr.shape[:2] and np.isfinite(values).all():
                return values
        except Exception:  # any malformed sequence has the same fallback
            pass
        notes.append("malformed Modality LUT: ignored, rescale used")
    values = arr.astype(np.float32)
    try:
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        if not (math.isfinite(slope) and math.isfinite(intercept)):
            raise ValueError
    except Exception:
        notes.append("malformed rescale slope/intercept: ignored")
        slope, intercept = 1.0, 0.0
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
    notes: list[str] = field(default_factory=list)  # malformed parts that were ignored, with the fallback used
    content_box: Box | None = None  # (top, bottom, left, right) inside the uniform borders; None: the whole frame


MULTIFRAME_POLICIES = ("middle", "first", "max")
# What a reader lets through: a person's Ctrl-C or an exit. Everything else one file raises is that file's skip.
INTERRUPTS = (KeyboardInterrupt, SystemExit)

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


def _file_window(values: np.ndarray, ds: object, notes: list[str]) -> tuple[np.ndarray | None, str]:
    """The file's own VOI, WindowCenter/Width else a VOI LUT, and its name; (None, why) where it has none,
    it is malformed (noted), or it misses the data (a window seen in real exports that would give a
    blank image)."""
    from pydicom.pixels import apply_voi_lut

    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
            if not (math.isfinite(center) and math.isfinite(width)):
                raise ValueError
        except Exception:
            notes.append("malformed window center/width: ignored, percentile window used")
            return None, "percentile"
        lo, hi = center - width / 2.0, center + width / 2.0
        sample = values[::4, ::4]
        if np.mean((sample > lo) & (sample < hi)) >= 0.01:
            return _window(values, lo, hi), "file window"
        return None, "percentile (file window misses the data)"
    if "VOILUTSequence" in ds:
        try:
            shown = apply_voi_lut(values, ds, index=0).astype(np.float32)
            lut_max = float(np.max(ds.VOILUTSequence[0].LUTData)) or 1.0
            if shown.shape == values.shape and np.isfinite(shown).all() and math.isfinite(lut_max):
                return np.clip(shown / lut_max, 0.0, 1.0), "VOI LUT"
        except Exception:
            pass
        notes.append("malformed VOI LUT: ignored, percentile window used")
    return None, "percentile"


def _grey_window(values: np.ndarray, box: Box, ds: object, notes: list[str]) -> tuple[np.ndarray, str]:
    """Modality values -> [0, 1] by the content window (common/preprocess.py, step 2): the percentile window
    of the pixels inside ``box``. The file's own window or VOI LUT is only checked (a malformed one is noted)
    unless the content is flat; then it is used where usable, else the min-max window."""
    lo, hi = content_window(values, box)
    if hi > lo:
        _file_window(values[:1, :1].copy(), ds, notes)  # notes what is malformed; a one-pixel copy, not applied
        return _window(values, lo, hi), "percentile"
    shown, source = _file_window(values, ds, notes)
    if shown is not None:
        return shown, source
    return _window(values, float(values.min()), float(values.max())), "min-max (flat content)"


# What a header may ask to be decoded. A mammogram is about 4,000 x 5,000 pixels, a CT series in one file a
# few hundred 512 x 512 frames; a header claiming 60000 x 60000 x 1000 is refused before any pixel is decoded.
MAX_SIDE = 16384
MAX_FRAMES = 2048
MAX_DECODED_BYTES = 1 << 30


def _header_int(ds: object, name: str, default: int) -> int:
    value = getattr(ds, name, None)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except Exception:
        raise ImageReadError(f"cannot read: malformed {name} in the header ({str(value)[:20]!r})") from None


def _check_size(ds: object) -> tuple[int, int, int, int]:
    """(rows, columns, frames, samples) from the header, refused when absurd: before any decoding."""
    rows, cols = _header_int(ds, "Rows", 0), _header_int(ds, "Columns", 0)
    frames, samples = _header_int(ds, "NumberOfFrames", 1), _header_int(ds, "SamplesPerPixel", 1)
    bits = _header_int(ds, "BitsAllocated", 16)
    if rows <= 0 or cols <= 0:
        raise ImageReadError("cannot read: no image size in the header (Rows, Columns)")
    if rows > MAX_SIDE or cols > MAX_SIDE:
        raise ImageReadError(f"image of {rows} x {cols} pixels: over {MAX_SIDE} a side, not decoded")
    if not 1 <= frames <= MAX_FRAMES:
        raise ImageReadError(f"cannot read: NumberOfFrames is {frames} (1 to {MAX_FRAMES} are read)")
    if samples not in (1, 3):
        raise ImageReadError(f"cannot read: SamplesPerPixel is {samples} (1 or 3 are read)")
    if bits not in (1, 8, 16, 32, 64):
        raise ImageReadError(f"cannot read: BitsAllocated is {bits} (1, 8, 16, 32 or 64 are read)")
    nbytes = rows * cols * frames * samples * max(bits, 8) // 8
    if nbytes > MAX_DECODED_BYTES:
        raise ImageReadError(f"image of {rows} x {cols} x {frames} frames: {nbytes / 2**30:.1f} GiB decoded, "
                             f"over the {MAX_DECODED_BYTES >> 30} GiB bound, not decoded")
    return rows, cols, frames, samples


def _read_header(path: Path) -> tuple[object, bool]:
    """The parsed dataset, and whether pydicom met the end of the file early."""
    import pydicom

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            raise ImageReadError("not DICOM (no 'DICM' preamble or file meta header)") from None
        except Exception:  # pydicom raises many types for broken headers
            raise ImageReadError("cannot read: malformed DICOM header") from None
    return ds, any("End of file" in str(w.message) for w in caught)


def _decode(ds: object, multiframe: str, notes: list[str]) -> DicomImage:
    """Header bounds, pixel decoding and display semantics of an already parsed dataset."""
    from pydicom.pixels import apply_color_lut

    rows, cols, frames, samples = _check_size(ds)
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    syntax_name = getattr(syntax, "name", str(syntax or "unknown"))
    try:
        arr = ds.pixel_array
    except INTERRUPTS:
        raise
    except BaseException:  # also a Rust decoder's panic (pyo3's PanicException is no Exception)
        raise ImageReadError(f"cannot decode pixel data ({syntax_name})") from None
    arr = _pick_frame(arr, frames, samples, multiframe)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim not in (2, 3) or min(arr.shape[:2]) < 1 or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ImageReadError(f"cannot read: decoded pixel data has shape {arr.shape}, not an image")
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds).astype(np.float32)
        except Exception:
            raise ImageReadError("cannot read: malformed palette colour lookup table") from None
        pixels, window = rgb / max(float(rgb.max()), 1.0), "palette"
        box = border_box(pixels)
    elif arr.ndim == 3:  # RGB, or YBR already converted to RGB by pydicom
        rgb = arr.astype(np.float32)
        pixels, window = rgb / (255.0 if rgb.max() <= 255 else float(rgb.max())), "colour"
        box = border_box(pixels)
    else:
        values = _modality(arr, ds, notes)
        box = border_box(values)  # before windowing: the window is the content's, never a border's
        pixels, window = _grey_window(values, box, ds, notes)
        if photometric == "MONOCHROME1":
            np.subtract(1.0, pixels, out=pixels)
    if not np.isfinite(pixels).all():
        raise ImageReadError("cannot read: pixel values out of range after rescale")
    return DicomImage(
        pixels=pixels.astype(np.float32, copy=False),  # already a fresh array of its own
        patient_id=pseudonym(str(getattr(ds, "PatientID", "") or "")),
        sop_uid=str(getattr(ds, "SOPInstanceUID", "") or ""),
        modality=str(getattr(ds, "Modality", "") or "unknown"),
        body_part=str(getattr(ds, "BodyPartExamined", "") or "unknown"),
        photometric=photometric,
        transfer_syntax=syntax_name,
        rows=rows,
        cols=cols,
        bits_stored=_header_int(ds, "BitsStored", 0),
        frames=frames,
        window=window,
        notes=list(notes),
        content_box=box,
    )


def read_dicom(path: Path, multiframe: str = "middle") -> DicomImage:
    """Decode one file with the pixel semantics above.

    Raises ImageReadError with a one-line reason for anything unusable, whatever is wrong in the file:
    a malformed header value, a decoder's failure or an odd sequence never escapes as another error.
    Malformed LUT, rescale or window values that have a fallback are used with a note instead
    (``DicomImage.notes``). Sizes are bounded before decoding (``_check_size``).
    """
    ds, truncated = _read_header(path)
    try:
        if "PixelData" not in ds:
            raise ImageReadError("truncated file: pixel data incomplete" if truncated else "no pixel data")
        with warnings.catch_warnings():  # what pydicom warns of is a note or a skip reason here
            warnings.simplefilter("ignore")
            return _decode(ds, multiframe, [])
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError("cannot read: not enough memory to decode this image") from None
    except INTERRUPTS:
        raise
    except BaseException:  # a malformed element read lazily (pydicom parses values on access), a panic
        raise ImageReadError("cannot read: malformed DICOM element") from None


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
