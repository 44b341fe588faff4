import csv

import numpy as np
import pytest
from PIL import Image

from common.data import fit_square, load_images, site_folders
from common.errors import DataError

CLASSES = ["normal", "pneumonia"]


def test_npz_pools_all_splits(small_npz):
    data = load_images(small_npz, 32, 1, CLASSES)
    assert data.images.shape == (120, 1, 32, 32)
    assert data.images.dtype == np.float32 and 0 <= data.images.min() and data.images.max() <= 1
    assert len(set(data.keys)) == 120


def test_phantom_sites_read_through_dicom(demo_sites):
    assert site_folders(demo_sites[0].parent) == demo_sites
    a = load_images(demo_sites[0], 32, 1, CLASSES)  # MONOCHROME2, 16 bit
    b = load_images(demo_sites[1], 32, 1, CLASSES)  # MONOCHROME1, 12 bit, RLE
    assert len(a) == len(b) == 40 and not a.skipped and not b.skipped
    # MONOCHROME1 is inverted: the spine (image centre) is bright and air (corner) dark at both sites.
    for data in (a, b):
        assert data.images[:, 0, 16, 16].mean() > 0.6
        assert data.images[:, 0, 1, 1].mean() < 0.15
    # Patient ids come from the DICOM header: two images per patient.
    assert len(set(a.groups)) == 20


def test_labels_csv_skips_bad_rows_with_reasons(tmp_path):
    Image.fromarray(np.full((20, 30), 200, np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id"])
        w.writerows([["ok.png", "pneumonia", "p1"], ["also-ok.png", "1", "p1"], ["broken.png", "normal", "p2"],
                     ["missing.png", "normal", "p3"], ["odd.png", "fracture", "p4"], ["../etc/passwd", "0", ""],
                     ["ok.png", "normal", "p1"]])
    Image.fromarray(np.full((20, 30), 100, np.uint8)).save(tmp_path / "also-ok.png")
    Image.fromarray(np.full((20, 30), 100, np.uint8)).save(tmp_path / "odd.png")
    data = load_images(tmp_path, 16, 1, CLASSES)
    assert len(data) == 2 and data.labels.tolist() == [1, 1]
    reasons = dict(data.skipped)
    assert reasons["broken.png"] == "cannot read: not a PNG image"
    assert reasons["missing.png"] == "file not found"
    assert reasons["odd.png"] == "unknown label 'fracture'"
    assert reasons["ok.png"].startswith("listed twice")
    assert len(data.skipped) == 5


def test_class_subfolders(tmp_path):
    for cls, value in (("normal", 30), ("pneumonia", 220)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 10, 3), value, np.uint8)).save(tmp_path / cls / f"{i}.jpg")
    data = load_images(tmp_path, 8, 3, CLASSES)
    assert data.images.shape == (6, 3, 8, 8)
    assert data.class_counts(2) == [3, 3]


def test_unusable_sources_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_images(tmp_path / "nope", 16, 1, CLASSES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no labels.csv"):
        load_images(tmp_path / "empty", 16, 1, CLASSES)
    (tmp_path / "bad.npz").write_bytes(b"xx")
    with pytest.raises(DataError, match="npz"):
        load_images(tmp_path / "bad.npz", 16, 1, CLASSES)
    np.savez(tmp_path / "flat.npz", train_images=np.zeros((5, 784), np.uint8), train_labels=np.zeros(5))
    with pytest.raises(DataError, match=r"shape \(5, 784\)"):
        load_images(tmp_path / "flat.npz", 16, 1, CLASSES)


def test_fit_square_fills_the_square_whatever_the_frame_shape():
    """A landscape or portrait frame is stretched to the square, never padded: padding bars marked the site that
    exported the image (common/preprocess.py, step 3)."""
    wide = np.ones((10, 40), np.float32)
    wide[:, :20] = 0.5
    out = fit_square(wide, 40, 1)
    assert out.shape == (1, 40, 40)
    assert out[0, 0, 30] == pytest.approx(1.0) and out[0, 39, 5] == pytest.approx(0.5)  # no bars top or bottom
    assert out[0, :, :18].max() == pytest.approx(0.5) and out[0, :, 22:].min() == pytest.approx(1.0)
