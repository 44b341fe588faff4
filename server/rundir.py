"""The run directory: everything a study leaves behind, readable by any script.

    RUN_DIR/config.json              the StudyConfig (flat, Flower-style keys)
    RUN_DIR/metrics.jsonl            one JSON object per round: round, seconds, sites[], aggregate
    RUN_DIR/checkpoints/round-NNN.pt global weights + strategy state after round NNN
    RUN_DIR/model.pt                 the final model with what is needed to use it
    RUN_DIR/sites/<site>/state/      (simulation only) each virtual hospital's ledger

Every file is written to a temporary name and renamed, so a crash leaves
either the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write

CHECKPOINT_RE = re.compile(r"round-(\d{3,})\.pt$")


def json_safe(value: Any) -> Any:
    """NaN/inf (an undefined metric) become null: metrics.jsonl stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def model_path(self) -> Path:
        return self.path / "model.pt"

    def write_config(self, flat: dict[str, Any]) -> None:
        atomic_write(self.config_path, lambda fh: fh.write(json.dumps(flat, indent=2).encode()))

    def read_config(self) -> dict[str, Any]:
        return json.loads(self.config_path.read_text())

    def rounds(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def append_round(self, row: dict[str, Any]) -> None:
        """Add one round; rows for this or later rounds (from a run that died after
        writing them but before its checkpoint) are replaced, keeping the file consistent."""
        rows = [r for r in self.rounds() if r["round"] < row["round"]] + [json_safe(row)]
        payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
        atomic_write(self.metrics_path, lambda fh: fh.write(payload))

    def checkpoint_path(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round:03d}.pt"

    def save_checkpoint(self, server_round: int, payload: dict[str, Any]) -> Path:
        path = self.checkpoint_path(server_round)
        atomic_write(path, lambda fh: torch.save({"round": server_round, **payload}, fh))
        return path

    def latest_checkpoint(self) -> dict[str, Any] | None:
        folder = self.path / "checkpoints"
        found = sorted(
            (int(m.group(1)), p) for p in folder.glob("round-*.pt") if (m := CHECKPOINT_RE.search(p.name))
        ) if folder.is_dir() else []
        if not found:
            return None
        return torch.load(found[-1][1], map_location="cpu", weights_only=False)

    def save_model(self, payload: dict[str, Any]) -> None:
        atomic_write(self.model_path, lambda fh: torch.save(payload, fh))
