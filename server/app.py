"""The ServerApp: orchestrates the rounds of a study and keeps its run directory.

Each round: sampled sites train on their own data and reply with weights (with
``secure-aggregation`` masked: the server learns only their weighted mean, server/secagg.py);
the strategy aggregates; every site then evaluates the new global model on its
own validation split. Each of the two phases waits at most ``round-timeout``
seconds and closes with the replies it has (a site that went down is recorded
as not answering); with fewer usable updates than ``min-nodes`` the global
model is left unchanged for that round. After each round one line of metrics
is appended to metrics.jsonl and the global weights and strategy state are
checkpointed (so ``resume`` continues at the next round, once
``RunDirectory.resume_point`` has checked that the run directory holds this
study, unfinished). A study asked to stop (:class:`StudyStop`: a simulation's
Ctrl-C or SIGTERM) ends between its steps, leaving the run directory at its
last checkpoint.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from common.acquisition import pooled_acquisition
from common.config import StudyConfig
from common.inputprofile import pooled_profile
from common.metrics import (
    CI_METRICS,
    METRIC_NAMES,
    calibration_summary,
    combined_interval,
    operating_point,
    pooled_roc,
    weighted_average,
)
from common.modelfile import model_payload
from common.models import build_model
from common.multiclass import CLASS_AUC, aggregate_sites, progress_text, site_fields
from server.rundir import RunDirectory
from server.secagg import secure_train
from server.strategy import RoundRecord, SiteTracking, build_strategy
from server.tensorboard import TensorboardLog

SITE_METRICS = METRIC_NAMES


def round_row(server_round: int, record: RoundRecord, privacy: dict[str, dict[str, float]],
              decision: bool = True) -> dict[str, Any]:
    """The metrics.jsonl object of one round: per-site rows and their weighted aggregate.

    With ``decision`` (one model for all sites) the aggregate also carries the model's operating
    point: the threshold the sites' pooled validation ROC curves favour (common/metrics.py)."""
    sites = []
    for site in sorted(set(record.train) | set(record.evaluate) | set(record.declined)):
        ev, tr = record.evaluate.get(site, {}), record.train.get(site, {})
        priv = privacy.get(site, {})
        row: dict[str, Any] = {
            "site": site,
            "n_train": int(ev.get("n-train", tr.get("num-examples", 0))),
            "n_val": int(ev.get("num-examples", 0)),
            **{k: ev.get(k, math.nan) for k in SITE_METRICS},
            "epsilon": priv.get("epsilon", 0.0),
            "delta": priv.get("delta", 0.0),
            "trained": site in record.train,
        }
        if site in record.declined:
            row["declined"] = record.declined[site]
        if site in record.adjusted:
            row["adjusted"] = record.adjusted[site]  # what the site's policy made stricter than the study asked
        for key in ("n-pos-train", "n-pos-val"):
            if key in ev:
                row[key.replace("-", "_")] = int(ev[key])
        intervals = {k[: -len("-ci95")]: v for k, v in ev.items() if k.endswith("-ci95")}
        if intervals:
            row["ci95"] = intervals
        curves = {k.replace("-", "_"): v for k, v in ev.items()
                  if isinstance(v, list) and not k.endswith("-ci95") and not k.startswith("input-") and k != CLASS_AUC}
        if curves:
            row["curves"] = curves
        row.update(site_fields(ev))  # macro AUC, kappa, per-class AUC where the study has them (common/multiclass.py)
        sites.append(row)
    evaluated = [s for s in sites if s["n_val"] > 0]
    aggregate = weighted_average(evaluated, "n_val", SITE_METRICS)
    # Privacy and training counts are the study's: a site that declined (a spent budget) trained no images
    # of this round, and what it spent on other studies is not this model's (``privacy``: _update_privacy).
    aggregate.update(weighted_average([s for s in evaluated if s["site"] in privacy], "n_val", ("epsilon", "delta")))
    aggregate["n_train"] = sum(s["n_train"] for s in sites if s["trained"])
    aggregate["n_val"] = sum(s["n_val"] for s in evaluated)
    aggregate["max_epsilon"] = max((p["epsilon"] for p in privacy.values()), default=0.0)
    aggregate["sites_trained"] = sum(1 for s in sites if s["trained"])
    if not record.updated:
        aggregate["model_updated"] = False  # fewer usable updates than min-nodes
    intervals = {m: combined_interval(evaluated, "n_val", m) for m in CI_METRICS}
    if any(intervals.values()):
        aggregate["ci95"] = {m: list(v) for m, v in intervals.items() if v}
    aggregate_sites(evaluated, aggregate)
    point = operating_point(evaluated) if decision else None
    if point:
        aggregate["operating_point"] = point
    roc, calibration = (pooled_roc(evaluated), calibration_summary(evaluated)) if decision else (None, None)
    if roc:
        aggregate["roc"] = roc  # the sites' curves pooled (common/metrics.py), what the report draws
    if calibration:
        aggregate["calibration"] = calibration
    return {"round": server_round, "sites": sites, "aggregate": aggregate}


