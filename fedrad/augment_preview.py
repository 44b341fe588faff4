"""``fedrad augment preview``: originals next to augmented versions, each labelled with what was drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from client.augmentation import BatchAugment, describe, resolve
from common.data import load_images, source_classes
from fedrad.preview import draw_grid


def augment_sheet(data: Path, out: Path, preset: str, overrides: str = "", images: int = 4, views: int = 5,
                  image_size: int = 128, classes: list[str] | None = None, seed: int = 0) -> int:
    """One row per image: the original, then ``views`` augmentations; returns the number of tiles."""
    classes = classes or source_classes(data)  # the data's own classes unless given (docs/data.md)
    loaded = load_images(data, image_size, 1, classes)
    picks = np.linspace(0, len(loaded) - 1, min(images, len(loaded))).astype(int)
    augment = BatchAugment(resolve(preset, overrides), seed)
    tiles = []
    for i in picks:
        original = torch.from_numpy(loaded.images[i : i + 1])
        params = augment.sample(views)
        batch = augment(original.repeat(views, 1, 1, 1), params) if augment.config.active else \
            original.repeat(views, 1, 1, 1)
        tiles.append((loaded.images[i], ["original", classes[loaded.labels[i]]]))
        tiles += [(batch[v].numpy(), describe(params, v)) for v in range(views)]
    draw_grid(tiles, out, columns=views + 1)
    return len(tiles)
