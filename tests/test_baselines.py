"""`fedrad simulate --mode local|pooled`: the same run directory, plus a cross-site table."""

import json
import subprocess
import sys

import pytest
import torch


@pytest.mark.parametrize("mode, models", [("local", ["hospital-1", "hospital-2"]), ("pooled", ["pooled"])])
def test_baseline_modes(demo_sites, tmp_path, mode, models):
    out = tmp_path / mode
    result = subprocess.run([sys.executable, "-m", "fedrad", "simulate", "--data", str(demo_sites[0].parent),
                             "--mode", mode, "--rounds", "2", "--image-size", "32", "--batch-size", "16",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / "config.json").read_text())["mode"] == mode
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert sorted(s["site"] for s in rows[-1]["sites"]) == ["hospital-1", "hospital-2"]
    for site in rows[-1]["sites"]:
        assert 7.0 < site["epsilon"] <= 8.0 and site["n_val"] > 0
    table = json.loads((out / "cross_site.json").read_text())
    assert table["models"] == models and table["sites"] == ["hospital-1", "hospital-2"]
    assert len(table["metrics"]["auc"]) == len(models) and all(len(r) == 2 for r in table["metrics"]["auc"])
    files = [out / "model.pt"] if mode == "pooled" else [out / "models" / f"{m}.pt" for m in models]
    for path in files:
        payload = torch.load(path, weights_only=True)
        assert payload["mode"] == mode and payload["input_size"] == 32


def test_tensorboard_scalars(demo_sites, tmp_path):
    pytest.importorskip("tensorboard", reason="installed with fedrad[dev] / fedrad[tensorboard]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = subprocess.run([sys.executable, "-m", "fedrad", "simulate", "--data", str(demo_sites[0].parent),
                             "--mode", "pooled", "--rounds", "2", "--image-size", "32", "--out", str(tmp_path / "run"),
                             "--tensorboard", str(tmp_path / "tb")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"aggregate/auc", "aggregate/epsilon", "sites/hospital-1/auc"} <= set(tags)
    assert [e.step for e in events.Scalars("aggregate/auc")] == [1, 2]


@pytest.mark.parametrize("mode", ["local", "pooled"])
def test_baseline_models_record_what_they_were_trained_on(demo_sites, tmp_path, mode):
    """As a federated model.pt does (server/app.py released_inputs): the input profile of the validation images
    the model answers for, and the DICOM modality and photometric interpretation of its training images."""
    from common.config import StudyConfig
    from fedrad.baselines import run_baseline

    study = StudyConfig(data=str(demo_sites[0].parent), out=str(tmp_path / mode), mode=mode, num_rounds=1,
                        image_size=32, batch_size=16, dp=False, val_fraction=0.5)
    run_dir = run_baseline(study, 2, mode)
    paths = {"pooled": run_dir.model_path} if mode == "pooled" else {
        site: run_dir.path / "models" / f"{site}.pt" for site in ("hospital-1", "hospital-2")}
    photometric = {"hospital-1": ["MONOCHROME2"], "hospital-2": ["MONOCHROME1"],
                   "pooled": ["MONOCHROME1", "MONOCHROME2"]}  # demo hospital 2 stores MONOCHROME1
    for name, path in paths.items():
        payload = torch.load(path, weights_only=True)
        assert payload["acquisition"]["modalities"] == ["DX"] and payload["acquisition"]["photometrics"] == \
            photometric[name]
        assert payload["input_profile"]["sites"] == (2 if name == "pooled" else 1) and payload["ordinal"] is False
