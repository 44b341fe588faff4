"""``fedrad data check``: what a hospital's folder holds and what training will use.

Reads every file the way training does (same decoding, windowing, labels and
de-duplication) and reports counts only: modalities, body parts, photometric
interpretations, matrix sizes, bit depths, transfer syntaxes, windows, labels,
and each skipped file with its reason. Labels are matched to the classes as
training matches them (common/labels.py ``match_labels``): the classes given,
else those the data defines, as ``fedrad simulate`` takes them; a folder whose
labels are mostly none of the classes given is not usable, with training's reason.
It also says whether the images hold colour (the channels a study of them takes). It never reports patient names, IDs or
dates: those header fields are read only to keep a patient in one split.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from common.data import (
    DUPLICATE,
    NO_LABEL,
    LabelTable,
    is_colour,
    npz_colour_images,
    npz_labels,
    resolve_labels,
    scan_folder,
)
from common.errors import DataError
from common.labels import classes_from_labels, match_labels

MIN_IMAGES = 10  # below this a site cannot carve a validation split worth the name


@dataclass
class DataReport:
    folder: str
    files_seen: int = 0
    decoded: int = 0
    used: int = 0
    classes: list[str] = field(default_factory=list)  # the classes labels are matched to
    classes_from: str = ""  # "given" (--class-names) or "data" (common/labels.py classes_from_labels)
    colour: int = 0  # decoded images holding colour (any: a study of them takes 3 channels)
    duplicates: int = 0
    unlabeled: int = 0
    labels: Counter = field(default_factory=Counter)
    modalities: Counter = field(default_factory=Counter)
    body_parts: Counter = field(default_factory=Counter)
    photometric: Counter = field(default_factory=Counter)
    matrix_sizes: Counter = field(default_factory=Counter)
    bits_stored: Counter = field(default_factory=Counter)
    transfer_syntaxes: Counter = field(default_factory=Counter)
    windows: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)  # malformed parts ignored, with the fallback used
    skip_reasons: Counter = field(default_factory=Counter)
    skipped: list[dict[str, str]] = field(default_factory=list)
    usable: bool = False
    verdict: str = ""

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs and so counts the pairs.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: (dict(v.most_common()) if isinstance(v, Counter) else v) for k, v in values.items()}


def check_folder(root: Path, labels_csv: Path | None = None, class_names: list[str] | None = None,
                 workers: int | None = None) -> DataReport:
    """Scan ``root`` (a folder, or an .npz) as training would and summarise it."""
    if root.is_file() and root.suffix == ".npz":
        return _check_npz(root, class_names)
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    table, bad_rows = LabelTable.read(root, labels_csv, required=False)
    items = scan_folder(root, table, size=32, channels=3, workers=workers or os.cpu_count() or 1)
    kept, skipped = resolve_labels(items, table)
    report = DataReport(folder=str(root), files_seen=len(items))
    for item in items:
        if item.pixels is None:
            continue
        report.decoded += 1
        report.colour += is_colour(item.pixels)
        header = item.header
        report.modalities[header.modality if header else "PNG/JPEG"] += 1
        if header:
            report.body_parts[header.body_part] += 1
            report.photometric[header.photometric] += 1
            report.matrix_sizes[f"{header.rows}x{header.cols}"] += 1
            report.bits_stored[str(header.bits_stored)] += 1
            report.transfer_syntaxes[header.transfer_syntax] += 1
            report.windows[header.window] += 1
            report.notes.update(header.notes)
    refusal = _count_labels(report, root, table, kept, skipped, class_names)
    for rel, reason in bad_rows + skipped:
        report.skipped.append({"file": rel, "reason": reason})
        report.skip_reasons[reason.split(": ")[0] if reason.startswith("cannot decode") else reason] += 1
    report.duplicates = report.skip_reasons.get(DUPLICATE, 0)
    report.unlabeled = report.skip_reasons.get(NO_LABEL, 0)
    if refusal:
        report.verdict = refusal
    elif report.used < MIN_IMAGES:
        hint = "; no labels.csv or class subfolders found" if not (table.by_path or table.by_uid or
                                                                   table.from_folders) else ""
        report.verdict = (f"only {report.used} labelled, decodable images (at least {MIN_IMAGES} needed); "
                          f"{len(report.skipped)} skipped{hint}")
    else:
        report.usable = True
        report.verdict = "usable" + (": only one class present" if len(report.labels) == 1 else "")
    return report


def _check_npz(path: Path, class_names: list[str] | None) -> DataReport:
    """An .npz's labels matched as training matches them, its image count and its colour."""
    raw, names = npz_labels(path)
    classes = list(class_names or [])
    report = DataReport(folder=str(path), files_seen=len(raw), decoded=len(raw), classes_from="given")
    if not classes:
        report.classes_from = "data"
        try:
            classes = classes_from_labels(set(raw), names, str(path))
        except DataError:
            classes = []
    report.classes = classes
    report.modalities["npz"] = len(raw)
    report.colour = npz_colour_images(path)
    match = match_labels(raw, classes) if classes else None
    for label, index in zip(raw, match.indices if match else np.zeros(len(raw), np.int64)):
        if classes and index < 0:
            report.skip_reasons[f"unknown label '{label}'"] += 1
            continue
        report.labels[classes[index] if classes else label] += 1
        report.used += 1
    refusal = match.refusal(str(path), names) if match else ""
    report.usable = not refusal and report.used >= MIN_IMAGES
    report.verdict = refusal or ("usable" if report.usable else f"only {report.used} labelled images "
                                 f"(at least {MIN_IMAGES} needed)")
    return report


