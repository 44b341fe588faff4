"""The hospital's privacy policy: what this node agrees to, whatever a study asks.

A study's config, a message or a crafted model is the coordinator's; the policy is the hospital's own,
a TOML file next to its state (``fedrad client start --policy FILE``), with safe defaults when there
is none. Every round the node brings what the study asks inside the policy (:func:`admit`): stricter
settings are used as asked, looser ones are tightened (a smaller delta, a lower epsilon, more noise),
and what cannot be tightened (DP off, a study not on the allow-list) is declined with a one-line reason.

    [privacy]
    require-dp = true            # a study without DP is declined
    require-secure-aggregation = false  # true: an update leaves only masked by SecAgg+ (client/secagg.py)
    max-epsilon = 8.0            # lifetime cap per dataset, across all studies
    max-delta = 1e-5             # the delta this hospital accounts at (never above 1 / (10 N) either)
    min-noise-multiplier = 0.5   # sigma is never below this, whatever epsilon allows
    min-grad-norm = 0.01         # the clipping norm C is kept inside [min, max]
    max-grad-norm = 10.0

    [studies]
    allow = []                   # study ids that may run here; empty: any

    [evaluation]
    release = "summary"          # summary, full or none (what evaluation replies may carry: client/release.py)
    max-per-study = 100          # evaluations answered per study (one per round and per model)
    max-total = 1000             # evaluations answered over the state dir's life, all studies together

    [validation]
    fraction = 0.15              # this hospital's validation share, drawn once per dataset

    [code]
    approved = []                # code digests of further fedrad releases this hospital approved to run,
                                 # besides the installed one ('fedrad client digest CHECKOUT'; client/approval.py)
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from common.config import SiteSpec, StudyConfig
from common.errors import FedradError

POLICY_FILE = "policy.toml"
RELEASE_LEVELS = ("none", "summary", "full")


class PolicyError(FedradError):
    """The policy file itself is unusable (the node does not start)."""


class Declined(FedradError):
    """The study asks something this hospital's policy cannot bring inside it: the round is declined."""


