"""Issue 24 item 5: under DP no one else can derive the randomness (client/training.py round_randomness).

Poisson sampling, the Gaussian noise and the augmentation are seeded from the operating system
(os.urandom), never from the study seed the coordinator chose; without DP the study seed keeps a
baseline reproducible.
"""

import os

import numpy as np
import pytest
import torch

from client.augmentation import AugmentConfig, BatchAugment, resolve
from client.training import TrainSettings, round_randomness, train_local
from common.models import build_model

AUGMENT = resolve("chest-xray")
ALL_ON = AugmentConfig(rotation_p=1, rotation_deg=20, translate_p=1, translate=0.1, zoom_p=1, zoom=0.2, flip_lr_p=0.5,
                       flip_ud_p=0.5, intensity_p=1, brightness=0.1, contrast=0.2, gamma=0.2, noise_p=0.5,
                       noise_std=0.05, quantum_photons=100, elastic_p=0.5, elastic_alpha=0.03)


def _data(n: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n).astype(np.int64)
    return rng.random((n, 1, size, size), dtype=np.float32), labels


def _trained(images: np.ndarray, labels: np.ndarray, settings: TrainSettings) -> torch.Tensor:
    """The weights after ``train_local`` from fixed initial weights."""
    torch.manual_seed(0)
    model = build_model("cnn", 1, 2)
    train_local(model, images, labels, settings, torch.device("cpu"))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _fake_urandom(monkeypatch: pytest.MonkeyPatch) -> None:
    """os.urandom made a counter (restarted for each training): the same 'OS' bytes for both runs."""
    count = iter(range(1, 1 << 30))
    monkeypatch.setattr(os, "urandom", lambda k: next(count).to_bytes(k, "little"))


@pytest.mark.parametrize("clipping", ["mixed", "opacus"])
def test_under_dp_every_draw_comes_from_os_urandom_and_none_from_the_seed(monkeypatch, clipping):
    """Sampling (N > B: q < 1), noise and augmentation: with os.urandom's bytes fixed, two DP trainings
    with different study seeds are identical, so no draw depends on the seed, and every draw is the OS's."""
    images, labels = _data(40)
    runs = []
    for seed in (1, 2):
        _fake_urandom(monkeypatch)
        settings = TrainSettings(2, 16, 0.1, dp=True, noise_multiplier=1.0, seed=seed, augment=AUGMENT,
                                 clipping=clipping)
        runs.append(_trained(images, labels, settings))
    assert torch.equal(runs[0], runs[1])


def test_dp_augmentation_differs_between_trainings_from_one_seed():
    """No noise and q = 1 (N <= B, every image in every step): only the augmentation is random, and two
    DP trainings from the same study seed and data still differ: its draws are not the seed's."""
    images, labels = _data(8)
    settings = TrainSettings(2, 8, 0.1, dp=True, noise_multiplier=0.0, seed=5, augment=AUGMENT)
    assert not torch.equal(_trained(images, labels, settings), _trained(images, labels, settings))


def test_non_dp_training_with_augmentation_follows_the_seed():
    images, labels = _data(40)
    runs = [_trained(images, labels, TrainSettings(2, 16, 0.1, dp=False, seed=s, augment=AUGMENT)) for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_the_rule_in_one_place(monkeypatch):
    """round_randomness: four streams with seeds of their own from os.urandom under DP; the seed without."""
    private = [round_randomness(True, 7) for _ in range(2)]
    assert private[0] != private[1]
    seeds = [private[0].sampling, private[0].noise, private[0].augment, private[0].fields]
    assert len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert round_randomness(False, 7) == round_randomness(False, 7)
    assert (round_randomness(False, 7).sampling, round_randomness(False, 7).fields) == (7, 8)
    monkeypatch.setattr(os, "urandom", lambda k: b"\x02" * k)
    assert round_randomness(True, 7).noise == int.from_bytes(b"\x02" * 8, "little") >> 1


def test_augmentation_draws_do_not_depend_on_pixel_values():
    """How much randomness a batch consumes depends on its size (and earlier draws), never on its pixels,
    so each row's augmentation is a fresh draw whatever the other rows hold: after batches of equal size
    but other images, the same seeds give the next batch the same augmentation."""
    rng = np.random.default_rng(1)
    first = [torch.from_numpy(rng.random((6, 1, 16, 16), dtype=np.float32)) for _ in range(2)]
    first[1][:3] = 0  # dark images: no quantum noise variance, nothing moved to the border
    following = torch.from_numpy(rng.random((5, 1, 16, 16), dtype=np.float32))
    outs = []
    for x in first:
        augment = BatchAugment(ALL_ON, seed=11, field_seed=12)
        augment(x)
        outs.append(augment(following))
    assert torch.equal(outs[0], outs[1])
