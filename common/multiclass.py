"""Metrics of a study with more than two classes, or of ordered grades, computed at a hospital.

With K > 2 classes each class k gets its one-vs-rest AUC (class k's probability ranks its images
against all others: the Mann-Whitney statistic, common/metrics.py ``binary_auc``; NaN where the class
has no validation image), and the macro AUC is their mean over the classes where it is defined.
For ordered grades (a study's ``ordinal``) the agreement of the argmax grade with the true grade is
Cohen's (1968) weighted kappa with quadratic weights w_ij = (i - j)^2 / (K - 1)^2:
kappa = 1 - sum w O / sum w E, O the observed grade-pair frequencies and E = outer(true, predicted
marginals): 1 for perfect agreement, 0 for chance, and a grade off by two costs four times one off by
one. Each comes with a percentile bootstrap 95% interval, as the binary metrics do.

Where these land: client/release.py (what a site sends), server/app.py ``round_row`` via
``site_fields`` and ``aggregate_sites`` (per-site rows and their example-weighted mean, as for the other
metrics), fedrad/report.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from common.metrics import binary_auc, combined_interval, weighted_average

MULTICLASS_METRICS = ("macro_auc", "kappa")  # one number per site: released at the summary level
RANGES = {"macro_auc": (0.0, 1.0), "kappa": (-1.0, 1.0)}
CLASS_AUC = "class_auc"  # the list of one-vs-rest AUCs, in class order: released at the full level


def class_aucs(probs: np.ndarray, labels: np.ndarray) -> list[float]:
    """One-vs-rest AUC of each class (NaN where it is absent from ``labels`` or is every label)."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
    return [binary_auc(probs[:, k], labels == k) for k in range(probs.shape[1])]


def macro_auc(aucs: list[float]) -> float:
    """Mean of the defined one-vs-rest AUCs; NaN when none is."""
    defined = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(defined)) if defined else float("nan")


def quadratic_kappa(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Cohen's weighted kappa with quadratic weights of predicted against true grades; NaN where chance
    agreement leaves nothing to measure (e.g. one grade only, predicted for every image)."""
    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    if not len(labels) or num_classes < 2:
        return float("nan")
    observed = np.zeros((num_classes, num_classes))
    np.add.at(observed, (labels, preds), 1.0)
    observed /= len(labels)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    grades = np.arange(num_classes)
    weights = (grades[:, None] - grades[None, :]) ** 2 / (num_classes - 1) ** 2
    chance = float((weights * expected).sum())
    return 1.0 - float((weights * observed).sum()) / chance if chance > 0 else float("nan")


def _scores(probs: np.ndarray, labels: np.ndarray, ordinal: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if probs.shape[1] > 2:
        aucs = class_aucs(probs, labels)
        out[CLASS_AUC], out["macro_auc"] = aucs, macro_auc(aucs)
    if ordinal:
        out["kappa"] = quadratic_kappa(labels, probs.argmax(axis=1), probs.shape[1])
    return out


def multiclass_metrics(probs: np.ndarray, labels: np.ndarray, ordinal: bool = False, intervals: bool = False,
                       draws: int = 200, seed: int = 0) -> dict[str, Any]:
    """For K > 2 classes ``class_auc`` and ``macro_auc``, with ``ordinal`` ``kappa``; with ``intervals``
    ``<metric>-ci95`` = [low, high] (percentile bootstrap over rows, ``draws`` resamples; NaN where
    undefined in every draw). Empty for a two-class study that is not ordinal."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
    out = _scores(probs, labels, ordinal)
    if intervals and out:
        rng = np.random.default_rng(seed)
        found: dict[str, list[float]] = {m: [] for m in MULTICLASS_METRICS if m in out}
        for _ in range(draws if len(labels) else 0):
            idx = rng.integers(0, len(labels), len(labels))
            for name, value in _scores(probs[idx], labels[idx], ordinal).items():
                if name in found and not math.isnan(value):
                    found[name].append(value)
        for name, values in found.items():
            out[f"{name}-ci95"] = ([float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
                                   if values else [float("nan"), float("nan")])
    return out


def site_fields(reply: Mapping[str, Any]) -> dict[str, Any]:
    """The multi-class values of one site's evaluate reply, as its metrics.jsonl row keeps them."""
    out = {k: float(reply[k]) for k in MULTICLASS_METRICS if k in reply}
    if CLASS_AUC in reply:
        out[CLASS_AUC] = [float(v) for v in reply[CLASS_AUC]]
    return out


def aggregate_sites(rows: list[Mapping[str, Any]], aggregate: dict[str, Any], weight_key: str = "n_val") -> None:
    """Add to a round's ``aggregate`` the example-weighted means over the sites that sent them (NaNs left out),
    as for the binary metrics: ``macro_auc`` and ``kappa``, each class's AUC (``class_auc``), and their
    ``ci95`` from the sites' intervals (``combined_interval``). Nothing when no site sent any."""
    for name in MULTICLASS_METRICS:
        having = [r for r in rows if name in r]
        if having:
            aggregate.update(weighted_average(having, weight_key, (name,)))
            interval = combined_interval(having, weight_key, name, RANGES[name])
            if interval is not None:
                aggregate.setdefault("ci95", {})[name] = list(interval)
    lists = [r for r in rows if CLASS_AUC in r]
    if lists:
        width = max(len(r[CLASS_AUC]) for r in lists)
        aggregate[CLASS_AUC] = [
            weighted_average([{"auc": r[CLASS_AUC][k], weight_key: r[weight_key]} for r in lists
                              if k < len(r[CLASS_AUC])], weight_key, ("auc",))["auc"] for k in range(width)]


def progress_text(aggregate: Mapping[str, Any]) -> str:
    """'| macro AUC 0.812 | kappa 0.655 ' for a round's progress line ('' without them)."""
    parts = [f"| {label} {aggregate[k]:.3f} " for k, label in (("macro_auc", "macro AUC"), ("kappa", "kappa"))
             if k in aggregate and not math.isnan(aggregate[k])]
    return "".join(parts)
