"""Accuracy: pooled, each site alone, FedAvg/FedProx/FedAdam and DP on real chest X-rays in four hospitals.

    python benchmarks/accuracy.py [--rows all] [--rounds N] [--image-size PX] [--quick]
                                  [--workdir DIR] [--json FILE] [--markdown FILE]

Data: the shared pediatric chest X-rays (5,216 images, ``../shared/data/cxr-pediatric-224``) split by
patient into four hospitals, non-IID by label (Dirichlet(0.8) over each class's patients, fixed seed),
each exported once as DICOM with its own encoding (common/phantoms.py ``export_site``) into
``WORKDIR/cxr4`` and reused while the recipe is unchanged. Every site carves its own stratified,
patient-grouped 15% validation split (the study's ``val-fraction``).

Rows, each a full study with the StudyConfig defaults except what the row varies, run exactly as a
user runs it (``python -m fedrad simulate``: the baselines in one process, the federated rows through
Flower's simulation engine), so the wall time is what a user waits:
pooled (no DP, the upper bound); local (each site alone, no DP); local-dpE (each site alone, DP at the largest
E); fedavg, fedprox, fedadam (no DP) and the same three with DP at the largest E; dpE for the other --epsilons with
the strategy pick_dp_strategy chooses (or --dp-strategy) from the means of --repeats runs of each DP strategy
row (DP noise and sampling come from the OS, so runs differ); dpE-cnn at the largest E,
the end-to-end CNN instead of the default ScatterNet; dpE-aug, the same with the
chest-xray augmentation preset and --multiplicity views. ``--rows`` takes ids or the groups
all, baselines, federated, dp, dp-aug.

Writes a Markdown table (command line, date, anchors as footnotes) and JSON
(default benchmarks/results/accuracy.{md,json}; ``--quick`` writes into WORKDIR instead).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import StudyConfig  # noqa: E402
from common.phantoms import SiteAcquisition, SiteEncoding, export_site  # noqa: E402

SHARED = Path(os.environ.get("FEDRAD_SHARED_DATA", ROOT.parent / "shared" / "data"))
DEFAULT_SOURCE = SHARED / "cxr-pediatric-224"
DEFAULT_WORKDIR = ROOT / "runs" / "bench-accuracy"
RESULTS = ROOT / "benchmarks" / "results"

# One PACS per hospital. Site 2 writes no window tags, so its images get the reader's percentile window.
SITE_ENCODINGS = (
    SiteEncoding("MONOCHROME2", 8, "explicit", True),
    SiteEncoding("MONOCHROME1", 12, "rle", False),
    SiteEncoding("MONOCHROME2", 16, "jpeg2000-lossless", True),
    SiteEncoding("MONOCHROME2", 12, "deflated", True),
)
# ... and one detector and field of view per hospital, as real ones differ (issue 26): a landscape frame inside a
# black collimator shadow; a portrait frame on a larger detector padded white (MONOCHROME1 sites often pad with the
# maximum); a wide grey side padding on a smaller detector; a plain square frame. The processing curves (gamma)
# differ too, which no preprocessing rule undoes: a model has to generalise over them.
SITE_ACQUISITIONS = (
    SiteAcquisition(aspect=1.25, border_value=0.0, border=(0.04, 0.04, 0.06, 0.06)),
    SiteAcquisition(aspect=0.8, gamma=0.85, detector_scale=1.5, border_value=1.0, border=(0.08, 0.02, 0.0, 0.0)),
    SiteAcquisition(gamma=1.15, detector_scale=0.8, border_value=0.5, border=(0.0, 0.0, 0.12, 0.12)),
    SiteAcquisition(detector_scale=1.25),
)
RECIPE_VERSION = 2  # bump when the export changes what files come out (2: SITE_ACQUISITIONS)
QUICK_PER_SITE = 48
LARGE_SIZE = 128  # the larger input the unseen-hospital rows compare with the default size
METRICS = ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "f1")
SHOWN = ("auc", "accuracy", "sensitivity", "specificity")
ANCHORS = (
    "Kermany et al. 2018, Cell 172(5): AUC 0.968 for pneumonia vs normal, centralized, non-private, "
    "full-resolution images, on their held-out 624-image test set.",
    "MedMNIST v2 (Yang et al. 2023, Scientific Data), PneumoniaMNIST, ResNet-18: AUC 0.944 at 28 px and "
    "0.956 at 224 px, centralized, non-private, on the official test split.",
)


# ---------------------------------------------------------------- data: four hospitals as DICOM

def patient_of(path: str) -> str:
    """Patient id carried by the file name: person123_bacteria_456 -> person123, IM-0115-0001 -> IM-0115,
    NORMAL2-IM-0381-0001 -> NORMAL2-IM-0381 (the normal and pneumonia folders number patients apart)."""
    stem = Path(path).stem
    found = re.match(r"(person\d+)_", stem) or re.match(r"((?:NORMAL\d+-)?IM-\d+)-", stem)
    return found.group(1) if found else stem


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plan_sites(source: Path, num_sites: int, alpha: float, seed: int, per_site: int = 0) -> list[list[dict]]:
    """Rows of labels.csv for each site: whole patients, Dirichlet(alpha) shares of each class's patients.

    ``per_site`` > 0 keeps only that many images per site (whole patients, seeded order): the quick path.
    """
    from common.partition import partition_sites

    with open(source / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    patients = sorted({patient_of(r["path"]) for r in rows})
    index = {p: i for i, p in enumerate(patients)}
    members: list[list[dict]] = [[] for _ in patients]
    for row in rows:
        members[index[patient_of(row["path"])]].append(row)
    labels = np.array([int(m[0]["label"]) for m in members])
    if any(int(r["label"]) != labels[index[patient_of(r["path"])]] for r in rows):
        raise SystemExit("a patient has images of both classes: cannot split by label and patient")
    parts = partition_sites(labels, num_sites, f"dirichlet:{alpha}", seed)
    sites = []
    for s, part in enumerate(parts):
        chosen = part
        if per_site:
            chosen = np.random.default_rng([seed, s]).permutation(part)
            sizes = np.cumsum([len(members[p]) for p in chosen])
            chosen = chosen[: max(1, int(np.searchsorted(sizes, per_site, side="right")))]
        sites.append([r for p in sorted(chosen) for r in members[p]])
    return sites


def _acquisition(recipe: dict) -> SiteAcquisition:
    return SiteAcquisition(**{**recipe, "border": tuple(recipe["border"])})


def _export_job(folder: str, source: str, rows: list[dict], encoding: dict, acquisition: dict,
                classes: list[str]) -> tuple[str, float]:
    """Export one site (a process of its own): JPEG -> grey [0, 1] -> the site's acquisition -> DICOM with the site's
    encoding."""
    from PIL import Image

    start = time.perf_counter()

    def records():
        for row in rows:
            with Image.open(Path(source) / row["path"]) as img:
                pixels = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            yield Path(row["path"]).stem, pixels, patient_of(row["path"]), classes[int(row["label"])]

    export_site(Path(folder), records(), SiteEncoding(**encoding), comment="fedrad benchmark: cxr-pediatric-224",
                acquisition=_acquisition(acquisition))
    return folder, time.perf_counter() - start


def prepare_data(source: Path, out: Path, *, num_sites: int = 4, alpha: float = 0.8, seed: int = 0,
                 per_site: int = 0, workers: int = 0) -> dict:
    """Export the sites into ``out`` once; reuse them while the recipe (and the source labels) is unchanged.

    Returns the manifest: the recipe, each site's counts and encoding, and the export time.
    """
    classes = StudyConfig().classes
    recipe = {"version": RECIPE_VERSION, "source": str(source.resolve()),
              "labels_sha256": _sha256(source / "labels.csv"),
              "num_sites": num_sites, "alpha": alpha, "seed": seed, "per_site": per_site, "classes": classes,
              "encodings": [asdict(SITE_ENCODINGS[s % len(SITE_ENCODINGS)]) for s in range(num_sites)],
              "acquisitions": [asdict(SITE_ACQUISITIONS[s % len(SITE_ACQUISITIONS)]) for s in range(num_sites)]}
    recipe = json.loads(json.dumps(recipe))  # as manifest.json holds it (tuples become lists), so an export is reused
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("recipe") == recipe and all((out / s["site"] / "labels.csv").is_file()
                                                    for s in manifest["sites"]):
            manifest["reused"] = True
            return manifest
        print(f"{out}: recipe changed, exporting again", flush=True)
    if out.exists():
        if not manifest_path.exists() and any(out.iterdir()):
            raise SystemExit(f"{out} exists and is not an export of this script (no manifest.json): choose --workdir")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    plan = plan_sites(source, num_sites, alpha, seed, per_site)
    names = [Path(r["path"]).stem for rows in plan for r in rows]
    if len(set(names)) != len(names):
        raise SystemExit("file names repeat across the source folders: cannot name the DICOM files by them")
    start = time.perf_counter()
    jobs = [(str(out / f"site-{s + 1}"), str(source), rows, recipe["encodings"][s], recipe["acquisitions"][s], classes)
            for s, rows in enumerate(plan)]
    order = sorted(range(num_sites), key=lambda s: -len(plan[s]))  # biggest first: shorter tail
    processes = max(1, min(workers or os.cpu_count() or 1, num_sites))
    if processes == 1:
        done = [_export_job(*jobs[s]) for s in order]
    else:
        with ProcessPoolExecutor(processes) as pool:
            done = list(pool.map(_export_job, *zip(*[jobs[s] for s in order])))
    export_s = time.perf_counter() - start
    per_site_s = {Path(folder).name: round(t, 1) for folder, t in done}
    sites = []
    for s, rows in enumerate(plan):
        labels = np.array([int(r["label"]) for r in rows])
        name = f"site-{s + 1}"
        sites.append({"site": name, "encoding": recipe["encodings"][s],
                      "encoding_text": SiteEncoding(**recipe["encodings"][s]).describe(),
                      "acquisition_text": _acquisition(recipe["acquisitions"][s]).describe(),
                      "images": len(rows), "patients": len({patient_of(r["path"]) for r in rows}),
                      "per_class": np.bincount(labels, minlength=len(classes)).tolist(),
                      "positive_fraction": float(labels.mean()) if len(labels) else 0.0,
                      "subtypes": {k: sum(1 for r in rows if r.get("subtype") == k)
                                   for k in sorted({r.get("subtype", "") for r in rows})},
                      "export_s": per_site_s.get(name)})
    manifest = {"recipe": recipe, "sites": sites, "export_s": round(export_s, 1),
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(manifest_path)  # last: an interrupted export has no manifest and is redone
    manifest["reused"] = False
    return manifest


def warm_cache(data: Path, sites: list[dict], image_size: int, workers: int) -> float:
    """Decode every site once into fedrad's cache at the study's size, so no row pays for decoding."""
    from common.cache import FolderCache
    from common.data import LabelTable

    study = StudyConfig()
    start = time.perf_counter()
    for site in sites:
        folder = data / site["site"]
        table, _ = LabelTable.read(folder)
        FolderCache(folder, image_size, study.channels, study.multiframe).update(
            table.files(folder.resolve()), workers=workers or os.cpu_count() or 1)
    return time.perf_counter() - start


# ---------------------------------------------------------------- rows

@dataclass(frozen=True)
class Row:
    id: str
    label: str
    mode: str = "federated"
    strategy: str = ""  # "" = the study default; "best" = resolved from the non-DP federated rows
    dp: bool = False
    epsilon: float = 0.0
    augment: str = ""  # "" = the study default
    multiplicity: int = 0  # 0 = the study default
    model: str = ""  # "" = the study default
    image_size: int = 0  # 0 = --image-size, else the study default
    repeated: bool = False  # a DP strategy row: run --repeats times, its mean picks the DP rows' strategy


def all_rows(epsilons: list[float], multiplicity: int) -> list[Row]:
    """Baselines, the three strategies without DP, the three with DP at the largest epsilon (which picks
    the best strategy under DP), then that strategy at the other epsilons and with augmentation multiplicity."""
    names = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam"}
    top = max(epsilons)
    # Each site alone twice: without DP (the strictest bar) and under the same budget as the DP rows
    # (the choice a hospital actually has: train alone with its epsilon, or join the federation).
    rows = [Row("pooled", "pooled (all data in one place)", mode="pooled"),
            Row("local", "each site alone", mode="local"),
            Row(f"local-dp{top:g}", f"each site alone, DP ε={top:g}", mode="local", dp=True, epsilon=top,
                multiplicity=1)]
    rows += [Row(s, name, strategy=s) for s, name in names.items()]
    rows += [Row(f"dp{top:g}-{s}", f"{name}, DP ε={top:g}", strategy=s, dp=True, epsilon=top, multiplicity=1,
                 repeated=True) for s, name in names.items()]
    # What the default model's fixed scattering front-end buys: the same study with the end-to-end CNN.
    rows.append(Row(f"dp{top:g}-cnn", f"DP ε={top:g}, end-to-end CNN (no scattering)", strategy="best", dp=True,
                    epsilon=top, multiplicity=1, model="cnn"))
    for eps in epsilons:
        if eps != top:
            rows.append(Row(f"dp{eps:g}", f"DP ε={eps:g}", strategy="best", dp=True, epsilon=eps, multiplicity=1))
    for eps in epsilons:
        rows.append(Row(f"dp{eps:g}-aug", f"DP ε={eps:g}, chest-xray aug ×{multiplicity}", strategy="best",
                        dp=True, epsilon=eps, augment="chest-xray", multiplicity=multiplicity))
    # The other candidates for the defaults under DP at the largest epsilon: augmentation without extra views, and a
    # larger input.
    if multiplicity != 1:
        rows.append(Row(f"dp{top:g}-aug1", f"DP ε={top:g}, chest-xray aug ×1", strategy="best", dp=True,
                        epsilon=top, augment="chest-xray", multiplicity=1))
    rows.append(Row(f"dp{top:g}-{LARGE_SIZE}px", f"DP ε={top:g}, {LARGE_SIZE} px", strategy="best", dp=True,
                    epsilon=top, multiplicity=1, image_size=LARGE_SIZE))
    return rows


def unseen_row_ids(epsilons: list[float]) -> list[str]:
    """The rows that matter at an unseen hospital (issue 26): pooled, FedAvg, DP at every epsilon, and the candidate
    defaults at the largest one (augmentation with and without extra views, a larger input)."""
    top = max(epsilons)
    return (["pooled", "fedavg", f"dp{top:g}-fedavg"] + [f"dp{e:g}" for e in epsilons if e != top]
            + [f"dp{top:g}-aug", f"dp{top:g}-aug1", f"dp{top:g}-{LARGE_SIZE}px"])


def select_rows(spec: str, rows: list[Row]) -> list[Row]:
    groups = {"all": [r.id for r in rows], "baselines": [r.id for r in rows if r.mode != "federated"],
              "federated": ["fedavg", "fedprox", "fedadam"],
              "dp": [r.id for r in rows if r.dp and not r.augment and r.mode == "federated"],
              "dp-aug": [r.id for r in rows if r.augment],
              "unseen": [i for i in unseen_row_ids([r.epsilon for r in rows if r.dp]) if i in {r.id for r in rows}]}
    wanted: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        ids = groups.get(item, [item])
        unknown = [i for i in ids if i not in {r.id for r in rows}]
        if unknown:
            raise SystemExit(f"--rows: unknown row '{item}' (rows: {', '.join(r.id for r in rows)}; "
                             f"groups: {', '.join(groups)})")
        wanted += [i for i in ids if i not in wanted]
    return [r for r in rows if r.id in wanted]  # always in table order: DP rows after the strategies


def row_command(row: Row, strategy: str, data: Path, out: Path, args: argparse.Namespace) -> list[str]:
    """The fedrad command line of a row: only what the row varies (and --rounds/--image-size if given)."""
    cmd = [sys.executable, "-m", "fedrad", "simulate", "--data", str(data), "--out", str(out), "--mode", row.mode]
    if strategy:
        cmd += ["--strategy", strategy]
    cmd += ["--epsilon", f"{row.epsilon:g}", "--delta", f"{args.delta:g}"] if row.dp else ["--no-dp"]
    if row.augment:
        cmd += ["--augment", row.augment]
    if row.multiplicity:
        cmd += ["--augment-multiplicity", str(row.multiplicity)]
    if row.model:
        cmd += ["--model", row.model]
    if args.rounds:
        cmd += ["--rounds", str(args.rounds)]
    if row.image_size or args.image_size:
        cmd += ["--image-size", str(row.image_size or args.image_size)]
    return cmd


PROGRESS = re.compile(r"^(simulating|round \d+/|done in|fedrad: error)")


def run_row(cmd: list[str], log_path: Path) -> tuple[int, float]:
    """Run one study as a user would; progress lines echo here, everything goes to ``log_path``."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    start = time.perf_counter()
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if PROGRESS.match(line):
                print("    " + line.rstrip(), flush=True)
    return proc.returncode, time.perf_counter() - start


