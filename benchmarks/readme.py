"""Regenerate the benchmark tables of README.md and docs/benchmarks.md from ``benchmarks/results/``.

    python benchmarks/readme.py [--results DIR] [--readme FILE] [--docs FILE] [--check]

Without --readme or --docs both default pages are rebuilt; with either, only the pages named.

Each generated table sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``;
everything outside the markers (the prose and commands) is written by hand. The README
holds the headline table (``EXPECTED["readme"]``), docs/benchmarks.md every full table
(``EXPECTED["docs"]``); a block found in either file is rebuilt wherever it is. A block
whose results file is missing is left as it is and reported, and so is an expected block
that a file lacks. ``--check`` rewrites nothing and exits 1 when a block differs from its
results (tests/test_bench_readme.py runs it in the test suite, so a committed result and
the pages cannot drift apart). ``make bench`` runs this last.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import StudyConfig  # noqa: E402

# Model labels of the DP speed table: what each case trains (parameter counts from common/models.py).
MODEL_LABELS = {
    "scatternet": "ScatterNet (default; 79k trained params on 81 x 16 x 16 scattering maps)",
    "cnn": "CNN (width 16, 60k params)",
    "resnet18": "ResNet-18-GN (11M params)",
}


def accuracy(results: Path) -> str:
    """``accuracy.md`` without its title, footnotes renamed ``[^accN]`` (the page may have others)."""
    lines = (results / "accuracy.md").read_text().splitlines()
    while lines and (lines[0].startswith("# ") or not lines[0].strip()):
        lines.pop(0)
    return re.sub(r"\[\^(\d+)\]", r"[^acc\1]", "\n".join(lines).rstrip())


def unseen(results: Path) -> str:
    """``accuracy-unseen.md`` (leave one hospital out, ``accuracy.py --unseen only``) without its title and the
    anchors it shares with ``accuracy.md``."""
    lines = (results / "accuracy-unseen.md").read_text().splitlines()
    while lines and (lines[0].startswith("# ") or not lines[0].strip()):
        lines.pop(0)
    return "\n".join(line for line in lines
                     if not line.startswith(("[^", "Published anchors", "## "))).rstrip().replace("\n\n\n", "\n\n")


def unseen_headline(results: Path) -> str | None:
    """One line: the default study at a hospital it never saw, against what validation said."""
    path = results / "accuracy-unseen.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    row = next((r for r in report["rows"] if r["id"] == f"dp8-{StudyConfig().strategy}"
                and r.get("unseen", {}).get("complete")), None)
    if row is None:
        return None
    u = row["unseen"]
    choice = report.get("unseen_choice") or ""
    return (f"At a hospital it never saw (each hospital held out in turn, the study trained on the other three), the "
            f"default study scores AUC {u['mean_auc']:.3f} on average (worst hospital {u['worst_auc']:.3f}), while "
            f"the training hospitals' validation splits report {u['val_auc']:.3f}: validation overstates it by "
            f"{u['overstatement']:.3f}."
            + (f" Defaults chosen by the unseen-hospital AUC: {choice}." if "others:" in choice else "")
            + (f" The study's threshold travels worse than its AUC: deciding at it, the unseen hospitals' balanced "
               f"accuracy is {u['mean_balanced_accuracy']:.3f} on average (worst {u['worst_balanced_accuracy']:.3f});"
               f" at a threshold each hospital chooses on half of its own labelled images (`fedrad evaluate` prints "
               f"it), {u['mean_local_balanced_accuracy']:.3f} (worst {u['worst_local_balanced_accuracy']:.3f}) on "
               "the other half." if "mean_local_balanced_accuracy" in u else ""))


def dp_speed(results: Path) -> str:
    cases = json.loads((results / "dp_speed.json").read_text())
    rows = [
        "| model | input | batch | non-DP img/s | fedrad DP img/s | DP/non-DP | Opacus hooks DP img/s | DP/non-DP "
        "| peak MB non-DP / fedrad / Opacus |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    seen: set[str] = set()
    for c in cases:
        name = c["model"]
        label = MODEL_LABELS.get(name, name) if name not in seen else MODEL_LABELS.get(name, name).split(" (")[0]
        seen.add(name)
        peak = c["peak_mb"]
        rows.append(f"| {label} | {c['input']} | {c['batch']} | {c['non_dp']:.1f} | {c['fedrad']:.1f} | "
                    f"**{c['ratio_fedrad']:.3f}** | {c['opacus']:.1f} | {c['ratio_opacus']:.3f} | "
                    f"{peak['non-DP']:.0f} / {peak['mixed']:.0f} / {peak['opacus']:.0f} |")
    return "\n".join(rows)


def federation(results: Path) -> str:
    r = json.loads((results / "federation.json").read_text())
    alone = r["in_process"]

    def row(label: str, side: dict) -> str:
        runs = ", ".join(f"{w:.1f}" for w in side["runs_wall_s"])
        eps = ", ".join(f"{e:.3f}" for e in side["epsilon"])
        return (f"| {label} | {side['wall_s']:.1f} s | {side['round_median_s']:.1f} s | {side['rest_s']:.1f} s "
                f"| {runs} s | {side['auc']:.3f} | {eps} |")

    def overhead(label: str, side: dict) -> str:
        pairs = ", ".join(f"{x:.2f}x" for x in side["pair_ratios"])
        per_round = side["round_median_s"] / alone["round_median_s"]
        rest = side["rest_s"] - alone["rest_s"]
        return (f"| {label} | **{side['overhead_x']:.2f}x** (fastest runs {side['wall_s'] / alone['wall_s']:.2f}x) "
                f"| {per_round:.2f}x | {rest:+.1f} s | (pairs: {pairs}; the overhead is their geometric mean) | | |")

    default = f"`fedrad simulate` ({r['flower'].get('backend', 'ray')} backend, the default here)"
    rows = [
        "| | wall time (fastest run) | a round (median of rounds 2-N) | the rest (start-up, round 1, exit) "
        "| all runs | final val AUC | epsilon per site |",
        "|---|---:|---:|---:|---|---:|---|",
        row(default, r["flower"]),
    ]
    if "flower_secagg" in r:
        rows.append(row("`fedrad simulate --secure-aggregation` (SecAgg+)", r["flower_secagg"]))
    if "flower_ray" in r:
        rows.append(row("`fedrad simulate --backend ray`", r["flower_ray"]))
    rows += [row("one process, no Flower", alone), overhead("**overhead**", r["flower"])]
    if "flower_secagg" in r:
        rows.append(overhead("overhead with `--secure-aggregation`", r["flower_secagg"]))
    if "flower_ray" in r:
        rows.append(overhead("overhead with `--backend ray`", r["flower_ray"]))
    return "\n".join(rows)


def other(results: Path) -> str:
    """DICOM I/O and augmentation cost; either row is left out when its results file is missing."""
    rows = ["| what | command | result |", "|---|---|---|"]
    dicom_path, augment_path = results / "dicom_io.json", results / "augment_speed.json"
    if not dicom_path.is_file() and not augment_path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no DICOM I/O or augmentation results", str(dicom_path))
    if dicom_path.is_file():
        d = json.loads(dicom_path.read_text())
        rows.append(
            f"| DICOM decode and cache: {d['files']} phantom radiographs, {d['size']} px (explicit, RLE, JPEG 2000) "
            f"| `python benchmarks/dicom_io.py` | fedrad decode+window+resize {d['fedrad_decode_per_s']:.1f} files/s "
            f"= {d['decode_ratio']:.2f}x pydicom's bare `pixel_array` ({d['pydicom_pixel_array_per_s']:.1f}/s); "
            f"{d['core_scaling']:.2f}x on {d['cores']} cores; an epoch from the cache {d['cache_speedup']:.0f}x "
            f"faster than decoding |")
    if augment_path.is_file():
        a = json.loads(augment_path.read_text())
        rows.append(
            f"| augmentation cost: 7 techniques, {a['size']} px, batch {a['batch']}, CPU "
            f"| `python benchmarks/augment_speed.py` | {1000 * a['augment_s']:.0f} ms per batch = "
            f"{a['share_of_step']:.1%} of one DP-SGD step of the CNN ({a['dp_step_s']:.2f} s); torchvision v2 "
            f"per image {a['torchvision_per_image_s']:.2f} s per batch ({a['speedup_vs_torchvision']:.0f}x slower) |")
    return "\n".join(rows)


# Issue 7's goals, checked by the goals block against whatever results files exist.
DP_RATIO_GOALS = {"scatternet": 0.6, "resnet18": 0.5}  # DP step / non-private step throughput, per model
AUC_GAP_GOAL = 0.02  # federated DP at epsilon 8 at most this much aggregate val AUC below pooled training
OVERHEAD_GOAL = 1.15  # `fedrad simulate` wall time over the same training in one process without Flower
STUDY_MINUTES_GOAL = 30.0  # a full default study on a 2-core CPU


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _beats(count: str | None) -> tuple[str, str]:
    """accuracy.py's ``"3/4 (1 tied)"``: the cell, and whether the row beat every site (ties said apart)."""
    if not count:
        return "—", "—"
    won, total = (int(x) for x in count.split()[0].split("/"))
    tied = re.search(r"\((\d+) tied\)", count)
    ties = int(tied.group(1)) if tied else 0
    if won == total:
        return count, "yes"
    if won + ties == total:
        return count, f"no site does better alone ({ties} tied)"
    return count, "**no**"


