"""CNNs built the same way on the server and at every hospital.

Both models are DP-friendly as Opacus requires: GroupNorm instead of BatchNorm
(BatchNorm mixes samples, so per-sample gradients would not be per sample) and
no in-place operations on hooked activations (opacus#828).
"""

from __future__ import annotations

import pickle
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from common.atomic import atomic_write
from common.scattering import Scattering2D, scattering_maps  # kymatio is imported when one is built


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] pixels to roughly zero mean, unit scale (measured: DP-SGD stalls without it)."""
    return (x - 0.5) * 4.0


def _groupnorm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4) or 1, channels)


class SmallCNN(nn.Module):
    """Four conv blocks (conv, GroupNorm, ReLU, pool) and a linear head; width 16: ~60k parameters.

    Small on purpose: DP-SGD adds noise of the same size to every parameter, so
    the noise grows with the parameter count while the clipped signal does not,
    and a hospital without a GPU must train it in minutes. Not smaller: width 8
    (15k) reached the same DP accuracy on the chest X-ray hospitals (val AUC 0.946
    vs 0.943 at epsilon 8, in 55% of the time) but its Grad-CAM maps stopped
    pointing at the evidence (0 of 20 synthetic lesions found, width 16: 20 of 20;
    tests/test_explain.py): a model a radiologist cannot check is not the default.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 16) -> None:
        super().__init__()
        widths = [width, width * 2, width * 4, width * 4]
        layers: list[nn.Module] = []
        prev = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(prev, w, 3, padding=1, bias=False), _groupnorm(w), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            prev = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(_standardize(x))), 1))


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm and an out-of-place residual add."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm1 = _groupnorm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.norm2 = _groupnorm(out_ch)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), _groupnorm(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18GN(nn.Module):
    """ResNet-18 (He et al. 2016) with GroupNorm, accepted by Opacus' validator."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), _groupnorm(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        blocks: list[nn.Module] = []
        prev = 64
        for i, w in enumerate([64, 128, 256, 512]):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(prev, w, stride), BasicBlock(w, w)]
            prev = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.layers(self.stem(_standardize(x)))), 1))


SCATTER_J, SCATTER_L = 2, 8
SCATTER_MAPS = scattering_maps(SCATTER_J, SCATTER_L)  # 81 per channel


class ScatterFrontEnd(nn.Module):
    """Wavelet scattering (Mallat 2012; Bruna and Mallat 2013), common/scattering.py: fixed, no parameters.

    With Morlet wavelets psi at J = 2 scales and L = 8 orientations and the low-pass phi_J, each
    channel x becomes 81 maps at 1/4 of the resolution: x * phi_J (order 0), |x * psi_{j,l}| * phi_J
    (16 of order 1) and ||x * psi_{j1,l1}| * psi_{j2,l2}| * phi_J for j1 < j2 (64 of order 2).
    These are stable, translation-tolerant edge and texture features that need no training, so
    DP-SGD spends the whole budget on the small network above them (Tramer and Boneh 2021,
    "Differentially private learning needs better features"). Measured on the four chest X-ray
    hospitals at epsilon 8: val AUC 0.990 against 0.955-0.962 for the end-to-end CNN.
    """

    # Names the transform in the feature cache: maps from kymatio's own loop differ in the last float bits.
    cache_tag = f"scattering-J{SCATTER_J}-L{SCATTER_L}-batched1"

    def __init__(self) -> None:
        super().__init__()
        # One operator per input size and device, kept out of the state_dict (its filters are a function
        # of the size, not learned): model.pt holds only the trained network.
        self._ops: dict[tuple, nn.Module] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape[-2:]), str(x.device))
        op = self._ops.get(key)
        if op is None:
            op = self._ops[key] = Scattering2D(SCATTER_J, tuple(x.shape[-2:]), SCATTER_L).to(x.device)
        with torch.no_grad():
            return op(x.float().contiguous()).flatten(1, 2)


class ScatterBody(nn.Module):
    """The trained part of ScatterNet: GroupNorm over the scattering maps, three conv blocks, a linear head."""

    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        maps = in_channels * SCATTER_MAPS
        # Per-sample normalisation of the coefficients in groups of 3 maps (Tramer and Boneh): costs no privacy.
        # With colour the maps are taken path by path (forward), so a group holds one path's R, G and B maps and
        # the normalisation keeps their ratios, the image's colour. Channel by channel, each group held three maps
        # of one channel and divided out that channel's gain. Measured on tests/test_multiclass.py's 5 isoluminant
        # colour grades (2 sites, 1 round, no DP, study defaults): macro AUC 0.632 and kappa 0.000 channel by
        # channel, 0.941 and 0.858 path by path.
        self.in_channels = in_channels
        layers: list[nn.Module] = [nn.GroupNorm(27 * in_channels, maps)]
        prev = maps
        widths = [width, width * 2, width * 2]
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(prev, w, 3, padding=1, bias=False), _groupnorm(w), nn.ReLU()]
            if i == 1:
                # Grad-CAM's layer: the last block at 1/8 of the input (8 x 8 at 64 px). The last block
                # (1/16, 4 x 4) is too coarse to point at a finding: 3 of 20 synthetic lesions, this 20 of 20.
                self.cam_layer = layers[-1]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            prev = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.in_channels > 1:  # path-major: a group of the GroupNorm is one path in every channel (see __init__)
            b, _, h, w = maps.shape
            maps = maps.view(b, self.in_channels, SCATTER_MAPS, h, w).transpose(1, 2).reshape(b, -1, h, w)
        return self.head(self.features(maps).mean(dim=(2, 3)))


class ScatterNet(nn.Module):
    """Fixed scattering front-end + a small trained CNN (~80k parameters): the default model.

    ``frontend`` has no parameters; ``body`` is all that trains, is clipped and noised, and travels.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 32) -> None:
        super().__init__()
        self.frontend = ScatterFrontEnd()
        self.body = ScatterBody(in_channels, num_classes, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.frontend(x))


