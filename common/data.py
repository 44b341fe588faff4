"""Image data sources a hospital can point fedrad at, read into one in-memory set.

Supported layouts (detected in this order):
- a MedMNIST-style ``.npz`` (``*_images`` with ``*_labels``; all splits are pooled,
  since each site carves its own validation split);
- a folder with ``labels.csv`` (``path,label`` columns, optional ``patient_id``
  and ``label_name``; label is a class name or a class index) of DICOM, PNG or JPEG files;
- a folder with one subfolder per class.
Every image becomes (C, S, S) float32 in [0, 1] by the model-input rule of
common/preprocess.py (uniform borders cropped, the content resized to fill the
square, never padded). Unusable files are skipped with a reason, never fatal. Labels are
matched to the study's classes by common/labels.py; a source whose labels are
mostly none of them is refused. What a source holds when no study says
(``source_classes``, ``source_channels``) is read from the data itself.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.dicom import INTERRUPTS, DicomImage, is_dicom, read_dicom
from common.errors import DataError, ImageReadError
from common.labels import UNLABELLED, classes_from_labels, is_unlabelled, match_labels
from common.preprocess import fit_square
from common.progress import Progress

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


@dataclass
class ImageSet:
    """Images, labels and identities of one site's (or one source's) data."""

    images: np.ndarray  # (N, C, S, S) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64 class indices
    groups: np.ndarray  # (N,) patient ids: rows of one patient stay in one split
    keys: list[str]  # stable identity of each row, independent of preprocessing
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)
    # Per row the DICOM (Modality, PhotometricInterpretation), None for an image without a DICOM header (PNG,
    # JPEG, .npz): what common/acquisition.py summarises. Empty where not known.
    acquisition: list[tuple[str, str] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray | list[int]) -> ImageSet:
        idx = np.asarray(idx, dtype=np.int64)
        acquisition = [self.acquisition[i] for i in idx] if self.acquisition else []
        return ImageSet(self.images[idx], self.labels[idx], self.groups[idx], [self.keys[i] for i in idx], self.skipped,
                        acquisition)

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


def read_image(path: Path) -> tuple[np.ndarray, str]:
    """Pixels in [0, 1] and the patient id ('' when unknown) of one file."""
    if is_dicom(path):
        image = read_dicom(path)
        return image.pixels, image.patient_id
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I", "F"):
                arr = np.asarray(img, dtype=np.float32)
                return arr / max(float(arr.max()), 1.0), ""
            arr = np.asarray(img.convert("RGB") if img.mode != "L" else img, dtype=np.float32)
    except Image.DecompressionBombError:
        raise ImageReadError("cannot read: image too large (over Pillow's decompression-bomb bound)") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(f"cannot read: not a {path.suffix.lstrip('.').upper() or 'PNG or JPEG'} image") from None
    except Exception:  # a truncated or corrupt file fails in the decoder with any of several errors
        raise ImageReadError("cannot read: damaged or truncated image file") from None
    return arr / 255.0, ""


def _npz_splits(path: Path) -> tuple[Any, list[str]]:
    """The opened .npz and its splits (each with ``<split>_images`` and ``<split>_labels``)."""
    try:
        npz = np.load(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz ({type(exc).__name__})") from None
    prefixes = [k[: -len("_images")] for k in npz.files if k.endswith("_images")]
    splits = sorted(p for p in prefixes if f"{p}_labels" in npz.files)
    if not splits:
        raise DataError(f"{path}: no '<split>_images' with '<split>_labels' arrays")
    return npz, splits


def _npz_labels(path: Path, npz: Any, split: str) -> np.ndarray:
    """One split's labels as integers (an .npz labels by class index); a DataError for anything else."""
    labels = np.asarray(npz[f"{split}_labels"])
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(f"{path}: '{split}_labels' has shape {labels.shape}: one class index per image is needed "
                        "(multi-label data is not supported)")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise DataError(f"{path}: '{split}_labels' holds {labels.dtype} values, not class indices")
    return labels.reshape(-1).astype(np.int64)


