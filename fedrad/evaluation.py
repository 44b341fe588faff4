"""Evaluating a finished model (``model.pt``) on a labelled data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from client.training import predict_proba
from common.data import load_images
from common.metrics import bootstrap_ci, classification_metrics, local_operating_point, per_class_recall
from common.modelfile import decision_rule, load_model
from common.models import pick_device
from common.multiclass import CLASS_AUC, multiclass_metrics


def is_ordinal(meta: dict[str, Any]) -> bool:
    """Whether a model.pt's classes are ordered grades (its ``ordinal``; older files keep it in ``study``)."""
    return bool(meta.get("ordinal", (meta.get("study") or {}).get("ordinal", False)))


def evaluate_model(model_path: Path, data_path: Path, threshold: float | None = None) -> dict[str, Any]:
    """AUC, accuracy, sensitivity, specificity, balanced accuracy, F1 (each with a 95% bootstrap
    interval) and n on ``data_path``, the decisions made as ``fedrad predict`` makes them
    (common/modelfile.py ``decision_rule``: ``threshold``, else the stored operating point, else the
    argmax), and that rule in words (``decision``). With more than two classes also each class's one-vs-rest
    AUC (``auc_per_class``) and their mean (``macro_auc``), and for a model of ordered grades (trained
    ``--ordinal``) the quadratic weighted kappa of the argmax grade (``kappa``), as the sites report them in a
    study (common/multiclass.py), with 95% bootstrap intervals. With two classes also ``local_operating_point``:
    the threshold these images favour and what it is worth on images it was not chosen on
    (common/metrics.py), for a hospital that adopts the model and sets its own threshold."""
    model, meta = load_model(model_path)
    cut, decision = decision_rule(meta, threshold)
    data = load_images(data_path, meta["input_size"], meta["channels"], meta["class_names"],
                       meta.get("multiframe", "middle"))
    probs = predict_proba(model, data.images, pick_device())
    metrics = classification_metrics(probs, data.labels, cut)
    names = ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "f1")
    result: dict[str, Any] = {"decision": decision, **{k: metrics[k] for k in names}}
    intervals = bootstrap_ci(probs, data.labels, threshold=cut)
    result.update({f"{k}_ci95": list(intervals[k]) for k in names if k in intervals})
    if len(meta["class_names"]) == 2:
        result["local_operating_point"] = local_operating_point(probs[:, 1], data.labels == 1)
    if len(meta["class_names"]) > 2:
        result["recall_per_class"] = dict(zip(meta["class_names"], per_class_recall(probs, data.labels)))
    graded = multiclass_metrics(probs, data.labels, is_ordinal(meta), intervals=True)
    if CLASS_AUC in graded:
        result["auc_per_class"] = dict(zip(meta["class_names"], graded[CLASS_AUC]))
    for name in ("macro_auc", "kappa"):
        if name in graded:
            result[name], result[f"{name}_ci95"] = graded[name], graded[f"{name}-ci95"]
    result["n"] = len(data)
    result["skipped"] = len(data.skipped)
    return result