def _accuracy_goals(report: dict) -> tuple[list[str], list[tuple[str, float]]]:
    """The accuracy goals' rows, and the default study's wall time in the table (label, seconds)."""
    by_id = {r["id"]: r for r in report["rows"] if r["status"] == "ok"}
    code = StudyConfig()
    dp8, pooled, fed = by_id.get(f"dp8-{code.strategy}"), by_id.get("pooled"), by_id.get(code.strategy)
    rows, walls = [], []
    if dp8 and pooled:
        gap = pooled["aggregate"]["auc"] - dp8["aggregate"]["auc"]
        rows.append(f"| the default study (federated, DP at ε=8) vs pooled training without DP: aggregate val AUC "
                    f"| at most {AUC_GAP_GOAL} below | {dp8['aggregate']['auc']:.3f} vs "
                    f"{pooled['aggregate']['auc']:.3f} ({gap:.3f} below) | {_met(gap <= AUC_GAP_GOAL)} |")
    if dp8:
        cell, met = _beats(dp8.get("beats_local_dp"))
        rows.append(f"| the default study beats each site alone under the same ε, on the site's own val split "
                    f"| every site | {cell} | {met} |")
        rows.append(f"| worst-site val AUC of the default study | reported, close to the aggregate "
                    f"| {dp8['worst']['auc']:.3f} (aggregate {dp8['aggregate']['auc']:.3f}) | — |")
        walls.append(("the accuracy table's run", dp8["wall_s"]))
    if fed:
        cell, met = _beats(fed.get("beats_local"))
        rows.append(f"| {code.strategy} without DP beats each site alone without DP | every site | {cell} | {met} |")
    s = report["settings"]
    table = (report["dp_strategy"], s["model"], s["image_size"], s["rounds"], s["local_epochs"], s["batch_size"],
             s["lr"])
    ours = (code.strategy, code.model, code.image_size, code.num_rounds, code.local_epochs, code.batch_size, code.lr)

    def listed(values: tuple) -> str:
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

    rows.append(f"| the code's defaults (`StudyConfig`) are what the table recommends and ran "
                f"| strategy, model, px, rounds, local epochs, batch, lr "
                f"| table: {listed(table)}; code: {listed(ours)} | {_met(table == ours)} |")
    return rows, walls