def split_frontend(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """(fixed front-end or None, the part that trains): training runs the latter on the former's output."""
    if isinstance(model, ScatterNet):
        return model.frontend, model.body
    return None, model


_FEATURES: OrderedDict[int, tuple[np.ndarray, torch.Tensor]] = OrderedDict()
# Kept by size, least recently used out first: 2 GiB holds every split of the four chest X-ray hospitals
# and their pooled union at 64 px (83 KB of scattering maps per 1-channel image) in one process.
_FEATURES_BUDGET = 2 * 2**30


def fixed_features(frontend: nn.Module, images: np.ndarray, device: torch.device, batch: int = 256) -> torch.Tensor:
    """``frontend`` applied to every image, memoised per array in the process and by content on disk
    (common/cache.py ``features_path``): a site's splits are transformed once, not every round or every
    process (the front-end is fixed, so the result cannot change)."""
    key = id(images)  # unambiguous while the entry holds the array
    hit = _FEATURES.get(key)
    if hit is not None and hit[1].device.type == torch.device(device).type:
        _FEATURES.move_to_end(key)
        return hit[1]
    from common.cache import features_path  # cache -> data -> dicom: imported when first needed

    stored = features_path(images, getattr(frontend, "cache_tag", type(frontend).__name__))
    found = None
    if stored is not None and stored.is_file():
        try:
            found = torch.load(stored, map_location="cpu", weights_only=True).to(device)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            found = None  # unreadable: compute it again and replace the file
        if found is not None and (found.ndim < 1 or len(found) != len(images)):
            found = None
    if found is None:
        parts = [frontend(torch.from_numpy(images[i : i + batch]).to(device)) for i in range(0, len(images), batch)]
        found = torch.cat(parts) if parts else torch.zeros(0, device=device)
        if stored is not None:
            try:
                atomic_write(stored, lambda fh: torch.save(found.cpu(), fh))
            except OSError:
                pass  # a read-only cache only costs the next process the computation
    _FEATURES[key] = (images, found)  # holding the array keeps its id from being reused
    while len(_FEATURES) > 1 and sum(f.nbytes for _, f in _FEATURES.values()) > _FEATURES_BUDGET:
        _FEATURES.popitem(last=False)
    return found


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """The one place a model is constructed from its name."""
    if name == "scatternet":
        return ScatterNet(in_channels, num_classes)
    if name == "cnn":
        return SmallCNN(in_channels, num_classes)
    if name == "resnet18":
        return ResNet18GN(in_channels, num_classes)
    raise ValueError(f"unknown model '{name}'")


def pick_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
