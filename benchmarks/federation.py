"""The default study, through Flower and without it, measured in one run.

    python benchmarks/federation.py [--data DIR|NPZ] [--sites 4] [--rounds 20] [--epsilon 8] [--repeats 2]
                                    [--json FILE]

Default data: the four chest X-ray DICOM hospitals of benchmarks/accuracy.py
(exported there once, reused), i.e. ``fedrad simulate --data DIR --epsilon 8``.

1. ``fedrad simulate`` (Flower's simulation engine, with the backend it picks
   on this machine: inline with fewer cores than sites): wall time, final
   aggregate val AUC, each site's final epsilon.
2. The same sites, splits, DP training and FedAvg in one process without
   Flower (sites one after another, torch on all cores): wall time and AUC.
3. Where 1 did not pick Ray: ``fedrad simulate --backend ray``, the same study
   in Ray actors, so the table shows what Ray costs.
4. ``fedrad simulate --secure-aggregation``: 1 with Flower's SecAgg+ (server/secagg.py:
   four message exchanges a round instead of one, masking at each site), so the table
   shows what secure aggregation costs a round and whether its AUC matches 1's.
The ratio of 1's wall time to 2's is the federation overhead. Each side's rounds
are timed too (Flower's from metrics.jsonl), splitting it into a per-round part
(the median of rounds 2..N: round 1 includes first loads and imports) and the
rest (start-up, round 1, exit: the wall time less rounds 2..N). Both are timed as
a user meets them, from starting a Python process to its exit (imports
included: Flower's run has its own process, so the baseline gets one too).
With ``--repeats N`` the two run N times each, alternating (Flower first, then
the baseline first, ...): on a shared machine the same Flower study took 228 s
and 245 s ten minutes apart, so one run of each measures the machine's drift as
much as Flower. The overhead is the geometric mean of the N pairs' ratios (the
i-th Flower run over the i-th baseline run): in the order F P | P F a steady
drift makes the first pair's ratio as much too low as the second's too high,
and the mean cancels it (each side's fastest run does not: it picks the
faster end of the hour for one side). The fastest runs' ratio is printed too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fedavg import fedavg, load_sites  # noqa: E402

from client.training import study_noise  # noqa: E402
from common.config import StudyConfig  # noqa: E402
from common.data import native_size  # noqa: E402
from fedrad.simulation import choose_backend  # noqa: E402


def with_flower(args: argparse.Namespace, out: Path, *options: str) -> dict:
    cmd = [sys.executable, "-m", "fedrad", "simulate", "--data", str(args.data), "--sites", str(args.sites),
           "--rounds", str(args.rounds), "--epsilon", str(args.epsilon), "--out", str(out), *options]
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    backend = re.search(r"federated, (\w+) backend", done.stdout)
    return {"wall_s": wall, "auc": rows[-1]["aggregate"]["auc"], "epsilon": [s["epsilon"] for s in rows[-1]["sites"]],
            "round_s": [r["seconds"] for r in rows], "backend": backend.group(1) if backend else "?"}


def with_ray(args: argparse.Namespace, out: Path) -> dict:
    return with_flower(args, out, "--backend", "ray")


def with_secure_aggregation(args: argparse.Namespace, out: Path) -> dict:
    return with_flower(args, out, "--secure-aggregation")


FLOWER_SIDES = ("flower", "flower_secagg", "flower_ray")  # each compared with the one-process baseline


def sides(ray_row: bool) -> list[tuple[str, Callable[[argparse.Namespace, Path], dict]]]:
    """The runs of one repeat, in order: Flower, Flower with secure aggregation, Flower on Ray (``ray_row``:
    where Flower's own pick was not Ray), the one-process baseline. Repeats alternate this order and its
    reverse, so each Flower side's pairs with the baseline cancel a steady drift alike."""
    order = [("flower", with_flower), ("flower_secagg", with_secure_aggregation), ("in_process", without_flower)]
    if ray_row:
        order.insert(2, ("flower_ray", with_ray))
    return order


def without_flower(args: argparse.Namespace, out: Path) -> dict:
    """One process, no Flower: the client's own functions and a plain weighted average."""
    cmd = [sys.executable, __file__, "--data", str(args.data), "--sites", str(args.sites), "--rounds",
           str(args.rounds), "--epsilon", str(args.epsilon), "--in-process", str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wall = time.perf_counter() - start
    result = json.loads(done.stdout.splitlines()[-1])
    return {**result, "wall_s": wall, "study_s": result["wall_s"]}  # study_s: without start-up and imports


def split_rounds(wall_s: float, round_s: list[float]) -> dict:
    """A run's per-round part (median of rounds 2..N; round 1 alone for a one-round study) and the rest
    (start-up, round 1 and exit: the wall time less rounds 2..N)."""
    later = round_s[1:] or round_s[:1]
    return {"round_median_s": statistics.median(later), "rest_s": wall_s - sum(round_s[1:])}


def overhead(runs: list[float], alone: list[float]) -> tuple[float, list[float]]:
    """The geometric mean of the pairs' wall-time ratios (runs[i] / alone[i]), and the ratios."""
    pairs = [f / a for f, a in zip(runs, alone, strict=True)]
    return math.exp(sum(math.log(r) for r in pairs) / len(pairs)), pairs


def default_study(args: argparse.Namespace, out: Path | None = None) -> StudyConfig:
    """The study ``fedrad simulate --data DIR --epsilon E`` runs."""
    return StudyConfig(num_rounds=args.rounds, epsilon=args.epsilon, data=str(args.data), out=str(out or ""),
                       image_size=native_size(args.data) or StudyConfig().image_size, num_sites=args.sites)


def in_process(args: argparse.Namespace, out: Path) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    return fedavg(default_study(args, out), args.sites)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="default: the accuracy benchmark's four DICOM hospitals")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=StudyConfig().num_rounds,
                        help="default: the study default")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating (default 2)")
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
    # Decode, and compute the scattering features, once first (into the on-disk caches both runs read), so
    # neither timing includes them and neither run warms the caches for the other.
    # The same for each site's noise calibration (cached on disk, read by both sides).
    study = default_study(args)
    for site in load_sites(study, args.sites, features=True):
        study_noise(study, len(site.train))
    order = sides(choose_backend("auto", args.sites, os.cpu_count() or 1) != "ray")
    runs: dict[str, list[dict]] = {side: [] for side, _ in order}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(max(1, args.repeats)):
            for side, run in order if i % 2 == 0 else order[::-1]:
                runs[side].append(run(args, Path(tmp) / f"{side}-{i}"))
    # Each side's fastest run, with every run's wall time and its split.
    best = {side: {**min(results, key=lambda r: r["wall_s"]), "runs_wall_s": [round(r["wall_s"], 1) for r in results]}
            for side, results in runs.items()}
    for side in best.values():
        side.update(split_rounds(side["wall_s"], side["round_s"]))
    flower, plain = best["flower"], best["in_process"]
    for side in [s for s in FLOWER_SIDES if s in best]:
        ratio, pairs = overhead([r["wall_s"] for r in runs[side]], [r["wall_s"] for r in runs["in_process"]])
        best[side].update(overhead_x=ratio, pair_ratios=pairs)
    print(f"{args.data.name}: {args.sites} sites, {args.rounds} rounds, epsilon {args.epsilon}, "
          f"{len(runs['flower'])} run(s) each, alternating; the fastest of each below")
    print(f"{'':<34} {'wall s':>7} {'a round':>8} {'rest s':>7} {'val AUC':>8}  {'all runs':<16} "
          "final epsilon per site")
    names = {"flower": f"fedrad simulate ({flower['backend']})", "flower_ray": "fedrad simulate --backend ray",
             "flower_secagg": f"fedrad simulate ({flower['backend']}, SecAgg+)", "in_process": "one process, no Flower"}
    for side, r in best.items():
        every = ", ".join(f"{w:.1f}" for w in r["runs_wall_s"])
        print(f"{names[side]:<34} {r['wall_s']:>7.1f} {r['round_median_s']:>8.1f} {r['rest_s']:>7.1f} "
              f"{r['auc']:>8.3f}  {every:<16} {', '.join(f'{e:.3f}' for e in r['epsilon'])}")
    for side in [s for s in FLOWER_SIDES if s in best]:
        r = best[side]
        pairs = ", ".join(f"{x:.2f}x" for x in r["pair_ratios"])
        print(f"federation overhead, {names[side]}: {r['overhead_x']:.2f}x the in-process wall time (geometric "
              f"mean of the pairs {pairs}; fastest runs {r['wall_s'] / plain['wall_s']:.2f}x); a round "
              f"{r['round_median_s'] / plain['round_median_s']:.2f}x (median of rounds 2-{args.rounds}), the rest "
              f"{r['rest_s'] - plain['rest_s']:+.1f} s")
    secure = best["flower_secagg"]
    print(f"secure aggregation: a round {secure['round_median_s'] / flower['round_median_s']:.2f}x the plain Flower "
          f"round; final val AUC {secure['auc']:.3f} vs {flower['auc']:.3f} without (difference "
          f"{abs(secure['auc'] - flower['auc']):.3f}; issue 25's goal: at most 0.005)")
    if args.json:
        Path(args.json).write_text(json.dumps(best, indent=2) + "\n")


if __name__ == "__main__":
    main()
