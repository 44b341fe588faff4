"""Evaluation answers a site has given: one per study round, one per model, the same answer when asked again.

A coordinator who may send any weights could otherwise ask for the validation metrics of a stream of
crafted models, each a question about the validation images. Here a study gets one evaluation per
round and one per model (the SHA-256 of its weights): asked again for a round or a model already
answered, the site replies with the stored answer, and a round already answered on other weights is
declined. Stored as JSON in the state dir (``evaluations.json``), written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.atomic import atomic_write
from common.errors import FedradError

EVALUATIONS_FILE = "evaluations.json"


class EvaluationLog:
    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / EVALUATIONS_FILE
        try:
            self._data: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            self._data = {}
        except (OSError, ValueError) as exc:
            raise FedradError(f"evaluation log {self.path} is unreadable ({type(exc).__name__}): no evaluation "
                              "until it is restored or removed") from None

    def answered(self, study: str, server_round: int, digest: str) -> dict[str, Any] | None:
        """The stored answer for this round or this model of ``study``; FedradError where the round was
        answered on other weights."""
        answers = self._data.get(study, {})
        stored = answers.get(str(server_round))
        if stored is not None:
            if stored["digest"] != digest:
                raise FedradError(f"round {server_round} of study {study} was already evaluated on other weights: "
                                  "one evaluation per round")
            return stored["metrics"]
        return next((a["metrics"] for a in answers.values() if a["digest"] == digest), None)

    def count(self, study: str | None = None) -> int:
        """Evaluations answered for ``study``, or for every study together (None)."""
        if study is None:
            return sum(len(answers) for answers in self._data.values())
        return len(self._data.get(study, {}))

    def store(self, study: str, server_round: int, digest: str, metrics: dict[str, Any]) -> None:
        self._data.setdefault(study, {})[str(server_round)] = {"digest": digest, "metrics": metrics}
        payload = json.dumps(self._data).encode()
        atomic_write(self.path, lambda fh: fh.write(payload))
