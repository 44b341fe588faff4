"""The ``model.pt`` format: a state_dict plus everything needed to use it later."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.config import MODELS, StudyConfig
from common.errors import FedradError
from common.models import build_model

FORMAT = "fedrad-model/1"
PREPROCESSING = (  # the rule of common/preprocess.py, in words
    "uniform borders (edge rows/columns constant within 2% of the range) cropped, on DICOM modality values before "
    "windowing; pixels scaled to [0, 1] per image (DICOM: modality LUT, then the 0.5-99.5 percentile window of "
    "the cropped content, file windows unused, MONOCHROME1 inverted; PNG/JPEG: /255, colour to luminance for "
    "1 channel), the content resized bilinearly to fill the input_size square whatever its aspect (never padded); "
    "multi-frame DICOM "
    "reduced by the 'multiframe' policy"
)


def model_payload(study: StudyConfig, state_dict: dict[str, torch.Tensor], privacy: dict[str, dict[str, float]],
                  final_metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What model.pt holds; loads with ``torch.load(..., weights_only=True)``."""
    return {
        "format": FORMAT,
        "state_dict": state_dict,
        "architecture": study.model,
        "input_size": study.image_size,
        "channels": study.channels,
        "class_names": study.classes,
        "ordinal": study.ordinal,  # ordered grades: fedrad evaluate also reports the quadratic weighted kappa
        "preprocessing": PREPROCESSING,
        "multiframe": study.multiframe,
        "privacy": privacy if study.dp else {},
        "dp": study.dp,
        "study": study.to_flat(),
        "final_metrics": final_metrics,
        **extra,
    }


REQUIRED = ("state_dict", "architecture", "input_size", "channels", "class_names")


def load_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model and its metadata from a fedrad ``model.pt``; any other file is a FedradError saying what it lacks."""
    payload = _read_payload(path)
    arch, channels, classes = payload["architecture"], payload["channels"], payload["class_names"]
    try:
        model = build_model(arch, channels, len(classes))
    except (ValueError, TypeError):
        raise FedradError(f"{path}: unknown architecture {arch!r} (this fedrad builds {', '.join(MODELS)})") from None
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, AttributeError):
        raise FedradError(f"{path}: its weights do not fit a {arch} model for {channels} channel(s) and "
                          f"{len(classes)} classes (a damaged or edited model.pt)") from None
    return model, payload


def _read_payload(path: Path) -> dict[str, Any]:
    """What torch.save wrote to ``path``, with every entry of REQUIRED."""
    if not path.is_file():
        raise FedradError(f"model not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch fails on a file it did not write with any of several errors
        raise FedradError(f"{path} is not a fedrad model.pt (PyTorch cannot load it as saved tensors)") from None
    missing = [key for key in REQUIRED if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise FedradError(f"{path} is not a fedrad model.pt (it has no {', '.join(missing)})")
    return payload


def decision_rule(meta: dict[str, Any], threshold: float | None = None) -> tuple[float | None, str]:
    """How ``fedrad evaluate`` and ``fedrad predict`` decide, and the rule in words: a given ``threshold`` on the
    positive class, else the study's operating point stored in model.pt (``final_metrics.operating_point``,
    chosen on the sites' pooled validation ROC curves), else the argmax (for two classes: positive where
    its probability is >= 0.5). A threshold applies to two classes only; with more the argmax decides."""
    classes = meta["class_names"]
    if len(classes) != 2:
        return None, f"argmax ({len(classes)} classes: no threshold applies)"
    if threshold is not None:
        return threshold, f"{classes[1]} when its probability >= {threshold:g} (given threshold)"
    point = (meta.get("final_metrics") or {}).get("operating_point") or {}
    if "threshold" in point:
        stored = float(point["threshold"])
        return stored, f"{classes[1]} when its probability >= {stored:.6g} (the study's operating point, in model.pt)"
    return None, f"argmax (model.pt stores no operating point): {classes[1]} when its probability >= 0.5"
