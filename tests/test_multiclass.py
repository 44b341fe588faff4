"""Any task, not just pneumonia: classes and channels from the data, label matching, multi-class metrics.

The end-to-end test trains on 5 colour grades of equal luminance (isoluminant): grey input would carry
no signal, so a model that learns them was given RGB.
"""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import shared
from PIL import Image

from client.release import evaluation_metrics
from client.training import TrainSettings, evaluate, train_local
from common.config import StudyConfig
from common.data import load_images, source_channels, source_classes
from common.errors import DataError
from common.labels import classes_from_labels, match_labels
from common.models import build_model
from common.multiclass import aggregate_sites, multiclass_metrics, quadratic_kappa
from fedrad.datacheck import check_folder

GRADES = ["none", "mild", "moderate", "severe", "proliferative"]


def grade_images(per_class: int, seed: int = 0, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 images of 5 grades that differ in hue only (luminance 0.5 for every grade)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(5), per_class)
    t = labels / 4
    red = 0.5 + 0.35 * (2 * t - 1)
    green = (0.5 - 0.299 * red - 0.114 * 0.5) / 0.587
    colour = np.stack([red, green, np.full_like(t, 0.5)], axis=1)
    yy, xx = np.mgrid[:size, :size]
    shade = (0.6 + 0.4 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / 80.0))[None, :, :, None]
    images = (colour[:, None, None, :] + rng.normal(0, 0.05, (len(labels), size, size, 1))) * shade
    order = rng.permutation(len(labels))
    return (np.clip(images, 0, 1) * 255).astype(np.uint8)[order], labels[order]


@pytest.fixture(scope="module")
def grades_npz(tmp_path_factory):
    images, labels = grade_images(12)
    path = tmp_path_factory.mktemp("grades") / "grades.npz"
    np.savez(path, train_images=images[:50], train_labels=labels[:50, None], val_images=images[50:],
             val_labels=labels[50:, None], label_names=np.array(GRADES))
    return path


# --- classes and label matching ------------------------------------------------------------------------------

def test_classes_come_from_the_labels():
    assert classes_from_labels(["0", "2", "1"], {"0": "none", "1": "mild"}) == ["none", "mild", "2"]
    assert classes_from_labels(["3", "0"]) == ["0", "1", "2", "3"]  # indices: 0..max, so grades keep their order
    assert classes_from_labels(["Pneumonia", "normal", "NORMAL"]) == ["NORMAL", "Pneumonia"]  # sorted, case folded
    assert classes_from_labels(["0", "1"], {"1": "normal, benign"}) == ["0", "normal; benign"]  # no comma in a name
    with pytest.raises(DataError, match=r"1 class \(normal\) found in its labels; a study needs at least two"):
        classes_from_labels(["normal", "normal"], source="site")
    with pytest.raises(DataError, match="label 123456 as a class index would make 123457 classes"):
        classes_from_labels(["0", "123456"], source="site")


def test_labels_mostly_outside_the_classes_are_refused_naming_them():
    retina = [str(g) for g in [0] * 60 + [1] * 10 + [2] * 10 + [3] * 10 + [4] * 10]
    match = match_labels(retina, ["normal", "pneumonia"])
    assert match.indices.tolist()[:70] == [0] * 60 + [1] * 10 and match.matched == 70  # an index names a class
    # 30 of 100 images are outside, but 3 of the 5 labels: not this study's data.
    reason = match.refusal("retina.npz", {"2": "moderate"})
    assert reason.startswith("retina.npz: 30 of its 100 labelled images have labels outside the study's classes "
                             "(normal, pneumonia); labels found: 0 (60), 1 (10), 2 moderate (10), 3 (10), 4 (10)")
    assert "\n" not in reason
    # A stray label on a few rows is skipped and counted, not a refusal.
    stray = match_labels(["normal"] * 150 + ["pneumonia"] * 150 + ["x"], ["normal", "pneumonia"])
    assert stray.refusal("site") == "" and stray.outside == {"x": 1}


