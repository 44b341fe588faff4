"""benchmarks/accuracy.py: four DICOM hospitals from the shared chest X-rays, and its table (--quick)."""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _benchmarks import load_benchmark
from conftest import shared
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accuracy.py"


def bench():
    return load_benchmark("accuracy")


def test_reuse_runs_a_row_again_when_its_finished_study_differs(tmp_path):
    """--reuse: a finished row counts only if its config.json is the study the row asks for now."""
    from common.config import StudyConfig

    acc = bench()
    row = next(r for r in acc.all_rows([1, 8], 2) if r.id == "dp1")
    args = argparse.Namespace(delta=1e-5, rounds=0, image_size=0)
    out, log = tmp_path / "dp1", tmp_path / "dp1.log"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    log.write_text("round 20/20 | ...\ndone in 325 s: somewhere\n")
    wanted = acc.row_study(row, "fedavg", StudyConfig(), args)
    (out / "config.json").write_text(json.dumps({**StudyConfig(dp=True, epsilon=1.0).to_flat(), **wanted}))
    assert acc.reused_row(out, log, wanted) == (0, 325.0)
    assert acc.reused_row(out, log, acc.row_study(row, "fedprox", StudyConfig(), args)) == (None, 0.0)
    fewer_rounds = argparse.Namespace(delta=1e-5, rounds=5, image_size=0)
    assert acc.reused_row(out, log, acc.row_study(row, "fedavg", StudyConfig(), fewer_rounds)) == (None, 0.0)
    log.write_text("round 3/20 | ...\n")  # cut off mid-study
    assert acc.reused_row(out, log, wanted) == (None, 0.0)


def test_patient_ids_and_row_selection():
    acc = bench()
    assert acc.patient_of("train/PNEUMONIA/person1_bacteria_1.jpeg") == "person1"
    assert acc.patient_of("train/PNEUMONIA/person447_virus_921_1.jpeg") == "person447"
    assert acc.patient_of("train/NORMAL/IM-0429-0001-0002.jpeg") == "IM-0429"
    assert acc.patient_of("train/NORMAL/NORMAL2-IM-0381-0001.jpeg") == "NORMAL2-IM-0381"
    rows = acc.all_rows([1, 3, 8], 2)
    assert [r.id for r in rows] == ["pooled", "local", "local-dp8", "fedavg", "fedprox", "fedadam", "dp8-fedavg",
                                    "dp8-fedprox", "dp8-fedadam", "dp8-cnn", "dp1", "dp3", "dp1-aug", "dp3-aug",
                                    "dp8-aug", "dp8-aug1", "dp8-128px"]
    assert (rows[2].mode, rows[2].dp, rows[2].epsilon) == ("local", True, 8)
    assert [r.strategy for r in rows[6:9]] == ["fedavg", "fedprox", "fedadam"]
    assert all(r.strategy == "best" and r.dp for r in rows[9:])
    assert [r.model for r in rows] == [""] * 9 + ["cnn"] + [""] * 7
    args = argparse.Namespace(delta=1e-5, rounds=0, image_size=0)
    assert acc.row_command(rows[9], "fedavg", Path("d"), Path("o"), args)[-2:] == ["--model", "cnn"]
    assert "--model" not in acc.row_command(rows[6], "fedavg", Path("d"), Path("o"), args)
    assert {(r.augment, r.multiplicity) for r in rows[12:15]} == {("chest-xray", 2)}
    assert (rows[15].augment, rows[15].multiplicity, rows[16].image_size) == ("chest-xray", 1, 128)
    assert acc.row_command(rows[16], "fedavg", Path("d"), Path("o"), args)[-2:] == ["--image-size", "128"]
    # The rows that matter at an unseen hospital: pooled, FedAvg, every epsilon, the candidate defaults.
    assert [r.id for r in acc.select_rows("unseen", rows)] == ["pooled", "fedavg", "dp8-fedavg", "dp1", "dp3",
                                                               "dp8-aug", "dp8-aug1", "dp8-128px"]
    # Selection keeps table order, so the DP rows always come after the strategies they pick from.
    assert [r.id for r in acc.select_rows("dp3,fedadam,baselines", rows)] == ["pooled", "local", "local-dp8", "fedadam",
                                                                              "dp3"]
    assert "local-dp8" not in [r.id for r in acc.select_rows("dp", rows)]
    # The best strategy under DP is picked from the DP rows when there are any, else from the non-DP ones.
    done = [{"mode": "federated", "status": "ok", "augment": "none", "dp": dp, "strategy": s, "aggregate": {"auc": a}}
            for s, dp, a in (("fedadam", False, 0.92), ("fedavg", False, 0.86), ("fedadam", True, 0.74),
                             ("fedavg", True, 0.90))]
    assert acc.pick_dp_strategy(done, "fedavg")[0] == "fedavg"
    assert acc.pick_dp_strategy(done[:2], "fedavg")[0] == "fedadam"
    # A lead within TIE_AUC (run-to-run noise) leaves the study default in place.
    tie = [dict(d, strategy="fedprox", aggregate={"auc": 0.90 + acc.TIE_AUC / 2}) for d in done[3:]]
    assert acc.pick_dp_strategy(done + tie, "fedavg")[0] == "fedavg"
    assert acc.pick_dp_strategy(done + tie, "fedprox")[0] == "fedprox"
    # Repeated rows are compared by their mean: one lucky first run does not move the default.
    lucky = dict(done[3], strategy="fedprox", aggregate={"auc": 0.95},
                 runs=[{"auc": 0.95}, {"auc": 0.88}, {"auc": 0.88}])
    steady = dict(done[3], runs=[{"auc": 0.90}, {"auc": 0.90}, {"auc": 0.91}])
    assert acc.mean_auc(lucky) == pytest.approx(0.90333, abs=1e-4)
    picked, why = acc.pick_dp_strategy([steady, lucky], "fedavg")
    assert picked == "fedavg" and "mean of 3 runs" in why
    assert acc.pick_dp_strategy([steady, dict(lucky, runs=[{"auc": 0.95}] * 3)], "fedavg")[0] == "fedprox"
    assert [r.id for r in rows if r.repeated] == ["dp8-fedavg", "dp8-fedprox", "dp8-fedadam"]
    with pytest.raises(SystemExit):
        acc.select_rows("fedyogi", rows)