def goals(results: Path) -> str:
    """Issue 7's goals, one row each, from whichever of the accuracy, DP speed and federation results exist."""
    paths = {name: results / f"{name}.json" for name in ("accuracy", "dp_speed", "federation")}
    if not any(p.is_file() for p in paths.values()):
        raise FileNotFoundError(errno.ENOENT, "no accuracy, DP speed or federation results", str(paths["accuracy"]))
    rows = ["| goal | target | measured | met |", "|---|---|---|---|"]
    walls: list[tuple[str, float]] = []
    if paths["accuracy"].is_file():
        more, walls = _accuracy_goals(json.loads(paths["accuracy"].read_text()))
        rows += more
    if paths["dp_speed"].is_file():
        seen: set[str] = set()
        for case in json.loads(paths["dp_speed"].read_text()):
            goal = DP_RATIO_GOALS.get(case["model"])
            if goal is None or case["model"] in seen:
                continue
            seen.add(case["model"])
            name = MODEL_LABELS[case["model"]].split(" (")[0]
            rows.append(f"| DP step / non-private step throughput, {name} ({case['input']} px, batch {case['batch']}) "
                        f"| at least {goal} | {case['ratio_fedrad']:.3f} | {_met(case['ratio_fedrad'] >= goal)} |")
    if paths["federation"].is_file():
        flower = json.loads(paths["federation"].read_text())["flower"]
        rows.append(f"| federation overhead of the default study (`fedrad simulate`, {flower.get('backend', 'ray')} "
                    f"backend, against one process without Flower) | at most {OVERHEAD_GOAL:.2f}x "
                    f"| {flower['overhead_x']:.2f}x | {_met(flower['overhead_x'] <= OVERHEAD_GOAL)} |")
        runs = len(flower["runs_wall_s"])
        walls.insert(0, (f"slowest of the federation benchmark's {runs} runs" if runs > 1
                         else "the federation benchmark's run", max(flower["runs_wall_s"])))
    if walls:
        slowest = max(seconds for _, seconds in walls)
        rows.append(f"| a full default study on 2 CPU cores | at most {STUDY_MINUTES_GOAL:.0f} min "
                    f"| {'; '.join(f'{label} {seconds / 60:.1f} min' for label, seconds in walls)} "
                    f"| {_met(slowest <= 60 * STUDY_MINUTES_GOAL)} |")
    return "\n".join(rows)


