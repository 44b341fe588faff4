import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.config import StudyConfig
from common.models import build_model
from server.app import exchange, round_row
from server.rundir import RunDirectory
from server.strategy import RoundRecord, StudyFedAdam, StudyFedAvg, StudyFedProx, build_strategy


def test_round_row_weights_by_validation_size_and_lists_declines():
    record = RoundRecord(
        train={"a": {"num-examples": 80, "epsilon": 2.0}, "b": {"num-examples": 20, "epsilon": 3.0}},
        evaluate={
            "a": {"num-examples": 30, "n-train": 80, "loss": 0.3, "auc": 0.9, "accuracy": 0.8, "sensitivity": 0.7,
                  "specificity": 0.9, "balanced_accuracy": 0.8},
            "b": {"num-examples": 10, "n-train": 20, "loss": 0.5, "auc": math.nan, "accuracy": 0.6,
                  "sensitivity": math.nan, "specificity": 0.6, "balanced_accuracy": 0.6},
        },
        declined={"c": "over budget"},
    )
    privacy = {"a": {"epsilon": 2.0, "delta": 1e-5}, "b": {"epsilon": 3.0, "delta": 1e-5}}
    row = round_row(4, record, privacy)
    assert row["round"] == 4 and [s["site"] for s in row["sites"]] == ["a", "b", "c"]
    site_a = row["sites"][0]
    for key in ("site", "n_train", "n_val", "loss", "auc", "accuracy", "sensitivity", "specificity", "epsilon",
                "delta"):
        assert key in site_a
    agg = row["aggregate"]
    assert math.isclose(agg["accuracy"], (0.8 * 30 + 0.6 * 10) / 40)
    assert agg["auc"] == 0.9  # b's undefined AUC is left out, not counted as 0
    assert agg["max_epsilon"] == 3.0 and agg["n_val"] == 40
    assert row["sites"][2]["declined"] == "over budget" and not row["sites"][2]["trained"]


def test_run_directory_metrics_are_strict_json_and_replace_later_rounds(tmp_path):
    run = RunDirectory(tmp_path)
    for r in (1, 2, 3):
        run.append_round({"round": r, "aggregate": {"auc": math.nan}})
    run.append_round({"round": 2, "aggregate": {"auc": 0.7}})  # a resumed study re-ran round 2
    rows = run.rounds()
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["aggregate"]["auc"] is None and rows[1]["aggregate"]["auc"] == 0.7
    assert "NaN" not in run.metrics_path.read_text()


def test_checkpoints_latest_wins_and_leave_no_temp_files(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.latest_checkpoint() is None
    weights = build_model("cnn", 1, 2).state_dict()
    for r in (1, 2, 10):
        run.save_checkpoint(r, {"arrays": weights, "strategy": {}, "privacy": {"a": {"epsilon": float(r)}}})
    latest = run.latest_checkpoint()
    assert latest["round"] == 10 and latest["privacy"]["a"]["epsilon"] == 10.0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "round-001.pt", "round-002.pt", "round-010.pt"]


def test_weights_round_trip_through_flower_records():
    model = build_model("resnet18", 3, 4)
    restored = ArrayRecord(model.state_dict()).to_torch_state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(restored[key], value)


def test_strategy_choice_and_fedadam_state_round_trip():
    assert isinstance(build_strategy(StudyConfig()), StudyFedAvg)
    assert isinstance(build_strategy(StudyConfig(strategy="fedprox")), StudyFedProx)
    adam = build_strategy(StudyConfig(strategy="fedadam"))
    assert isinstance(adam, StudyFedAdam)
    assert adam.state_dict() == {}
    adam.m_t = {"w": np.ones(3)}
    adam.v_t = {"w": np.full(3, 2.0)}
    fresh = build_strategy(StudyConfig(strategy="fedadam"))
    fresh.load_state_dict(adam.state_dict())
    assert np.array_equal(fresh.v_t["w"], np.full(3, 2.0)) and np.array_equal(fresh.m_t["w"], np.ones(3))


@pytest.fixture
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _instructions(nodes):
    sent = [Message(RecordDict({"config": ConfigRecord({"server-round": 2})}), dst_node_id=n, message_type="train")
            for n in nodes]
    for i, msg in enumerate(sent):
        msg.metadata.__dict__["_message_id"] = f"m{i}"  # as the grid sets it when pushing
    return sent