def test_dp_rows_are_compared_with_sites_alone_under_the_same_budget():
    acc = bench()

    def row(id_, mode, dp, eps, aucs):
        return {"id": id_, "mode": mode, "dp": dp, "epsilon_target": eps, "status": "ok",
                "sites": {f"s{i}": {"auc": a} for i, a in enumerate(aucs)}}

    results = [row("local", "local", False, None, [0.9, 0.99, math.nan]),
               row("local-dp8", "local", True, 8.0, [0.8, 0.90, 0.7]),
               row("fedavg", "federated", False, None, [0.95, 0.98, 0.9]),
               row("dp8-fedavg", "federated", True, 8.0, [0.92, 0.95, 0.6]),
               row("dp1", "federated", True, 1.0, [0.85, 0.85, 0.9]),
               row("dp3", "federated", True, 3.0, [0.9, 0.9, 0.9])]
    table = acc.compare_sites(results)
    by_id = {r["id"]: r for r in results}
    assert by_id["fedavg"]["beats_local"] == "1/2" and "beats_local_dp" not in by_id["fedavg"]
    assert by_id["dp8-fedavg"]["beats_local"] == "1/2" and by_id["dp8-fedavg"]["beats_local_dp"] == "2/3"
    assert table["beats_local_dp"]["dp8-fedavg"] == {"s0": True, "s1": True, "s2": False}
    assert "beats_local_dp" not in by_id["dp1"]  # no site-alone row at epsilon 1
    assert by_id["dp3"]["beats_local"] == "0/2 (1 tied)" and table["beats_local"]["dp3"]["s0"] is False
    assert "beats_local" not in by_id["local-dp8"]  # only federated rows are compared


