"""Secure aggregation at a hospital: its model update leaves masked, through Flower's SecAgg+ mod.

Rule: a train message that carries SecAgg+ settings (the coordinator runs the study with
``secure-aggregation``, server/secagg.py) goes through Flower's ``secaggplus_mod``; every other message reaches
the ClientApp unchanged. Of SecAgg+'s four stages (setup, share keys, collect masked vectors, unmask) only
the third trains: there the ClientApp's train runs exactly as without secure aggregation (the hospital's
policy, DP-SGD, the ledger, the audit log), and :func:`fit_reply` recasts its reply in the layout the mod
reads (Flower's legacy FitRes): the update delta = w_local - w_global, weighted by the released num-examples n
(0 for a site that declines: it then adds nothing to the sum).

The mod then computes, per coordinate, q(a * delta) + s + sum_j +-p_ij  (mod 2**32), where
a = round(n / max-weight * Q) / Q, q clips to [-C, C] and rounds stochastically to one of Q levels, s is the
site's own mask and p_ij the masks it shares pairwise with the other sites, and it empties every ArrayRecord
of the reply. So the update itself never leaves; the reply's "metrics" and "status" (num-examples, epsilon,
delta, the site's name or why it declined; client/release.py) go in the clear as without secure aggregation.
DP noise is in delta already (each site adds it in training: local DP), so the masking, clipping and
quantisation are post-processing and change no privacy guarantee.
"""

from __future__ import annotations

from contextvars import ContextVar

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from common.config import StudyConfig
from common.logs import get_logger

log = get_logger("fedrad.client")


# True while the ClientApp trains inside SecAgg+'s masking stage: its reply can only leave masked. Set by the
# mod, never by anything in a message, so a hospital that requires secure aggregation (client/policy.py)
# knows rather than trusts the study config.
MASKED: ContextVar[bool] = ContextVar("fedrad_masked", default=False)


def secure_aggregation(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The ClientApp mod: SecAgg+ for a train message that asks for it, else the message as it came."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda m, c: fit_reply(m, _masked_call(call_next, m, c)))


def _masked_call(call_next: ClientAppCallable, msg: Message, context: Context) -> Message:
    token = MASKED.set(True)
    try:
        return call_next(msg, context)
    finally:
        MASKED.reset(token)


def update_delta(global_arrays: ArrayRecord, local: ArrayRecord | None) -> list[np.ndarray]:
    """w_local - w_global, array by array in the global record's order; zeros where there is no local update."""
    delta = []
    for key, array in global_arrays.items():
        start = array.numpy().astype(np.float64)
        delta.append(np.zeros_like(start) if local is None else local[key].numpy().astype(np.float64) - start)
    return delta


def fit_reply(instruction: Message, reply: Message) -> Message:
    """The ClientApp's train reply in the layout secaggplus_mod masks: the update delta with weight num-examples
    (Flower's FitRes records), beside the reply's own "metrics" and "status", which go unmasked."""
    content = reply.content
    local = content.array_records.get("arrays")
    weight = int(content["metrics"]["num-examples"]) if local is not None else 0
    delta = update_delta(instruction.content["arrays"], local)
    _warn_if_clipped(StudyConfig.from_flat(instruction.content["config"]), content, weight, delta)
    fit = fitres_to_recorddict(FitRes(Status(Code.OK, ""), ndarrays_to_parameters(delta), weight, {}), False)
    records = {"metrics": content["metrics"], "status": content["status"], **fit}
    return Message(RecordDict(records), reply_to=instruction)


def _warn_if_clipped(study: StudyConfig, content: RecordDict, weight: int, delta: list[np.ndarray]) -> None:
    """A line in the hospital's log when SecAgg+ will clip some of (n / max-weight) x delta to the clipping range
    (the mean then understates those coordinates; no privacy effect)."""
    largest = max((float(np.max(np.abs(d))) for d in delta if d.size), default=0.0)
    scaled = weight / study.secagg_max_weight * largest
    if scaled > study.secagg_clipping_range:
        log.warning("[%s] secure aggregation clips this update: (num-examples / secagg-max-weight) x |update| "
                    "reaches %.3g, over secagg-clipping-range %g", content["status"].get("site", "?"), scaled,
                    study.secagg_clipping_range)
