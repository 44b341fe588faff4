"""``fedrad report RUN_DIR [RUN_DIR...]``: one self-contained report.html (inline SVG, opens offline).

Everything comes from the run directories: config.json, metrics.jsonl (per-site
metrics and the ROC, confusion and calibration summaries each site computed
itself) and cross_site.json. No image or prediction is needed, or present.
"""

from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path
from typing import Any

from common.errors import FedradError
from common.metrics import calibration_summary, pooled_roc

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
W, H, PAD = 420, 260, 42


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
               ylim: tuple[float, float] | None = None, hline: float | None = None, diagonal: bool = False,
               xlim: tuple[float, float] | None = None) -> str:
    """An SVG line chart; the series named 'aggregate' is drawn thick and black."""
    points = [p for pts in series.values() for p in pts if p[1] is not None and not math.isnan(p[1])]
    if not points:
        return f"<p>{html.escape(title)}: no data</p>"
    xs = [p[0] for p in points]
    x0, x1 = xlim or (min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1)
    y0, y1 = ylim or (min(p[1] for p in points), max(max(p[1] for p in points), hline or -math.inf))
    if y1 <= y0:
        y1 = y0 + 1

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (W - PAD - 10)

    def sy(y: float) -> float:
        return H - PAD - (y - y0) / (y1 - y0) * (H - PAD - 24)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img">',
             f'<text x="{W / 2}" y="15" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 10}" y2="{H - PAD}" stroke="#555"/>',
             f'<line x1="{PAD}" y1="24" x2="{PAD}" y2="{H - PAD}" stroke="#555"/>',
             f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">{html.escape(xlabel)}</text>',
             f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">'
             f'{html.escape(ylabel)}</text>']
    for frac in (0, 0.5, 1):
        y = y0 + frac * (y1 - y0)
        parts.append(f'<text x="{PAD - 4}" y="{sy(y) + 4}" text-anchor="end" font-size="10">{y:.2f}</text>')
        x = x0 + frac * (x1 - x0)
        parts.append(f'<text x="{sx(x)}" y="{H - PAD + 14}" text-anchor="middle" font-size="10">{x:.3g}</text>')
    if diagonal:
        parts.append(f'<line x1="{sx(x0)}" y1="{sy(y0)}" x2="{sx(x1)}" y2="{sy(y1)}" stroke="#aaa" '
                     'stroke-dasharray="4"/>')
    if hline is not None:
        parts.append(f'<line x1="{PAD}" y1="{sy(hline)}" x2="{W - 10}" y2="{sy(hline)}" stroke="#000" '
                     f'stroke-dasharray="6 3"/><text x="{W - 12}" y="{sy(hline) - 4}" text-anchor="end" '
                     f'font-size="10">budget {hline:g}</text>')
    for i, (name, pts) in enumerate(series.items()):
        good = [(x, y) for x, y in pts if y is not None and not math.isnan(y)]
        if not good:
            continue
        colour, width = ("#000", 3) if name == "aggregate" else (COLOURS[i % len(COLOURS)], 1.8)
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{width}" points="{path}"/>')
        parts.append(f'<text x="{W - 12}" y="{34 + 13 * i}" text-anchor="end" font-size="11" fill="{colour}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _warn(message: str) -> None:
    print(f"fedrad: warning: {message}", file=sys.stderr, flush=True)


def _json_file(path: Path, empty: Any) -> Any:
    """A JSON object file of the run; ``empty`` (with a warning) when it is missing or cannot be read."""
    if not path.exists():
        return empty
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        value = None
    if not isinstance(value, dict):
        _warn(f"{path} is not a JSON object (damaged?): left out of the report")
        return empty
    return value


def load_run(path: Path) -> dict[str, Any]:
    """What the report shows of one run directory: its config, its complete metrics rows (a torn line, the
    end of a write cut short, is skipped with a warning) and its cross-site table. Checkpoints and model.pt
    are not read, so a damaged one does not matter here."""
    from server.rundir import RunDirectory  # no torch: it is imported only to read or write checkpoints

    run_dir = RunDirectory(path)
    if not run_dir.metrics_path.exists():
        raise FedradError(f"{path}: no metrics.jsonl (not a fedrad run directory)")
    config = _json_file(run_dir.config_path, {})
    rounds, notes = run_dir.read_rounds()
    for note in notes:
        _warn(f"{path}: {note}")
    if not rounds:
        raise FedradError(f"{path}: metrics.jsonl has no rounds yet")
    cross = _json_file(path / "cross_site.json", None)
    return {"path": path, "config": config, "rounds": rounds, "cross": cross,
            "name": f"{config.get('mode', 'federated')}: {path.name}"}


def _calibration(summary: dict[str, Any] | None) -> str:
    """The pooled reliability curve, or why there is none: no bins, or predictions that do not spread
    (``degenerate``, common/metrics.py ``calibration_summary``), said in numbers instead of an empty plot."""
    if not summary:
        return "<p>Calibration: no site sent reliability bins.</p>"
    low, high = summary["predicted_range"]
    numbers = (f"mean predicted probability {summary['mean_predicted']:.3f}, observed positive share "
               f"{summary['positive_rate']:.3f}, expected calibration error {summary['ece']:.3f}")
    if summary["degenerate"]:
        return (f'<div style="width:{W}px"><h4>Calibration, final model: degenerate</h4><p>The bins\' mean '
                f"predictions all lie in [{low:.3f}, {high:.3f}]: the model gives every image about the same "
                f"probability, so there is no reliability curve to draw. {numbers}.</p></div>")
    curve = {"aggregate": list(zip(summary["predicted"], summary["observed"]))}
    return (line_chart(curve, "Calibration, final model", "mean predicted", "observed frequency", (0, 1),
                       diagonal=True, xlim=(0, 1)) + f'<p style="width:{W}px"><small>{numbers}.</small></p>')


def _run_section(run: dict[str, Any]) -> str:
    cfg, rounds = run["config"], run["rounds"]
    last = rounds[-1]
    sites = [s["site"] for s in last["sites"]]
    out = [f"<h2>{html.escape(run['name'])}</h2>",
           f"<p>{html.escape(cfg.get('strategy', '?'))}, {html.escape(str(cfg.get('model', '?')))} "
           f"{cfg.get('image-size', '?')} px, {len(rounds)} rounds, "
           + (f"DP epsilon {cfg.get('epsilon')} delta {cfg.get('delta')} per site" if cfg.get("dp", True)
              else "no DP") + "</p>"]
    rows = []
    for s in last["sites"]:
        pos_t, pos_v = s.get("n_pos_train"), s.get("n_pos_val")
        balance = (f"{pos_t / s['n_train']:.0%} / {pos_v / s['n_val']:.0%}"
                   if pos_t is not None and s["n_train"] and s["n_val"] else "-")
        rows.append([html.escape(s["site"]), str(s["n_train"]), str(s["n_val"]), balance,
                     html.escape(s.get("declined", ""))])
    out.append("<h3>Sites</h3>" + _table(["site", "train images", "val images", "positive share train / val",
                                           "declined"], rows))
    auc = {site: [(r["round"], next((x["auc"] for x in r["sites"] if x["site"] == site), None)) for r in rounds]
           for site in sites}
    auc["aggregate"] = [(r["round"], r["aggregate"].get("auc")) for r in rounds]
    eps = {site: [(r["round"], next((x["epsilon"] for x in r["sites"] if x["site"] == site), None))
                  for r in rounds] for site in sites}
    out.append('<div class="row">' + line_chart(auc, "Validation AUC per round", "round", "AUC") +
               line_chart(eps, "Privacy spent per site", "round", "epsilon", hline=cfg.get("epsilon")) + "</div>")
    agg = last["aggregate"]
    with_curves = [s for s in last["sites"] if "curves" in s]
    if with_curves:
        roc = {s["site"]: [(1.0, 1.0), *zip(s["curves"].get("roc_fpr", []), s["curves"].get("roc_tpr", [])),
                           (0.0, 0.0)] for s in with_curves}
        pooled = agg.get("roc") or pooled_roc(last["sites"])
        if pooled:
            roc["aggregate"] = [(1.0, 1.0), *zip(pooled["fpr"], pooled["tpr"]), (0.0, 0.0)]
        points = sum(len(s["curves"].get("roc_tpr", [])) for s in with_curves)
        out.append('<div class="row">' +
                   line_chart(roc, "ROC, final model", "false positive rate", "true positive rate", (0, 1),
                              diagonal=True, xlim=(0, 1)) + _calibration(agg.get("calibration") or
                                                                         calibration_summary(last["sites"])) + "</div>")
        out.append(f"<p><small>ROC: each site's points at quantiles of its own scores ({points} points in all); "
                   "'aggregate' is the sites' curves pooled"
                   + (f" (area {pooled['auc']:.3f})" if pooled and "auc" in pooled else "") + ".</small></p>")
        confusion = [[html.escape(s["site"]), *[str(int(v)) for v in s["curves"]["confusion"]]] for s in with_curves]
        out.append("<h3>Confusion at the argmax decision</h3>" +
                   _table(["site", "TP", "FP", "TN", "FN"], confusion))
    point = agg.get("operating_point")
    if point:
        out.append(f"<h3>Operating point</h3><p>Decision threshold {point['threshold']:g} on the positive "
                   "class (chosen on the sites' pooled validation ROC curves, so optimistic there; "
                   "<code>fedrad predict</code> and <code>fedrad evaluate</code> decide with it): " + _table(
                       ["", "sensitivity", "specificity", "balanced accuracy"],
                       [["pooled", _num(point["sensitivity"]), _num(point["specificity"]),
                         _num(point["balanced_accuracy"])],
                        ["worst site", _num(point["worst_sensitivity"]), _num(point["worst_specificity"]), ""]])
                   + "</p>")
    gap_rows = sorted((s for s in last["sites"] if s["n_val"]), key=lambda s: (s["auc"] is None, s["auc"] or 0))
    out.append("<h3>Who the model serves worse (final round, worst first)</h3>" + _table(
        ["site", "AUC [95% CI]", "gap to aggregate", "accuracy", "sensitivity", "specificity", "epsilon"],
        [[html.escape(s["site"]), _num(s["auc"]) + (
            f' <small>[{_num(s["ci95"]["auc"][0])}, {_num(s["ci95"]["auc"][1])}]</small>' if "ci95" in s else ""),
          _num((s["auc"] - agg["auc"]) if s["auc"] is not None and agg.get("auc") is not None else None),
          _num(s["accuracy"]), _num(s["sensitivity"]), _num(s["specificity"]), _num(s["epsilon"], 2)]
         for s in gap_rows]))
    out.append(_multiclass_section(cfg, last))
    cross = run["cross"]
    if cross:
        rows = [[html.escape(m), *[_num(v) for v in cross["metrics"]["auc"][i]]] for i, m in enumerate(cross["models"])]
        out.append("<h3>Cross-site AUC (model on each site's validation split)</h3>" +
                   _table(["model \\ site", *cross["sites"]], rows))
    return "".join(out)


def _with_ci(row: dict[str, Any], metric: str) -> str:
    interval = row.get("ci95", {}).get(metric)
    return _num(row.get(metric)) + (f" <small>[{_num(interval[0])}, {_num(interval[1])}]</small>" if interval else "")


def _multiclass_section(cfg: dict[str, Any], last: dict[str, Any]) -> str:
    """Macro AUC, quadratic weighted kappa (ordinal grades) and each class's one-vs-rest AUC of the final round,
    per site and aggregated (common/multiclass.py); '' for a two-class study that is not ordinal."""
    agg, sites = last["aggregate"], [s for s in last["sites"] if s["n_val"]]
    metrics = [m for m in ("macro_auc", "kappa") if m in agg]
    per_class = "class_auc" in agg
    if not metrics and not per_class:
        return ""
    classes = [c.strip() for c in str(cfg.get("class-names", "")).split(",") if c.strip()]
    width = len(agg.get("class_auc", []))
    names = classes if len(classes) == width else [str(k) for k in range(width)]
    header = ["", *({"macro_auc": "macro AUC [95% CI]", "kappa": "quadratic weighted kappa [95% CI]"}[m]
                    for m in metrics), *(f"AUC {n} vs rest" for n in names)]
    rows = [[html.escape(label), *(_with_ci(row, m) for m in metrics),
             *(_num(v) for v in (row.get("class_auc") or [None] * width))]
            for label, row in [("aggregate", agg), *((s["site"], s) for s in sites)]]
    return ("<h3>Classes (final round)</h3><p>Each class's AUC ranks its images against all others by its "
            "probability; the macro AUC is their mean" + (", kappa the agreement of the predicted with the true "
                                                           "grade (1 perfect, 0 chance)" if "kappa" in metrics else "")
            + ". Per-class AUCs come from sites releasing at the <code>full</code> level.</p>" + _table(header, rows))


def comparison(runs: list[dict[str, Any]]) -> str:
    rows = []
    for run in runs:
        last = run["rounds"][-1]
        aucs = [s["auc"] for s in last["sites"] if s["auc"] is not None and s["n_val"]]
        agg = last["aggregate"]
        rows.append([html.escape(run["name"]), _num(agg.get("auc")), _num(min(aucs) if aucs else None),
                     _num(agg.get("accuracy")), _num(agg.get("sensitivity")), _num(agg.get("specificity")),
                     _num(agg.get("max_epsilon"), 2)])
    return "<h2>Comparison</h2>" + _table(["run", "aggregate AUC", "worst-site AUC", "accuracy", "sensitivity",
                                           "specificity", "max epsilon"], rows)


def write_report(run_dirs: list[Path], out: Path) -> Path:
    runs = [load_run(p) for p in run_dirs]
    body = (comparison(runs) if len(runs) > 1 else "") + "".join(_run_section(r) for r in runs)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedrad report</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;margin:8px 0 16px}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} th{{background:#f2f2f2}}
.row{{display:flex;flex-wrap:wrap;gap:16px}} h2{{border-bottom:2px solid #1f77b4}}</style></head>
<body><h1>fedrad study report</h1>{body}
<p style="color:#777">Metrics are computed at each hospital on its own validation split; only these numbers left
the sites.</p></body></html>"""
    out.write_text(page)
    return out
