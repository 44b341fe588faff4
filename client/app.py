"""The ClientApp a hospital runs: train with DP on its own images, evaluate, reply.

Every round is run under the hospital's own policy (client/policy.py), never the study's say-so:
what the study asks is tightened to the policy or declined. What leaves the site, and nothing else,
is listed field by field in client/release.py: model weights after local DP training (masked
under secure aggregation: client/secagg.py), the rounded number of images, the privacy spent, and the
evaluation metrics the policy releases.
A site that cannot take part (no usable data, budget exhausted) replies that
it declines, with a one-line reason, instead of failing the round. A round of
a study is charged once: asked for it again (a restarted server), the site
re-sends the same update or declines (client/resend.py). Under DP a round's
budget check, training and ledger record hold the ledger's lock, so two studies
training on one state dir take turns and neither can spend the other's budget.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import AuditLog, update_digest
from client.budget import raise_cap_hint
from client.evaluations import EvaluationLog
from client.policy import Declined, HospitalPolicy, Terms, admit, site_policy
from client.privacy import DatasetEntry, PrivacyLedger, epsilon_of
from client.release import coarse_epsilon, evaluation_metrics, train_metrics
from client.resend import SentUpdates, StoredUpdate
from client.secagg import MASKED, secure_aggregation
from client.site import SiteData, load_site_data, resolve_site
from client.training import TrainSettings, evaluate, sample_rate, steps_per_epoch, study_noise, train_local
from common.config import NodeConfig, SiteSpec, StudyConfig
from common.errors import FedradError
from common.logs import get_logger
from common.models import build_model, pick_device

log = get_logger("fedrad.client")

app = ClientApp()

_reported_skips: set[str] = set()


def _threads() -> None:
    # Simulation gives each virtual hospital a CPU share; use exactly that many threads.
    n = int(os.environ.get("FEDRAD_THREADS", "0") or 0)
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


# What the coordinator is told when a site cannot load its own side of a study (its data, its policy file):
# the reason itself names paths, label names and per-label counts, so it stays in the site's audit log.
PRIVATE_REFUSAL = "this site cannot take part in this study (the reason is in the site's own audit log)"


class _SiteRefusal(FedradError):
    """A refusal whose reason describes the site (its data, its files): audited, never sent."""


def _setup(msg: Message, context: Context) -> tuple[StudyConfig, SiteSpec, HospitalPolicy, SiteData]:
    """The study (its errors are the coordinator's and go back to it), then this site's side of it (whose
    errors are the site's business: _SiteRefusal)."""
    _threads()
    study = StudyConfig.from_flat(msg.content["config"])
    try:
        spec = resolve_site(study, NodeConfig.from_flat(context.node_config))
        policy = site_policy(spec, study)
        data = load_site_data(spec, study, policy)
    except FedradError as exc:
        raise _SiteRefusal(str(exc)) from None
    if data.train.skipped and spec.site not in _reported_skips:
        _reported_skips.add(spec.site)  # once per process, not every round
        log.warning("[%s] %s", spec.site, data.train.skip_summary())
    return study, spec, policy, data


def _refused(msg: Message, context: Context, exc: FedradError) -> Message:
    """A refusal before the site's setup completed, audited where the node has a state dir."""
    site = str(context.node_config.get("site", "")) or f"node-{context.node_id}"
    state = str(context.node_config.get("state-dir", ""))
    config = msg.content["config"]
    public = PRIVATE_REFUSAL if isinstance(exc, _SiteRefusal) else str(exc)
    return _declined(msg, site, str(exc), AuditLog(state) if state else None, public=public,
                     study=str(config.get("study-id", "")), round=int(config.get("server-round", 0) or 0))


def _model(study: StudyConfig, msg: Message) -> torch.nn.Module:
    model = build_model(study.model, study.channels, len(study.classes))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def _declined(msg: Message, site: str, reason: str, audit: AuditLog | None = None, public: str = "", hint: str = "",
              **context: Any) -> Message:
    """The reply of a site that takes no part: ``public`` (default ``reason``) for the coordinator, ``reason``
    for the site's log and audit log; ``hint`` (what the hospital can do about it) for its log line only."""
    log.warning("[%s] declines round: %s%s", site, reason, f" ({hint})" if hint else "")
    if audit is not None:
        audit.append("declined", site=site, reason=reason, run_id=msg.metadata.run_id, **context)
    content = RecordDict({"metrics": MetricRecord({"num-examples": 0}),
                          "status": ConfigRecord({"site": site, "declined": public or reason})})
    return Message(content, reply_to=msg)


def _decline_round(msg: Message, spec: SiteSpec, study: StudyConfig, server_round: int, reason: str,
                   hint: str = "") -> Message:
    """A refusal of one round of ``study`` once the site is set up: logged, audited and sent with its reason."""
    return _declined(msg, spec.site, reason, AuditLog(spec.state_dir), hint=hint, study=study.study_id,
                     round=server_round)


def _budget_hint(spec: SiteSpec, entry: DatasetEntry) -> str:
    """A real hospital's log, on a refusal for budget: what its data has spent, and how it raises its own cap
    (a virtual hospital's cap is the simulated study's epsilon)."""
    if spec.simulated:
        return ""
    spent = float(entry.rounds[-1]["epsilon"]) if entry.rounds else 0.0
    return f"epsilon {spent:.2f} already spent on this data over all studies; {raise_cap_hint(spec.state_dir)}"


def _answer_again(msg: Message, study: StudyConfig, spec: SiteSpec, server_round: int, fingerprint: str,
                  incoming: str, charged: dict[str, Any]) -> Message:
    """A round this site's ledger has already charged: the same update again, or a refusal."""
    audit = AuditLog(spec.state_dir)
    stored = SentUpdates(spec.state_dir).get(study.study_id, server_round)
    if stored is None or stored.incoming != incoming or stored.fingerprint != fingerprint:
        why = ("no copy of the update sent then is kept" if stored is None else
               "the training data changed since" if stored.fingerprint != fingerprint else
               "the server now sends other global weights")
        return _decline_round(
            msg, spec, study, server_round, f"round {server_round} of study {study.study_id} was already trained "
            f"and charged (epsilon {coarse_epsilon(float(charged['epsilon'])):.1f}) and {why}: the site does not "
            "spend budget on one round twice")
    size, sha = update_digest(stored.arrays)
    audit.append("re-sent model update", site=spec.site, run_id=msg.metadata.run_id, study=study.study_id,
                 round=server_round, bytes=size, sha256=sha, epsilon=float(charged["epsilon"]),
                 metrics=dict(stored.metrics),  # exactly the metrics that left again
                 reason="round already trained and charged; same global weights: the stored update, no new training")
    log.info("[%s] round %d of study %s was already trained: sending the same update again, no new budget spent",
             spec.site, server_round, study.study_id)
    content = RecordDict({"arrays": ArrayRecord(stored.arrays), "metrics": MetricRecord(stored.metrics),
                          "status": ConfigRecord({"site": spec.site})})
    return Message(content, reply_to=msg)


@app.train(mods=[secure_aggregation])  # the update leaves masked when the study asks (client/secagg.py)
def train(msg: Message, context: Context) -> Message:
    try:
        study, spec, policy, data = _setup(msg, context)
    except FedradError as exc:
        return _refused(msg, context, exc)
    server_round = int(msg.content["config"].get("server-round", 0))
    try:
        terms = admit(policy, study, len(data.train), masked=MASKED.get())
        ledger = PrivacyLedger(spec.state_dir)
    except FedradError as exc:  # outside the policy, or an unreadable ledger: audited, the study goes on
        return _decline_round(msg, spec, study, server_round, str(exc))
    # From here on the round runs at the terms: the study as the hospital's policy allows it.
    study = study.replace(dp=terms.dp, delta=terms.delta if terms.dp else study.delta,
                          max_grad_norm=terms.max_grad_norm)
    # The seed serves a non-DP baseline only: under DP every draw is the OS's (round_randomness).
    settings = TrainSettings.from_study(study, 0.0, study.seed + 1000 * server_round)
    with ExitStack() as hold:
        if study.dp:  # the lock is waited for at most as long as the server waits for this reply
            try:
                hold.enter_context(ledger.locked(timeout=study.round_timeout))
            except FedradError as exc:
                return _decline_round(msg, spec, study, server_round, str(exc))
        return _train_round(msg, study, spec, policy, terms, data, ledger, settings, server_round)


def _train_round(msg: Message, study: StudyConfig, spec: SiteSpec, policy: HospitalPolicy, terms: Terms,
                 data: SiteData, ledger: PrivacyLedger, settings: TrainSettings, server_round: int) -> Message:
    """Check the budget, train and record the spend (under DP the caller holds the ledger's lock).

    The budget is the policy's lifetime cap, accounted at the hospital's delta (the ledger entry's,
    fixed when the dataset was first trained on); sigma is calibrated for the study's epsilon within
    that cap at the round's delta, and never below the policy's noise floor."""
    n = len(data.train)
    spe = steps_per_epoch(n, study.batch_size)
    entry = ledger.entry(data.fingerprint, name=spec.site, delta=policy.delta_for(n), keys=data.train.keys)
    _, incoming = update_digest(msg.content["arrays"].to_torch_state_dict())
    charged = next((r for r in entry.rounds if r.get("study") == study.study_id and r.get("round") == server_round),
                   None)
    if charged is not None:  # asked again (a restarted server, a lost reply): never paid for twice
        return _answer_again(msg, study, spec, server_round, data.fingerprint, incoming, charged)
    sigma, planned, after = 0.0, [], 0.0
    if study.dp:
        q, budget = sample_rate(n, study.batch_size), terms.epsilon_cap
        # A hospital stricter than the study adds more noise rather than dropping out.
        try:
            sigma = max(study_noise(study, n, terms.target_epsilon), terms.min_noise_multiplier)
        except FedradError as exc:  # a budget too small for any noise level
            return _decline_round(msg, spec, study, server_round, str(exc), _budget_hint(spec, entry))
        planned = entry.history + [(sigma, q, study.local_epochs * spe)]
        after = epsilon_of(planned, entry.delta)
        if after > budget + 1e-9:
            return _decline_round(  # epsilon rounded up as in every reply (client/release.py)
                msg, spec, study, server_round, f"this round would bring epsilon to {coarse_epsilon(after):.1f}, "
                f"over the site's budget {budget:.2f}", _budget_hint(spec, entry))
    model = _model(study, msg)
    settings = replace(settings, noise_multiplier=sigma)
    outcome = train_local(model, data.train.images, data.train.labels, settings, pick_device(), entry.history)
    epsilon = 0.0
    if study.dp:
        epsilon = ledger.record(data.fingerprint, entry, outcome.history, study.study_id, server_round,
                                known=(planned, after))
    log.info("[%s] round %d: %d images, %d steps, loss %.3f, epsilon %.2f (lifetime, at delta %g)", spec.site,
             server_round, n, outcome.steps, outcome.loss, epsilon, entry.delta)
    metrics = MetricRecord(train_metrics(n, epsilon, entry.delta if study.dp else 0.0))
    update = model.state_dict()
    if study.dp:  # charged in the ledger: keep what is sent, in case the server asks for this round again
        SentUpdates(spec.state_dir).save(StoredUpdate(study.study_id, server_round, incoming, data.fingerprint,
                                                      update, dict(metrics)))
    size, sha = update_digest(update)
    AuditLog(spec.state_dir).append("sent model update", site=spec.site, run_id=msg.metadata.run_id,
                                    study=study.study_id, round=server_round, bytes=size, sha256=sha,
                                    epsilon=epsilon, n_train=n, sigma=sigma, adjusted=list(terms.changes))
    status = {"site": spec.site, **({"adjusted": "; ".join(terms.changes)} if terms.changes else {})}
    content = RecordDict({"arrays": ArrayRecord(update), "metrics": metrics, "status": ConfigRecord(status)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Validation metrics of the sent model, as the policy's ``release`` level allows (client/release.py),
    once per study round and model (client/evaluations.py)."""
    try:
        study, spec, policy, data = _setup(msg, context)
    except FedradError as exc:
        return _refused(msg, context, exc)
    server_round = int(msg.content["config"].get("server-round", 0))
    try:
        if policy.release == "none":
            raise Declined("this hospital's policy releases no evaluation metrics")
        if policy.allow_studies and study.study_id not in policy.allow_studies:
            raise Declined(f"study '{study.study_id}' is not on this hospital's allow-list")
        entry = PrivacyLedger(spec.state_dir).entry(data.fingerprint)
        answers = EvaluationLog(spec.state_dir)
        _, digest = update_digest(msg.content["arrays"].to_torch_state_dict())
        metrics = answers.answered(study.study_id, server_round, digest)
        if metrics is None and answers.count(study.study_id) >= policy.max_evaluations:
            raise Declined(f"study {study.study_id} has had its {policy.max_evaluations} evaluations "
                           "(the hospital's policy)")
        if metrics is None and answers.count() >= policy.max_evaluations_total:
            raise Declined(f"this site has answered its {policy.max_evaluations_total} evaluations over all "
                           "studies (the hospital's policy)")
    except FedradError as exc:
        return _decline_round(msg, spec, study, server_round, str(exc))
    again = metrics is not None
    if metrics is None:
        model = _model(study, msg)
        scores = evaluate(model, data.val.images, data.val.labels, pick_device(), curves=len(study.classes) == 2,
                          intervals=True, ordinal=study.ordinal)
        epsilon = float(entry.rounds[-1]["epsilon"]) if entry.rounds else 0.0
        metrics = evaluation_metrics(scores, policy.release, len(data.val), int(np.sum(data.val.labels == 1)),
                                     epsilon, entry.delta if entry.rounds else 0.0, images=data.val.images,
                                     training=data.train.acquisition)
        answers.store(study.study_id, server_round, digest, metrics)
    sent = json.dumps(metrics, sort_keys=True).encode()
    AuditLog(spec.state_dir).append("sent evaluation metrics" + (" again (stored answer)" if again else ""),
                                    site=spec.site, run_id=msg.metadata.run_id, study=study.study_id,
                                    round=server_round, bytes=len(sent), sha256=hashlib.sha256(sent).hexdigest(),
                                    keys=sorted(metrics), model_sha256=digest)
    content = RecordDict({"metrics": MetricRecord(metrics), "status": ConfigRecord({"site": spec.site})})
    return Message(content, reply_to=msg)
