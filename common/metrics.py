"""Classification metrics computed at a hospital; only these numbers leave it.

For two classes the positive class is index 1 (e.g. pneumonia):
sensitivity = TP / (TP + FN), specificity = TN / (TN + FP),
balanced accuracy = (sensitivity + specificity) / 2, F1 = 2TP / (2TP + FP + FN).
AUC is the Mann-Whitney statistic P(score_pos > score_neg) + 0.5 P(tie);
for more classes it is the macro average of one-vs-rest AUCs, and
sensitivity/specificity are macro averages of the one-vs-rest values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

METRIC_NAMES = ("loss", "auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "f1")
CI_METRICS = METRIC_NAMES[1:]  # every metric but the loss gets a bootstrap interval


def binary_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """AUC of ``scores`` for boolean ``positives``; NaN when one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(_weighted_auc(scores, np.asarray(positives, dtype=bool), np.ones((1, scores.size)))[0])


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUC, accuracy, sensitivity, specificity and balanced accuracy.

    ``probs`` is (N, K) class probabilities, ``labels`` (N,) integer classes.
    Undefined values (e.g. sensitivity at a site with no positives) are NaN.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    return {name: float(v[0]) for name, v in _weighted_metrics(probs, labels, np.ones((1, labels.size))).items()}


def per_class_recall(probs: np.ndarray, labels: np.ndarray) -> list[float]:
    """Recall of each class (NaN for a class absent from ``labels``)."""
    preds = np.asarray(probs).argmax(axis=1)
    labels = np.asarray(labels)
    return [float(np.mean(preds[labels == k] == k)) if np.any(labels == k) else float("nan")
            for k in range(np.asarray(probs).shape[1])]