def released_inputs(replies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What model.pt records of the images a study saw, from the sites' evaluation replies (by site), where they
    released it (level ``full``): ``input_profile``, their validation images' feature statistics
    (common/inputprofile.py), and ``acquisition``, the DICOM modalities and photometric interpretations of their
    training images (common/acquisition.py). ``fedrad predict`` warns against both."""
    profile, acquisition = pooled_profile(replies), pooled_acquisition(replies)
    return {**({"input_profile": profile} if profile else {}), **({"acquisition": acquisition} if acquisition else {})}


def _update_privacy(privacy: dict[str, dict[str, float]], record: RoundRecord) -> None:
    """Each site's privacy spend, for the sites that have trained in this study: a site's epsilon only ever
    grows; take the newest report (evaluate comes after train). A site that has only evaluated (it declined
    every round so far, e.g. its lifetime budget was spent on earlier studies) reports its ledger's epsilon
    from those studies: not this model's, so it is left out."""
    for replies in (record.train, record.evaluate):
        for site, metrics in replies.items():
            if "epsilon" in metrics and (site in record.train or site in privacy):
                privacy[site] = {"epsilon": metrics["epsilon"], "delta": metrics.get("delta", 0.0)}


class StudyStop:
    """A request that a running study stop (a simulation's Ctrl-C or SIGTERM), and word that it has.

    The server looks at ``asked`` before each round and while it waits for replies; a round cut short is
    not recorded, so the run directory is left at the last round it checkpointed. ``running`` is set when
    the ServerApp starts, ``ended`` when it has returned, whatever the reason.
    """

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.running = threading.Event()
        self.ended = threading.Event()


class StudyStopped(Exception):
    """Raised in the server when its :class:`StudyStop` was asked for."""


def _check(stop: StudyStop | None) -> None:
    if stop is not None and stop.asked.is_set():
        raise StudyStopped


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float, stop: StudyStop) -> list[Message]:
    """Grid.send_and_receive, but a StudyStopped as soon as ``stop`` is asked for."""
    waiting = set(grid.push_messages(messages))
    end, pause = time.time() + timeout, getattr(grid, "pull_interval", 0.1)
    replies: list[Message] = []
    while waiting and time.time() < end:
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting -= {msg.metadata.reply_to_message_id for msg in got}
        if waiting and stop.asked.wait(pause):
            raise StudyStopped
    return replies


def exchange(grid: Grid, strategy: SiteTracking, messages: Iterable[Message], timeout: float,
             stop: StudyStop | None = None) -> list[Message]:
    """Send one phase's messages and wait at most ``timeout`` seconds; return the replies that came.

    A site that went down does not hold the study up: the phase closes with the replies it has
    (Grid.send_and_receive stops waiting at the timeout). The instructions live only as long as
    the phase, so a hospital that comes back later does not start work for a round already closed.
    With ``stop``, the wait also ends (StudyStopped) when the study is asked to stop.
    """
    messages = list(messages)
    for msg in messages:
        msg.metadata.ttl = timeout
    if stop is None:
        replies = list(grid.send_and_receive(messages, timeout=timeout))
    else:
        replies = _send_and_receive(grid, messages, timeout, stop)
    strategy.expect(messages)  # message ids are set when the grid pushes them
    return replies


