"""``lmms-quant regress NEW BASELINE --tol ...``: a regression gate for CI.

Both arguments are a results JSON or a folder of them (a sweep's output, or an
lmms-eval ``--output_path``).  Runs are paired by configuration id (the folder
below the given path), then by model and recipe; two single files are paired
with each other.  Every metric of every baseline task is compared; a metric
*drops* when it moves the wrong way (down for higher-is-better metrics, as
the results JSON's ``higher_is_better`` says).

Tolerances (``--tol``, repeatable; the most specific one applies):

* ``0.02``        absolute: fail when the drop exceeds 0.02 in the metric's units;
* ``5%``          relative: fail when the drop exceeds 5% of the baseline value;
* ``ci`` / ``ci:0.9``  bootstrap: fail when the whole confidence interval (default 95%)
  of the change lies on the wrong side of zero, resampling documents from the
  per-sample logs (paired by ``doc_id`` when both runs scored the same documents).
  Where a metric has no per-sample scores (corpus metrics such as CIDEr, or no
  ``--log_samples``), it is compared exactly and the table says so.

Prefix a tolerance with ``METRIC=`` or ``TASK/METRIC=`` to scope it, e.g.
``--tol 0.01 --tol CIDEr=5% --tol lq_world_vqa/vqa_accuracy=ci``.  Without
``--tol`` nothing may drop at all.

Exit status: 0 no regression; 1 a metric dropped beyond its tolerance, or a
baseline configuration, task or metric is missing from NEW; 2 a file of the
wrong shape (refused with a message, never read as zeros) or a bad option.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .results import ResultsFormatError, Run, load_runs, read_samples, recipe_key

__all__ = ["Tolerance", "parse_tolerance", "Comparison", "compare", "pair_runs", "bootstrap_ci"]


@dataclass(frozen=True)
class Tolerance:
    """``kind``: ``abs`` (value in metric units), ``rel`` (value as a fraction of the baseline) or ``ci`` (value = level)."""

    kind: str
    value: float
    scope: str = ""  # "", "metric" or "task/metric"

    def describe(self) -> str:
        if self.kind == "abs":
            return f"±{self.value:g}"
        if self.kind == "rel":
            return f"{100 * self.value:g}%"
        return f"CI {100 * self.value:g}%"


def parse_tolerance(text: str) -> Tolerance:
    """``0.02``, ``5%``, ``ci``, ``ci:0.9``, each optionally prefixed ``METRIC=`` or ``TASK/METRIC=``."""
    scope, sep, spec = text.rpartition("=")
    spec = spec.strip().lower()
    try:
        if spec == "ci" or spec.startswith("ci:"):
            level = float(spec[3:]) if spec.startswith("ci:") else 0.95
            if not 0 < level < 1:
                raise ValueError
            return Tolerance("ci", level, scope)
        if spec.endswith("%"):
            value = float(spec[:-1]) / 100
            kind = "rel"
        else:
            value = float(spec)
            kind = "abs"
    except ValueError:
        raise ValueError(f"--tol {text!r}: expected [METRIC=|TASK/METRIC=] followed by a number (absolute), "
                         "N% (relative), ci or ci:LEVEL (bootstrap, 0 < LEVEL < 1)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"--tol {text!r}: the tolerance must be a finite number >= 0")
    return Tolerance(kind, value, scope)


def _pick(tols: Sequence[Tolerance], task: str, metric: str) -> Tolerance:
    for scope in (f"{task}/{metric}", metric, ""):
        found = [t for t in tols if t.scope == scope]
        if found:
            return found[-1]
    return Tolerance("abs", 0.0)


def bootstrap_ci(new: Sequence[float], base: Sequence[float], *, paired: bool, level: float = 0.95, iters: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(new) - mean(base)``; resamples documents
    jointly when ``paired`` (the two lists are aligned by document)."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(new, dtype=float), np.asarray(base, dtype=float)
    if paired:
        idx = rng.integers(0, len(a), size=(iters, len(a)))
        diffs = a[idx].mean(axis=1) - b[idx].mean(axis=1)
    else:
        diffs = a[rng.integers(0, len(a), size=(iters, len(a)))].mean(axis=1) - b[rng.integers(0, len(b), size=(iters, len(b)))].mean(axis=1)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _per_sample(run: Run, task: str, metric: str) -> dict[Any, float] | None:
    """doc_id -> the sample's score, when the log has numeric scores whose mean is the reported value."""
    if "," in metric:
        return None  # filtered metrics are not logged per sample under their key
    rows = read_samples(run, task)
    if not rows:
        return None
    vals = {}
    for r in rows:
        v = r.get(metric)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        vals[r["doc_id"]] = float(v)
    mean = sum(vals.values()) / len(vals)
    return vals if math.isclose(mean, run.scores[task][metric], rel_tol=1e-6, abs_tol=1e-9) else None


