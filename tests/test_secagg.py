"""Secure aggregation (server/secagg.py, client/secagg.py): Flower's SecAgg+ inside fedrad's rounds.

One study on Flower's simulation engine in this process (the inline backend), 4 sites of two sizes, DP at
each site, 3 rounds, with what the server receives and what each site computed captured on the way:
round 1 every site answers; in round 2 one site goes down after training, before its masked update leaves;
in round 3 two do, below the reconstruction threshold (3 of 4).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import recorddict_to_fitres
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.supercore.task_identity import TaskIdentity

import client.secagg
from common.config import ConfigError, StudyConfig
from common.phantoms import write_demo_sites
from server import secagg
from server.rundir import RunDirectory
from server.strategy import build_strategy

DROPS = {2: {"hospital-3"}, 3: {"hospital-3", "hospital-4"}}  # round -> sites that go down mid-round


@pytest.fixture(scope="module")
def unequal_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four hospitals: two of 40 images, two of 80 (so FedAvg's weights are not all equal)."""
    root = tmp_path_factory.mktemp("secagg")
    small = write_demo_sites(root / "small", num_sites=2, per_site=40, size=32, seed=5)
    large = write_demo_sites(root / "large", num_sites=4, per_site=80, size=32, seed=6)[2:]
    (root / "sites").mkdir()
    for folder in (*small, *large):
        folder.rename(root / "sites" / folder.name)
    return root / "sites"


class Captured:
    """What each site computed (before masking) and what the server received, by round."""

    def __init__(self) -> None:
        self.sites: dict[int, dict[str, tuple[list[np.ndarray], list[np.ndarray], int]]] = {}
        self.received: dict[int, dict[str, Message]] = {}  # the collect stage's replies, by site


@pytest.fixture(scope="module")
def secure_study(unequal_sites: Path, tmp_path_factory: pytest.TempPathFactory):
    from fedrad import simulation

    captured = Captured()
    fit_reply, send_and_receive = client.secagg.fit_reply, secagg.StageGrid.send_and_receive

    def site_side(instruction: Message, reply: Message) -> Message:
        out = fit_reply(instruction, reply)
        server_round = int(instruction.content["config"]["server-round"])
        site = str(reply.content["status"]["site"])
        fit = recorddict_to_fitres(out.content, keep_input=True)
        start = [a.numpy() for a in instruction.content["arrays"].values()]
        captured.sites.setdefault(server_round, {})[site] = (start, parameters_to_ndarrays(fit.parameters),
                                                             fit.num_examples)
        if site in DROPS.get(server_round, ()):
            raise RuntimeError(f"{site} went down mid-round")
        return out

    def server_side(self, messages, *, timeout=None):
        messages = list(messages)
        replies = send_and_receive(self, messages, timeout=timeout)
        stage = messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        if stage == Stage.COLLECT_MASKED_VECTORS:
            got = captured.received.setdefault(int(messages[0].metadata.group_id), {})
            got.update({str(r.content["status"]["site"]): r for r in replies if not r.has_error()})
        return replies

    out = tmp_path_factory.mktemp("secagg-run") / "run"
    study = StudyConfig(num_rounds=3, image_size=32, batch_size=16, local_epochs=1, model="cnn", epsilon=8.0,
                        seed=3, num_sites=4, out=str(out), data=str(unequal_sites), secure_aggregation=True,
                        secagg_max_weight=100.0, round_timeout=60.0)
    saved_env = dict(os.environ)  # run() sets what the hospitals read from the environment
    patch = pytest.MonkeyPatch()
    patch.setattr(client.secagg, "fit_reply", site_side)
    patch.setattr(secagg.StageGrid, "send_and_receive", server_side)
    began = time.time()
    try:
        run_dir = simulation.run(study, 4, backend="inline")
    finally:
        patch.undo()
        os.environ.clear()
        os.environ.update(saved_env)
    return study, run_dir, captured, time.time() - began


def _weights(run_dir: RunDirectory, server_round: int) -> list[np.ndarray]:
    path = dict(run_dir.checkpoints())[server_round]
    return [t.numpy() for t in run_dir.load_checkpoint(server_round, path)["arrays"].values()]


def _fedavg(sites: dict[str, tuple[list[np.ndarray], list[np.ndarray], int]], names) -> list[np.ndarray]:
    """Plain FedAvg of the sites' weights w + delta_i, weighted by num-examples."""
    total = sum(sites[s][2] for s in names)
    start = next(iter(sites.values()))[0]
    return [w + sum(sites[s][2] * sites[s][1][i] for s in names) / total for i, w in enumerate(start)]