def test_defaults_are_picked_by_the_unseen_hospital_auc_under_the_largest_epsilon(tmp_path):
    acc = bench()

    def row(id_, dp, eps, mean, complete=True):
        return {"id": id_, "label": id_, "mode": "federated", "dp": dp, "epsilon_target": eps,
                "unseen": {"complete": complete, "mean_auc": mean}}

    results = [row("fedavg", False, None, 0.99), row("dp3", True, 3.0, 0.97), row("dp8-fedavg", True, 8.0, 0.90),
               row("dp8-aug", True, 8.0, 0.93), row("dp8-128px", True, 8.0, 0.95, complete=False)]
    picked, why = acc.pick_by_unseen(results)
    assert picked == "dp8-aug" and "0.930" in why and "dp8-fedavg 0.900" in why  # incomplete rows never win
    assert acc.pick_by_unseen(results[:1]) == (None, "no complete unseen-hospital DP row")

    # Each hold-out folder links every other site, never the held-out one, and is reused as it is.
    data = tmp_path / "cxr4"
    for site in ("site-1", "site-2", "site-3"):
        (data / site).mkdir(parents=True)
    folders = acc.holdout_folders(data, ["site-1", "site-2", "site-3"])
    assert sorted(p.name for p in folders["site-2"].iterdir()) == ["site-1", "site-3"]
    assert (folders["site-2"] / "site-3").resolve() == (data / "site-3").resolve()
    assert acc.holdout_folders(data, ["site-1", "site-2", "site-3"]) == folders


def test_an_unchanged_export_is_reused(tmp_path):
    """The recipe compared with manifest.json's as JSON holds it (a tuple in SITE_ACQUISITIONS came back a list,
    and every run exported all 5,216 images again)."""
    acc = bench()
    source = shared("cxr-pediatric-224")
    first = acc.prepare_data(source, tmp_path / "cxr4", per_site=3, workers=1)
    again = acc.prepare_data(source, tmp_path / "cxr4", per_site=3, workers=1)
    assert not first["reused"] and again["reused"] and again["sites"] == first["sites"]


def test_site_acquisitions_frame_the_same_image_differently():
    from common.phantoms import SiteAcquisition

    acc = bench()
    image = np.linspace(0, 1, 224 * 224, dtype=np.float32).reshape(224, 224)
    shapes = [acc.SITE_ACQUISITIONS[s].apply(image).shape for s in range(4)]
    assert len(set(shapes)) == 4 and shapes[0][1] > shapes[0][0] and shapes[1][0] > shapes[1][1]
    white = acc.SITE_ACQUISITIONS[1].apply(image)
    assert white[0].min() == 1.0 and white.shape[0] > 224  # padded with white, on a larger detector
    grey = acc.SITE_ACQUISITIONS[2].apply(image)
    assert np.all(grey[:, 0] == 0.5) and np.all(grey[:, -1] == 0.5)
    assert np.array_equal(SiteAcquisition().apply(image), image)  # the default changes nothing
    assert SiteAcquisition().describe() == "square, no borders"


@pytest.mark.e2e
def test_quick_leave_one_hospital_out(tmp_path):
    """--unseen only: each row trained without each hospital and tested on all of its images."""
    source = shared("cxr-pediatric-224")
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--rows", "pooled", "--unseen", "only",
                             "--data", str(source), "--workdir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "accuracy-quick.json").read_text())
    (pooled,) = report["rows"]
    unseen = pooled["unseen"]
    assert pooled["status"] == "not run (--unseen only)" and unseen["complete"]
    assert [f["site"] for f in unseen["folds"]] == ["site-1", "site-2", "site-3", "site-4"]
    sizes = {s["site"]: s["images"] for s in report["data"]["sites"]}
    for fold in unseen["folds"]:
        assert fold["n"] == sizes[fold["site"]] and 0 <= fold["auc"] <= 1 and 0 <= fold["val_auc"] <= 1
        assert 0 <= fold["balanced_accuracy"] <= 1  # at the study's threshold, stored in model.pt
        local = json.loads((Path(fold["run_dir"]) / "unseen.json").read_text())["local_operating_point"]
        assert fold["local_balanced_accuracy"] == pytest.approx(local["held_out_balanced_accuracy"], nan_ok=True)
        run = json.loads((Path(fold["run_dir"]) / "config.json").read_text())
        assert run["data"].endswith(f"without-{fold['site']}") and run["mode"] == "pooled"
        assert fold["site"] not in [p.name for p in Path(run["data"]).iterdir()]
    assert unseen["mean_auc"] == pytest.approx(np.mean([f["auc"] for f in unseen["folds"]]))
    table = (tmp_path / "accuracy-quick.md").read_text()
    assert "## At a hospital the model has never seen" in table and "| pooled (all data in one place) | " in table
    assert "| at its own threshold, mean / worst |" in table
    assert "| row | strategy |" not in table  # only the hold-out studies were run


