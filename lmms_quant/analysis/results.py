"""Reading lmms-eval results folders into :class:`Run` rows.

A results folder is anything lmms-eval (or ``lmms-quant sweep``) wrote: one or
more ``<date>_results.json`` files, each beside its per-sample logs
``<date>_samples_<task>.jsonl``.  Files of the wrong shape are refused with a
:class:`ResultsFormatError` that names the file and the problem: a missing or
non-numeric metric is never read as zero.

Metric names: lmms-eval keys metrics ``"<metric>,<filter>"``; a run's
``scores[task]`` uses the bare metric name when the filter is ``none`` and the
full key otherwise.  Standard errors (``<metric>_stderr,<filter>``) go to
``stderr``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmms_quant.errors import DataError
from lmms_quant.provenance import METADATA_KEY
from lmms_quant.recipe import COMPONENTS

__all__ = ["ResultsFormatError", "Run", "find_results", "load_run", "load_runs", "read_samples", "recipe_key", "metric_name"]

RESULTS_SUFFIX = "_results.json"


class ResultsFormatError(DataError):
    """A results file (or folder) does not have the shape lmms-eval writes."""


def metric_name(key: str) -> tuple[str, str]:
    """Split an lmms-eval metric key: ``("vqa_accuracy", "value")`` for ``"vqa_accuracy,none"``,
    ``("vqa_accuracy", "stderr")`` for ``"vqa_accuracy_stderr,none"``, and kind ``"other"`` for
    the other standard-error variants (``_stderr_clt``, ``_stderr_clustered``)."""
    metric, _, filt = key.partition(",")
    kind = "value"
    if metric.endswith("_stderr"):
        metric, kind = metric[: -len("_stderr")], "stderr"
    elif "_stderr_" in metric:
        kind = "other"
    return (metric if filt in ("", "none") else f"{metric},{filt}"), kind


@dataclass
class Run:
    """One results file: a model under one recipe on one or more tasks."""

    path: Path
    config_id: str
    date: str
    model: str
    scores: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float]] = field(default_factory=dict)
    higher_is_better: dict[str, dict[str, bool]] = field(default_factory=dict)
    n_samples: dict[str, int] = field(default_factory=dict)
    limit: float | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] | None = None

    # ------------------------------------------------------------ quantization
    @property
    def quantization(self) -> dict[str, Any]:
        return (self.metadata or {}).get("quantization") or {}

    @property
    def recipe(self) -> dict[str, Any] | None:
        return self.quantization.get("recipe")

    @property
    def bits(self) -> dict[str, int | None]:
        """Bit width per component (16 = untouched); None without our metadata."""
        r = self.recipe or {}
        return {c: (r.get(c) or {}).get("bits") if r else None for c in COMPONENTS}

    @property
    def methods(self) -> dict[str, str | None]:
        """Method per quantized component (None where the component stays at 16 bits)."""
        r = self.recipe or {}
        return {c: ((r.get(c) or {}).get("method") if (r.get(c) or {}).get("bits", 16) != 16 else None) for c in COMPONENTS}

    @property
    def method(self) -> str:
        """The configuration's method label: the sweep's label, else the methods used, else ``fp`` (nothing quantized)."""
        label = ((self.metadata or {}).get("sweep") or {}).get("method")
        if label:
            return str(label)
        if self.recipe is None:
            return "unknown"
        used = sorted({m for m in self.methods.values() if m})
        return "+".join(used) if used else "fp"

    @property
    def is_fp(self) -> bool:
        """True for a full-precision reference: our metadata says nothing was quantized."""
        r = self.recipe
        if r is None:
            return False
        return all(b == 16 for b in self.bits.values()) and not any(o.get("bits", 16) != 16 for o in r.get("overrides") or [])

    @property
    def bpw(self) -> dict[str, dict[str, float]]:
        return self.quantization.get("bpw") or {}

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The calibration that was used (None for data-free methods)."""
        q = self.quantization
        if q.get("calibration"):
            return q["calibration"]
        if self.recipe and any(m in ("gptq", "awq") for m in self.methods.values() if m):
            return self.recipe.get("calibration")
        return None

    @property
    def weights_sha256(self) -> str | None:
        return self.quantization.get("weights_sha256")

    @property
    def versions(self) -> dict[str, Any]:
        return (self.metadata or {}).get("versions") or {}

    @property
    def model_key(self) -> tuple[str, str]:
        """Which model: (name or path, revision)."""
        return (str(self.model_info.get("path") or self.model), str(self.model_info.get("revision") or ""))

    def samples_path(self, task: str) -> Path | None:
        p = self.path.parent / f"{self.date}_samples_{task}.jsonl"
        return p if p.is_file() else None


