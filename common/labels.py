"""A study's classes: where their names come from, and how a data set's labels are matched to them.

Class names come from the data unless a study names them:
- integer labels (an .npz's ``<split>_labels``, or a ``label`` column of indices) give classes 0..max, each
  named by the data where it says (a ``label_name`` column of labels.csv, a ``label_names`` array in the
  .npz), else by its index ("0", "1", ...); so an ordered grade keeps its order;
- named labels (a ``label`` column of names, class subfolders) give those names, sorted (letter case
  ignored), so every site of a study derives the same order.
A name never holds a comma (a study's ``class-names`` is a comma-separated list): ',' becomes ';'.

A negative integer label (-1, as data sets mark an unlabelled image) is no class: its image is skipped as
unlabelled (``UNLABELLED``), counted with the other skips.

Every reader (training, ``fedrad simulate``'s data check, ``fedrad data check``) matches labels with
``match_labels``: a label is a class by name (exactly, else ignoring case) or by index. Labels outside the
study's classes are skipped and counted; when they are most of the data (over half of the labelled images,
or over half of the labels found, counting those that hold at least ``MIN_LABEL_SHARE`` of the images, so a
few stray rows do not count) the study is not the data's task, and ``LabelMatch.refusal`` says so in one
line naming the labels found.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import DataError, ImageReadError

SHOWN_LABELS = 12  # a refusal names at most this many of the labels found
MIN_LABEL_SHARE = 0.01  # a label value with fewer images is not counted among the labels found
MAX_CLASSES = 1000  # more is a column of something else (ids, free text), not a classification task


def label_index(raw: str, classes: Sequence[str]) -> int:
    """The class index of a label: a class name (exactly, else ignoring case) or an index; else ImageReadError."""
    raw = raw.strip()
    if raw in classes:
        return list(classes).index(raw)
    lowered = [c.lower() for c in classes]
    if raw.lower() in lowered:
        return lowered.index(raw.lower())
    if raw.lstrip("-").isdigit() and 0 <= int(raw) < len(classes):
        return int(raw)
    raise ImageReadError(f"unknown label '{raw}'")


def clean_name(name: str) -> str:
    """A class name as a study can list it: stripped, ',' replaced by ';'."""
    return " ".join(str(name).replace(",", ";").split())


def _is_index(raw: str) -> bool:
    return raw.isdigit()


UNLABELLED = "no label (a negative class index: unlabelled)"  # the skip reason of such an image


def is_unlabelled(raw: str) -> bool:
    """Whether a label is a negative integer (-1 for unlabelled, as .npz sets mark them): no class, no image
    to train on, never a class name."""
    raw = str(raw).strip()
    return raw.startswith("-") and raw[1:].isdigit()


def classes_from_labels(raw_labels: Iterable[str], names: Mapping[str, str] | None = None,
                        source: str = "the data") -> list[str]:
    """The class names a set of raw labels defines (the rule in the module docstring).

    ``names`` maps an integer label ("2") to its name, where the data gives one. A DataError when fewer
    than two classes result: a classifier needs two."""
    found = {str(r).strip() for r in raw_labels if not is_unlabelled(r)} - {""}
    names = {str(k).strip(): clean_name(v) for k, v in (names or {}).items() if clean_name(v)}
    if found and all(_is_index(r) for r in found):
        top = max(int(r) for r in found)
        if top >= MAX_CLASSES:
            raise DataError(f"{source}: label {top} as a class index would make {top + 1} classes (at most "
                            f"{MAX_CLASSES}); labels are class indices from 0, or class names")
        classes = [names.get(str(i)) or str(i) for i in range(top + 1)]
        if len({c.lower() for c in classes}) < len(classes):  # two indices with one name: keep them apart
            classes = [f"{c} ({i})" for i, c in enumerate(classes)]
    else:
        unique: dict[str, str] = {}
        for raw in sorted(found, key=lambda r: (r.lower(), r)):
            unique.setdefault(raw.lower(), clean_name(raw))
        classes = list(unique.values())
        if len(classes) > MAX_CLASSES:
            raise DataError(f"{source}: {len(classes)} different labels (at most {MAX_CLASSES} classes): is the "
                            "label column a class?")
    if len(classes) < 2:
        shown = f" ({classes[0]})" if classes else ""
        raise DataError(f"{source}: {len(classes)} class{shown} found in its labels; a study needs at least two")
    return classes


@dataclass
class LabelMatch:
    """How the labels of one data set fall into a study's classes."""

    classes: list[str]
    indices: np.ndarray  # (N,) class index of each label, -1 where it is none of the classes
    found: Counter  # raw label -> images
    outside: Counter  # the raw labels that are none of the classes -> images

    @property
    def matched(self) -> int:
        return int(np.sum(self.indices >= 0))

    def refusal(self, source: str, names: Mapping[str, str] | None = None) -> str:
        """Why ``source`` cannot serve a study of these classes ('' when it can): most of its labels are
        none of them. The labels found are named by ``names`` (the data's own names of integer labels)."""
        images, outside = sum(self.found.values()), sum(self.outside.values())
        counted = {label for label, n in self.found.items() if n >= MIN_LABEL_SHARE * images}
        if not outside or (2 * outside <= images and 2 * len(counted & set(self.outside)) <= len(counted)):
            return ""
        names = names or {}
        shown = ", ".join(f"{label}{f' {names[label]}' if names.get(label) else ''} ({n})"
                          for label, n in sorted(self.found.items(), key=_label_order)[:SHOWN_LABELS])
        more = f" and {len(self.found) - SHOWN_LABELS} more" if len(self.found) > SHOWN_LABELS else ""
        return (f"{source}: {outside} of its {images} labelled images have labels outside the study's classes "
                f"({', '.join(self.classes)}); labels found: {shown}{more}. Name the data's classes "
                "(class-names), or leave them out to take them from the data")

    def check(self, source: str, names: Mapping[str, str] | None = None) -> None:
        """DataError with ``refusal`` when there is one."""
        reason = self.refusal(source, names)
        if reason:
            raise DataError(reason)


def _label_order(item: tuple[str, int]) -> tuple:
    label = item[0]
    return (0, int(label), "") if _is_index(label) else (1, 0, label.lower())


def match_labels(raw_labels: Sequence[str], classes: Sequence[str]) -> LabelMatch:
    """Each raw label's class index (``label_index``; -1 for none), with the counts a refusal names."""
    raw = [str(r).strip() for r in raw_labels]
    index: dict[str, int] = {}
    for label in dict.fromkeys(raw):
        try:
            index[label] = label_index(label, classes)
        except ImageReadError:
            index[label] = -1
    indices = np.fromiter((index[r] for r in raw), dtype=np.int64, count=len(raw))
    found = Counter(raw)
    return LabelMatch(list(classes), indices, found, Counter({r: n for r, n in found.items() if index[r] < 0}))
