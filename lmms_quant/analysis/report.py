"""``lmms-quant report DIR``: the study's tables and figures for a results folder.

Writes to ``--out`` (default ``DIR/report``):

* ``table.csv``  one row per configuration x task: bits and method per component,
  bits per weight (study and storage convention, model and per component), every
  metric with its recovery (% of the full-precision run of the same model and
  task with the same number of documents, when there is one), Pareto flags,
  calibration and label-free fidelity (agreement with the full-precision
  outputs, empty and degenerate generations); ``table.md`` a compact view of it;
* ``importance.csv`` / ``.md``  component importance per model, method and task
  (random forest, permutation, SHAP, their consensus, and the R^2 of a linear
  fit; see :mod:`lmms_quant.analysis.importance`);
* ``nonadditivity.csv``  drop with two components quantized vs the sum of each alone;
* ``figures/*.png`` and ``*.svg``  score vs bits per weight with the Pareto front per
  method; sensitivity curves (one component quantized, the rest at 16); importance bars;
* ``leaderboard/<config>.json``  one leaderboard record per configuration;
* ``report.html``  all of it on one self-contained page (figures inlined as base64 PNG).

The score of a task is its primary metric: ``--metric TASK=METRIC``, else the
first of :data:`PREFERRED_METRICS` the task reports, else its first metric.
Pareto flags: ``pareto_method`` is the front of the run's own method (the
full-precision run counts as the 16-bit end of every method's grid and gets the
front over all methods), ``pareto_all`` the front over every run of the model.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmms_quant.recipe import COMPONENTS

from .fidelity import fidelity
from .importance import component_importance, non_additivity, shap_available
from .results import ResultsFormatError, Run, load_runs, read_samples

__all__ = ["PREFERRED_METRICS", "pareto_mask", "primary_metrics", "find_reference", "recovery", "build_rows", "build_importance",
           "build_nonadditivity", "Report", "make_report", "write_report", "markdown_table"]

#: Primary metric of a task, in order of preference (the study reports CIDEr for captions, VQA accuracy for VQA).
PREFERRED_METRICS = ("CIDEr", "vqa_accuracy", "exact_match", "accuracy", "acc", "recall@1", "anls", "relaxed_overall")
BPW_KINDS = ("study", "storage")


# ---------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------

def pareto_mask(xs: Sequence[float], ys: Sequence[float], *, higher_is_better: bool = True) -> list[bool]:
    """True for points on the Pareto front: no other point has fewer or equal bits and a
    better or equal score with at least one of the two strictly better."""
    sign = 1.0 if higher_is_better else -1.0
    pts = [(float(x), sign * float(y)) for x, y in zip(xs, ys)]
    return [not any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(pts) if j != i)
            for i, (x, y) in enumerate(pts)]


def primary_metrics(runs: Sequence[Run], overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Task -> its primary metric."""
    overrides = dict(overrides or {})
    seen: dict[str, list[str]] = {}
    for r in runs:
        for task, metrics in r.scores.items():
            names = seen.setdefault(task, [])
            names += [m for m in metrics if m not in names]
    unknown = sorted(set(overrides) - set(seen))
    if unknown:
        raise ResultsFormatError(f"--metric: no results for task(s) {unknown}; tasks here: {', '.join(seen)}")
    out = {}
    for task, names in seen.items():
        if task in overrides:
            if overrides[task] not in names:
                raise ResultsFormatError(f"--metric {task}={overrides[task]}: the task reports {', '.join(names)}")
            out[task] = overrides[task]
        else:
            out[task] = next((m for m in PREFERRED_METRICS if m in names), names[0])
    return out


def find_reference(run: Run, task: str, runs: Sequence[Run]) -> Run | None:
    """The full-precision run of the same model on ``task`` with the same number of documents (the newest)."""
    cands = [r for r in runs if r.is_fp and r.model_key == run.model_key and task in r.scores
             and r.n_samples.get(task) == run.n_samples.get(task)]
    return max(cands, key=lambda r: r.date) if cands else None


