"""Decode once: a per-folder cache of images at the model's input size.

Layout (default root ``$FEDRAD_CACHE`` or ``~/.cache/fedrad``):

    ROOT/<folder id>/<settings id>/images.f16   rows of (C, S, S) float16, memory-mapped
    ROOT/<folder id>/<settings id>/index.json   per file: row, size, mtime, content hash, facts
    ROOT/features/<content id>.pt               a fixed front-end's output for one split (models.py)

``folder id`` hashes the folder's absolute path; ``settings id`` hashes the
preprocessing (size, channels, multi-frame policy, PREPROCESSING_VERSION), so a
change of settings never reuses pixels made differently. A file is re-decoded
only when its content changed: same size and mtime is taken as unchanged;
otherwise its SHA-256 is compared with the cached one. Patient IDs arrive
already pseudonymised by the DICOM reader.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from common.atomic import atomic_write
from common.data import Decoded, LabelTable, decode_files
from common.dicom import DicomImage

PREPROCESSING_VERSION = 4  # bump when decoding/windowing/resizing changes what pixels come out


def cache_root() -> Path:
    return Path(os.environ.get("FEDRAD_CACHE", Path.home() / ".cache" / "fedrad")).expanduser()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FolderCache:
    """The cache of one folder at one preprocessing setting."""

    def __init__(self, folder: Path, size: int, channels: int, multiframe: str = "middle",
                 root: Path | None = None) -> None:
        self.folder = folder.resolve()
        self.shape = (channels, size, size)
        self.settings = dict(size=size, channels=channels, multiframe=multiframe, version=PREPROCESSING_VERSION)
        settings_id = _digest(json.dumps(self.settings, sort_keys=True))
        self.dir = (root or cache_root()) / _digest(str(self.folder)) / settings_id
        self.index_path = self.dir / "index.json"
        self.images_path = self.dir / "images.f16"

    def _load_index(self) -> dict[str, dict]:
        try:
            return json.loads(self.index_path.read_text())["files"]
        except (OSError, ValueError, KeyError):
            return {}

    def update(self, paths: list[Path], workers: int = 1) -> tuple[list[Decoded], int]:
        """Bring the cache up to date for ``paths``; return their Decoded items and how many were decoded."""
        old = self._load_index()
        old_images = None
        if old and self.images_path.exists():
            rows = self.images_path.stat().st_size // (2 * int(np.prod(self.shape)))
            old_images = np.memmap(self.images_path, np.float16, "r", shape=(rows, *self.shape))
        keep: dict[str, dict] = {}
        todo: list[Path] = []
        for path in paths:
            rel = path.relative_to(self.folder).as_posix()
            entry = old.get(rel)
            if entry is None or not path.is_file():
                todo.append(path)
                continue
            st = path.stat()
            if (entry["size"], entry["mtime_ns"]) != (st.st_size, st.st_mtime_ns):
                if entry.get("sha256") != _file_sha(path):
                    todo.append(path)
                    continue
                entry = {**entry, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            keep[rel] = entry
        if not todo and keep == old and old_images is not None:
            # Nothing changed (the usual load: a later round, a new process): read, write nothing.
            items = {rel: _item_from_entry(rel, e, old_images[e["row"]] if e["row"] >= 0 else None)
                     for rel, e in keep.items()}
            return self._ordered(items, paths), 0
        decoded = self._decode(todo, workers)
        # Write the new array: unchanged rows copied, changed files' rows from this decode.
        usable = [e for e in keep.values() if e["row"] >= 0] + [d for d in decoded if d.pixels is not None]
        tmp_images = np.zeros((max(len(usable), 1), *self.shape), np.float16)
        index: dict[str, dict] = {}
        items: dict[str, Decoded] = {}
        row = 0
        for rel, entry in keep.items():
            pixels = None
            if entry["row"] >= 0 and old_images is not None:
                tmp_images[row] = old_images[entry["row"]]
                pixels, entry = tmp_images[row], {**entry, "row": row}
                row += 1
            index[rel] = entry
            items[rel] = _item_from_entry(rel, entry, pixels)
        for item in decoded:
            entry = _entry_from_item(self.folder / item.rel, item, row if item.pixels is not None else -1)
            if item.pixels is not None:
                tmp_images[row] = item.pixels
                row += 1
            index[item.rel] = entry
            items[item.rel] = item
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.images_path, lambda fh: fh.write(tmp_images[:row].tobytes()))
        payload = json.dumps({"folder": str(self.folder), "settings": self.settings, "files": index})
        atomic_write(self.index_path, lambda fh: fh.write(payload.encode()))
        return self._ordered(items, paths), len(todo)

    def _ordered(self, items: dict[str, Decoded], paths: list[Path]) -> list[Decoded]:
        ordered = [items[p.relative_to(self.folder).as_posix()] for p in paths]
        for item in ordered:  # training works in float32, the cache stores float16 (a copy: no memmap kept)
            if item.pixels is not None:
                item.pixels = np.array(item.pixels, np.float32)
        return ordered

    def _decode(self, paths: list[Path], workers: int) -> list[Decoded]:
        return decode_files(self.folder, paths, self.shape[1], self.shape[0], workers, self.settings["multiframe"],
                            into=" into the cache")


def _entry_from_item(path: Path, item: Decoded, row: int) -> dict:
    st = path.stat() if path.is_file() else None
    header = None
    if item.header is not None:
        header = {k: v for k, v in asdict(item.header).items() if k != "pixels"}  # patient_id: a pseudonym
    return {
        "row": row,
        "size": st.st_size if st else -1,
        "mtime_ns": st.st_mtime_ns if st else -1,
        "sha256": _file_sha(path) if st else "",
        "reason": item.reason,
        "header": header,
    }


def _item_from_entry(rel: str, entry: dict, pixels: np.ndarray | None) -> Decoded:
    header = DicomImage(pixels=np.zeros(0, np.float32), **entry["header"]) if entry["header"] else None
    return Decoded(rel, pixels, entry["reason"], header, entry["size"])


def cached_scan(root: Path, table: LabelTable, size: int, channels: int, workers: int = 1,
                multiframe: str = "middle") -> tuple[list[Decoded], int]:
    """scan_folder through the cache: (items, number of files actually decoded)."""
    return FolderCache(root, size, channels, multiframe).update(table.files(root.resolve()), workers)


def features_path(images: np.ndarray, tag: str) -> Path | None:
    """Where a fixed front-end's output for exactly these pixels is kept (None with FEDRAD_CACHE=off).

    Keyed by the SHA-256 of the array's bytes, shape and dtype and by ``tag`` (the front-end and its
    settings), so any change of pixels or transform is a different file. A Flower deployment starts a
    fresh process for every message, so without this each round would compute the features again.
    """
    if os.environ.get("FEDRAD_CACHE") == "off":
        return None
    digest = hashlib.sha256(f"{tag}|{images.shape}|{images.dtype}|".encode())
    digest.update(np.ascontiguousarray(images).data)
    return cache_root() / "features" / f"{digest.hexdigest()[:32]}.pt"
