"""Flower strategies selected by the study config, with what a study needs on top.

Flower's FedAvg, FedProx and FedAdam do the aggregation. ``SiteTracking`` adds:
- replies from sites that declined (budget spent, no usable data) are logged
  with their reason and left out of aggregation instead of failing the round;
- sites that did not answer before the round's timeout (a hospital that went
  down) are recorded as such, Flower's error replies in plain words
  (:func:`error_reason`), and a round with fewer usable updates than
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
from flwr.app import ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from common.config import StudyConfig
from common.logs import get_logger

log = get_logger("fedrad.server")

STATE_ATTRS = ("m_t", "v_t")  # FedOpt family; FedAvg/FedProx keep no state across rounds


def error_reason(kind: str, error: Error, timeout: float) -> str:
    """Why a site took no part in ``kind``, from the error reply Flower put in its place, in words a coordinator
    can act on (Flower's own text stays in the server's log). A SuperLink answers for a missing site: its
    instruction expired (the TTL is the round timeout) or the node stopped sending heartbeats."""
    code, said = error.code, error.reason
    if code in (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
        return (f"no {kind} reply within the round timeout ({timeout:g} s): the hospital's node was down, "
                "disconnected or still working when the round's instruction expired")
    if code == ErrorCode.NODE_UNAVAILABLE:
        return (f"no {kind} reply: the hospital's node went offline (it stopped sending heartbeats to the server: "
                "stopped, crashed or its network dropped)")
    if code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION and "UnapprovedApp" in said:
        # client/runtime.py refuses, before installing it, a study app whose code digest the hospital never approved
        return (f"the hospital refused the study's code: its node runs only fedrad releases it approved, and this "
                f"app's digest is not one of them (compare `fedrad client digest` on both sides): {said}")
    if code in (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.CLIENT_APP_CRASHED):
        return f"the hospital's {kind} failed (its node's log has the details): {said}"
    if code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION:
        return f"the hospital's node could not load fedrad's ClientApp (its fedrad or Flower differs?): {said}"
    if code == ErrorCode.MOD_FAILED_PRECONDITION:
        return f"the hospital's secure-aggregation step refused the round: {said}"
    if code == ErrorCode.INVALID_FAB:
        return f"the hospital's node refused the study's app package: {said}"
    return f"error: {said}"


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
        self.round_timeout = 0.0  # the study's (build_strategy), for the words of a missing site's record
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
                self._decline(site, kind, error_reason(kind, msg.error, self.round_timeout))
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


def scalar_metric_mean(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Flower's weighted mean of the sites' metrics, over their numbers only. Lists (a site's ROC points at its own
    score quantiles, its calibration bins) differ in length from site to site and have no element-wise mean: the
    round's record combines them (server/app.py ``round_row``), and Flower's default would stop the study."""
    scalars = [RecordDict({name: MetricRecord({k: v for k, v in metrics.items() if not isinstance(v, list)})
                           for name, metrics in record.metric_records.items()}) for record in records]
    return aggregate_metricrecords(scalars, weighting_metric_name)


def build_strategy(study: StudyConfig) -> SiteTracking:
    """The configured strategy; a round needs ``min_nodes`` sites and waits at most ``round_timeout``."""
    common = {
        "fraction_train": study.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": study.min_nodes,
        "min_evaluate_nodes": study.min_nodes,
        "min_available_nodes": study.min_nodes,
        "evaluate_metrics_aggr_fn": scalar_metric_mean,
    }
    strategy: SiteTracking
    if study.strategy == "fedprox":
        strategy = StudyFedProx(proximal_mu=study.proximal_mu, **common)
    elif study.strategy == "fedadam":
        strategy = StudyFedAdam(eta=study.server_lr, eta_l=study.lr, tau=1e-3, **common)
    else:
        strategy = StudyFedAvg(**common)
    strategy.round_timeout = study.round_timeout
    return strategy
