import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from client.training import TrainSettings, train_local
from common.models import build_model


@pytest.mark.parametrize("name", ["scatternet", "cnn", "resnet18"])
@pytest.mark.parametrize("channels, classes", [(1, 2), (3, 5)])
def test_models_are_dp_compatible_for_any_input_and_classes(name, channels, classes):
    model = build_model(name, channels, classes)
    assert ModuleValidator.validate(model, strict=False) == []
    assert model(torch.rand(2, channels, 32, 32)).shape == (2, classes)


def test_resnet18_trains_under_opacus_hooks():
    """No in-place op on a hooked activation (opacus#828): DP training runs and changes the weights."""
    rng = np.random.default_rng(0)
    images = rng.random((8, 3, 32, 32), dtype=np.float32)
    labels = rng.integers(0, 4, 8).astype(np.int64)
    model = build_model("resnet18", 3, 4)
    before = model.head.weight.detach().clone()
    out = train_local(model, images, labels, TrainSettings(1, 4, 0.1, dp=True, noise_multiplier=1.0),
                      torch.device("cpu"))
    assert out.steps == 2 and not torch.equal(before, model.head.weight)


def test_scatternet_trains_only_its_body_and_ships_only_that():
    """The scattering front-end has no parameters and no state: model.pt and every update hold the body only.
    Its features are computed once per split and reused (the same tensor); the body on them is the model on
    the images, and training from them is reproducible (two runs with the same seed and no DP agree)."""
    from common.models import fixed_features

    model = build_model("scatternet", 1, 2)
    assert list(model.frontend.parameters()) == [] and all(k.startswith("body.") for k in model.state_dict())
    rng = np.random.default_rng(0)
    images = rng.random((24, 1, 32, 32), dtype=np.float32)
    labels = rng.integers(0, 2, 24).astype(np.int64)
    first = fixed_features(model.frontend, images, torch.device("cpu"))
    assert first.shape == (24, 81, 8, 8) and fixed_features(model.frontend, images, torch.device("cpu")) is first
    with torch.no_grad():
        assert torch.allclose(model.body(first), model(torch.from_numpy(images)), atol=1e-6)
    trained = []
    for _ in range(2):
        torch.manual_seed(0)
        net = build_model("scatternet", 1, 2)
        train_local(net, images, labels, TrainSettings(1, 8, 0.05, dp=False, seed=3), torch.device("cpu"))
        trained.append(net.state_dict())
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    assert not torch.equal(trained[0]["body.head.weight"], model.state_dict()["body.head.weight"])


def test_fixed_features_are_kept_on_disk_for_the_next_process(tmp_path, monkeypatch):
    """A Flower deployment runs every message in a fresh process: the second one reads the features
    from the cache instead of computing them; a damaged file is computed again and replaced."""
    from common import models

    monkeypatch.setenv("FEDRAD_CACHE", str(tmp_path))
    calls = []

    class Doubler(torch.nn.Module):
        cache_tag = "test-doubler"

        def forward(self, x):
            calls.append(len(x))
            return 2 * x

    images = np.random.default_rng(1).random((10, 1, 8, 8), dtype=np.float32)
    first = models.fixed_features(Doubler(), images, torch.device("cpu"), batch=4)
    assert calls == [4, 4, 2] and len(list((tmp_path / "features").glob("*.pt"))) == 1
    models._FEATURES.clear()  # as in a new process
    again = models.fixed_features(Doubler(), images.copy(), torch.device("cpu"))
    assert calls == [4, 4, 2] and torch.equal(again, first)
    other = images.copy()
    other[0, 0, 0, 0] += 1  # other pixels: another file
    models.fixed_features(Doubler(), other, torch.device("cpu"))
    assert len(calls) == 4 and len(list((tmp_path / "features").glob("*.pt"))) == 2
    for path in (tmp_path / "features").glob("*.pt"):
        path.write_bytes(b"damaged")
    models._FEATURES.clear()
    assert torch.equal(models.fixed_features(Doubler(), images, torch.device("cpu")), first) and len(calls) == 5


@pytest.mark.parametrize("J, shape, batch", [(2, (64, 64), 20), (2, (36, 44), 3), (3, (40, 48), 2)])
def test_batched_scattering_equals_kymatios(J, shape, batch):
    """common/scattering.py computes kymatio's transform (same paths, same order), only batched: compared with
    kymatio's own per-path loop on random images (more images than one chunk, odd sizes, a third scale)."""
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    from common.scattering import Scattering2D

    x = torch.rand(batch, 2, *shape, generator=torch.Generator().manual_seed(J))
    expected = ScatteringTorch2D(J=J, shape=shape, L=8)(x)
    got = Scattering2D(J, shape, 8)(x)
    assert got.shape == expected.shape
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
    assert Scattering2D(J, shape, 8)(torch.zeros(0, *shape)).shape == (0, *expected.shape[-3:])
