"""Image data sources a hospital can point fedrad at, read into one in-memory set.

Supported layouts (detected in this order):
- a MedMNIST-style ``.npz`` (``*_images`` with ``*_labels``; all splits are pooled,
  since each site carves its own validation split);
- a folder with ``labels.csv`` (``path,label`` columns, optional ``patient_id``;
  label is a class name or a class index) of DICOM, PNG or JPEG files;
- a folder with one subfolder per class.
Every image becomes (C, S, S) float32 in [0, 1], padded to a square (never
stretched). Unusable files are skipped with a reason, never fatal.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from common.dicom import is_dicom, read_dicom
from common.errors import DataError, ImageReadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


@dataclass
class ImageSet:
    """Images, labels and identities of one site's (or one source's) data."""

    images: np.ndarray  # (N, C, S, S) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64 class indices
    groups: np.ndarray  # (N,) patient ids: rows of one patient stay in one split
    keys: list[str]  # stable identity of each row, independent of preprocessing
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray | list[int]) -> ImageSet:
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(self.images[idx], self.labels[idx], self.groups[idx], [self.keys[i] for i in idx], self.skipped)

    def fingerprint(self) -> str:
        """Identity of the records (not of the preprocessing): the privacy ledger's key."""
        digest = hashlib.sha256()
        for key in sorted(self.keys):
            digest.update(key.encode() + b"\n")
        return digest.hexdigest()[:16]

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()

    def skip_summary(self) -> str:
        """'3 skipped: 2 x no pixel data, 1 x unknown label' (empty when none)."""
        if not self.skipped:
            return ""
        reasons = Counter(reason for _, reason in self.skipped)
        return f"{len(self.skipped)} skipped: " + ", ".join(f"{n} x {r}" for r, n in reasons.most_common())