# The headline table's rows: accuracy.py row ids, in the order shown ("dp8-" + the default strategy is added).
HEADLINE_ROWS = ("pooled", "local", "local-dp8", "dp3", "dp1")


def headline(results: Path) -> str:
    """The README's table: the default study against its references (pooled, each site alone) and other
    budgets, from ``accuracy.json``; then one line each on the DP step's speed and Flower's overhead,
    where their results exist."""
    report = json.loads((results / "accuracy.json").read_text())
    by_id = {r["id"]: r for r in report["rows"] if r["status"] == "ok"}
    default = f"dp8-{StudyConfig().strategy}"
    order = [*HEADLINE_ROWS[:3], default, *HEADLINE_ROWS[3:]]
    rows = ["| study | privacy | val AUC, all sites / worst site | wall time (2 CPU cores) |", "|---|---|---|---:|"]
    for row_id in order:
        r = by_id.get(row_id)
        if r is None:
            continue
        what = {"pooled": "pooled: all images in one place", "local": "each site alone"}.get(
            r["mode"], f"federated ({r['strategy']})")
        auc = f"{r['aggregate']['auc']:.3f} / {r['worst']['auc']:.3f}"
        if row_id == default:
            what, auc = f"**fedrad's default study: {what}**", f"**{auc}**"
        privacy = f"DP ε={r['epsilon_target']:g}" if r["dp"] else "none"
        rows.append(f"| {what} | {privacy} | {auc} | {r['wall_s']:.0f} s |")
    lines = ["\n".join(rows)]
    if (line := unseen_headline(results)) is not None:
        lines.append(line)
    if default in by_id and by_id[default].get("beats_local_dp"):
        lines.append(f"Under the same budget (ε=8) the default study beats each site training alone at "
                     f"{by_id[default]['beats_local_dp']} sites, on each site's own validation split.")
    if (results / "dp_speed.json").is_file():
        cases = json.loads((results / "dp_speed.json").read_text())
        case = next((c for c in cases if c["model"] == StudyConfig().model), None)
        if case:
            name = MODEL_LABELS.get(case["model"], case["model"]).split(" (")[0]
            lines.append(f"DP step speed: {case['ratio_fedrad']:.3f} of the non-private step's throughput ({name}, "
                         f"{case['input']} px, batch {case['batch']}; Opacus' hooks {case['ratio_opacus']:.3f}).")
    if (results / "federation.json").is_file():
        flower = json.loads((results / "federation.json").read_text())["flower"]
        lines.append(f"Federation overhead: the default study through Flower ({flower.get('backend', 'ray')} backend) "
                     f"takes {flower['overhead_x']:.2f}x the time of the same training in one process without "
                     f"Flower; the whole study took at most {max(flower['runs_wall_s']) / 60:.1f} min in its runs.")
    return "\n\n".join(lines)


