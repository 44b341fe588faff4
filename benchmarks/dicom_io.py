"""DICOM decode throughput and the cache, measured in one run.

    python benchmarks/dicom_io.py [--files 120] [--size 512] [--json FILE]

Writes ``--files`` phantom radiographs (``--size`` px) split over three encodings
(explicit little endian, RLE, JPEG 2000 lossless) into a temporary folder, then:
1. pydicom's own ``pixel_array`` decode, one process (the reference);
2. fedrad's decode + window + resize to 64 px, one process: ratio to (1);
3. the same with all cores (process pool): speed-up over (2);
4. one epoch read through the warm cache vs decoding: ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cache import FolderCache  # noqa: E402
from common.data import LabelTable, decode_file, forget_loaded, load_images, scan_folder  # noqa: E402
from common.dicom import write_dicom  # noqa: E402
from common.phantoms import chest_phantom  # noqa: E402

SYNTAXES = ("explicit", "rle", "jpeg2000-lossless")


def make_folder(root: Path, files: int, size: int) -> None:
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(files):
        label = int(rng.random() < 0.5)
        rel = f"img-{i:04d}.dcm"
        write_dicom(root / rel, chest_phantom(rng, size, bool(label)), bits_stored=12,
                    transfer_syntax=SYNTAXES[i % len(SYNTAXES)], photometric="MONOCHROME1" if i % 2 else "MONOCHROME2")
        rows.append(f"{rel},{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def rate(fn, n: int, repeats: int = 3) -> float:
    """Files per second, the best of ``repeats`` runs (the others absorb warm-up and noise)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=120)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root, cache_dir = Path(tmp) / "site", Path(tmp) / "cache"
        root.mkdir()
        make_folder(root, args.files, args.size)
        table, _ = LabelTable.read(root)
        paths = table.files(root)
        n = len(paths)
        ref = rate(lambda: [pydicom.dcmread(p).pixel_array for p in paths], n)
        ours = rate(lambda: [decode_file(root, p, 64, 1) for p in paths], n)
        pooled = rate(lambda: scan_folder(root, table, 64, 1, workers=cores), n)
        os.environ["FEDRAD_CACHE"] = str(cache_dir)
        FolderCache(root, 64, 1).update(paths, workers=cores)  # fedrad data prepare

        def epoch() -> None:
            forget_loaded()
            load_images(root, 64, 1, ["normal", "pneumonia"])

        cached = rate(epoch, n)
        os.environ["FEDRAD_CACHE"] = "off"
        uncached = rate(epoch, n)
    result = {"files": n, "size": args.size, "cores": cores, "pydicom_pixel_array_per_s": ref,
              "fedrad_decode_per_s": ours, "fedrad_decode_all_cores_per_s": pooled,
              "epoch_from_cache_per_s": cached, "epoch_decoding_per_s": uncached,
              "decode_ratio": ours / ref, "core_scaling": pooled / ours, "cache_speedup": cached / uncached}
    print(f"{n} phantom files, {args.size} px, encodings {', '.join(SYNTAXES)}; {cores} cores")
    print(f"pydicom pixel_array (1 process)        {ref:8.1f} files/s")
    print(f"fedrad decode+window+resize (1 proc.)  {ours:8.1f} files/s   ratio {ours / ref:.2f} (goal >= 0.8)")
    print(f"fedrad decode, {cores} processes            {pooled:8.1f} files/s   scaling {pooled / ours:.2f}x")
    print(f"epoch via cache vs decoding            {cached:8.1f} vs {uncached:.1f} files/s   "
          f"speed-up {cached / uncached:.0f}x (goal >= 50)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
