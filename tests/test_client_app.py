"""The ClientApp as a hospital runs it: what leaves the site, and the hospital's own budget."""

import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import PRIVATE_REFUSAL, app
from client.audit import AuditLog
from client.privacy import PrivacyLedger
from client.release import coarse_epsilon
from common.acquisition import pooled_acquisition
from common.config import StudyConfig
from common.models import build_model

STUDY = StudyConfig(image_size=32, batch_size=16, num_rounds=2, epsilon=8.0)


@pytest.fixture(autouse=True)
def task_identity():
    # Flower's runtime sets these before it calls a ClientApp; so does its run_simulation().
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def call(kind: str, server_round: int, node_config: dict, study: StudyConfig = STUDY,
         arrays: ArrayRecord | None = None) -> RecordDict:
    arrays = arrays or ArrayRecord(build_model(study.model, study.channels, len(study.classes)).state_dict())
    config = ConfigRecord({**study.to_flat(), "server-round": server_round})
    msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type=kind)
    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    return app(msg, ctx).content


def node(demo_sites, tmp_path, **extra):
    return {"data": str(demo_sites[1]), "site": "st-mary", "state-dir": str(tmp_path / "state"), **extra}


def test_only_weights_and_metrics_leave_the_site(demo_sites, tmp_path):
    """Every field of both replies, pinned (client/release.py): no training loss, no label counts, sizes rounded."""
    reply = call("train", 1, node(demo_sites, tmp_path))
    assert set(reply.keys()) == {"arrays", "metrics", "status"}
    assert dict(reply["status"]) == {"site": "st-mary"}
    assert set(reply["metrics"]) == {"num-examples", "epsilon", "delta"}
    assert reply["metrics"]["num-examples"] % 10 == 0 and reply["metrics"]["delta"] == 1e-5
    assert set(reply["arrays"]) == set(build_model(STUDY.model, 1, 2).state_dict())
    assert 0 < reply["metrics"]["epsilon"] <= 8.0

    evaluation = call("evaluate", 1, node(demo_sites, tmp_path))
    assert set(evaluation.keys()) == {"metrics", "status"}
    summary = ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")
    assert set(evaluation["metrics"]) == {"num-examples", "epsilon", "delta", *summary,
                                          *(f"{m}-ci95" for m in summary)}  # the default policy: summary
    lo, hi = evaluation["metrics"]["accuracy-ci95"]
    assert lo <= evaluation["metrics"]["accuracy"] <= hi
    assert evaluation["metrics"]["num-examples"] % 10 == 0
    assert evaluation["metrics"]["epsilon"] == reply["metrics"]["epsilon"]


def test_a_policy_that_releases_everything_sends_curves_and_counts(demo_sites, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('[evaluation]\nrelease = "full"\n')
    evaluation = call("evaluate", 1, node(demo_sites, tmp_path, policy=str(policy)))
    assert set(evaluation["metrics"]) - {"input-mean", "input-cov"} == {  # the input profile: >= 20 val images
        "input-modality", "input-photometric",
        "num-examples", "loss", "auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy",
        "f1", "epsilon", "delta", "n-pos-val",  # counts and summaries only, no predictions:
        "roc-threshold", "roc-tpr", "roc-fpr", "confusion", "calibration-count", "calibration-predicted",
        "calibration-observed",
        *(f"{m}-ci95" for m in ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "f1"))}
    assert len(evaluation["metrics"]["roc-tpr"]) == len(evaluation["metrics"]["roc-threshold"]) <= 64  # tiny split
    # which kinds of images it trained on: a flag per term of fixed vocabularies (common/acquisition.py)
    record = pooled_acquisition({"st-mary": evaluation["metrics"]})
    assert record["modalities"] == ["DX"] and record["photometrics"] == ["MONOCHROME1"]


def test_hospital_budget_is_never_exceeded(demo_sites, tmp_path, caplog):
    """max-epsilon 3 below the study's 8: the site adds more noise, and declines once the budget is spent. Its
    log line says what the data has spent and how the hospital raises its own cap; the coordinator gets the
    reason only."""
    cfg = node(demo_sites, tmp_path, **{"max-epsilon": 3.0})
    spent = [call("train", r, cfg)["metrics"]["epsilon"] for r in (1, 2)]
    assert spent[0] < spent[1] <= 3.0
    logging.getLogger("fedrad").addHandler(caplog.handler)  # fedrad's loggers do not propagate (common/logs.py)
    try:
        extra = call("train", 3, cfg)  # a round beyond the plan (or a re-run after a restart)
    finally:
        logging.getLogger("fedrad").removeHandler(caplog.handler)
    assert "arrays" not in extra and extra["metrics"]["num-examples"] == 0
    assert "over the site's budget 3.00" in extra["status"]["declined"]
    assert "max-epsilon" not in extra["status"]["declined"]
    line = next(r.getMessage() for r in caplog.records if "declines round" in r.getMessage())
    assert "over the site's budget 3.00" in line and f"epsilon {spent[1]:.2f} already spent on this data" in line
    assert f"set max-epsilon under [privacy] in {tmp_path / 'state' / 'policy.toml'}" in line
    assert "--max-epsilon" in line and "'fedrad policy show'" in line
    ledger = PrivacyLedger(tmp_path / "state").datasets()
    assert len(ledger) == 1 and [r["round"] for r in next(iter(ledger.values())).rounds] == [1, 2]


def test_a_budget_no_noise_level_can_meet_declines_with_a_reason(demo_sites, tmp_path):
    reply = call("train", 1, node(demo_sites, tmp_path, **{"max-epsilon": 1e-6}))
    assert "arrays" not in reply and "too small a budget" in reply["status"]["declined"]
    assert PrivacyLedger(tmp_path / "state").datasets() == {}


