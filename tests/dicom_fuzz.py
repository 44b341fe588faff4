"""Fuzzing fedrad's DICOM reader: mutants of real and generated files, from a fixed seed.

    python tests/dicom_fuzz.py --count 2000 --seed 0 --jobs 2 --json fuzz.json
    python tests/dicom_fuzz.py --only 1234 --keep /tmp/m   # write mutant 1234 to a file and read it again

Every mutant goes through ``common.dicom.read_dicom`` and ``common.data.decode_file`` (what ``data check``,
``data prepare`` and training read with). The contract: an image, or an ``ImageReadError`` (a counted skip
with a one-line reason); never any other exception, never a hang, never an unbounded allocation.

Mutant ``i`` depends only on ``--seed`` and ``i`` (its own random generator), so a failure is reproduced
with ``--only i`` whatever ``--count`` and ``--jobs`` were. The seeds are the shared DICOM samples
(``FEDRAD_SHARED_DATA``/dicom-samples, where present) and files this script writes itself, so the
fuzzer runs on any machine. Raise ``--count`` to look harder.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.data import decode_file  # noqa: E402
from common.dicom import read_dicom, write_dicom  # noqa: E402
from common.errors import ImageReadError  # noqa: E402

SHARED = Path(os.environ.get("FEDRAD_SHARED_DATA", ROOT.parent / "shared" / "data")) / "dicom-samples"
LUT_DATA = 0x00283006
PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010) little- and big-endian
VRS = (b"US", b"SS", b"UL", b"DS", b"IS", b"CS", b"UI", b"OB", b"OW", b"SQ", b"UN", b"LO", b"FD", b"AT", b"ZZ")
ABSURD = {
    "Rows": (0, 1, 60000, 65535), "Columns": (0, 1, 60000, 65535), "NumberOfFrames": ("0", "1000", "-3", "x"),
    "BitsAllocated": (0, 7, 12, 64), "BitsStored": (0, 33, 64), "SamplesPerPixel": (0, 2, 4, 65535),
    "HighBit": (0, 40), "PixelRepresentation": (1, 7), "PlanarConfiguration": (1, 9),
    "PhotometricInterpretation": ("PALETTE COLOR", "YBR_FULL_422", "RGB", "MONOCHROME1", "NONSENSE"),
    "RescaleSlope": ("0", "1e300", "nan", "-inf", "abc"), "WindowWidth": ("0", "-1", "inf", ""),
}


# ---- seeds ----

def _generated_seeds() -> list[tuple[str, bytes]]:
    """Small files of each kind the shared samples lack: every syntax fedrad writes, LUT sequences, frames."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    rng = np.random.default_rng(7)
    image = np.clip(rng.normal(0.5, 0.2, (64, 64)), 0, 1)
    seeds = []
    with tempfile.TemporaryDirectory() as tmp:
        for syntax in ("explicit", "implicit", "big-endian", "deflated", "rle", "jpeg2000-lossless"):
            path = Path(tmp) / f"{syntax}.dcm"
            write_dicom(path, image, transfer_syntax=syntax, photometric="MONOCHROME1" if syntax == "rle" else
                        "MONOCHROME2")
            seeds.append((f"generated-{syntax}", path.read_bytes()))
        base = Path(tmp) / "explicit.dcm"
        ds = pydicom.dcmread(base)
        lut = Dataset()
        lut.LUTDescriptor, lut.ModalityLUTType = [4096, 0, 16], "HU"
        lut.add_new(LUT_DATA, "US", list(range(4096)))
        ds.ModalityLUTSequence = Sequence([lut])
        del ds.RescaleSlope, ds.RescaleIntercept
        seeds.append(("generated-modality-lut", _saved(ds)))
        ds = pydicom.dcmread(base)
        voi = Dataset()
        voi.LUTDescriptor = [4096, 0, 16]
        voi.add_new(LUT_DATA, "US", [i // 2 for i in range(4096)])
        ds.VOILUTSequence = Sequence([voi])
        del ds.WindowCenter, ds.WindowWidth
        seeds.append(("generated-voi-lut", _saved(ds)))
        ds = pydicom.dcmread(base)
        ds.NumberOfFrames = 3
        ds.PixelData = ds.PixelData * 3
        seeds.append(("generated-3-frames", _saved(ds)))
    return seeds


def load_seeds() -> list[tuple[str, bytes]]:
    shared = sorted(SHARED.glob("*.dcm")) if SHARED.is_dir() else []
    return [(p.name, p.read_bytes()) for p in shared] + _generated_seeds()


# ---- mutators: (seed bytes, rng) -> mutant bytes, or None when this one does not apply to the seed ----

def _saved(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def _parsed(data: bytes):
    import pydicom

    return pydicom.dcmread(io.BytesIO(data), force=True)


def _pixel_offset(data: bytes) -> int:
    return max(data.rfind(tag) for tag in PIXEL_TAGS)


def _flip(data: bytes, lo: int, hi: int, rng: np.random.Generator) -> bytes | None:
    if hi - lo < 1:
        return None
    out = bytearray(data)
    for pos in rng.integers(lo, hi, size=int(rng.integers(1, 9))):
        out[pos] ^= 1 << int(rng.integers(0, 8)) if rng.random() < 0.5 else int(rng.integers(1, 256))
    return bytes(out)


def flip_header(data: bytes, rng: np.random.Generator) -> bytes | None:
    end = _pixel_offset(data)
    return _flip(data, 128, end if end > 128 else len(data), rng)


def flip_pixels(data: bytes, rng: np.random.Generator) -> bytes | None:
    start = _pixel_offset(data)
    return _flip(data, start + 4, len(data), rng) if start > 0 else None


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def _random_element(ds, rng: np.random.Generator):
    tags = [t for t in ds.keys() if t != 0x7FE00010]
    return ds[tags[int(rng.integers(len(tags)))]] if tags else None


def drop_tag(data: bytes, rng: np.random.Generator) -> bytes | None:
    ds = _parsed(data)
    elem = _random_element(ds, rng)
    if elem is None:
        return None
    del ds[elem.tag]
    return _saved(ds)


def empty_tag(data: bytes, rng: np.random.Generator) -> bytes | None:
    ds = _parsed(data)
    elem = _random_element(ds, rng)
    if elem is None:
        return None
    elem.value = [] if elem.VR == "SQ" else None
    return _saved(ds)


def bad_lut(data: bytes, rng: np.random.Generator) -> bytes:
    """A Modality or VOI LUT Sequence with an empty item, an item without its descriptor or data, or nonsense."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = _parsed(data)
    item = Dataset()
    choice = int(rng.integers(0, 5))
    if choice == 1:
        item.add_new(LUT_DATA, "US", [1, 2, 3])  # no LUTDescriptor (the file that stopped a hospital)
    elif choice == 2:
        item.LUTDescriptor = [4096, 0, 16]  # no LUTData
    elif choice == 3:
        item.LUTDescriptor = [0, 65535, 3]
        item.add_new(LUT_DATA, "US", [])
    elif choice == 4:
        item.LUTDescriptor = [2, 0, 16]
        item.add_new(LUT_DATA, "US", [65535, 0])
    sequence = Sequence([item] if choice or rng.random() < 0.5 else [])
    if rng.random() < 0.5:
        ds.ModalityLUTSequence = sequence
    else:
        ds.VOILUTSequence = sequence
        for name in ("WindowCenter", "WindowWidth"):
            if name in ds and rng.random() < 0.7:
                delattr(ds, name)
    return _saved(ds)


def wrong_vr(data: bytes, rng: np.random.Generator) -> bytes | None:
    """Rewrite the two VR bytes of an explicit-VR element to another VR (the value bytes stay)."""
    end = _pixel_offset(data)
    spots = [i for i in range(132, (end if end > 0 else len(data)) - 6)
             if data[i + 4 : i + 6] in VRS and data[i + 1] in (0x00, 0x28, 0x08, 0x10, 0x18, 0x20, 0x7F)]
    if not spots:
        return None
    pos = spots[int(rng.integers(len(spots)))] + 4
    return data[:pos] + VRS[int(rng.integers(len(VRS)))] + data[pos + 2 :]


def absurd_value(data: bytes, rng: np.random.Generator) -> bytes | None:
    """Absurd dimensions and pixel-module values: 60000 x 60000, 1000 frames, 7 bits, 4 samples, NaN slope."""
    ds = _parsed(data)
    names = sorted(ABSURD)
    for _ in range(int(rng.integers(1, 4))):
        name = names[int(rng.integers(len(names)))]
        values = ABSURD[name]
        try:
            setattr(ds, name, values[int(rng.integers(len(values)))])
        except (TypeError, ValueError):
            continue
    return _saved(ds)


MUTATORS: dict[str, Callable[[bytes, np.random.Generator], bytes | None]] = {
    "flip-header": flip_header, "flip-pixels": flip_pixels, "truncate": truncate, "drop-tag": drop_tag,
    "empty-tag": empty_tag, "bad-lut": bad_lut, "wrong-vr": wrong_vr, "absurd-value": absurd_value,
}


def mutant(index: int, seed: int, seeds: list[tuple[str, bytes]]) -> tuple[str, str, bytes]:
    """Mutant ``index``: (seed file, mutator, bytes); mutators that do not apply are drawn again."""
    import warnings

    rng = np.random.default_rng([seed, index])
    names = sorted(MUTATORS)
    while True:
        source, data = seeds[int(rng.integers(len(seeds)))]
        name = names[int(rng.integers(len(names)))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out = MUTATORS[name](data, rng)
            except Exception:  # the seed could not be parsed or saved this way: draw another
                out = None
        if out is not None:
            return source, name, out


# ---- the run ----

_SEEDS: list[tuple[str, bytes]] = []


def _read(index: int, seed: int, folder: str) -> dict:
    """Mutant ``index`` through both readers: the outcome and its time."""
    source, name, data = mutant(index, seed, _SEEDS)
    path = Path(folder) / f"mutant-{index}.dcm"
    path.write_bytes(data)
    row = {"index": index, "seed_file": source, "mutator": name}
    start = time.perf_counter()
    try:
        try:
            image = read_dicom(path)
            row["outcome"] = f"image {image.pixels.shape}"
        except ImageReadError as exc:
            row["outcome"] = f"skip: {exc}"
        item = decode_file(Path(folder), path, 32, 1)
        if item.pixels is None and not item.reason:
            row["error"] = "decode_file gave neither pixels nor a reason"
    except BaseException as exc:  # the contract broken: any exception out of a reader (a panic is no Exception)
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    row["seconds"] = round(time.perf_counter() - start, 4)
    path.unlink()
    return row


def _init(seed_list: list[tuple[str, bytes]]) -> None:
    _SEEDS[:] = seed_list


def _chunk(indices: list[int], seed: int) -> tuple[list[dict], int]:
    with tempfile.TemporaryDirectory(prefix="fedrad-fuzz-") as folder:
        rows = [_read(i, seed, folder) for i in indices]
    return rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run(count: int, seed: int, jobs: int) -> dict:
    seeds = load_seeds()
    start = time.perf_counter()
    chunks = [list(range(k, count, jobs)) for k in range(jobs)]
    with ProcessPoolExecutor(jobs, initializer=_init, initargs=(seeds,)) as pool:
        results = list(pool.map(_chunk, chunks, [seed] * jobs))
    rows = sorted((r for chunk, _ in results for r in chunk), key=lambda r: r["index"])
    outcomes = Counter(r["outcome"].split(" (")[0] if r["outcome"].startswith("image") else r["outcome"]
                       for r in rows if "outcome" in r)
    slowest = max(rows, key=lambda r: r["seconds"])
    return {
        "mutants": len(rows), "seed": seed, "seed_files": len(seeds), "jobs": jobs,
        "seconds": round(time.perf_counter() - start, 1),
        "errors": [r for r in rows if "error" in r],
        "images": sum(1 for r in rows if r.get("outcome", "").startswith("image")),
        "skips": sum(1 for r in rows if r.get("outcome", "").startswith("skip")),
        "mutators": dict(Counter(r["mutator"] for r in rows)),
        "slowest": slowest,
        "peak_rss_mb": round(max(rss for _, rss in results) / 1024, 1),  # ru_maxrss is in KiB on Linux
        "outcomes": dict(outcomes.most_common()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="number of mutants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="reading processes")
    parser.add_argument("--json", help="write the summary (and every error) to this file")
    parser.add_argument("--only", type=int, help="read just this mutant (and keep it with --keep)")
    parser.add_argument("--keep", help="folder to write the --only mutant to")
    args = parser.parse_args(argv)
    if args.only is not None:
        _init(load_seeds())
        source, name, data = mutant(args.only, args.seed, _SEEDS)
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            (Path(args.keep) / f"mutant-{args.only}.dcm").write_bytes(data)
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(_read(args.only, args.seed, folder), indent=2))
        return 0
    summary = run(args.count, args.seed, max(1, args.jobs))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['mutants']} mutants of {summary['seed_files']} seed files in {summary['seconds']} s "
          f"({summary['jobs']} processes): {summary['images']} images, {summary['skips']} skips, "
          f"{len(summary['errors'])} errors; slowest {summary['slowest']['seconds']} s "
          f"({summary['slowest']['mutator']} of {summary['slowest']['seed_file']}); "
          f"peak RSS {summary['peak_rss_mb']} MB")
    for row in summary["errors"][:20]:
        print(f"  mutant {row['index']} ({row['mutator']} of {row['seed_file']}): {row['error']}")
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