@dataclass(frozen=True)
class HospitalPolicy:
    """The hospital's own limits; every field has a safe default (the module docstring shows the TOML)."""

    require_dp: bool = True
    require_secure_aggregation: bool = False
    max_epsilon: float = 8.0
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.5
    min_grad_norm: float = 0.01
    max_grad_norm: float = 10.0
    allow_studies: tuple[str, ...] = ()
    release: str = "summary"
    max_evaluations: int = 100  # per study: evaluations answered (each round, each model once)
    max_evaluations_total: int = 1000  # over the state dir's life, all studies (a renamed study is no escape)
    val_fraction: float = 0.15
    approved_code: tuple[str, ...] = ()  # code digests approved besides the installed fedrad's (client/approval.py)
    source: str = "defaults (no policy file)"  # where it was read from, for `fedrad policy show`

    def __post_init__(self) -> None:
        checks = [
            (0 < self.max_epsilon < math.inf, f"max-epsilon must be a number > 0 (got {self.max_epsilon})"),
            (0 < self.max_delta < 1, f"max-delta must be between 0 and 1 (got {self.max_delta})"),
            (self.min_noise_multiplier >= 0, f"min-noise-multiplier must be >= 0 (got {self.min_noise_multiplier})"),
            (0 < self.min_grad_norm <= self.max_grad_norm,
             f"need 0 < min-grad-norm <= max-grad-norm (got {self.min_grad_norm} and {self.max_grad_norm})"),
            (self.release in RELEASE_LEVELS,
             f"evaluation release must be one of {', '.join(RELEASE_LEVELS)} (got {self.release!r})"),
            (self.max_evaluations >= 0, f"max-per-study must be >= 0 (got {self.max_evaluations})"),
            (self.max_evaluations_total >= 0, f"max-total must be >= 0 (got {self.max_evaluations_total})"),
            (0 < self.val_fraction < 1, f"validation fraction must be between 0 and 1 (got {self.val_fraction})"),
            (all(_DIGEST.fullmatch(d) for d in self.approved_code),
             "code approved must list code digests: 64 lowercase hex characters each "
             "('fedrad client digest CHECKOUT' prints one)"),
        ]
        for ok, message in checks:
            if not ok:
                raise PolicyError(f"policy {self.source}: {message}")

    @classmethod
    def load(cls, path: str | Path | None, max_epsilon: float = 0.0) -> HospitalPolicy:
        """The policy in ``path`` (defaults when None); ``max_epsilon`` > 0 (the operator's
        ``--max-epsilon``) replaces the file's lifetime cap."""
        policy = cls() if path is None else cls._read(Path(path).expanduser())
        if max_epsilon > 0:
            policy = cls(**{**policy.fields(), "max_epsilon": max_epsilon})
        return policy

    @classmethod
    def _read(cls, path: Path) -> HospitalPolicy:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise PolicyError(f"policy file not found: {path}") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"policy {path}: not readable TOML ({exc})") from None
        values: dict[str, Any] = {"source": str(path)}
        for section, keys in _SCHEMA.items():
            table = raw.pop(section, {})
            if not isinstance(table, dict):
                raise PolicyError(f"policy {path}: [{section}] must be a table")
            for key, value in table.items():
                if key not in keys:
                    raise PolicyError(f"policy {path}: unknown key '{key}' in [{section}] "
                                      f"(known: {', '.join(keys)})")
                name, kind = keys[key]
                values[name] = _typed(path, f"{section}.{key}", value, kind)
        if raw:
            raise PolicyError(f"policy {path}: unknown section(s) {', '.join(sorted(raw))} "
                              f"(known: {', '.join(_SCHEMA)})")
        return cls(**values)

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def delta_for(self, n: int) -> float:
        """The delta this hospital accounts at for a dataset of ``n`` records: min(max-delta, 1 / (10 m)),
        m = ``n`` rounded up to a power of two. So delta <= 1 / (10 n), and the delta a reply carries tells
        the size only to within a factor of two (1 / (10 n) itself would tell it exactly)."""
        return min(self.max_delta, 1.0 / (10 * (1 << max(n - 1, 0).bit_length())))

    def describe(self) -> list[str]:
        """The effective policy, one line per rule, as `fedrad policy show` and the node's start-up print it."""
        studies = ", ".join(self.allow_studies) if self.allow_studies else "any"
        return [
            f"policy: {self.source}",
            f"  DP required:            {'yes' if self.require_dp else 'no (studies without DP may run)'}",
            f"  secure aggregation:     {'required' if self.require_secure_aggregation else 'as the study asks'}",
            f"  lifetime epsilon cap:   {self.max_epsilon:g} per dataset, across all studies",
            f"  delta:                  at most {self.max_delta:g} and 1/(10 N), N rounded up to a power of 2",
            f"  noise multiplier:       at least {self.min_noise_multiplier:g}",
            f"  clipping norm:          kept within [{self.min_grad_norm:g}, {self.max_grad_norm:g}]",
            f"  studies allowed:        {studies}",
            f"  evaluation releases:    {self.release}, at most {self.max_evaluations} answers per study and "
            f"{self.max_evaluations_total} in all",
            f"  validation fraction:    {self.val_fraction:g} (drawn once per dataset, by patient)",
            "  code that may run:      the installed fedrad's"
            + (f", and {len(self.approved_code)} more release(s) listed here" if self.approved_code else ""),
        ]


_SCHEMA: dict[str, dict[str, tuple[str, type]]] = {
    "privacy": {"require-dp": ("require_dp", bool), "max-epsilon": ("max_epsilon", float),
                "require-secure-aggregation": ("require_secure_aggregation", bool),
                "max-delta": ("max_delta", float), "min-noise-multiplier": ("min_noise_multiplier", float),
                "min-grad-norm": ("min_grad_norm", float), "max-grad-norm": ("max_grad_norm", float)},
    "studies": {"allow": ("allow_studies", tuple)},
    "evaluation": {"release": ("release", str), "max-per-study": ("max_evaluations", int),
                   "max-total": ("max_evaluations_total", int)},
    "validation": {"fraction": ("val_fraction", float)},
    "code": {"approved": ("approved_code", tuple)},
}
_DIGEST = re.compile(r"[0-9a-f]{64}")


_KINDS: dict[type, tuple[str, Any]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    tuple: ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
}


