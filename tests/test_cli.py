"""Bad input gives a one-line error and a non-zero exit, never a traceback."""

import subprocess
import sys

import pytest


def fedrad(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrad", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["simulate", "--data", "/nonexistent/data", "--out", "{tmp}/run"], "data path not found"),
        (["simulate", "--data", "{npz}", "--partition", "skewed", "--out", "{tmp}/run"], "partition 'skewed'"),
        (["simulate", "--data", "{npz}", "--sites", "50", "--out", "{tmp}/run"], "too few for 50 sites"),
        (["simulate", "--data", "{npz}", "--augment", "nonsense", "--out", "{tmp}/run"], "augment preset 'nonsense'"),
        (["simulate", "--resume", "{tmp}/never-ran"], "cannot resume"),
        (["evaluate", "--model", "{tmp}/model.pt", "--data", "{npz}"], "model not found"),
        (["evaluate", "--model", "{npz}", "--data", "{npz}"], "not a fedrad model.pt"),
        (["privacy", "--state-dir", "{tmp}"], "no privacy ledger"),
        (["simulate", "--data", "{npz}", "--out", "{study}"], "already holds a study"),
    ],
)
def test_error_paths(args, message, tmp_path, small_npz):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "config.json").write_text("{}")
    args = [a.format(tmp=tmp_path, npz=small_npz, study=tmp_path / "study") for a in args]
    result = fedrad(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedrad: error:") and message in lines[0], result.stderr