BLOCKS: dict[str, Callable[[Path], str]] = {
    "headline": headline, "goals": goals, "accuracy": accuracy, "unseen": unseen, "dp_speed": dp_speed,
    "federation": federation, "other": other,
}
# Which blocks each page must hold (any block found in a page is rebuilt; a missing expected one is reported).
EXPECTED = {"readme": ("headline",), "docs": ("goals", "accuracy", "unseen", "dp_speed", "federation", "other")}


def regenerate(text: str, results: Path, expected: tuple[str, ...] = (),
               page: str = "the page") -> tuple[str, list[str], list[str]]:
    """``text`` with every block it holds rebuilt; the names rebuilt, and the names skipped with why
    (an ``expected`` block the text lacks is skipped too)."""
    done, skipped = [], []
    for name, build in BLOCKS.items():
        pattern = re.compile(rf"(<!-- bench:{name} -->\n)(?:.*?\n)?(<!-- /bench:{name} -->)", re.S)
        if not pattern.search(text):
            if name in expected:
                skipped.append(f"{name}: no <!-- bench:{name} --> block in {page}")
            continue
        try:
            table = build(results)
        except FileNotFoundError as e:
            skipped.append(f"{name}: {Path(e.filename).name} not found in {results}")
            continue
        text = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), text, count=1)
        done.append(name)
    return text, done, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--readme", type=Path, help="the page with the headline table (default README.md)")
    parser.add_argument("--docs", type=Path, help="the page with every full table (default docs/benchmarks.md)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a page's tables differ; write nothing")
    args = parser.parse_args(argv)
    # Pages named on the command line are the only ones touched; none named: both default pages.
    pages = [(role, path) for role, path in (("readme", args.readme), ("docs", args.docs)) if path] or [
        ("readme", ROOT / "README.md"), ("docs", ROOT / "docs" / "benchmarks.md")]
    status = 0
    for role, path in pages:
        if not path.is_file():
            print(f"{path}: not found", file=sys.stderr)
            status = 1
            continue
        old = path.read_text()
        new, done, skipped = regenerate(old, args.results, EXPECTED[role], str(path))
        for why in skipped:
            print(f"skipped {why}", file=sys.stderr)
        if args.check:
            if new != old:
                print(f"{path}: benchmark tables differ from {args.results} (run python benchmarks/readme.py)",
                      file=sys.stderr)
                status = 1
            else:
                print(f"{path}: {len(done)} benchmark tables match {args.results}")
            continue
        if new != old:
            path.write_text(new)
        print(f"{path}: regenerated {', '.join(done) or 'nothing'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
