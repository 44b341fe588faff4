"""One round of a study is paid for once: the hospital keeps its last sent update per study.

A restarted server (``resume``) or a lost reply can make the server ask a site for a round it has
already trained and charged to its privacy ledger. Training again would spend budget twice on one
round of the study's plan. So the site keeps, per study, the update it last sent (with the SHA-256 of
the global weights it started from, and its training set's fingerprint):

- asked again for that study and round, from the same global weights, on the same data: it sends the
  stored update again; nothing new is computed, nothing is charged (a copy of an output already
  released costs no privacy);
- asked for a round its ledger has already charged but that cannot be answered that way (other
  global weights, other data, or no stored update): it declines with the reason.

Stored in STATE_DIR/sent/<study>.pt, written atomically; one file per study, overwritten each round.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write

SENT_DIR = "sent"


@dataclass
class StoredUpdate:
    study: str
    round: int
    incoming: str  # SHA-256 of the global weights the round started from
    fingerprint: str  # the training set's
    arrays: dict[str, torch.Tensor]
    metrics: dict[str, Any]


class SentUpdates:
    def __init__(self, state_dir: str | Path) -> None:
        self.folder = Path(state_dir) / SENT_DIR

    def path(self, study: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", study) or "study"
        if safe != study:  # keep distinct studies distinct after sanitising
            safe += "-" + hashlib.sha256(study.encode()).hexdigest()[:8]
        return self.folder / f"{safe}.pt"

    def save(self, update: StoredUpdate) -> None:
        payload = {"study": update.study, "round": update.round, "incoming": update.incoming,
                   "fingerprint": update.fingerprint, "metrics": dict(update.metrics),
                   "arrays": {k: v.detach().cpu() for k, v in update.arrays.items()}}
        atomic_write(self.path(update.study), lambda fh: torch.save(payload, fh))

    def get(self, study: str, server_round: int) -> StoredUpdate | None:
        """The update sent for ``server_round`` of ``study``, if it is the one stored."""
        path = self.path(study)
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged copy is no copy: the caller declines
            return None
        if payload.get("study") != study or int(payload.get("round", -1)) != server_round:
            return None
        return StoredUpdate(payload["study"], int(payload["round"]), payload["incoming"], payload["fingerprint"],
                            payload["arrays"], payload["metrics"])
