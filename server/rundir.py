"""The run directory: everything a study leaves behind, readable by any script.

    RUN_DIR/config.json              the StudyConfig (flat, Flower-style keys) and its "study-digest"
    RUN_DIR/metrics.jsonl            one JSON object per round: round, seconds, sites[], aggregate, study_digest
    RUN_DIR/checkpoints/round-NNN.pt global weights + strategy state after round NNN, and study_digest
    RUN_DIR/model.pt                 the final model with what is needed to use it
    RUN_DIR/sites/<site>/state/      (simulation only) each virtual hospital's ledger

Every file is written to a temporary name and renamed, so a crash leaves
either the old or the new file, never half of one. A round is recorded in
metrics.jsonl first and checkpointed second: a crash between the two leaves a
row that the resumed study writes again, never a checkpoint without its row.

The study digest (:func:`study_digest`) fingerprints what a study computes; it
is written into config.json when the study starts and stamped on every
checkpoint and metrics row, so a resume can tell that they belong together
(:meth:`RunDirectory.resume_point`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from common.atomic import atomic_write
from common.config import StudyConfig
from common.errors import FedradError

CHECKPOINT_RE = re.compile(r"round-(\d{3,})\.pt$")
CONFIG_DIGEST_KEY = "study-digest"  # in config.json, whose keys are Flower-style
DIGEST_KEY = "study_digest"  # in checkpoints and metrics rows, whose keys use underscores
# Study settings that say where and how a study is recorded, not what it computes: the run directory,
# whether this start resumes, where TensorBoard scalars also go, and the study's name (config.json keeps it;
# the sites' ledgers key their rounds by it). Every other StudyConfig setting is part of the digest.
NOT_DIGESTED = frozenset({"out", "resume", "tensorboard", "study-id"})
STUDY_KEYS = frozenset(f.name.replace("_", "-") for f in fields(StudyConfig))


class ResumeError(FedradError):
    """A run directory cannot be resumed: missing, finished, or mixing studies (message is one line)."""


def json_safe(value: Any) -> Any:
    """NaN/inf (an undefined metric) become null: metrics.jsonl stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def study_digest(flat: Mapping[str, Any]) -> str:
    """The fingerprint of a study: 16 hex digits of the SHA-256 of its settings as sorted JSON.

    The settings are the StudyConfig keys present in ``flat`` (config.json, or ``StudyConfig.to_flat()``)
    except NOT_DIGESTED; other keys (the digest itself) are ignored. Only keys present count, so the
    digest of a saved config.json stays the same under a fedrad that adds a setting with a default.
    """
    settings = {k: v for k, v in flat.items() if k in STUDY_KEYS and k not in NOT_DIGESTED}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _differences(study: StudyConfig, saved: StudyConfig) -> list[str]:
    """'key value (saved value)' for each digested setting in which ``study`` differs from ``saved``."""
    mine, theirs = study.to_flat(), saved.to_flat()
    return [f"{k} {mine[k]!r} (saved {theirs[k]!r})" for k in mine if k not in NOT_DIGESTED and mine[k] != theirs[k]]


def _span(rounds: list[int]) -> str:
    return f"round {rounds[0]}" if len(rounds) == 1 else f"rounds {rounds[0]}-{rounds[-1]}"


