"""Deterministic splits: data into simulated sites, and a site into train/validation.

All functions take an explicit seed and never touch global random state.
"""

from __future__ import annotations

import numpy as np

from common.config import ConfigError

# A site's validation metrics (AUC, accuracy, the operating point) from fewer images than this are noise:
# one image moves its accuracy by 20 points or more. check_site_split refuses such a study.
MIN_VAL_IMAGES = 5


def parse_partition(spec: str) -> tuple[str, float]:
    """'iid' -> ('iid', 0); 'dirichlet:0.5' -> ('dirichlet', 0.5)."""
    kind, _, arg = spec.partition(":")
    if kind == "iid" and not arg:
        return "iid", 0.0
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = -1.0
        if alpha > 0:
            return "dirichlet", alpha
    raise ConfigError(f"partition '{spec}': use 'iid' or 'dirichlet:ALPHA' with ALPHA > 0", "partition")


def partition_sites(labels: np.ndarray, num_sites: int, spec: str, seed: int, min_size: int = 10) -> list[np.ndarray]:
    """Split row indices among ``num_sites`` sites.

    iid: a seeded shuffle cut into near-equal parts.
    dirichlet:ALPHA: for each class, site shares ~ Dir(ALPHA) (Hsu et al. 2019);
    small ALPHA gives sites dominated by one class. Draws are repeated (same seed
    stream) until every site has at least ``min_size`` rows.
    """
    kind, alpha = parse_partition(spec)
    n = len(labels)
    if num_sites < 1:
        raise ConfigError(f"num-sites must be at least 1 (got {num_sites})", "num-sites")
    if n < num_sites * min_size:
        raise ConfigError(f"{n} images are too few for {num_sites} sites (need {min_size} each)")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_sites)]
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(f"dirichlet:{alpha} could not give every site {min_size} images; raise ALPHA")


def train_val_split(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, patient-grouped split: (train indices, val indices).

    Patients (groups) are assigned whole. Each patient is stratified by its
    majority label; within a stratum patients are shuffled with ``seed`` and
    taken into validation until the stratum's image quota is met.
    """
    uniq, inverse = np.unique(groups, return_inverse=True)
    group_label = np.array([np.bincount(labels[inverse == g]).argmax() for g in range(len(uniq))])
    group_size = np.bincount(inverse, minlength=len(uniq))
    rng = np.random.default_rng(seed)
    val_groups: list[int] = []
    for cls in np.unique(group_label):
        members = rng.permutation(np.flatnonzero(group_label == cls))
        quota = val_fraction * group_size[members].sum()
        taken = 0
        for g in members:
            if taken >= quota or taken + group_size[g] > quota * 1.5 + 1:
                continue
            val_groups.append(int(g))
            taken += group_size[g]
    in_val = np.isin(inverse, val_groups)
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)


def check_site_split(site: str, labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int) -> None:
    """ConfigError unless ``site``'s validation split (train_val_split, as the site makes it) holds at least
    MIN_VAL_IMAGES images."""
    n_val = len(train_val_split(labels, groups, val_fraction, seed)[1])
    if n_val < MIN_VAL_IMAGES:
        raise ConfigError(f"{site} would validate on {n_val} of its {len(labels)} images; measuring a site takes "
                          f"at least {MIN_VAL_IMAGES} validation images")
