"""Shared fixtures: small generated data (always there) and the shared real data (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _procs import Processes

from common.phantoms import write_demo_sites

SHARED = Path(os.environ.get("FEDRAD_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests (and the processes they start) use their own decode cache, never ~/.cache."""
    os.environ["FEDRAD_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def demo_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two small hospitals of synthetic DICOM phantoms (one MONOCHROME1, RLE)."""
    return write_demo_sites(tmp_path_factory.mktemp("demo"), num_sites=2, per_site=40, size=48, seed=1)


@pytest.fixture
def small_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(120, 1))
    images = (rng.random((120, 28, 28)) * 100 + labels[:, :, None] * 120).astype(np.uint8)
    path = tmp_path / "tiny.npz"
    np.savez(path, train_images=images[:100], train_labels=labels[:100], val_images=images[100:],
             val_labels=labels[100:])
    return path


def shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture
def procs():
    """Real processes a test starts (tests/_procs.py): all killed at its end, descendants too, even on failure."""
    running = Processes()
    yield running
    running.stop()
