import numpy as np
import pytest

from common.config import ConfigError
from common.partition import parse_partition, partition_sites, train_val_split


def test_iid_partition_covers_every_row_once():
    labels = np.arange(103) % 2
    parts = partition_sites(labels, 4, "iid", seed=3)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(103))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_is_deterministic_non_iid_and_respects_min_size():
    labels = np.repeat([0, 1], 500)
    a = partition_sites(labels, 4, "dirichlet:0.3", seed=7)
    b = partition_sites(labels, 4, "dirichlet:0.3", seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))
    assert min(map(len, a)) >= 10
    shares = [labels[p].mean() for p in a]
    assert max(shares) - min(shares) > 0.3  # label skew across sites


@pytest.mark.parametrize("spec", ["dirichlet", "dirichlet:0", "dirichlet:x", "random", "iid:2"])
def test_bad_partition_spec_is_a_config_error(spec):
    with pytest.raises(ConfigError):
        parse_partition(spec)


def test_too_few_images_for_sites():
    with pytest.raises(ConfigError, match="too few"):
        partition_sites(np.zeros(15, int), 3, "iid", 0)


def test_split_keeps_patients_together_and_is_stratified():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(200), 3)  # 3 images per patient
    labels = np.repeat(rng.integers(0, 2, 200), 3)
    train, val = train_val_split(labels, groups, 0.2, seed=5)
    assert set(groups[train]).isdisjoint(groups[val])
    assert len(train) + len(val) == len(labels)
    assert 0.15 < len(val) / len(labels) < 0.25
    assert abs(labels[val].mean() - labels.mean()) < 0.08
    again = train_val_split(labels, groups, 0.2, seed=5)
    assert np.array_equal(again[1], val)