def recovery(value: float, ref: float | None, higher_is_better: bool = True) -> float | None:
    """Score as % of the full-precision score (inverted for lower-is-better metrics); None when undefined."""
    if ref is None:
        return None
    if higher_is_better:
        return 100.0 * value / ref if ref != 0 else None
    return 100.0 * ref / value if value != 0 else None


CALIB_KEYS = ("source", "samples", "seed", "max_seq_len")


def _calib_text(c: Mapping[str, Any] | None) -> str:
    """``source=world,samples=128,seed=42,max_seq_len=512``, or ``none`` for data-free methods."""
    if not c:
        return "none"
    return ",".join(f"{k}={c[k]}" for k in CALIB_KEYS if k in c)


def _groups(runs: Sequence[Run], task: str) -> dict[tuple, list[Run]]:
    """(model, method) -> runs on ``task``.  The newest full-precision run of the model (same
    number of documents) joins every method's group, as the 16-bit end of its grid."""
    with_task = [r for r in runs if task in r.scores]
    out: dict[tuple, list[Run]] = {}
    for r in with_task:
        if not r.is_fp:
            out.setdefault((r.model_key, r.method), []).append(r)
    for members in out.values():
        ref = find_reference(members[0], task, with_task)
        if ref is not None:
            members.append(ref)
    for r in with_task:
        if r.is_fp and not any(mk == r.model_key for mk, _ in out):
            out.setdefault((r.model_key, r.method), []).append(r)
    return out


def _hib(run: Run, task: str, metric: str) -> bool:
    return run.higher_is_better.get(task, {}).get(metric, True)


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------

def _pareto_flags(runs: Sequence[Run], primary: Mapping[str, str], bpw: str) -> tuple[dict, dict]:
    per_method: dict[tuple[str, str], bool] = {}
    overall: dict[tuple[str, str], bool] = {}

    def mark(members: list[Run], task: str, metric: str, into: dict, *, skip_fp: bool) -> None:
        members = [m for m in members if m.bpw and metric in m.scores[task]]
        if not members:
            return
        mask = pareto_mask([m.bpw["model"][bpw] for m in members], [m.scores[task][metric] for m in members],
                           higher_is_better=_hib(members[0], task, metric))
        for m, flag in zip(members, mask):
            if not (skip_fp and m.is_fp):
                into[(str(m.path), task)] = flag

    for task, metric in primary.items():
        for members in _groups(runs, task).values():
            mark(members, task, metric, per_method, skip_fp=True)
        by_model: dict[tuple, list[Run]] = {}
        for r in runs:
            if task in r.scores:
                by_model.setdefault((r.model_key, r.n_samples.get(task)), []).append(r)
        for members in by_model.values():
            mark(members, task, metric, overall, skip_fp=False)
    return per_method, overall


