"""The default study, through Flower and without it, measured in one run.

    python benchmarks/federation.py [--data DIR|NPZ] [--sites 4] [--rounds 20] [--epsilon 8] [--json FILE]

Default data: the four chest X-ray DICOM hospitals of benchmarks/accuracy.py
(exported there once, reused), i.e. ``fedrad simulate --data DIR --epsilon 8``.

1. ``fedrad simulate`` (Flower's simulation engine, Ray actors): wall time,
   final aggregate val AUC, each site's final epsilon.
2. The same sites, splits, DP training and FedAvg in one process without
   Flower (sites one after another, torch on all cores): wall time and AUC.
The ratio of the two wall times is the federation overhead. Both are timed as
a user meets them, from starting a Python process to its exit (imports
included: Flower's run has its own process, so the baseline gets one too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fedavg import fedavg  # noqa: E402

from common.config import StudyConfig  # noqa: E402
from common.data import load_images, native_size, site_folders  # noqa: E402


def with_flower(args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "fedrad", "simulate", "--data", str(args.data), "--sites", str(args.sites),
           "--rounds", str(args.rounds), "--epsilon", str(args.epsilon), "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"wall_s": wall, "auc": last["aggregate"]["auc"], "epsilon": [s["epsilon"] for s in last["sites"]]}


def without_flower(args: argparse.Namespace, out: Path) -> dict:
    """One process, no Flower: the client's own functions and a plain weighted average."""
    cmd = [sys.executable, __file__, "--data", str(args.data), "--sites", str(args.sites), "--rounds",
           str(args.rounds), "--epsilon", str(args.epsilon), "--in-process", str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wall = time.perf_counter() - start
    result = json.loads(done.stdout.splitlines()[-1])
    return {**result, "wall_s": wall, "study_s": result["wall_s"]}  # study_s: without start-up and imports


def in_process(args: argparse.Namespace, out: Path) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    study = StudyConfig(num_rounds=args.rounds, epsilon=args.epsilon, data=str(args.data), out=str(out),
                        image_size=native_size(args.data) or StudyConfig().image_size, num_sites=args.sites)
    return fedavg(study, args.sites)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="default: the accuracy benchmark's four DICOM hospitals")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=StudyConfig().num_rounds,
                        help="default: the study default")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--json")
    parser.add_argument("--in-process", type=Path, help=argparse.SUPPRESS)  # the baseline's own process
    args = parser.parse_args()
    if args.in_process:
        print(json.dumps(in_process(args, args.in_process)))
        return
    if args.data is None:
        from accuracy import DEFAULT_SOURCE, DEFAULT_WORKDIR, prepare_data

        if not DEFAULT_SOURCE.exists():
            sys.exit(f"benchmark data not found: {DEFAULT_SOURCE} (set --data)")
        args.data = DEFAULT_WORKDIR / "cxr4"
        prepare_data(DEFAULT_SOURCE, args.data, num_sites=args.sites)
    if not args.data.exists():
        sys.exit(f"benchmark data not found: {args.data} (set --data)")
    # Decode once first (into the on-disk cache both runs read), so neither timing includes decoding.
    study = StudyConfig(image_size=native_size(args.data) or StudyConfig().image_size)
    for folder in site_folders(args.data) or [args.data]:
        load_images(folder, study.image_size, study.channels, study.classes)
    with tempfile.TemporaryDirectory() as tmp:
        flower = with_flower(args, Path(tmp) / "flower")
        plain = without_flower(args, Path(tmp) / "plain")
    print(f"{args.data.name}: {args.sites} sites, {args.rounds} rounds, epsilon {args.epsilon}")
    print(f"{'':<22} {'wall s':>7} {'val AUC':>8}  final epsilon per site")
    for name, r in (("fedrad simulate", flower), ("one process, no Flower", plain)):
        print(f"{name:<22} {r['wall_s']:>7.1f} {r['auc']:>8.3f}  {', '.join(f'{e:.3f}' for e in r['epsilon'])}")
    print(f"federation overhead: {flower['wall_s'] / plain['wall_s']:.2f}x the in-process wall time")
    if args.json:
        Path(args.json).write_text(json.dumps({"flower": flower, "in_process": plain}, indent=2) + "\n")


if __name__ == "__main__":
    main()
