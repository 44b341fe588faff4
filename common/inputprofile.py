"""What the training data looked like to the model, as aggregate statistics, and how far an image is from it.

``fedrad predict`` scored a CT slice, an MRI, an ultrasound and a smiley face "pneumonia 0.99" without a word:
a classifier answers for any input. So model.pt records the input profile of the study's images, and predict
warns about an image unlike it.

The profile is the mean and covariance of ``FEATURES`` fixed features of each preprocessed image (the model's
input): an 8 x 8 grid of mean intensities, a 16-bin intensity histogram, the mean, the standard deviation and the
mean absolute vertical and horizontal differences (edge strength). The features are fixed here, never chosen by
the coordinator, so a crafted model cannot turn them into questions about the images. Each hospital computes
them on its validation split (whose exact statistics evaluation replies already carry; its training images stay
covered by DP alone) and sends the mean and covariance, only at release level ``full`` and only from at least
``MIN_IMAGES`` images (client/release.py); the server pools the sites' moments weighted by their rounded counts.

An image's distance is the Mahalanobis distance of its features from the pooled mean, with the covariance shrunk
by ``SHRINKAGE`` towards its diagonal (a few hundred images estimate 84 x 84 moments only roughly), divided by
sqrt(FEATURES): about 1 for a typical training image. Measured on the real pediatric chest X-rays of
../shared/data at 64 px (600 images as the profile, 400 others scored): all of them below 1.8, an adult chest CR
1.7, a CT slice 2.5, MR slices 2.9-3.3, ultrasound 3.0, a smiley face 3.7. Then at hospitals the model never saw
(the four leave-one-hospital-out models of the unseen-hospital benchmark, each profile pooled from three sites'
450-760 validation images, each scoring the held-out hospital, which exports in another geometry, bit depth and
photometric interpretation): 0 of 1,076 held-out chest X-rays above 1.75, while a brain CT scored 2.36-2.61,
28-px breast ultrasound images 2.21 and more (median 3.1-3.4), other CT, MR, US and CR hip/tibia 2.8-4.7.
``DISTANCE_WARN`` sits about halfway between 1.75 and 2.21; 28-px chest X-rays upscaled (PneumoniaMNIST) are
warned 8-16% of the time at it, which they are: they are unlike the study's images. The margin is about 0.25 on
each side, from these data sets only. With a profile of only 300 images the covariance is rough (the adult chest CR
scored 2.9, one pediatric X-ray 4.6), so predict says when a profile holds fewer than ``RELIABLE_IMAGES``. A warning
says the image is unlike the study's images, not that the model is wrong on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

GRID = 8
HISTOGRAM_BINS = 16
FEATURES = GRID * GRID + HISTOGRAM_BINS + 4
FEATURE_SET = "fedrad-input-features/1"  # grid 8x8, histogram 16, mean, std, vertical and horizontal differences
MIN_IMAGES = 20  # a site with fewer validation images sends no profile
SHRINKAGE = 0.2
DISTANCE_WARN = 2.0
RELIABLE_IMAGES = 500


def image_features(images: np.ndarray) -> np.ndarray:
    """(N, FEATURES) features of preprocessed images (N, C, S, S) in [0, 1] (channels averaged)."""
    x = np.asarray(images, dtype=np.float64).mean(axis=1)
    n, size = x.shape[0], x.shape[-1]
    edges = np.linspace(0, size, GRID + 1).round().astype(int)[:-1]
    cells = np.add.reduceat(np.add.reduceat(x, edges, axis=1), edges, axis=2)
    widths = np.diff(np.r_[edges, size])
    grid = (cells / np.outer(widths, widths)).reshape(n, -1)
    bins = np.clip((x * HISTOGRAM_BINS).astype(int), 0, HISTOGRAM_BINS - 1).reshape(n, -1)
    histogram = np.stack([np.bincount(b, minlength=HISTOGRAM_BINS) for b in bins]) / (size * size) if n else \
        np.zeros((0, HISTOGRAM_BINS))
    flat = x.reshape(n, -1)
    vertical = np.abs(np.diff(x, axis=1)).reshape(n, -1).mean(axis=1)
    horizontal = np.abs(np.diff(x, axis=2)).reshape(n, -1).mean(axis=1)
    return np.column_stack([grid, histogram, flat.mean(axis=1), flat.std(axis=1), vertical, horizontal])


def _upper(matrix: np.ndarray) -> list[float]:
    return [float(v) for v in matrix[np.triu_indices(matrix.shape[0])]]


def _full(upper: list[float]) -> np.ndarray:
    matrix = np.zeros((FEATURES, FEATURES))
    matrix[np.triu_indices(FEATURES)] = upper
    return matrix + np.triu(matrix, 1).T


def site_profile(images: np.ndarray) -> dict[str, list[float]]:
    """What a site sends (release level full): ``input-mean`` (FEATURES) and ``input-cov`` (the upper triangle of
    the population covariance, FEATURES x (FEATURES + 1) / 2 values) of its images' features; nothing with
    fewer than MIN_IMAGES images."""
    if len(images) < MIN_IMAGES:
        return {}
    features = image_features(images)
    return {"input-mean": [float(v) for v in features.mean(axis=0)],
            "input-cov": _upper(np.cov(features, rowvar=False, ddof=0))}


def pooled_profile(replies: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The sites' profiles (evaluation replies by site) pooled: mean = sum w_s m_s / W and covariance
    sum w_s (C_s + m_s m_s^T) / W - mean mean^T, with w_s the site's rounded ``num-examples``. None when no
    site sent one."""
    usable = [r for r in replies.values() if len(r.get("input-mean") or []) == FEATURES
              and len(r.get("input-cov") or []) == FEATURES * (FEATURES + 1) // 2 and r.get("num-examples")]
    if not usable:
        return None
    weights = np.array([float(r["num-examples"]) for r in usable])
    means = np.array([r["input-mean"] for r in usable], dtype=np.float64)
    mean = weights @ means / weights.sum()
    second = sum(w * (_full(r["input-cov"]) + np.outer(m, m)) for w, r, m in zip(weights, usable, means))
    cov = second / weights.sum() - np.outer(mean, mean)
    return {"features": FEATURE_SET, "sites": len(usable), "images": float(weights.sum()),
            "mean": [float(v) for v in mean], "cov": _upper(cov), "distance_warn": DISTANCE_WARN}


def distances(profile: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """Each image's distance from ``profile`` (module docstring): about 1 for a typical study image."""
    mean = np.asarray(profile["mean"], dtype=np.float64)
    cov = _full(profile["cov"])
    shrunk = (1 - SHRINKAGE) * cov + SHRINKAGE * np.diag(np.diag(cov)) + 1e-9 * np.eye(FEATURES)
    diff = image_features(images) - mean
    squared = np.einsum("ij,ij->i", diff @ np.linalg.pinv(shrunk, hermitian=True), diff)
    return np.sqrt(np.maximum(squared, 0.0) / FEATURES)