def build_rows(runs: Sequence[Run], primary: Mapping[str, str], *, bpw: str = "study", with_fidelity: bool = True) -> list[dict[str, Any]]:
    """The tidy table: one row per run x task."""
    per_method, overall = _pareto_flags(runs, primary, bpw)
    rows: list[dict[str, Any]] = []
    for r in runs:
        for task, metrics in r.scores.items():
            ref = find_reference(r, task, runs)
            row: dict[str, Any] = {"config_id": r.config_id, "model": r.model, "method": r.method, "task": task}
            row.update({f"bits_{c}": r.bits[c] for c in COMPONENTS})
            row.update({f"method_{c}": r.methods[c] or ("none" if r.recipe else None) for c in COMPONENTS})
            row.update({f"bpw_{k}": r.bpw.get("model", {}).get(k) for k in BPW_KINDS})
            row.update({f"bpw_{c}_{k}": r.bpw.get(c, {}).get(k) for c in COMPONENTS for k in BPW_KINDS})
            row.update({"n_samples": r.n_samples.get(task), "limit": r.limit, "calibration": _calib_text(r.calibration)})
            metric = primary.get(task)
            row["primary_metric"] = metric
            row["score"] = metrics.get(metric)
            row["reference"] = ref.config_id if ref is not None else None
            row["recovery_pct"] = (recovery(metrics[metric], ref.scores[task].get(metric), _hib(r, task, metric))
                                   if ref is not None and metric in metrics else None)
            key = (str(r.path), task)
            # a full-precision run belongs to every method's front: it gets the front over all methods
            row["pareto_method"] = per_method.get(key, overall.get(key))
            row["pareto_all"] = overall.get(key)
            if with_fidelity:
                row.update(_fidelity_columns(r, ref, task))
            for m, v in metrics.items():
                row[m] = v
                row[f"{m}_stderr"] = r.stderr.get(task, {}).get(m)
                row[f"{m}_recovery_pct"] = (recovery(v, ref.scores[task].get(m), _hib(r, task, m))
                                            if ref is not None and m in ref.scores[task] else None)
            row["weights_sha256"] = r.weights_sha256
            row["path"] = str(r.path)
            rows.append(row)
    return rows


def _fidelity_columns(run: Run, ref: Run | None, task: str) -> dict[str, Any]:
    samples = read_samples(run, task)
    if samples is None:
        return {"fp_agree": None, "n_compared": None, "n_empty": None, "n_degenerate": None}
    ref_samples = read_samples(ref, task) if ref is not None else None
    fid = fidelity(samples, ref_samples)
    return {"fp_agree": fid["agree"], "n_compared": fid["n_compared"], "n_empty": fid["n_empty"], "n_degenerate": fid["n_degenerate"]}


def _grid_groups(runs: Sequence[Run], primary: Mapping[str, str]) -> Iterator[tuple[str, str, Any, str, list[Run]]]:
    for task, metric in primary.items():
        for (mk, method), members in _groups(runs, task).items():
            members = [m for m in members if m.recipe is not None and metric in m.scores[task]]
            if members:
                yield task, metric, mk, method, members


def build_importance(runs: Sequence[Run], primary: Mapping[str, str], *, seed: int = 0) -> list[dict[str, Any]]:
    """Component importance per (model, method, task), over that group's configurations."""
    out = []
    for task, metric, _mk, method, members in _grid_groups(runs, primary):
        varying = [c for c in COMPONENTS if len({m.bits[c] for m in members}) > 1]
        X = [[m.bits[c] for c in varying] for m in members]
        y = [m.scores[task][metric] for m in members]
        imp = component_importance(X, y, varying, seed=seed)
        out.append({"model": members[0].model, "method": method, "task": task, "metric": metric, **imp.to_dict()})
    return out


def build_nonadditivity(runs: Sequence[Run], primary: Mapping[str, str]) -> list[dict[str, Any]]:
    rows = []
    for task, metric, _mk, method, members in _grid_groups(runs, primary):
        scores = {tuple(m.bits[c] for c in COMPONENTS): m.scores[task][metric] for m in members}
        for row in non_additivity(scores, COMPONENTS, higher_is_better=_hib(members[0], task, metric)):
            rows.append({"model": members[0].model, "method": method, "task": task, "metric": metric, **row})
    return rows


# ---------------------------------------------------------------------------
# Figures (matplotlib's object API with the Agg renderer: no pyplot, no global state)
# ---------------------------------------------------------------------------

@dataclass
class Figure:
    name: str
    title: str
    png: bytes
    svg: str


def _render(fig, name: str, title: str) -> Figure:
    png, svg = io.BytesIO(), io.StringIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    fig.savefig(svg, format="svg", bbox_inches="tight")
    return Figure(name=name, title=title, png=png.getvalue(), svg=svg.getvalue())


