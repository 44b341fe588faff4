"""Metrics with confidence intervals, Grad-CAM, and `fedrad predict` on real DICOM."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import shared
from torch import nn

from common.gradcam import grad_cam
from common.metrics import (
    ROC_MAX_THRESHOLDS,
    bootstrap_ci,
    classification_metrics,
    combined_interval,
    curve_data,
    operating_point,
    per_class_recall,
)
from common.models import build_model


def test_f1_and_macro_metrics_hand_computed():
    labels = np.array([1, 1, 1, 0, 0])
    p1 = np.array([0.9, 0.8, 0.2, 0.3, 0.7])  # TP=2 FN=1 TN=1 FP=1
    m = classification_metrics(np.stack([1 - p1, p1], axis=1), labels)
    assert math.isclose(m["f1"], 2 * 2 / (2 * 2 + 1 + 1))
    # three classes: one-vs-rest, macro averaged
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    labels3 = np.array([0, 1, 2, 1])
    m3 = classification_metrics(probs, labels3)
    assert per_class_recall(probs, labels3) == [1.0, 0.5, 1.0]
    assert math.isclose(m3["sensitivity"], (1 + 0.5 + 1) / 3)
    # class 0 AUC: scores of 0 for positives {0.8} vs negatives {0.1, 0.1, 0.6} -> 1.0; class 1: pos {0.8, 0.3}
    # vs neg {0.1, 0.1}: 1.0; class 2: pos {0.8} vs neg {0.1, 0.1, 0.1}: 1.0
    assert m3["auc"] == 1.0


def _site(probs, labels):
    return {"n_val": len(labels), "n_pos_val": int(labels.sum()),
            "curves": {k.replace("-", "_"): v for k, v in curve_data(probs, labels).items()}}


def _exact(scores, labels, t):
    return float(np.mean(scores[labels == 1] >= t)), float(np.mean(scores[labels == 0] < t))


def test_operating_point_pools_the_sites_roc_curves():
    """Two sites whose scores crowd into [0.95, 1] (a DP model): the threshold chosen on their pooled ROC points
    is within 0.02 of the best Youden J on all their scores together, and the sensitivity and specificity it
    reports are within 0.02 of the exact ones there. One site's point is exact (a threshold of its own)."""
    rng = np.random.default_rng(3)
    sites = []
    for n, shift in ((300, 0.0), (180, 0.4)):
        labels = rng.integers(0, 2, n)
        p1 = 1 / (1 + np.exp(-(4.0 + shift + 1.6 * labels + rng.normal(0, 0.8, n))))
        sites.append((np.stack([1 - p1, p1], axis=1), labels))
    scores = np.concatenate([p[:, 1] for p, _ in sites])
    labels = np.concatenate([lab for _, lab in sites])
    best_j = max(sum(_exact(scores, labels, t)) for t in np.unique(scores))
    point = operating_point([_site(p, lab) for p, lab in sites])
    sens, spec = _exact(scores, labels, point["threshold"])
    assert sens + spec > best_j - 0.02 and point["threshold"] > 0.95
    assert abs(point["sensitivity"] - sens) < 0.02 and abs(point["specificity"] - spec) < 0.02
    alone = operating_point([_site(*sites[0])])
    assert (alone["sensitivity"], alone["specificity"]) == _exact(sites[0][0][:, 1], sites[0][1], alone["threshold"])
    assert operating_point([_site(sites[0][0], np.zeros(300, int))]) is None  # one class only: nothing to choose
    assert len(curve_data(*sites[0])["roc-tpr"]) <= ROC_MAX_THRESHOLDS


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (60, 600):
        labels = rng.integers(0, 2, n)
        p1 = np.clip(labels * 0.3 + rng.random(n) * 0.7, 0, 1)
        probs = np.stack([1 - p1, p1], axis=1)
        point = classification_metrics(probs, labels)
        ci = bootstrap_ci(probs, labels, draws=300)
        for name in ("auc", "accuracy", "sensitivity", "specificity", "f1"):
            assert ci[name][0] <= point[name] <= ci[name][1], name
        widths.append(ci["auc"][1] - ci["auc"][0])
    assert widths[1] < widths[0] / 2


@pytest.mark.parametrize("n, classes, ties", [(200, 2, False), (27, 2, True), (6, 2, False), (90, 3, True)])
def test_bootstrap_interval_is_the_percentiles_of_each_resamples_metrics(n, classes, ties):
    """The vectorised bootstrap equals resampling rows and scoring each resample with classification_metrics,
    including tied scores, draws with one class (AUC left out) and macro metrics of more classes."""
    rng = np.random.default_rng(n)
    probs = rng.random((n, classes))
    probs = np.round(probs, 1) + 1e-3 if ties else probs
    probs /= probs.sum(axis=1, keepdims=True)
    labels = (rng.random(n) < 0.1).astype(int) if n == 27 else rng.integers(0, classes, n)
    draws = 150
    samples: dict[str, list[float]] = {}
    for idx in np.random.default_rng(7).integers(0, n, (draws, n)):
        for name, value in classification_metrics(probs[idx], labels[idx]).items():
            if not math.isnan(value):
                samples.setdefault(name, []).append(value)
    found = bootstrap_ci(probs, labels, draws=draws, seed=7)
    assert found.keys() == samples.keys()
    for name, values in samples.items():
        assert found[name] == pytest.approx((np.percentile(values, 2.5), np.percentile(values, 97.5)), abs=1e-12)
    assert bootstrap_ci(probs[:0], labels[:0]) == {}


