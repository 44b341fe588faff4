"""``fedrad data preview``: a labelled contact sheet of images exactly as the model sees them.

A person spots at a glance what numbers hide: an inverted MONOCHROME1 site,
a window that burns out the lungs, a body part that does not belong.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.data import LabelTable, resolve_labels, scan_folder
from common.errors import DataError

TILE = 160  # px per tile: model input upscaled (nearest) so single pixels stay visible


def draw_grid(tiles: list[tuple[np.ndarray, list[str]]], out: Path, columns: int) -> None:
    """Tiles of (C, S, S) images in [0, 1], each with caption lines under it, saved as one PNG."""
    lines = max(len(caption) for _, caption in tiles)
    caption_h = 4 + 12 * lines
    cols = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    sheet = Image.new("RGB", (cols * TILE, rows * (TILE + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (pixels, caption) in enumerate(tiles):
        rgb = np.repeat(pixels, 3, axis=0) if pixels.shape[0] == 1 else pixels
        tile = Image.fromarray((np.transpose(np.clip(rgb, 0, 1), (1, 2, 0)) * 255).astype(np.uint8))
        x, y = (i % cols) * TILE, (i // cols) * (TILE + caption_h)
        sheet.paste(tile.resize((TILE, TILE), Image.NEAREST), (x, y))
        for j, text in enumerate(caption):
            draw.text((x + 3, y + TILE + 2 + 12 * j), text[:26], fill="black" if j == 0 else "gray", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def contact_sheet(root: Path, out: Path, image_size: int = 64, channels: int = 1, max_images: int = 48,
                  labels_csv: Path | None = None, columns: int = 8) -> int:
    """Write a PNG grid of up to ``max_images`` used images; return how many are shown."""
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    table, _ = LabelTable.read(root, labels_csv)
    kept, _ = resolve_labels(scan_folder(root, table, image_size, channels, os.cpu_count() or 1), table)
    if not kept:
        raise DataError(f"{root}: no labelled, decodable images to show (run 'fedrad data check')")
    # An even spread over the folder rather than only its first files.
    picks = [kept[i] for i in np.linspace(0, len(kept) - 1, min(max_images, len(kept))).astype(int)]
    tiles = []
    for row in picks:
        name = Path(row.item.rel).name
        tiles.append((row.item.pixels, [row.raw_label, name if len(name) <= 24 else "..." + name[-21:]]))
    draw_grid(tiles, out, columns)
    return len(picks)
