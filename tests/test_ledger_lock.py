"""Issue 24 item 6: the privacy ledger is safe when several processes share one state dir.

Two studies at one hospital once each recorded 300 steps on the same training set and the ledger kept
only one study's (epsilon 12.41 reported, 18.45 spent). Now ``record`` merges under a file lock, and a
round's budget check, training and record hold that lock (``PrivacyLedger.locked``). The worker
processes count steps instead of running the PRV accountant (the tests are about the lock, not the
maths, and stay fast); the final ledger is then checked with the real accountant.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from client import privacy
from client.privacy import LedgerLockError, PrivacyLedger, compose, epsilon_of

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
FP = "dataset-a"

# argv: state dir, go file, study id, sigma, rounds, budget (0: none). Records ``rounds`` rounds of 10
# steps at (sigma, q = 0.1) on FP: without a budget, each round reads its entry, "trains" and records
# (record alone takes the lock); with one, checks it, "trains" and records under the lock, as client/app.py
# does. Prints one line per round: the epsilon recorded, or "declined".
WORKER = """
import sys, time
from pathlib import Path
from client import privacy
privacy.epsilon_of = lambda history, delta: float(sum(n for _, _, n in history))  # steps, not PRV
state, go, study, sigma, rounds, budget = sys.argv[1:]
while not Path(go).exists():
    time.sleep(0.005)
for r in range(1, int(rounds) + 1):
    ledger = privacy.PrivacyLedger(state)
    if float(budget) == 0:
        entry = ledger.entry("dataset-a", delta=1e-5)
        time.sleep(0.01)  # training, without the lock: the other process records meanwhile
        print(ledger.record("dataset-a", entry, entry.history + [(float(sigma), 0.1, 10)], study, r), flush=True)
        continue
    with ledger.locked(timeout=30):
        entry = ledger.entry("dataset-a", delta=1e-5)
        planned = entry.history + [(float(sigma), 0.1, 10)]
        if privacy.epsilon_of(planned, 1e-5) > float(budget):
            print("declined", flush=True)
            continue
        time.sleep(0.3)  # training, while the other process waits for the lock
        print(ledger.record("dataset-a", entry, planned, study, r), flush=True)
"""


def _run_two(state: Path, tmp_path: Path, rounds: int, budget: float) -> list[list[str]]:
    """Both workers started, released together (after their imports), waited for; their output lines."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(state), str(go), study, sigma, str(rounds),
                               str(budget)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for study, sigma in (("study-1", "1.0"), ("study-2", "2.0"))]
    time.sleep(0.5)
    go.touch()
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out.split())
    return outputs


def _steps_charged(state: Path) -> dict[float, int]:
    return {sigma: n for sigma, _, n in compose(PrivacyLedger(state).entry(FP).history)}


def test_two_processes_recording_at_once_lose_no_step(tmp_path):
    rounds = 40
    outputs = _run_two(tmp_path / "state", tmp_path, rounds, budget=0)
    assert [len(o) for o in outputs] == [rounds, rounds]
    assert _steps_charged(tmp_path / "state") == {1.0: 10 * rounds, 2.0: 10 * rounds}
    entry = PrivacyLedger(tmp_path / "state").entry(FP)
    assert sorted((r["study"], r["round"]) for r in entry.rounds) == sorted(
        (s, r) for s in ("study-1", "study-2") for r in range(1, rounds + 1))
    # Each record's epsilon (here: steps) counted every step stored before it, the other process's too.
    assert sorted(float(x) for o in outputs for x in o) == [10.0 * k for k in range(1, 2 * rounds + 1)]
    union = [(1.0, 0.1, 10 * rounds), (2.0, 0.1, 10 * rounds)]
    assert entry.epsilon() == pytest.approx(epsilon_of(union, DELTA), rel=1e-9)


def test_two_processes_cannot_both_spend_a_budget_for_one(tmp_path):
    """A budget of 15 steps: each round plans 10, so one round fits and two do not. Each process checks
    the budget, trains (0.3 s) and records under the lock; the second sees the first's steps and declines."""
    outputs = _run_two(tmp_path / "state", tmp_path, rounds=1, budget=15)
    assert sorted(o[0] for o in outputs) == ["10.0", "declined"]
    assert sum(_steps_charged(tmp_path / "state").values()) == 10


def test_record_merges_what_another_writer_stored_since(tmp_path, monkeypatch):
    """Two ledger objects read the same past; both record: the file keeps both, and the later epsilon
    counts the earlier steps."""
    monkeypatch.setattr(privacy, "epsilon_of", lambda history, delta: float(sum(n for _, _, n in history)))
    a, b = PrivacyLedger(tmp_path), PrivacyLedger(tmp_path)
    seen_a, seen_b = a.entry(FP, delta=DELTA), b.entry(FP, delta=DELTA)
    assert a.record(FP, seen_a, [(1.0, 0.1, 10)], "s1", 1) == 10
    assert b.record(FP, seen_b, [(2.0, 0.1, 20)], "s2", 1, known=([(2.0, 0.1, 20)], 20.0)) == 30  # stale known
    entry = PrivacyLedger(tmp_path).entry(FP)
    assert entry.history == [(1.0, 0.1, 10), (2.0, 0.1, 20)] and [r["study"] for r in entry.rounds] == ["s1", "s2"]


def test_waiting_for_the_lock_is_bounded(tmp_path):
    holder = PrivacyLedger(tmp_path)
    with holder.locked():
        began = time.monotonic()
        with pytest.raises(LedgerLockError, match=r"^the privacy ledger in .* is locked by another process for "
                                                  r"over 0\.2 s$"):
            with PrivacyLedger(tmp_path).locked(timeout=0.2):
                pass
        assert 0.2 <= time.monotonic() - began < 2
        with holder.locked():  # re-entrant for its holder
            pass
    with PrivacyLedger(tmp_path).locked(timeout=0):  # released at the end
        pass


def test_the_ledger_is_read_again_under_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(privacy, "epsilon_of", lambda history, delta: float(sum(n for _, _, n in history)))
    early = PrivacyLedger(tmp_path)  # read before anything was stored
    other = PrivacyLedger(tmp_path)
    other.record(FP, other.entry(FP, delta=DELTA), [(1.0, 0.1, 10)], "s1", 1)
    assert early.entry(FP).history == []
    with early.locked():
        assert early.entry(FP).history == [(1.0, 0.1, 10)]
