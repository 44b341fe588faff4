"""Augmentation cost on CPU at 224 x 224, batch 64, measured in one run.

    python benchmarks/augment_speed.py [--batch 64] [--size 224] [--json FILE]

1. fedrad's BatchAugment (all seven techniques on, per-sample parameters) on one batch;
2. one DP-SGD training step of the CNN on the same batch (fedrad's DP step, client/dpsgd.py);
3. the same seven transforms from torchvision v2, applied per image (v2 draws one
   parameter set per call, so per-sample randomness needs a call per image).
Prints the augmentation's share of (augmentation + DP step) and its speed-up over (3).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.augmentation import AugmentConfig, BatchAugment  # noqa: E402
from client.training import TrainSettings, train_local  # noqa: E402
from common.models import build_model  # noqa: E402

ALL_ON = AugmentConfig(rotation_p=1, rotation_deg=10, translate_p=1, translate=0.05, zoom_p=1, zoom=0.1,
                       flip_ud_p=0.5, intensity_p=1, brightness=0.1, contrast=0.2, gamma=0.2, noise_p=1,
                       noise_std=0.03, quantum_photons=400, elastic_p=1, elastic_alpha=0.02)


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def torchvision_pipeline():
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomRotation(10),
        v2.RandomAffine(degrees=0, translate=(0.05, 0.05), scale=(0.9, 1.1)),
        v2.RandomVerticalFlip(0.5),
        v2.ColorJitter(brightness=0.1, contrast=0.2),
        v2.Lambda(lambda t: v2.functional.adjust_gamma(t, float(np.random.uniform(0.8, 1.2)))),
        v2.GaussianNoise(sigma=0.03, clip=True),
        v2.ElasticTransform(alpha=50.0, sigma=5.0),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--json")
    args = parser.parse_args()
    x = torch.rand(args.batch, 1, args.size, args.size)
    augment = BatchAugment(ALL_ON, seed=0)
    augment(x)  # warm-up
    t_aug = best_of(lambda: augment(x))

    steps = 3  # one epoch of 3 Poisson batches of expected size B; Opacus set-up amortised over them
    images = np.concatenate([x.numpy()] * steps)
    labels = np.random.default_rng(0).integers(0, 2, len(images)).astype(np.int64)
    settings = TrainSettings(1, args.batch, 0.1, dp=True, noise_multiplier=1.0)
    model = build_model("cnn", 1, 2)
    t_step = best_of(lambda: train_local(model, images, labels, settings, torch.device("cpu")), repeats=2) / steps

    pipeline = torchvision_pipeline()
    pipeline(x[0])
    t_tv = best_of(lambda: [pipeline(img) for img in x], repeats=1)

    share = t_aug / (t_aug + t_step)
    result = {"batch": args.batch, "size": args.size, "threads": torch.get_num_threads(), "augment_s": t_aug,
              "dp_step_s": t_step, "torchvision_per_image_s": t_tv, "share_of_step": share,
              "speedup_vs_torchvision": t_tv / t_aug}
    print(f"batch {args.batch} x {args.size}px, CPU, {torch.get_num_threads()} threads")
    print(f"fedrad BatchAugment (7 techniques, per sample)   {t_aug * 1000:8.1f} ms")
    print(f"one DP-SGD step, CNN (width 16)                  {t_step * 1000:8.1f} ms   "
          f"augmentation share {share:.1%} (goal <= 10%)")
    print(f"torchvision v2, same transforms, per image       {t_tv * 1000:8.1f} ms   "
          f"fedrad {t_tv / t_aug:.0f}x faster (goal >= 10x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
