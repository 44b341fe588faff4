"""The ServerApp: orchestrates the rounds of a study and keeps its run directory.

Each round: sampled sites train on their own data and reply with weights;
the strategy aggregates; every site then evaluates the new global model on its
own validation split. Each of the two phases waits at most ``round-timeout``
seconds and closes with the replies it has (a site that went down is recorded
as not answering); with fewer usable updates than ``min-nodes`` the global
model is left unchanged for that round. After each round the global weights
and strategy state are checkpointed (so ``resume`` continues at the next
round) and one line of metrics is appended to metrics.jsonl.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from common.config import ConfigError, StudyConfig
from common.metrics import CI_METRICS, METRIC_NAMES, combined_interval, operating_point, weighted_average
from common.modelfile import model_payload
from common.models import build_model
from server.rundir import RunDirectory
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
        for key in ("n-pos-train", "n-pos-val"):
            if key in ev:
                row[key.replace("-", "_")] = int(ev[key])
        intervals = {k[: -len("-ci95")]: v for k, v in ev.items() if k.endswith("-ci95")}
        if intervals:
            row["ci95"] = intervals
        curves = {k.replace("-", "_"): v for k, v in ev.items() if isinstance(v, list) and not k.endswith("-ci95")}
        if curves:
            row["curves"] = curves
        sites.append(row)
    evaluated = [s for s in sites if s["n_val"] > 0]
    aggregate = weighted_average(evaluated, "n_val", SITE_METRICS)
    aggregate.update(weighted_average(evaluated, "n_val", ("epsilon", "delta")))
    aggregate["n_train"] = sum(s["n_train"] for s in sites)
    aggregate["n_val"] = sum(s["n_val"] for s in evaluated)
    aggregate["max_epsilon"] = max((s["epsilon"] for s in sites), default=0.0)
    aggregate["sites_trained"] = sum(1 for s in sites if s["trained"])
    if not record.updated:
        aggregate["model_updated"] = False  # fewer usable updates than min-nodes
    intervals = {m: combined_interval(evaluated, "n_val", m) for m in CI_METRICS}
    if any(intervals.values()):
        aggregate["ci95"] = {m: list(v) for m, v in intervals.items() if v}
    point = operating_point(evaluated) if decision else None
    if point:
        aggregate["operating_point"] = point
    return {"round": server_round, "sites": sites, "aggregate": aggregate}


def _update_privacy(privacy: dict[str, dict[str, float]], record: RoundRecord) -> None:
    # A site's epsilon only ever grows; take the newest report (evaluate comes after train).
    for replies in (record.train, record.evaluate):
        for site, metrics in replies.items():
            if "epsilon" in metrics:
                privacy[site] = {"epsilon": metrics["epsilon"], "delta": metrics.get("delta", 0.0)}


def exchange(grid: Grid, strategy: SiteTracking, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Send one phase's messages and wait at most ``timeout`` seconds; return the replies that came.

    A site that went down does not hold the study up: the phase closes with the replies it has
    (Grid.send_and_receive stops waiting at the timeout). The instructions live only as long as
    the phase, so a hospital that comes back later does not start work for a round already closed.
    """
    messages = list(messages)
    for msg in messages:
        msg.metadata.ttl = timeout
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    strategy.expect(messages)  # message ids are set when the grid pushes them
    return replies