def blob_images(n: int, size: int = 64, seed: int = 0):
    """Class 1 images carry one bright blob somewhere; class 0 only noise. Returns images, labels, centres."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = rng.random((n, 1, size, size)).astype(np.float32) * 0.3
    labels = rng.integers(0, 2, n)
    centres = rng.integers(10, size - 10, (n, 2))
    for i in np.flatnonzero(labels):
        cy, cx = centres[i]
        images[i, 0] += 0.7 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
    return np.clip(images, 0, 1), labels, centres


@pytest.mark.parametrize("name", ["cnn", "scatternet"])
def test_grad_cam_peaks_on_the_only_evidence(name):
    torch.manual_seed(0)
    images, labels, _ = blob_images(512)
    model = build_model(name, 1, 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    for _ in range(6):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
            opt.step()
    test, test_labels, centres = blob_images(40, seed=1)
    positives = np.flatnonzero(test_labels)
    cams = grad_cam(model, torch.from_numpy(test[positives]), torch.ones(len(positives), dtype=torch.long))
    assert cams.shape == (len(positives), 64, 64) and float(cams.max()) <= 1.0
    hits = 0
    for cam, (cy, cx) in zip(cams.numpy(), centres[positives]):
        py, px = np.unravel_index(cam.argmax(), cam.shape)
        hits += math.hypot(py - cy, px - cx) <= 8  # the last block is 8 x 8 at 64 px: one cell
    assert hits / len(positives) >= 0.8


def test_grad_cam_on_resnet18_groupnorm():
    model = build_model("resnet18", 3, 4)
    cams = grad_cam(model, torch.rand(2, 3, 64, 64))
    assert cams.shape == (2, 64, 64) and 0 <= float(cams.min()) and float(cams.max()) <= 1


def test_predict_on_shared_dicom_never_crashes(tmp_path):
    folder = shared("dicom-samples")
    model = build_model("cnn", 1, 2)
    torch.save({"format": "fedrad-model/1", "state_dict": model.state_dict(), "architecture": "cnn",
                "input_size": 64, "channels": 1, "class_names": ["normal", "pneumonia"],
                "preprocessing": "test", "privacy": {}}, tmp_path / "model.pt")
    result = subprocess.run([sys.executable, "-m", "fedrad", "predict", "--model", str(tmp_path / "model.pt"),
                             str(folder), "--json", str(tmp_path / "p.json"), "--heatmap", str(tmp_path / "maps")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "p.json").read_text())
    assert len(report["predictions"]) == 16 and len(report["skipped"]) == 3
    assert all(set(r["probabilities"]) == {"normal", "pneumonia"} for r in report["predictions"])
    assert all(math.isclose(sum(r["probabilities"].values()), 1, rel_tol=1e-5) for r in report["predictions"])
    assert len(list((tmp_path / "maps").glob("*.png"))) == 16
    assert "Traceback" not in result.stderr
    assert report["decision"].startswith("argmax (model.pt stores no operating point)")


def test_predict_decides_at_the_study_operating_point(tmp_path):
    from fedrad.predict import predict

    folder = shared("dicom-samples")
    torch.manual_seed(0)
    payload = {"format": "fedrad-model/1", "state_dict": build_model("cnn", 1, 2).state_dict(), "architecture": "cnn",
               "input_size": 64, "channels": 1, "class_names": ["normal", "pneumonia"], "preprocessing": "test",
               "privacy": {}}
    torch.save(payload, tmp_path / "argmax.pt")
    p1 = np.array([r["probabilities"]["pneumonia"] for r in predict(tmp_path / "argmax.pt", [folder])["predictions"]])
    threshold = float(np.median(p1))
    torch.save({**payload, "final_metrics": {"operating_point": {"threshold": threshold}}}, tmp_path / "model.pt")
    report = predict(tmp_path / "model.pt", [folder])
    assert str(round(threshold, 3))[:4] in report["decision"]
    assert [r["prediction"] for r in report["predictions"]] == ["pneumonia" if p >= threshold else "normal" for p in p1]


@pytest.mark.parametrize("bad", ["missing.dcm"])
def test_predict_reports_a_missing_path(tmp_path, bad):
    result = subprocess.run([sys.executable, "-m", "fedrad", "predict", "--model", str(tmp_path / "m.pt"),
                             str(tmp_path / bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_combined_interval_of_independent_sites():
    rows = [{"n": 100, "auc": 0.8, "ci95": {"auc": [0.7, 0.9]}}, {"n": 100, "auc": 0.9, "ci95": {"auc": [0.8, 1.0]}},
            {"n": 50, "auc": float("nan"), "ci95": {"auc": [float("nan"), float("nan")]}}]
    lo, hi = combined_interval(rows, "n", "auc")
    assert lo < 0.85 < hi
    # two equal, independent halves: the SE shrinks by sqrt(2)
    assert math.isclose(hi - lo, 0.2 / math.sqrt(2), rel_tol=1e-6)
