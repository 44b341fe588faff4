import math

import numpy as np
import pytest

from common.metrics import binary_auc, classification_metrics, weighted_average


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