def _slug(*parts: Any) -> str:
    """A file-name-safe name (a model given as an absolute path loses its leading slash)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(str(p).strip("/") for p in parts)).strip("-")


def pareto_figures(runs: Sequence[Run], primary: Mapping[str, str], *, bpw: str = "study") -> list[Figure]:
    """Per model and task: score vs bits per weight, every method, its Pareto front, the full-precision star."""
    from matplotlib.figure import Figure as MplFigure

    figs = []
    for task, metric in primary.items():
        groups = _groups(runs, task)
        for mk in dict.fromkeys(k for k, _ in groups):
            fig = MplFigure(figsize=(6.4, 4.2))
            ax = fig.add_subplot()
            model_name = ""
            for i, (method, members) in enumerate(sorted((m, ms) for (k, m), ms in groups.items() if k == mk)):
                members = [m for m in members if m.bpw and metric in m.scores[task]]
                if not members:
                    continue
                model_name = members[0].model
                xs = [m.bpw["model"][bpw] for m in members]
                ys = [m.scores[task][metric] for m in members]
                ax.scatter(xs, ys, color=f"C{i}", alpha=0.55, s=22, label=method)
                front = sorted((x, y) for x, y, f in zip(xs, ys, pareto_mask(xs, ys, higher_is_better=_hib(members[0], task, metric))) if f)
                ax.plot([p[0] for p in front], [p[1] for p in front], color=f"C{i}", lw=1.6, marker="o", ms=5, label=f"{method} Pareto front")
            fps = [r for r in runs if r.is_fp and r.model_key == mk and task in r.scores and r.bpw and metric in r.scores[task]]
            if fps:
                ax.scatter([r.bpw["model"][bpw] for r in fps], [r.scores[task][metric] for r in fps], marker="*", s=160,
                           color="black", zorder=5, label="full precision")
            ax.set_xlabel(f"bits per weight ({bpw} convention)")
            ax.set_ylabel(metric)
            ax.set_title(f"{model_name}: {task}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            figs.append(_render(fig, _slug("pareto", model_name, task), f"{model_name} — {task}: {metric} vs bits per weight"))
    return figs


def sensitivity_figures(runs: Sequence[Run], primary: Mapping[str, str]) -> list[Figure]:
    """Per model, method and task: score vs the bit width of one component, the others at 16."""
    from matplotlib.figure import Figure as MplFigure

    figs = []
    for task, metric, _mk, method, members in _grid_groups(runs, primary):
        curves: dict[str, list[tuple[int, float]]] = {}
        for m in members:
            low = [c for c in COMPONENTS if m.bits[c] != 16]
            if len(low) == 1:
                curves.setdefault(low[0], []).append((m.bits[low[0]], m.scores[task][metric]))
        if not curves:
            continue
        fp = [m for m in members if m.is_fp]
        fig = MplFigure(figsize=(5.6, 3.8))
        ax = fig.add_subplot()
        ticks: set[int] = set()
        for i, (comp, pts) in enumerate(sorted(curves.items())):
            pts = sorted(set(pts + ([(16, fp[0].scores[task][metric])] if fp else [])))
            ticks |= {p[0] for p in pts}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=f"{comp} only")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.set_xlabel("bits of the quantized component (others at 16)")
        ax.set_ylabel(metric)
        ax.set_title(f"{members[0].model} / {method}: {task}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        figs.append(_render(fig, _slug("sensitivity", members[0].model, method, task),
                            f"{members[0].model} / {method} — {task}: sensitivity per component"))
    return figs


def importance_figures(importance: Sequence[Mapping[str, Any]]) -> list[Figure]:
    from matplotlib.figure import Figure as MplFigure

    figs = []
    for imp in importance:
        if not imp.get("consensus"):
            continue
        feats = imp["features"]
        kinds = [k for k in ("rf", "permutation", "shap", "consensus") if imp.get(k)]
        fig = MplFigure(figsize=(5.6, 3.4))
        ax = fig.add_subplot()
        width = 0.8 / len(kinds)
        for i, k in enumerate(kinds):
            ax.bar([j + i * width for j in range(len(feats))], [100 * imp[k][f] for f in feats], width=width, label=k, color=f"C{i}")
        ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(feats))], feats)
        ax.set_ylabel("importance share (%)")
        r2 = imp.get("r2_linear")
        ax.set_title(f"{imp['model']} / {imp['method']}: {imp['task']}" + (f"  (linear R² {r2:.2f})" if r2 is not None else ""))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        figs.append(_render(fig, _slug("importance", imp["model"], imp["method"], imp["task"]),
                            f"{imp['model']} / {imp['method']} — {imp['task']}: component importance"))
    return figs


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

@dataclass
class Report:
    rows: list[dict[str, Any]]
    importance: list[dict[str, Any]]
    nonadditivity: list[dict[str, Any]]
    primary: dict[str, str]
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)


def make_report(path: str | Path, *, metrics: Mapping[str, str] | None = None, bpw: str = "study", plots: bool = True,
                seed: int = 0) -> Report:
    """Everything the report holds, computed from the results under ``path``."""
    from .leaderboard import make_record

    runs = load_runs(path)
    primary = primary_metrics(runs, metrics)
    importance = build_importance(runs, primary, seed=seed)
    rep = Report(rows=build_rows(runs, primary, bpw=bpw), importance=importance,
                 nonadditivity=build_nonadditivity(runs, primary), primary=primary)
    if not any(r.is_fp for r in runs):
        rep.notes.append("no full-precision run (all components at 16 bits) in this folder: recovery and fidelity are empty")
    if not shap_available():
        rep.notes.append("shap is not installed: importance consensus = mean of random-forest and permutation importance "
                         "(scikit-learn offers no TreeSHAP equivalent); pip install 'lmms-quant[analysis]'")
    if plots:
        rep.figures = pareto_figures(runs, primary, bpw=bpw) + sensitivity_figures(runs, primary) + importance_figures(importance)
    rep.records = [make_record(r) for r in runs if r.metadata is not None]
    return rep


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    columns = list(columns or _columns(rows))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


COMPACT = ("config_id", "method", "task", "bits_vit", "bits_connector", "bits_llm", "bpw_study", "bpw_storage", "primary_metric",
           "score", "recovery_pct", "pareto_method", "pareto_all", "fp_agree", "n_degenerate", "n_empty", "calibration")
IMPORTANCE_COLS = ("model", "method", "task", "metric", "component", "rf_pct", "permutation_pct", "shap_pct", "consensus_pct",
                   "r2_linear", "n", "notes")


def importance_table(importance: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Long form: one row per (model, method, task, component), shares in %."""
    rows = []
    for imp in importance:
        for f in imp["features"] or [None]:
            row = {"model": imp["model"], "method": imp["method"], "task": imp["task"], "metric": imp["metric"], "component": f,
                   "r2_linear": imp["r2_linear"], "n": imp["n"], "notes": "; ".join(imp["notes"])}
            for k in ("rf", "permutation", "shap", "consensus"):
                row[f"{k}_pct"] = 100 * imp[k][f] if imp.get(k) and f is not None else None
            rows.append(row)
    return rows


