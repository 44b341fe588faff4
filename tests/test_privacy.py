"""The ledger is the hospital's source of truth for epsilon: it must equal one long-lived accountant."""

import json

import numpy as np
import pytest
import torch
from opacus.accountants import create_accountant

from client.privacy import PrivacyLedger, calibrate_noise, epsilon_of
from client.training import TrainSettings, sample_rate, steps_per_epoch, train_local
from common.errors import FedradError
from common.models import build_model

DELTA = 1e-5


def test_ledger_across_restarts_equals_one_accountant(tmp_path):
    """R rounds, a fresh ledger object each round (a client restart), vs one accountant over all steps."""
    q, steps, rounds = 0.05, 20, 5
    sigma = calibrate_noise(8.0, DELTA, q, rounds * steps)
    single = create_accountant("prv")
    epsilons = []
    for r in range(1, rounds + 1):
        ledger = PrivacyLedger(tmp_path)  # re-read from disk every round
        entry = ledger.entry("dataset-a", name="site-a", delta=DELTA)
        history = entry.history + [(sigma, q, steps)]
        epsilons.append(ledger.record("dataset-a", entry, history, "study-1", r))
        for _ in range(steps):
            single.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilons == sorted(epsilons)  # never decreases
    assert epsilons[-1] == pytest.approx(single.get_epsilon(DELTA), rel=1e-3)
    # Calibrated once for the whole study: the last round lands just under the target.
    assert 7.8 < epsilons[-1] <= 8.0
    entry = PrivacyLedger(tmp_path).entry("dataset-a")
    assert [row["round"] for row in entry.rounds] == [1, 2, 3, 4, 5]