def _typed(path: Path, key: str, value: Any, kind: type) -> Any:
    wanted, fits = _KINDS[kind]
    if not fits(value):
        raise PolicyError(f"policy {path}: {key} must be {wanted} (got {value!r})")
    return tuple(value) if kind is tuple else kind(value)


@dataclass(frozen=True)
class Terms:
    """What one round runs at: the study's request brought inside the policy.

    ``target_epsilon`` is what this study may bring the dataset's lifetime spend to; ``changes`` names each
    setting made stricter than the study asked (for the audit log and the server's per-site record).
    """

    dp: bool
    epsilon_cap: float
    target_epsilon: float
    delta: float
    max_grad_norm: float
    min_noise_multiplier: float
    changes: tuple[str, ...] = field(default=())


def admit(policy: HospitalPolicy, study: StudyConfig, n_train: int, masked: bool = False) -> Terms:
    """The terms this hospital trains a round of ``study`` at, or :class:`Declined` with the reason.

    Declined: a study not on the allow-list; a study without DP where the policy requires DP; where the
    policy requires secure aggregation, a round whose update would not leave through SecAgg+ (``masked``:
    the message came through the SecAgg+ mod, client/secagg.py; what the study config claims is not asked).
    Tightened: delta to min(study, max-delta, 1/(10 N)); the study's epsilon to the lifetime cap; the
    clipping norm into the policy's range. The noise floor is applied where sigma is calibrated.
    """
    if policy.allow_studies and study.study_id not in policy.allow_studies:
        raise Declined(f"study '{study.study_id}' is not on this hospital's allow-list")
    if policy.require_secure_aggregation and not masked:
        raise Declined("this round's update would leave unmasked; this hospital's policy requires secure "
                       "aggregation")
    if not study.dp:
        if policy.require_dp:
            raise Declined("the study asks for training without differential privacy; this hospital's policy "
                           "requires DP")
        return Terms(False, policy.max_epsilon, 0.0, 0.0, study.max_grad_norm, 0.0)
    changes = []
    delta = min(study.delta, policy.delta_for(n_train))
    if delta < study.delta:
        changes.append(f"delta {study.delta:g} -> {delta:g}")
    target = min(study.epsilon, policy.max_epsilon)
    if target < study.epsilon:
        changes.append(f"epsilon {study.epsilon:g} -> {target:g} (the hospital's lifetime cap)")
    clip = min(max(study.max_grad_norm, policy.min_grad_norm), policy.max_grad_norm)
    if clip != study.max_grad_norm:
        changes.append(f"max-grad-norm {study.max_grad_norm:g} -> {clip:g}")
    return Terms(True, policy.max_epsilon, target, delta, clip, policy.min_noise_multiplier, tuple(changes))


def site_policy(spec: SiteSpec, study: StudyConfig) -> HospitalPolicy:
    """The policy a site trains under.

    A real node: its policy file (``spec.policy``, else ``STATE_DIR/policy.toml`` where it exists, else the
    defaults), with the operator's ``--max-epsilon`` over the file's cap. Nothing in ``study`` is read.
    A virtual hospital in a simulation: the researcher's study is the policy (DP as the study says, its
    epsilon as the lifetime cap, its delta, everything released), so a ``--no-dp`` baseline still runs.
    """
    if spec.simulated:
        return HospitalPolicy(
            require_dp=False, max_epsilon=spec.max_epsilon or study.epsilon, max_delta=study.delta,
            min_noise_multiplier=0.0, min_grad_norm=min(0.01, study.max_grad_norm),
            max_grad_norm=max(10.0, study.max_grad_norm), release="full", val_fraction=study.val_fraction,
            source="the simulation's study (the researcher owns every virtual hospital)")
    return node_policy(spec.policy, spec.state_dir, spec.max_epsilon)


def node_policy(policy: str | Path | None, state_dir: Path, max_epsilon: float = 0.0) -> HospitalPolicy:
    """A real node's policy: the file ``policy``, else STATE_DIR/policy.toml where it exists, else the
    defaults; ``max_epsilon`` > 0 (the operator's --max-epsilon) over the cap. The one rule the node, the
    ``fedrad client start`` banner and ``fedrad policy show`` share."""
    if not policy and (state_dir / POLICY_FILE).is_file():
        policy = state_dir / POLICY_FILE
    return HospitalPolicy.load(policy or None, max_epsilon)