def _update(instruction, site, n=10):
    content = {"arrays": ArrayRecord([np.full(3, float(n))]), "metrics": MetricRecord({"num-examples": n}),
               "status": ConfigRecord({"site": site})}
    return Message(RecordDict(content), reply_to=instruction)


def test_a_round_closes_with_the_sites_that_answered(task_identity):
    """Three sites sent a train message: one answers, one is reported gone by the SuperLink (its error reply
    comes from the SuperLink, not the node), one never answers before the timeout."""
    strategy = build_strategy(StudyConfig(min_nodes=1))
    strategy.node_sites = {12: "st-luke", 13: "st-john"}  # learned from earlier rounds
    sent = _instructions([11, 12, 13])
    gone = Message(Error(code=5, reason="Error: Node Unavailable - ..."), reply_to=sent[1])
    gone.metadata.__dict__["_src_node_id"] = 1  # the SuperLink
    replies = [_update(sent[0], "st-mary"), gone]
    strategy.expect(sent)
    arrays, _ = strategy.aggregate_train(2, replies)
    strategy.note_missing(replies, "train", 40)
    assert arrays is not None and strategy.current.updated
    assert set(strategy.current.train) == {"st-mary"}
    assert strategy.current.declined == {
        "st-luke": "no train reply: the hospital's node went offline (it stopped sending heartbeats to the server: "
                   "stopped, crashed or its network dropped)",
        "st-john": "no train reply within the round timeout (40 s)"}
    row = round_row(2, strategy.current, {})
    assert row["aggregate"]["sites_trained"] == 1 and "model_updated" not in row["aggregate"]


def test_flowers_errors_for_a_missing_site_are_recorded_in_plain_words(task_identity):
    """The SuperLink answers for a site whose instruction expired (its TTL is the round timeout): Flower's
    "Message Unavailable ... TTL" becomes what happened, in the study's words; unknown errors keep Flower's."""
    strategy = build_strategy(StudyConfig(min_nodes=1, round_timeout=60))
    strategy.node_sites = {12: "st-luke", 13: "st-john", 14: "st-anne"}
    sent = _instructions([11, 12, 13, 14])
    expired = Message(Error(code=3, reason="Error: Message Unavailable - ... It may have expired due to its TTL"),
                      reply_to=sent[1])
    crashed = Message(Error(code=2, reason="ValueError: boom"), reply_to=sent[2])
    odd = Message(Error(code=99, reason="something new"), reply_to=sent[3])
    strategy.expect(sent)
    strategy.aggregate_train(2, [_update(sent[0], "st-mary"), expired, crashed, odd])
    assert strategy.current.declined == {
        "st-luke": "no train reply within the round timeout (60 s): the hospital's node was down, disconnected or "
                   "still working when the round's instruction expired",
        "st-john": "the hospital's train failed (its node's log has the details): ValueError: boom",
        "st-anne": "error: something new"}
    assert not any("Unavailable" in reason for reason in strategy.current.declined.values())


def test_a_site_that_declined_counts_in_no_training_or_privacy_total():
    """st-luke's lifetime budget went on an earlier study: it declines training and still evaluates, reporting
    its ledger's epsilon (8). Round totals are this study's: its images did not train, its 8 is not this model's."""
    from server.app import _update_privacy

    scores = {"loss": 0.3, "auc": 0.9, "accuracy": 0.8, "sensitivity": 0.7, "specificity": 0.9,
              "balanced_accuracy": 0.8}
    record = RoundRecord(
        train={"st-mary": {"num-examples": 80, "epsilon": 4.87, "delta": 1e-5}},
        evaluate={"st-mary": {"num-examples": 30, "n-train": 80, "epsilon": 4.87, "delta": 1e-5, **scores},
                  "st-luke": {"num-examples": 20, "n-train": 60, "epsilon": 8.0, "delta": 1e-5, **scores}},
        declined={"st-luke": "this round would bring epsilon to 8.3, over the site's budget 8.00"})
    privacy: dict = {}
    _update_privacy(privacy, record)
    assert privacy == {"st-mary": {"epsilon": 4.87, "delta": 1e-5}}
    row = round_row(1, record, privacy)
    agg = row["aggregate"]
    assert agg["max_epsilon"] == 4.87 and agg["epsilon"] == 4.87
    assert agg["n_train"] == 80 and agg["n_val"] == 50 and agg["sites_trained"] == 1
    luke = next(s for s in row["sites"] if s["site"] == "st-luke")
    assert luke["n_train"] == 60 and not luke["trained"] and luke["epsilon"] == 0.0
    # A site that trained in an earlier round keeps its spend in the study's total when it declines later.
    later = RoundRecord(evaluate={"st-mary": {"num-examples": 30, "epsilon": 4.87, **scores}},
                        declined={"st-mary": "over budget"})
    _update_privacy(privacy, later)
    assert round_row(2, later, privacy)["aggregate"]["max_epsilon"] == 4.87