@dataclass
class Comparison:
    config: str
    task: str
    metric: str
    baseline: float | None
    new: float | None
    delta: float | None
    tolerance: str
    status: str  # ok | improved | REGRESSED | MISSING
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("REGRESSED", "MISSING")

    @property
    def moved(self) -> bool:
        return self.failed or bool(self.delta)


def pair_runs(new: Sequence[Run], base: Sequence[Run]) -> tuple[list[tuple[Run | None, Run]], list[Run]]:
    """``([(new or None, baseline)], unmatched new runs)``."""
    if len(new) == 1 and len(base) == 1:
        return [(new[0], base[0])], []
    by_id = {r.config_id: r for r in new}
    by_recipe = {(r.model, recipe_key(r.recipe)): r for r in new if r.recipe is not None}
    pairs, used = [], set()
    for b in base:
        n = by_id.get(b.config_id)
        if n is None and b.recipe is not None:
            n = by_recipe.get((b.model, recipe_key(b.recipe)))
        if n is not None and id(n) in used:
            n = None
        if n is not None:
            used.add(id(n))
        pairs.append((n, b))
    return pairs, [r for r in new if id(r) not in used]


def compare(new: Sequence[Run], base: Sequence[Run], tols: Sequence[Tolerance], *, iters: int = 2000,
            seed: int = 0) -> tuple[list[Comparison], list[str]]:
    """Every comparison, and notes (extra configurations, changed weight hashes)."""
    pairs, extra = pair_runs(new, base)
    out: list[Comparison] = []
    notes = [f"new configuration without a baseline: {r.config_id}" for r in extra]
    for n, b in pairs:
        if n is None:
            out.append(Comparison(b.config_id, "*", "*", None, None, None, "", "MISSING", "configuration not in NEW"))
            continue
        if n.weights_sha256 and b.weights_sha256 and n.weights_sha256 != b.weights_sha256:
            notes.append(f"{b.config_id}: the quantized weights differ from the baseline's (weights_sha256)")
        for task, metrics in b.scores.items():
            for metric, bval in metrics.items():
                tol = _pick(tols, task, metric)
                if task not in n.scores or metric not in n.scores[task]:
                    out.append(Comparison(b.config_id, task, metric, bval, None, None, tol.describe(), "MISSING", "metric not in NEW"))
                    continue
                nval = n.scores[task][metric]
                hib = b.higher_is_better.get(task, {}).get(metric, True)
                delta = nval - bval
                drop = -delta if hib else delta
                note = ""
                if tol.kind == "abs":
                    failed = drop > tol.value + 1e-12
                elif tol.kind == "rel":
                    failed = drop > tol.value * abs(bval) + 1e-12
                else:
                    ns, bs = _per_sample(n, task, metric), _per_sample(b, task, metric)
                    if ns is None or bs is None:
                        failed = drop > 1e-12
                        note = "no per-sample scores: compared exactly"
                    else:
                        paired = set(ns) == set(bs)
                        keys = sorted(ns, key=str)
                        lo, hi = bootstrap_ci([ns[k] for k in keys], [bs[k] for k in (keys if paired else sorted(bs, key=str))],
                                              paired=paired, level=tol.value, iters=iters, seed=seed)
                        failed = hi < 0 if hib else lo > 0
                        note = f"{'paired' if paired else 'unpaired'} CI of the change [{lo:+.4g}, {hi:+.4g}]"
                status = "REGRESSED" if failed else ("improved" if drop < 0 else "ok")
                out.append(Comparison(b.config_id, task, metric, bval, nval, delta, tol.describe(), status, note))
    return out, notes


