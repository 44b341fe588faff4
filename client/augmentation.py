"""Training-time augmentation: seven techniques, random per sample, one resampling per batch.

All geometry (rotation, translation, zoom, reflections) is one affine map per
sample; the elastic deformation (Simard et al. 2003) adds a smooth random
displacement field; both are composed into a single ``grid_sample`` call for
the whole batch, on the device that trains. Intensity changes follow:
brightness b and contrast c around each image's mean, gamma, then noise
(Gaussian, and Poisson-like quantum noise whose variance grows with the signal,
x + sqrt(x / photons) * N(0, 1), as in X-ray detectors).

Randomness is explicit: two ``torch.Generator``s seeded by the caller (per-sample
parameters on the CPU, noise and elastic fields on the batch's device); the same
seeds give the same augmentations. Local training takes the seeds from
client/training.py ``round_randomness``: under DP from the OS, never the study
seed. Every parameter and field is drawn per sample, and how much randomness a
batch consumes depends on its size and on earlier draws only, never on pixel
values, so with unknown seeds each row's augmentation is an independent draw
whichever other rows exist. Validation and prediction never call this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from common.config import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """Probability and range of each technique (probability 0 switches it off)."""

    rotation_p: float = 0.0
    rotation_deg: float = 0.0  # uniform in [-deg, deg]
    translate_p: float = 0.0
    translate: float = 0.0  # fraction of the image side, uniform in [-t, t] per axis
    zoom_p: float = 0.0
    zoom: float = 0.0  # scale uniform in [1 - z, 1 + z]
    flip_lr_p: float = 0.0  # left-right: off for chest radiographs (the heart is on one side)
    flip_ud_p: float = 0.0
    intensity_p: float = 0.0
    brightness: float = 0.0  # additive, uniform in [-b, b]
    contrast: float = 0.0  # factor uniform in [1 - c, 1 + c]
    gamma: float = 0.0  # exponent uniform in [1 - g, 1 + g]
    noise_p: float = 0.0
    noise_std: float = 0.0  # Gaussian sd, uniform in [0, sd]
    quantum_photons: float = 0.0  # Poisson-like noise at this many photons per unit intensity; 0 = off
    elastic_p: float = 0.0
    elastic_alpha: float = 0.0  # displacement amplitude, fraction of the image side
    elastic_grid: int = 4  # control points per side of the smooth random field

    def override(self, spec: str) -> AugmentConfig:
        """Apply 'name=value name=value' overrides (a study's run config)."""
        known = {f.name: f for f in fields(self)}
        changes = {}
        for item in spec.replace(",", " ").split():
            name, _, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if name not in known or not value:
                raise ConfigError(f"augment override '{item}': use NAME=VALUE with NAME one of {', '.join(known)}")
            try:
                changes[name] = int(value) if name == "elastic_grid" else float(value)
            except ValueError:
                raise ConfigError(f"augment override '{item}': {value!r} is not a number") from None
        return replace(self, **changes)

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) > 0 for f in fields(self) if f.name.endswith("_p"))


PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    # Radiographs: small rotations and shifts, mild zoom, no left-right flip (situs), exposure changes,
    # quantum noise, gentle elastic warps (patient positioning and breathing).
    "chest-xray": AugmentConfig(
        rotation_p=0.5, rotation_deg=7, translate_p=0.5, translate=0.05, zoom_p=0.5, zoom=0.08,
        intensity_p=0.8, brightness=0.08, contrast=0.15, gamma=0.15, noise_p=0.3, noise_std=0.02,
        quantum_photons=1500, elastic_p=0.3, elastic_alpha=0.02,
    ),
    # Mammograms: left/right breasts are mirror images, so lr flips are valid; compression varies.
    "mammography": AugmentConfig(
        rotation_p=0.5, rotation_deg=10, translate_p=0.5, translate=0.05, zoom_p=0.5, zoom=0.1, flip_lr_p=0.5,
        flip_ud_p=0.5, intensity_p=0.8, brightness=0.05, contrast=0.15, gamma=0.15, noise_p=0.3, noise_std=0.01,
        quantum_photons=800, elastic_p=0.4, elastic_alpha=0.03,
    ),
    "mri": AugmentConfig(
        rotation_p=0.5, rotation_deg=10, translate_p=0.5, translate=0.08, zoom_p=0.5, zoom=0.1, flip_lr_p=0.5,
        intensity_p=0.8, brightness=0.1, contrast=0.2, gamma=0.2, noise_p=0.3, noise_std=0.03,
        elastic_p=0.3, elastic_alpha=0.03,
    ),
    "ultrasound": AugmentConfig(
        rotation_p=0.5, rotation_deg=10, translate_p=0.5, translate=0.08, zoom_p=0.5, zoom=0.12, flip_lr_p=0.5,
        intensity_p=0.8, brightness=0.1, contrast=0.25, gamma=0.2, noise_p=0.5, noise_std=0.05,
        elastic_p=0.4, elastic_alpha=0.04,
    ),
}