def fit_square(pixels: np.ndarray, size: int, channels: int) -> np.ndarray:
    """(H, W[, 3]) float in [0, 1] -> (channels, size, size): pad to square, then resize."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if channels == 1 and pixels.shape[2] == 3:
        pixels = (pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    h, w, c = pixels.shape
    side = max(h, w)
    square = np.zeros((side, side, c), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = pixels
    planes = [
        np.asarray(Image.fromarray(square[..., k], mode="F").resize((size, size), Image.BILINEAR)) for k in range(c)
    ]
    out = np.stack(planes)
    if channels == 3 and c == 1:
        out = np.repeat(out, 3, axis=0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def read_image(path: Path) -> tuple[np.ndarray, str]:
    """Pixels in [0, 1] and the patient id ('' when unknown) of one file."""
    if is_dicom(path):
        return read_dicom(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I", "F"):
                arr = np.asarray(img, dtype=np.float32)
                return arr / max(float(arr.max()), 1.0), ""
            arr = np.asarray(img.convert("RGB") if img.mode != "L" else img, dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise ImageReadError(f"unreadable image ({type(exc).__name__})") from None
    return arr / 255.0, ""


def _label_index(raw: str, classes: list[str]) -> int:
    raw = raw.strip()
    if raw in classes:
        return classes.index(raw)
    lowered = [c.lower() for c in classes]
    if raw.lower() in lowered:
        return lowered.index(raw.lower())
    if raw.lstrip("-").isdigit() and 0 <= int(raw) < len(classes):
        return int(raw)
    raise ImageReadError(f"unknown label '{raw}'")


def _load_npz(path: Path, size: int, channels: int, num_classes: int) -> ImageSet:
    try:
        npz = np.load(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz ({type(exc).__name__})") from None
    prefixes = [k[: -len("_images")] for k in npz.files if k.endswith("_images")]
    splits = sorted(p for p in prefixes if f"{p}_labels" in npz.files)
    if not splits:
        raise DataError(f"{path}: no '<split>_images' with '<split>_labels' arrays")
    source = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    images, labels, keys, skipped = [], [], [], []
    for split in splits:
        imgs, labs = npz[f"{split}_images"], np.asarray(npz[f"{split}_labels"]).reshape(-1)
        if imgs.ndim not in (3, 4) or len(imgs) != len(labs):
            raise DataError(f"{path}: '{split}_images' has shape {imgs.shape}, expected (N, H, W[, C])")
        scale = 255.0 if imgs.dtype == np.uint8 else max(float(imgs.max()), 1.0)
        for i in range(len(imgs)):
            key = f"npz:{source}:{split}:{i}"
            if not 0 <= int(labs[i]) < num_classes:
                skipped.append((key, f"unknown label '{int(labs[i])}'"))
                continue
            images.append(fit_square(imgs[i].astype(np.float32) / scale, size, channels))
            labels.append(int(labs[i]))
            keys.append(key)
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), np.asarray(keys), keys, skipped)


def _listing(root: Path, classes: list[str]) -> tuple[list[tuple[Path, str, str]], list[tuple[str, str]]]:
    """(file, raw label, patient id) rows from labels.csv or class subfolders."""
    labels_csv = root / "labels.csv"
    rows: list[tuple[Path, str, str]] = []
    skipped: list[tuple[str, str]] = []
    if labels_csv.is_file():
        with open(labels_csv, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise DataError(f"{labels_csv}: needs a header with 'path' and 'label' columns")
            for line in reader:
                rel = (line.get("path") or "").strip()
                if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
                    skipped.append((rel or "<empty>", "path must be relative and inside the folder"))
                    continue
                rows.append((root / rel, line.get("label") or "", (line.get("patient_id") or "").strip()))
        return rows, skipped
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not subdirs:
        raise DataError(f"{root}: no labels.csv and no class subfolders")
    for d in subdirs:
        for f in sorted(d.rglob("*")):
            if f.is_file() and (f.suffix.lower() in IMAGE_SUFFIXES or is_dicom(f)):
                rows.append((f, d.name, ""))
    return rows, skipped


def _load_folder(root: Path, size: int, channels: int, classes: list[str]) -> ImageSet:
    rows, skipped = _listing(root, classes)
    images, labels, groups, keys = [], [], [], []
    for path, raw_label, patient in rows:
        rel = path.relative_to(root).as_posix()
        try:
            label = _label_index(raw_label, classes)
            if not path.is_file():
                raise ImageReadError("file not found")
            pixels, dicom_patient = read_image(path)
            images.append(fit_square(pixels, size, channels))
        except ImageReadError as exc:
            skipped.append((rel, str(exc)))
            continue
        labels.append(label)
        groups.append(patient or dicom_patient or rel)
        keys.append(f"{rel}:{path.stat().st_size}")
    if not images:
        empty = np.zeros((0, channels, size, size), np.float32)
        return ImageSet(empty, np.zeros(0, np.int64), np.zeros(0, str), [], skipped)
    return ImageSet(np.stack(images), np.asarray(labels, np.int64), np.asarray(groups), keys, skipped)


@lru_cache(maxsize=4)
def _load_cached(path: str, size: int, channels: int, class_names: tuple[str, ...]) -> ImageSet:
    source = Path(path)
    if source.is_file() and source.suffix == ".npz":
        return _load_npz(source, size, channels, len(class_names))
    return _load_folder(source, size, channels, list(class_names))


def load_images(path: str | Path, size: int, channels: int, classes: list[str]) -> ImageSet:
    """Read a data source (cached per process, so later rounds do not re-decode)."""
    source = Path(path).expanduser()
    if not source.exists():
        raise DataError(f"data path not found: {source}")
    if source.is_file() and source.suffix != ".npz":
        raise DataError(f"{source}: expected a folder or a .npz file")
    data = _load_cached(str(source.resolve()), size, channels, tuple(classes))
    if len(data) == 0:
        detail = data.skip_summary() or "no image files"
        raise DataError(f"{source}: no usable images ({detail})")
    return data


def native_size(path: str | Path) -> int | None:
    """Side of the (square) images stored in a .npz; None for folders, whose files vary."""
    source = Path(path)
    if not (source.is_file() and source.suffix == ".npz"):
        return None
    try:
        with np.load(source) as npz:
            shape = next(npz[k].shape for k in npz.files if k.endswith("_images"))
    except (OSError, ValueError, StopIteration):
        return None
    return int(shape[1]) if shape[1] == shape[2] else None


def site_folders(path: str | Path) -> list[Path]:
    """Subfolders that are datasets of their own: a folder of sites (natural partition)."""
    root = Path(path)
    if not root.is_dir() or (root / "labels.csv").exists():
        return []
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    if subdirs and all((d / "labels.csv").is_file() for d in subdirs):
        return subdirs
    return []