def _npz_names(npz: Any) -> dict[str, str]:
    """The class names of an .npz's optional ``label_names`` array (index -> name)."""
    if "label_names" not in npz.files:
        return {}
    try:
        names = np.asarray(npz["label_names"]).reshape(-1).tolist()
    except ValueError:  # an object array (pickled): never loaded
        raise DataError("'label_names' of the .npz must be an array of strings (not pickled objects)") from None
    return {str(i): str(n) for i, n in enumerate(names)}


def _load_npz(path: Path, size: int, channels: int, classes: list[str]) -> ImageSet:
    npz, splits = _npz_splits(path)
    source = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    arrays = []
    for split in splits:
        imgs, labs = npz[f"{split}_images"], _npz_labels(path, npz, split)
        if imgs.ndim not in (3, 4) or len(imgs) != len(labs):
            raise DataError(f"{path}: '{split}_images' has shape {imgs.shape}, expected (N, H, W[, C])")
        arrays.append((split, imgs, labs))
    # A negative label is an unlabelled image (common/labels.py): skipped, never matched to a class.
    match = match_labels([str(v) for _, _, labs in arrays for v in labs.tolist() if v >= 0], classes)
    match.check(str(path), _npz_names(npz))  # most labels outside the study's classes: not this study's data
    images, labels, keys, skipped = [], [], [], []
    row = 0
    for split, imgs, labs in arrays:
        scale = 255.0 if imgs.dtype == np.uint8 else max(float(imgs.max()), 1.0)
        for i in range(len(imgs)):
            key = f"npz:{source}:{split}:{i}"
            if labs[i] < 0:
                skipped.append((key, UNLABELLED))
                continue
            index = int(match.indices[row])
            row += 1
            if index < 0:
                skipped.append((key, f"unknown label '{int(labs[i])}'"))
                continue
            images.append(fit_square(imgs[i].astype(np.float32) / scale, size, channels))
            labels.append(index)
            keys.append(key)
    if not images:
        return ImageSet(np.zeros((0, channels, size, size), np.float32), np.zeros(0, np.int64), np.zeros(0, str),
                        [], skipped)
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), np.asarray(keys), keys, skipped,
                    [None] * len(images))


LABELS_FILE = "labels.csv"
DUPLICATE = "duplicate SOPInstanceUID (used once)"
NO_LABEL = "no label"
UID_COLUMNS = ("sop_instance_uid", "SOPInstanceUID")


@dataclass
class LabelTable:
    """labels.csv keyed by relative path or by SOPInstanceUID, or class subfolder names."""

    by_path: dict[str, tuple[str, str]] = field(default_factory=dict)  # rel -> (raw label, patient id)
    by_uid: dict[str, tuple[str, str]] = field(default_factory=dict)
    from_folders: bool = False
    names: dict[str, str] = field(default_factory=dict)  # raw label -> its label_name column, where given

    @classmethod
    def read(
        cls, root: Path, labels_csv: Path | None = None, required: bool = True
    ) -> tuple[LabelTable, list[tuple[str, str]]]:
        """The table and the rows it could not use, each with a reason.

        With ``required=False`` a folder without labels gives an empty table
        (every image is then "no label"), so a data check can still describe it.
        """
        labels_csv = labels_csv or root / LABELS_FILE
        skipped: list[tuple[str, str]] = []
        if not labels_csv.is_file():
            if labels_csv != root / LABELS_FILE:
                raise DataError(f"labels file not found: {labels_csv}")
            if not any(d.is_dir() for d in root.iterdir()):
                if not required:
                    return cls(), skipped
                raise DataError(f"{root}: no labels.csv and no class subfolders")
            return cls(from_folders=True), skipped
        table = cls()
        with open(labels_csv, newline="") as fh:
            reader = csv.DictReader(fh)
            columns = set(reader.fieldnames or [])
            uid_col = next((c for c in UID_COLUMNS if c in columns), None)
            if "label" not in columns or not ({"path"} & columns or uid_col):
                raise DataError(f"{labels_csv}: needs a header with 'label' and 'path' or 'sop_instance_uid'")
            for line in reader:
                value = (line.get("label") or "", (line.get("patient_id") or "").strip())
                table._name(labels_csv, value[0].strip(), (line.get("label_name") or "").strip())
                rel = (line.get("path") or "").strip()
                if rel:
                    if Path(rel).is_absolute() or ".." in Path(rel).parts:
                        skipped.append((rel, "path must be relative and inside the folder"))
                        continue
                    key = Path(rel).as_posix()
                    if key in table.by_path:
                        skipped.append((rel, "listed twice in labels.csv (first row used)"))
                        continue
                    table.by_path[key] = value
                elif uid_col and (line.get(uid_col) or "").strip():
                    table.by_uid[line[uid_col].strip()] = value
        return table, skipped

    def _name(self, labels_csv: Path, label: str, name: str) -> None:
        """Note ``label``'s label_name; one label with two names is a DataError (which class is it?)."""
        if not (label and name):
            return
        known = self.names.setdefault(label, name)
        if known != name:
            raise DataError(f"{labels_csv}: label '{label}' has two label_name values, '{known}' and '{name}'")

    def raw_labels(self, root: Path) -> list[str]:
        """Every label the table gives (one per row; the class subfolders' names for a folder of folders)."""
        if self.from_folders:
            return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        return [label for label, _ in [*self.by_path.values(), *self.by_uid.values()]]

    def files(self, root: Path) -> list[Path]:
        """The files to read: those labels.csv names, or every file under ``root``."""
        if self.by_path and not self.by_uid:
            return [root / rel for rel in self.by_path]
        return sorted(
            f for f in root.rglob("*")
            if f.is_file() and f.name != LABELS_FILE and not any(p.startswith(".") for p in f.relative_to(root).parts)
        )

    def lookup(self, rel: str, uid: str) -> tuple[str, str] | None:
        if self.from_folders:
            return (rel.split("/")[0], "") if "/" in rel else None
        return self.by_path.get(rel) or (self.by_uid.get(uid) if uid else None)


