"""`fedrad predict` and `fedrad evaluate`: one decision rule, said aloud; a warning for images unlike the study's."""

import json
import random
import subprocess
import sys

import numpy as np
import torch
from conftest import shared
from PIL import Image, ImageDraw

from client.training import predict_proba
from common.data import decode_file, load_images
from common.inputprofile import pooled_profile, site_profile
from common.models import build_model
from fedrad.evaluation import evaluate_model
from fedrad.predict import predict

PAYLOAD = {"format": "fedrad-model/1", "architecture": "cnn", "input_size": 64, "channels": 1,
           "class_names": ["normal", "pneumonia"], "preprocessing": "test", "privacy": {}}


def _model(path, **extra):
    torch.manual_seed(0)
    torch.save({**PAYLOAD, "state_dict": build_model("cnn", 1, 2).state_dict(), **extra}, path)
    return path


def smiley(path):
    img = Image.new("RGB", (256, 256), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((20, 20, 236, 236), fill="yellow", outline="black", width=6)
    draw.ellipse((80, 80, 110, 110), fill="black")
    draw.ellipse((146, 80, 176, 110), fill="black")
    draw.arc((70, 100, 186, 200), 20, 160, fill="black", width=8)
    img.save(path)
    return path


def test_predict_warns_on_images_unlike_the_studys_and_not_on_chest_radiographs(tmp_path):
    """The profile of 600 real chest X-rays as two sites would send it: a CT, two MRs, an ultrasound and a smiley
    face are warned about; 40 other chest X-rays and an adult chest CR DICOM are not."""
    xrays = shared("cxr-pediatric-224")
    dicoms = shared("dicom-samples")
    files = sorted(xrays.rglob("*.jpeg"))
    random.Random(0).shuffle(files)
    images = np.stack([decode_file(xrays, f, 64, 1).pixels for f in files[:600]])
    profile = pooled_profile({"a": {**site_profile(images[:250]), "num-examples": 250.0},
                              "b": {**site_profile(images[250:]), "num-examples": 350.0}})
    model = _model(tmp_path / "model.pt", input_profile=profile)
    unlike = [dicoms / n for n in ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "US1_UNCI.dcm")]
    unlike.append(smiley(tmp_path / "smiley.png"))
    alike = [*files[600:640], dicoms / "RG1_J2KI.dcm"]
    report = predict(model, unlike + alike)
    warned = {r["file"]: r["warnings"] for r in report["predictions"]}
    assert all(warned[str(f)] for f in unlike), warned
    assert not any(warned[str(f)] for f in alike), {f: w for f, w in warned.items() if w}
    assert report["warned"] == len(unlike)
    rows = {r["file"]: r for r in report["predictions"]}
    assert rows[str(dicoms / "CT_small.dcm")]["modality"] == "CT"
    assert any("colour" in w for w in warned[str(unlike[-1])])  # the smiley is yellow
    assert any("input statistics" in c for c in report["input_check"]["checked"])
    assert any("modality" in c for c in report["input_check"]["not_checked"])


def test_predict_says_what_it_cannot_check_without_a_profile(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fedrad", "predict", "--model", str(_model(tmp_path / "m.pt")),
                             str(shared("dicom-samples") / "CT_small.dcm"), "--json", str(tmp_path / "p.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "decision: argmax (model.pt stores no operating point)" in result.stdout
    assert "not checked: input statistics" in result.stdout
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["predictions"][0]["warnings"] == [] and "input_distance" not in report["predictions"][0]


def test_evaluate_and_predict_decide_at_the_same_stored_operating_point(tmp_path):
    rng = np.random.default_rng(0)
    images = (rng.random((40, 64, 64)) * 255).astype(np.uint8)
    labels = rng.integers(0, 2, 40)
    np.savez(tmp_path / "data.npz", train_images=images, train_labels=labels)
    data = load_images(tmp_path / "data.npz", 64, 1, ["normal", "pneumonia"])
    torch.manual_seed(0)
    p1 = predict_proba(build_model("cnn", 1, 2), data.images, torch.device("cpu"))
    labels = data.labels
    threshold = float(np.median(p1[:, 1]))
    model = _model(tmp_path / "model.pt", final_metrics={"operating_point": {"threshold": threshold}})
    result = evaluate_model(model, tmp_path / "data.npz")
    assert "operating point" in result["decision"]
    decided = p1[:, 1] >= threshold
    assert abs(result["sensitivity"] - decided[labels == 1].mean()) < 1e-6
    assert abs(result["specificity"] - (~decided[labels == 0]).mean()) < 1e-6
    given = evaluate_model(model, tmp_path / "data.npz", threshold=0.999)
    assert "given threshold" in given["decision"] and given["sensitivity"] <= result["sensitivity"]
    pngs = []
    for i in range(4):
        Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
        pngs.append(tmp_path / f"{i}.png")
    report = predict(model, pngs)
    assert report["decision"] == result["decision"]
    assert [r["prediction"] == "pneumonia" for r in report["predictions"]] == list(decided[:4])

