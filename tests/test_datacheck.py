"""``fedrad data check`` and ``fedrad data preview`` as a hospital runs them."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pydicom
from PIL import Image

from common.dicom import write_dicom


def fedrad(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrad", *args], capture_output=True, text=True, timeout=120)


def make_export(root, n=12):
    """A PACS-like export: labels keyed by SOPInstanceUID, plus the usual debris."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = root / "series" / f"im{i:03d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_dicom(path, rng.random((40, 50)).astype(np.float32), patient_id=f"PAT{i // 2:04d}",
                    photometric="MONOCHROME1" if i % 2 else "MONOCHROME2",
                    transfer_syntax="rle" if i % 3 else "explicit")
        rows.append((pydicom.dcmread(path).SOPInstanceUID, "pneumonia" if i % 2 else "normal"))
    shutil.copy(root / "series" / "im000.dcm", root / "series" / "copy-of-im000.dcm")  # same SOPInstanceUID
    write_dicom(root / "unlabelled.dcm", rng.random((40, 50)).astype(np.float32))
    (root / "notes.txt").write_text("exported by PACS")
    (root / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sop_instance_uid", "label"])
        writer.writerows(rows)


def test_check_reports_counts_and_reasons_without_patient_data(tmp_path):
    make_export(tmp_path)
    result = fedrad("data", "check", str(tmp_path), "--json", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["files_seen"] == 16 and report["decoded"] == 14 and report["used"] == 12
    assert report["duplicates"] == 1 and report["unlabeled"] == 1
    assert report["labels"] == {"normal": 6, "pneumonia": 6}
    assert report["photometric"] == {"MONOCHROME1": 6, "MONOCHROME2": 8}
    assert report["matrix_sizes"] == {"40x50": 14} and report["bits_stored"] == {"12": 14}
    assert set(report["transfer_syntaxes"]) == {"RLE Lossless", "Explicit VR Little Endian"}
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert reasons["notes.txt"] == "not DICOM, PNG or JPEG"
    assert reasons["unlabelled.dcm"] == "no label"
    twins = [reasons.get(f"series/{name}", "") for name in ("copy-of-im000.dcm", "im000.dcm")]
    assert sum("duplicate SOPInstanceUID" in r for r in twins) == 1  # one of the pair is used
    assert "broken.dcm" in reasons
    text = result.stdout + (tmp_path / "report.json").read_text()
    for secret in ("PAT0", "ANON^", "20240115", "19700101"):
        assert secret not in text
    assert result.stdout.strip().endswith("verdict: usable")


def test_training_reads_the_same_export(tmp_path):
    make_export(tmp_path)
    from common.data import load_images

    data = load_images(tmp_path, 32, 1, ["normal", "pneumonia"])
    assert len(data) == 12 and data.class_counts(2) == [6, 6]
    assert len(set(data.groups)) == 6  # PatientID from the header: two images per patient


def test_unusable_folder_exits_non_zero_with_one_line(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"nothing")
    result = fedrad("data", "check", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not usable" in result.stderr and "Traceback" not in result.stderr


def test_preview_writes_a_labelled_sheet(tmp_path):
    make_export(tmp_path / "site")
    out = tmp_path / "grid.png"
    result = fedrad("data", "preview", str(tmp_path / "site"), "--out", str(out), "--max", "8")
    assert result.returncode == 0, result.stderr
    sheet = np.asarray(Image.open(out).convert("L"))
    assert sheet.shape == (188, 1280)  # 8 tiles of 160 px in one row, captions below
    assert sheet[:160].std() > 10  # images, not a blank page


def test_check_over_real_and_malformed_dicom_never_fails_and_notes_each_fallback(tmp_path):
    """Issue 27: the shared real files (broken ones included), the JPEG Lossless file with a Modality LUT item
    without descriptor that stopped a hospital, a header claiming 60000 x 60000 x 1000: counted, never a traceback."""
    from conftest import shared
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    samples = shared("dicom-samples")
    for path in samples.glob("*.dcm"):
        shutil.copy(path, tmp_path / path.name)
    ds = pydicom.dcmread(samples / "RG2_JPLL.dcm")
    item = Dataset()
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    ds.save_as(tmp_path / "jpll-modality-lut-without-descriptor.dcm")
    write_dicom(tmp_path / "huge.dcm", np.zeros((8, 8), np.float32))
    ds = pydicom.dcmread(tmp_path / "huge.dcm")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 1000
    ds.save_as(tmp_path / "huge.dcm")
    result = fedrad("data", "check", str(tmp_path), "--json", str(tmp_path / "report.json"))
    assert "Traceback" not in result.stderr and result.returncode == 2  # no labels: not usable, one line
    lines = result.stderr.splitlines()  # progress lines, then the one error line
    assert lines[-1].startswith("fedrad: error:") and all(line.startswith("decod") for line in lines[:-1])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["files_seen"] == 21 and report["decoded"] == 17
    assert report["notes"] == {"malformed Modality LUT: ignored, rescale used": 1}
    assert "notes              malformed Modality LUT: ignored, rescale used 1" in result.stdout
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert reasons["huge.dcm"] == "image of 60000 x 60000 pixels: over 16384 a side, not decoded"
