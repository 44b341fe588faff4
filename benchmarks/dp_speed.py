"""DP-SGD step throughput against non-private SGD: same model, batch and input, one run.

    python benchmarks/dp_speed.py [--steps N] [--repeats 5] [--json FILE]

For each model: images/s of non-private SGD, of fedrad's DP step (mixed ghost
clipping with book-keeping, client/dpsgd.py) and of the same step through Opacus'
hooks mode (materialises every per-sample gradient), and the ratios DP/non-DP.
The three are timed in one process, interleaved (non-DP, fedrad, Opacus, then the
next repeat in rotated order), so a machine that speeds up or slows down during the
run (shared CPUs do) moves all three alike; each throughput is the best of
``--repeats`` timed epochs. Peak memory is measured separately, one process per
mode, so each peak is its own: the resident-set growth over the data already loaded
(CPU) or the CUDA allocator's peak (GPU). Goals (issue 7): DP/non-DP >= 0.6 for the
default model, >= 0.5 for ResNet-18-GN. ScatterNet trains on its scattering features,
computed once before the timing as a study does per split.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

# (model, input px, batch, steps per timed epoch): enough steps for an epoch of ~2 s non-private.
CASES = (("scatternet", 64, 64, 60), ("cnn", 64, 64, 40), ("cnn", 128, 64, 20), ("resnet18", 64, 32, 20))
MODES = ("non-DP", "mixed", "opacus")
ROOT = Path(__file__).resolve().parents[1]


def _setup(model_name: str, size: int, batch: int, steps: int, modes: tuple[str, ...]):
    """Data, device and, per mode, a fresh model with its training settings (features precomputed)."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from client.training import TrainSettings
    from common.models import build_model, fixed_features, pick_device, split_frontend

    device = pick_device()
    rng = np.random.default_rng(0)
    n = batch * steps
    images = rng.random((n, 1, size, size), dtype=np.float32)
    labels = rng.integers(0, 2, n).astype(np.int64)
    runs = {}
    for mode in modes:
        model = build_model(model_name, 1, 2)
        settings = TrainSettings(epochs=1, batch_size=batch, lr=0.05, dp=mode != "non-DP", noise_multiplier=1.0,
                                 seed=0, clipping="opacus" if mode == "opacus" else "mixed")
        runs[mode] = (model, settings)
    frontend, _ = split_frontend(runs[modes[0]][0])
    if frontend is not None:  # ScatterNet: features once per split before training, as in a study
        fixed_features(frontend, images, device)
    return images, labels, device, runs


def _epoch(model, settings, images, labels, device) -> float:
    import torch

    from client.training import train_local

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_local(model, images, labels, settings, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def measure_speed(model_name: str, size: int, batch: int, steps: int, repeats: int) -> dict:
    """Child process: best-of-``repeats`` images/s of every mode, the modes interleaved."""
    import torch

    from client.training import train_local

    images, labels, device, runs = _setup(model_name, size, batch, steps, MODES)
    for model, settings in runs.values():  # warm-up
        train_local(model, images[: batch * 2], labels[: batch * 2], settings, device)
    best = dict.fromkeys(MODES, 0.0)
    for r in range(repeats):
        for mode in MODES[r % len(MODES):] + MODES[: r % len(MODES)]:
            model, settings = runs[mode]
            best[mode] = max(best[mode], _epoch(model, settings, images, labels, device))
    return {"images_per_s": best, "device": str(device), "threads": torch.get_num_threads()}


def measure_memory(model_name: str, size: int, batch: int, steps: int, mode: str) -> dict:
    """Child process: peak memory of training one mode (a short warm-up, then an epoch)."""
    import torch

    from client.training import train_local

    images, labels, device, runs = _setup(model_name, size, batch, steps, (mode,))
    model, settings = runs[mode]
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # data, model (and features) loaded
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_local(model, images[: batch * 2], labels[: batch * 2], settings, device)
    _epoch(model, settings, images, labels, device)
    if device.type == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024}


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0, help="steps per timed epoch for every case "
                        "(default: per case, ~2 s of non-private training each)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every case's steps (e.g. 0.2)")
    parser.add_argument("--json")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one measurement in a child process
    args = parser.parse_args()
    if args.case:
        name, size, batch, steps, mode = args.case.split(":")
        if mode == "speed":
            result = measure_speed(name, int(size), int(batch), int(steps), args.repeats)
        else:
            result = measure_memory(name, int(size), int(batch), int(steps), mode)
        print(json.dumps(result))
        return
    rows = []
    header = (f"{'model':<10} {'input':>5} {'batch':>5} {'non-DP img/s':>12} {'fedrad DP':>9} {'ratio':>5} "
              f"{'Opacus DP':>9} {'ratio':>5} {'peak MB non-DP/fedrad/Opacus':>29}")
    print(header)
    for name, size, batch, steps in CASES:
        steps = max(2, round((args.steps or steps) * args.steps_scale))
        speed = _child("--case", f"{name}:{size}:{batch}:{steps}:speed", "--repeats", str(args.repeats))
        ips = speed["images_per_s"]
        peaks = {mode: _child("--case", f"{name}:{size}:{batch}:{min(steps, 10)}:{mode}")["peak_mb"]
                 for mode in MODES}
        plain = ips["non-DP"]
        row = {"model": name, "input": size, "batch": batch, "steps": steps, "device": speed["device"],
               "threads": speed["threads"], "non_dp": plain, "fedrad": ips["mixed"], "opacus": ips["opacus"],
               "ratio_fedrad": ips["mixed"] / plain, "ratio_opacus": ips["opacus"] / plain, "peak_mb": peaks}
        rows.append(row)
        peak_text = "/".join(f"{peaks[m]:.0f}" for m in MODES)
        print(f"{name:<10} {size:>5} {batch:>5} {plain:>12.1f} {row['fedrad']:>9.1f} {row['ratio_fedrad']:>5.3f} "
              f"{row['opacus']:>9.1f} {row['ratio_opacus']:>5.3f} {peak_text:>29}", flush=True)
    print(f"device {rows[0]['device']}, {rows[0]['threads']} threads; best of {args.repeats} interleaved epochs "
          "per mode (Poisson steps under DP, batches without)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
