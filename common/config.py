"""Typed configuration: a study (shared by server and clients) and a hospital node.

Flower hands configuration around as flat ``{str: str|int|float|bool}`` dicts
(run config, node config, message ConfigRecords). They are parsed exactly once
into these dataclasses; the rest of the code only sees typed attributes.
Keys use Flower's dash style (``num-rounds``); field names use underscores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from common.dicom import MULTIFRAME_POLICIES
from common.errors import FedradError

STRATEGIES = ("fedavg", "fedprox", "fedadam")
MODELS = ("scatternet", "cnn", "resnet18")
MODES = ("federated", "local", "pooled")


class ConfigError(FedradError, ValueError):
    """A configuration value is missing or invalid (message is one line).

    An error about one setting names it by its config key (``num-rounds``), the key's first mention in
    the message, and keeps it in ``key``: :meth:`naming` says the same with the setting called as the
    caller knows it (the CLI: ``--rounds``).
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key

    def naming(self, names: Mapping[str, str]) -> ConfigError:
        """This error with its key replaced by ``names[key]`` (itself when the key is not there)."""
        name = names.get(self.key)
        if not name or self.key not in str(self):
            return self
        return ConfigError(str(self).replace(self.key, name, 1), name)


def _shown(value: Any) -> str:
    """A value as a person typed it: 0 and 1e-05 for floats, quotes around text."""
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    """ConfigError '{key} {rule} (got {value})' unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} {rule} (got {_shown(value)})", key)


def _require_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """ConfigError "unknown {key} '{value}' (choose from ...)" unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r} (choose from {', '.join(choices)})", key)


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Convert a flat config value to the dataclass field's type."""
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {value!r} as {kind.__name__}", name) from None


