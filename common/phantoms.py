"""Built-in demo data: synthetic chest-radiograph phantoms written as DICOM.

Each image is a body ellipse with two dark lungs, a bright mediastinum and
heart, and rib arcs; "pneumonia" phantoms add one to three patchy opacities in
a lung. Sites differ the way real hospitals do: exposure, contrast, noise,
MONOCHROME1 vs MONOCHROME2, 12 vs 16 stored bits, RLE-compressed or not, with
or without window tags, so the demo reads files through the same DICOM path
as a hospital's own. ``export_site`` writes any images (these phantoms, or real
ones: benchmarks/accuracy.py) as one hospital's folder with its own encoding
and, optionally, its own acquisition geometry (``SiteAcquisition``: field of
view, collimation or padding borders, detector size, processing curve).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.dicom import write_dicom

CLASS_NAMES = ("normal", "pneumonia")


@dataclass(frozen=True)
class SiteEncoding:
    """How one hospital's PACS writes its DICOM files (the pixels are the caller's)."""

    photometric: str = "MONOCHROME2"  # MONOCHROME1 stores inverted values
    bits_stored: int = 12
    transfer_syntax: str = "explicit"  # one of common.dicom.WRITABLE_SYNTAXES
    window_tags: bool = True  # without them readers fall back to a percentile window

    def describe(self) -> str:
        window = "window tags" if self.window_tags else "no window tags"
        return f"{self.photometric}, {self.bits_stored}-bit, {self.transfer_syntax}, {window}"


def add_border(pixels: np.ndarray, value: float, top: float, bottom: float, left: float, right: float) -> np.ndarray:
    """``pixels`` inside constant bands of ``value`` (a collimator's shadow, or a PACS's padding); each band's
    width is a fraction of that side of the image."""
    h, w = pixels.shape
    t, b, lf, r = round(top * h), round(bottom * h), round(left * w), round(right * w)
    out = np.full((h + t + b, w + lf + r), value, np.float32)
    out[t : t + h, lf : lf + w] = pixels
    return out


def rescale(pixels: np.ndarray, factor: float) -> np.ndarray:
    """The same view on a finer (``factor`` > 1) or coarser detector: ``factor`` times as many pixels a side."""
    from PIL import Image

    h, w = pixels.shape
    image = Image.fromarray(np.asarray(pixels, np.float32), mode="F")
    image = image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BILINEAR)
    return np.clip(np.asarray(image), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class SiteAcquisition:
    """How one hospital's detector frames an image, before its PACS encodes it (``SiteEncoding``).

    Applied in this order: the field of view is cut to ``aspect`` (width / height; < 1 portrait, > 1 landscape,
    1 keeps the frame), the pixels go through the site's processing curve ``x ** gamma``, the detector samples
    ``detector_scale`` times as many pixels a side, and the frame gets constant bands of ``border_value``
    (0 black, 1 white, in [0, 1] bright = dense) of widths ``border`` = (top, bottom, left, right), fractions of
    each side. The default changes nothing.
    """

    aspect: float = 1.0
    gamma: float = 1.0
    detector_scale: float = 1.0
    border_value: float = 0.0
    border: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        out = np.asarray(pixels, np.float32)
        h, w = out.shape
        if self.aspect > w / h:  # wider than the frame: cut rows
            keep = round(w / self.aspect)
            out = out[(h - keep) // 2 : (h - keep) // 2 + keep]
        elif self.aspect < w / h:  # narrower: cut columns
            keep = round(h * self.aspect)
            out = out[:, (w - keep) // 2 : (w - keep) // 2 + keep]
        if self.gamma != 1.0:
            out = np.clip(out, 0.0, 1.0) ** self.gamma
        if self.detector_scale != 1.0:
            out = rescale(out, self.detector_scale)
        if any(self.border):
            out = add_border(out, self.border_value, *self.border)
        return np.ascontiguousarray(out, np.float32)

    def describe(self) -> str:
        parts = []
        if self.aspect != 1.0:
            parts.append(f"{'portrait' if self.aspect < 1 else 'landscape'} {self.aspect:g}:1")
        if any(self.border):
            shade = {0.0: "black", 1.0: "white"}.get(self.border_value, "grey")
            parts.append(f"{shade} borders {'/'.join(f'{100 * b:g}' for b in self.border)}%")
        if self.detector_scale != 1.0:
            parts.append(f"detector x{self.detector_scale:g}")
        if self.gamma != 1.0:
            parts.append(f"gamma {self.gamma:g}")
        return ", ".join(parts) or "square, no borders"


def export_site(
    folder: Path, records: Iterable[tuple[str, np.ndarray, str, str]], encoding: SiteEncoding, comment: str = "",
    acquisition: SiteAcquisition = SiteAcquisition(),
) -> int:
    """Write one hospital folder: ``images/<name>.dcm`` per record and ``labels.csv`` (path, label).

    ``records`` yields (name, pixels (H, W) in [0, 1] bright = dense, patient id, label); the
    patient id goes into PatientID, so splits keep a patient's images together. ``comment``
    (ImageComments) may use ``{label}``. ``acquisition`` frames each image as the site's detector
    would before it is encoded. Returns the number of images written.
    """
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, pixels, patient, label in records:
        rel = f"images/{name}.dcm"
        write_dicom(
            folder / rel,
            acquisition.apply(pixels),
            photometric=encoding.photometric,
            bits_stored=encoding.bits_stored,
            transfer_syntax=encoding.transfer_syntax,
            window=encoding.window_tags,
            patient_id=patient,
            comment=comment.format(label=label),
        )
        rows.append((rel, label))
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return len(rows)


@dataclass(frozen=True)
class SiteStyle:
    """How one simulated hospital's scanner and PACS export images."""

    photometric: str  # MONOCHROME1 or MONOCHROME2
    bits_stored: int
    rle: bool
    window_tags: bool
    exposure: float  # overall brightness gain
    noise: float  # sd of quantum-like noise, fraction of range
    pneumonia_rate: float

    @property
    def encoding(self) -> SiteEncoding:
        return SiteEncoding(self.photometric, self.bits_stored, "rle" if self.rle else "explicit", self.window_tags)


