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


def classification_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """AUC, accuracy, sensitivity, specificity and balanced accuracy.

    ``probs`` is (N, K) class probabilities, ``labels`` (N,) integer classes; the decision is the argmax,
    or for two classes with ``threshold`` class 1 where its probability is >= threshold.
    Undefined values (e.g. sensitivity at a site with no positives) are NaN.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    return {name: float(v[0])
            for name, v in _weighted_metrics(probs, labels, np.ones((1, labels.size)), threshold).items()}


def per_class_recall(probs: np.ndarray, labels: np.ndarray) -> list[float]:
    """Recall of each class (NaN for a class absent from ``labels``)."""
    preds = np.asarray(probs).argmax(axis=1)
    labels = np.asarray(labels)
    return [float(np.mean(preds[labels == k] == k)) if np.any(labels == k) else float("nan")
            for k in range(np.asarray(probs).shape[1])]


def bootstrap_ci(
    probs: np.ndarray, labels: np.ndarray, draws: int = 1000, alpha: float = 0.05, seed: int = 0,
    threshold: float | None = None,
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
        parts.append(_weighted_metrics(probs, labels, counts, threshold))
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


def _weighted_metrics(probs: np.ndarray, labels: np.ndarray, counts: np.ndarray,
                      threshold: float | None = None) -> dict[str, np.ndarray]:
    """The metrics of each row of row counts (draws, N), a bootstrap resample or all ones: with c the counts,
    TP = c . [label = k and pred = k] and so on; macro averages over classes for K > 2. The prediction is the
    argmax, or for two classes with ``threshold`` class 1 where its probability is >= threshold."""
    if threshold is not None and probs.shape[1] == 2:
        preds = (probs[:, 1] >= threshold).astype(np.int64)
    else:
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


def combined_interval(rows: list[Mapping[str, Any]], weight_key: str, metric: str,
                      bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float] | None:
    """95% interval of the weighted mean of independent sites' metric, from each site's bootstrap interval.

    Each site's standard error is read off its interval as (high - low) / (2 * 1.96); the weighted mean
    m = sum w_i x_i (weights normalised) has SE = sqrt(sum w_i^2 SE_i^2); the interval is m +- 1.96 SE
    (a normal approximation: the server never sees predictions to bootstrap the pooled data), clipped to
    the metric's ``bounds`` (kappa's go down to -1).
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
    return max(bounds[0], mean - half), min(bounds[1], mean + half)


def weighted_average(rows: list[Mapping[str, float]], weight_key: str, keys: Iterable[str]) -> dict[str, float]:
    """Average each metric over sites weighted by ``weight_key``, skipping sites where it is NaN."""
    out: dict[str, float] = {}
    for key in keys:
        pairs = [(float(r[key]), float(r[weight_key])) for r in rows if key in r and not math.isnan(float(r[key]))]
        total = sum(w for _, w in pairs)
        out[key] = sum(v * w for v, w in pairs) / total if total else float("nan")
    return out


