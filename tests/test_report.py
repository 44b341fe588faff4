"""`fedrad report`: one self-contained HTML page, rendered for real in headless Chromium when available."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from common.metrics import classification_metrics, curve_data, operating_point


def fake_run(path, mode, rounds=3, sites=("hospital-1", "hospital-2")):
    """A run directory as fedrad writes it, with site summaries from real metric code."""
    rng = np.random.default_rng(len(mode))
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"mode": mode, "strategy": "fedavg", "model": "cnn",
                                                  "image-size": 64, "epsilon": 8.0, "delta": 1e-5, "dp": True}))
    lines = []
    for r in range(1, rounds + 1):
        rows = []
        for i, site in enumerate(sites):
            labels = rng.integers(0, 2, 80)
            p1 = np.clip(labels * (0.2 + 0.1 * r) + rng.random(80) * 0.6, 0, 1)
            probs = np.stack([1 - p1, p1], axis=1)
            curves = {k.replace("-", "_"): v for k, v in curve_data(probs, labels).items()}
            rows.append({"site": site, "n_train": 300 + i, "n_val": 80, "loss": 0.5,
                         **classification_metrics(probs, labels), "epsilon": 8.0 * r / rounds, "delta": 1e-5,
                         "trained": True, "n_pos_train": 150, "n_pos_val": int(labels.sum()), "curves": curves})
        agg = {k: float(np.mean([row[k] for row in rows])) for k in ("auc", "accuracy", "sensitivity", "specificity")}
        agg["operating_point"] = operating_point(rows)
        lines.append(json.dumps({"round": r, "sites": rows, "aggregate": {**agg, "max_epsilon": 8.0 * r / rounds}}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "cross_site.json").write_text(json.dumps({"mode": mode, "models": ["global"], "sites": list(sites),
                                                      "metrics": {"auc": [[0.9, 0.8]]}}))
    return path


def render(html_path, png_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={png_path.parent / 'profile'}", "--window-size=1200,1600",
                    f"--screenshot={png_path}", html_path.as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(png_path).convert("L"), dtype=np.float32)
    return pixels


@pytest.mark.parametrize("modes", [["federated"], ["federated", "local", "pooled"]])
def test_report_renders(tmp_path, modes):
    runs = [fake_run(tmp_path / m, m) for m in modes]
    out = tmp_path / "report.html"
    result = subprocess.run([sys.executable, "-m", "fedrad", "report", *map(str, runs), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained, opens offline
    for section in ("Validation AUC per round", "Privacy spent per site", "ROC, final model", "Calibration",
                    "Confusion", "Operating point", "serves worse", "Cross-site AUC"):
        assert section in page
    assert ("<h2>Comparison</h2>" in page) == (len(modes) > 1)
    pixels = render(out, tmp_path / "shot.png")
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text and plots, not a blank page


def test_report_on_a_folder_that_is_not_a_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fedrad", "report", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "not a fedrad run directory" in result.stderr


def test_report_skips_a_torn_metrics_line_and_ignores_a_truncated_checkpoint(tmp_path):
    """A process killed while it wrote (an older fedrad appended to metrics.jsonl) leaves half a line; the
    report shows the complete rounds and says which line it skipped. Checkpoints are not read."""
    run = fake_run(tmp_path / "run", "federated")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 4, "sites": [{"site": "hosp')
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "round-003.pt").write_bytes(b"PK\x03\x04 truncated")
    out = tmp_path / "report.html"
    result = subprocess.run([sys.executable, "-m", "fedrad", "report", str(run), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [
        f"fedrad: warning: {run}: metrics.jsonl line 4 is not a complete round (torn write?): skipped"]
    assert "3 rounds" in out.read_text()


def test_report_draws_crowded_scores_faithfully_and_says_when_calibration_is_degenerate(tmp_path):
    """Every score in [0.95, 1] at AUC ~0.95 (a DP model): the pooled ROC has many points and an area near the
    AUC, the operating point sits inside the scores (not at a grid's top), and calibration is called degenerate
    in words and in the aggregate instead of an empty plot."""
    from server.app import round_row
    from server.strategy import RoundRecord

    rng = np.random.default_rng(0)
    record = RoundRecord()
    for site in ("hospital-1", "hospital-2"):
        labels = rng.integers(0, 2, 300)
        p1 = 1 / (1 + np.exp(-(4.5 + 2.3 * labels + rng.normal(0, 0.7, 300))))
        scores = {k: v for k, v in curve_data(np.stack([1 - p1, p1], 1), labels).items()}
        record.evaluate[site] = {"num-examples": 300.0, "n-pos-val": float(labels.sum()), "epsilon": 8.0,
                                 **classification_metrics(np.stack([1 - p1, p1], 1), labels), **scores}
    row = round_row(1, record, {})
    agg = row["aggregate"]
    assert agg["calibration"]["degenerate"] and len(agg["roc"]["tpr"]) >= 60
    assert abs(agg["roc"]["auc"] - agg["auc"]) < 0.02 and agg["auc"] > 0.9
    assert 0.95 < agg["operating_point"]["threshold"] < agg["roc"]["threshold"][-1]
    assert agg["operating_point"]["specificity"] > 0.7
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"mode": "federated", "strategy": "fedavg", "model": "cnn"}))
    (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    result = subprocess.run([sys.executable, "-m", "fedrad", "report", str(run), "--out", str(tmp_path / "r.html")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "r.html").read_text()
    assert "Calibration, final model: degenerate" in page and "ROC, final model" in page