def _start(study: StudyConfig, run_dir: RunDirectory) -> tuple[int, dict[str, Any] | None]:
    """The first round to run and the checkpoint to continue from (a resume, checked and announced)."""
    if not study.resume:
        run_dir.write_config(study.to_flat())
        return 1, None
    point = run_dir.resume_point(study)  # a ResumeError, before anything is written, if it cannot be resumed
    for note in point.notes:
        print(note, flush=True)
    if run_dir.digest is None:  # an older fedrad's run dir: its config.json gets the digest from now on
        run_dir.write_config(study.to_flat())
    if point.checkpoint is not None:
        print(f"resuming {run_dir.path} at round {point.next_round}/{study.num_rounds}", flush=True)
    return point.next_round, point.checkpoint


def run_study(grid: Grid, study: StudyConfig, run_dir: RunDirectory, stop: StudyStop | None = None) -> dict[str, Any]:
    """Run (or resume) the study's rounds; return the final model payload. With ``stop``, a StudyStopped
    between steps once it is asked for (no round is recorded in part)."""
    _check(stop)
    strategy: SiteTracking = build_strategy(study)
    torch.manual_seed(study.seed)
    model = build_model(study.model, study.channels, len(study.classes))
    arrays = ArrayRecord(model.state_dict())
    privacy: dict[str, dict[str, float]] = {}
    start, checkpoint = _start(study, run_dir)
    if checkpoint is not None:
        arrays = ArrayRecord(checkpoint["arrays"])
        strategy.load_state_dict(checkpoint["strategy"])
        privacy = checkpoint["privacy"]
    board = TensorboardLog(study.tensorboard) if study.tensorboard else None
    try:
        for server_round in range(start, study.num_rounds + 1):
            _check(stop)
            arrays = _round(grid, study, run_dir, strategy, arrays, privacy, server_round, board, stop)
    finally:
        if board:
            board.close()
    rounds = run_dir.rounds()
    final = rounds[-1]["aggregate"] if rounds else {}
    payload = model_payload(study, arrays.to_torch_state_dict(), privacy, final,
                            **released_inputs(strategy.current.evaluate))  # the last round's replies
    run_dir.save_model(payload)
    return payload


# A phase of a round (train, evaluate) that takes longer than this gets a line of its own, so a long first
# round (decoding, the fixed front-end's features) or a slow site is not silence.
PHASE_LINE_S = 5.0


def _phase_line(server_round: int, phase: str, seconds: float, answered: int, sent: int) -> None:
    if seconds >= PHASE_LINE_S:
        print(f"  round {server_round} {phase}: {answered}/{sent} sites answered in {seconds:.1f} s", flush=True)


def _train(grid: Grid, study: StudyConfig, strategy: SiteTracking, messages: list[Message], arrays: ArrayRecord,
           server_round: int, stop: StudyStop | None) -> ArrayRecord | None:
    """The train phase: send, wait, aggregate; the new global arrays, or None (the model stays as it was).
    With ``secure-aggregation`` the phase is SecAgg+'s four stages, each an ``exchange`` (server/secagg.py)."""
    if study.secure_aggregation:
        return secure_train(grid, study, strategy, messages, arrays, server_round,
                            lambda stage: exchange(grid, strategy, stage, study.round_timeout, stop))
    replies = exchange(grid, strategy, messages, study.round_timeout, stop)
    new_arrays, _ = strategy.aggregate_train(server_round, replies)
    strategy.note_missing(replies, "train", study.round_timeout)
    return new_arrays


