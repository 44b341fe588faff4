"""Augmentation: per-sample random, reproducible, in range, identity when off, and free in privacy."""

import numpy as np
import pytest
import torch

from client.augmentation import PRESETS, AugmentConfig, BatchAugment, resolve
from client.training import TrainSettings, _average_views, train_local
from common.config import ConfigError
from common.models import build_model

ALWAYS = AugmentConfig(rotation_p=1, rotation_deg=20, translate_p=1, translate=0.1, zoom_p=1, zoom=0.2,
                       flip_lr_p=0.5, flip_ud_p=0.5, intensity_p=1, brightness=0.1, contrast=0.2, gamma=0.2,
                       noise_p=1, noise_std=0.05, quantum_photons=100, elastic_p=1, elastic_alpha=0.03)


def batch(n=16, size=32):
    torch.manual_seed(0)
    return torch.rand(n, 1, size, size)


def test_parameters_differ_across_the_samples_of_one_batch():
    params = BatchAugment(ALWAYS, seed=1).sample(16)
    for name in ("rotation", "tx", "ty", "zoom", "brightness", "contrast", "gamma", "noise_std"):
        assert len(torch.unique(params[name])) == 16, name
    out = BatchAugment(ALWAYS, seed=1)(batch())
    diffs = (out - batch()).flatten(1).abs().mean(1)
    assert len(torch.unique(diffs)) == 16


def test_output_shape_and_range():
    x = batch()
    for config in [ALWAYS, *PRESETS.values()]:
        out = BatchAugment(config, seed=3)(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1


def test_all_probabilities_zero_is_the_identity():
    off = ALWAYS.override("rotation_p=0 translate_p=0 zoom_p=0 flip_lr_p=0 flip_ud_p=0 intensity_p=0 noise_p=0 "
                          "elastic_p=0")
    assert not off.active
    x = batch()
    assert torch.equal(BatchAugment(off)(x), x)
    assert torch.equal(BatchAugment(PRESETS["none"])(x), x)


def test_same_seed_same_output_other_seed_other_output():
    x = batch()
    a, b, c = (BatchAugment(ALWAYS, seed=s)(x) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_reflection_alone_is_an_exact_mirror():
    x = batch(4)
    flip = AugmentConfig(flip_lr_p=1.0)
    assert torch.allclose(BatchAugment(flip)(x), torch.flip(x, dims=[3]), atol=1e-5)


def test_chest_preset_never_flips_left_right():
    assert PRESETS["chest-xray"].flip_lr_p == 0 and PRESETS["mammography"].flip_lr_p > 0


def test_overrides_and_bad_presets():
    assert resolve("chest-xray", "rotation_deg=15, elastic_p=0").rotation_deg == 15
    with pytest.raises(ConfigError, match="preset"):
        resolve("dermatology")
    with pytest.raises(ConfigError, match="override"):
        resolve("mri", "spin=3")


def test_views_are_averaged_per_sample_in_row_order():
    param = torch.nn.Parameter(torch.zeros(3))
    model = torch.nn.Module()
    model.p = param
    # 2 samples x 3 views, rows [s0v0, s0v1, s0v2, s1v0, ...]
    param.grad_sample = torch.arange(18, dtype=torch.float32).view(6, 3)
    _average_views(model, batch=2, views=3)
    assert torch.equal(param.grad_sample, torch.tensor([[3.0, 4, 5], [12, 13, 14]]))


@pytest.mark.parametrize("name", ["cnn", "scatternet"])  # scatternet: the scattering runs after augmenting
def test_multiplicity_leaves_the_privacy_accounting_unchanged(name):
    rng = np.random.default_rng(0)
    images = rng.random((48, 1, 32, 32), dtype=np.float32)
    labels = rng.integers(0, 2, 48).astype(np.int64)
    histories = []
    for k in (1, 4):
        settings = TrainSettings(2, 16, 0.1, dp=True, noise_multiplier=1.1, augment=resolve("chest-xray"),
                                 multiplicity=k)
        out = train_local(build_model(name, 1, 2), images, labels, settings, torch.device("cpu"))
        histories.append(out.history)
        assert out.steps == 2 * 3
    assert histories[0] == histories[1]  # same steps, sample rate and noise: same epsilon
