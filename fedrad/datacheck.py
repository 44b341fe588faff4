"""``fedrad data check``: what a hospital's folder holds and what training will use.

Reads every file the way training does (same decoding, windowing, labels and
de-duplication) and reports counts only: modalities, body parts, photometric
interpretations, matrix sizes, bit depths, transfer syntaxes, windows, labels,
and each skipped file with its reason. It never reports patient names, IDs or
dates: those header fields are read only to keep a patient in one split.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from common.data import DUPLICATE, NO_LABEL, LabelTable, label_index, resolve_labels, scan_folder
from common.errors import DataError, ImageReadError

MIN_IMAGES = 10  # below this a site cannot carve a validation split worth the name


@dataclass
class DataReport:
    folder: str
    files_seen: int = 0
    decoded: int = 0
    used: int = 0
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
    """Scan ``root`` as training would and summarise it."""
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    table, bad_rows = LabelTable.read(root, labels_csv, required=False)
    items = scan_folder(root, table, size=32, channels=1, workers=workers or os.cpu_count() or 1)
    kept, skipped = resolve_labels(items, table)
    report = DataReport(folder=str(root), files_seen=len(items))
    for item in items:
        if item.pixels is None:
            continue
        report.decoded += 1
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
    for row in kept:
        label = row.raw_label
        if class_names:  # read as training reads it (common/data.py label_index), counted by class name
            try:
                label = class_names[label_index(row.raw_label, class_names)]
            except ImageReadError as exc:
                skipped.append((row.item.rel, str(exc)))
                continue
        report.labels[label] += 1
        report.used += 1
    for rel, reason in bad_rows + skipped:
        report.skipped.append({"file": rel, "reason": reason})
        report.skip_reasons[reason.split(": ")[0] if reason.startswith("cannot decode") else reason] += 1
    report.duplicates = report.skip_reasons.get(DUPLICATE, 0)
    report.unlabeled = report.skip_reasons.get(NO_LABEL, 0)
    if report.used < MIN_IMAGES:
        hint = "; no labels.csv or class subfolders found" if not (table.by_path or table.by_uid or
                                                                   table.from_folders) else ""
        report.verdict = (f"only {report.used} labelled, decodable images (at least {MIN_IMAGES} needed); "
                          f"{len(report.skipped)} skipped{hint}")
    else:
        report.usable = True
        report.verdict = "usable" + (": only one class present" if len(report.labels) == 1 else "")
    return report


def _line(name: str, counts: Counter) -> str:
    return f"{name:<18} " + (" | ".join(f"{k} {n}" for k, n in counts.most_common()) or "-")


def format_report(report: DataReport, max_listed: int = 50) -> str:
    lines = [
        f"fedrad data check: {report.folder}",
        f"{'files seen':<18} {report.files_seen}",
        f"{'decoded':<18} {report.decoded}",
        f"{'used':<18} {report.used} (decoded, labelled, each SOPInstanceUID once)",
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