@dataclass
class Decoded:
    """One file as the model will see it, with the facts a data check reports."""

    rel: str
    pixels: np.ndarray | None  # (C, S, S) or None when unusable
    reason: str  # why it is unusable ('' when usable)
    header: DicomImage | None  # DICOM facts (pixels dropped); None for PNG/JPEG
    size_bytes: int


def decode_file(root: Path, path: Path, size: int, channels: int, multiframe: str = "middle") -> Decoded:
    """Read, window and resize one file (top-level so a process pool can run it)."""
    rel = path.relative_to(root).as_posix()
    if not path.is_file():
        return Decoded(rel, None, "file not found", None, 0)
    nbytes = path.stat().st_size
    try:
        if is_dicom(path):
            header = read_dicom(path, multiframe)
            pixels = fit_square(header.pixels, size, channels, header.content_box)
            header.pixels = np.zeros(0, np.float32)  # keep the facts, not the full-resolution copy
            return Decoded(rel, pixels, "", header, nbytes)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            return Decoded(rel, None, "not DICOM, PNG or JPEG", None, nbytes)
        pixels, _ = read_image(path)
        return Decoded(rel, fit_square(pixels, size, channels), "", None, nbytes)
    except ImageReadError as exc:
        return Decoded(rel, None, str(exc), None, nbytes)
    except MemoryError:
        return Decoded(rel, None, "cannot read: not enough memory to decode this image", None, nbytes)
    except INTERRUPTS:
        raise
    except BaseException:  # one file never stops a scan: whatever else fails is this file's skip reason
        return Decoded(rel, None, "cannot read: the image could not be resized for the model", None, nbytes)


# A file whose decode runs longer is stopped and skipped. The slowest real file seen decodes in 3.6 s
# (a 6 MB multi-frame JPEG of pydicom's test files); a 2,000-mutant fuzz run's slowest took under 1 s.
FILE_SECONDS = 60.0