def resolve(preset: str, overrides: str = "") -> AugmentConfig:
    if preset not in PRESETS:
        raise ConfigError(f"augment preset '{preset}': choose from {', '.join(PRESETS)}")
    return PRESETS[preset].override(overrides) if overrides else PRESETS[preset]


class BatchAugment:
    """Per-sample random augmentation of a (B, C, H, W) batch in [0, 1].

    ``seed`` seeds the parameters, ``field_seed`` (default ``seed + 1``) the noise and elastic fields.
    """

    def __init__(self, config: AugmentConfig, seed: int = 0, field_seed: int | None = None) -> None:
        self.config = config
        self.seed = seed
        self.field_seed = seed + 1 if field_seed is None else field_seed
        self.generator = torch.Generator()  # parameters: a few numbers per sample, drawn on the CPU
        self.generator.manual_seed(seed)
        self._device_generators: dict[str, torch.Generator] = {}

    def _noise(self, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise drawn on the batch's own device (no host-to-GPU copy)."""
        key = str(like.device)
        if key not in self._device_generators:
            gen = torch.Generator(device=like.device)
            gen.manual_seed(self.field_seed)
            self._device_generators[key] = gen
        return torch.randn(shape, generator=self._device_generators[key], device=like.device, dtype=like.dtype)

    def _u(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.generator)

    def _on(self, n: int, p: float) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) < p

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """Draw every parameter for ``n`` samples (identity where a technique is off for that sample)."""
        c = self.config
        zeros, ones = torch.zeros(n), torch.ones(n)
        rot = torch.where(self._on(n, c.rotation_p), self._u(n, -c.rotation_deg, c.rotation_deg), zeros)
        shift = self._on(n, c.translate_p)
        tx = torch.where(shift, self._u(n, -c.translate, c.translate), zeros)
        ty = torch.where(shift, self._u(n, -c.translate, c.translate), zeros)
        zoom = torch.where(self._on(n, c.zoom_p), self._u(n, 1 - c.zoom, 1 + c.zoom), ones)
        flip_lr = self._on(n, c.flip_lr_p)
        flip_ud = self._on(n, c.flip_ud_p)
        inten = self._on(n, c.intensity_p)
        brightness = torch.where(inten, self._u(n, -c.brightness, c.brightness), zeros)
        contrast = torch.where(inten, self._u(n, 1 - c.contrast, 1 + c.contrast), ones)
        gamma = torch.where(inten, self._u(n, 1 - c.gamma, 1 + c.gamma), ones)
        noisy = self._on(n, c.noise_p)
        noise_std = torch.where(noisy, self._u(n, 0, c.noise_std), zeros)
        quantum = noisy & (c.quantum_photons > 0)
        elastic = self._on(n, c.elastic_p)
        return {"rotation": rot, "tx": tx, "ty": ty, "zoom": zoom, "flip_lr": flip_lr, "flip_ud": flip_ud,
                "brightness": brightness, "contrast": contrast, "gamma": gamma, "noise_std": noise_std,
                "quantum": quantum, "elastic": elastic}

    def __call__(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if not self.config.active or len(x) == 0:
            return x
        p = params or self.sample(len(x))
        return self._intensity(self._geometry(x, p), p)

    def _geometry(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Affine (rotation, zoom, reflections, translation) plus elastic field: one grid_sample."""
        n, _, h, w = x.shape
        c = self.config
        moved = (p["rotation"] != 0) | (p["tx"] != 0) | (p["ty"] != 0) | (p["zoom"] != 1) | p["flip_lr"] | \
            p["flip_ud"] | p["elastic"]
        if not bool(moved.any()):
            return x
        angle = p["rotation"] * (math.pi / 180)
        cos, sin = torch.cos(angle) / p["zoom"], torch.sin(angle) / p["zoom"]
        sx = torch.where(p["flip_lr"], -1.0, 1.0)
        sy = torch.where(p["flip_ud"], -1.0, 1.0)
        # theta maps output to input coordinates in [-1, 1]: (x_in, y_in) = R/zoom * S (x_out, y_out) - 2 t.
        theta = torch.stack([
            torch.stack([cos * sx, -sin * sy, -2 * p["tx"]], dim=1),
            torch.stack([sin * sx, cos * sy, -2 * p["ty"]], dim=1),
        ], dim=1).to(x)
        grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
        if bool(p["elastic"].any()) and c.elastic_alpha > 0:
            k = max(2, c.elastic_grid)
            coarse = self._noise(torch.Size((n, 2, k, k)), x) * (2 * c.elastic_alpha)
            coarse = coarse * p["elastic"].to(x).view(n, 1, 1, 1)
            # Bicubic to 1/8 resolution, then bilinear: as smooth to the eye, 6x cheaper than bicubic at full size.
            mid = F.interpolate(coarse, size=(max(k, h // 8), max(k, w // 8)), mode="bicubic", align_corners=True)
            field = F.interpolate(mid, size=(h, w), mode="bilinear", align_corners=True)
            grid = grid + field.permute(0, 2, 3, 1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _intensity(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        n = len(x)
        view = (n, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * p["contrast"].to(x).view(view) + mean + p["brightness"].to(x).view(view)
        x = x.clamp(0, 1) ** p["gamma"].to(x).view(view)
        std = p["noise_std"].to(x).view(view)
        quantum = p["quantum"].to(x).view(view)
        if bool((std > 0).any()) or bool(quantum.any()):
            # Gaussian (sd s) plus quantum noise (variance x / photons) are independent: one draw with
            # the summed variance s^2 + x / photons.
            variance = std**2
            if bool(quantum.any()):
                variance = variance + quantum * x / self.config.quantum_photons
            x = x + torch.sqrt(variance) * self._noise(x.shape, x)
        return x.clamp(0, 1)


def describe(p: dict[str, torch.Tensor], i: int) -> list[str]:
    """What sample ``i`` got, one short line per technique applied (for previews)."""
    lines = []
    if p["rotation"][i] != 0:
        lines.append(f"rotate {float(p['rotation'][i]):+.1f} deg")
    if p["tx"][i] != 0 or p["ty"][i] != 0:
        lines.append(f"shift {float(p['tx'][i]):+.2f},{float(p['ty'][i]):+.2f}")
    if p["zoom"][i] != 1:
        lines.append(f"zoom x{float(p['zoom'][i]):.2f}")
    if p["flip_lr"][i] or p["flip_ud"][i]:
        lines.append("flip " + "+".join(k for k in ("lr", "ud") if p[f"flip_{k}"][i]))
    if p["contrast"][i] != 1 or p["brightness"][i] != 0 or p["gamma"][i] != 1:
        lines.append(f"b{float(p['brightness'][i]):+.2f} c{float(p['contrast'][i]):.2f} g{float(p['gamma'][i]):.2f}")
    if p["noise_std"][i] > 0 or p["quantum"][i]:
        lines.append(f"noise {float(p['noise_std'][i]):.3f}" + (" +quantum" if p["quantum"][i] else ""))
    if p["elastic"][i]:
        lines.append("elastic")
    return lines or ["identity"]