def write_report(rep: Report, out: str | Path, *, source: str = "") -> Path:
    """Write every file of the report under ``out``; returns the HTML page's path."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    _write_csv(out / "table.csv", rep.rows)
    (out / "table.md").write_text(markdown_table(rep.rows, [c for c in COMPACT if any(c in r for r in rep.rows)]))
    imp_rows = importance_table(rep.importance)
    _write_csv(out / "importance.csv", imp_rows, IMPORTANCE_COLS)
    (out / "importance.md").write_text(markdown_table(imp_rows, IMPORTANCE_COLS))
    _write_csv(out / "nonadditivity.csv", rep.nonadditivity)
    for fig in rep.figures:
        (out / "figures" / f"{fig.name}.png").write_bytes(fig.png)
        (out / "figures" / f"{fig.name}.svg").write_text(fig.svg)
    if rep.records:
        lb = out / "leaderboard"
        lb.mkdir(exist_ok=True)
        for rec in rep.records:
            (lb / f"{_slug(rec['source']['config_id'])}.json").write_text(json.dumps(rec, indent=2) + "\n")
    page = out / "report.html"
    page.write_text(render_html(rep, source=source), encoding="utf-8")
    return page


def _html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(rep: Report, *, source: str = "") -> str:
    """One self-contained page: no external files, scripts or fonts."""
    css = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:12px;margin:1em 0}"
           "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
           "figure{display:inline-block;margin:0.5em}figcaption{font-size:12px;color:#444}.note{color:#8a5a00}")
    tasks = ", ".join(f"{t} ({m})" for t, m in rep.primary.items())
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>lmms-quant report</title><style>{css}</style></head><body>",
             f"<h1>lmms-quant report</h1><p>{html.escape(source)}: {len({r['config_id'] for r in rep.rows})} configurations; "
             f"tasks (primary metric): {html.escape(tasks)}.</p>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in rep.notes]
    parts += ["<h2>Configurations</h2>", _html_table(rep.rows, [c for c in COMPACT if any(c in r for r in rep.rows)])]
    imp_rows = importance_table(rep.importance)
    if imp_rows:
        parts += ["<h2>Component importance</h2><p>Shares (%) of random-forest, permutation and SHAP importance over the grid, "
                  "their consensus, and the R² of a linear fit of the score on the bit widths.</p>",
                  _html_table(imp_rows, IMPORTANCE_COLS)]
    if rep.nonadditivity:
        parts += ["<h2>Non-additivity</h2><p>Drop with both components quantized vs the sum of the drops with each alone "
                  "(excess &gt; 0: worse than additive).</p>", _html_table(rep.nonadditivity, _columns(rep.nonadditivity))]
    if rep.figures:
        parts.append("<h2>Figures</h2>")
        for fig in rep.figures:
            b64 = base64.b64encode(fig.png).decode()
            parts.append(f"<figure><img alt='{html.escape(fig.title)}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption>{html.escape(fig.title)}</figcaption></figure>")
    parts += ["<details><summary>Full table</summary>" + _html_table(rep.rows, _columns(rep.rows)) + "</details>", "</body></html>"]
    return "\n".join(parts)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("report", help="tables, Pareto fronts, sensitivity, component importance and fidelity of a results folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="a results folder (a sweep's output, or any lmms-eval --output_path)")
    p.add_argument("--out", help="where to write (default DIR/report)")
    p.add_argument("--metric", action="append", default=[], metavar="TASK=METRIC", help="the primary metric of a task (repeatable)")
    p.add_argument("--bpw", choices=BPW_KINDS, default="study", help="bits-per-weight convention of the x axes and Pareto fronts")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.set_defaults(func=main)


def main(ns: argparse.Namespace) -> int:
    metrics = {}
    for item in ns.metric:
        task, sep, metric = item.partition("=")
        if not sep:
            print(f"lmms-quant report: --metric {item!r} must be TASK=METRIC", file=sys.stderr)
            return 2
        metrics[task] = metric
    try:
        rep = make_report(ns.dir, metrics=metrics, bpw=ns.bpw, plots=not ns.no_plots)
    except ResultsFormatError as exc:
        print(f"lmms-quant report: {exc}", file=sys.stderr)
        return 2
    page = write_report(rep, Path(ns.out) if ns.out else Path(ns.dir) / "report", source=str(ns.dir))
    print(markdown_table(rep.rows, [c for c in COMPACT if any(c in r for r in rep.rows)]))
    for n in rep.notes:
        print(f"note: {n}", file=sys.stderr)
    print(f"report: {page} ({len(rep.rows)} rows, {len(rep.figures)} figures, {len(rep.records)} leaderboard records)")
    return 0
