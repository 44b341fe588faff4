"""Flower strategies selected by the study config, with what a study needs on top.

Flower's FedAvg, FedProx and FedAdam do the aggregation. ``SiteTracking`` adds:
- replies from sites that declined (budget spent, no usable data) are logged
  with their reason and left out of aggregation instead of failing the round;
- sites that did not answer before the round's timeout (a hospital that went
  down) are recorded as such, and a round with fewer usable updates than
  ``min_nodes`` leaves the global model unchanged;
- each site's own metrics are kept per round for metrics.jsonl (Flower only
  keeps the weighted aggregate);
- the strategy's internal state (FedAdam's moments) can be saved and restored,
  which Flower does not do, so a resumed study continues the same optimiser.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from common.config import StudyConfig
from common.logs import get_logger

log = get_logger("fedrad.server")

STATE_ATTRS = ("m_t", "v_t")  # FedOpt family; FedAvg/FedProx keep no state across rounds


@dataclass
class RoundRecord:
    """What the sites said in one round, keyed by site name."""

    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)
    adjusted: dict[str, str] = field(default_factory=dict)  # what a site's policy made stricter than asked
    updated: bool = True  # False: too few usable updates, the global model stayed as it was


class SiteTracking:
    """Mixin for Flower strategies: per-site records, declined sites, state save/load."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.current = RoundRecord()
        self.node_sites: dict[int, str] = {}
        self.sent: dict[str, int] = {}  # message id -> destination node, of the exchange under way

    def expect(self, messages: Iterable[Message]) -> None:
        """The messages just sent (their ids set by the grid): replies are matched to them."""
        self.sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}

    def _node(self, msg: Message) -> int:
        # The SuperLink answers for a node it considers gone (src = the SuperLink): use the instruction's node.
        return self.sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

    def _site(self, msg: Message) -> str:
        """The site's name from its reply, remembered per node for replies that carry none (errors)."""
        node = self._node(msg)
        status = None if msg.has_error() else msg.content.config_records.get("status")
        if status and "site" in status:
            self.node_sites[node] = str(status["site"])
        return self.node_sites.get(node, f"node-{node}")

    def note_missing(self, replies: Iterable[Message], kind: str, timeout: float) -> None:
        """Record the sites sent a ``kind`` message that did not answer within ``timeout`` seconds."""
        answered = {self._node(msg) for msg in replies}
        for node in sorted(set(self.sent.values()) - answered):
            site = self.node_sites.get(node, f"node-{node}")
            self._decline(site, kind, f"no {kind} reply within the round timeout ({timeout:g} s)")
            log.warning("%s sent no %s reply within %g s: the round goes on without it", site, kind, timeout)

    def note_declined(self, node: int, kind: str, reason: str) -> None:
        """Record that ``node`` took no part in ``kind`` for ``reason`` (nothing it sent says why)."""
        self._decline(self.node_sites.get(node, f"node-{node}"), kind, reason)

    def _decline(self, site: str, kind: str, reason: str) -> None:
        """Why a site took no part; a second reason in the same round (evaluate after train) is added."""
        before = self.current.declined.get(site)
        self.current.declined[site] = f"{before}; {kind}: {reason}" if before and reason not in before else reason

    def _split(self, replies: Iterable[Message], kind: str) -> list[Message]:
        usable = []
        for msg in replies:
            site = self._site(msg)
            if msg.has_error():
                self._decline(site, kind, f"error: {msg.error.reason}")
                log.warning("%s failed in %s: %s", site, kind, msg.error.reason)
                continue
            status = msg.content.config_records.get("status")
            if status and "declined" in status:
                self._decline(site, kind, str(status["declined"]))
                log.warning("%s declined %s: %s", site, kind, status["declined"])
                continue
            if status and "adjusted" in status:
                self.current.adjusted[site] = str(status["adjusted"])
                log.info("%s ran %s inside its policy: %s", site, kind, status["adjusted"])
            records = msg.content.metric_records  # a SecAgg+ reply also has Flower's fitres.num_examples
            metrics = records["metrics"] if "metrics" in records else next(iter(records.values()))
            getattr(self.current, kind)[site] = {k: (list(map(float, v)) if isinstance(v, list) else float(v))
                                                 for k, v in metrics.items()}
            usable.append(msg)
        return usable

    def _usable_train(self, server_round: int, replies: Iterable[Message]) -> list[Message] | None:
        """A new round's record from its train replies; the usable replies, or None with fewer than
        ``min_train_nodes`` (the global model then stays as it was)."""
        self.current = RoundRecord()
        usable = self._split(replies, "train")
        needed = max(1, getattr(self, "min_train_nodes", 1))
        if len(usable) < needed:
            self.current.updated = False
            log.warning("round %d: %d usable update(s), the study needs %d: the global model stays as it was",
                        server_round, len(usable), needed)
            return None
        return usable

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable = self._usable_train(server_round, replies)
        if usable is None:
            return None, None
        return super().aggregate_train(server_round, usable)  # type: ignore[misc]

    def aggregate_masked(self, server_round: int, replies: Iterable[Message], mean: ArrayRecord | None
                         ) -> ArrayRecord | None:
        """The train phase's end under secure aggregation (server/secagg.py): the new global arrays, or None.

        ``replies`` carry each site's metrics and status (recorded as for a plain round); the updates came
        masked and ``mean`` is what SecAgg+ unmasked: the global weights plus the example-weighted mean of the
        updates, i.e. FedAvg of the sites' weights (None: the protocol halted). The strategy's own aggregation
        then runs on ``mean`` as a single reply weighing the sites' total: FedAvg and FedProx return it, FedAdam
        takes its step from it (its delta is mean - global, as from FedAvg's mean of plain replies)."""
        usable = self._usable_train(server_round, replies)
        if usable is None or mean is None:
            self.current.updated = False
            return None
        total = sum(float(m.content["metrics"]["num-examples"]) for m in usable)
        stand_in = RecordDict({"arrays": mean, "metrics": MetricRecord({"num-examples": total})})
        arrays, _ = super().aggregate_train(  # type: ignore[misc]
            server_round, [Message(stand_in, dst_node_id=0, message_type=MessageType.TRAIN)])
        return arrays

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        usable = self._split(replies, "evaluate")
        if not usable:
            return None
        return super().aggregate_evaluate(server_round, usable)  # type: ignore[misc]

    def state_dict(self) -> dict[str, Any]:
        return {a: getattr(self, a) for a in STATE_ATTRS if getattr(self, a, None) is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, {k: np.asarray(v) for k, v in value.items()})


class StudyFedAvg(SiteTracking, FedAvg):
    """FedAvg (McMahan et al. 2017): example-weighted mean of site weights."""


class StudyFedProx(SiteTracking, FedProx):
    """FedProx (Li et al. 2020): FedAvg, and sites add mu/2 ||w - w_global||^2 locally."""


class StudyFedAdam(SiteTracking, FedAdam):
    """FedAdam (Reddi et al. 2021): Adam on the server over the averaged update."""


def build_strategy(study: StudyConfig) -> SiteTracking:
    """The configured strategy; a round needs ``min_nodes`` sites and waits at most ``round_timeout``."""
    common = {
        "fraction_train": study.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": study.min_nodes,
        "min_evaluate_nodes": study.min_nodes,
        "min_available_nodes": study.min_nodes,
    }
    if study.strategy == "fedprox":
        return StudyFedProx(proximal_mu=study.proximal_mu, **common)
    if study.strategy == "fedadam":
        return StudyFedAdam(eta=study.server_lr, eta_l=study.lr, tau=1e-3, **common)
    return StudyFedAvg(**common)