def test_fewer_updates_than_min_nodes_leave_the_model_unchanged(task_identity):
    strategy = build_strategy(StudyConfig(min_nodes=2))
    sent = _instructions([11, 12])
    strategy.expect(sent)
    arrays, _ = strategy.aggregate_train(3, [_update(sent[0], "st-mary")])
    assert arrays is None and not strategy.current.updated
    assert round_row(3, strategy.current, {})["aggregate"]["model_updated"] is False
    arrays, _ = strategy.aggregate_train(4, [_update(sent[0], "st-mary", 10), _update(sent[1], "st-luke", 30)])
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 25.0)  # example-weighted mean


def test_instructions_live_only_as_long_as_their_phase(task_identity):
    """A hospital that reconnects after a phase closed must not pick up (and pay for) its stale instruction:
    each message's TTL is the round timeout (the SuperLink hands out only unexpired instructions)."""

    class Grid:
        def send_and_receive(self, messages, timeout):
            self.ttls, self.timeout = [m.metadata.ttl for m in messages], timeout
            for i, msg in enumerate(messages):
                msg.metadata.__dict__["_message_id"] = f"m{i}"
            return iter([_update(messages[0], "st-mary")])  # the second site never answers

    grid, strategy = Grid(), build_strategy(StudyConfig(min_nodes=1))
    messages = (m for m in _instructions([11, 12]))
    replies = exchange(grid, strategy, messages, 45.0)
    assert grid.ttls == [45.0, 45.0] and grid.timeout == 45.0 and len(replies) == 1
    assert strategy.sent == {"m0": 11, "m1": 12}


def test_missing_sites_are_explained_in_words_a_coordinator_can_act_on():
    from flwr.common.constant import ErrorCode

    from server.strategy import error_reason

    expired = error_reason("train", Error(ErrorCode.MESSAGE_UNAVAILABLE, "Message Unavailable ... TTL"), 60)
    assert "within the round timeout (60 s)" in expired and "TTL" not in expired
    assert "went offline" in error_reason("evaluate", Error(ErrorCode.NODE_UNAVAILABLE, "x"), 60)
    refused = error_reason("train", Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                          "<class 'client.runtime.UnapprovedApp'>:<'not approved'>"), 60)
    assert refused.startswith("the hospital refused the study's code") and "fedrad client digest" in refused
    crashed = error_reason("train", Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "<class 'ValueError'>"), 60)
    assert crashed.startswith("the hospital's train failed")


def test_sites_roc_curves_of_different_lengths_do_not_stop_the_round():
    """Each site sends ROC points at its own score quantiles: Flower's default metric mean (element-wise over lists)
    raised on them and stopped the study; fedrad's strategies average the numbers only."""
    from server.strategy import scalar_metric_mean

    records = [RecordDict({"metrics": MetricRecord({"num-examples": n, "auc": auc, "roc-fpr": [0.0] * k})})
               for n, auc, k in ((10, 0.8, 5), (30, 0.9, 9))]
    merged = scalar_metric_mean(records, "num-examples")
    assert dict(merged) == {"auc": pytest.approx(0.875)}
    for name in ("fedavg", "fedprox", "fedadam"):
        assert build_strategy(StudyConfig(strategy=name)).evaluate_metrics_aggr_fn is scalar_metric_mean
