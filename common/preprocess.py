"""The model-input rule: one radiograph gives nearly the same model input however a hospital exported it.

Every image becomes the model's (C, S, S) input in these steps, in this order:
1. Crop uniform borders. Edge rows and columns whose values are all within 2% of the frame's value range of
   each other (export padding, collimation or letterbox bands: black, white or grey, any width, nested bands
   too) are removed, from all four sides, until the outermost lines hold image content. A frame uniform
   everywhere is kept whole. DICOM: on the modality values, before windowing (a band is uniform whatever its
   photometric interpretation); PNG, JPEG and .npz images: on their pixel values.
2. Window on the content (DICOM grey images; ``common/dicom.py`` applies it): the 0.5-99.5 percentile window of
   the cropped content, never of the borders, maps to [0, 1]. A file's own WindowCenter/Width or VOI LUT is one
   site's display choice (the same image comes from another site without one, or with another), so it is not
   used, except for flat content, whose percentile window is empty. MONOCHROME1 is then inverted.
3. Fill the S x S square with the cropped content: resized bilinearly (antialiased) to S x S, whatever its aspect,
   so a portrait or landscape detector's frame is stretched, never padded: padding bars were a mark of the site
   that exported the image, and a model trained where frames are portrait met letterbox bars first at a
   hospital whose frames are landscape (held-out AUC 0.827 padded, 0.958 stretched, the same model:
   benchmarks/NOTES.md). A border's value never comes back, whatever it was. Colour becomes luminance for a
   one-channel model.
A radiograph exported with other bits stored, transfer syntax, photometric interpretation, window tags,
borders, frame shape or detector resolution thus gives the same input within 0.02 mean absolute difference
(tests/test_invariance.py).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # (top, bottom, left, right) of the content; bottom and right exclusive

BORDER_TOLERANCE = 0.02  # a line is uniform when its values spread over at most this fraction of the frame's range
BORDER_CHECKS = 16  # at most 8 rounds of rows and columns: bands nested deeper are content (and bound the cost)
WINDOW_PERCENTILES = (0.5, 99.5)
WINDOW_SAMPLES = 1 << 15  # at most this many evenly spread pixels give the percentile window (rank error ~0.05%)


def _leading_uniform(values: np.ndarray, axis: int, tol: float) -> int:
    """How many of the first rows (``axis`` 0) or columns (1) are uniform: each one's values within ``tol``.

    Reads the edge line, then growing chunks, so a frame without borders costs one line, not a pass (columns in
    wider chunks: a slab of 8 columns costs about what one of 64 does)."""
    n, start, chunk = values.shape[axis], 0, 1
    others = tuple(a for a in range(values.ndim) if a != axis)
    while start < n:
        block = values[start : start + chunk] if axis == 0 else values[:, start : start + chunk]
        wide = np.flatnonzero(block.max(axis=others) - block.min(axis=others) > tol)
        if wide.size:
            return start + int(wide[0])
        start += chunk
        chunk = (8 if axis == 0 else 64) if chunk == 1 else chunk * 2
    return n


def _crop_axis(values: np.ndarray, box: list[int], axis: int, tol: float) -> bool:
    """Move ``box``'s two sides across ``axis`` (0: top and bottom) past their uniform lines; whether it moved.
    Where every line is uniform (a flat frame, stripes) nothing tells border from content: it stays."""
    inner = values[box[0] : box[1], box[2] : box[3]]
    lead = _leading_uniform(inner, axis, tol)
    if lead == inner.shape[axis]:
        return False
    trail = _leading_uniform(inner[::-1] if axis == 0 else inner[:, ::-1], axis, tol)
    box[2 * axis] += lead
    box[2 * axis + 1] -= trail
    return bool(lead or trail)


def border_box(values: np.ndarray, tolerance: float = BORDER_TOLERANCE) -> Box:
    """The content of an (H, W) or (H, W, C) frame inside its uniform borders (rule step 1).

    Rows, columns, rows, ... until one finds nothing (or BORDER_CHECKS): a line across a band's ends is uniform
    only once the band across it is gone (nested or corner-to-corner bands). The tolerance is a fraction of the
    value range of a 1-in-16 pixel sample."""
    sample = values[::4, ::4]
    tol = tolerance * float(sample.max() - sample.min())
    box = [0, values.shape[0], 0, values.shape[1]]
    axis, checks, moved = 0, 0, True
    while (moved or checks < 2) and checks < BORDER_CHECKS:
        moved = _crop_axis(values, box, axis, tol)
        axis, checks = 1 - axis, checks + 1
    return box[0], box[1], box[2], box[3]


def crop(pixels: np.ndarray, box: Box) -> np.ndarray:
    top, bottom, left, right = box
    return pixels[top:bottom, left:right]


def content_window(values: np.ndarray, box: Box) -> tuple[float, float]:
    """The 0.5-99.5 percentile window of the content inside ``box`` (rule step 2), from a regular grid of at most
    about WINDOW_SAMPLES of its pixels: the same window at a fixed cost, whatever the detector's size."""
    content = crop(values, box)
    step = max(1, math.ceil(math.sqrt(content.shape[0] * content.shape[1] / WINDOW_SAMPLES)))
    lo, hi = np.percentile(content[::step, ::step], WINDOW_PERCENTILES)
    return float(lo), float(hi)


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) -> (C, size, size), whatever the aspect (rule step 3); bilinear, and Pillow widens the filter
    when reducing, so no aliasing."""
    return np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., k], np.float32), mode="F")
                   .resize((size, size), Image.BILINEAR)) for k in range(pixels.shape[2])
    ])


def fit_square(pixels: np.ndarray, size: int, channels: int, box: Box | None = None) -> np.ndarray:
    """(H, W[, 3]) float in [0, 1] -> (channels, size, size): crop the uniform borders (``box`` where the reader
    found them before windowing, else found here), then resize the content to fill the square (the rule above)."""
    pixels = crop(pixels, border_box(pixels) if box is None else box)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if channels == 1 and pixels.shape[2] == 3:
        pixels = (pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    out = resize_square(pixels, size)
    if channels == 3 and out.shape[0] == 1:
        out = np.repeat(out, 3, axis=0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
