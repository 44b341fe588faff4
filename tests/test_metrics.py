import math

import numpy as np
import pytest

from common.metrics import (
    CALIBRATION_BINS,
    ROC_LOGIT_STEP,
    ROC_MAX_THRESHOLDS,
    ROC_MIN_BIN,
    binary_auc,
    calibration_summary,
    classification_metrics,
    curve_data,
    local_operating_point,
    operating_point,
    pooled_roc,
    roc_thresholds,
    weighted_average,
    youden_threshold,
)


def test_auc_hand_computed():
    # pairs (pos, neg): (0.8>0.1) (0.8>0.4) (0.35<0.4) (0.35>0.1) -> 3 of 4
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    assert binary_auc(scores, labels) == 0.75


def test_auc_is_the_mann_whitney_pair_count_with_many_ties():
    rng = np.random.default_rng(4)
    for n in (3, 40, 301):
        scores, labels = np.round(rng.random(n), 1), rng.integers(0, 2, n)
        if labels.min() == labels.max():
            continue
        pos, neg = scores[labels == 1][:, None], scores[labels == 0][None, :]
        pairs = (pos > neg).sum() + 0.5 * (pos == neg).sum()
        assert binary_auc(scores, labels) == pytest.approx(pairs / pos.size / neg.size, abs=1e-12)


def test_auc_ties_count_half_and_extremes():
    assert binary_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert binary_auc(np.array([0.1, 0.2, 0.9]), np.array([0, 0, 1])) == 1.0
    assert binary_auc(np.array([0.9, 0.2, 0.1]), np.array([0, 0, 1])) == 0.0
    assert math.isnan(binary_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_sensitivity_specificity_hand_computed():
    # labels: 3 positives, 2 negatives; predictions: TP=2, FN=1, TN=1, FP=1
    labels = np.array([1, 1, 1, 0, 0])
    p1 = np.array([0.9, 0.8, 0.2, 0.3, 0.7])
    m = classification_metrics(np.stack([1 - p1, p1], axis=1), labels)
    assert math.isclose(m["sensitivity"], 2 / 3)
    assert math.isclose(m["specificity"], 1 / 2)
    assert math.isclose(m["accuracy"], 3 / 5)
    assert math.isclose(m["balanced_accuracy"], (2 / 3 + 1 / 2) / 2)
    assert math.isclose(m["auc"], 4 / 6)  # 4 of 6 (pos, neg) pairs ranked right


def test_site_without_positives_has_undefined_sensitivity():
    m = classification_metrics(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 0]))
    assert math.isnan(m["sensitivity"]) and math.isnan(m["auc"])
    assert m["specificity"] == 0.5


def test_weighted_average_skips_undefined():
    rows = [{"auc": 0.9, "n": 30}, {"auc": 0.6, "n": 10}, {"auc": float("nan"), "n": 100}]
    assert math.isclose(weighted_average(rows, "n", ["auc"])["auc"], (0.9 * 30 + 0.6 * 10) / 40)


def _crowded(n, seed=0):
    """A DP-like model: AUC about 0.95 with every score in [0.95, 1]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    p1 = 1 / (1 + np.exp(-(4.5 + 2.3 * labels + rng.normal(0, 0.7, n))))
    return np.stack([1 - p1, p1], axis=1), labels


def _row(probs, labels):
    return {"n_val": len(labels), "n_pos_val": int(labels.sum()),
            "curves": {k.replace("-", "_"): v for k, v in curve_data(probs, labels).items()}}


def test_roc_points_follow_crowded_scores_within_the_release_bounds():
    """Scores in [0.95, 1] (the 41-step grid drew 3 points and an AUC 0.95 model looked like 0.55): the released
    thresholds are at most ROC_MAX_THRESHOLDS, on the logit grid, with >= ROC_MIN_BIN scores between
    neighbours and beyond the outermost; the pooled curve's area is the AUC within 0.01."""
    probs, labels = _crowded(400)
    score = probs[:, 1]
    assert np.quantile(score, 0.01) > 0.9 and binary_auc(score, labels) > 0.9
    thresholds = roc_thresholds(score)
    assert 40 <= len(thresholds) <= ROC_MAX_THRESHOLDS
    logits = np.log(thresholds / (1 - thresholds)) / ROC_LOGIT_STEP
    assert np.allclose(logits, np.round(logits), atol=1e-6)
    counts = np.histogram(score, bins=np.r_[-np.inf, thresholds, np.inf])[0]
    assert counts.min() >= ROC_MIN_BIN
    roc = pooled_roc([_row(probs, labels)])
    assert abs(roc["auc"] - binary_auc(score, labels)) < 0.01
    assert len(set(zip(roc["fpr"], roc["tpr"]))) >= 30
    assert len(roc_thresholds(score[:9])) == 0 and len(roc_thresholds(np.full(50, 0.97))) == 0  # few or tied


