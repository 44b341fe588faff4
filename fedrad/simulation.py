"""A whole federation on one machine through Flower's simulation engine (Ray).

The same ServerApp and ClientApp as a real deployment run here; each virtual
hospital is a Ray actor that reads only its own share of the data.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.config import ConfigError, StudyConfig
from common.data import load_images, site_folders
from common.errors import DataError
from server.rundir import RunDirectory


def count_sites(study: StudyConfig, requested: int) -> int:
    """Check the data once, before Ray starts, and return how many sites it gives."""
    folders = site_folders(study.data)
    if folders:
        for folder in folders:
            load_images(folder, study.image_size, study.channels, study.classes)
        return len(folders)
    if not Path(study.data).exists():
        raise DataError(f"data path not found: {study.data}")
    data = load_images(study.data, study.image_size, study.channels, study.classes)
    from common.partition import partition_sites

    partition_sites(data.labels, requested, study.partition, study.seed)  # raises a ConfigError if impossible
    return requested


def _backend_config(num_sites: int) -> dict:
    """Ray resources: every virtual hospital gets an actor of its own, each running torch on its CPU share.

    With fewer cores than sites, sites share cores (fractional CPUs) instead of queueing for them:
    a round ends when the slowest site is done, and with two actors for four unequal sites one actor
    trained two large sites back to back while the other sat idle. Sharing lets the OS balance the
    work (one torch thread per site, so nothing is oversubscribed twice).
    """
    import torch

    cpus = os.cpu_count() or 1
    per_site = cpus / num_sites if cpus < num_sites else max(1, cpus // num_sites)
    gpus = (torch.cuda.device_count() / num_sites) if torch.cuda.is_available() else 0.0
    # Virtual hospitals inherit this: each uses exactly its CPU share (at least one thread).
    os.environ["FEDRAD_THREADS"] = str(max(1, int(per_site)))
    return {
        "client_resources": {"num_cpus": per_site, "num_gpus": gpus},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "ERROR"},
    }


def run(study: StudyConfig, num_sites: int, verbose: bool = False) -> RunDirectory:
    """Run the study with ``num_sites`` virtual hospitals; return its run directory."""
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import make_server_app

    if num_sites < study.min_nodes:
        raise ConfigError(f"{num_sites} sites are fewer than min-nodes {study.min_nodes}")
    # Flower's own INFO lines (and its run_simulation deprecation notice) only with --verbose:
    # the progress lines and the hospitals' warnings are what a researcher reads.
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FEDRAD_LOG_LEVEL", "INFO" if verbose else "WARNING")
    # Ray's actor processes inherit this: without it each actor says "Manually terminating" at the end.
    os.environ.setdefault("FLWR_LOG_LEVEL", "INFO" if verbose else "ERROR")
    run_simulation(
        server_app=make_server_app(study.to_flat()),
        client_app=client_app,
        num_supernodes=num_sites,
        backend_config=_backend_config(num_sites),
        verbose_logging=verbose,
    )
    return RunDirectory(study.out)
