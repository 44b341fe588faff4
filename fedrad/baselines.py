"""The baselines a consortium compares federated learning with (``fedrad simulate --mode``).

- ``local``: each site trains alone, with the same model, rounds, local epochs and
  privacy budget as in the federation; every local model is then evaluated on
  every site's validation split (who would a site's own model serve?).
- ``pooled``: one model trained on all sites' training splits together, the
  non-federated reference, evaluated on each site's validation split.

Same sites, splits, DP step, ledger and run-directory format as the federated
study (they run in one process: there is nothing to federate).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from client.policy import site_policy
from client.privacy import PrivacyLedger, epsilon_of
from client.release import evaluation_metrics
from client.site import SiteData, load_site_data, resolve_site
from client.training import TrainSettings, evaluate, study_noise, train_local
from common.config import NodeConfig, SiteSpec, StudyConfig
from common.data import ImageSet
from common.metrics import METRIC_NAMES
from common.modelfile import model_payload
from common.models import build_model, pick_device
from server.app import released_inputs, round_row
from server.rundir import RunDirectory, json_safe
from server.strategy import RoundRecord
from server.tensorboard import TensorboardLog

MODES = ("federated", "local", "pooled")


@dataclass
class Trainee:
    """One model being trained on one training set, with its own privacy ledger."""

    name: str
    train: ImageSet
    ledger: PrivacyLedger
    sigma: float
    history: list
    model: torch.nn.Module

    def step(self, study: StudyConfig, server_round: int, device: torch.device) -> float:
        settings = TrainSettings.from_study(study, self.sigma, study.seed + 1000 * server_round)
        entry = self.ledger.entry(self.train.fingerprint(), self.name, study.delta, self.train.keys)
        outcome = train_local(self.model, self.train.images, self.train.labels, settings, device, entry.history)
        self.history = outcome.history
        if not study.dp:
            return 0.0
        return self.ledger.record(self.train.fingerprint(), entry, outcome.history, study.study_id, server_round)


def _trainee(study: StudyConfig, name: str, train: ImageSet, state_dir: Any) -> Trainee:
    sigma = study_noise(study, len(train))
    torch.manual_seed(study.seed)  # the same initial weights as the federated global model
    model = build_model(study.model, study.channels, len(study.classes))
    return Trainee(name, train, PrivacyLedger(state_dir), sigma, [], model)


def _eval_row(model: torch.nn.Module, site: SiteData, device: torch.device, ordinal: bool) -> dict[str, Any]:
    """What a site's evaluate reply carries in a federated study, computed here."""
    scores = evaluate(model, site.val.images, site.val.labels, device, curves=True, intervals=True, ordinal=ordinal)
    return {"num-examples": len(site.val), "n-train": len(site.train), **scores,
            "n-pos-train": float(np.sum(site.train.labels == 1)), "n-pos-val": float(np.sum(site.val.labels == 1))}


def _released(spec: SiteSpec, site: SiteData, study: StudyConfig) -> dict[str, Any]:
    """What of its images a site's evaluate reply would release in a federated study (client/release.py, at its
    policy's level: a virtual hospital's is ``full``): the input profile of its validation images and the kinds
    of its training images, which model.pt records (server/app.py ``released_inputs``)."""
    return evaluation_metrics({}, site_policy(spec, study).release, len(site.val), 0, 0.0, 0.0,
                              images=site.val.images, training=site.train.acquisition)


def write_cross_site(run_dir: RunDirectory, mode: str, table: dict[str, dict[str, dict[str, float]]]) -> None:
    """cross_site.json: metrics of each model (rows) on each site's validation split (columns)."""
    models = list(table)
    sites = sorted({s for row in table.values() for s in row})
    payload = {"mode": mode, "models": models, "sites": sites,
               "metrics": {k: [[table[m].get(s, {}).get(k) for s in sites] for m in models] for k in METRIC_NAMES}}
    (run_dir.path / "cross_site.json").write_text(json.dumps(json_safe(payload), indent=1) + "\n")


def run_baseline(study: StudyConfig, num_sites: int, mode: str) -> RunDirectory:
    torch.set_num_threads(os.cpu_count() or 1)
    device = pick_device()
    run_dir = RunDirectory(study.out)
    study = study.replace(study_id=study.study_id or uuid.uuid4().hex[:12])
    run_dir.write_config(study.to_flat())
    specs = [resolve_site(study, NodeConfig(partition_id=i, num_partitions=num_sites)) for i in range(num_sites)]
    sites = {spec.site: load_site_data(spec, study) for spec in specs}
    if mode == "local":
        trainees = [_trainee(study, spec.site, sites[spec.site].train, spec.state_dir) for spec in specs]
    else:
        pooled = [sites[s].train for s in sites]
        union = ImageSet(np.concatenate([p.images for p in pooled]), np.concatenate([p.labels for p in pooled]),
                         np.concatenate([p.groups for p in pooled]), [k for p in pooled for k in p.keys],
                         acquisition=[a for p in pooled for a in p.acquisition])
        trainees = [_trainee(study, "pooled", union, run_dir.path / "sites" / "pooled" / "state")]
    privacy: dict[str, dict[str, float]] = {}
    board = TensorboardLog(study.tensorboard) if study.tensorboard else None
    for server_round in range(1, study.num_rounds + 1):
        t0 = time.time()
        record = RoundRecord()
        for trainee in trainees:
            epsilon = trainee.step(study, server_round, device)
            owners = [trainee.name] if mode == "local" else list(sites)
            for site in owners:
                privacy[site] = {"epsilon": epsilon, "delta": study.delta if study.dp else 0.0}
                record.train[site] = {"num-examples": len(sites[site].train), "epsilon": epsilon}
                record.evaluate[site] = {**_eval_row(trainee.model, sites[site], device, study.ordinal),
                                         **privacy[site]}
        row = round_row(server_round, record, privacy, decision=mode == "pooled")  # local: one model per site
        run_dir.append_round(row)
        if board:
            board.add_round(row)
        agg = row["aggregate"]
        print(f"round {server_round}/{study.num_rounds} | {time.time() - t0:6.1f} s | val AUC {agg['auc']:.3f} "
              f"| max site epsilon {agg['max_epsilon']:.2f} | {mode}", flush=True)
    if board:
        board.close()
    table = {t.name: {s: _eval_row(t.model, sites[s], device, study.ordinal) for s in sites} for t in trainees}
    write_cross_site(run_dir, mode, table)
    final = run_dir.rounds()[-1]["aggregate"]
    released = {spec.site: _released(spec, sites[spec.site], study) for spec in specs}
    for trainee in trainees:
        spent = {"epsilon": epsilon_of(trainee.history, study.delta) if study.dp else 0.0, "delta": study.delta}
        seen = {trainee.name: released[trainee.name]} if mode == "local" else released  # the images it saw
        payload = model_payload(study, trainee.model.state_dict(), {trainee.name: spent}, final, mode=mode,
                                **released_inputs(seen))
        if mode == "pooled":
            run_dir.save_model(payload)
        else:  # one model per site: models/<site>.pt
            path = run_dir.path / "models" / f"{trainee.name}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(payload, path)
    return run_dir
