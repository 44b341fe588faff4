"""Local training and evaluation at a hospital; the DP step is usable on its own.

``train_local`` runs E local epochs of SGD on the site's training split, either
non-privately or as DP-SGD (per-sample clipping to C, Gaussian noise sigma*C,
Poisson sampling at rate q = B/N; the clipped sums come from client/dpsgd.py,
sampling and accounting from Opacus). FedProx's proximal term
mu/2 ||w - w_global||^2 is applied as a separate data-independent step
w <- w - lr*mu*(w - w_global) after each optimizer step: under DP it cannot go
through the per-sample gradients (it does not depend on any sample) and, being
post-processing, costs no privacy.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from client.augmentation import AugmentConfig, BatchAugment
from client.augmentation import resolve as resolve_augment
from client.dpsgd import MixedGhostClipper, add_noise_and_average
from client.memory import keep_freed_memory
from client.privacy import ACCOUNTANT, History, calibrate_noise
from common.config import StudyConfig
from common.metrics import CI_METRICS, bootstrap_ci, classification_metrics, curve_data
from common.models import fixed_features, split_frontend
from common.multiclass import multiclass_metrics

# Known, harmless warnings that would otherwise fill every hospital's log each round:
# the DP randomness rule is round_randomness (OS-seeded); the hook warning fires
# because input images do not require gradients; PRV's internal RDP bound is not used for epsilon.
for pattern in ("Secure RNG turned off", "Full backward hook is firing", "Optimal order is the largest alpha"):
    warnings.filterwarnings("ignore", message=pattern)
# PRV's divide-by-zero warning at q = 1 is filtered where the accountant is (client/privacy.py).


@dataclass(frozen=True)
class TrainSettings:
    """What one call of ``train_local`` needs (taken from the StudyConfig)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    proximal_mu: float = 0.0
    dp: bool = True
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 0  # the study's: used without DP only (round_randomness)
    augment: AugmentConfig | None = None
    multiplicity: int = 1  # K augmented views per sample, gradients averaged before clipping
    clipping: str = "mixed"  # per-sample clipping: mixed ghost (client/dpsgd.py) or "opacus"

    @classmethod
    def from_study(cls, study: StudyConfig, noise_multiplier: float, seed: int) -> TrainSettings:
        """The study's training settings for one round (raises ConfigError for a bad augmentation).

        The proximal term belongs to FedProx only: ``proximal-mu`` travels in every study config,
        so it must not reach FedAvg's or FedAdam's local training."""
        proximal_mu = study.proximal_mu if study.strategy == "fedprox" else 0.0
        return cls(study.local_epochs, study.batch_size, study.lr, study.momentum, proximal_mu, study.dp,
                   noise_multiplier, study.max_grad_norm, seed,
                   resolve_augment(study.augment, study.augment_overrides), study.augment_multiplicity)


@dataclass
class TrainOutcome:
    loss: float
    steps: int
    history: History  # the accountant history after training (old + new steps)


def os_seed() -> int:
    """63 bits from the operating system's cryptographic random source (``os.urandom``)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


@dataclass(frozen=True)
class Randomness:
    """The seeds of one ``train_local`` call's random streams (made by ``round_randomness`` only).

    Each seeds its own ``torch.Generator`` (MT19937 on the CPU, Philox on CUDA): ``sampling`` the
    batches of each epoch (Poisson under DP, a shuffle without), ``noise`` the DP noise, ``augment`` the
    per-sample augmentation parameters and ``fields`` the augmentation's noise and elastic fields.
    """

    sampling: int
    noise: int
    augment: int
    fields: int

    def epoch(self, steps: int) -> torch.Generator:
        """The batch sampler's generator of the epoch that begins after ``steps`` steps (seed ``sampling + steps``)."""
        return _generator(self.sampling + steps)


def round_randomness(dp: bool, seed: int) -> Randomness:
    """Where every random draw of local training comes from: the one place that decides it.

    Under DP, the batch sampling, the Gaussian noise and the augmentation are seeded afresh from the
    operating system (``os_seed``: os.urandom) at every call, each stream with its own seed, never
    from the study's ``seed``, which the coordinator chose and knows: from it a server could compute
    the noise and subtract it, see which images each step sampled (undoing the subsampling
    amplification), and know every augmentation. With seeds no one else has, every augmentation
    parameter and field is a fresh draw, independent of every other draw and of the data (the
    augmentation consumes randomness by the batch's size and its own draws, never by pixel values), so
    a row's augmentation has the same distribution whichever other rows exist: adding an image moves
    which stream positions the later rows read, not what they can be, and one image still changes one
    clipped contribution per step (sensitivity C), as the accountant assumes.

    Without DP (a non-private baseline) everything follows the study seed, so a run is reproducible:
    epoch sampling ``seed + steps before the epoch``, augmentation ``seed``, its fields ``seed + 1``.
    """
    if dp:
        return Randomness(os_seed(), os_seed(), os_seed(), os_seed())
    return Randomness(seed, seed, seed, seed + 1)