def _count_labels(report: DataReport, root: Path, table: LabelTable, kept: list, skipped: list,
                  class_names: list[str] | None) -> str:
    """Count the used images by class, as training reads their labels (``match_labels``) against the classes
    given, else those the data defines (raw labels when it defines fewer than two); training's refusal
    when most labels are none of the classes ('' otherwise)."""
    classes = list(class_names or [])
    report.classes_from = "given" if classes else "data"
    if not classes:
        try:
            classes = classes_from_labels(table.raw_labels(root), table.names, str(root))
        except DataError:  # fewer than two classes: the labels are counted as they are
            classes = []
    report.classes = classes
    match = match_labels([row.raw_label for row in kept], classes) if classes else None
    for row, index in zip(kept, match.indices if match else np.zeros(len(kept), np.int64)):
        if classes and index < 0:
            skipped.append((row.item.rel, f"unknown label '{row.raw_label}'"))
            continue
        report.labels[classes[index] if classes else row.raw_label] += 1
        report.used += 1
    return match.refusal(str(root), table.names) if match else ""


def _line(name: str, counts: Counter) -> str:
    return f"{name:<18} " + (" | ".join(f"{k} {n}" for k, n in counts.most_common()) or "-")


def format_report(report: DataReport, max_listed: int = 50) -> str:
    lines = [
        f"fedrad data check: {report.folder}",
        f"{'files seen':<18} {report.files_seen}",
        f"{'decoded':<18} {report.decoded}",
        f"{'used':<18} {report.used} (decoded, labelled, each SOPInstanceUID once)",
        f"{'classes':<18} " + (", ".join(report.classes) or "-")
        + (" (given)" if report.classes_from == "given" else " (from the data)"),
        f"{'channels':<18} " + (f"3 (colour: {report.colour} of {report.decoded} images)" if report.colour
                                else "1 (grey)"),
        f"{'skipped':<18} {len(report.skipped)}",
        *(f"  {n:>5} x {reason}" for reason, n in report.skip_reasons.most_common()),
        _line("labels", report.labels),
        f"{'duplicates':<18} {report.duplicates}",
        f"{'without label':<18} {report.unlabeled}",
        _line("modalities", report.modalities),
        _line("body parts", report.body_parts),
        _line("photometric", report.photometric),
        _line("matrix sizes", report.matrix_sizes),
        _line("bits stored", report.bits_stored),
        _line("transfer syntaxes", report.transfer_syntaxes),
        _line("windows", report.windows),
        _line("notes", report.notes),
    ]
    if report.skipped:
        lines.append("skipped files:")
        lines += [f"  {s['file']}: {s['reason']}" for s in report.skipped[:max_listed]]
        if len(report.skipped) > max_listed:
            lines.append(f"  ... {len(report.skipped) - max_listed} more (all in --json)")
    lines.append(f"verdict: {report.verdict}")
    return "\n".join(lines)
