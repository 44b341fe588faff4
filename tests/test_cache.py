"""Decode once: training reads the cache, and only changed files are decoded again."""

import shutil

import numpy as np
import pytest

import common.cache
from common.cache import FolderCache
from common.data import LabelTable, forget_loaded, load_images, scan_folder

CLASSES = ["normal", "pneumonia"]


@pytest.fixture
def site(demo_sites, tmp_path):
    folder = tmp_path / "site"
    shutil.copytree(demo_sites[1], folder)  # MONOCHROME1, RLE
    return folder


@pytest.fixture
def decode_count(monkeypatch):
    """The files handed to the decoder (its worker processes do the reading)."""
    calls = []
    real = common.cache.decode_files
    monkeypatch.setattr(common.cache, "decode_files", lambda root, paths, *a, **k: calls.extend(paths) or
                        real(root, paths, *a, **k))
    return calls


def test_second_load_decodes_nothing(site, decode_count, tmp_path):
    first = load_images(site, 32, 1, CLASSES)
    assert len(decode_count) == 40
    forget_loaded()  # a new process, a later round
    second = load_images(site, 32, 1, CLASSES)
    assert len(decode_count) == 40  # nothing decoded again
    np.testing.assert_allclose(first.images, second.images, atol=1e-3)  # float16 storage
    assert first.keys == second.keys and np.array_equal(first.groups, second.groups)


def test_only_changed_files_are_decoded_again(site, decode_count):
    table, _ = LabelTable.read(site)
    cache = FolderCache(site, 32, 1)
    _, decoded = cache.update(table.files(site.resolve()))
    assert decoded == 40
    written = (cache.images_path.stat().st_mtime_ns, cache.index_path.stat().st_mtime_ns)
    _, decoded = cache.update(table.files(site.resolve()))
    assert decoded == 0
    assert (cache.images_path.stat().st_mtime_ns, cache.index_path.stat().st_mtime_ns) == written  # not rewritten
    (site / "images" / "img-0003.dcm").touch()  # same content, new mtime
    _, decoded = cache.update(table.files(site.resolve()))
    assert decoded == 0
    shutil.copy(site / "images" / "img-0005.dcm", site / "images" / "img-0004.dcm")  # new content
    items, decoded = cache.update(table.files(site.resolve()))
    assert decoded == 1
    fresh = scan_folder(site, table, 32, 1)
    for cached, direct in zip(items, fresh):
        assert cached.rel == direct.rel
        np.testing.assert_allclose(cached.pixels, direct.pixels, atol=1e-3)


def test_other_preprocessing_gets_its_own_cache(site):
    assert FolderCache(site, 32, 1).dir != FolderCache(site, 64, 1).dir
    assert FolderCache(site, 32, 1).dir != FolderCache(site, 32, 3).dir
    assert FolderCache(site, 32, 1).dir == FolderCache(site, 32, 1).dir


def test_cache_stores_no_raw_patient_ids(site):
    load_images(site, 32, 1, CLASSES)
    index = FolderCache(site, 32, 1).index_path.read_text()
    assert "H2P0" not in index  # phantom patient ids look like H2P0001