def _generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def make_loader(images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    dataset = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=_generator(seed))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Steps of one epoch, as Opacus' Poisson loader takes them: ceil(N/B).

    Opacus sets the sample rate to q = 1/len(loader) = 1/ceil(N/B); calibration
    and budget checks must use exactly these numbers or the ledger drifts.
    """
    return max(1, math.ceil(n / batch_size))


def sample_rate(n: int, batch_size: int) -> float:
    return 1.0 / steps_per_epoch(n, batch_size)


def study_noise(study: StudyConfig, n: int, epsilon: float | None = None) -> float:
    """Noise multiplier for the whole planned study (rounds x local epochs x steps) at a site with ``n``
    training images, spending ``epsilon`` (default the study's); 0 without DP (memoised: client/privacy.py)."""
    if not study.dp:
        return 0.0
    steps = study.num_rounds * study.local_epochs * steps_per_epoch(n, study.batch_size)
    return calibrate_noise(epsilon or study.epsilon, study.delta, sample_rate(n, study.batch_size), steps)


def train_local(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    settings: TrainSettings,
    device: torch.device,
    history: History | None = None,
) -> TrainOutcome:
    """Train ``model`` in place; return mean loss, steps and the updated DP history.

    Under DP each step Poisson-samples the batch (rate q), clips every sample's
    gradient to ``max_grad_norm`` and adds Gaussian noise (client/dpsgd.py). Every
    random draw (sampling, noise, augmentation) comes from ``round_randomness``: under
    DP seeded from the OS, never from the study seed. ``settings.clipping = "opacus"``
    takes the same step through Opacus' per-sample gradients instead (for comparison).
    """
    keep_freed_memory()  # once per process: client/memory.py
    rand = round_randomness(settings.dp, settings.seed)
    if settings.dp and settings.clipping == "opacus":
        return _train_opacus(model, images, labels, settings, device, history, rand)
    model.to(device).train()
    augment, net, encode, features = _training_inputs(model, images, settings, device, rand)
    x_all = features if features is not None else torch.from_numpy(images).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    global_params = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else []
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    y_all = torch.from_numpy(labels).to(device)
    n = len(y_all)
    views = settings.multiplicity if augment else 1
    clipper = MixedGhostClipper(net, settings.max_grad_norm, settings.clipping) if settings.dp else None
    noise = _generator(rand.noise, device)
    q = sample_rate(n, settings.batch_size)
    total_loss, seen, steps = 0.0, 0, 0
    try:
        for _ in range(settings.epochs):
            for idx in _batches(n, settings, rand.epoch(steps)):
                optimizer.zero_grad(set_to_none=True)
                if len(idx):
                    x, y = x_all[idx], y_all[idx]
                    if augment:
                        # K views of each sample, rows [s0v0, s0v1, ..., s1v0, ...]: never extra dataset rows.
                        x, y = augment(x.repeat_interleave(views, 0)), y.repeat_interleave(views)
                    if encode is not None:
                        x = encode(x)
                    if clipper is None:
                        loss = nn.functional.cross_entropy(net(x), y)
                        loss.backward()
                        total_loss += float(loss.detach()) * len(idx)
                    else:
                        with clipper.capture():
                            loss = nn.functional.cross_entropy(net(x), y, reduction="sum") / views
                        clipper.clipped_sum(loss, len(idx), views)
                        total_loss += float(loss.detach())
                    seen += len(idx)
                if clipper is not None:
                    # An empty Poisson batch still takes a (pure-noise) step: skipping it
                    # would make the real sampling differ from what the accountant assumes.
                    add_noise_and_average(params, settings.noise_multiplier, settings.max_grad_norm, q * n, noise)
                optimizer.step()
                steps += 1
                _proximal_step(params, global_params, settings)
    finally:
        if clipper is not None:
            clipper.remove()
    new_history = list(history or [])
    if settings.dp:
        new_history.append((float(settings.noise_multiplier), float(q), int(steps)))
    return TrainOutcome(total_loss / max(seen, 1), steps, new_history)


def _training_inputs(model: nn.Module, images: np.ndarray, settings: TrainSettings, device: torch.device,
                     rand: Randomness) -> tuple[BatchAugment | None, nn.Module, nn.Module | None, Tensor | None]:
    """(augment, net, encode, features) for one training call.

    ``net`` is the part that trains, is clipped and noised. A fixed front-end (ScatterNet's scattering)
    runs once per split when images are not augmented (``features``, memoised) and per batch after
    augmentation when they are (``encode``); without a front-end both are None.
    """
    active = settings.augment is not None and settings.augment.active
    augment = BatchAugment(settings.augment, rand.augment, rand.fields) if active else None
    frontend, net = split_frontend(model)
    if frontend is not None and augment is None:
        return augment, net, None, fixed_features(frontend, images, device)
    return augment, net, frontend, None


def _batches(n: int, settings: TrainSettings, gen: torch.Generator) -> Iterator[Tensor]:
    """One epoch of batch indices: Poisson-sampled at q = 1/ceil(N/B), ceil(N/B) times, under DP
    (Opacus' sampler, as the accountant assumes); a shuffled partition into batches of B without."""
    if settings.dp:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # on first use: client/privacy.py

        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate(n, settings.batch_size),
                                                generator=gen, steps=steps_per_epoch(n, settings.batch_size))
        for indices in sampler:
            yield torch.as_tensor(indices, dtype=torch.long)
    else:
        yield from torch.randperm(n, generator=gen).split(settings.batch_size)


