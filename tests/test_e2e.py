"""End to end through Flower's real simulation engine: 2 hospitals, tiny DICOM data."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.e2e

TINY = ["--image-size", "32", "--batch-size", "16", "--epsilon", "8", "--seed", "3"]


def simulate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrad", "simulate", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_two_sites_two_rounds(demo_sites, tmp_path):
    out = tmp_path / "run"
    result = simulate("--data", str(demo_sites[0].parent), "--rounds", "2", "--out", str(out), *TINY)
    assert result.returncode == 0, result.stdout + result.stderr
    progress = [line for line in result.stdout.splitlines() if line.startswith("round ")]
    assert len(progress) == 2 and "val AUC" in progress[0] and "max site epsilon" in progress[0]

    config = json.loads((out / "config.json").read_text())
    assert config["num-rounds"] == 2 and config["dp"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row, line in zip(rows, progress):
        assert row["seconds"] > 0 and f"| {row['seconds']:6.1f} s |" in line  # the round's time, as printed
        assert sorted(s["site"] for s in row["sites"]) == ["hospital-1", "hospital-2"]
        for site in row["sites"]:
            assert site["n_train"] > 0 and site["n_val"] > 0 and site["delta"] == 1e-5
        assert set(row["aggregate"]) >= {"loss", "auc", "accuracy", "sensitivity", "specificity", "epsilon"}
    for name in ("hospital-1", "hospital-2"):
        eps = [next(s["epsilon"] for s in r["sites"] if s["site"] == name) for r in rows]
        assert 0 < eps[0] < eps[1] <= 8.0
    assert (out / "checkpoints" / "round-001.pt").exists() and (out / "checkpoints" / "round-002.pt").exists()
    cross = json.loads((out / "cross_site.json").read_text())
    assert cross["models"] == ["global"] and cross["sites"] == ["hospital-1", "hospital-2"]

    model = torch.load(out / "model.pt", weights_only=True)
    assert model["architecture"] == "scatternet" and model["input_size"] == 32 and model["channels"] == 1
    assert model["class_names"] == ["normal", "pneumonia"] and "pad" in model["preprocessing"]
    assert set(model["privacy"]) == {"hospital-1", "hospital-2"}
    assert all(0 < p["epsilon"] <= 8.0 and p["delta"] == 1e-5 for p in model["privacy"].values())

    evaluated = subprocess.run([sys.executable, "-m", "fedrad", "evaluate", "--model", str(out / "model.pt"),
                                "--data", str(demo_sites[0]), "--json", str(tmp_path / "eval.json")],
                               capture_output=True, text=True, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["n"] == 40 and 0 <= scores["auc"] <= 1 and "balanced_accuracy" in scores
    local = scores["local_operating_point"]  # the threshold this hospital's own images favour, and how to use it
    assert local["balanced_accuracy"] >= scores["balanced_accuracy"] - 1e-9
    assert f"fedrad predict --threshold {local['threshold']:.8g}" in evaluated.stdout

    report = subprocess.run([sys.executable, "-m", "fedrad", "report", str(out)], capture_output=True, text=True,
                            timeout=60)
    assert report.returncode == 0 and "ROC, final model" in (out / "report.html").read_text()

    ledger = subprocess.run([sys.executable, "-m", "fedrad", "privacy", "--state-dir", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert ledger.returncode == 0 and len(ledger.stdout.strip().splitlines()) == 3  # header + 2 sites


def test_resume_after_the_server_is_killed(demo_sites, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedrad", "simulate", "--data", str(demo_sites[0].parent), "--rounds", "3",
           "--out", str(out), *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    try:
        for line in proc.stdout:
            if line.startswith("round 1/3") or time.time() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole study: server thread and Ray's hospitals
        proc.wait(timeout=30)
    assert (out / "checkpoints" / "round-001.pt").exists()
    assert not (out / "model.pt").exists()

    result = simulate("--resume", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert (out / "model.pt").exists()
    # The ledgers survived the kill: no site ever went over its budget.
    for row in rows:
        assert all(s["epsilon"] <= 8.0 + 1e-6 for s in row["sites"])