def reused_row(out: Path, log_path: Path, expected: dict[str, object]) -> tuple[int | None, float]:
    """A row finished by an earlier, interrupted run of this script (``--reuse``): exit 0 and the
    study's own wall time from its log; (None, 0) when it has to run: unfinished, or its study
    differs from the row's now (``expected``: config.json values, e.g. another DP strategy chosen)."""
    done = re.search(r"^done in (\d+(?:\.\d+)?) s", log_path.read_text(), re.M) if log_path.exists() else None
    if done is None or not (out / "metrics.jsonl").exists() or not (out / "config.json").exists():
        return None, 0.0
    study = json.loads((out / "config.json").read_text())
    if any(study.get(k) != v for k, v in expected.items()):
        return None, 0.0
    return 0, float(done.group(1))


def row_study(row: Row, strategy: str, defaults: StudyConfig, args: argparse.Namespace) -> dict[str, object]:
    """What a row's study is, as its config.json spells it: the row's settings with the study defaults
    filled in (``--reuse`` compares a finished study's config.json against this)."""
    fixed: dict[str, object] = {"mode": row.mode, "dp": row.dp, "model": row.model or defaults.model,
                                "augment": row.augment or defaults.augment,
                                "augment-multiplicity": row.multiplicity or defaults.augment_multiplicity,
                                "num-rounds": args.rounds or defaults.num_rounds,
                                "image-size": row.image_size or args.image_size or defaults.image_size}
    if row.dp:
        fixed.update(epsilon=row.epsilon, delta=args.delta)
    if strategy:
        fixed["strategy"] = strategy
    return fixed


