"""The hospital's policy (client/policy.py) and its validation split (client/split.py), unit by unit.

The adversarial suite (tests/test_adversarial.py) drives the same rules through Flower's engine."""

import stat

import numpy as np
import pytest

from client.policy import Declined, HospitalPolicy, PolicyError, admit, node_policy
from client.split import SPLIT_FILE, HospitalSplit
from common.config import StudyConfig


def test_no_policy_file_means_the_safe_defaults(tmp_path):
    policy = node_policy(None, tmp_path)
    assert (policy.require_dp, policy.max_epsilon, policy.max_delta, policy.release) == (True, 8.0, 1e-5, "summary")
    assert node_policy(None, tmp_path, max_epsilon=3).max_epsilon == 3  # the operator's --max-epsilon


def test_the_state_dirs_policy_file_is_read_and_every_key_checked(tmp_path):
    (tmp_path / "policy.toml").write_text('[privacy]\nmax-epsilon = 2.5\n[studies]\nallow = ["s1"]\n'
                                          '[evaluation]\nrelease = "none"\n')
    policy = node_policy(None, tmp_path)
    assert (policy.max_epsilon, policy.allow_studies, policy.release) == (2.5, ("s1",), "none")
    for text, says in [("[privacy]\nmax-epsilon = -1\n", "max-epsilon must be a number > 0"),
                       ("[privacy]\nrequire-dp = 'no'\n", "require-dp must be true or false"),
                       ("[evaluation]\nrelease = 'everything'\n", "release must be one of"),
                       ("[budget]\nx = 1\n", r"unknown section\(s\) budget"),
                       ("[privacy\n", "not readable TOML")]:
        (tmp_path / "p.toml").write_text(text)
        with pytest.raises(PolicyError, match=says):
            HospitalPolicy.load(tmp_path / "p.toml")


@pytest.mark.parametrize("asks, outcome", [
    ({"dp": False}, "requires DP"),
    ({"study_id": "other"}, "not on this hospital's allow-list"),
])
def test_what_cannot_be_tightened_is_declined(asks, outcome):
    policy = HospitalPolicy(allow_studies=("s1",))
    with pytest.raises(Declined, match=outcome):
        admit(policy, StudyConfig(study_id="s1").replace(**asks), 1000)


def test_what_can_be_tightened_is_brought_inside_the_policy():
    study = StudyConfig(study_id="s", epsilon=50, delta=0.5, max_grad_norm=1e6)
    terms = admit(HospitalPolicy(), study, 50_000)
    assert terms.dp and terms.target_epsilon == 8 and terms.epsilon_cap == 8
    assert terms.delta == 1 / (10 * 65536)  # 1 / (10 N), N rounded up to a power of two, is below 1e-5 here
    assert terms.max_grad_norm == 10 and terms.min_noise_multiplier == 0.5
    assert len(terms.changes) == 3
    assert admit(HospitalPolicy(), StudyConfig(epsilon=3, delta=1e-7), 100).changes == ()  # stricter: as asked


def test_without_dp_only_where_the_hospital_allows_it():
    terms = admit(HospitalPolicy(require_dp=False), StudyConfig(dp=False), 100)
    assert not terms.dp


def _patients(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2, n), np.array([f"P{i // 2:04d}" for i in range(n)])


def test_the_split_is_drawn_once_from_the_hospitals_secret_and_kept_for_good(tmp_path):
    labels, groups = _patients(200)
    train, val = HospitalSplit(tmp_path).split(labels, groups, 0.15)
    assert 0.08 < len(val) / 200 < 0.25 and not set(groups[train]) & set(groups[val])
    assert stat.S_IMODE((tmp_path / SPLIT_FILE).stat().st_mode) == 0o600
    assert "P0001" not in (tmp_path / SPLIT_FILE).read_text()  # keyed hashes, never patient ids
    # Asked at another fraction (as a study's val-fraction 0.8 would): the stored sides stand.
    again_train, again_val = HospitalSplit(tmp_path).split(labels, groups, 0.8)
    assert np.array_equal(again_val, val) and np.array_equal(again_train, train)
    # More images: old patients keep their side, new ones join one side each.
    more_labels, more_groups = _patients(400, seed=1)
    _, grown_val = HospitalSplit(tmp_path).split(more_labels, more_groups, 0.15)
    old_val = set(groups[val])
    assert {g for g in more_groups[grown_val] if g in set(groups)} == old_val


def test_another_hospital_draws_another_split(tmp_path):
    labels, groups = _patients(200)
    first = HospitalSplit(tmp_path / "a").split(labels, groups, 0.15)[1]
    second = HospitalSplit(tmp_path / "b").split(labels, groups, 0.15)[1]
    assert not np.array_equal(first, second)


def test_a_hospital_that_requires_secure_aggregation_trains_only_behind_the_mask():
    """What counts is whether the update leaves through SecAgg+'s mod (client/secagg.py sets ``masked``), not
    what the study config says."""
    policy = HospitalPolicy(require_secure_aggregation=True)
    claims = StudyConfig(secure_aggregation=True)
    with pytest.raises(Declined, match="requires secure aggregation"):
        admit(policy, claims, 100)
    assert admit(policy, claims, 100, masked=True).dp
