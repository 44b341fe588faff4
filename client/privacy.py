"""The hospital's privacy budget: noise calibration and a ledger on disk.

DP-SGD (Abadi et al. 2016) clips each sample's gradient to L2 norm C and adds
N(0, sigma^2 C^2) noise to the sum of a Poisson-sampled batch (rate q). Each
step is a subsampled Gaussian mechanism; the accountant (Opacus' PRV
accountant, Gopi et al. 2021) composes all steps ever taken on a dataset into
one (epsilon, delta). The ledger keeps that step history per dataset across
rounds, client restarts and later studies, so the epsilon it reports is the
true cumulative spend, not one round's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.atomic import atomic_write

ACCOUNTANT = "prv"
LEDGER_FILE = "privacy-ledger.json"

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)


def epsilon_of(history: History, delta: float) -> float:
    """Cumulative epsilon of a step history at ``delta`` (0 for no steps)."""
    if not history:
        return 0.0
    accountant = create_accountant(ACCOUNTANT)
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, total_steps: int) -> float:
    """Noise multiplier sigma so that ``total_steps`` steps at rate q spend ``epsilon``.

    Computed once for the whole planned study (rounds x local epochs x steps per
    epoch); calibrating per round would spend the target every round.
    """
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=ACCOUNTANT,
            epsilon_tolerance=0.005,
        )
    )


@dataclass
class DatasetEntry:
    """One dataset's spend: the accountant history and a row per trained round."""

    name: str
    delta: float
    history: History
    rounds: list[dict[str, Any]]

    def epsilon(self, extra: History | None = None, delta: float | None = None) -> float:
        """Cumulative epsilon of the history (plus ``extra`` planned steps)."""
        return epsilon_of(self.history + (extra or []), delta or self.delta)


class PrivacyLedger:
    """Append-only record of privacy spent, one entry per dataset fingerprint.

    Stored as JSON in the hospital's state dir and rewritten atomically, so a
    crash never leaves a half-written ledger.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self._data: dict[str, Any] = {"version": 1, "datasets": {}}
        if self.path.exists():
            try:
                self._data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                # Never silently reset a budget: refusing to train is the safe failure.
                raise RuntimeError(f"privacy ledger {self.path} is unreadable ({exc}); fix or restore it") from None

    def entry(self, fingerprint: str, name: str = "", delta: float = 1e-5) -> DatasetEntry:
        raw = self._data["datasets"].get(fingerprint)
        if raw is None:
            return DatasetEntry(name, delta, [], [])
        return DatasetEntry(raw["name"], raw["delta"], [tuple(h) for h in raw["history"]], raw["rounds"])

    def record(
        self, fingerprint: str, entry: DatasetEntry, history: History, study_id: str, server_round: int,
        known: tuple[History, float] | None = None,
    ) -> float:
        """Replace the dataset's history by ``history`` (old + new steps) and log the round.

        ``known`` is a (history, epsilon) pair already computed (the budget check's);
        it is reused only when it is exactly this history, saving a second PRV pass.
        """
        if history[: len(entry.history)] != entry.history:
            raise ValueError("ledger history may only grow")
        if known is not None and [tuple(h) for h in known[0]] == [tuple(h) for h in history]:
            epsilon = known[1]
        else:
            epsilon = epsilon_of(history, entry.delta)
        new_steps = sum(h[2] for h in history[len(entry.history) :])
        rounds = entry.rounds + [
            {"study": study_id, "round": server_round, "steps": new_steps, "epsilon": epsilon, "time": time.time()}
        ]
        self._data["datasets"][fingerprint] = {
            "name": entry.name,
            "delta": entry.delta,
            "history": [list(h) for h in history],
            "rounds": rounds,
        }
        atomic_write(self.path, lambda fh: fh.write(json.dumps(self._data, indent=1).encode()))
        return epsilon

    def datasets(self) -> dict[str, DatasetEntry]:
        return {fp: self.entry(fp) for fp in self._data["datasets"]}