def _num(value: object) -> float:
    return float("nan") if value is None else float(value)  # metrics.jsonl writes NaN as null


def summarize_run(run_dir: Path) -> dict:
    """Aggregate, worst-site and per-site validation metrics of a finished study's last round."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = lines[-1]
    sites = {s["site"]: {"n_train": s["n_train"], "n_val": s["n_val"], "n_pos_val": s.get("n_pos_val"),
                         **{m: _num(s.get(m)) for m in METRICS}, "epsilon": s.get("epsilon", 0.0)}
             for s in last["sites"] if s["n_val"] > 0}
    agg = last["aggregate"]
    worst, worst_site = {}, {}
    for m in METRICS:
        values = [(v[m], name) for name, v in sites.items() if not math.isnan(v[m])]
        worst[m], worst_site[m] = min(values) if values else (float("nan"), None)
    study = json.loads((run_dir / "config.json").read_text())
    return {"rounds_done": last["round"], "aggregate": {m: _num(agg.get(m)) for m in METRICS},
            "aggregate_ci95": agg.get("ci95", {}), "worst": worst, "worst_site": worst_site,
            "epsilon_spent": float(agg.get("max_epsilon", 0.0)), "sites": sites,
            "operating_point": agg.get("operating_point"),
            "study": {k: study.get(k) for k in ("num-rounds", "local-epochs", "strategy", "model", "image-size",
                                                 "batch-size", "lr", "dp", "epsilon", "delta", "augment",
                                                 "augment-multiplicity", "val-fraction", "seed")}}


def compare_sites(results: list[dict]) -> dict:
    """For each site, AUC of every row on that site's own validation split; for each federated row, the sites
    where it beats the site's own local model there: ``beats_local`` against the non-DP local row and, for a
    DP row at epsilon E, ``beats_local_dp`` against the local row at the same E (when it was run)."""
    ok = [r for r in results if r["status"] == "ok"]
    local = next((r for r in ok if r["id"] == "local"), None)
    local_dp = {r["epsilon_target"]: r for r in ok if r["mode"] == "local" and r["dp"]}
    sites = sorted({s for r in ok for s in r["sites"]})
    table: dict = {"sites": sites, "auc": {r["id"]: {s: r["sites"].get(s, {}).get("auc") for s in sites} for r in ok},
                   "beats_local": {}, "beats_local_dp": {}}

    def beats(row: dict, alone: dict) -> tuple[dict, str]:
        found, ties = {}, 0
        for s in sites:
            mine, theirs = row["sites"].get(s, {}).get("auc", math.nan), alone["sites"].get(s, {}).get("auc", math.nan)
            found[s] = None if math.isnan(mine) or math.isnan(theirs) else bool(mine > theirs)
            ties += mine == theirs  # an equal AUC (both 1.000 on a small split, say): counted apart (NaN never equal)
        known = [b for b in found.values() if b is not None]
        return found, f"{sum(known)}/{len(known)}" + (f" ({ties} tied)" if ties else "")

    for r in ok:
        if r["mode"] != "federated":
            continue
        if local:
            table["beats_local"][r["id"]], r["beats_local"] = beats(r, local)
        if r["dp"] and r["epsilon_target"] in local_dp:
            table["beats_local_dp"][r["id"]], r["beats_local_dp"] = beats(r, local_dp[r["epsilon_target"]])
    return table


# ---------------------------------------------------------------- output

def _f(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _pair(r: dict, metric: str) -> str:
    if r["status"] != "ok":
        return "—"
    return f"{_f(r['aggregate'][metric])} / {_f(r['worst'][metric])}"


def _operating(r: dict) -> str:
    """Pooled sensitivity / specificity at the study's threshold (server/app.py), with the threshold."""
    point = r.get("operating_point") if r["status"] == "ok" else None
    if not point:
        return "—"
    return f"{_f(point['sensitivity'])} / {_f(point['specificity'])} at {point['threshold']:g}"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Accuracy: federated vs each site alone vs pooled, with and without DP",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; {report['machine']}  ",
        f"Data: {report['data']['description']}  ",
        f"Study: {s['model']} {s['image_size']} px, {s['rounds']} rounds x {s['local_epochs']} local epoch(s), "
        f"batch {s['batch_size']}, lr {s['lr']:g}, delta {s['delta']:g}; StudyConfig defaults unless the row says "
        f"otherwise. DP rows use **{report['dp_strategy']}** ({report['dp_strategy_reason']}).",
        "",
        "| site | encoding | acquisition | images | patients | pneumonia | train / val |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    split = report.get("splits", {})
    for site in report["data"]["sites"]:
        tv = split.get(site["site"])
        lines.append(f"| {site['site']} | {site['encoding_text']} | {site.get('acquisition_text', '—')} | "
                     f"{site['images']} | {site['patients']} | "
                     f"{100 * site['positive_fraction']:.0f}% | {f'{tv[0]} / {tv[1]}' if tv else '—'} |")
    full = [r for r in report["rows"] if not r["status"].startswith("not run")]
    lines += [] if not full else [
        "",
        "| row | strategy | AUC agg / worst | accuracy agg / worst | sensitivity agg / worst | "
        "specificity agg / worst | sensitivity / specificity at the study threshold | ε spent (max site) | "
        "wall time | beats local at | beats local DP (same ε) at |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in full:
        eps = _f(r.get("epsilon_spent"), 2) if r["dp"] and r["status"] == "ok" else ("no DP" if not r["dp"] else "—")
        wall = f"{r['wall_s']:.0f} s" if r.get("wall_s") is not None else "—"
        name = r["label"] if r["status"] == "ok" else f"{r['label']} ({r['status']})"
        lines.append(f"| {name} | {r['strategy'] or r['mode']} | {_pair(r, 'auc')} | {_pair(r, 'accuracy')} | "
                     f"{_pair(r, 'sensitivity')} | {_pair(r, 'specificity')} | {_operating(r)} | {eps} | {wall} | "
                     f"{r.get('beats_local', '—')} | {r.get('beats_local_dp', '—')} |")
    repeated = [r for r in report["rows"] if len(r.get("runs", [])) > 1]
    if repeated:
        lines += ["", "Repeated DP strategy rows (the table shows each one's first run), aggregate / worst-site "
                  "val AUC of every run; the DP rows' strategy is picked by the mean aggregate AUC:", ""]
        for r in repeated:
            each = "; ".join(f"{_f(x['auc'])} / {_f(x['worst_auc'])}" for x in r["runs"])
            lines.append(f"- {r['label']}: {each}; mean {_f(mean_auc(r))}")
    per_site = report["per_site"]
    if per_site["sites"] and per_site["auc"]:
        ids = list(per_site["auc"])
        lines += ["", "Validation AUC on each site's own validation split (local = the site's own model):", "",
                  "| site | " + " | ".join(ids) + " |", "|---|" + "---:|" * len(ids)]
        for site in per_site["sites"]:
            lines.append(f"| {site} | " + " | ".join(_f(per_site["auc"][i].get(site)) for i in ids) + " |")
    lines += unseen_markdown(report)
    lines += [] if not full else [
        "",
        "Aggregate: the validation-size-weighted mean over sites of each site's metric; worst: the lowest site. "
        "Local: each site's own model on its own validation split. Sensitivity and specificity at the argmax "
        "decision; — where undefined (a validation split with one class). At the study threshold: the decision "
        "threshold the sites' pooled validation ROC curves favour (max sensitivity + specificity, what "
        "`fedrad predict` uses), pooled over sites; tuned on the same splits, so optimistic; — for local rows "
        "(one model per site). \"beats local at\": sites where the "
        "row's AUC is above that site's own local model's (trained without DP); \"beats local DP\": the same against "
        "each site alone under the row's epsilon; \"tied\": sites where the two AUCs are equal (both 1.000 on a "
        "small split, say). Wall time: the whole `fedrad simulate` command (decoding excluded: "
        + (f"the cache was filled first, {report['timings']['decode_s']:.0f} s)."
           if report["timings"]["decode_s"] >= 1 else "an earlier run had filled the cache)."),
    ]
    lines += [
        "",
        "Published anchors, centralized and non-private: Kermany et al. 2018, AUC 0.968[^1]; MedMNIST v2 "
        "PneumoniaMNIST, ResNet-18, AUC 0.944 at 28 px and 0.956 at 224 px[^2]. Both are on held-out test sets, "
        "the table on validation splits of the training images: indicative only.",
        "",
    ]
    lines += [f"[^{i + 1}]: {a}" for i, a in enumerate(ANCHORS)]
    return "\n".join(lines) + "\n"


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_SOURCE, help="the chest X-ray source folder")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="exported sites (cxr4/, reused) and the studies' run directories")
    parser.add_argument("--rows", default="all", help="comma-separated row ids or groups (default all)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per study (default: StudyConfig's)")
    parser.add_argument("--image-size", type=int, default=0, help="model input px (default: StudyConfig's)")
    parser.add_argument("--epsilons", default="1,3,8", help="DP rows' target epsilon per site")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--dp-strategy", choices=["fedavg", "fedprox", "fedadam"],
                        help="strategy of the dpE rows (default: the study default unless another DP strategy "
                             "row beats it by more than TIE_AUC)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each DP strategy row (dpE-fedavg/-fedprox/-fedadam at the largest E); the DP "
                             "strategy is picked by their mean aggregate AUC (default 3)")
    parser.add_argument("--multiplicity", type=int, default=2, help="augmentation views of the -aug rows")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.8, help="Dirichlet concentration of the label split")
    parser.add_argument("--partition-seed", type=int, default=0)
    parser.add_argument("--reuse", type=Path, metavar="RUNS_DIR",
                        help="continue an interrupted run: rows already finished in RUNS_DIR are read, not rerun")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_PER_SITE} images per site, 1 round, 32 px")
    parser.add_argument("--workers", type=int, default=0, help="export/decode processes (default: all cores)")
    parser.add_argument("--unseen", choices=["off", "also", "only"], default="off",
                        help="leave-one-hospital-out: also train each row once without each hospital and test on it "
                             "(also), or only that (only: the rows' all-hospital studies are not run)")
    parser.add_argument("--json", type=Path, help="default benchmarks/results/accuracy.json (quick: in WORKDIR)")
    parser.add_argument("--markdown", type=Path, help="default benchmarks/results/accuracy.md (quick: in WORKDIR)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = args.rounds or 1
        args.image_size = args.image_size or 32
    results = args.workdir if args.quick else RESULTS
    name = "accuracy-quick" if args.quick else "accuracy"
    args.json = args.json or results / f"{name}.json"
    args.markdown = args.markdown or results / f"{name}.md"
    return args


# Single runs of the same DP row differed by up to this much aggregate AUC (dp8-fedavg 0.990, 0.989, 0.988; dp8-fedprox
# 0.989, 0.990, 0.992 in three runs of the table on 2026-12-02), so a smaller lead is noise, not a reason to leave the
# default.
TIE_AUC = 0.005


def mean_auc(row: dict) -> float:
    """A row's aggregate AUC: the mean over its repeated runs when it has them (``runs``), else its one run's."""
    runs = [r["auc"] for r in row.get("runs", []) if r.get("auc") is not None and not math.isnan(r["auc"])]
    return float(np.mean(runs)) if runs else row["aggregate"]["auc"]


def pick_dp_strategy(results: list[dict], default: str) -> tuple[str, str]:
    """The strategy for the remaining DP rows, from the DP strategy rows (largest epsilon), else the non-DP federated
    rows, else the study default, by mean aggregate AUC over each row's runs. The default stands unless another
    strategy beats it by more than TIE_AUC: the table then recommends what the code already does unless the data say
    otherwise."""
    ok = [r for r in results if r["mode"] == "federated" and r["status"] == "ok" and r["augment"] == "none"
          and not math.isnan(mean_auc(r))]
    for candidates, what in (([r for r in ok if r["dp"]], "DP"), ([r for r in ok if not r["dp"]], "non-DP")):
        if not candidates:
            continue
        best = max(candidates, key=mean_auc)
        base = next((r for r in candidates if r["strategy"] == default), None)
        runs = len(best.get("runs", [])) or 1
        how = f"mean of {runs} runs" if runs > 1 else "one run"
        if base is best:
            return default, f"the study default, best {what} aggregate AUC, {mean_auc(best):.3f} ({how})"
        if base is not None and mean_auc(best) - mean_auc(base) <= TIE_AUC:
            return default, (f"the study default: its {what} aggregate AUC {mean_auc(base):.3f} ({how}) is within "
                             f"{TIE_AUC} of the best, {best['strategy']} {mean_auc(best):.3f}")
        return best["strategy"], f"best {what} aggregate AUC, {mean_auc(best):.3f} ({how})"
    return default, "the study default: no federated row was run"


def run_study(cmd: list[str], out: Path, log: Path, study: dict[str, object], reuse: bool) -> tuple[int, float]:
    """Run one study (exit code, wall time); with ``reuse``, a study already finished in ``out`` is read instead."""
    rc, wall = reused_row(out, log, study) if reuse else (None, 0.0)
    if rc is not None:
        print(f"    reused {out} (finished earlier in {wall:.0f} s)", flush=True)
        return rc, wall
    if reuse and out.exists():
        shutil.rmtree(out)  # a row cut off mid-study starts again
    return run_row(cmd, log)


def _run_summary(summary: dict, out: Path, wall: float) -> dict:
    """One run of a repeated row: aggregate and worst-site AUC, wall time, where it is."""
    return {"auc": summary["aggregate"]["auc"], "worst_auc": summary["worst"]["auc"], "wall_s": round(wall, 1),
            "run_dir": str(out)}


def repeat_runs(row: Row, strategy: str, study: dict[str, object], data: Path, runs: Path,
                args: argparse.Namespace) -> list[dict]:
    """Runs 2..--repeats of a repeated row (``RUNS/<id>-runK``), each summarised; a failed run is reported and left
    out."""
    found = []
    for k in range(2, args.repeats + 1):
        out, log = runs / f"{row.id}-run{k}", runs / f"{row.id}-run{k}.log"
        print(f"[{row.id}] run {k} of {args.repeats}", flush=True)
        rc, wall = run_study(row_command(row, strategy, data, out, args), out, log, study, args.reuse is not None)
        if rc == 0 and (out / "metrics.jsonl").exists():
            found.append(_run_summary(summarize_run(out), out, wall))
            print(f"    AUC {_f(found[-1]['auc'])} (worst site {_f(found[-1]['worst_auc'])}), wall {wall:.0f} s",
                  flush=True)
        else:
            print(f"    run {k} FAILED (exit {rc}): see {log}", flush=True)
    return found


# ---------------------------------------------------------------- unseen hospitals (leave one hospital out)

def holdout_folders(data: Path, sites: list[str]) -> dict[str, Path]:
    """For each site, a folder of the other sites (links to their exported folders): what a study without it trains
    on, ``<export>-holdout/without-<site>``. The links resolve to the exported folders, so the decode cache is
    shared."""
    folders = {}
    for held in sites:
        folder = data.parent / f"{data.name}-holdout" / f"without-{held}"
        folder.mkdir(parents=True, exist_ok=True)
        for site in sites:
            link = folder / site
            if site == held:
                if link.is_symlink():
                    link.unlink()
            elif not link.is_symlink():
                link.symlink_to(Path(os.path.relpath(data / site, folder)), target_is_directory=True)
        folders[held] = folder
    return folders


def evaluate_unseen(model: Path, site: Path, out: Path, reuse: bool) -> dict | None:
    """``fedrad evaluate`` of a finished model on every image of a hospital it never saw (its JSON, or None); with
    ``reuse``, an earlier answer is read, unless it predates the local operating point."""
    earlier = json.loads(out.read_text()) if reuse and out.exists() else {}
    if "local_operating_point" in earlier:
        return earlier
    cmd = [sys.executable, "-m", "fedrad", "evaluate", "--model", str(model), "--data", str(site), "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"    evaluate FAILED (exit {done.returncode}): {done.stderr.strip()[-300:]}", flush=True)
        return None
    return json.loads(out.read_text())


def unseen_runs(row: Row, strategy: str, study: dict[str, object], folders: dict[str, Path], data: Path, runs: Path,
                args: argparse.Namespace) -> dict:
    """The row trained once without each hospital (``RUNS/<id>-without-<site>``) and tested on all of that hospital's
    images. Returns each fold (the held-out site's AUC, sensitivity and specificity, and the validation AUC the
    training hospitals report) and their means: what the consortium sees vs what a new hospital gets."""
    folds = []
    for held, folder in folders.items():
        out, log = runs / f"{row.id}-without-{held}", runs / f"{row.id}-without-{held}.log"
        print(f"[{row.id}] without {held}", flush=True)
        rc, wall = run_study(row_command(row, strategy, folder, out, args), out, log, study, args.reuse is not None)
        if rc != 0 or not (out / "model.pt").exists():
            print(f"    FAILED (exit {rc}): see {log}", flush=True)
            continue
        val = summarize_run(out)["aggregate"]
        test = evaluate_unseen(out / "model.pt", data / held, out / "unseen.json", args.reuse is not None)
        if test is None:
            continue
        local = test.get("local_operating_point") or {}
        folds.append({"site": held, "auc": _num(test.get("auc")), "sensitivity": _num(test.get("sensitivity")),
                      "specificity": _num(test.get("specificity")),
                      "balanced_accuracy": _num(test.get("balanced_accuracy")),
                      "local_balanced_accuracy": _num(local.get("held_out_balanced_accuracy")), "n": test.get("n"),
                      "val_auc": val["auc"], "wall_s": round(wall, 1), "run_dir": str(out)})
        print(f"    unseen {held}: AUC {_f(folds[-1]['auc'])}; validation AUC of the others {_f(val['auc'])}; "
              f"wall {wall:.0f} s", flush=True)
    aucs = [f["auc"] for f in folds if not math.isnan(f["auc"])]
    vals = [f["val_auc"] for f in folds if not math.isnan(f["val_auc"])]
    worst = min(folds, key=lambda f: f["auc"]) if aucs else None
    balanced = {k: [f[k] for f in folds if not math.isnan(f[k])] for k in ("balanced_accuracy",
                                                                           "local_balanced_accuracy")}
    return {"folds": folds, "complete": len(aucs) == len(folders),
            **{f"{prefix}_{k}": (float(how(v)) if v else math.nan) for k, v in balanced.items()
               for prefix, how in (("mean", np.mean), ("worst", np.min))},
            "mean_auc": float(np.mean(aucs)) if aucs else math.nan,
            "worst_auc": worst["auc"] if worst else math.nan, "worst_site": worst["site"] if worst else None,
            "val_auc": float(np.mean(vals)) if vals else math.nan,
            "overstatement": float(np.mean(vals) - np.mean(aucs)) if aucs and vals else math.nan}


def pick_by_unseen(results: list[dict]) -> tuple[str | None, str]:
    """The row with the best mean unseen-hospital AUC among the complete DP rows at the largest epsilon (the
    defaults are chosen by it, issue 26), with why."""
    dp = [r for r in results if r["dp"] and r["mode"] == "federated" and r.get("unseen", {}).get("complete")]
    if not dp:
        return None, "no complete unseen-hospital DP row"
    top = max(r["epsilon_target"] for r in dp)
    candidates = [r for r in dp if r["epsilon_target"] == top]
    best = max(candidates, key=lambda r: r["unseen"]["mean_auc"])
    others = "; ".join(f"{r['label']} {_f(r['unseen']['mean_auc'])}" for r in candidates if r is not best)
    return best["id"], (f"{best['label']}: mean unseen-hospital AUC {_f(best['unseen']['mean_auc'])} under DP "
                        f"ε={top:g}" + (f" (others: {others})" if others else
                                        " (the only candidate run at that epsilon: nothing compared yet)"))


def unseen_markdown(report: dict) -> list[str]:
    rows = [r for r in report["rows"] if r.get("unseen", {}).get("folds")]
    if not rows:
        return []
    sites = [s["site"] for s in report["data"]["sites"]]
    lines = ["", "## At a hospital the model has never seen (leave one hospital out)", "",
             "Each row trained four times, each time without one hospital, and tested on all of that hospital's "
             "images (`fedrad evaluate`); \"validation\" is what the three training hospitals' own validation "
             "splits report for the same model, the number a consortium sees. "
             f"Defaults chosen by: {report.get('unseen_choice', '—')}. Balanced accuracy at the study's threshold "
             "is what the held-out hospital gets deciding at the operating point stored in model.pt (chosen on the "
             "training hospitals' validation curves); at its own threshold, the threshold chosen on half of its "
             "images and scored on the other half (`fedrad evaluate` prints it as the local operating point).", "",
             "| row | validation AUC (training hospitals) | unseen AUC mean / worst | overstated by | "
             "unseen balanced accuracy at the study's threshold, mean / worst | at its own threshold, mean / worst | "
             + " | ".join(f"unseen {s}" for s in sites) + " | wall time (4 studies) |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(sites) + "---:|"]
    for r in rows:
        u = r["unseen"]
        by_site = {f["site"]: f["auc"] for f in u["folds"]}
        wall = sum(f["wall_s"] for f in u["folds"])
        name = r["label"] + ("" if u["complete"] else " (incomplete)")
        lines.append(f"| {name} | {_f(u['val_auc'])} | {_f(u['mean_auc'])} / {_f(u['worst_auc'])} | "
                     f"{_f(u['overstatement'])} | {_f(u.get('mean_balanced_accuracy'))} / "
                     f"{_f(u.get('worst_balanced_accuracy'))} | {_f(u.get('mean_local_balanced_accuracy'))} / "
                     f"{_f(u.get('worst_local_balanced_accuracy'))} | " + " | ".join(_f(by_site.get(s)) for s in sites)
                     + f" | {wall:.0f} s |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data / "labels.csv").is_file():
        print(f"benchmark data not found: {args.data} (set --data or FEDRAD_SHARED_DATA)", file=sys.stderr)
        return 2
    epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    rows = select_rows(args.rows, all_rows(epsilons, args.multiplicity))
    defaults = StudyConfig()
    image_size = args.image_size or defaults.image_size
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])

    data = args.workdir / ("cxr4" + (f"-quick{QUICK_PER_SITE}" if args.quick else ""))
    print(f"exporting {args.sites} sites to {data} (reused when unchanged) ...", flush=True)
    manifest = prepare_data(args.data, data, num_sites=args.sites, alpha=args.alpha, seed=args.partition_seed,
                            per_site=QUICK_PER_SITE if args.quick else 0, workers=args.workers)
    how = "reused" if manifest["reused"] else f"exported in {manifest['export_s']:.0f} s"
    print(f"{sum(s['images'] for s in manifest['sites'])} images, {how}")
    print(f"{'site':<8} {'images':>6} {'patients':>8} {'normal':>6} {'pneum.':>6} {'pneum.%':>7}  encoding")
    for s in manifest["sites"]:
        print(f"{s['site']:<8} {s['images']:>6} {s['patients']:>8} {s['per_class'][0]:>6} {s['per_class'][1]:>6} "
              f"{100 * s['positive_fraction']:>6.0f}%  {s['encoding_text']}")
    decode_s = 0.0
    for size in sorted({row.image_size or image_size for row in rows}):
        decode_s += warm_cache(data, manifest["sites"], size, args.workers)
        print(f"decode cache at {size} px ready ({decode_s:.0f} s so far)", flush=True)
    folders = holdout_folders(data, [s["site"] for s in manifest["sites"]]) if args.unseen != "off" else {}

    runs = args.reuse or args.workdir / time.strftime("runs-%Y%m%d-%H%M%S")
    runs.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    dp_strategy, reason = args.dp_strategy, "given by --dp-strategy"
    for row in rows:
        strategy = row.strategy
        if strategy == "best":
            if not dp_strategy:
                dp_strategy, reason = pick_dp_strategy(results, defaults.strategy)
            strategy = dp_strategy
        out, log = runs / row.id, runs / f"{row.id}.log"
        cmd = row_command(row, strategy, data, out, args)
        print(f"[{row.id}] {row.label}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
        study = row_study(row, strategy, defaults, args)
        rc, wall = run_study(cmd, out, log, study, args.reuse is not None) if args.unseen != "only" else (None, 0.0)
        entry = {"id": row.id, "label": row.label, "mode": row.mode, "strategy": strategy, "dp": row.dp,
                 "repeated": row.repeated,
                 "epsilon_target": row.epsilon if row.dp else None, "augment": study["augment"],
                 "multiplicity": study["augment-multiplicity"], "wall_s": round(wall, 1),
                 "run_dir": str(out), "log": str(log),
                 "command": "python " + " ".join(shlex.quote(c) for c in cmd[1:])}
        if rc is None:
            entry.update(status="not run (--unseen only)", aggregate={m: math.nan for m in METRICS},
                         worst={m: math.nan for m in METRICS}, sites={}, wall_s=None)
        elif rc == 0 and (out / "metrics.jsonl").exists():
            entry.update(status="ok", **summarize_run(out))
            if not row.dp:
                entry["epsilon_spent"] = None
            agg = entry["aggregate"]
            print(f"    AUC {_f(agg['auc'])} (worst site {_f(entry['worst']['auc'])}), accuracy {_f(agg['accuracy'])}, "
                  f"wall {wall:.0f} s", flush=True)
            if row.repeated and args.repeats > 1:
                entry["runs"] = [_run_summary(entry, out, wall)]
                entry["runs"] += repeat_runs(row, strategy, study, data, runs, args)
                aucs = ", ".join(_f(r["auc"]) for r in entry["runs"])
                print(f"    {len(entry['runs'])} runs: AUC {aucs}; mean {_f(mean_auc(entry))}", flush=True)
        else:
            entry.update(status=f"failed, exit {rc}", aggregate={m: math.nan for m in METRICS},
                         worst={m: math.nan for m in METRICS}, sites={})
            tail = log.read_text().splitlines()[-15:]
            print(f"    FAILED (exit {rc}); log tail:\n      " + "\n      ".join(tail), flush=True)
        if folders:
            entry["unseen"] = unseen_runs(row, strategy, study, folders, data, runs, args)
            u = entry["unseen"]
            print(f"    unseen hospitals: mean AUC {_f(u['mean_auc'])}, worst {_f(u['worst_auc'])} "
                  f"({u['worst_site']}); validation said {_f(u['val_auc'])}", flush=True)
        results.append(entry)

    if not dp_strategy and any(r["repeated"] for r in results):  # only strategy rows run: still say what they pick
        dp_strategy, reason = pick_dp_strategy(results, defaults.strategy)
    splits = {}
    for r in results:
        for site, v in r.get("sites", {}).items():
            splits.setdefault(site, (v["n_train"], v["n_val"]))
    import flwr
    import opacus
    import torch

    per_site = compare_sites(results)  # also marks each federated row with the sites where it beats local
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
                   f"flwr {flwr.__version__ if hasattr(flwr, '__version__') else '?'}, opacus {opacus.__version__}",
        "data": {"description": (
                     f"{args.data.name}, {sum(s['images'] for s in manifest['sites'])} images of "
                     f"{sum(s['patients'] for s in manifest['sites'])} patients, split by patient into "
                     f"{args.sites} sites, Dirichlet({args.alpha:g}) over each class's patients, seed "
                     f"{args.partition_seed}" + (f", at most {QUICK_PER_SITE} images per site (quick)"
                                                 if args.quick else "")
                     + f"; {100 * defaults.val_fraction:.0f}% stratified, patient-grouped validation split per site"),
                 "folder": str(data), **manifest},
        "settings": {"rounds": args.rounds or defaults.num_rounds, "local_epochs": defaults.local_epochs,
                     "model": defaults.model, "image_size": image_size, "batch_size": defaults.batch_size,
                     "lr": defaults.lr, "delta": args.delta, "quick": args.quick},
        "dp_strategy": dp_strategy or "-", "dp_strategy_reason": reason if dp_strategy else "no DP rows run",
        "timings": {"export_s": manifest["export_s"], "export_reused": manifest["reused"],
                    "decode_s": round(decode_s, 1), "rows_s": round(sum(r["wall_s"] or 0.0 for r in results), 1)},
        "splits": splits,
        "rows": results,
        "per_site": per_site,
        "unseen_choice": pick_by_unseen(results)[1] if folders else None,
        "anchors": list(ANCHORS),
    }
    text = markdown(report)
    for path, payload in ((args.markdown, text), (args.json, json.dumps(_json_safe(report), indent=1) + "\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(payload)
    print()
    print(text)
    print(f"wrote {args.markdown} and {args.json}")
    full_ok = all(r["status"] == "ok" for r in results) if args.unseen != "only" else True
    unseen_ok = all(r["unseen"]["complete"] for r in results) if folders else True
    return 0 if full_ok and unseen_ok else 1


if __name__ == "__main__":
    sys.exit(main())