def _bound(study: StudyConfig, sites, names) -> float:
    largest = max(float(np.max(np.abs(d))) for s in names for d in sites[s][1])
    return secagg.error_bound(study, [sites[s][2] for s in names], largest) + 1e-6  # + float32 rounding


@pytest.mark.e2e
def test_the_server_receives_only_masked_updates(secure_study):
    """No reply the server got holds a site's weights; each site's vector is spread over the whole modulus
    2**32, while every unmasked quantized coordinate lies in [0, Q]."""
    study, _, captured, _ = secure_study
    received = captured.received[1]
    assert sorted(received) == ["hospital-1", "hospital-2", "hospital-3", "hospital-4"]
    for site, reply in received.items():
        assert all(len(record) == 0 for record in reply.content.array_records.values()), site
        masked = np.concatenate([bytes_to_ndarray(b).ravel() for b in
                                 reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]])
        delta = np.concatenate([d.ravel() for d in captured.sites[1][site][1]])
        assert masked.size == delta.size + 1  # the weight, then the update: masked alike
        in_quantized_range = np.mean((masked >= 0) & (masked <= study.secagg_quantization_range))
        assert in_quantized_range < 0.01, site  # uniform over [0, 2**32) puts 1/1024 there
        assert abs(np.mean(masked) / 2**31 - 1) < 0.05, site


@pytest.mark.e2e
def test_the_secure_aggregate_is_fedavg_of_the_same_updates(secure_study):
    """Round 1's new global model is the example-weighted mean of the four sites' weights, to SecAgg+'s
    quantisation bound; the unweighted mean is farther off than that, so the weights are the sites'."""
    study, run_dir, captured, _ = secure_study
    sites, names = captured.sites[1], sorted(captured.sites[1])
    assert len({sites[s][2] for s in names}) == 2  # two sizes of site
    got, bound = _weights(run_dir, 1), _bound(study, sites, names)
    assert bound < 1e-4
    for mine, fedavg in zip(got, _fedavg(sites, names)):
        assert np.max(np.abs(mine - fedavg)) <= bound
    unweighted = [w + sum(sites[s][1][i] for s in names) / 4 for i, w in enumerate(sites[names[0]][0])]
    assert max(np.max(np.abs(m - u)) for m, u in zip(got, unweighted)) > 10 * bound


@pytest.mark.e2e
def test_the_site_metrics_still_reach_the_server(secure_study):
    _, run_dir, _, _ = secure_study
    first = run_dir.rounds()[0]
    assert first["aggregate"]["sites_trained"] == 4
    for row in first["sites"]:
        assert row["trained"] and row["epsilon"] > 0 and row["n_train"] > 0, row


@pytest.mark.e2e
def test_a_site_down_mid_round_leaves_the_aggregate_of_the_others(secure_study):
    """Round 2: hospital-3 trained, then went down before its masked update left. The three others are
    above the threshold (3): their FedAvg is the new model, the pairwise masks they shared with hospital-3
    removed with its rebuilt key."""
    study, run_dir, captured, _ = secure_study
    assert sorted(captured.received[2]) == ["hospital-1", "hospital-2", "hospital-4"]
    sites, names = captured.sites[2], ["hospital-1", "hospital-2", "hospital-4"]
    for mine, fedavg in zip(_weights(run_dir, 2), _fedavg(sites, names)):
        assert np.max(np.abs(mine - fedavg)) <= _bound(study, sites, names)
    row = run_dir.rounds()[1]
    assert row["aggregate"]["sites_trained"] == 3 and "model_updated" not in row["aggregate"]
    down = next(s for s in row["sites"] if s["site"] == "hospital-3")
    assert not down["trained"] and "went down mid-round" in down["declined"]


@pytest.mark.e2e
def test_below_the_threshold_the_round_leaves_the_model_unchanged_and_the_study_goes_on(secure_study):
    _, run_dir, _, seconds = secure_study
    row = run_dir.rounds()[2]
    assert row["aggregate"]["model_updated"] is False
    assert all(np.array_equal(a, b) for a, b in zip(_weights(run_dir, 3), _weights(run_dir, 2)))
    assert {s["site"] for s in row["sites"] if "declined" in s} == {"hospital-3", "hospital-4"}
    assert run_dir.model_path.exists()
    assert seconds < 60  # the round timeout (60 s) was never waited out


