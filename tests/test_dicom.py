"""DICOM decoding: the 19 shared real files, and round trips in every syntax we can write."""

import csv

import numpy as np
import pydicom
import pytest
from conftest import shared

from common.dicom import WRITABLE_SYNTAXES, read_dicom, write_dicom
from common.errors import ImageReadError

BROKEN = {
    "OT-PAL-8-face.dcm": "not DICOM",
    "csa_slice_norm.dcm": "no pixel data",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated",
}


def manifest():
    folder = shared("dicom-samples")
    return folder, list(csv.DictReader(open(folder / "MANIFEST.tsv"), delimiter="\t"))


def test_every_valid_sample_decodes_with_its_shape():
    folder, rows = manifest()
    valid = [r for r in rows if r["path"] not in BROKEN]
    assert len(valid) == 16
    for row in valid:
        image = read_dicom(folder / row["path"])
        colour = row["photometric"] in ("RGB", "PALETTE COLOR") or row["photometric"].startswith("YBR")
        expected = (int(row["rows"]), int(row["cols"])) + ((3,) if colour else ())
        assert image.pixels.shape == expected, row["path"]
        assert image.pixels.dtype == np.float32
        assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
        assert image.pixels.max() > image.pixels.min(), f"{row['path']} decoded to a blank image"


def test_broken_samples_are_reported_with_a_reason():
    folder, _ = manifest()
    for name, reason in BROKEN.items():
        with pytest.raises(ImageReadError, match=reason):
            read_dicom(folder / name)


@pytest.mark.parametrize("name", ["RG1_J2KI.dcm", "RG3_J2KR.dcm"])
def test_monochrome1_radiographs_come_out_with_bright_bone(name):
    """MONOCHROME1 stores dense tissue as low values: the output must be the inverse of the stored data."""
    folder, _ = manifest()
    stored = pydicom.dcmread(folder / name).pixel_array.astype(np.float64)[::8, ::8]
    shown = read_dicom(folder / name).pixels[::8, ::8]
    assert read_dicom(folder / name).photometric == "MONOCHROME1"
    assert np.corrcoef(stored.ravel(), shown.ravel())[0, 1] < -0.9


def test_a_window_that_misses_the_data_falls_back_to_percentiles():
    folder, _ = manifest()
    image = read_dicom(folder / "JPEG2KLossless_1s_1f_u_16_16.dcm")
    assert image.window.startswith("percentile") and 0.1 < image.pixels.mean() < 0.9


@pytest.mark.parametrize("syntax", WRITABLE_SYNTAXES)
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("bits", [12, 16])
def test_round_trip_in_every_writable_syntax(tmp_path, syntax, photometric, bits):
    pixels = np.random.default_rng(bits).random((64, 64)).astype(np.float32)
    path = tmp_path / "x.dcm"
    write_dicom(path, pixels, photometric=photometric, bits_stored=bits, transfer_syntax=syntax, window=False)
    top = (1 << bits) - 1
    stored = np.round(pixels * top).astype(np.int64)
    expected = top - stored if photometric == "MONOCHROME1" else stored
    assert np.array_equal(pydicom.dcmread(path).pixel_array, expected)  # lossless
    image = read_dicom(path)
    assert image.photometric == photometric and image.bits_stored == bits
    assert np.corrcoef(image.pixels.ravel(), pixels.ravel())[0, 1] > 0.99  # same orientation: bright = dense


def test_multiframe_policy(tmp_path):
    frames = np.stack([np.full((8, 8), v, np.uint16) for v in (100, 900, 500)])
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    ds.Rows = ds.Columns = 8
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 500, 1000
    ds.PixelData = frames.tobytes()
    ds.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    means = {p: float(read_dicom(tmp_path / "mf.dcm", p).pixels.mean()) for p in ("first", "middle", "max")}
    assert means["first"] == pytest.approx(0.1) and means["middle"] == pytest.approx(0.9)
    assert means["max"] == pytest.approx(0.9) and read_dicom(tmp_path / "mf.dcm").frames == 3


# ---- issue 27: whatever is wrong in one file is that file's skip reason, or a noted fallback ----

def _with_lut_item(source, target, sequence: str, **item_values):
    """``source`` with a one-item Modality/VOI LUT Sequence whose item holds only ``item_values``."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(source)
    item = Dataset()
    for name, value in item_values.items():
        setattr(item, name, value)
    setattr(ds, sequence, Sequence([item]))
    if sequence == "VOILUTSequence":
        del ds.WindowCenter, ds.WindowWidth
    ds.save_as(target)
    return target


def test_a_jpeg_lossless_file_with_a_modality_lut_item_without_descriptor_uses_its_rescale(tmp_path):
    """The file that stopped a hospital: valid JPEG Lossless, a Modality LUT Sequence item without LUT Descriptor
    (pydicom's apply_modality_lut raised TypeError, which escaped the reader)."""
    folder, _ = manifest()
    path = _with_lut_item(folder / "RG2_JPLL.dcm", tmp_path / "mlut.dcm", "ModalityLUTSequence",
                          ModalityLUTType="US")
    image = read_dicom(path)
    assert image.notes == ["malformed Modality LUT: ignored, rescale used"]
    plain = read_dicom(folder / "RG2_JPLL.dcm")
    assert np.allclose(image.pixels, plain.pixels)  # the rescale (slope 1, intercept 0) gives the same image


def test_a_malformed_voi_lut_falls_back_to_the_percentile_window(tmp_path):
    write_dicom(tmp_path / "src.dcm", np.random.default_rng(0).random((32, 32)).astype(np.float32))
    path = _with_lut_item(tmp_path / "src.dcm", tmp_path / "voi.dcm", "VOILUTSequence", LUTDescriptor=[4096, 0, 16])
    image = read_dicom(path)
    assert image.window == "percentile" and image.notes == ["malformed VOI LUT: ignored, percentile window used"]
    assert 0.3 < image.pixels.mean() < 0.7


@pytest.mark.parametrize("rows, cols, frames, reason", [
    (60000, 60000, 1000, "over 16384 a side"),
    (4000, 4000, 1000, "over the 1 GiB bound"),
    (0, 64, 1, "no image size"),
    (64, 64, 0, "NumberOfFrames is 0"),
])
def test_absurd_dimensions_are_refused_before_any_pixel_is_decoded(tmp_path, monkeypatch, rows, cols, frames, reason):
    write_dicom(tmp_path / "src.dcm", np.zeros((64, 64), np.float32))
    ds = pydicom.dcmread(tmp_path / "src.dcm")
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.save_as(tmp_path / "huge.dcm")
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(lambda self: pytest.fail("decoded")))
    with pytest.raises(ImageReadError, match=reason):
        read_dicom(tmp_path / "huge.dcm")


def test_a_non_finite_rescale_is_ignored_with_a_note(tmp_path):
    write_dicom(tmp_path / "src.dcm", np.random.default_rng(0).random((32, 32)).astype(np.float32))
    ds = pydicom.dcmread(tmp_path / "src.dcm")
    ds.RescaleSlope = "nan"
    ds.save_as(tmp_path / "nan.dcm")
    image = read_dicom(tmp_path / "nan.dcm")
    assert image.notes == ["malformed rescale slope/intercept: ignored"] and np.isfinite(image.pixels).all()
