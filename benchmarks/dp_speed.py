"""DP-SGD step throughput against non-private SGD: same model, batch and input, one run.

    python benchmarks/dp_speed.py [--steps 20] [--repeats 3] [--json FILE]

For each model: images/s of non-private SGD, of fedrad's DP step (mixed ghost
clipping with book-keeping, client/dpsgd.py) and of the same step through Opacus'
hooks mode (materialises every per-sample gradient), and the ratios DP/non-DP.
Each case runs in a fresh process so its peak memory is its own: "peak MB" is the
resident-set growth over the data already loaded (CPU) or the CUDA allocator's
peak (GPU). Goals (issue 7): DP/non-DP >= 0.6 for the default model, >= 0.5 for
ResNet-18-GN. Every throughput is the best of ``--repeats`` timed epochs: for ScatterNet that is
training on its scattering features, computed once before the timing as a study does per split.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CASES = (("scatternet", 64, 64), ("cnn", 64, 64), ("cnn", 128, 64), ("resnet18", 64, 32))
MODES = ("non-DP", "mixed", "opacus")
ROOT = Path(__file__).resolve().parents[1]


def measure(model_name: str, size: int, batch: int, steps: int, repeats: int, mode: str) -> dict:
    """Run in a child process: best-of-``repeats`` images/s and peak memory of one configuration."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from client.training import TrainSettings, train_local
    from common.models import build_model, fixed_features, pick_device, split_frontend

    device = pick_device()
    rng = np.random.default_rng(0)
    n = batch * steps
    images = rng.random((n, 1, size, size), dtype=np.float32)
    labels = rng.integers(0, 2, n).astype(np.int64)
    model = build_model(model_name, 1, 2)
    settings = TrainSettings(epochs=1, batch_size=batch, lr=0.05, dp=mode != "non-DP", noise_multiplier=1.0,
                             seed=0, clipping="opacus" if mode == "opacus" else "mixed")
    frontend, _ = split_frontend(model)
    if frontend is not None:  # ScatterNet: its features are computed once per split before training, as in a study
        fixed_features(frontend, images, device)
    train_local(model, images[: batch * 2], labels[: batch * 2], settings, device)  # warm-up
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_local(model, images, labels, settings, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, n / (time.perf_counter() - start))
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024
    return {"images_per_s": best, "peak_mb": peak_mb, "device": str(device), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one measurement in a child process
    args = parser.parse_args()
    if args.case:
        name, size, batch, mode = args.case.split(":")
        print(json.dumps(measure(name, int(size), int(batch), args.steps, args.repeats, mode)))
        return
    rows = []
    header = (f"{'model':<10} {'input':>5} {'batch':>5} {'non-DP img/s':>12} {'fedrad DP':>9} {'ratio':>5} "
              f"{'Opacus DP':>9} {'ratio':>5} {'peak MB non-DP/fedrad/Opacus':>29}")
    print(header)
    for name, size, batch in CASES:
        found = {}
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--case", f"{name}:{size}:{batch}:{mode}",
                                  "--steps", str(args.steps), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, check=True)
            found[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        plain = found["non-DP"]["images_per_s"]
        row = {"model": name, "input": size, "batch": batch, "device": found["non-DP"]["device"],
               "threads": found["non-DP"]["threads"], "non_dp": plain,
               "fedrad": found["mixed"]["images_per_s"], "opacus": found["opacus"]["images_per_s"],
               "ratio_fedrad": found["mixed"]["images_per_s"] / plain,
               "ratio_opacus": found["opacus"]["images_per_s"] / plain,
               "peak_mb": {mode: found[mode]["peak_mb"] for mode in MODES}}
        rows.append(row)
        peaks = "/".join(f"{row['peak_mb'][m]:.0f}" for m in MODES)
        print(f"{name:<10} {size:>5} {batch:>5} {plain:>12.1f} {row['fedrad']:>9.1f} {row['ratio_fedrad']:>5.2f} "
              f"{row['opacus']:>9.1f} {row['ratio_opacus']:>5.2f} {peaks:>29}", flush=True)
    print(f"device {rows[0]['device']}, {rows[0]['threads']} threads; best of {args.repeats} epochs of {args.steps} "
          "Poisson steps (DP) or batches (non-DP)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