@pytest.mark.parametrize(("sites", "shares", "threshold"), [(2, 2, 2), (3, 3, 2), (4, 4, 3), (5, 5, 3), (7, 7, 4)])
def test_the_default_threshold_is_a_strict_majority_of_every_site(sites, shares, threshold):
    settings = secagg.protocol(StudyConfig(), sites)
    assert settings["reconstruction_threshold"] == threshold
    assert settings["num_shares"] in (shares, 1.0)  # 1.0: Flower's "every sampled site"
    SecAggPlusWorkflow(**settings)  # Flower takes them


def test_configured_shares_and_threshold_reach_flower():
    settings = secagg.protocol(StudyConfig(secagg_num_shares=5, secagg_reconstruction_threshold=4), 9)
    assert (settings["num_shares"], settings["reconstruction_threshold"]) == (5, 4)
    SecAggPlusWorkflow(**settings)
    assert secagg.protocol(StudyConfig(secagg_reconstruction_threshold=2), 4)["reconstruction_threshold"] == 2


@pytest.mark.parametrize(("changes", "message"), [
    ({"secagg_num_shares": 2}, "secagg-num-shares"),
    ({"secagg_reconstruction_threshold": 1}, "secagg-reconstruction-threshold"),
    ({"secagg_num_shares": 3, "secagg_reconstruction_threshold": 3}, "below secagg-num-shares"),
    ({"secagg_quantization_range": 2**32}, "secagg-quantization-range"),
    ({"secagg_clipping_range": 0.0}, "secagg-clipping-range"),
    ({"secagg_max_weight": 0.0}, "secagg-max-weight"),
])
def test_bad_secure_aggregation_settings_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        StudyConfig(**changes)


def test_a_study_toml_and_the_cli_set_it():
    from fedrad.cli import build_parser

    assert StudyConfig.from_flat({"secure-aggregation": "false"}).secure_aggregation is False
    assert StudyConfig().secure_aggregation  # deployments: on unless the study says otherwise
    parse = build_parser().parse_args
    assert parse(["simulate"]).secure_aggregation is False  # simulation: off unless asked
    assert parse(["simulate", "--secure-aggregation"]).secure_aggregation is True
    assert parse(["simulate", "--no-secure-aggregation"]).secure_aggregation is False


@pytest.fixture
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _reply(node: int, weights: np.ndarray, n: int) -> Message:
    metadata = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"m{node}", group_id="1", created_at=time.time(), ttl=60,
                        message_type="train")
    content = {"arrays": ArrayRecord([weights.astype(np.float32)]), "metrics": MetricRecord({"num-examples": n}),
               "status": ConfigRecord({"site": f"site-{node}"})}
    return Message(RecordDict(content), metadata=metadata)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_each_strategy_aggregates_the_unmasked_mean_as_it_would_the_plain_replies(task_identity, strategy):
    """FedAvg and FedProx return the mean; FedAdam steps its server optimiser from it, as from plain replies."""
    rng = np.random.default_rng(0)
    start = rng.normal(size=6).astype(np.float32)
    replies = [_reply(node, start + rng.normal(size=6), n) for node, n in ((1, 20), (2, 60), (3, 40))]
    plain, masked = (build_strategy(StudyConfig(strategy=strategy)) for _ in range(2))
    for s in (plain, masked):
        s.current_arrays = {"0": start.copy()}  # set by configure_train (FedAdam's w_t)
    expected, _ = plain.aggregate_train(1, replies)
    mean = sum(n * r.content["arrays"]["0"].numpy().astype(np.float64) for r, n in zip(replies, (20, 60, 40))) / 120
    without_arrays = [Message(RecordDict({"metrics": r.content["metrics"], "status": r.content["status"]}),
                              metadata=r.metadata) for r in replies]
    got = masked.aggregate_masked(1, without_arrays, ArrayRecord([mean.astype(np.float32)]))
    assert np.allclose(got["0"].numpy(), expected["0"].numpy(), atol=1e-6)
    assert sorted(masked.current.train) == ["site-1", "site-2", "site-3"]


def test_the_update_is_local_minus_global_and_a_declining_site_sends_zeros():
    """A site that declines has no local weights: a zero update (with weight 0, SecAgg+ adds nothing of it)."""
    start = {"w": torch.ones(2, 3), "b": torch.zeros(2)}
    local = {"w": torch.full((2, 3), 1.5), "b": torch.tensor([0.25, -1.0])}
    delta = client.secagg.update_delta(ArrayRecord(start), ArrayRecord(local))
    assert [d.tolist() for d in delta] == [[[0.5] * 3] * 2, [0.25, -1.0]]
    assert all(not d.any() and d.shape == s.shape for d, s in
               zip(client.secagg.update_delta(ArrayRecord(start), None), start.values()))