def test_training_and_data_check_refuse_the_same_data_with_the_same_reason(tmp_path):
    rng = np.random.default_rng(1)
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "label_name"])
        for i in range(15):
            Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
            writer.writerow([f"{i}.png", i % 5, GRADES[i % 5]])
    with pytest.raises(DataError) as refused:
        load_images(tmp_path, 16, 3, ["normal", "pneumonia"])
    report = check_folder(tmp_path, class_names=["normal", "pneumonia"], workers=1)
    assert not report.usable and report.verdict == str(refused.value)
    assert "labels found: 0 none (3), 1 mild (3), 2 moderate (3)" in report.verdict
    # Without class names both take the data's: its label_name column, in label order.
    assert source_classes(tmp_path) == GRADES
    report = check_folder(tmp_path, workers=1)
    assert report.usable and report.classes == GRADES and report.classes_from == "data"
    assert report.labels == {g: 3 for g in GRADES} and report.colour == 15
    assert load_images(tmp_path, 16, 3, GRADES).class_counts(5) == [3] * 5


def test_channels_follow_the_data(tmp_path, grades_npz):
    assert source_channels(grades_npz) == 3
    grey = np.repeat(np.random.default_rng(0).integers(0, 255, (10, 28, 28, 1), dtype=np.uint8), 3, axis=3)
    np.savez(tmp_path / "grey-as-rgb.npz", train_images=grey, train_labels=np.arange(10) % 2)
    assert source_channels(tmp_path / "grey-as-rgb.npz") == 1
    for name, image in (("colour", np.stack([np.full((20, 20), v, np.uint8) for v in (200, 40, 90)], axis=2)),
                        ("grey", np.full((20, 20, 3), 120, np.uint8))):
        (tmp_path / name / "a").mkdir(parents=True)
        Image.fromarray(image).save(tmp_path / name / "a" / "x.jpg")
        (tmp_path / name / "b").mkdir()
        Image.fromarray(image[..., 0]).save(tmp_path / name / "b" / "y.png")
    assert source_channels(tmp_path / "colour") == 3  # one colour image makes the study RGB
    assert source_channels(tmp_path / "grey") == 1  # grey stored as RGB JPEG stays grey


def test_breast_ultrasound_gets_its_own_classes_never_pneumonia(capsys):
    from common.modelfile import model_payload
    from fedrad.simulation import task_of

    breast = shared("medmnist", "breastmnist.npz")
    study = task_of(StudyConfig(data=str(breast)), classes_given=False, channels_given=False)
    assert study.classes == ["0", "1"] and study.channels == 1
    assert capsys.readouterr().out == "from the data: classes 0, 1; 1 channel (grey)\n"
    assert model_payload(study, {}, {}, {})["class_names"] == ["0", "1"]
    given = task_of(StudyConfig(data=str(breast), class_names="malignant,benign"), True, False)
    assert given.classes == ["malignant", "benign"]


# --- metrics -----------------------------------------------------------------------------------------------

def test_quadratic_kappa():
    assert quadratic_kappa(np.array([0, 1, 2]), np.array([0, 2, 2]), 3) == pytest.approx(0.8)  # worked by hand
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    # The identity kappa_q = 1 - mean (y - p)^2 / mean over all pairs (y_i - p_j)^2.
    expected = 1 - np.mean((y - p) ** 2) / np.mean((y[:, None] - p[None, :]) ** 2)
    assert quadratic_kappa(y, p, 5) == pytest.approx(expected)
    assert quadratic_kappa(y, y, 5) == 1.0 and math.isnan(quadratic_kappa(np.zeros(4, int), np.zeros(4, int), 3))


def test_multiclass_metrics_and_their_release():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    probs = np.full((8, 4), 0.1)
    probs[np.arange(8), labels] = 0.7
    probs[1] = [0.1, 0.7, 0.1, 0.1]  # one grade-0 image called grade 1
    scores = multiclass_metrics(probs, labels, ordinal=True, intervals=True)
    assert scores["class_auc"] == [0.75, pytest.approx(11 / 12), 1.0, 1.0]
    assert scores["macro_auc"] == pytest.approx(np.mean(scores["class_auc"]))
    assert scores["kappa"] == pytest.approx(quadratic_kappa(labels, probs.argmax(1), 4))
    assert scores["macro_auc-ci95"][0] <= scores["macro_auc"] <= scores["macro_auc-ci95"][1]
    assert multiclass_metrics(probs[:, :2], labels.clip(0, 1)) == {}  # two classes, not ordinal: nothing new
    summary = evaluation_metrics(scores, "summary", 8, 0, 0.0, 0.0)
    assert {"macro_auc", "kappa", "macro_auc-ci95", "kappa-ci95"} <= set(summary) and "class_auc" not in summary
    assert evaluation_metrics(scores, "full", 8, 0, 0.0, 0.0)["class_auc"] == scores["class_auc"]


