"""Secure aggregation of a round's train phase: Flower's SecAgg+ workflow driven from fedrad's ServerApp.

Rule: with ``secure-aggregation`` on, the coordinator never sees a site's update, only the example-weighted
mean of the updates of the sites whose masked vectors arrived, which is all FedAvg needs. The sites' train
metrics and statuses (num-examples, epsilon, declined reasons) are not secret and arrive as without it.

Flower's pieces, unmodified: ``SecAggPlusWorkflow`` runs the protocol over the Grid, the hospitals run
``secaggplus_mod`` (client/secagg.py), and their crypto (ECDH on P-384 for pairwise keys, Shamir secret
sharing of each site's mask seed and key, Fernet for the shares in transit, seeded masks, quantisation) is
Flower's. The workflow was written for Flower's legacy Strategy (configure_fit/aggregate_fit on
FitIns/FitRes, in a ``LegacyContext``); fedrad's strategy stays in charge through three small adapters:

- :class:`_Sampled`, the legacy Strategy the workflow asks: its configure_fit names the sites fedrad's
  strategy sampled, its aggregate_fit keeps the unmasked mean (the workflow hands it every FitRes with the
  same aggregate parameters);
- :class:`StudySecAggPlus`, the workflow with its training instruction replaced by fedrad's own ("arrays",
  "config": what the ClientApp's train reads without secure aggregation, FedProx's mu included);
- :class:`StageGrid`, the Grid the workflow drives: each stage is fedrad's ``exchange`` (the round timeout,
  message TTLs, a StudyStop), and the replies are kept per stage for the per-site records.

One round, every message of type "train", N sampled sites:
  0 setup:    SecAgg+ settings -> each site's two public keys
  1 share:    the others' public keys -> each site's Shamir shares of its secrets, encrypted for each holder
  2 collect:  fedrad's instruction + the shares for the site -> it trains (DP noise added in training) and
              replies its metrics and status, and its update delta masked (client/secagg.py)
  3 unmask:   who is alive, who dropped -> shares from which the server removes the masks:
              sum_i q(a_i delta_i) / sum_i a_i, with a_i = n_i / W, i.e. sum_i n_i delta_i / sum_i n_i.
The new global weights: w + that mean, which is FedAvg of the sites' weights (the weights sum to 1); FedProx
aggregates as FedAvg; FedAdam steps its server optimiser from it (SiteTracking.aggregate_masked).

Dropouts: each site's secrets are shared among k sites (num-shares; default every site of the round), any t
of which (reconstruction-threshold; default a strict majority, floor(k/2) + 1, never below Flower's 2)
rebuild them. A site that drops after sending its masked update is unmasked from the others' shares of its
seed; one that drops before has the masks it shared removed with its rebuilt key. The round completes while
every site keeps at least t live holders of its shares, with every site a holder: N - t dropouts. So N = 3
survives one (t = 2), N = 4 one (t = 3), N = 5 two; N = 2 none (t = 2: one site's "sum" would be its update).
Below the threshold the workflow halts, and the global model stays as it was that round. Each stage waits at
most ``round-timeout`` for replies; a site missing in one stage is left out of the next.
Why a majority: a coordinator that lied about who dropped could ask some sites for a site's seed shares and
others for its key shares (Flower's SecAgg+ has no consistency round); with t > k/2 it cannot get t of both.

What it protects against: a coordinator that follows the protocol and reads what it receives (and up to t - 1
hospitals colluding with it). Not against one that deviates: Flower's SecAgg+ does not sign the public keys
the coordinator relays (a coordinator could hand a site keys of its own making and read the shares that site
encrypts for them), and it draws each mask from numpy's Mersenne Twister seeded with a 32-bit fold of the
secret, not from a cryptographic generator (a site's masked vector hides behind its own seed and one
pairwise seed per other site, 32 bits each). Both are Flower's, kept as they are (no crypto of fedrad's own).

Quantisation: the site sends q(a delta) on a grid of step 2C/Q (C clipping range, Q quantization range),
rounded stochastically (unbiased); the mean's error per coordinate is at most :func:`error_bound`,
~ 2 N C W / (Q sum n): 3.8e-5 for 4 sites of 1000 images at the defaults (its standard deviation is
smaller still). The DP noise in the same mean has a standard deviation of ~ sqrt(T) sigma C_g lr / (B sqrt(N))
per coordinate (T steps a round, sigma the noise multiplier, C_g the gradient clip, B the batch): ~0.03 for
those sites at the defaults (T = 48, sigma ~ 1, lr 0.5, B 64), nearly a thousand times the bound. Clipping (a
site's |a delta| over C: the hospital's log says so) and quantisation are post-processing of DP's output:
they change no privacy guarantee.
Sums wrap modulo 2**32: at most 2**32 / Q sites (1024), and sum n below W * 2**32 / Q.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from common.config import StudyConfig
from common.logs import get_logger
from server.strategy import SiteTracking

log = get_logger("fedrad.server")

MIN_SITES = 2  # SecAggPlusWorkflow runs no round with fewer


def threshold_for(study: StudyConfig, shares: int) -> int:
    """t: the study's reconstruction-threshold, else a strict majority of the ``shares``; at least 2."""
    return max(2, study.secagg_reconstruction_threshold or shares // 2 + 1)


def protocol(study: StudyConfig, sampled: int) -> dict[str, Any]:
    """SecAggPlusWorkflow's settings for a round of ``sampled`` sites.

    k = num-shares (at most ``sampled``), or every sampled site; t = :func:`threshold_for`. Flower takes an
    integer k only above 2 and above t; otherwise 1.0, its "every sampled site"."""
    shares = min(study.secagg_num_shares or sampled, sampled)
    threshold = threshold_for(study, shares)
    return {
        "num_shares": shares if 2 < shares and threshold < shares else 1.0,
        "reconstruction_threshold": threshold,
        "clipping_range": float(study.secagg_clipping_range),
        "quantization_range": int(study.secagg_quantization_range),
        "max_weight": float(study.secagg_max_weight),
        "timeout": study.round_timeout,  # unused: StageGrid waits as fedrad's exchange does
    }


def error_bound(study: StudyConfig, weights: list[float], largest: float = 0.0) -> float:
    """The most the unmasked mean can differ, per coordinate, from sum n_i delta_i / sum n_i (no clipping).

    Site i sends a_i delta_i + e_i with a_i = round(n_i / W Q) / Q and |e_i| < 2C/Q (stochastic rounding),
    and the server divides the sum by sum a_i: the e_i add at most N 2C / (Q sum a_i), and a_i's rounding
    (|a_i - n_i/W| <= 1/(2Q)) moves the weighted mean at most N max|delta| / (Q sum a_i); sum a_i ~ sum n / W.
    ``largest``: max |delta_i|."""
    n, q, c, w = len(weights), study.secagg_quantization_range, study.secagg_clipping_range, study.secagg_max_weight
    total = sum(weights) / w - n / (2 * q)
    return n * (2 * c + largest) / (q * total)


class _Sampled(Strategy):
    """The legacy Strategy SecAggPlusWorkflow asks: the sites fedrad sampled in, the unmasked mean out."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self.grid, self.nodes = grid, nodes
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        empty = FitIns(Parameters(tensors=[], tensor_type=""), {})  # StudySecAggPlus sends fedrad's instead
        return [(GridClientProxy(node, self.grid, 0), empty) for node in self.nodes]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        if results:  # every FitRes carries the same unmasked aggregate
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class StudySecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow sending fedrad's own training instruction (per node) in its collect stage."""

    def __init__(self, instructions: dict[int, RecordDict], **settings: Any) -> None:
        super().__init__(**settings)
        self.instructions = instructions

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        go_on = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {node: self.instructions[node] for node in state.nid_to_fitins}
        return go_on


class StageGrid:
    """The Grid SecAggPlusWorkflow drives: each stage through ``exchange``, its replies kept by stage name;
    ``sent`` maps every message id of the round's stages to its node. Anything else is the real grid's."""

    def __init__(self, grid: Grid, exchange: Callable[[list[Message]], list[Message]]) -> None:
        self._grid, self._exchange = grid, exchange
        self.replies: dict[str, list[Message]] = {}
        self.sent: dict[str, int] = {}
        self.silent: set[int] = set()  # nodes that left a stage's message unanswered

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        replies = self._exchange(messages)  # message ids are set once pushed
        self.sent.update({m.metadata.message_id: m.metadata.dst_node_id for m in messages})
        self.replies[stage] = replies
        self.silent |= {m.metadata.dst_node_id for m in messages} - {self.node(r) for r in replies}
        return replies

    def node(self, reply: Message) -> int:
        return self.sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def site_replies(self) -> list[Message]:
        """Each site's say in the train phase: its collect-stage reply (metrics and status beside the masked
        update, or an error), else the error with which it left at setup or key sharing."""
        said: dict[int, Message] = {}
        for stage in (Stage.COLLECT_MASKED_VECTORS, Stage.SHARE_KEYS, Stage.SETUP):
            for reply in self.replies.get(stage, []):
                if stage == Stage.COLLECT_MASKED_VECTORS or reply.has_error():
                    said.setdefault(self.node(reply), reply)
        return list(said.values())


def _instruction(content: RecordDict) -> RecordDict:
    """A node's own copy of the train instruction (the workflow adds the node's SecAgg+ record to it)."""
    return RecordDict({"arrays": content["arrays"], "config": ConfigRecord(dict(content["config"]))})


def _legacy_context(strategy: _Sampled, server_round: int) -> LegacyContext:
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})  # the weights go in fedrad's instruction
    return LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}), strategy=strategy)


