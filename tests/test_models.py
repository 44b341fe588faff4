import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from client.training import TrainSettings, train_local
from common.models import build_model


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
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