def _from_flat(cls: type, flat: Mapping[str, Any]) -> Any:
    kwargs = {}
    for f in fields(cls):
        key = f.name.replace("_", "-")
        if key in flat:
            kind = {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
            kwargs[f.name] = _coerce(key, flat[key], kind)
    return cls(**kwargs)


def _to_flat(obj: Any) -> dict[str, Any]:
    return {f.name.replace("_", "-"): getattr(obj, f.name) for f in fields(obj)}


DEFAULT_LR_DP, DEFAULT_LR_NON_DP = 0.5, 0.05
# Local epochs when not given: 3, or 1 under DP with a budget below SMALL_BUDGET_EPSILON (see the field's comment).
DEFAULT_LOCAL_EPOCHS, SMALL_BUDGET_LOCAL_EPOCHS, SMALL_BUDGET_EPSILON = 3, 1, 3.0


@dataclass(frozen=True)
class StudyConfig:
    """Everything a study fixes for all sites: rounds, strategy, model, privacy.

    The server parses it from Flower's run config and sends it to every client
    in each message, so both sides always use the same values.
    """

    # Measured at epsilon 8 on the four chest X-ray hospitals (in-process FedAvg, README "why the defaults"):
    # with 1 local epoch, 5/10/20 rounds gave val AUC 0.836/0.906/0.942 and 40 rounds 0.949; with 20 rounds,
    # 1/2/3/4 local epochs gave 0.946/0.961/0.971/0.963 (a width-8 CNN; width 16, the default model, 0.943 with 1),
    # and 10 rounds x 4 epochs 0.955.
    # Under DP more steps at the same budget mean more noise per step; 20 x 3 was the best trade at epsilon 8,
    # and at epsilon 3 (0.947 vs 0.928 with one), but at epsilon 1 three fell to 0.656 against 0.848: 0 = that choice.
    num_rounds: int = 20
    local_epochs: int = 0
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01  # FedAdam's eta
    fraction_train: float = 1.0
    min_nodes: int = 2
    round_timeout: float = 900.0
    model: str = "scatternet"  # fixed wavelet scattering + a small CNN (common/models.py, README)
    image_size: int = 64
    # The model's input channels and output classes. A deployed study names them (the coordinator does not see the
    # data); ``fedrad simulate`` takes them from its data unless given (fedrad/simulation.py ``task_of``).
    channels: int = 1
    multiframe: str = "middle"  # multi-frame DICOM: middle frame, first, or max projection
    class_names: str = "normal,pneumonia"
    ordinal: bool = False  # the classes are ordered grades: sites also report quadratic weighted kappa
    batch_size: int = 64
    # SGD step size; 0 = the measured default for the mode: 0.5 under DP (the update is a mean of clipped,
    # noised gradients, each of norm <= max-grad-norm) and 0.05 without (raw gradients are far larger:
    # pooled chest X-rays at 0.5 collapsed onto the majority class, AUC 0.89; at 0.05, 0.96).
    lr: float = 0.0
    momentum: float = 0.0
    dp: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    # Secure aggregation (Flower's SecAgg+, server/secagg.py): the coordinator learns only the example-weighted
    # mean of a round's updates. On for deployments; ``fedrad simulate`` sets it (off unless --secure-aggregation).
    secure_aggregation: bool = True
    secagg_num_shares: int = 0  # sites holding shares of each site's mask secrets; 0 = every site of the round
    secagg_reconstruction_threshold: int = 0  # shares that rebuild a secret; 0 = a strict majority of num-shares
    secagg_clipping_range: float = 8.0  # each coordinate of (n / max-weight) x update is clipped to +-this
    secagg_quantization_range: int = 4194304  # 2**22 integer levels over [-clip, clip]; sites x this < 2**32
    secagg_max_weight: float = 10000.0  # the num-examples that weighs 1 (the update's scale before clipping)
    augment: str = "none"  # preset: none, chest-xray, mammography, mri, ultrasound (client/augmentation.py)
    augment_overrides: str = ""  # "rotation_deg=10 elastic_p=0": any field of the preset
    augment_multiplicity: int = 1  # K augmented views per sample, averaged before clipping
    val_fraction: float = 0.15
    seed: int = 0
    study_id: str = ""
    out: str = ""  # the run directory
    tensorboard: str = ""  # also write TensorBoard scalars here (needs fedrad[tensorboard])
    resume: bool = False  # continue the study in ``out`` from its last checkpoint
    # Simulation only: where virtual hospitals find their data, and what is compared.
    mode: str = "federated"  # or local (each site alone) / pooled (all data together): fedrad/baselines.py
    data: str = ""
    num_sites: int = 0
    partition: str = "iid"

    def __post_init__(self) -> None:
        """Each invalid value is a ConfigError naming its key, the rule and the value given."""
        _require(self.lr >= 0, "lr", "must be positive (0: the default for the mode)", self.lr)
        _require(self.local_epochs >= 0, "local-epochs", "must be at least 1 (0: the default for the budget)",
                 self.local_epochs)
        if self.lr == 0:
            object.__setattr__(self, "lr", DEFAULT_LR_DP if self.dp else DEFAULT_LR_NON_DP)
        if self.local_epochs == 0:
            small = self.dp and self.epsilon < SMALL_BUDGET_EPSILON
            object.__setattr__(self, "local_epochs", SMALL_BUDGET_LOCAL_EPOCHS if small else DEFAULT_LOCAL_EPOCHS)
        _require_choice("strategy", self.strategy, STRATEGIES)
        _require_choice("model", self.model, MODELS)
        _require_choice("mode", self.mode, MODES)
        _require_choice("multiframe", self.multiframe, MULTIFRAME_POLICIES)
        _require(self.num_rounds >= 1, "num-rounds", "must be at least 1", self.num_rounds)
        _require(self.image_size >= 16, "image-size", "must be at least 16", self.image_size)
        _require(self.model != "scatternet" or self.image_size % 4 == 0, "image-size",
                 "must be a multiple of 4 for the scatternet model (2 scales of 2x)", self.image_size)
        _require(self.channels in (1, 3), "channels", "must be 1 (grayscale) or 3 (RGB)", self.channels)
        _require(len(self.classes) >= 2, "class-names", "needs at least two comma-separated names", self.class_names)
        _require(self.batch_size >= 1, "batch-size", "must be at least 1", self.batch_size)
        if self.dp:
            _require(self.epsilon > 0, "epsilon", "must be > 0 under DP", self.epsilon)
            _require(0 < self.delta < 1, "delta", "must be between 0 and 1 under DP", self.delta)
            _require(self.max_grad_norm > 0, "max-grad-norm", "must be > 0 under DP", self.max_grad_norm)
        _require(self.augment_multiplicity >= 1, "augment-multiplicity", "must be at least 1",
                 self.augment_multiplicity)
        _require(0 < self.val_fraction < 1, "val-fraction", "must be between 0 and 1", self.val_fraction)
        _require(0 < self.fraction_train <= 1, "fraction-train", "must be in (0, 1]", self.fraction_train)
        _require(self.min_nodes >= 1, "min-nodes", "must be at least 1", self.min_nodes)
        _require(not self.num_sites or self.min_nodes <= self.num_sites, "min-nodes",
                 f"must be at most the number of sites, {self.num_sites}", self.min_nodes)
        _require(self.round_timeout > 0, "round-timeout", "must be > 0 seconds", self.round_timeout)
        self._check_secagg()

    def _check_secagg(self) -> None:
        """SecAgg+'s settings as Flower's SecAggPlusWorkflow takes them (server/secagg.py ``protocol``)."""
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        _require(shares == 0 or shares >= 3, "secagg-num-shares", "must be 0 (every site) or at least 3", shares)
        _require(threshold == 0 or threshold >= 2, "secagg-reconstruction-threshold",
                 "must be 0 (a majority) or at least 2", threshold)
        _require(not (shares and threshold) or threshold < shares, "secagg-reconstruction-threshold",
                 f"must be below secagg-num-shares, {shares}", threshold)
        _require(self.secagg_clipping_range > 0, "secagg-clipping-range", "must be > 0", self.secagg_clipping_range)
        _require(2 <= self.secagg_quantization_range <= 2**31, "secagg-quantization-range",
                 "must be between 2 and 2**31 (the masks add modulo 2**32)", self.secagg_quantization_range)
        _require(self.secagg_max_weight > 0, "secagg-max-weight", "must be > 0", self.secagg_max_weight)

    @property
    def classes(self) -> list[str]:
        return [c.strip() for c in self.class_names.split(",") if c.strip()]

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> StudyConfig:
        """Parse Flower's run config (or a message ConfigRecord); unknown keys are ignored."""
        return _from_flat(cls, flat)

    def to_flat(self) -> dict[str, Any]:
        """The flat dict form, for Flower's run config, ConfigRecords and config.json."""
        return _to_flat(self)

    def replace(self, **changes: Any) -> StudyConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class NodeConfig:
    """What a hospital's own operator sets on its SuperNode (never the study).

    ``policy`` is the hospital's privacy policy file (client/policy.py; default STATE_DIR/policy.toml
    where it exists, else the policy's defaults). ``max_epsilon`` > 0 replaces the policy's lifetime
    budget per dataset (default 8); never the study's value. No study can raise either.
    """

    data: str = ""
    site: str = ""
    state_dir: str = ""
    max_epsilon: float = 0.0
    policy: str = ""
    # Injected by Flower's simulation engine.
    partition_id: int = -1
    num_partitions: int = 0

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> NodeConfig:
        return _from_flat(cls, flat)

    @property
    def simulated(self) -> bool:
        return not self.data and self.partition_id >= 0


@dataclass(frozen=True)
class SiteSpec:
    """A resolved hospital: its name, its data and where its ledger lives."""

    site: str
    data: Path
    state_dir: Path
    max_epsilon: float = 0.0
    # Rows of ``data`` that belong to this site (simulation of a shared source).
    indices: tuple[int, ...] | None = field(default=None, repr=False)
    policy: str = ""  # the hospital's policy file ('' = STATE_DIR/policy.toml or the defaults)
    simulated: bool = False  # a virtual hospital: the researcher's study is its policy (client/policy.py)
