"""Which hospital this node is and which of its images it trains and validates on.

A real node is told by its operator (node config ``data``, ``site``,
``state-dir``). A virtual node in Flower's simulation only knows its
``partition-id``: it takes the study's simulation data source and cuts out its
own share deterministically, so no data ever moves between virtual sites.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from client.policy import HospitalPolicy, site_policy
from client.split import HospitalSplit
from common.config import ConfigError, NodeConfig, SiteSpec, StudyConfig
from common.data import ImageSet, load_images, site_folders
from common.partition import partition_sites, train_val_split


def resolve_site(study: StudyConfig, node: NodeConfig) -> SiteSpec:
    if not node.simulated:
        if not node.data:
            raise ConfigError("node config needs 'data' (the folder or .npz with this hospital's images)")
        data = Path(node.data).expanduser()
        site = node.site or data.stem
        state = Path(node.state_dir).expanduser() if node.state_dir else Path.home() / ".fedrad" / "state" / site
        return SiteSpec(site, data, state, node.max_epsilon, policy=node.policy)
    if not study.data:
        raise ConfigError("simulation needs the study's 'data' path")
    pid = node.partition_id
    folders = site_folders(study.data)
    if folders:
        if pid >= len(folders):
            raise ConfigError(f"{study.data} has {len(folders)} site folders, node {pid} has none")
        site, data, indices = folders[pid].name, folders[pid], None
    else:
        site, data = f"site-{pid + 1}", Path(study.data)
        full = load_images(data, study.image_size, study.channels, study.classes)
        parts = partition_sites(full.labels, node.num_partitions, study.partition, study.seed)
        indices = tuple(parts[pid].tolist())
    root = Path(study.out) if study.out else Path.cwd()
    state = Path(node.state_dir) if node.state_dir else root / "sites" / site / "state"
    return SiteSpec(site, data, state, node.max_epsilon, indices, simulated=True)


@dataclass
class SiteData:
    train: ImageSet
    val: ImageSet
    fingerprint: str  # the privacy ledger's key: identity of the training records


def load_site_data(spec: SiteSpec, study: StudyConfig, policy: HospitalPolicy | None = None) -> SiteData:
    """Read the site's images once per process (as the study preprocesses them) and split them by patient.

    A real node splits with the hospital's own, persistent split at its policy's fraction (client/split.py):
    the study's seed and val-fraction choose nothing. A virtual hospital splits by the study's seed and
    val-fraction (``train_val_split``), the researcher's choice, as the local and pooled baselines do.
    """
    if spec.simulated:
        fraction, seed = study.val_fraction, study.seed
    else:
        fraction, seed = (policy or site_policy(spec, study)).val_fraction, None
    return _load_site_data(spec, study.image_size, study.channels, tuple(study.classes), fraction, seed,
                           study.multiframe)


@lru_cache(maxsize=8)
def _load_site_data(spec: SiteSpec, image_size: int, channels: int, class_names: tuple[str, ...],
                    val_fraction: float, seed: int | None, multiframe: str) -> SiteData:
    data = load_images(spec.data, image_size, channels, list(class_names), multiframe)
    if spec.indices is not None:
        data = data.subset(np.asarray(spec.indices))
    if seed is None:
        train_idx, val_idx = HospitalSplit(spec.state_dir).split(data.labels, data.groups, val_fraction)
    else:
        train_idx, val_idx = train_val_split(data.labels, data.groups, val_fraction, seed)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ConfigError(f"site {spec.site}: {len(data)} images are too few for a train/validation split")
    train = data.subset(train_idx)
    return SiteData(train, data.subset(val_idx), train.fingerprint())