def test_sites_aggregate_weighted_by_validation_size():
    rows = [{"n_val": 10, "macro_auc": 0.8, "kappa": -0.2, "class_auc": [0.9, math.nan, 0.7],
             "ci95": {"kappa": [-0.5, 0.1]}},
            {"n_val": 30, "macro_auc": 0.6, "kappa": 0.2, "class_auc": [0.5, 0.6, 0.7], "ci95": {"kappa": [0.0, 0.4]}},
            {"n_val": 20, "auc": 0.5}]  # a site without them (a two-class reply) is left out, not a zero
    aggregate = {"ci95": {"auc": [0.4, 0.6]}}
    aggregate_sites(rows, aggregate)
    assert aggregate["macro_auc"] == pytest.approx(0.65) and aggregate["kappa"] == pytest.approx(0.1)
    assert aggregate["class_auc"] == [pytest.approx(0.6), 0.6, pytest.approx(0.7)]
    low, high = aggregate["ci95"]["kappa"]
    assert aggregate["ci95"]["auc"] == [0.4, 0.6] and -1 <= low < 0 < 0.1 < high  # kappa's interval may go below 0


def test_dp_training_on_colour_grades():
    """DP-SGD (mixed ghost clipping) through ScatterNet with 3 channels and 5 classes, then its metrics."""
    images, labels = grade_images(4, seed=2, size=16)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    model = build_model("scatternet", 3, 5)
    settings = TrainSettings(1, 8, 0.5, dp=True, noise_multiplier=1.0, max_grad_norm=1.0)
    outcome = train_local(model, x, labels, settings, torch.device("cpu"))
    assert math.isfinite(outcome.loss) and outcome.history == [(1.0, 1 / 3, 3)]
    scores = evaluate(model, x, labels, torch.device("cpu"), intervals=True, ordinal=True)
    assert len(scores["class_auc"]) == 5 and {"macro_auc", "kappa", "kappa-ci95"} <= set(scores)


# --- end to end ----------------------------------------------------------------------------------------------