# What a site shares of its scores instead of its predictions (client/release.py, release level "full").
# ROC points sit at quantiles of the site's own scores, so a model whose scores crowd into a narrow band
# (DP models often give every image 0.95-1.0) still gets a faithful curve; what the points may reveal is bounded:
ROC_MAX_THRESHOLDS = 64  # at most this many thresholds per site and evaluation
ROC_MIN_BIN = 5  # every interval between neighbouring thresholds (and beyond the outermost) holds >= 5 images
ROC_LOGIT_STEP = 0.02  # thresholds are rounded to this grid in logit space: never one image's exact score
ROC_LOGIT_RANGE = 15.0  # logits are clipped to +-this (probabilities within 3e-7 of 0 or 1)
LEGACY_ROC_THRESHOLDS = np.linspace(0.0, 1.0, 41)  # the fixed grid of earlier fedrad versions' curves
ROC_POOLED_POINTS = 128  # the pooled curve a run keeps (metrics.jsonl): at most this many points
CALIBRATION_BINS = 10  # equal-count bins of the positive-class score, each of at least ROC_MIN_BIN images
CALIBRATION_MIN_SPREAD = 0.1  # bins' mean predictions closer together than this: calibration is degenerate


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.clip(np.log(p) - np.log1p(-p), -ROC_LOGIT_RANGE, ROC_LOGIT_RANGE)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def roc_thresholds(score: np.ndarray) -> np.ndarray:
    """The thresholds a site releases ROC points at: score quantiles rounded to the ROC_LOGIT_STEP grid, at most
    ROC_MAX_THRESHOLDS, and only those that leave at least ROC_MIN_BIN scores in every interval between
    neighbouring thresholds, below the lowest and at or above the highest (so with fewer than 2 x ROC_MIN_BIN
    images, or all scores tied, there is none). Ascending."""
    ordered = np.sort(np.asarray(score, dtype=np.float64))
    n = ordered.size
    k = min(ROC_MAX_THRESHOLDS, n // ROC_MIN_BIN)
    if k < 1:
        return np.zeros(0)
    levels = np.linspace(ROC_MIN_BIN / n, 1 - ROC_MIN_BIN / n, k)  # the unknown tails: about ROC_MIN_BIN images
    candidates = np.unique(_sigmoid(np.round(_logit(np.quantile(ordered, levels)) / ROC_LOGIT_STEP) * ROC_LOGIT_STEP))
    kept, below_last = [], 0
    for t in candidates:
        below = int(np.searchsorted(ordered, t, side="left"))  # scores < t
        if below - below_last >= ROC_MIN_BIN and n - below >= ROC_MIN_BIN:
            kept.append(float(t))
            below_last = below
    return np.array(kept)


def curve_data(probs: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """Summaries a site can share instead of its predictions (positive class: index 1, or one-vs-rest
    class 1 for more classes): the ROC curve (TPR, FPR) at ``roc_thresholds``, the confusion counts at the
    argmax decision, and a reliability table of up to CALIBRATION_BINS equal-count bins of at least
    ROC_MIN_BIN images each (count, mean predicted, observed frequency)."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    score, positive = probs[:, 1], labels == 1
    thresholds = roc_thresholds(score)
    tpr = [float(np.mean(score[positive] >= t)) if positive.any() else float("nan") for t in thresholds]
    fpr = [float(np.mean(score[~positive] >= t)) if (~positive).any() else float("nan") for t in thresholds]
    predicted = probs.argmax(axis=1) == 1
    confusion = [float(np.sum(predicted & positive)), float(np.sum(predicted & ~positive)),
                 float(np.sum(~predicted & ~positive)), float(np.sum(~predicted & positive))]  # tp, fp, tn, fn
    groups = np.array_split(np.argsort(score, kind="stable"), min(CALIBRATION_BINS, score.size // ROC_MIN_BIN))
    return {"roc-threshold": [float(t) for t in thresholds], "roc-tpr": tpr, "roc-fpr": fpr, "confusion": confusion,
            "calibration-count": [float(g.size) for g in groups],
            "calibration-predicted": [float(score[g].mean()) for g in groups],
            "calibration-observed": [float(positive[g].mean()) for g in groups]}


def _site_roc(row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A site row's ROC points (threshold logits ascending, TPR, FPR); the 41-point grid of older runs too."""
    curves = row.get("curves") or {}
    tpr, fpr = curves.get("roc_tpr"), curves.get("roc_fpr")
    thresholds = curves.get("roc_threshold")
    if thresholds is None and tpr is not None and len(tpr) == len(LEGACY_ROC_THRESHOLDS):
        thresholds = LEGACY_ROC_THRESHOLDS
    if thresholds is None or tpr is None or fpr is None or not len(tpr) == len(fpr) == len(thresholds):
        return None
    x, first = np.unique(_logit(np.asarray(thresholds, dtype=np.float64)), return_index=True)
    return (x, np.nan_to_num(np.asarray(tpr, np.float64)[first]), np.nan_to_num(np.asarray(fpr, np.float64)[first]))


def _interpolate(points: tuple[np.ndarray, np.ndarray, np.ndarray], at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A site's TPR and FPR at the threshold logits ``at``: exact at its own thresholds, linear in logit between
    them, and towards (1, 1) below its lowest and (0, 0) above its highest."""
    x, tpr, fpr = points
    xs = np.r_[-ROC_LOGIT_RANGE - 1, x, ROC_LOGIT_RANGE + 1]
    return np.interp(at, xs, np.r_[1.0, tpr, 0.0]), np.interp(at, xs, np.r_[1.0, fpr, 0.0])


def _pooled(rows: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The sites' ROC points pooled at the union of their thresholds: TP(t) = sum_s TPR_s(t) P_s and
    FP(t) = sum_s FPR_s(t) N_s; None without curves of both classes."""
    usable = [(r, c) for r in rows if r.get("n_val") and (c := _site_roc(r)) is not None]
    pos = np.array([float(r.get("n_pos_val", 0.0)) for r, _ in usable])
    neg = np.array([float(r["n_val"]) for r, _ in usable]) - pos
    if not usable or pos.sum() == 0 or neg.sum() == 0:
        return None
    at = np.unique(np.concatenate([c[0] for _, c in usable]))
    if at.size == 0:
        return None
    site = [_interpolate(c, at) for _, c in usable]
    tpr, fpr = np.array([s[0] for s in site]), np.array([s[1] for s in site])
    return {"logits": at, "tpr": pos @ tpr / pos.sum(), "fpr": neg @ fpr / neg.sum(), "site_tpr": tpr,
            "site_fpr": fpr, "pos": pos, "neg": neg}


def pooled_roc(rows: list[Mapping[str, Any]]) -> dict[str, list[float]] | None:
    """The sites' pooled ROC curve (see ``operating_point``), at most ROC_POOLED_POINTS points in threshold
    order, with its area (trapezoids through (0, 0) and (1, 1)); None without curves of both classes."""
    pooled = _pooled(rows)
    if pooled is None:
        return None
    keep = np.unique(np.linspace(0, pooled["logits"].size - 1, ROC_POOLED_POINTS).round().astype(int))
    tpr, fpr = pooled["tpr"][keep], pooled["fpr"][keep]
    xs, ys = np.r_[1.0, fpr, 0.0][::-1], np.r_[1.0, tpr, 0.0][::-1]
    return {"threshold": [float(t) for t in _sigmoid(pooled["logits"][keep])], "tpr": [float(v) for v in tpr],
            "fpr": [float(v) for v in fpr], "auc": float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))}


def _youden_index(threshold: np.ndarray, sens: np.ndarray, spec: np.ndarray) -> int:
    """The index of the threshold with the largest sensitivity + specificity (Youden's J); ties go to the one
    nearest 0.5."""
    return int(np.argmax(sens + spec - 1e-9 * np.abs(threshold - 0.5)))


def operating_point(rows: list[Mapping[str, Any]]) -> dict[str, float] | None:
    """The decision threshold on the positive-class probability that the sites' validation data favour.

    Each site shares ROC points at its own thresholds (``curves``: ``roc_threshold``, ``roc_tpr``,
    ``roc_fpr``) and its counts ``n_val`` and ``n_pos_val``; pooled at the union of the sites' thresholds
    (each site's curve linear in logit between its points, so exact at its own thresholds and an estimate
    between them), TP(t) = sum_s TPR_s(t) P_s and FP(t) = sum_s FPR_s(t) N_s. The threshold maximises pooled
    balanced accuracy (sensitivity + specificity) / 2, i.e. Youden's J; ties go to the threshold nearest 0.5.
    Returns the threshold, the pooled sensitivity, specificity and balanced accuracy there, and the
    lowest site's sensitivity and specificity there; None without curves of both classes. Chosen
    and scored on the same validation splits: optimistic, like any threshold tuned on its test data.
    """
    pooled = _pooled(rows)
    if pooled is None:
        return None
    sens, spec = pooled["tpr"], 1.0 - pooled["fpr"]
    threshold = _sigmoid(pooled["logits"])
    best = _youden_index(threshold, sens, spec)
    site_sens = [float(v) for v, p in zip(pooled["site_tpr"][:, best], pooled["pos"]) if p > 0]
    site_spec = [float(1.0 - v) for v, n in zip(pooled["site_fpr"][:, best], pooled["neg"]) if n > 0]
    return {"threshold": float(threshold[best]), "sensitivity": float(sens[best]),
            "specificity": float(spec[best]), "balanced_accuracy": float((sens[best] + spec[best]) / 2),
            "worst_sensitivity": min(site_sens), "worst_specificity": min(site_spec)}


def calibration_summary(rows: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The sites' reliability bins pooled: sorted by mean prediction and merged into up to CALIBRATION_BINS
    groups of about equal count, with the expected calibration error (sum over bins of count x |predicted -
    observed| / total), the range of the bins' mean predictions, the overall mean prediction and positive
    rate, and ``degenerate``: fewer than two bins, or their mean predictions within CALIBRATION_MIN_SPREAD of
    each other (the model gives every image about the same probability, so there is no curve to judge).
    None where no site sent bins."""
    bins = [(float(p), float(o), float(n)) for r in rows for p, o, n in zip(
        *((r.get("curves") or {}).get(k) or [] for k in ("calibration_predicted", "calibration_observed",
                                                          "calibration_count")))
            if n and not (math.isnan(float(p)) or math.isnan(float(o)))]
    if not bins:
        return None
    bins.sort()
    total = sum(n for _, _, n in bins)
    merged: list[list[float]] = []  # count, sum predicted, sum observed
    for p, o, n in bins:
        if not merged or merged[-1][0] >= total / CALIBRATION_BINS:
            merged.append([0.0, 0.0, 0.0])
        merged[-1][0] += n
        merged[-1][1] += p * n
        merged[-1][2] += o * n
    count = [m[0] for m in merged]
    predicted = [m[1] / m[0] for m in merged]
    observed = [m[2] / m[0] for m in merged]
    low, high = min(p for p, _, _ in bins), max(p for p, _, _ in bins)
    return {"count": count, "predicted": predicted, "observed": observed, "predicted_range": [low, high],
            "mean_predicted": sum(m[1] for m in merged) / total, "positive_rate": sum(m[2] for m in merged) / total,
            "ece": sum(abs(p - o) * n for p, o, n in bins) / total,
            "degenerate": len(bins) < 2 or high - low < CALIBRATION_MIN_SPREAD}


# ------------------------------------------------------------------ a hospital's own operating point

LOCAL_SPLIT_SEED = 0  # the fixed halves of the split-half estimate, so the same images give the same answer


def youden_threshold(score: np.ndarray, positive: np.ndarray) -> float | None:
    """The threshold on ``score`` (positive where score >= t) that maximises sensitivity + specificity over every
    distinct score (``_youden_index``, as ``operating_point`` on the pooled curves). None without
    images of both classes."""
    score, positive = np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool)
    pos, neg = np.sort(score[positive]), np.sort(score[~positive])
    if pos.size == 0 or neg.size == 0:
        return None
    candidates = np.unique(score)
    sens = 1.0 - np.searchsorted(pos, candidates, side="left") / pos.size  # share of positives >= t
    spec = np.searchsorted(neg, candidates, side="left") / neg.size  # share of negatives < t
    return float(candidates[_youden_index(candidates, sens, spec)])


def _at(score: np.ndarray, positive: np.ndarray, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity of deciding positive where score >= ``threshold``."""
    return float(np.mean(score[positive] >= threshold)), float(np.mean(score[~positive] < threshold))


def local_operating_point(score: np.ndarray, positive: np.ndarray) -> dict[str, float | None] | None:
    """The operating point a hospital would choose on its own labelled images, and what it is worth on images it
    was not chosen on.

    A study's threshold is chosen on its training hospitals' pooled validation curves; at a hospital it never
    saw, the scores can sit elsewhere (another detector, another export, another prevalence), so the same AUC can
    come with a poor sensitivity/specificity pair. ``threshold`` maximises balanced accuracy on all of
    ``score`` (``youden_threshold``), with its sensitivity, specificity and balanced accuracy there, which are
    optimistic (chosen and scored on the same images). ``held_out_balanced_accuracy`` is the honest estimate:
    the images split into two halves, stratified by class (fixed seed), the threshold chosen on each half and
    scored on the other, the two balanced accuracies averaged; None when a half lacks a class. None without
    images of both classes."""
    score, positive = np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool)
    threshold = youden_threshold(score, positive)
    if threshold is None:
        return None
    sens, spec = _at(score, positive, threshold)
    rng = np.random.default_rng(LOCAL_SPLIT_SEED)
    half = np.zeros(score.size, dtype=bool)
    for members in (np.flatnonzero(positive), np.flatnonzero(~positive)):
        half[rng.permutation(members)[: members.size // 2]] = True
    scored = []
    for chosen_on in (half, ~half):  # ``half`` holds the smaller share of each class, so it alone can lack one
        t = youden_threshold(score[chosen_on], positive[chosen_on])
        if t is None:
            break
        scored.append(sum(_at(score[~chosen_on], positive[~chosen_on], t)) / 2)
    return {"threshold": threshold, "sensitivity": sens, "specificity": spec, "balanced_accuracy": (sens + spec) / 2,
            "held_out_balanced_accuracy": float(np.mean(scored)) if scored else None}