SITE_STYLES = (
    SiteStyle("MONOCHROME2", 16, False, True, 1.0, 0.03, 0.5),
    SiteStyle("MONOCHROME1", 12, True, False, 0.85, 0.05, 0.35),
    SiteStyle("MONOCHROME2", 12, True, True, 1.15, 0.04, 0.65),
    SiteStyle("MONOCHROME1", 16, False, True, 0.95, 0.06, 0.5),
)


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def chest_phantom(rng: np.random.Generator, size: int, pneumonia: bool) -> np.ndarray:
    """One phantom as attenuation in [0, 1] (bright = dense), shape (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    jitter = lambda s: rng.normal(0, s)  # noqa: E731
    img = np.zeros((size, size), np.float32)
    img[_ellipse(yy, xx, 0.55 + jitter(0.02), 0.5, 0.45, 0.42 + jitter(0.02))] = 0.55
    lungs = []
    for side in (-1, 1):
        lung = _ellipse(yy, xx, 0.5 + jitter(0.02), 0.5 + side * (0.18 + jitter(0.01)), 0.28, 0.13 + jitter(0.01))
        lungs.append(lung)
        img[lung] = 0.18
    for k in range(6):  # rib arcs across the lungs
        arc = np.abs(yy - (0.3 + 0.08 * k) - 0.06 * np.cos((xx - 0.5) * 6)) < 0.012
        img[arc & (lungs[0] | lungs[1])] += 0.18
    img[_ellipse(yy, xx, 0.5, 0.5, 0.35, 0.05)] = 0.75  # mediastinum / spine
    img[_ellipse(yy, xx, 0.62, 0.45 + jitter(0.01), 0.12, 0.11)] = 0.7  # heart
    if pneumonia:
        for _ in range(rng.integers(1, 4)):
            lung = lungs[rng.integers(0, 2)]
            ys, xs = np.nonzero(lung)
            i = rng.integers(0, len(ys))
            cy, cx = ys[i] / size, xs[i] / size
            r = rng.uniform(0.07, 0.12)
            blob = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
            texture = 0.7 + 0.3 * rng.random((size, size)).astype(np.float32)
            img += (rng.uniform(0.3, 0.5) * blob * texture * lung).astype(np.float32)
    return np.clip(img, 0, 1)


def _phantom_records(rng: np.random.Generator, style: SiteStyle, site: int, per_site: int, size: int):
    """One site's phantoms as export_site records, two images per patient."""
    for i in range(per_site):
        label = CLASS_NAMES[int(rng.random() < style.pneumonia_rate)]
        img = chest_phantom(rng, size, label == "pneumonia") * style.exposure
        img = img + rng.normal(0, style.noise, img.shape).astype(np.float32)
        yield f"img-{i:04d}", np.clip(img, 0, 1), f"H{site + 1}P{i // 2:04d}", label


def write_demo_sites(
    out: Path, num_sites: int = 3, per_site: int = 300, size: int = 96, seed: int = 0
) -> list[Path]:
    """Write ``num_sites`` hospital folders (DICOM + labels.csv) under ``out``.

    Two images per patient, so patient-grouped splitting is exercised.
    """
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    for s in range(num_sites):
        style = SITE_STYLES[s % len(SITE_STYLES)]
        folder = out / f"hospital-{s + 1}"
        records = _phantom_records(np.random.default_rng([seed, s]), style, s, per_site, size)
        export_site(folder, records, style.encoding, comment="fedrad synthetic phantom ({label})")
        folders.append(folder)
    return folders
