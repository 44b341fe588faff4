"""FedAvg in one process without Flower: the same sites, splits, DP step and averaging.

Shared by the benchmarks (not a package: opacus installs a top-level ``benchmarks``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.privacy import epsilon_of  # noqa: E402
from client.site import SiteData, load_site_data, resolve_site  # noqa: E402
from client.training import TrainSettings, evaluate, study_noise, train_local  # noqa: E402
from common.config import NodeConfig, StudyConfig  # noqa: E402
from common.metrics import weighted_average  # noqa: E402
from common.models import build_model, fixed_features, pick_device, split_frontend  # noqa: E402


def load_sites(study: StudyConfig, num_sites: int, features: bool = False) -> list[SiteData]:
    """Each virtual site's train and validation split, as the client reads them; with ``features``, also the
    model's fixed front-end features of both (into the on-disk cache that later processes read)."""
    sites = [load_site_data(resolve_site(study, NodeConfig(partition_id=i, num_partitions=num_sites)), study)
             for i in range(num_sites)]
    frontend = split_frontend(build_model(study.model, study.channels, len(study.classes)))[0] if features else None
    if frontend is not None:
        for site in sites:
            for split in (site.train, site.val):
                fixed_features(frontend, split.images, pick_device())
    return sites


def fedavg(study: StudyConfig, num_sites: int) -> dict:
    """Run the study's rounds in this process; return wall time, each round's, final aggregate AUC and epsilons."""
    start = time.perf_counter()
    sites = load_sites(study, num_sites)
    torch.manual_seed(study.seed)
    global_model = build_model(study.model, study.channels, len(study.classes))
    device = pick_device()
    histories: list[list] = [[] for _ in sites]
    sigmas = [study_noise(study, len(site.train)) for site in sites]
    rows: list[dict] = []
    round_auc: list[float] = []
    round_s: list[float] = []
    for server_round in range(1, study.num_rounds + 1):
        t0 = time.perf_counter()
        states, weights = [], []
        for i, site in enumerate(sites):
            model = build_model(study.model, study.channels, len(study.classes))
            model.load_state_dict(global_model.state_dict())
            settings = TrainSettings.from_study(study, sigmas[i], study.seed + 1000 * server_round + i)
            histories[i] = train_local(model, site.train.images, site.train.labels, settings, device,
                                       histories[i]).history
            states.append(model.state_dict())
            weights.append(len(site.train))
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        global_model.load_state_dict({k: sum(wi * s[k] for wi, s in zip(w, states)) for k in states[0]})
        rows = [{**evaluate(global_model, s.val.images, s.val.labels, device), "n": len(s.val)} for s in sites]
        round_auc.append(weighted_average(rows, "n", ["auc"])["auc"])
        round_s.append(time.perf_counter() - t0)
    return {"wall_s": time.perf_counter() - start, "auc": round_auc[-1], "round_auc": round_auc, "round_s": round_s,
            "site_auc": [r["auc"] for r in rows],
            "epsilon": [epsilon_of(h, study.delta) for h in histories]}