def decode_files(
    root: Path, paths: list[Path], size: int, channels: int, workers: int = 1, multiframe: str = "middle",
    into: str = "",
) -> list[Decoded]:
    """decode_file for each path, in ``workers`` worker processes (common/isolation.py), in order.

    A file whose decoder hangs (past ``FILE_SECONDS``) or crashes its process is skipped with that reason;
    the other files go on. Long decodes report their progress (common/progress.py):
    "decoding 5216 files of site-1{into} ...".
    """
    from common.isolation import Failure, isolated_map

    n = len(paths)
    if not n:
        return []
    results: list[Decoded | None] = [None] * n
    jobs = [(root, p, size, channels, multiframe) for p in paths]
    with Progress(n, f"decoding {n} files of {root.name or root}{into}") as progress:
        for i, item in isolated_map(decode_file, jobs, max(1, min(workers, n // 16 + 1)), FILE_SECONDS):
            if isinstance(item, Failure):
                item = Decoded(paths[i].relative_to(root).as_posix(), None, f"cannot read: {item.reason}", None,
                               _size(paths[i]))
            results[i] = item
            progress.advance()
    return results  # type: ignore[return-value]  (every index is filled)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def scan_folder(
    root: Path, table: LabelTable, size: int, channels: int, workers: int = 1, multiframe: str = "middle"
) -> list[Decoded]:
    """Decode every candidate file of ``root`` (no cache)."""
    return decode_files(root, table.files(root), size, channels, workers, multiframe)


@dataclass
class Labelled:
    """A decoded, labelled, unique image (before its label is mapped to a class index)."""

    item: Decoded
    raw_label: str
    patient: str


def resolve_labels(items: list[Decoded], table: LabelTable) -> tuple[list[Labelled], list[tuple[str, str]]]:
    """Keep decodable, labelled images, each SOPInstanceUID once; the rest with a reason."""
    kept: list[Labelled] = []
    skipped: list[tuple[str, str]] = []
    seen_uids: set[str] = set()
    for item in items:
        if item.pixels is None:
            skipped.append((item.rel, item.reason))
            continue
        uid = item.header.sop_uid if item.header else ""
        if uid and uid in seen_uids:
            skipped.append((item.rel, DUPLICATE))
            continue
        found = table.lookup(item.rel, uid)
        if found is None:
            skipped.append((item.rel, NO_LABEL))
            continue
        if is_unlabelled(found[0]):
            skipped.append((item.rel, UNLABELLED))
            continue
        if uid:
            seen_uids.add(uid)
        patient = found[1] or (item.header.patient_id if item.header else "") or item.rel
        kept.append(Labelled(item, found[0].strip(), patient))
    return kept, skipped


def _load_folder(root: Path, size: int, channels: int, classes: list[str], multiframe: str = "middle",
                 workers: int = 1) -> ImageSet:
    table, skipped = LabelTable.read(root)
    if os.environ.get("FEDRAD_CACHE") == "off":
        items = scan_folder(root, table, size, channels, workers, multiframe)
    else:
        from common.cache import cached_scan  # cache builds on this module

        items, _ = cached_scan(root, table, size, channels, workers, multiframe)
    kept, not_used = resolve_labels(items, table)
    skipped += not_used
    match = match_labels([row.raw_label for row in kept], classes)
    match.check(str(root), table.names)  # most labels outside the study's classes: not this study's data
    images, labels, groups, keys, acquisition = [], [], [], [], []
    for row, index in zip(kept, match.indices):
        if index < 0:
            skipped.append((row.item.rel, f"unknown label '{row.raw_label}'"))
            continue
        labels.append(int(index))
        header = row.item.header
        acquisition.append((header.modality, header.photometric) if header else None)
        uid = header.sop_uid if header else ""
        images.append(row.item.pixels)
        groups.append(row.patient)
        keys.append(f"{uid or row.item.rel}:{row.item.size_bytes}")
    if not images:
        empty = np.zeros((0, channels, size, size), np.float32)
        return ImageSet(empty, np.zeros(0, np.int64), np.zeros(0, str), [], skipped)
    return ImageSet(np.stack(images), np.asarray(labels, np.int64), np.asarray(groups), keys, skipped, acquisition)


@lru_cache(maxsize=4)
def _load_cached(path: str, size: int, channels: int, class_names: tuple[str, ...], multiframe: str) -> ImageSet:
    source = Path(path)
    if source.is_file() and source.suffix == ".npz":
        return _load_npz(source, size, channels, list(class_names))
    return _load_folder(source, size, channels, list(class_names), multiframe)


def forget_loaded() -> None:
    """Drop this process's in-memory copies (the on-disk cache stays)."""
    _load_cached.cache_clear()


def load_images(path: str | Path, size: int, channels: int, classes: list[str],
                multiframe: str = "middle") -> ImageSet:
    """Read a data source (cached per process, so later rounds do not re-decode)."""
    source = Path(path).expanduser()
    if not source.exists():
        raise DataError(f"data path not found: {source}")
    if source.is_file() and source.suffix != ".npz":
        raise DataError(f"{source}: expected a folder or a .npz file")
    data = _load_cached(str(source.resolve()), size, channels, tuple(classes), multiframe)
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


def npz_labels(path: Path) -> tuple[list[str], dict[str, str]]:
    """Every label of an .npz (its class indices as text, all splits in order) and the names of its optional
    ``label_names`` array (index -> name)."""
    npz, splits = _npz_splits(path)
    return [str(v) for split in splits for v in _npz_labels(path, npz, split).tolist()], _npz_names(npz)


def source_labels(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """Every label a data source gives (an .npz's class indices as text; labels.csv's labels; the class
    subfolders' names) and the names it gives integer labels (an .npz's ``label_names`` array, labels.csv's
    ``label_name`` column)."""
    source = Path(path).expanduser()
    if not source.exists():
        raise DataError(f"data path not found: {source}")
    if source.is_file():
        if source.suffix != ".npz":
            raise DataError(f"{source}: expected a folder or a .npz file")
        return npz_labels(source)
    table, _ = LabelTable.read(source)
    return table.raw_labels(source), table.names


def source_classes(*paths: str | Path) -> list[str]:
    """The class names data sources define together (common/labels.py ``classes_from_labels``)."""
    raw: list[str] = []
    names: dict[str, str] = {}
    for path in paths:
        labels, named = source_labels(path)
        raw += labels
        names = {**named, **names}
    return classes_from_labels(set(raw), names, ", ".join(str(p) for p in paths))


# A decoded image is colour when over COLOUR_SHARE of its pixels have channels more than COLOUR_SPREAD apart:
# grey stored as RGB (JPEG chroma noise included) stays grey; a few coloured annotation pixels do not count.
COLOUR_SPREAD, COLOUR_SHARE = 0.04, 0.01
CHANNEL_SAMPLE = 24  # files of a folder decoded to tell colour from grey


def is_colour(pixels: np.ndarray, channel_axis: int = 0) -> bool:
    """Whether an image in [0, 1] with 3 channels on ``channel_axis`` holds colour (see COLOUR_SPREAD)."""
    if pixels.ndim != 3 or pixels.shape[channel_axis] != 3:
        return False
    spread = pixels.max(axis=channel_axis) - pixels.min(axis=channel_axis)
    return bool(np.mean(spread > COLOUR_SPREAD) > COLOUR_SHARE)


def npz_colour_images(path: Path, sample: int = 0) -> int:
    """How many of an .npz's images hold colour (``is_colour``), of all or of ``sample`` spread over each split."""
    npz, splits = _npz_splits(path)
    found = 0
    for split in splits:
        imgs = npz[f"{split}_images"]
        if imgs.ndim == 4 and imgs.shape[3] == 3 and len(imgs):
            scale = 255.0 if imgs.dtype == np.uint8 else max(float(imgs.max()), 1.0)
            picks = np.unique(np.linspace(0, len(imgs) - 1, min(len(imgs), sample or len(imgs))).astype(int))
            found += sum(is_colour(imgs[i].astype(np.float32) / scale, channel_axis=2) for i in picks)
    return found


def source_channels(path: str | Path, workers: int = 1) -> int:
    """3 when a data source holds colour images (an .npz's (N, H, W, 3) arrays, or any of CHANNEL_SAMPLE files
    of a folder spread over its list), else 1: RGB stays RGB, grey stored as RGB becomes grey."""
    source = Path(path).expanduser()
    if source.is_file():
        return 3 if npz_colour_images(source, sample=256) else 1
    table, _ = LabelTable.read(source, required=False)
    files = table.files(source)
    picks = sorted({files[i] for i in np.linspace(0, len(files) - 1, min(len(files), CHANNEL_SAMPLE)).astype(int)})
    items = decode_files(source, picks, 32, 3, workers) if picks else []
    return 3 if any(item.pixels is not None and is_colour(item.pixels) for item in items) else 1
