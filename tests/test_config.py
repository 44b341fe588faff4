import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from common.config import ConfigError, NodeConfig, StudyConfig


def test_flat_round_trip_and_coercion():
    study = StudyConfig.from_flat({"num-rounds": "7", "dp": "false", "epsilon": 3, "strategy": "fedprox"})
    assert study.num_rounds == 7 and study.dp is False and study.epsilon == 3.0
    assert StudyConfig.from_flat(study.to_flat()) == study


@pytest.mark.parametrize(
    "flat, message",
    [
        ({"strategy": "fedsgd"}, "unknown strategy"),
        ({"num-rounds": "many"}, "cannot read"),
        ({"epsilon": -1}, "epsilon"),
        ({"class-names": "one"}, "two"),
    ],
)
def test_bad_values_give_one_line_errors(flat, message):
    with pytest.raises(ConfigError, match=message) as err:
        StudyConfig.from_flat(flat)
    assert "\n" not in str(err.value)


def test_flower_app_defaults_match_the_study_config():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    keys = {f.name.replace("_", "-") for f in fields(StudyConfig)}
    assert set(app_config) == keys
    assert StudyConfig.from_flat(app_config) == StudyConfig()
    assert pyproject["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "server.app:app", "clientapp": "client.app:app"}


def test_node_config_simulated_only_without_data():
    assert NodeConfig.from_flat({"partition-id": 0, "num-partitions": 2}).simulated
    assert not NodeConfig.from_flat({"data": "/x", "site": "a", "max-epsilon": "4"}).simulated
    assert NodeConfig.from_flat({"max-epsilon": "4"}).max_epsilon == 4.0


def test_learning_rate_defaults_to_the_measured_one_for_the_mode():
    assert StudyConfig().lr == 0.5 and StudyConfig(dp=False).lr == 0.05
    assert StudyConfig(dp=False, lr=0.2).lr == 0.2
    assert StudyConfig.from_flat(StudyConfig(dp=False).to_flat()).lr == 0.05
    with pytest.raises(ConfigError, match="lr must be positive"):
        StudyConfig(lr=-1)


def test_local_epochs_default_follows_the_budget():
    """3 local epochs won at epsilon 8 and 3 and lost badly at epsilon 1 (benchmarks/results): 0 picks by budget."""
    assert StudyConfig().local_epochs == 3
    assert StudyConfig(epsilon=1.0).local_epochs == 1
    assert StudyConfig(dp=False, epsilon=1.0).local_epochs == 3
    assert StudyConfig(epsilon=1.0, local_epochs=2).local_epochs == 2
    assert StudyConfig(epsilon=3.0).local_epochs == 3
    resolved = StudyConfig(epsilon=2.0)
    assert resolved.local_epochs == 1
    assert StudyConfig.from_flat(resolved.to_flat()) == resolved  # clients see the server's choice
    with pytest.raises(ConfigError):
        StudyConfig(local_epochs=-1)
