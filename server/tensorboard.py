"""Optional TensorBoard scalars of a study (``tensorboard`` run-config key, ``--tensorboard DIR``)."""

from __future__ import annotations

import math
from typing import Any

from common.config import ConfigError

SCALARS = ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "loss", "epsilon",
           "macro_auc", "kappa")  # the last two where the study has them (common/multiclass.py)


class TensorboardLog:
    """Writes each round's aggregate and per-site metrics (the metrics.jsonl row) as scalars."""

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("TensorBoard logging needs the tensorboard package: pip install 'fedrad[tensorboard]'") \
                from None
        self.writer = SummaryWriter(log_dir=log_dir)

    def add_round(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for name in SCALARS:
            value = row["aggregate"].get(name)
            if value is not None and not math.isnan(value):
                self.writer.add_scalar(f"aggregate/{name}", value, step)
            for site in row["sites"]:
                value = site.get(name)
                if value is not None and not math.isnan(value):
                    self.writer.add_scalar(f"sites/{site['site']}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
