"""``fedrad predict``: class probabilities for images, with Grad-CAM heatmaps on request.

Runs where the images are; nothing leaves the machine. Files are read with the
preprocessing stored in model.pt (the same decoding as training), in batches,
on the GPU when there is one. Unreadable files are reported, never fatal. The decision rule
is ``fedrad evaluate``'s (common/modelfile.py ``decision_rule``) and is printed; an image
unlike the study's (common/inputprofile.py), of a modality the study did not train on (common/acquisition.py)
or in colour for a one-channel model gets a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from common.acquisition import check_modality, describe
from common.data import IMAGE_SUFFIXES, Decoded, decode_files
from common.dicom import is_dicom
from common.errors import FedradError
from common.gradcam import grad_cam
from common.inputprofile import RELIABLE_IMAGES, distances
from common.modelfile import decision_rule, load_model
from common.models import pick_device


def collect(paths: list[Path]) -> list[tuple[Path, Path]]:
    """(root, file) pairs for files and every image file inside folders."""
    found = []
    for path in paths:
        if path.is_dir():
            found += [(path, f) for f in sorted(path.rglob("*"))
                      if f.is_file() and (f.suffix.lower() in IMAGE_SUFFIXES or is_dicom(f))]
        elif path.exists():
            found.append((path.parent, path))
        else:
            raise FedradError(f"not found: {path}")
    return found


def heatmap_png(pixels: np.ndarray, cam: np.ndarray, title: str, out: Path) -> None:
    """Original | heatmap | overlay side by side, with the prediction written above."""
    grey = (np.clip(pixels.mean(axis=0), 0, 1) * 255).astype(np.uint8)
    heat = np.stack([cam, np.clip(1.5 - np.abs(4 * cam - 2), 0, 1), 1 - cam], axis=-1)  # blue -> red
    heat_u8 = (heat * 255).astype(np.uint8)
    base = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    overlay = (0.55 * base + 0.45 * heat_u8 * cam[..., None]).astype(np.uint8)
    side = 256
    panels = [Image.fromarray(grey).convert("RGB"), Image.fromarray(heat_u8), Image.fromarray(overlay)]
    sheet = Image.new("RGB", (3 * side, side + 22), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel.resize((side, side), Image.BILINEAR), (i * side, 22))
    ImageDraw.Draw(sheet).text((4, 5), title, fill="black", font=ImageFont.load_default())
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


COLOUR_PHOTOMETRIC = ("RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420",
                      "YBR_ICT", "YBR_RCT")


def is_colour(path: Path, decoded: Decoded) -> bool:
    """Whether a file holds a colour image: a colour photometric interpretation (DICOM), or (PNG/JPEG) more than
    2% of a 64-px thumbnail's pixels with channels apart by over 16 of 255 (grey stored as RGB is not colour)."""
    if decoded.header is not None:
        return decoded.header.photometric in COLOUR_PHOTOMETRIC
    try:
        with Image.open(path) as img:
            if img.mode in ("1", "L", "LA", "I", "I;16", "F"):
                return False
            img.thumbnail((64, 64))
            rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    except Exception:  # it decoded once already; a second failure only means no colour check
        return False
    return float(np.mean(rgb.max(axis=-1) - rgb.min(axis=-1) > 16)) > 0.02


