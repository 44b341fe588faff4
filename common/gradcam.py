"""Grad-CAM (Selvaraju et al. 2017): where in the image the model found its evidence.

For class c, the map is ReLU(sum_k alpha_k A_k) with A_k the k-th channel of
the last convolutional block's output and alpha_k = mean over positions of
dy_c / dA_k. It is upsampled to the input size and scaled to [0, 1] per image.
Works batched: GroupNorm normalises each sample on its own, so the gradients of
a summed batch score are each sample's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.models import ResNet18GN, ScatterNet, SmallCNN


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block of fedrad's architectures (ScatterNet: the last at 1/8 resolution)."""
    if isinstance(model, SmallCNN):
        return model.features
    if isinstance(model, ScatterNet):
        return model.body.cam_layer
    if isinstance(model, ResNet18GN):
        return model.layers
    raise ValueError(f"no Grad-CAM target layer known for {type(model).__name__}")


def grad_cam(model: nn.Module, images: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Heatmaps (B, H, W) in [0, 1] for ``classes`` (default: each image's predicted class)."""
    model.eval()
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["a"] = output

    handle = target_layer(model).register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(images)
            chosen = logits.argmax(dim=1) if classes is None else classes.to(images.device)
            model.zero_grad(set_to_none=True)
            logits.gather(1, chosen.view(-1, 1)).sum().backward()
    finally:
        handle.remove()
    activations = captured["a"]
    weights = activations.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp(min=1e-12).view(-1, 1, 1)
    return cam / peak