def with_mean_update(arrays: ArrayRecord, mean: list[np.ndarray]) -> ArrayRecord:
    """w + mean delta, array by array in ``arrays``' order (the order the sites listed their deltas in)."""
    if len(mean) != len(arrays):
        raise ValueError(f"secure aggregation returned {len(mean)} arrays for a model of {len(arrays)}")
    out = {}
    for (key, array), delta in zip(arrays.items(), mean, strict=True):
        weights = array.numpy()
        out[key] = Array((weights.astype(np.float64) + delta.reshape(weights.shape)).astype(weights.dtype))
    return ArrayRecord(out)


def secure_train(grid: Grid, study: StudyConfig, strategy: SiteTracking, messages: Iterable[Message],
                 arrays: ArrayRecord, server_round: int,
                 exchange: Callable[[list[Message]], list[Message]]) -> ArrayRecord | None:
    """The train phase of a round under SecAgg+: the new global arrays, or None (model unchanged).

    ``messages``: fedrad's strategy's train instructions (who was sampled, what they are sent);
    ``exchange``: one stage's send-and-wait (server/app.py ``exchange``)."""
    messages = list(messages)
    nodes = [m.metadata.dst_node_id for m in messages]
    if len(nodes) < MIN_SITES:
        log.warning("round %d: secure aggregation needs at least %d sites, %d sampled: the model stays as it was",
                    server_round, MIN_SITES, len(nodes))
    sampled, stages = _Sampled(grid, nodes), StageGrid(grid, exchange)
    workflow = StudySecAggPlus({m.metadata.dst_node_id: _instruction(m.content) for m in messages},
                               **protocol(study, len(nodes)))
    workflow(stages, _legacy_context(sampled, server_round))  # type: ignore[arg-type]
    replies = stages.site_replies()
    if sampled.mean is None and len(nodes) >= MIN_SITES:
        log.warning("round %d: secure aggregation halted (a site kept fewer than %d of its share holders): the "
                    "model stays as it was", server_round, workflow.reconstruction_threshold)
    mean = None if sampled.mean is None else with_mean_update(arrays, sampled.mean)
    strategy.sent = stages.sent  # replies are matched to the round's messages of every stage
    new_arrays = strategy.aggregate_masked(server_round, replies, mean)
    # A site that answered every stage it was asked, but was never asked to train: the protocol stopped first.
    stopped = set(nodes) - stages.silent - {stages.node(r) for r in replies}
    for node in sorted(stopped):
        strategy.note_declined(node, "train", _stopped_reason(study, len(nodes), workflow.reconstruction_threshold))
    strategy.sent = {mid: node for mid, node in stages.sent.items() if node not in stopped}
    strategy.note_missing(replies, "train", study.round_timeout)  # the silent ones
    return new_arrays


def _stopped_reason(study: StudyConfig, sampled: int, threshold: float) -> str:
    if sampled < MIN_SITES:
        return f"secure aggregation needs at least {MIN_SITES} sites in a round ({sampled} sampled)"
    return (f"secure aggregation stopped before this site trained: fewer than {threshold:g} sites kept answering "
            f"(secagg-reconstruction-threshold; the round timeout is {study.round_timeout:g} s)")
