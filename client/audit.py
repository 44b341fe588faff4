"""The hospital's audit log: an append-only record of everything that left the site, and of refusals.

One JSON object per line in STATE_DIR/audit.jsonl: time, run id, study id, round, what was sent
(model update or evaluation metrics), its size in bytes and SHA-256, the epsilon after the round,
or what the site declined and why. Lines are appended and fsynced, never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

AUDIT_FILE = "audit.jsonl"


def update_digest(state_dict: dict[str, torch.Tensor]) -> tuple[int, str]:
    """(bytes, SHA-256) of a model update: the tensors' raw bytes in key order."""
    digest = hashlib.sha256()
    size = 0
    for key in sorted(state_dict):
        data = state_dict[key].detach().cpu().contiguous().numpy().tobytes()
        digest.update(key.encode())
        digest.update(data)
        size += len(data)
    return size, digest.hexdigest()


class AuditLog:
    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / AUDIT_FILE

    def append(self, event: str, **fields: Any) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