def find_results(path: str | Path) -> list[Path]:
    """Results JSON files at ``path`` (a file, or every ``*_results.json`` below a folder,
    skipping hidden folders such as a sweep's staging areas)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ResultsFormatError(f"{p}: no such file or folder")
    files = sorted(f for f in p.rglob(f"*{RESULTS_SUFFIX}")
                   if not any(part.startswith(".") for part in f.relative_to(p).parts[:-1]))
    if not files:
        raise ResultsFormatError(f"{p}: no lmms-eval results files (*{RESULTS_SUFFIX}) in this folder")
    return files


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ResultsFormatError(f"{where} is {value!r} ({type(value).__name__}), not a number")
    if math.isnan(value):
        raise ResultsFormatError(f"{where} is NaN")
    return float(value)


def _check_metadata(meta: Any, where: str) -> dict[str, Any]:
    if not isinstance(meta, Mapping):
        raise ResultsFormatError(f"{where}: '{METADATA_KEY}' must be an object, got {type(meta).__name__}")
    q = meta.get("quantization")
    if not isinstance(q, Mapping):
        raise ResultsFormatError(f"{where}: '{METADATA_KEY}.quantization' is missing or not an object")
    recipe = q.get("recipe")
    if not isinstance(recipe, Mapping) or not all(isinstance(recipe.get(c), Mapping) for c in COMPONENTS):
        raise ResultsFormatError(f"{where}: '{METADATA_KEY}.quantization.recipe' must be an object with {', '.join(COMPONENTS)}")
    for c in COMPONENTS:
        bits = recipe[c].get("bits")
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise ResultsFormatError(f"{where}: '{METADATA_KEY}.quantization.recipe.{c}.bits' is {bits!r}, not an integer")
    bpw = q.get("bpw")
    if not isinstance(bpw, Mapping) or not isinstance(bpw.get("model"), Mapping):
        raise ResultsFormatError(f"{where}: '{METADATA_KEY}.quantization.bpw.model' is missing")
    for comp, vals in bpw.items():
        for k in ("study", "storage"):
            _number((vals or {}).get(k), f"{where}: '{METADATA_KEY}.quantization.bpw.{comp}.{k}'")
    return dict(meta)


def load_run(path: str | Path, root: str | Path | None = None) -> Run:
    """Read one results JSON; ``root`` (the folder it was found under) names its configuration."""
    path = Path(path)
    where = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsFormatError(f"{where}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ResultsFormatError(f"{where}: not valid JSON ({exc}); a half-written file?") from None
    if not isinstance(data, Mapping):
        raise ResultsFormatError(f"{where}: the top level must be a JSON object, got {type(data).__name__}")
    if "schema_version" in data and "results" not in data:
        raise ResultsFormatError(f"{where}: this is a leaderboard record, not an lmms-eval results file")
    results = data.get("results")
    if not isinstance(results, Mapping) or not results:
        raise ResultsFormatError(f"{where}: missing or empty 'results' object; is this an lmms-eval results file?")
    scores: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        if not isinstance(metrics, Mapping):
            raise ResultsFormatError(f"{where}: results[{task!r}] must be an object of metrics, got {type(metrics).__name__}")
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            name, kind = metric_name(key)
            if kind != "value":
                if kind == "stderr" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    stderr.setdefault(task, {})[name] = float(value)
                continue
            scores.setdefault(task, {})[name] = _number(value, f"{where}: results[{task!r}][{key!r}]")
    if not scores:
        raise ResultsFormatError(f"{where}: 'results' holds no metric (keys of the form 'metric,filter')")
    hib_raw = data.get("higher_is_better") or {}
    hib = {t: {metric_name(f"{m},none")[0]: bool(v) for m, v in (hib_raw.get(t) or {}).items()} for t in scores}
    n_samples = {}
    for t, v in (data.get("n-samples") or {}).items():
        if isinstance(v, Mapping) and isinstance(v.get("effective"), int):
            n_samples[t] = v["effective"]
    cfg = data.get("config") or {}
    meta = _check_metadata(data[METADATA_KEY], where) if METADATA_KEY in data else None
    model_info = dict((meta or {}).get("model") or {})
    model = str(model_info.get("name") or _pretrained(cfg.get("model_args")) or data.get("model_name") or cfg.get("model") or "unknown")
    date = path.name[: -len(RESULTS_SUFFIX)] if path.name.endswith(RESULTS_SUFFIX) else str(data.get("date", ""))
    if root is not None and Path(root).is_dir():
        rel = path.parent.relative_to(Path(root))
        config_id = rel.as_posix() if rel.parts else path.parent.name
    else:
        config_id = path.parent.name
    limit = cfg.get("limit")
    return Run(path=path, config_id=config_id, date=date, model=model, scores=scores, stderr=stderr, higher_is_better=hib,
               n_samples=n_samples, limit=float(limit) if isinstance(limit, (int, float)) else None, model_info=model_info,
               metadata=meta)


def _pretrained(model_args: Any) -> str | None:
    if isinstance(model_args, Mapping):
        return model_args.get("pretrained")
    m = re.search(r"(?:^|,)pretrained=([^,]+)", str(model_args or ""))
    return m.group(1) if m else None


def load_runs(path: str | Path, *, latest_only: bool = True) -> list[Run]:
    """Every run under ``path``.  With ``latest_only``, a folder holding several results
    files (re-runs of the same command) contributes only its newest one."""
    root = Path(path)
    runs = [load_run(f, root if root.is_dir() else None) for f in find_results(root)]
    if latest_only:
        newest: dict[Path, Run] = {}
        for r in runs:
            if r.path.parent not in newest or r.date > newest[r.path.parent].date:
                newest[r.path.parent] = r
        runs = sorted(newest.values(), key=lambda r: r.config_id)
    return runs


def read_samples(run: Run, task: str) -> list[dict[str, Any]] | None:
    """The per-sample log of ``task`` (``--log_samples``), or None when there is none."""
    p = run.samples_path(task)
    if p is None:
        return None
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ResultsFormatError(f"{p}:{i}: not valid JSON ({exc})") from None
        if not isinstance(row, Mapping) or "doc_id" not in row:
            raise ResultsFormatError(f"{p}:{i}: a sample must be an object with a 'doc_id'")
        rows.append(dict(row))
    return rows


def recipe_key(recipe: Mapping[str, Any] | None) -> str:
    """A canonical string for a recipe's content (``explicit`` flags, which only record how it was written, left out)."""
    if recipe is None:
        return "none"

    def strip(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {k: strip(v) for k, v in sorted(obj.items()) if k != "explicit"}
        if isinstance(obj, (list, tuple)):
            return [strip(v) for v in obj]
        return obj

    return json.dumps(strip(recipe), sort_keys=True)


def group_by(runs: Iterable[Run], key) -> dict[Any, list[Run]]:
    out: dict[Any, list[Run]] = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return out