def format_table(rows: Sequence[Comparison]) -> str:
    cols = ("status", "config", "task", "metric", "baseline", "new", "delta", "tolerance", "note")

    def cell(r: Comparison, c: str) -> str:
        v = getattr(r, c)
        return "" if v is None else (f"{v:+.4g}" if c == "delta" else (f"{v:.4g}" if isinstance(v, float) else str(v)))

    table = [[c for c in cols]] + [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("regress", help="compare results with a baseline; non-zero exit when a metric dropped beyond the tolerance",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("new", help="results JSON or folder to check")
    p.add_argument("baseline", nargs="?", help="baseline results JSON or folder (or --baseline)")
    p.add_argument("--baseline", dest="baseline_opt", metavar="FILE",
                   help="the baseline, named so that the order cannot be mistaken (diff-like tools put the old one first)")
    p.add_argument("--tol", action="append", default=[], metavar="[METRIC=]TOL", help="tolerance: 0.02, 5%%, ci, ci:0.9 (repeatable)")
    p.add_argument("--all", action="store_true", help="print every comparison, not only what moved")
    p.add_argument("--bootstrap-iters", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--json", metavar="FILE", help="also write the comparisons as JSON")
    p.set_defaults(func=main)


def main(ns: argparse.Namespace) -> int:
    baseline_opt = getattr(ns, "baseline_opt", None)
    if (ns.baseline is None) == (baseline_opt is None):
        print("lmms-quant regress: give the baseline once: as the second argument or as --baseline FILE "
              f"(got {'both' if ns.baseline else 'neither'})", file=sys.stderr)
        return 2
    ns.baseline = ns.baseline or baseline_opt
    try:
        tols = [parse_tolerance(t) for t in ns.tol]
    except ValueError as exc:
        print(f"lmms-quant regress: {exc}", file=sys.stderr)
        return 2
    runs: dict[str, list[Run]] = {}
    for role, path in (("NEW", ns.new), ("BASELINE", ns.baseline)):
        try:
            runs[role] = load_runs(path)
        except ResultsFormatError as exc:
            print(f"lmms-quant regress: refusing {role} {path}: {exc}", file=sys.stderr)
            return 2
    rows, notes = compare(runs["NEW"], runs["BASELINE"], tols, iters=ns.bootstrap_iters, seed=ns.seed)
    shown = rows if ns.all else [r for r in rows if r.moved]
    if shown:
        print(format_table(shown))
    for n in notes:
        print(f"note: {n}")
    failed = [r for r in rows if r.failed]
    improved = sum(r.status == "improved" for r in rows)
    print(f"{len(rows)} metric(s) compared: {sum(r.status == 'REGRESSED' for r in rows)} regressed, "
          f"{sum(r.status == 'MISSING' for r in rows)} missing, {improved} improved, "
          f"{sum(r.status == 'ok' for r in rows)} within tolerance ({', '.join(t.describe() + (f' for {t.scope}' if t.scope else '') for t in tols) or 'no drop allowed'})")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"comparisons": [asdict(r) for r in rows], "notes": notes,
                                             "passed": not failed}, indent=2) + "\n")
    print("REGRESSION" if failed else "PASS")
    return 1 if failed else 0