def fedrad(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrad", *args], capture_output=True, text=True, timeout=timeout)


def test_colour_grades_simulate_without_class_or_channel_options(grades_npz, tmp_path):
    out = tmp_path / "run"
    result = fedrad("simulate", "--data", str(grades_npz), "--sites", "2", "--rounds", "1", "--no-dp",
                    "--batch-size", "8", "--ordinal", "--backend", "inline", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"from the data: classes {', '.join(GRADES)}; 3 channels (colour)" in result.stdout
    progress = next(line for line in result.stdout.splitlines() if line.startswith("round 1/1"))
    assert "| macro AUC " in progress and "| kappa " in progress
    aggregate = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["aggregate"]
    assert aggregate["macro_auc"] > 0.75 and aggregate["kappa"] > 0.5  # learned from hue alone
    assert len(aggregate["class_auc"]) == 5 and {"macro_auc", "kappa"} <= set(aggregate["ci95"])
    model = torch.load(out / "model.pt", weights_only=True)
    assert model["class_names"] == GRADES and model["channels"] == 3 and model["ordinal"] is True
    assert model["acquisition"]["modalities"] == ["not DICOM"]  # the sites' replies, pooled by the server

    images, labels = grade_images(12)
    for grade in (0, 4):
        Image.fromarray(images[labels == grade][0]).save(tmp_path / f"grade-{grade}.png")
    predicted = fedrad("predict", "--model", str(out / "model.pt"), str(tmp_path / "grade-0.png"),
                       str(tmp_path / "grade-4.png"), "--json", str(tmp_path / "p.json"), timeout=120)
    assert predicted.returncode == 0, predicted.stderr
    rows = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert [list(r["probabilities"]) for r in rows] == [GRADES, GRADES]
    assert all(r["prediction"] in GRADES for r in rows) and "pneumonia" not in predicted.stdout

    evaluated = fedrad("evaluate", "--model", str(out / "model.pt"), "--data", str(grades_npz), "--json",
                       str(tmp_path / "e.json"), timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads((tmp_path / "e.json").read_text())
    assert list(scores["auc_per_class"]) == GRADES and scores["macro_auc"] > 0.75 and scores["kappa"] > 0.5
    assert scores["macro_auc"] == pytest.approx(np.mean(list(scores["auc_per_class"].values())))
    assert scores["kappa_ci95"][0] <= scores["kappa"] <= scores["kappa_ci95"][1]
    assert "     auc_per_class:\n                  none: " in evaluated.stdout and "kappa: " in evaluated.stdout

    report = fedrad("report", str(out), timeout=60)
    assert report.returncode == 0 and "AUC proliferative vs rest" in (out / "report.html").read_text()

    # Named otherwise, the same data is refused before anything is written, in one line naming its labels.
    refused = fedrad("simulate", "--data", str(grades_npz), "--class-names", "normal,pneumonia", "--out",
                     str(tmp_path / "refused"), timeout=60)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "labels found: 0 none (12), 1 mild (12)" in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_pooled_baseline_of_grades_reports_kappa_and_evaluate_does_too(grades_npz, tmp_path):
    """--mode pooled passes the study's ordinal: its rounds carry kappa, and so does fedrad evaluate of its model
    (model.pt's ``ordinal``); an .npz has no DICOM header: its model.pt says so."""
    from fedrad.baselines import run_baseline
    from fedrad.evaluation import evaluate_model

    study = StudyConfig(data=str(grades_npz), out=str(tmp_path / "run"), mode="pooled", num_rounds=1, image_size=16,
                        batch_size=8, dp=False, channels=3, class_names=",".join(GRADES), ordinal=True,
                        val_fraction=0.5)
    run_dir = run_baseline(study, 2, "pooled")
    aggregate = run_dir.rounds()[-1]["aggregate"]
    assert {"kappa", "macro_auc"} <= set(aggregate) and len(aggregate["class_auc"]) == 5
    model = torch.load(run_dir.model_path, weights_only=True)
    assert model["ordinal"] is True and model["acquisition"]["modalities"] == ["not DICOM"]
    scores = evaluate_model(run_dir.model_path, grades_npz)
    assert {"kappa", "kappa_ci95", "macro_auc", "auc_per_class"} <= set(scores)
    model.pop("ordinal")  # a model.pt from before it was recorded: the study's config says
    torch.save(model, tmp_path / "older.pt")
    assert evaluate_model(tmp_path / "older.pt", grades_npz)["kappa"] == scores["kappa"]
    model["study"]["ordinal"] = False
    torch.save(model, tmp_path / "unordered.pt")
    assert "kappa" not in evaluate_model(tmp_path / "unordered.pt", grades_npz)


def test_negative_labels_are_unlabelled_images_never_a_class(tmp_path):
    """-1 in an .npz (or labels.csv) marks an unlabelled image: skipped with a reason and counted, and no class."""
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, -1, 2, 1, 0, -1, 2, 0, 1])
    np.savez(tmp_path / "d.npz", train_images=(rng.random((10, 8, 8)) * 255).astype(np.uint8),
             train_labels=labels[:, None])
    assert source_classes(tmp_path / "d.npz") == ["0", "1", "2"]
    data = load_images(tmp_path / "d.npz", 8, 1, ["0", "1", "2"])
    assert len(data) == 8 and data.labels.tolist() == [0, 1, 2, 1, 0, 2, 0, 1]
    assert data.skip_summary() == "2 skipped: 2 x no label (a negative class index: unlabelled)"
    folder = tmp_path / "csv"
    folder.mkdir()
    rows = ["a", "b", "-1", "a", "b"]
    for i in range(len(rows)):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "labels.csv").write_text("path,label\n" + "".join(f"{i}.png,{v}\n" for i, v in enumerate(rows)))
    assert source_classes(folder) == ["a", "b"]
    data = load_images(folder, 8, 1, ["a", "b"])
    assert len(data) == 4 and data.skip_summary() == "1 skipped: 1 x no label (a negative class index: unlabelled)"