def test_operating_point_reads_the_41_point_curves_of_older_runs():
    probs, labels = _crowded(200, seed=1)
    score, grid = probs[:, 1], np.linspace(0, 1, 41)
    legacy = {"n_val": 200, "n_pos_val": int(labels.sum()), "curves": {
        "roc_tpr": [float(np.mean(score[labels == 1] >= t)) for t in grid],
        "roc_fpr": [float(np.mean(score[labels == 0] >= t)) for t in grid]}}
    point = operating_point([legacy])
    assert point["threshold"] in [pytest.approx(t) for t in grid]


def test_calibration_is_pooled_and_called_degenerate_when_predictions_do_not_spread():
    rng = np.random.default_rng(2)
    p1 = rng.random(600)
    labels = (rng.random(600) < p1).astype(int)  # calibrated by construction
    spread = calibration_summary([_row(np.stack([1 - p1[:300], p1[:300]], 1), labels[:300]),
                                  _row(np.stack([1 - p1[300:], p1[300:]], 1), labels[300:])])
    assert not spread["degenerate"] and spread["ece"] < 0.1 and len(spread["predicted"]) == CALIBRATION_BINS
    halved = calibration_summary([_row(np.stack([1 - p1 / 2, p1 / 2], 1), labels)])  # says half the truth
    assert halved["ece"] > 0.2 and not halved["degenerate"]
    assert sum(spread["count"]) == 600 and spread["predicted_range"][1] - spread["predicted_range"][0] > 0.5
    crowded = calibration_summary([_row(*_crowded(300))])
    assert crowded["degenerate"] and crowded["predicted_range"][0] > 0.95
    assert calibration_summary([{"n_val": 5}]) is None


def test_metrics_at_a_threshold_decide_on_the_positive_probability():
    labels = np.array([1, 1, 1, 0, 0])
    p1 = np.array([0.9, 0.8, 0.2, 0.3, 0.7])
    probs = np.stack([1 - p1, p1], axis=1)
    at = classification_metrics(probs, labels, threshold=0.75)  # TP 2, FN 1, TN 2, FP 0
    assert at["sensitivity"] == 2 / 3 and at["specificity"] == 1.0 and at["accuracy"] == 0.8
    assert classification_metrics(probs, labels)["specificity"] == 0.5  # argmax: 0.7 is a false positive
    assert at["auc"] == classification_metrics(probs, labels)["auc"]


def test_youden_threshold_is_the_best_cut_over_every_distinct_score():
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    positive = np.array([0, 0, 1, 0, 1, 1, 0, 1], bool)
    j = {t: np.mean(score[positive] >= t) + np.mean(score[~positive] < t) for t in np.unique(score)}
    best = [t for t in j if j[t] == max(j.values())]
    assert best == [0.3, 0.6]  # a tie of sensitivity + specificity 1.5 ...
    assert youden_threshold(score, positive) == 0.6  # ... goes to the threshold nearest 0.5
    assert youden_threshold(score, np.ones(8, bool)) is None  # one class: nothing to choose


def test_local_operating_point_finds_a_shifted_threshold_and_checks_it_on_unseen_halves():
    """A new hospital's scores sit higher than the study's (a shifted detector): the study's threshold 0.5 calls
    every normal image positive there, the hospital's own threshold separates them, and the split-half estimate
    is scored on images the threshold was not chosen on."""
    rng = np.random.default_rng(0)
    positive = rng.random(600) < 0.6
    score = 1 / (1 + np.exp(-(rng.normal(0, 1, 600) + 4 * positive + 3)))  # normals centred at logit 3
    study = classification_metrics(np.column_stack([1 - score, score]), positive.astype(int), 0.5)
    local = local_operating_point(score, positive)
    assert study["specificity"] < 0.05
    assert local["threshold"] > 0.9 and local["balanced_accuracy"] > 0.9
    assert 0.85 < local["held_out_balanced_accuracy"] <= local["balanced_accuracy"] + 0.02
    assert local_operating_point(score, positive) == local  # fixed halves: the same images, the same answer
    few = np.zeros(600, bool)
    few[0] = True  # one positive image: no half holds both classes on both sides
    assert local_operating_point(score, few)["held_out_balanced_accuracy"] is None
    assert local_operating_point(score, np.zeros(600, bool)) is None
