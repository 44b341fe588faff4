"""DP-SGD step throughput against non-private SGD: same model, batch and input, one run.

    python benchmarks/dp_step.py [--steps 20] [--json FILE]

Prints images/s for both and their ratio per model. Opacus' default hooks mode
materialises every per-sample gradient (B x parameters), so the ratio falls as
the model grows; this is the baseline issue 7's faster clipping must beat.
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

from client.training import TrainSettings, train_local  # noqa: E402
from common.models import build_model, pick_device  # noqa: E402

CASES = (("cnn", 64, 64), ("cnn", 128, 64), ("resnet18", 64, 32))


def throughput(model_name: str, size: int, batch: int, steps: int, dp: bool) -> float:
    rng = np.random.default_rng(0)
    n = batch * steps
    images = rng.random((n, 1, size, size), dtype=np.float32)
    labels = rng.integers(0, 2, n).astype(np.int64)
    model = build_model(model_name, 1, 2)
    settings = TrainSettings(epochs=1, batch_size=batch, lr=0.1, dp=dp, noise_multiplier=1.0, seed=0)
    train_local(model, images[: batch * 2], labels[: batch * 2], settings, pick_device())  # warm-up
    start = time.perf_counter()
    train_local(model, images, labels, settings, pick_device())
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    print(f"device {pick_device()}, {torch.get_num_threads()} threads")
    print(f"{'model':<10} {'input':>6} {'batch':>5} {'non-DP img/s':>13} {'DP img/s':>9} {'DP/non-DP':>9}")
    for model_name, size, batch in CASES:
        plain = throughput(model_name, size, batch, args.steps, dp=False)
        private = throughput(model_name, size, batch, args.steps, dp=True)
        rows.append({"model": model_name, "input": size, "batch": batch, "non_dp": plain, "dp": private,
                     "ratio": private / plain})
        print(f"{model_name:<10} {size:>6} {batch:>5} {plain:>13.1f} {private:>9.1f} {private / plain:>9.2f}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
