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
CAPTION = 28


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
    cols = min(columns, len(picks))
    rows = math.ceil(len(picks) / cols)
    sheet = Image.new("RGB", (cols * TILE, rows * (TILE + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, row in enumerate(picks):
        pixels = row.item.pixels
        rgb = np.repeat(pixels, 3, axis=0) if pixels.shape[0] == 1 else pixels
        tile = Image.fromarray((np.transpose(rgb, (1, 2, 0)) * 255).astype(np.uint8)).resize((TILE, TILE),
                                                                                               Image.NEAREST)
        x, y = (i % cols) * TILE, (i // cols) * (TILE + CAPTION)
        sheet.paste(tile, (x, y))
        name = Path(row.item.rel).name
        draw.text((x + 3, y + TILE + 2), row.raw_label[:22], fill="black", font=font)
        draw.text((x + 3, y + TILE + 14), name if len(name) <= 24 else "..." + name[-21:], fill="gray", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return len(picks)