def input_checks(meta: dict[str, Any]) -> dict[str, Any]:
    """What predict checks each image against (the JSON's ``input_check``), and what it cannot."""
    profile = meta.get("input_profile")
    checked = ["colour: a colour image given to a one-channel model (it reads the luminance only)"
               if meta["channels"] == 1 else "channels: the model reads 3 channels"]
    not_checked = []
    acquisition = meta.get("acquisition")
    if acquisition:
        checked.append(f"modality: each DICOM's Modality against the study's training images ({describe(acquisition)}"
                       f", from {acquisition['sites']} site(s); common/acquisition.py); a PNG or JPEG has none")
    else:
        not_checked.append("modality: model.pt records no modality of its training images (the sites released "
                           "none: it needs release level 'full', or the model predates it); each DICOM's modality "
                           "is listed")
    if profile:
        checked.append(f"input statistics: distance from the study's validation images ({profile['images']:.0f} "
                       f"images of {profile['sites']} site(s)), warned above {profile['distance_warn']:g} "
                       "(common/inputprofile.py)")
        if profile["images"] < RELIABLE_IMAGES:
            not_checked.append(f"input statistics, closely: the profile holds only {profile['images']:.0f} "
                               f"images (under {RELIABLE_IMAGES} its covariance is rough: warnings may be too many)")
    else:
        not_checked.append("input statistics: model.pt has no input profile (the sites released none: it needs "
                           "release level 'full', or the model predates it)")
    return {"checked": checked, "not_checked": not_checked}


def predict(model_path: Path, paths: list[Path], heatmap_dir: Path | None = None,
            batch_size: int = 32, threshold: float | None = None) -> dict[str, Any]:
    """Probabilities, a decision and warnings per image. The decision follows ``decision_rule``
    (common/modelfile.py: ``threshold``, else the study's operating point, else the argmax), as
    ``fedrad evaluate`` does; ``warnings`` say where an image is unlike the study's images
    (``input_checks``): a colour image for a one-channel model, a DICOM modality the study's training images
    lack, or features far from the input profile. Each row's ``modality_check`` says what the modality check
    found ("not checked" for a PNG or JPEG, which has no modality)."""
    model, meta = load_model(model_path)
    cut, decision = decision_rule(meta, threshold)
    profile, acquisition = meta.get("input_profile"), meta.get("acquisition")
    device = pick_device()
    model.to(device).eval()
    classes = meta["class_names"]
    files = collect(paths)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        size, channels, multiframe = meta["input_size"], meta["channels"], meta.get("multiframe", "middle")
        decoded = []
        for root in dict.fromkeys(r for r, _ in chunk):  # each file read in a worker process, time-bounded
            mine = [f for r, f in chunk if r == root]
            decoded += zip(mine, decode_files(root, mine, size, channels, 1, multiframe))
        usable = [(f, d) for f, d in decoded if d.pixels is not None]
        skipped += [{"file": str(f), "reason": d.reason} for f, d in decoded if d.pixels is None]
        if not usable:
            continue
        pixels = np.stack([d.pixels for _, d in usable])
        x = torch.from_numpy(pixels).to(device)
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=1).cpu().numpy()
        cams = grad_cam(model, x).cpu().numpy() if heatmap_dir else None
        distance = distances(profile, pixels) if profile else None
        for i, (f, d) in enumerate(usable):
            k = int(probs[i].argmax()) if cut is None else int(probs[i, 1] >= cut)
            row: dict[str, Any] = {"file": str(f), "prediction": classes[k],
                                   "probabilities": {c: float(p) for c, p in zip(classes, probs[i])}}
            warnings = []
            if d.header is not None:
                row["modality"] = d.header.modality
            row["modality_check"], warning = check_modality(acquisition, d.header.modality if d.header else None)
            if warning:
                warnings.append(warning)
            if channels == 1 and is_colour(f, d):
                warnings.append("a colour image: this model reads one channel (the luminance)")
            if distance is not None:
                row["input_distance"] = round(float(distance[i]), 3)
                if distance[i] > profile["distance_warn"]:
                    warnings.append(f"unlike the study's images (input distance {distance[i]:.1f}; above "
                                    f"{profile['distance_warn']:g} is rare for them): the prediction may mean nothing")
            row["warnings"] = warnings
            if cams is not None:
                out = heatmap_dir / f"{len(results):05d}-{f.stem}.png"
                heatmap_png(d.pixels, cams[i], f"{f.name}: {classes[k]} {probs[i, k]:.2f}", out)
                row["heatmap"] = str(out)
            results.append(row)
    return {"model": str(model_path), "decision": decision, "input_check": input_checks(meta),
            "warned": sum(1 for r in results if r["warnings"]), "predictions": results, "skipped": skipped}
