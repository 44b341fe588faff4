"""What leaves a hospital in its replies, field by field, and how exact each value is.

A training reply carries the model update (covered by DP: it is the output of DP-SGD) and
``TRAIN_FIELDS``: the training-set size rounded to ``COUNT_STEP`` (FedAvg weighs sites by it; it tells
the coordinator the site's size to within 5 records, nothing about any record), the epsilon spent rounded
up to ``EPSILON_STEP`` and the delta it is accounted at (client/policy.py ``delta_for``: from the size
rounded up to a power of two). No training loss and no label counts leave.

An evaluation reply carries, by the policy's ``release`` level (client/policy.py):
- ``none``: nothing (the site declines to evaluate);
- ``summary`` (the default): ``SUMMARY_FIELDS``, AUC, accuracy, sensitivity, specificity and balanced
  accuracy with their bootstrap 95% intervals, and the validation-set size rounded to ``COUNT_STEP``;
- ``full``: also the loss and F1, the ROC curve points, the confusion counts and the calibration bins,
  the exact validation label count (``n-pos-val``), and the validation images' input profile.
  The ROC points sit at quantiles of the site's own scores (common/metrics.py ``roc_thresholds``): at most
  64 thresholds, each rounded to a fixed grid (1/50 logit) so none is an image's exact score, and only
  thresholds that leave at least 5 images in every interval between neighbouring ones; the calibration bins
  are up to 10 equal-count bins of at least 5 images. So the coordinator learns, per class, how many
  validation images score in each of at most 65 score ranges of 5 or more images, as the 41 fixed
  thresholds of earlier versions told it (where a range could hold a single image). The input profile
  (common/inputprofile.py) is the mean and covariance of fixed image features (an 8 x 8 intensity grid,
  a histogram, contrast and edge strength) over at least 20 validation images: a blurred average image
  and how the images vary about it, never one image; the features are fixed, so crafted weights change
  nothing in it. With it, which kinds of images the site trained on (common/acquisition.py): one 0/1 flag
  per term of two fixed vocabularies of DICOM Modality and Photometric Interpretation values (plus "other"
  and "not DICOM"), set where at least 5 training images carry the term; a set of equipment facts, never a
  count, never a header value verbatim. They go at ``full`` with the input profile, whose purpose they share
  (model.pt's guard for ``fedrad predict``): at ``summary`` a site releases only how the model performs.
A study of more than two classes, or of ordered grades (common/multiclass.py), also gets ``MULTICLASS_SUMMARY``
at ``summary`` (the macro one-vs-rest AUC and the quadratic weighted kappa, one number each, with their
intervals) and ``MULTICLASS_FULL`` at ``full`` (each class's one-vs-rest AUC: which classes a site's validation
images lack shows as NaN, so it goes with the other per-class detail).
Evaluation values are not differentially private: they are exact statistics of the validation images,
which never train. A model is evaluated once per study round and once per weights digest
(client/evaluations.py), so repeated probing with crafted weights gets the same stored answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.acquisition import site_acquisition
from common.inputprofile import site_profile
from common.multiclass import CLASS_AUC, MULTICLASS_METRICS

COUNT_STEP = 10
EPSILON_STEP = 0.1

TRAIN_FIELDS = ("num-examples", "epsilon", "delta")
SUMMARY_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")
SUMMARY_FIELDS = ("num-examples", "epsilon", "delta", *SUMMARY_METRICS, *(f"{m}-ci95" for m in SUMMARY_METRICS))
MULTICLASS_SUMMARY = (*MULTICLASS_METRICS, *(f"{m}-ci95" for m in MULTICLASS_METRICS))  # where the study has them
MULTICLASS_FULL = (CLASS_AUC,)
FULL_EXTRA = ("loss", "f1", "f1-ci95", "n-pos-val", "roc-threshold", "roc-tpr", "roc-fpr", "confusion",
              "calibration-count", "calibration-predicted", "calibration-observed", "input-mean", "input-cov",
              "input-modality", "input-photometric")


def coarse_count(n: int) -> int:
    """``n`` rounded to the nearest multiple of COUNT_STEP, at least COUNT_STEP (a weight of 0 would drop
    the site from FedAvg): released where a size is needed, never the exact count."""
    return max(COUNT_STEP, int(round(n / COUNT_STEP)) * COUNT_STEP)


def coarse_epsilon(epsilon: float) -> float:
    """The epsilon spent, rounded up to EPSILON_STEP: the exact value is a function of the site's size (through
    its sample rate) and of numbers the coordinator sets (batch size, rounds), so with a crafted batch size it
    would single out the exact N. Rounded up, the released figure never understates the spend."""
    return round(math.ceil(round(epsilon / EPSILON_STEP, 9)) * EPSILON_STEP, 6) if epsilon > 0 else 0.0


def train_metrics(n_train: int, epsilon: float, delta: float) -> dict[str, Any]:
    """Every metric of a training reply (``TRAIN_FIELDS``)."""
    return {"num-examples": coarse_count(n_train), "epsilon": coarse_epsilon(epsilon), "delta": float(delta)}


def evaluation_metrics(scores: dict[str, Any], level: str, n_val: int, n_pos_val: int, epsilon: float,
                       delta: float, images: np.ndarray | None = None,
                       training: Sequence[tuple[str, str] | None] = ()) -> dict[str, Any]:
    """Every metric of an evaluation reply at ``level`` (summary or full), from ``client.training.evaluate``;
    at full, with the validation ``images``, also their input profile (common/inputprofile.py), and with the
    ``training`` images' DICOM facts (common/data.py ``ImageSet.acquisition``) which kinds of images the site
    trained on (common/acquisition.py)."""
    if level == "full":
        scores = {**scores, **(site_profile(images) if images is not None else {}), **site_acquisition(training)}
    out: dict[str, Any] = {"num-examples": coarse_count(n_val), "epsilon": coarse_epsilon(epsilon),
                           "delta": float(delta)}
    keys = [k for k in SUMMARY_FIELDS if k not in out] + (list(FULL_EXTRA) if level == "full" else [])
    keys += [*MULTICLASS_SUMMARY, *(MULTICLASS_FULL if level == "full" else ())]  # sent where scores hold them
    for key in keys:
        if key == "n-pos-val":
            out[key] = float(n_pos_val)
        elif key in scores:
            value = scores[key]
            out[key] = [float(x) for x in value] if isinstance(value, list) else float(value)
    return out