def test_ledgers_are_per_dataset(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    entry = ledger.entry("a", delta=DELTA)
    ledger.record("a", entry, [(1.0, 0.1, 10)], "s", 1)
    assert PrivacyLedger(tmp_path).entry("b").history == []
    assert set(PrivacyLedger(tmp_path).datasets()) == {"a"}


def test_history_may_only_grow(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    entry = ledger.entry("a", delta=DELTA)
    ledger.record("a", entry, [(1.0, 0.1, 10)], "s", 1)
    entry = ledger.entry("a")
    with pytest.raises(ValueError):
        ledger.record("a", entry, [(1.0, 0.1, 5)], "s", 2)


def test_unreadable_ledger_refuses_instead_of_resetting(tmp_path):
    (tmp_path / "privacy-ledger.json").write_text("{not json")
    with pytest.raises(FedradError, match="unreadable"):
        PrivacyLedger(tmp_path)


def _tiny_data(n=50, size=16):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    images = rng.random((n, 1, size, size), dtype=np.float32) * 0.5 + labels[:, None, None, None] * 0.5
    return images.astype(np.float32), labels.astype(np.int64)


def test_dp_training_records_exactly_the_planned_steps():
    images, labels = _tiny_data()
    model = build_model("cnn", 1, 2)
    settings = TrainSettings(epochs=2, batch_size=16, lr=0.1, dp=True, noise_multiplier=1.0, max_grad_norm=1.0)
    out = train_local(model, images, labels, settings, torch.device("cpu"), history=[(2.0, 0.5, 3)])
    planned = 2 * steps_per_epoch(len(labels), 16)
    assert out.steps == planned
    assert out.history == [(2.0, 0.5, 3), (1.0, sample_rate(len(labels), 16), planned)]
    assert epsilon_of(out.history, DELTA) > epsilon_of([(2.0, 0.5, 3)], DELTA)
    # Unwrapped weights go back: plain keys, loadable into a fresh model.
    assert not any(k.startswith("_module") for k in model.state_dict())
    build_model("cnn", 1, 2).load_state_dict(model.state_dict())
    json.dumps(out.history)  # the ledger stores it as JSON


def test_non_dp_training_is_seeded_and_spends_nothing():
    images, labels = _tiny_data()
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("cnn", 1, 2)
        out = train_local(model, images, labels, TrainSettings(1, 16, 0.1, dp=False, seed=3), torch.device("cpu"))
        results.append(torch.cat([p.flatten() for p in model.parameters()]))
        assert out.history == []
    assert torch.equal(results[0], results[1])


def test_fedprox_pulls_weights_towards_the_global_model():
    images, labels = _tiny_data()
    drift = {}
    for mu in (0.0, 5.0):
        torch.manual_seed(0)
        model = build_model("cnn", 1, 2)
        start = [p.detach().clone() for p in model.parameters()]
        train_local(model, images, labels, TrainSettings(2, 16, 0.1, proximal_mu=mu, dp=False), torch.device("cpu"))
        drift[mu] = sum(float((p.detach() - s).norm()) for p, s in zip(model.parameters(), start))
    assert drift[5.0] < drift[0.0]


def test_changed_training_sets_never_under_report(tmp_path):
    """Images added, then removed again: shared images keep every step they went through, once."""
    a, b, c = "a.dcm:10", "b.dcm:12", "c.dcm:9"
    ledger = PrivacyLedger(tmp_path)
    first = ledger.entry("set-1", delta=DELTA, keys=[a, b])
    ledger.record("set-1", first, [(1.0, 0.1, 50)], "s", 1)

    grown = PrivacyLedger(tmp_path).entry("set-2", delta=DELTA, keys=[a, b, c])
    assert grown.history == [(1.0, 0.1, 50)] and grown.overlapping == ["set-1"]
    PrivacyLedger(tmp_path).record("set-2", grown, grown.history + [(2.0, 0.1, 30)], "s", 2)

    back = PrivacyLedger(tmp_path).entry("set-1")  # the original set again
    assert sorted(back.history) == sorted([(1.0, 0.1, 50), (2.0, 0.1, 30)])
    assert PrivacyLedger(tmp_path).entry("set-3", delta=DELTA, keys=["z.dcm:1"]).history == []
    # Only hashed ids are stored, never the file names.
    assert "a.dcm" not in (tmp_path / "privacy-ledger.json").read_text()


def test_only_fedprox_trains_with_the_proximal_term():
    from common.config import StudyConfig

    assert TrainSettings.from_study(StudyConfig(strategy="fedprox"), 1.0, 0).proximal_mu == 0.01
    assert TrainSettings.from_study(StudyConfig(strategy="fedavg"), 1.0, 0).proximal_mu == 0.0
    assert TrainSettings.from_study(StudyConfig(strategy="fedadam"), 1.0, 0).proximal_mu == 0.0


def test_epsilon_of_a_long_ledger_equals_the_accountant_over_the_merged_steps():
    from opacus.accountants import create_accountant

    from client.privacy import compose, epsilon_of

    rounds = [(1.1, 1 / 31, 31)] * 6 + [(2.0, 0.05, 5)] + [(1.1, 1 / 31, 31)] * 2
    assert compose(rounds) == [(1.1, 1 / 31, 248), (2.0, 0.05, 5)]
    reference = create_accountant("prv")
    reference.history = [(2.0, 0.05, 5), (1.1, 1 / 31, 248)]
    assert abs(epsilon_of(rounds, 1e-5) - reference.get_epsilon(delta=1e-5)) < 1e-3


def test_calibration_is_memoised_on_disk_and_checked_by_the_budget(tmp_path, monkeypatch):
    """A second process (here: an emptied memo) reads sigma from the cache folder instead of searching;
    a tampered, too-small stored sigma is caught by the epsilon of the planned history."""
    import client.privacy as privacy

    monkeypatch.setenv("FEDRAD_CACHE", str(tmp_path))
    monkeypatch.setattr(privacy, "_CALIBRATED", {})
    q, steps = 0.04, 300
    sigma = calibrate_noise(3.0, DELTA, q, steps)
    monkeypatch.setattr(privacy, "_CALIBRATED", {})
    monkeypatch.setattr(privacy, "search_noise", lambda *_: pytest.fail("searched again"))
    assert calibrate_noise(3.0, DELTA, q, steps) == sigma
    stored = json.loads((tmp_path / privacy.CALIBRATION_FILE).read_text())
    assert list(stored.values()) == [sigma]
    assert epsilon_of([(sigma, q, steps)], DELTA) == pytest.approx(3.0, abs=0.02)
    assert epsilon_of([(sigma / 2, q, steps)], DELTA) > 3.0  # what the client's budget check compares


@pytest.mark.parametrize("epsilon, q, steps", [(8.0, 64 / 1100, 360), (1.0, 0.05, 200), (8.0, 1.0, 20),
                                                (40.0, 0.05, 100), (0.2, 0.05, 500)])
def test_noise_search_lands_within_tolerance_below_the_target(epsilon, q, steps, monkeypatch):
    """The calibrated sigma spends at most epsilon and at least epsilon - 0.005 (Opacus' contract),
    from a handful of accountant runs (Opacus' bisection on [0, 20] takes ~14)."""
    import client.privacy as privacy

    calls = []
    exact = privacy.epsilon_of
    monkeypatch.setattr(privacy, "epsilon_of", lambda h, d: calls.append(h) or exact(h, d))
    sigma = privacy.search_noise(epsilon, DELTA, q, steps)
    assert epsilon - 0.005 <= exact([(sigma, q, steps)], DELTA) <= epsilon
    assert len(calls) <= 8


def test_a_budget_no_noise_can_meet_is_a_one_line_error():
    from client.privacy import search_noise

    with pytest.raises(FedradError, match="too small a budget"):
        search_noise(1e-4, DELTA, 1.0, 1000)
    with pytest.raises(FedradError, match="cannot calibrate"):
        search_noise(0.0, DELTA, 0.05, 100)


def test_memoised_rdp_curve_is_opacus_own_numbers():
    """client.privacy memoises Opacus' per-step RDP curve: bit-identical to the order-by-order sums."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    epsilon_of([(1.0, 0.05, 1)], DELTA)  # the first accounting installs the memo
    assert rdp.compute_rdp.__module__ == "client.privacy"
    orders = RDPAccountant.DEFAULT_ALPHAS
    for q, sigma, steps in [(1 / 31, 1.1, 93), (0.05, 2.0, 5), (1 / 31, 1.1, 248)]:
        exact = np.array([rdp._compute_rdp(q, sigma, a) for a in orders]) * steps
        assert np.array_equal(rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders), exact)


def test_accounting_runs_numpy_on_one_blas_thread(monkeypatch):
    """OpenBLAS' extra threads busy-wait after each call: the accountant's numpy must not take the training's cores."""
    from opacus.accountants.prv import PRVAccountant
    from threadpoolctl import threadpool_info, threadpool_limits

    seen = []
    exact = PRVAccountant.get_epsilon

    def watched(self, *args, **kwargs):
        seen.extend(blas_threads())
        return exact(self, *args, **kwargs)

    monkeypatch.setattr(PRVAccountant, "get_epsilon", watched)
    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    with threadpool_limits(limits=2, user_api="blas"):  # as numpy starts on a 2-core machine
        before = blas_threads()
        epsilon = epsilon_of([(1.0, 0.05, 100)], DELTA)
        assert blas_threads() == before  # the caller's setting is restored
    assert seen and set(seen) == {1}
    assert epsilon > 0


@pytest.mark.parametrize("sigma, q, steps", [(1.088, 64 / 1984, 1860), (2.82, 1 / 3, 180), (0.8, 0.01, 1000),
                                             (5.0, 0.5, 50), (0.6, 0.02, 300)])
def test_fft_friendly_domain_gives_opacus_epsilon_on_a_fast_fft_size(sigma, q, steps, monkeypatch):
    """epsilon_of widens Opacus' PRV domain to a 2,3,5-smooth size, same mesh: the same epsilon (to 1e-7
    relative, far inside Opacus' eps_error of 0.01), with no large prime factor left for the FFT."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import compose as prv_compose

    sizes = []
    fft = prv_compose.rfft
    monkeypatch.setattr(prv_compose, "rfft", lambda x: sizes.append(len(x)) or fft(x))
    ours = epsilon_of([(sigma, q, steps)], DELTA)
    reference = PRVAccountant()
    reference.history = [(sigma, q, steps)]
    assert ours == pytest.approx(reference.get_epsilon(delta=DELTA), rel=1e-7)
    our_size, opacus_size = sizes
    assert our_size != opacus_size  # Opacus' own size here was another one
    rest = our_size
    for p in (2, 3, 5):
        while rest % p == 0:
            rest //= p
    assert rest == 1 and our_size % 2 == 0


def test_epsilon_at_full_batch_is_quiet_outside_training():
    """A site smaller than one batch (q = 1): 'fedrad privacy' and the start-up budget line use the accountant
    without client.training, and print no PRV RuntimeWarning (it handles the log(0) itself)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from client.privacy import epsilon_of; assert 'client.training' not in sys.modules; "
            "print(epsilon_of([(1.47, 1.0, 3)], 1e-5))")
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) > 0
    assert "RuntimeWarning" not in done.stderr, done.stderr
