"""Does augmentation (and augmentation multiplicity) help DP training on the shared chest X-rays?

    python benchmarks/multiplicity.py [--data DIR] [--image-size 64] [--rounds 5] [--epsilon 8] [--json FILE]

Same sites, splits, privacy budget and seed for every row (in one process, no
Flower); only the augmentation changes. The study default is set from this table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fedavg import fedavg  # noqa: E402

from common.config import StudyConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cxr-pediatric-224"
ROWS = (("none", 1), ("chest-xray", 1), ("chest-xray", 2), ("chest-xray", 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"benchmark data not found: {args.data} (set --data)")
    torch.set_num_threads(os.cpu_count() or 1)
    results = []
    print(f"{args.data.name}: {args.sites} iid sites, {args.image_size} px, {args.rounds} rounds, "
          f"epsilon {args.epsilon}, cnn")
    print(f"{'augment':<12} {'K':>2} {'val AUC':>8} {'wall s':>7}  epsilon per site")
    with tempfile.TemporaryDirectory() as tmp:
        for preset, k in ROWS:
            study = StudyConfig(num_rounds=args.rounds, epsilon=args.epsilon, data=str(args.data), out=tmp,
                                image_size=args.image_size, augment=preset, augment_multiplicity=k)
            r = fedavg(study, args.sites)
            results.append({"augment": preset, "multiplicity": k, **r})
            print(f"{preset:<12} {k:>2} {r['auc']:>8.3f} {r['wall_s']:>7.0f}  "
                  f"{', '.join(f'{e:.2f}' for e in r['epsilon'])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
