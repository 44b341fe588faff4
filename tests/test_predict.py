"""`fedrad predict` and `fedrad evaluate`: one decision rule, said aloud; a warning for images unlike the study's."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import shared
from PIL import Image, ImageDraw

from client.training import predict_proba
from common.acquisition import check_modality, pooled_acquisition, site_acquisition
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
    local = result["local_operating_point"]  # the threshold these images favour, exact on them
    favoured = p1[:, 1] >= local["threshold"]
    assert local["balanced_accuracy"] == pytest.approx((favoured[labels == 1].mean()
                                                        + (~favoured[labels == 0]).mean()) / 2)
    assert local["balanced_accuracy"] >= result["balanced_accuracy"] - 1e-9
    given = evaluate_model(model, tmp_path / "data.npz", threshold=0.999)
    assert "given threshold" in given["decision"] and given["sensitivity"] <= result["sensitivity"]
    pngs = []
    for i in range(4):
        Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
        pngs.append(tmp_path / f"{i}.png")
    report = predict(model, pngs)
    assert report["decision"] == result["decision"]
    assert [r["prediction"] == "pneumonia" for r in report["predictions"]] == list(decided[:4])



def test_acquisition_names_only_terms_of_five_images_from_fixed_vocabularies():
    rows = [("CR", "MONOCHROME1")] * 5 + [("dx ", "MONOCHROME2")] * 6 + [("CT", "MONOCHROME2")] * 4 \
        + [("ACME-SCANNER-7", "XYZ")] * 5 + [None] * 5
    sent = site_acquisition(rows)
    assert set(sent) == {"input-modality", "input-photometric"} and set(sent["input-modality"]) <= {0.0, 1.0}
    record = pooled_acquisition({"a": sent, "b": site_acquisition([("MG", "MONOCHROME2")] * 5), "c": {"auc": 0.5}})
    # CT held by 4 images is not named; a vendor's own code is "other", never sent verbatim; PNGs "not DICOM"
    assert record["modalities"] == ["not DICOM", "other", "CR", "DX", "MG"] and record["sites"] == 2
    assert record["photometrics"] == ["other", "MONOCHROME1", "MONOCHROME2"]
    assert site_acquisition([]) == {} and pooled_acquisition({"a": site_acquisition([("CT", "RGB")] * 4)}) is None
    assert check_modality(record, "CT")[1].startswith("modality CT: the study trained on other, CR, DX, MG (other, ")
    assert check_modality(record, "DX") == ("among the training images' modalities", "")
    assert check_modality(record, None)[0] == "not checked: not a DICOM image (no modality)"
    only_png = pooled_acquisition({"a": site_acquisition([None] * 5)})
    assert check_modality(only_png, "CT") == ("not checked: the study's training images were not DICOM", "")


def test_predict_warns_on_a_dicom_modality_the_study_did_not_train_on(tmp_path):
    """A CR/DX model: a CT slice and an MR are warned about by their header, CR and DX radiographs are not, a PNG
    is 'not checked'; printed and in the JSON."""
    dicoms = shared("dicom-samples")
    record = pooled_acquisition({"a": site_acquisition([("CR", "MONOCHROME1")] * 5 + [("DX", "MONOCHROME2")] * 5)})
    model = _model(tmp_path / "m.pt", acquisition=record)
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(tmp_path / "grey.png")
    files = [dicoms / n for n in ("CT_small.dcm", "MR_small.dcm", "RG1_J2KI.dcm", "JPEG2KLossless_1s_1f_u_16_16.dcm")]
    result = subprocess.run([sys.executable, "-m", "fedrad", "predict", "--model", str(model), *map(str, files),
                             str(tmp_path / "grey.png"), "--json", str(tmp_path / "p.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {r["file"]: r for r in json.loads((tmp_path / "p.json").read_text())["predictions"]}
    warned = {f: r["warnings"] for f, r in rows.items()}
    assert warned[str(files[0])] == ["modality CT: the study trained on CR, DX (MONOCHROME1, MONOCHROME2): the "
                                     "prediction may mean nothing"]
    assert warned[str(files[1])][0].startswith("modality MR: ") and not warned[str(files[2])]
    assert not warned[str(files[3])] and not warned[str(tmp_path / "grey.png")]
    assert rows[str(tmp_path / "grey.png")]["modality_check"] == "not checked: not a DICOM image (no modality)"
    assert "  warning: modality CT: the study trained on CR, DX" in result.stdout
    assert "  modality not checked: not a DICOM image (no modality)" in result.stdout
    assert "2 predicted" not in result.stdout and "5 predicted (2 with a warning)" in result.stdout
    assert "not checked: modality" not in result.stdout  # model.pt records it: checked
