"""The hospital's validation split: drawn once, from the hospital's own secret, and kept for good.

Which images a site validates on decides which images a study may probe through evaluation replies,
so it is not the coordinator's to choose (a study's ``seed`` and ``val-fraction`` are). The first time
a state dir meets its data, patients are split by ``common.partition.train_val_split`` (stratified, by
patient) seeded from a secret the hospital keeps (``validation-split.json``, created with
``os.urandom``, mode 0600), at the policy's fraction. Each patient's side is stored
(as a keyed hash of the patient id, never the id) and never changes: a patient added later joins a side
by the keyed hash of its id (validation when it falls below the fraction) and keeps it. So no image
validated on in one study is trained on in another, whatever any study asks.

A simulation's virtual hospitals split by the study's seed instead (client/site.py): the researcher owns
them all, and the local and pooled baselines (fedrad/baselines.py) use the same split.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

import numpy as np

from common.atomic import atomic_write
from common.errors import FedradError
from common.partition import train_val_split

SPLIT_FILE = "validation-split.json"


def _patient_key(secret: bytes, patient: str) -> str:
    return hmac.new(secret, patient.encode(), hashlib.sha256).hexdigest()[:24]


def _unit(key: str) -> float:
    """A keyed hash as a number in [0, 1): the side of a patient added after the first draw."""
    return int(key[:12], 16) / float(1 << 48)


class HospitalSplit:
    """The state dir's split: its secret, its fraction and every patient's side."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / SPLIT_FILE
        try:
            stored = json.loads(self.path.read_text())
            self.secret = bytes.fromhex(stored["secret"])
            self.fraction = float(stored["fraction"])
            self.sides: dict[str, str] = dict(stored["patients"])
        except FileNotFoundError:
            self.secret, self.fraction, self.sides = os.urandom(32), 0.0, {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Re-drawing would put validated images into training: refuse, like an unreadable ledger.
            raise FedradError(f"validation split {self.path} is unreadable ({type(exc).__name__}); restore it "
                              "from backup: a new split would train on images validated on before") from None

    def split(self, labels: np.ndarray, groups: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(train indices, val indices) of a dataset whose rows belong to patients ``groups``.

        Stored patients keep their side. On the first draw (no patient stored yet) the split is
        ``train_val_split`` at ``fraction`` seeded from the secret; later patients go by their keyed
        hash at the fraction of the first draw (a changed policy fraction applies to a new state dir).
        """
        keys = np.array([_patient_key(self.secret, str(g)) for g in groups])
        if not self.sides:
            self.fraction = fraction
            _, val_idx = train_val_split(labels, groups, fraction, int.from_bytes(self.secret[:8], "little"))
            in_val = set(keys[val_idx])
            self.sides = {k: "val" if k in in_val else "train" for k in dict.fromkeys(keys)}
            self._save()
        new = [k for k in dict.fromkeys(keys) if k not in self.sides]
        if new:
            self.sides.update({k: "val" if _unit(k) < self.fraction else "train" for k in new})
            self._save()
        in_val = np.array([self.sides[k] == "val" for k in keys], dtype=bool)
        return np.flatnonzero(~in_val), np.flatnonzero(in_val)

    def _save(self) -> None:
        payload = json.dumps({"secret": self.secret.hex(), "fraction": self.fraction, "patients": self.sides})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda fh: fh.write(payload.encode()))  # mkstemp's mode: owner only (0600)