def run_study(grid: Grid, study: StudyConfig, run_dir: RunDirectory) -> dict[str, Any]:
    """Run (or resume) the study's rounds; return the final model payload."""
    strategy: SiteTracking = build_strategy(study)
    torch.manual_seed(study.seed)
    model = build_model(study.model, study.channels, len(study.classes))
    arrays = ArrayRecord(model.state_dict())
    privacy: dict[str, dict[str, float]] = {}
    start = 1
    checkpoint = run_dir.latest_checkpoint() if study.resume else None
    if checkpoint is not None:
        arrays = ArrayRecord(checkpoint["arrays"])
        strategy.load_state_dict(checkpoint["strategy"])
        privacy = checkpoint["privacy"]
        start = checkpoint["round"] + 1
        print(f"resuming {run_dir.path} at round {start}/{study.num_rounds}", flush=True)
    elif study.resume:
        print(f"no checkpoint in {run_dir.path}: starting at round 1", flush=True)
    run_dir.write_config(study.to_flat())
    board = TensorboardLog(study.tensorboard) if study.tensorboard else None
    for server_round in range(start, study.num_rounds + 1):
        t0 = time.time()
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(study.to_flat()), grid)
        replies = exchange(grid, strategy, messages, study.round_timeout)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        strategy.note_missing(replies, "train", study.round_timeout)
        if new_arrays is not None:
            arrays = new_arrays
        messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(study.to_flat()), grid)
        replies = exchange(grid, strategy, messages, study.round_timeout)
        strategy.aggregate_evaluate(server_round, replies)
        strategy.note_missing(replies, "evaluate", study.round_timeout)
        _update_privacy(privacy, strategy.current)
        row = round_row(server_round, strategy.current, privacy)
        row["seconds"] = round(time.time() - t0, 3)  # the round's wall time at the server: train, evaluate, aggregate
        run_dir.save_checkpoint(
            server_round,
            {"arrays": arrays.to_torch_state_dict(), "strategy": strategy.state_dict(), "privacy": privacy},
        )
        run_dir.append_round(row)
        if board:
            board.add_round(row)
        agg = row["aggregate"]
        print(
            f"round {server_round}/{study.num_rounds} | {row['seconds']:6.1f} s | val AUC {agg['auc']:.3f} "
            f"| max site epsilon {agg['max_epsilon']:.2f} | sites trained {agg['sites_trained']}/{len(row['sites'])}",
            flush=True,
        )
    if board:
        board.close()
    rounds = run_dir.rounds()
    final = rounds[-1]["aggregate"] if rounds else {}
    payload = model_payload(study, arrays.to_torch_state_dict(), privacy, final)
    run_dir.save_model(payload)
    return payload


def study_from_context(context: Context) -> tuple[StudyConfig, RunDirectory]:
    """Parse the run config once; fill in a run dir and a study id when not given."""
    study = StudyConfig.from_flat(context.run_config)
    out = Path(study.out) if study.out else Path.cwd() / "runs" / time.strftime("study-%Y%m%d-%H%M%S")
    run_dir = RunDirectory(out)
    if study.resume:
        if not run_dir.config_path.exists():
            raise ConfigError(f"cannot resume: {run_dir.config_path} not found")
        saved = StudyConfig.from_flat(run_dir.read_config())
        study = saved.replace(resume=True, out=str(run_dir.path))
    study = study.replace(out=str(run_dir.path), study_id=study.study_id or uuid.uuid4().hex[:12])
    return study, run_dir


# How often the server looks for replies on Flower's in-memory grid (a simulation), where a look is a
# lock and a dict lookup. At Flower's default, 0.1 s, the server found each phase's last reply
# 0.004-0.099 s after it came (0.065 s on average over 17 phases, two a round, on the inline backend),
# at 0.01 s 0.002-0.009 s later.
IN_MEMORY_POLL_S = 0.01


def make_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``overrides`` (used by ``fedrad simulate``) take precedence over the run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if overrides:
            context.run_config = {**context.run_config, **overrides}
        study, run_dir = study_from_context(context)
        if isinstance(grid, InMemoryGrid):  # a simulation: see IN_MEMORY_POLL_S
            grid.pull_interval = IN_MEMORY_POLL_S
        print(f"study {study.study_id}: {study.strategy}, {study.num_rounds} rounds, run dir {run_dir.path}",
              flush=True)
        run_study(grid, study, run_dir)
        print(f"final model: {run_dir.model_path}", flush=True)

    return server_app


app = make_server_app()
