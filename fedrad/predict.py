"""``fedrad predict``: class probabilities for images, with Grad-CAM heatmaps on request.

Runs where the images are; nothing leaves the machine. Files are read with the
preprocessing stored in model.pt (the same decoding as training), in batches,
on the GPU when there is one. Unreadable files are reported, never fatal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from common.data import IMAGE_SUFFIXES, decode_files
from common.dicom import is_dicom
from common.errors import FedradError
from common.gradcam import grad_cam
from common.modelfile import load_model
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


def decision_threshold(meta: dict[str, Any]) -> float | None:
    """The study's operating point for a two-class model (server/app.py), None for argmax."""
    point = (meta.get("final_metrics") or {}).get("operating_point") or {}
    return float(point["threshold"]) if len(meta["class_names"]) == 2 and "threshold" in point else None


def predict(model_path: Path, paths: list[Path], heatmap_dir: Path | None = None,
            batch_size: int = 32) -> dict[str, Any]:
    """Probabilities and a decision per image: the positive class when its probability reaches the
    study's operating point (chosen on the sites' validation ROC curves), else the argmax."""
    model, meta = load_model(model_path)
    threshold = decision_threshold(meta)
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
        x = torch.from_numpy(np.stack([d.pixels for _, d in usable])).to(device)
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=1).cpu().numpy()
        cams = grad_cam(model, x).cpu().numpy() if heatmap_dir else None
        for i, (f, d) in enumerate(usable):
            k = int(probs[i].argmax()) if threshold is None else int(probs[i, 1] >= threshold)
            row = {"file": str(f), "prediction": classes[k],
                   "probabilities": {c: float(p) for c, p in zip(classes, probs[i])}}
            if cams is not None:
                out = heatmap_dir / f"{len(results):05d}-{f.stem}.png"
                heatmap_png(d.pixels, cams[i], f"{f.name}: {classes[k]} {probs[i, k]:.2f}", out)
                row["heatmap"] = str(out)
            results.append(row)
    decision = "argmax" if threshold is None else f"{classes[1]} when its probability >= {threshold:g}"
    return {"model": str(model_path), "decision": decision, "predictions": results, "skipped": skipped}