def bootstrap_ci(
    probs: np.ndarray, labels: np.ndarray, draws: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap (Efron 1979) 1-alpha intervals of every classification metric.

    Rows are resampled with replacement ``draws`` times; a metric undefined in a
    draw (e.g. AUC with one class) is left out of that metric's distribution.
    Each draw is its vector of row counts, so all draws' metrics come from a few
    matrix products instead of re-sorting every resample (``classification_metrics``
    is the case of one draw with every count 1).
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n = len(labels)
    if n == 0 or draws <= 0:
        return {}
    rng = np.random.default_rng(seed)
    chunk = max(1, min(draws, 2_000_000 // n))  # bounds the (draws, n) count matrix's memory
    parts: list[dict[str, np.ndarray]] = []
    for done in range(0, draws, chunk):
        idx = rng.integers(0, n, (min(chunk, draws - done), n))
        flat = (idx + n * np.arange(len(idx))[:, None]).ravel()
        counts = np.bincount(flat, minlength=idx.size).reshape(idx.shape).astype(np.float64)
        parts.append(_weighted_metrics(probs, labels, counts))
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    out: dict[str, tuple[float, float]] = {}
    for name in parts[0]:
        values = np.concatenate([p[name] for p in parts])
        values = values[~np.isnan(values)]
        if len(values):
            out[name] = (float(np.percentile(values, lo)), float(np.percentile(values, hi)))
    return out


def _weighted_auc(scores: np.ndarray, positives: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUC of each row of row counts (draws, N): the Mann-Whitney statistic P(pos > neg) + P(tie) / 2, as
    sum over score levels of P_level * (negatives below + N_level / 2) / (P * N); NaN where a class is absent."""
    if scores.size == 0:
        return np.full(len(counts), np.nan)
    order = np.argsort(scores, kind="stable")
    level_starts = np.flatnonzero(np.r_[True, np.diff(scores[order]) != 0])
    by_level = counts[:, order]
    pos_at = np.add.reduceat(by_level * positives[order], level_starts, axis=1)
    neg_at = np.add.reduceat(by_level * ~positives[order], level_starts, axis=1)
    n_pos, n_neg = pos_at.sum(axis=1), neg_at.sum(axis=1)
    wins = (pos_at * (np.cumsum(neg_at, axis=1) - neg_at / 2)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), wins / (n_pos * n_neg), np.nan)


def _weighted_metrics(probs: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """The metrics of each row of row counts (draws, N), a bootstrap resample or all ones: with c the counts,
    TP = c . [label = k and pred = k] and so on; macro averages over classes for K > 2."""
    preds = probs.argmax(axis=1)
    classes = [1] if probs.shape[1] == 2 else list(range(probs.shape[1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {"accuracy": counts @ (preds == labels) / labels.size}
        aucs, sens, spec, f1s = [], [], [], []
        for k in classes:
            pos, hit = labels == k, preds == k
            n_pos = counts @ pos
            n_neg = labels.size - n_pos
            tp, fp = counts @ (pos & hit), counts @ (~pos & hit)
            sens.append(tp / n_pos)
            spec.append((n_neg - fp) / n_neg)
            f1s.append(2 * tp / (n_pos + tp + fp))
            aucs.append(_weighted_auc(probs[:, k], pos, counts))
        out["auc"] = _rowwise_nanmean(aucs)
        out["sensitivity"] = _rowwise_nanmean(sens)
        out["specificity"] = _rowwise_nanmean(spec)
        out["balanced_accuracy"] = _rowwise_nanmean([out["sensitivity"], out["specificity"]])
        out["f1"] = _rowwise_nanmean(f1s)
    return out


def _rowwise_nanmean(columns: list[np.ndarray]) -> np.ndarray:
    """Mean of the finite values of each row across ``columns``; NaN where none is."""
    stacked = np.stack(columns)
    finite = ~np.isnan(stacked)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(finite, stacked, 0.0).sum(axis=0) / finite.sum(axis=0)


def combined_interval(rows: list[Mapping[str, Any]], weight_key: str, metric: str) -> tuple[float, float] | None:
    """95% interval of the weighted mean of independent sites' metric, from each site's bootstrap interval.

    Each site's standard error is read off its interval as (high - low) / (2 * 1.96); the weighted mean
    m = sum w_i x_i (weights normalised) has SE = sqrt(sum w_i^2 SE_i^2); the interval is m +- 1.96 SE
    (a normal approximation: the server never sees predictions to bootstrap the pooled data).
    """
    usable = [r for r in rows if r.get("ci95", {}).get(metric) and not any(
        v is None or math.isnan(float(v)) for v in [r.get(metric), *r["ci95"][metric]])]
    total = sum(float(r[weight_key]) for r in usable)
    if not usable or not total:
        return None
    mean = sum(float(r[weight_key]) / total * float(r[metric]) for r in usable)
    var = sum((float(r[weight_key]) / total * (float(r["ci95"][metric][1]) - float(r["ci95"][metric][0])) /
               (2 * 1.96)) ** 2 for r in usable)
    half = 1.96 * math.sqrt(var)
    return max(0.0, mean - half), min(1.0, mean + half)


def weighted_average(rows: list[Mapping[str, float]], weight_key: str, keys: Iterable[str]) -> dict[str, float]:
    """Average each metric over sites weighted by ``weight_key``, skipping sites where it is NaN."""
    out: dict[str, float] = {}
    for key in keys:
        pairs = [(float(r[key]), float(r[weight_key])) for r in rows if key in r and not math.isnan(float(r[key]))]
        total = sum(w for _, w in pairs)
        out[key] = sum(v * w for v, w in pairs) / total if total else float("nan")
    return out


ROC_THRESHOLDS = np.linspace(0.0, 1.0, 41)  # steps of 0.025: fine enough to place a decision threshold
CALIBRATION_BINS = 10


def curve_data(probs: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """Summaries a site can share instead of its predictions (positive class: index 1, or one-vs-rest
    class 1 for more classes): the ROC curve at 41 fixed thresholds, the confusion counts at the
    argmax decision, and a 10-bin reliability table (count, mean predicted, observed frequency)."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    score, positive = probs[:, 1], labels == 1
    tpr = [float(np.mean(score[positive] >= t)) if positive.any() else float("nan") for t in ROC_THRESHOLDS]
    fpr = [float(np.mean(score[~positive] >= t)) if (~positive).any() else float("nan") for t in ROC_THRESHOLDS]
    predicted = probs.argmax(axis=1) == 1
    confusion = [float(np.sum(predicted & positive)), float(np.sum(predicted & ~positive)),
                 float(np.sum(~predicted & ~positive)), float(np.sum(~predicted & positive))]  # tp, fp, tn, fn
    bins = np.minimum((score * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    count, mean_p, observed = [], [], []
    for b in range(CALIBRATION_BINS):
        members = bins == b
        count.append(float(members.sum()))
        mean_p.append(float(score[members].mean()) if members.any() else float("nan"))
        observed.append(float(positive[members].mean()) if members.any() else float("nan"))
    return {"roc-tpr": tpr, "roc-fpr": fpr, "confusion": confusion, "calibration-count": count,
            "calibration-predicted": mean_p, "calibration-observed": observed}


def operating_point(rows: list[Mapping[str, Any]]) -> dict[str, float] | None:
    """The decision threshold on the positive-class probability that the sites' validation data favour.

    Each site shares its ROC curve at ``ROC_THRESHOLDS`` (``curves``: ``roc_tpr``, ``roc_fpr``) and its
    counts ``n_val`` and ``n_pos_val``; pooled over sites, TP(t) = sum_s TPR_s(t) P_s and
    FP(t) = sum_s FPR_s(t) N_s. The threshold maximises pooled balanced accuracy
    (sensitivity + specificity) / 2, i.e. Youden's J; ties go to the threshold nearest 0.5.
    Returns the threshold, the pooled sensitivity, specificity and balanced accuracy there, and the
    lowest site's sensitivity and specificity there; None without curves of both classes. Chosen
    and scored on the same validation splits: optimistic, like any threshold tuned on its test data.
    """
    usable = [r for r in rows if r.get("curves", {}).get("roc_tpr") and r.get("n_val")]
    pos = np.array([float(r.get("n_pos_val", 0.0)) for r in usable])
    neg = np.array([float(r["n_val"]) for r in usable]) - pos
    if not usable or pos.sum() == 0 or neg.sum() == 0:
        return None
    tpr = np.nan_to_num(np.array([r["curves"]["roc_tpr"] for r in usable], dtype=np.float64))
    fpr = np.nan_to_num(np.array([r["curves"]["roc_fpr"] for r in usable], dtype=np.float64))
    if tpr.shape[1] != len(ROC_THRESHOLDS):
        return None  # curves from another version of fedrad
    sens = pos @ tpr / pos.sum()
    spec = 1.0 - neg @ fpr / neg.sum()
    score = sens + spec - 1e-9 * np.abs(ROC_THRESHOLDS - 0.5)
    best = int(np.argmax(score))
    site_sens = [float(tpr[i, best]) for i in range(len(usable)) if pos[i] > 0]
    site_spec = [float(1.0 - fpr[i, best]) for i in range(len(usable)) if neg[i] > 0]
    return {"threshold": round(float(ROC_THRESHOLDS[best]), 6), "sensitivity": float(sens[best]),
            "specificity": float(spec[best]), "balanced_accuracy": float((sens[best] + spec[best]) / 2),
            "worst_sensitivity": min(site_sens), "worst_specificity": min(site_spec)}