def _round(grid: Grid, study: StudyConfig, run_dir: RunDirectory, strategy: SiteTracking, arrays: ArrayRecord,
           privacy: dict[str, dict[str, float]], server_round: int, board: TensorboardLog | None,
           stop: StudyStop | None) -> ArrayRecord:
    """One round: train, aggregate, evaluate, then its metrics row and checkpoint; the new global arrays."""
    t0 = time.time()
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(study.to_flat()), grid))
    new_arrays = _train(grid, study, strategy, messages, arrays, server_round, stop)
    _phase_line(server_round, "train", time.time() - t0, len(strategy.current.train), len(messages))
    if new_arrays is not None:
        arrays = new_arrays
    _check(stop)
    t1 = time.time()
    messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(study.to_flat()), grid)
    replies = exchange(grid, strategy, messages, study.round_timeout, stop)
    strategy.aggregate_evaluate(server_round, replies)
    strategy.note_missing(replies, "evaluate", study.round_timeout)
    _phase_line(server_round, "evaluate", time.time() - t1, len(strategy.current.evaluate), len(messages))
    _update_privacy(privacy, strategy.current)
    row = round_row(server_round, strategy.current, privacy)
    row["seconds"] = round(time.time() - t0, 3)  # the round's wall time at the server: train, evaluate, aggregate
    run_dir.append_round(row)  # the row first: see server/rundir.py
    run_dir.save_checkpoint(
        server_round,
        {"arrays": arrays.to_torch_state_dict(), "strategy": strategy.state_dict(), "privacy": privacy},
    )
    if board:
        board.add_round(row)
    agg = row["aggregate"]
    print(
        f"round {server_round}/{study.num_rounds} | {row['seconds']:6.1f} s | val AUC {agg['auc']:.3f} "
        f"{progress_text(agg)}| max site epsilon {agg['max_epsilon']:.2f} | sites trained "
        f"{agg['sites_trained']}/{len(row['sites'])}",
        flush=True,
    )
    return arrays


def study_from_context(context: Context) -> tuple[StudyConfig, RunDirectory]:
    """Parse the run config once; fill in a run dir and a study id when not given. A resumed study keeps
    the id saved in its run dir; ``run_study`` checks that its settings are the saved ones (``fedrad server run
    --resume`` and ``fedrad simulate --resume`` submit them) and that it can continue there."""
    study = StudyConfig.from_flat(context.run_config)
    out = Path(study.out) if study.out else Path.cwd() / "runs" / time.strftime("study-%Y%m%d-%H%M%S")
    run_dir = RunDirectory(out)
    if study.resume:
        study = study.replace(study_id=study.study_id or run_dir.saved_study().study_id)
    study = study.replace(out=str(run_dir.path), study_id=study.study_id or uuid.uuid4().hex[:12])
    return study, run_dir


# How often the server looks for replies on Flower's in-memory grid (a simulation), where a look is a
# lock and a dict lookup. At Flower's default, 0.1 s, the server found each phase's last reply
# 0.004-0.099 s after it came (0.065 s on average over 17 phases, two a round, on the inline backend),
# at 0.01 s 0.002-0.009 s later.
IN_MEMORY_POLL_S = 0.01


def make_server_app(overrides: dict[str, Any] | None = None, stop: StudyStop | None = None) -> ServerApp:
    """A ServerApp; ``overrides`` (used by ``fedrad simulate``) take precedence over the run config.
    With ``stop`` the study ends, quietly, between its steps once it is asked to."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if stop is not None:
            stop.running.set()
        try:
            if overrides:
                context.run_config = {**context.run_config, **overrides}
            study, run_dir = study_from_context(context)
            if isinstance(grid, InMemoryGrid):  # a simulation: see IN_MEMORY_POLL_S
                grid.pull_interval = IN_MEMORY_POLL_S
            secure = "secure aggregation (SecAgg+)" if study.secure_aggregation else "no secure aggregation"
            privacy = f"DP at epsilon {study.epsilon:g} (each hospital's policy may cap it)" if study.dp else "no DP"
            print(f"study {study.study_id}: {study.strategy}, {study.num_rounds} rounds, {secure}, {privacy}, "
                  f"rounds wait for {study.min_nodes} site(s) and at most {study.round_timeout:g} s a phase, "
                  f"run dir {run_dir.path}", flush=True)
            run_study(grid, study, run_dir, stop)
            print(f"final model: {run_dir.model_path}", flush=True)
        except StudyStopped:
            pass
        finally:
            if stop is not None:
                stop.ended.set()

    return server_app


app = make_server_app()