def test_unusable_data_declines_with_a_reason_kept_at_the_site(tmp_path):
    """The coordinator learns that the site cannot take part; the reason (paths, label counts) stays in the
    site's audit log."""
    reply = call("train", 1, {"data": str(tmp_path / "missing"), "site": "x", "state-dir": str(tmp_path)})
    assert reply["status"]["declined"] == PRIVATE_REFUSAL and "arrays" not in reply
    [entry] = AuditLog(tmp_path).records()
    assert entry["event"] == "declined" and entry["reason"].startswith("data path not found")


def test_a_damaged_ledger_stops_training_instead_of_resetting_the_budget(demo_sites, tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "privacy-ledger.json").write_text('{"datasets": ')
    reply = call("train", 1, node(demo_sites, tmp_path))
    assert "arrays" not in reply and "ledger" in reply["status"]["declined"]


def test_audit_log_records_what_left_and_what_was_declined(demo_sites, tmp_path):
    from client.audit import AuditLog, update_digest

    cfg = node(demo_sites, tmp_path, **{"max-epsilon": 3.0})
    sent = [call("train", r, cfg) for r in (1, 2)]
    call("evaluate", 2, cfg)
    call("train", 3, cfg)  # over budget: declined
    records = AuditLog(tmp_path / "state").records()
    assert [r["event"] for r in records] == ["sent model update", "sent model update", "sent evaluation metrics",
                                             "declined"]
    first = records[0]
    size, sha = update_digest(sent[0]["arrays"].to_torch_state_dict())
    assert (first["bytes"], first["sha256"]) == (size, sha) and first["round"] == 1
    assert coarse_epsilon(first["epsilon"]) == sent[0]["metrics"]["epsilon"]  # the log exact, the reply rounded up
    assert "over the site's budget" in records[-1]["reason"] and records[-1]["round"] == 3


def test_a_round_asked_for_again_is_never_paid_for_twice(demo_sites, tmp_path):
    """A restarted server asks for round 2 again: from the same global weights the site re-sends the same
    update without training; from other weights it declines. The ledger charges round 2 once."""
    study, cfg = STUDY.replace(study_id="study-a", num_rounds=3), node(demo_sites, tmp_path)
    call("train", 1, cfg, study)
    start = ArrayRecord(build_model(study.model, 1, 2).state_dict())
    first = call("train", 2, cfg, study, arrays=start)
    ledger = PrivacyLedger(tmp_path / "state")
    spent = next(iter(ledger.datasets().values()))

    again = call("train", 2, cfg, study, arrays=ArrayRecord(start.to_torch_state_dict()))  # as from a checkpoint
    assert dict(again["metrics"]) == dict(first["metrics"])
    for key, value in first["arrays"].to_torch_state_dict().items():
        assert torch.equal(again["arrays"].to_torch_state_dict()[key], value)
    other = call("train", 2, cfg, study)  # fresh random global weights
    assert "arrays" not in other and other["metrics"]["num-examples"] == 0
    assert "round 2 of study study-a was already trained and charged" in other["status"]["declined"]
    assert "other global weights" in other["status"]["declined"]

    after = next(iter(PrivacyLedger(tmp_path / "state").datasets().values()))
    assert after.history == spent.history and [r["round"] for r in after.rounds] == [1, 2]
    events = [(r["event"], r["round"]) for r in AuditLog(tmp_path / "state").records()]
    assert events == [("sent model update", 1), ("sent model update", 2), ("re-sent model update", 2),
                      ("declined", 2)]
    assert call("train", 3, cfg, study)["metrics"]["epsilon"] > first["metrics"]["epsilon"]  # the next round trains


def test_a_round_charged_without_a_kept_copy_is_declined(demo_sites, tmp_path):
    """The ledger is the authority: a charged round whose sent copy is gone (crash before it was kept,
    a state dir from an older fedrad) is declined, not trained again."""
    study, cfg = STUDY.replace(study_id="study-a"), node(demo_sites, tmp_path)
    call("train", 1, cfg, study)
    for stored in (tmp_path / "state" / "sent").iterdir():
        stored.unlink()
    reply = call("train", 1, cfg, study)
    assert "arrays" not in reply and "no copy of the update sent then is kept" in reply["status"]["declined"]
    assert [r["round"] for r in next(iter(PrivacyLedger(tmp_path / "state").datasets().values())).rounds] == [1]


def test_a_round_waits_for_the_ledger_lock_at_most_the_round_timeout(demo_sites, tmp_path):
    """The budget check, training and record hold the ledger's lock: while another process holds it the
    site waits, then declines once the server has stopped waiting for the reply (round-timeout)."""
    study, cfg = STUDY.replace(round_timeout=0.3), node(demo_sites, tmp_path)
    with PrivacyLedger(tmp_path / "state").locked():
        reply = call("train", 1, cfg, study)
    assert "arrays" not in reply and reply["status"]["declined"] == (
        f"the privacy ledger in {tmp_path / 'state'} is locked by another process for over 0.3 s")
    assert PrivacyLedger(tmp_path / "state").datasets() == {}
    assert call("train", 1, cfg, study)["metrics"]["epsilon"] > 0  # released: the round trains


def test_a_plain_round_is_declined_where_the_policy_requires_secure_aggregation(demo_sites, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[privacy]\nrequire-secure-aggregation = true\n")
    reply = call("train", 1, node(demo_sites, tmp_path, policy=str(policy)))
    assert "arrays" not in reply and "requires secure aggregation" in reply["status"]["declined"]
    assert PrivacyLedger(tmp_path / "state").datasets() == {}