@dataclass
class ResumePoint:
    """Where a stopped study continues: after ``checkpoint`` (None: at round 1), with ``notes`` to show
    (one line each: a checkpoint skipped, a torn metrics line, a run dir from before study digests)."""

    checkpoint: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    @property
    def next_round(self) -> int:
        return self.checkpoint["round"] + 1 if self.checkpoint else 1


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()
        self._digest: str | None = None

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def model_path(self) -> Path:
        return self.path / "model.pt"

    def write_config(self, flat: Mapping[str, Any]) -> None:
        """config.json: the study's settings and their digest (:func:`study_digest`)."""
        self._digest = study_digest(flat)
        saved = {**{k: v for k, v in flat.items() if k != CONFIG_DIGEST_KEY}, CONFIG_DIGEST_KEY: self._digest}
        atomic_write(self.config_path, lambda fh: fh.write(json.dumps(saved, indent=2).encode()))

    def read_config(self) -> dict[str, Any]:
        return json.loads(self.config_path.read_text())

    @property
    def digest(self) -> str | None:
        """The study digest in config.json; None without one (no config.json yet, or an older fedrad's)."""
        if self._digest is None:
            try:
                saved = self.read_config()
            except (OSError, ValueError):
                return None
            self._digest = saved.get(CONFIG_DIGEST_KEY) if isinstance(saved, dict) else None
        return self._digest

    def saved_study(self) -> StudyConfig:
        """The study in config.json, to resume; a ResumeError when there is none to read."""
        return StudyConfig.from_flat(self._saved_flat())

    def _saved_flat(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise ResumeError(f"cannot resume: {self.config_path} not found")
        try:
            flat = self.read_config()
        except (OSError, ValueError):
            flat = None
        if not isinstance(flat, dict):
            raise ResumeError(f"cannot resume: {self.config_path} is not a study config")
        try:
            StudyConfig.from_flat(flat)
        except FedradError as exc:
            raise ResumeError(f"cannot resume: {self.config_path}: {exc}") from None
        return flat

    def read_rounds(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The rows of metrics.jsonl, and a note for each line that is not a complete JSON object (the torn
        end of a write by a crashed process: skipped; the next :meth:`append_round` leaves it out)."""
        if not self.metrics_path.exists():
            return [], []
        rows, notes = [], []
        for number, line in enumerate(self.metrics_path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("round"), int):
                rows.append(row)
            else:
                notes.append(f"{self.metrics_path.name} line {number} is not a complete round (torn write?): skipped")
        return rows, notes

    def rounds(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl (:meth:`read_rounds`, without its notes)."""
        return self.read_rounds()[0]

    def append_round(self, row: dict[str, Any]) -> None:
        """Add one round, stamped with the study digest; rows for this or later rounds (from a run that died
        after writing them but before its checkpoint) are replaced, keeping the file consistent."""
        stamped = {**json_safe(row), **({DIGEST_KEY: self.digest} if self.digest else {})}
        rows = [r for r in self.rounds() if r["round"] < row["round"]] + [stamped]
        payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
        atomic_write(self.metrics_path, lambda fh: fh.write(payload))

    def checkpoint_path(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round:03d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(round, path) of every checkpoint file, oldest first (by name: none is opened)."""
        folder = self.path / "checkpoints"
        if not folder.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in folder.glob("round-*.pt") if (m := CHECKPOINT_RE.search(p.name)))

    def save_checkpoint(self, server_round: int, payload: dict[str, Any]) -> Path:
        import torch

        path = self.checkpoint_path(server_round)
        stamped = {"round": server_round, **payload, **({DIGEST_KEY: self.digest} if self.digest else {})}
        atomic_write(path, lambda fh: torch.save(stamped, fh))
        return path

    def load_checkpoint(self, server_round: int, path: Path) -> dict[str, Any] | None:
        """A checkpoint's contents; None when the file cannot be read as one (truncated, damaged, not ours)."""
        import torch

        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # torch fails on a damaged file with any of several errors
            return None
        keys = ("arrays", "strategy", "privacy")
        if not isinstance(payload, dict) or payload.get("round") != server_round or any(k not in payload for k in keys):
            return None
        return payload

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest readable checkpoint (a damaged newer one is passed over); None when there is none."""
        for server_round, path in reversed(self.checkpoints()):
            payload = self.load_checkpoint(server_round, path)
            if payload is not None:
                return payload
        return None

    def save_model(self, payload: dict[str, Any]) -> None:
        import torch

        atomic_write(self.model_path, lambda fh: torch.save(payload, fh))

    def resume_point(self, study: StudyConfig) -> ResumePoint:
        """Check that ``study`` can continue here, and from where; reads only, so a refusal changes nothing.

        Refused (ResumeError, one line): no readable config.json; a finished study (model.pt is there);
        a config.json whose settings no longer give its digest (edited); ``study`` differing from the saved
        study in a digested setting (the data now gives another number of sites, say); a checkpoint or a
        metrics row stamped with another digest; checkpoints none of which can be read (starting over would
        repeat rounds the sites have already spent privacy on). Accepted with a note: no checkpoint yet
        (round 1); an unreadable newest checkpoint (the newest readable one is used); torn metrics lines,
        rows after the checkpoint (run again), a config.json without a digest (an older fedrad's run dir:
        nothing can be checked, so nothing is refused for it); all rounds done but no model.pt (the final
        model is written from the last checkpoint).
        """
        flat = self._saved_flat()
        saved = StudyConfig.from_flat(flat)
        found = self.checkpoints()
        rows, notes = self.read_rounds()
        if self.model_path.exists():
            done = found[-1][0] if found else len(rows) or saved.num_rounds
            raise ResumeError(f"cannot resume: {self.path} already finished after {done} rounds "
                              f"({self.model_path.name} is there); use --out for a new study")
        digest = flat.get(CONFIG_DIGEST_KEY)
        if digest is None:
            notes.append(f"{self.config_path.name} has no study digest (run dir of an older fedrad): its checkpoints "
                         "and metrics cannot be checked against it")
        elif digest != study_digest(flat):
            raise ResumeError(f"cannot resume: {self.config_path} was changed after the study started (its "
                              f"settings no longer give its study-digest {digest}); undo the change, or use --out "
                              "for a new study")
        differences = _differences(study, saved)
        if differences:
            raise ResumeError(f"cannot resume: this run differs from the study saved in {self.path} in "
                              f"{', '.join(differences)}; use --out for a new study")
        foreign = [r["round"] for r in rows if digest and r.get(DIGEST_KEY, digest) != digest]
        if foreign:
            raise ResumeError(f"cannot resume: {self.metrics_path.name} {_span(foreign)} "
                              f"{'is' if len(foreign) == 1 else 'are'} from another study (not study digest {digest} "
                              f"of {self.config_path.name}); use --out for a new study")
        checkpoint = self._readable_checkpoint(found, digest, notes)
        last = checkpoint["round"] if checkpoint else 0
        later = [r["round"] for r in rows if r["round"] > last]
        if later:
            notes.append(f"{self.metrics_path.name} {_span(later)} came after the last checkpoint: run again")
        if last and not any(r["round"] == last for r in rows):
            notes.append(f"{self.metrics_path.name} has no row for round {last} (its checkpoint is there)")
        if last >= study.num_rounds:
            notes.append(f"all {study.num_rounds} rounds are done (checkpoint round {last}): writing the final model")
        return ResumePoint(checkpoint, notes)

    def _readable_checkpoint(self, found: list[tuple[int, Path]], digest: str | None,
                             notes: list[str]) -> dict[str, Any] | None:
        """The newest checkpoint that can be read (a note names those passed over); a ResumeError when it
        belongs to another study or none can be read. None (with a note) when there is no checkpoint."""
        if not found:
            notes.append(f"no checkpoint in {self.path}: starting at round 1")
            return None
        unreadable = []
        for server_round, path in reversed(found):
            checkpoint = self.load_checkpoint(server_round, path)
            if checkpoint is None:
                unreadable.append(path.name)
                continue
            if digest and checkpoint.get(DIGEST_KEY, digest) != digest:
                raise ResumeError(f"cannot resume: checkpoint {path.name} belongs to another study (study digest "
                                  f"{checkpoint[DIGEST_KEY]}, {self.config_path.name} has {digest}); "
                                  "use --out for a new study")
            if unreadable:
                notes.append(f"checkpoint {', '.join(unreadable)} {'is' if len(unreadable) == 1 else 'are'} "
                             f"unreadable (truncated?): resuming from {path.name}")
            return checkpoint
        raise ResumeError(f"cannot resume: no checkpoint in {self.path / 'checkpoints'} can be read "
                          f"({', '.join(unreadable)}: truncated?); use --out for a new study")