def _proximal_step(params: list[nn.Parameter], global_params: list[Tensor], settings: TrainSettings) -> None:
    """FedProx: w <- w - lr*mu*(w - w_global), data-independent, so free under DP."""
    if global_params:
        with torch.no_grad():
            for p, g in zip(params, global_params):
                p.sub_(settings.lr * settings.proximal_mu * (p - g))


def _train_opacus(model: nn.Module, images: np.ndarray, labels: np.ndarray, settings: TrainSettings,
                  device: torch.device, history: History | None, rand: Randomness) -> TrainOutcome:
    """The same DP-SGD step through Opacus' hooks mode (materialises every per-sample gradient)."""
    model.to(device).train()
    # As in train_local: only the trained part goes through Opacus.
    augment, model, encode, features = _training_inputs(model, images, settings, device, rand)
    if features is not None:
        images = features.cpu().numpy()
    global_params = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu > 0 else []
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    loader = make_loader(images, labels, settings.batch_size, True, rand.sampling)
    from opacus import PrivacyEngine  # on first use: client/privacy.py

    engine = PrivacyEngine(accountant=ACCOUNTANT)
    engine.accountant.history = list(history or [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # make_private repeats the warnings filtered above
        net, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True,
            noise_generator=_generator(rand.noise),
        )
    criterion = nn.CrossEntropyLoss()
    views = settings.multiplicity if augment else 1
    total_loss, seen, steps = 0.0, 0, 0
    for _ in range(settings.epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            if len(y):
                if augment:
                    x, y_views = augment(x.repeat_interleave(views, 0)), y.repeat_interleave(views)
                else:
                    y_views = y
                if encode is not None:
                    x = encode(x)
                loss = criterion(net(x), y_views)
                loss.backward()
                if views > 1:
                    _average_views(model, len(y), views)
                total_loss += float(loss.detach()) * len(y)
                seen += len(y)
            optimizer.step()
            steps += 1
            _proximal_step(list(model.parameters()), global_params, settings)
    net.remove_hooks()
    new_history = list(history or [])
    # Opacus merges consecutive steps with equal (sigma, q) into one history entry;
    # append this call's steps as one entry of their own so the ledger only grows.
    sigma, q, _ = engine.accountant.history[-1]
    recorded = sum(h[2] for h in engine.accountant.history) - sum(h[2] for h in new_history)
    if recorded != steps:
        raise RuntimeError(f"accountant recorded {recorded} steps, training took {steps}")
    new_history.append((float(sigma), float(q), int(steps)))
    return TrainOutcome(total_loss / max(seen, 1), steps, new_history)


def _average_views(model: nn.Module, batch: int, views: int) -> None:
    """Augmentation multiplicity (De et al. 2022): each sample's gradient is the mean over its K
    views, taken before Opacus clips it, so one sample is still one clipped contribution and the
    privacy accounting is unchanged."""
    for p in model.parameters():
        grad_sample = getattr(p, "grad_sample", None)
        if grad_sample is not None:
            p.grad_sample = grad_sample.view(batch, views, *grad_sample.shape[1:]).mean(dim=1)


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, K) for images (N, C, S, S) (a fixed front-end's output memoised per split)."""
    model.to(device).eval()
    frontend, net = split_frontend(model)
    inputs = fixed_features(frontend, images, device) if frontend is not None else None
    out = []
    for start in range(0, len(images), batch_size):
        if inputs is not None:
            logits = net(inputs[start : start + batch_size])
        else:
            logits = model(torch.from_numpy(images[start : start + batch_size]).to(device))
        out.append(torch.softmax(logits, dim=1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device,
             curves: bool = False, intervals: bool = False, ordinal: bool = False) -> dict[str, Any]:
    """Loss and classification metrics of ``model`` on one split; with ``curves`` also ROC,
    confusion and calibration summaries, with ``intervals`` 95% bootstrap intervals
    (``<metric>-ci95`` = [low, high], NaN where undefined); with more than two classes the per-class
    and macro AUC, with ``ordinal`` grades the quadratic weighted kappa (common/multiclass.py):
    numbers a site may share, never its predictions."""
    probs = predict_proba(model, images, device)
    eps = 1e-7
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0)))) if len(labels) else 0.0
    result: dict[str, Any] = {"loss": loss, **classification_metrics(probs, labels)}
    if curves:
        result.update(curve_data(probs, labels))
    if intervals:
        found = bootstrap_ci(probs, labels, draws=200)
        for name in CI_METRICS:
            result[f"{name}-ci95"] = list(found.get(name, (float("nan"), float("nan"))))
    result.update(multiclass_metrics(probs, labels, ordinal, intervals))
    return result
