"""A hostile coordinator against real hospitals, on Flower's real simulation engine (issue 24).

The coordinator is assumed curious and possibly hostile: these tests give it a ServerApp of their own
whose ``main`` misbehaves (crafted study configs, replayed rounds, crafted weights) and run it with
``flwr.simulation.run_simulation`` on fedrad's in-process backend (fedrad/backend.py, no Ray). The
hospitals are the real ClientApp, ``client.app.app``, unchanged. Flower's simulation gives a virtual
node only a ``partition-id``, which would make it a *simulated* hospital whose policy is the study
itself (client/policy.py ``site_policy``); so each hospital sits behind a thin test ClientApp whose
train and evaluate handlers put a real node's config into the context (``data``, ``site``,
``state-dir`` and, where the hospital has one, ``policy`` or the operator's ``max-epsilon``) and then
call ``client.app.app(message, context)``. Each hospital thus runs exactly as a SuperNode its
operator started, with its own state dir (ledger, audit log, validation split, evaluation answers)
and its own policy. The wrapper also answers a "query" roll call with its site name, so the
coordinator knows which node id is which hospital (test plumbing; the real app never sees it).

Every attack is declined or neutralised, and each test checks the reply the coordinator got, the
hospital's privacy ledger and its audit log. One engine run serves every attack (one hospital per
attack, so no attack spends another's budget); a second engine run is the second study of the
lifetime-budget attack on the same state dir. The last five tests are leaks this suite found and the
client now closes: label counts and paths in a decline reason, unaudited refusals, a renamed study's
fresh evaluation allowance, and the exact training-set size read from the released delta or epsilon.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client.app import app as hospital_app
from client.audit import AuditLog
from client.policy import HospitalPolicy
from client.privacy import LEDGER_FILE, PrivacyLedger, calibrate_noise, epsilon_of
from client.release import SUMMARY_FIELDS, TRAIN_FIELDS, coarse_count
from client.split import SPLIT_FILE
from client.training import sample_rate, steps_per_epoch
from common.config import NodeConfig, StudyConfig
from common.models import build_model
from fedrad.backend import inline_backend

pytestmark = pytest.mark.e2e

# What an honest study of this suite asks; every attack is this with some keys crafted.
STUDY = StudyConfig(model="cnn", image_size=32, batch_size=16, num_rounds=1, local_epochs=1, epsilon=8.0,
                    delta=1e-5, max_grad_norm=1.0, study_id="ok-study")
ASK_TIMEOUT_S = 300.0


def crafted(study_id: str, **keys: Any) -> dict[str, Any]:
    """The flat study config a coordinator sends: the honest one with ``keys`` (dash style) overridden."""
    return {**STUDY.to_flat(), "study-id": study_id, **keys}


def weights(seed: int) -> dict[str, torch.Tensor]:
    """Crafted global weights: a fresh model from ``seed``."""
    torch.manual_seed(seed)
    return build_model(STUDY.model, STUDY.channels, len(STUDY.classes)).state_dict()


# ---------------------------------------------------------------------------------------------------------------
# The hospitals: the real ClientApp as a real node.


@dataclass
class Hospital:
    site: str
    data: Path
    root: Path
    policy: str = ""  # TOML text of its policy file ('' = none)
    policy_in_state: bool = False  # write it as STATE_DIR/policy.toml instead of naming it in the node config
    operator: dict[str, Any] = field(default_factory=dict)  # more node config (the operator's max-epsilon)

    @property
    def state(self) -> Path:
        return self.root / "state"

    def prepare(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        if self.policy:
            (self.state / "policy.toml" if self.policy_in_state else self.root / "policy.toml").write_text(self.policy)

    def node_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"data": str(self.data), "site": self.site, "state-dir": str(self.state),
                                  **self.operator}
        if self.policy and not self.policy_in_state:
            config["policy"] = str(self.root / "policy.toml")
        return config

    def audit(self) -> list[dict[str, Any]]:
        return AuditLog(self.state).records()

    def ledger(self) -> dict[str, Any]:
        """The ledger as plain data (no accounting): {fingerprint: (delta, history, [(study, round)])}."""
        return {fp: (e.delta, [tuple(h) for h in e.history], [(r["study"], r["round"]) for r in e.rounds])
                for fp, e in PrivacyLedger(self.state).datasets().items()}


def hospitals_app(hospitals: list[Hospital]) -> ClientApp:
    """A test ClientApp: the virtual node with partition-id i is ``hospitals[i]``, run as a real node."""
    wrapper = ClientApp()
    partition_of: dict[int, int] = {}

    def as_real_node(context: Context) -> Hospital:
        if context.node_id not in partition_of:  # the engine's context keeps the node config set below
            partition_of[context.node_id] = int(context.node_config["partition-id"])
        hospital = hospitals[partition_of[context.node_id]]
        context.node_config = hospital.node_config()  # what the operator's SuperNode would carry
        assert not NodeConfig.from_flat(context.node_config).simulated
        return hospital

    @wrapper.train()
    def train(msg: Message, context: Context) -> Message:
        as_real_node(context)
        return hospital_app(msg, context)

    @wrapper.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        as_real_node(context)
        return hospital_app(msg, context)

    @wrapper.query()
    def roll_call(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"who": ConfigRecord({"site": as_real_node(context).site})}), reply_to=msg)

    return wrapper


# ---------------------------------------------------------------------------------------------------------------
# The coordinator: a ServerApp that sends what it likes.


@dataclass
class Reply:
    """What came back to the coordinator, as plain data."""

    records: set[str]
    metrics: dict[str, Any]
    status: dict[str, Any]
    arrays: dict[str, torch.Tensor] | None

    @property
    def declined(self) -> str:
        return str(self.status.get("declined", ""))


class Coordinator:
    def __init__(self, grid: Grid, nodes: dict[str, int]) -> None:
        self.grid, self.nodes = grid, nodes

    def ask(self, site: str, kind: str, config: dict[str, Any], server_round: int,
            arrays: dict[str, torch.Tensor]) -> Reply:
        """One crafted message to one hospital, as server/app.py builds them ("arrays", "config" + round)."""
        content = RecordDict({"arrays": ArrayRecord(arrays),
                              "config": ConfigRecord({**config, "server-round": server_round})})
        msg = Message(content, dst_node_id=self.nodes[site], message_type=kind)
        replies = list(self.grid.send_and_receive([msg], timeout=ASK_TIMEOUT_S))
        assert len(replies) == 1, f"{site} did not answer the {kind} message in {ASK_TIMEOUT_S} s"
        reply = replies[0]
        assert not reply.has_error(), f"{site} failed: {reply.error.reason}"
        got = reply.content
        return Reply(set(got.keys()), dict(got["metrics"]), dict(got["status"]),
                     got["arrays"].to_torch_state_dict() if "arrays" in got else None)


def federation(hospitals: list[Hospital], attack: Callable[[Coordinator], None]) -> None:
    """Run ``attack`` as the ServerApp's main against ``hospitals`` on Flower's simulation engine, in process."""
    for hospital in hospitals:
        hospital.prepare()
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        grid.pull_interval = 0.01  # in-memory grid: look for replies often (server/app.py IN_MEMORY_POLL_S)
        deadline = time.time() + 60
        while len(list(grid.get_node_ids())) < len(hospitals):
            assert time.time() < deadline, "the simulated SuperNodes did not register"
            time.sleep(0.01)
        roll = [Message(RecordDict({"ask": ConfigRecord({"who": "site"})}), dst_node_id=node, message_type="query")
                for node in grid.get_node_ids()]
        replies = list(grid.send_and_receive(roll, timeout=60))
        nodes = {r.content["who"]["site"]: r.metadata.src_node_id for r in replies}
        assert sorted(nodes) == sorted(h.site for h in hospitals)
        attack(Coordinator(grid, nodes))

    quiet = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    saved_env = {k: os.environ.get(k) for k in quiet}
    flwr_log = logging.getLogger("flwr")
    saved_level = flwr_log.level
    os.environ.update(quiet)
    flwr_log.setLevel(logging.ERROR)
    try:
        with inline_backend():
            run_simulation(server_app=server, client_app=hospitals_app(hospitals), num_supernodes=len(hospitals))
    finally:
        flwr_log.setLevel(saved_level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------------------------------------------------
# The attacks: one engine run, one hospital per attack.

POLICIES = {
    "allow": '[studies]\nallow = ["ok-study"]\n',
    "evals": "[evaluation]\nmax-per-study = 2\n",
    "rotate": "[evaluation]\nmax-per-study = 1\nmax-total = 1\n",
    "none": '[evaluation]\nrelease = "none"\n',
    "exact-n": "[privacy]\nmax-delta = 0.01\n",  # 1/(10 N) binds here as at any site over 10,000 images
}


@dataclass
class Attacked:
    hospitals: dict[str, Hospital]
    seen: dict[str, Any]


def _attacks(h: dict[str, Hospital], seen: dict[str, Any]) -> Callable[[Coordinator], None]:
    def attack(c: Coordinator) -> None:
        w0, w1, w2 = weights(0), weights(1), weights(2)
        # 1. no DP, at a hospital without a policy file (the defaults require DP).
        seen["no-dp"] = c.ask("no-dp", "train", crafted("no-dp-study", dp=False), 1, w0)
        # 2. a delta that would make DP meaningless.
        seen["delta"] = c.ask("delta", "train", crafted("loose-delta", delta=0.5), 1, w0)
        # 8. no effective clipping and as little noise as a huge epsilon allows; then with an operator's
        # cap of 30, under which the calibrated sigma would be below the policy's floor.
        seen["clip"] = c.ask("clip", "train", crafted("loose-clip", **{"max-grad-norm": 1e6, "epsilon": 1e9}), 1, w0)
        seen["floor"] = c.ask("floor", "train", crafted("tiny-noise", epsilon=1e9), 1, w0)
        # 9. an honest round, to pin every field that leaves.
        seen["fields-train"] = c.ask("fields", "train", crafted("ok-study"), 1, w0)
        seen["fields-evaluate"] = c.ask("fields", "evaluate", crafted("ok-study"), 1, seen["fields-train"].arrays)
        # 4. a study choosing the validation split (fraction and seed): honest study first, then the hostile one.
        split = h["split"].state / SPLIT_FILE
        seen["split-honest-train"] = c.ask("split", "train", crafted("fair-study", epsilon=3.0), 1, w0)
        seen["split-file-before"] = split.read_bytes()
        seen["split-honest-evaluate"] = c.ask("split", "evaluate", crafted("fair-study"), 1, w1)
        hostile = {"val-fraction": 0.8, "seed": 4242}
        seen["split-hostile-evaluate"] = c.ask("split", "evaluate", crafted("probing-study", **hostile), 1, w1)
        seen["split-hostile-train"] = c.ask("split", "train", crafted("probing-study", epsilon=3.0, **hostile), 1, w0)
        seen["split-file-after"] = split.read_bytes()
        # 7. a replayed training round: other weights, then the same ones.
        replayed = crafted("replayed", **{"num-rounds": 2})
        seen["replay-first"] = c.ask("replay", "train", replayed, 1, w0)
        seen["replay-ledger-before"] = h["replay"].ledger()
        seen["replay-other"] = c.ask("replay", "train", replayed, 1, w1)
        seen["replay-same"] = c.ask("replay", "train", replayed, 1, w0)
        seen["replay-ledger-after"] = h["replay"].ledger()
        # 5. a study off the hospital's allow-list; the listed one is answered.
        seen["allow-train"] = c.ask("allow", "train", crafted("evil-study"), 1, w0)
        seen["allow-evaluate"] = c.ask("allow", "evaluate", crafted("evil-study"), 1, w0)
        seen["allow-listed-evaluate"] = c.ask("allow", "evaluate", crafted("ok-study"), 1, w0)
        # 6. probing the validation set with crafted weights (policy: 2 evaluations per study).
        probe = crafted("probe")
        seen["evals"] = [
            ("round 1, weights 0", c.ask("evals", "evaluate", probe, 1, w0)),
            ("round 1, weights 1", c.ask("evals", "evaluate", probe, 1, w1)),
            ("round 1, weights 0 again", c.ask("evals", "evaluate", probe, 1, w0)),
            ("round 2, weights 1", c.ask("evals", "evaluate", probe, 2, w1)),
            ("round 3, weights 2", c.ask("evals", "evaluate", probe, 3, w2)),
        ]
        # 10. a hospital that releases no evaluation metrics (its policy.toml in its state dir).
        seen["none-evaluate"] = c.ask("none", "evaluate", crafted("ok-study"), 1, w0)
        # 3. (first study) epsilon 50 and more rounds than planned.
        seen["greedy-1"] = [c.ask("budget", "train", crafted("greedy-1", epsilon=50.0), r, w0) for r in (1, 2, 3)]
        # Leaks found here (the last tests below): crafted class names, an invalid config, renamed studies.
        seen["labels-train"] = c.ask("labels", "train", crafted("label-probe", **{"class-names": "x,y"}), 1, w0)
        seen["labels-evaluate"] = c.ask("labels", "evaluate", crafted("label-probe", **{"class-names": "x,y"}), 1, w0)
        seen["invalid"] = c.ask("labels", "train", crafted("bad-config", epsilon=-1.0), 1, w0)
        seen["rotate"] = [c.ask("rotate", "evaluate", crafted(f"renamed-{i}"), 1, weights(10 + i)) for i in range(3)]
        seen["exact-n"] = c.ask("exact-n", "train", crafted("ok-study"), 1, w0)
        seen["batch-one"] = c.ask("batch-one", "train", crafted("tiny-batch", **{"batch-size": 1}), 1, w0)

    return attack


@pytest.fixture(scope="module")
def attacked(demo_sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Attacked:
    root = tmp_path_factory.mktemp("adversarial")
    names = ["no-dp", "delta", "clip", "floor", "fields", "split", "replay", "allow", "evals", "none", "budget",
             "labels", "rotate", "exact-n", "batch-one"]
    hospitals = {name: Hospital(name, demo_sites[i % 2], root / name, POLICIES.get(name, ""),
                                policy_in_state=name == "none") for i, name in enumerate(names)}
    hospitals["floor"].operator = {"max-epsilon": 30.0}
    seen: dict[str, Any] = {}
    federation(list(hospitals.values()), _attacks(hospitals, seen))
    return Attacked(hospitals, seen)


@pytest.fixture(scope="module")
def second_study(attacked: Attacked) -> list[Reply]:
    """Attack 3, second study: another engine run (another study id) on the same hospital, again epsilon 50;
    then a third study that makes a new training set of the same images (only one class, another image size),
    hoping for a fresh ledger entry."""
    budget = attacked.hospitals["budget"]
    seen: list[Reply] = []

    def attack(c: Coordinator) -> None:
        seen.extend(c.ask("budget", "train", crafted("greedy-2", epsilon=50.0), r, weights(5)) for r in (1, 2))
        # Only the pneumonia images (23 of 40): a minority outside the classes, so the site takes part
        # (with most labels outside, it refuses the study: common/labels.py).
        subset = crafted("greedy-3", epsilon=50.0, **{"class-names": "zzz,pneumonia", "image-size": 48})
        seen.append(c.ask("budget", "train", subset, 1, weights(5)))

    federation([budget], attack)
    return seen


def declined_reply(reply: Reply, site: str, words: str) -> None:
    """A refusal, and nothing else: no arrays, no metrics but a zero weight, the reason named."""
    assert reply.records == {"metrics", "status"} and reply.arrays is None
    assert reply.metrics == {"num-examples": 0}
    assert set(reply.status) == {"site", "declined"} and reply.status["site"] == site
    assert words in reply.declined, reply.declined


def declines(hospital: Hospital) -> list[dict[str, Any]]:
    return [r for r in hospital.audit() if r["event"] == "declined"]


# ---------------------------------------------------------------------------------------------------------------


def test_adversarial_hospitals_run_as_real_nodes(attacked):
    """The wrapper made real nodes: each hospital drew its own validation split and kept its own audit log
    (a simulated hospital would have taken the study's split and its policy)."""
    for hospital in attacked.hospitals.values():
        if hospital.site == "labels":  # refused before its data loaded (no split drawn), but audited
            assert hospital.audit(), hospital.site
            continue
        assert (hospital.state / SPLIT_FILE).is_file(), hospital.site
        assert hospital.audit(), hospital.site


def test_adversarial_study_without_dp_is_declined(attacked):
    hospital, reply = attacked.hospitals["no-dp"], attacked.seen["no-dp"]
    declined_reply(reply, "no-dp", "requires DP")
    assert hospital.ledger() == {} and not (hospital.state / "sent").exists()  # nothing charged, nothing kept
    assert [(r["event"], r["study"], r["round"]) for r in hospital.audit()] == [("declined", "no-dp-study", 1)]
    assert "requires DP" in hospital.audit()[0]["reason"]


def test_adversarial_loose_delta_is_tightened(attacked):
    hospital, reply = attacked.hospitals["delta"], attacked.seen["delta"]
    assert reply.arrays is not None and 0 < reply.metrics["epsilon"] <= 8.0
    assert reply.metrics["delta"] <= 1e-5
    assert "delta 0.5 -> 1e-05" in reply.status["adjusted"]
    [(delta, _, rounds)] = hospital.ledger().values()
    assert delta <= 1e-5 and rounds == [("loose-delta", 1)]
    [sent] = [r for r in hospital.audit() if r["event"] == "sent model update"]
    assert "delta 0.5 -> 1e-05" in sent["adjusted"]


def test_adversarial_epsilon_50_never_exceeds_the_lifetime_cap_across_studies(attacked, second_study):
    """Two studies each ask epsilon 50 on one dataset, for more rounds than they plan: the dataset's lifetime
    epsilon stays <= 8 (the default cap), and every round past it is declined, in both studies. A third
    study's new training set of the same images (one class, another size) inherits their spend."""
    hospital = attacked.hospitals["budget"]
    first, over_1, over_2 = attacked.seen["greedy-1"]
    assert first.arrays is not None and 0 < first.metrics["epsilon"] <= 8.0
    assert "epsilon 50 -> 8 (the hospital's lifetime cap)" in first.status["adjusted"]
    for reply in (over_1, over_2, *second_study):
        declined_reply(reply, "budget", "over the site's budget 8.00")

    [entry] = PrivacyLedger(hospital.state).datasets().values()
    assert entry.epsilon() <= 8.0 + 1e-9 and all(r["epsilon"] <= 8.0 + 1e-9 for r in entry.rounds)
    assert [(r["study"], r["round"]) for r in entry.rounds] == [("greedy-1", 1)]
    refused = [(r["study"], r["round"]) for r in declines(hospital) if "over the site's budget" in r["reason"]]
    assert refused == [("greedy-1", 2), ("greedy-1", 3), ("greedy-2", 1), ("greedy-2", 2), ("greedy-3", 1)]

    shown = subprocess.run([sys.executable, "-m", "fedrad", "privacy", "--state-dir", str(hospital.state)],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert shown.returncode == 0, shown.stderr
    [row] = [line.split() for line in shown.stdout.splitlines() if str(hospital.state) in line]
    assert row[2] == "budget" and 0 < float(row[3]) <= 8.0 and row[-3:] == ["greedy-1", "round", "1"]


def test_adversarial_study_cannot_choose_the_validation_split(attacked):
    """val-fraction 0.8 and another seed: the same validation images (same split file, same rounded size,
    the same metrics for the same model) and the same training set (one ledger dataset)."""
    seen, hospital = attacked.seen, attacked.hospitals["split"]
    assert seen["split-file-after"] == seen["split-file-before"]
    honest, hostile = seen["split-honest-evaluate"], seen["split-hostile-evaluate"]
    assert "declined" not in honest.status and "declined" not in hostile.status
    assert hostile.metrics["num-examples"] == honest.metrics["num-examples"]
    for key in ("auc", "accuracy", "sensitivity", "specificity"):
        assert hostile.metrics[key] == honest.metrics[key], key
    assert json.loads(seen["split-file-after"])["fraction"] == 0.15  # the policy's, never the study's 0.8

    trained = [seen["split-honest-train"], seen["split-hostile-train"]]
    assert all(r.arrays is not None for r in trained)
    assert trained[0].metrics["num-examples"] == trained[1].metrics["num-examples"]
    [(_, _, rounds)] = hospital.ledger().values()  # one training set, whatever the study asked
    assert rounds == [("fair-study", 1), ("probing-study", 1)]
    sent = [r["n_train"] for r in hospital.audit() if r["event"] == "sent model update"]
    assert len(sent) == 2 and sent[0] == sent[1]


def test_adversarial_study_off_the_allow_list_is_declined(attacked):
    hospital, seen = attacked.hospitals["allow"], attacked.seen
    declined_reply(seen["allow-train"], "allow", "allow-list")
    declined_reply(seen["allow-evaluate"], "allow", "allow-list")
    assert "declined" not in seen["allow-listed-evaluate"].status  # the listed study is answered
    assert hospital.ledger() == {}
    assert [(r["study"], "allow-list" in r["reason"]) for r in declines(hospital)] == [("evil-study", True)] * 2
    events = [(r["event"], r["study"]) for r in hospital.audit()]
    assert events == [("declined", "evil-study"), ("declined", "evil-study"), ("sent evaluation metrics", "ok-study")]


def test_adversarial_repeated_evaluation_of_crafted_weights(attacked):
    """One evaluation per round and per model, at most max-per-study (2 here) per study."""
    hospital = attacked.hospitals["evals"]
    answers = dict(attacked.seen["evals"])
    first = answers["round 1, weights 0"]
    assert "declined" not in first.status and "auc" in first.metrics
    declined_reply(answers["round 1, weights 1"], "evals", "already evaluated")
    assert answers["round 1, weights 0 again"].metrics == first.metrics  # the stored answer, not a new look
    second = answers["round 2, weights 1"]
    assert "declined" not in second.status
    declined_reply(answers["round 3, weights 2"], "evals", "has had its 2 evaluations")
    events = [r["event"] for r in hospital.audit()]
    assert events == ["sent evaluation metrics", "declined", "sent evaluation metrics again (stored answer)",
                      "sent evaluation metrics", "declined"]
    reasons = [r["reason"] for r in declines(hospital)]
    assert "already evaluated on other weights" in reasons[0] and "has had its 2 evaluations" in reasons[1]


def test_adversarial_replayed_training_round(attacked):
    """Round 1 asked again: from other weights declined, from the same weights the same update re-sent;
    the ledger charges round 1 once."""
    hospital, seen = attacked.hospitals["replay"], attacked.seen
    first = seen["replay-first"]
    declined_reply(seen["replay-other"], "replay", "already trained and charged")
    again = seen["replay-same"]
    assert again.metrics == first.metrics and again.arrays is not None
    assert all(torch.equal(again.arrays[k], v) for k, v in first.arrays.items())
    assert seen["replay-ledger-after"] == seen["replay-ledger-before"] == hospital.ledger()
    [(_, _, rounds)] = hospital.ledger().values()
    assert rounds == [("replayed", 1)]
    events = [(r["event"], r["round"]) for r in hospital.audit()]
    assert events == [("sent model update", 1), ("declined", 1), ("re-sent model update", 1)]
    assert "already trained and charged" in declines(hospital)[0]["reason"]


def test_adversarial_clipping_norm_and_noise_floor(attacked):
    """max-grad-norm 1e6 is clipped to 10; epsilon 1e9 is cut to the cap, and where the cap would allow a
    sigma under the floor (an operator's max-epsilon 30) sigma is the policy's 0.5."""
    clip, floor = attacked.hospitals["clip"], attacked.hospitals["floor"]
    reply = attacked.seen["clip"]
    assert reply.arrays is not None and reply.metrics["epsilon"] <= 8.0
    assert "max-grad-norm 1e+06 -> 10" in reply.status["adjusted"]
    [sent] = [r for r in clip.audit() if r["event"] == "sent model update"]
    assert "max-grad-norm 1e+06 -> 10" in sent["adjusted"]
    assert "epsilon 1e+09 -> 8 (the hospital's lifetime cap)" in sent["adjusted"]
    assert sent["sigma"] >= 0.5

    reply = attacked.seen["floor"]
    [sent] = [r for r in floor.audit() if r["event"] == "sent model update"]
    assert reply.arrays is not None and "epsilon 1e+09 -> 30" in reply.status["adjusted"]
    n, steps = sent["n_train"], steps_per_epoch(sent["n_train"], STUDY.batch_size)
    assert calibrate_noise(30.0, 1e-5, sample_rate(n, STUDY.batch_size), steps) < 0.5  # what the cap alone allows
    assert sent["sigma"] == 0.5  # ... and what the hospital's floor made it
    [entry] = PrivacyLedger(floor.state).datasets().values()
    assert entry.history == [(0.5, sample_rate(n, STUDY.batch_size), steps)]
    assert 0 < reply.metrics["epsilon"] <= 30.0


def test_adversarial_only_the_listed_fields_leave(attacked):
    """Exactly client/release.py's fields at the default policy, in both replies, through the engine."""
    train, evaluation = attacked.seen["fields-train"], attacked.seen["fields-evaluate"]
    assert train.records == {"arrays", "metrics", "status"} and train.status == {"site": "fields"}
    assert set(train.metrics) == set(TRAIN_FIELDS) == {"num-examples", "epsilon", "delta"}
    assert train.metrics["num-examples"] % 10 == 0 and train.metrics["delta"] == 1e-5
    model = build_model(STUDY.model, STUDY.channels, len(STUDY.classes)).state_dict()
    assert {k: v.shape for k, v in train.arrays.items()} == {k: v.shape for k, v in model.items()}

    summary = ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")
    assert evaluation.records == {"metrics", "status"} and evaluation.status == {"site": "fields"}
    assert set(evaluation.metrics) == set(SUMMARY_FIELDS) == {"num-examples", "epsilon", "delta", *summary,
                                                               *(f"{m}-ci95" for m in summary)}
    assert evaluation.metrics["num-examples"] % 10 == 0
    assert evaluation.metrics["epsilon"] == train.metrics["epsilon"]
    sent = [r for r in attacked.hospitals["fields"].audit() if r["event"] == "sent evaluation metrics"]
    assert sent and sent[0]["keys"] == sorted(evaluation.metrics)


def test_adversarial_release_none_declines_evaluation(attacked):
    hospital = attacked.hospitals["none"]
    declined_reply(attacked.seen["none-evaluate"], "none", "releases no evaluation metrics")
    assert [r["event"] for r in hospital.audit()] == ["declined"]
    assert not (hospital.state / "evaluations.json").exists() and not (hospital.state / LEDGER_FILE).exists()


# ---------------------------------------------------------------------------------------------------------------
# Leaks this suite found, each fixed in client/ (issue 24's session): the tests state what holds now.


def test_adversarial_crafted_class_names_reveal_no_label_counts(attacked):
    for reply in (attacked.seen["labels-train"], attacked.seen["labels-evaluate"]):
        assert reply.arrays is None and reply.metrics == {"num-examples": 0}
        assert "unknown label" not in reply.declined and " x " not in reply.declined, reply.declined
        assert str(attacked.hospitals["labels"].data) not in reply.declined, reply.declined


def test_adversarial_refusals_of_crafted_configs_are_audited(attacked):
    declined_reply(attacked.seen["invalid"], "labels", "epsilon must be > 0")
    studies = [r["study"] for r in declines(attacked.hospitals["labels"])]
    assert studies.count("label-probe") == 2 and "bad-config" in studies


def test_adversarial_renaming_the_study_buys_no_more_evaluations(attacked):
    answered = [r for r in attacked.seen["rotate"] if "declined" not in r.status]
    assert len(answered) <= 1, f"{len(answered)} crafted models evaluated under max-per-study = 1"


def test_adversarial_released_delta_reveals_no_exact_size(attacked):
    reply = attacked.seen["exact-n"]
    [sent] = [r for r in attacked.hospitals["exact-n"].audit() if r["event"] == "sent model update"]
    n = sent["n_train"]
    assert reply.arrays is not None and reply.metrics["num-examples"] == coarse_count(n)
    # The released delta is the same for every size in N's power-of-two bucket: it cannot single N out.
    top = 1 << (n - 1).bit_length()
    policy = HospitalPolicy(max_delta=0.01)
    assert {policy.delta_for(m) for m in range(top // 2 + 1, top + 1)} == {reply.metrics["delta"]}
    assert reply.metrics["delta"] <= 1 / (10 * n)


def test_adversarial_a_crafted_batch_size_reveals_no_exact_size(attacked):
    reply = attacked.seen["batch-one"]
    [sent] = [r for r in attacked.hospitals["batch-one"].audit() if r["event"] == "sent model update"]
    n = sent["n_train"]
    assert reply.arrays is not None and reply.metrics["num-examples"] == coarse_count(n)

    def reported(m: int) -> float:  # what a site with m training images replies (client/app.py _train_round)
        sigma = max(calibrate_noise(8.0, 1e-5, 1 / m, m), 0.5)
        return epsilon_of([(sigma, 1 / m, m)], 1e-5)

    matches = [m for m in (n - 1, n, n + 1) if reported(m) == reply.metrics["epsilon"]]
    assert matches != [n], f"epsilon {reply.metrics['epsilon']!r} singles out N = {n}"