@pytest.mark.e2e
def test_quick_table_and_distinct_site_encodings(tmp_path):
    source = shared("cxr-pediatric-224")
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--rows", "local,fedavg", "--data", str(source),
                             "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((tmp_path / "accuracy-quick.json").read_text())
    assert [r["id"] for r in report["rows"]] == ["local", "fedavg"]
    sites = ["site-1", "site-2", "site-3", "site-4"]
    for row in report["rows"]:
        assert row["status"] == "ok" and row["wall_s"] > 0 and row["epsilon_spent"] is None
        assert row["study"]["num-rounds"] == 1 and row["study"]["image-size"] == 32 and row["study"]["dp"] is False
        assert set(row["aggregate"]) >= {"auc", "accuracy", "sensitivity", "specificity"}
        assert set(row["worst"]) == set(row["aggregate"]) and sorted(row["sites"]) == sites
        assert Path(row["run_dir"], "metrics.jsonl").exists()
    local, fedavg = report["rows"]
    assert local["operating_point"] is None  # one model per site: no shared threshold
    # The operating point comes from the sites' ROC points, each with at least 5 validation images between two
    # thresholds (common/metrics.py): the quick run's 7-9 images a site may give none, and then there is none.
    point = fedavg["operating_point"]
    assert point is None or (0 <= point["threshold"] <= 1 and 0 <= point["specificity"] <= 1)
    assert report["per_site"]["sites"] == sites and sorted(report["per_site"]["beats_local"]["fedavg"]) == sites
    assert [s["images"] for s in report["data"]["sites"]] == [s["n_train"] + s["n_val"]
                                                              for s in report["rows"][0]["sites"].values()]

    table = (tmp_path / "accuracy-quick.md").read_text()
    assert "benchmarks/accuracy.py --quick --rows local,fedavg" in table and "Date: " in table
    header = next(line for line in table.splitlines() if line.startswith("| row |"))
    for column in ("AUC agg / worst", "accuracy agg / worst", "sensitivity agg / worst", "specificity agg / worst",
                   "ε spent", "wall time", "beats local at", "at the study threshold"):
        assert column in header
    assert "| each site alone | local |" in table and "| FedAvg | fedavg |" in table
    assert "[^1]: Kermany et al. 2018" in table and "0.968" in table and "0.944" in table and "0.956" in table

    # Each hospital exported with its own encoding; a patient's images stay in one hospital.
    data = Path(report["data"]["folder"])
    found, patients = [], []
    for site in sites:
        files = sorted((data / site / "images").glob("*.dcm"))
        ds = pydicom.dcmread(files[0])
        found.append((ds.file_meta.TransferSyntaxUID, ds.PhotometricInterpretation, int(ds.BitsStored)))
        patients.append({pydicom.dcmread(f, stop_before_pixels=True).PatientID for f in files})
    assert [f[0] for f in found] == [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless,
                                     DeflatedExplicitVRLittleEndian]
    assert len(set(found)) == 4 and {f[1] for f in found} == {"MONOCHROME1", "MONOCHROME2"}
    frames = [tuple(pydicom.dcmread(next((data / s / "images").glob("*.dcm"))).pixel_array.shape) for s in sites]
    assert len(set(frames)) == 4  # and each with its own geometry: field of view, borders, detector size
    assert all(not (patients[i] & patients[j]) for i in range(4) for j in range(i + 1, 4))

    # A second run reuses the export; a different recipe exports again.
    acc = bench()
    again = acc.prepare_data(source, data, per_site=acc.QUICK_PER_SITE, workers=1)
    assert again["reused"] and again["sites"] == report["data"]["sites"]
    smaller = acc.prepare_data(source, data, per_site=12, workers=1)
    assert not smaller["reused"] and all(s["images"] <= 12 for s in smaller["sites"])
