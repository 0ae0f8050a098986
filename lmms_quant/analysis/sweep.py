"""``lmms-quant sweep FILE.yaml``: run a grid of per-component recipes through lmms-eval.

A sweep file names models, methods, per-component bit grids, fixed recipe
options, tasks, ``limit`` and calibration (see :class:`SweepSpec` and
``examples/sweep_toy.yaml``).  The grid is expanded into configurations
(:func:`expand`), and each runs through lmms-eval's Python API
(``lmms_eval.evaluator.simple_evaluate`` with a model *instance*): the
full-precision model is loaded once per model and worker, its weights are
restored from a CPU snapshot before every configuration (and checked against
the snapshot's fingerprint), then quantized with :func:`lmms_quant.quantize_`.

Layout of the output folder::

    sweep.json                          the manifest: spec, and every configuration with its digest
    progress.json                       done / failed / remaining / ETA, rewritten after each configuration
    <config-id>/config.json             what the configuration is (model_args, recipe, digest)
    <config-id>/<date>_results.json     lmms-eval's results JSON, with the ``lmms_quant`` key
    <config-id>/<date>_samples_<task>.jsonl
    <config-id>/FAILED.json             the error of a failed configuration (until it succeeds)

Resuming: the state lives in the folder, not in memory.  A configuration is
done when its results JSON exists; that file is written last, by
``os.replace`` from a hidden staging folder, so a ``kill -9`` at any moment
leaves either a complete result or none.  A rerun skips done configurations,
retries failed ones only with ``--retry-failed``, and refuses to mix results
of changed settings (the digest).  Each configuration is claimed with an
exclusive ``flock`` on ``<config-id>/.lock`` (released by the kernel when a
process dies), so concurrent workers (SLURM jobs, one process per GPU) never
run the same configuration twice.

Executors: ``local`` (this process), ``slurm`` (submitit), ``submitit-local``
and ``debug`` (submitit's LocalExecutor and DebugExecutor, for testing).
Data-parallel evaluation of each configuration on several GPUs:
``accelerate launch --num_processes N -m lmms_quant.cli sweep FILE.yaml`` or
``torchrun --nproc_per_node N -m lmms_quant.cli sweep FILE.yaml`` (every rank
loads the model; lmms-eval shards the documents; rank 0 decides which
configurations run and writes the files).  Several workers on one output
folder (one per GPU) share the configurations out through the locks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from lmms_quant.errors import ConfigurationError
from lmms_quant.provenance import METADATA_KEY
from lmms_quant.recipe import COMPONENTS, RECIPE_ARG_KEYS, VALID_BITS, RecipeError, recipe_from_args

__all__ = ["SweepSpecError", "SweepSpec", "SweepConfig", "ModelEntry", "MethodEntry", "parse_spec", "load_spec", "expand", "sweep_status",
           "run_sweep", "run_configs", "atomic_write_text"]

log = logging.getLogger(__name__)

MANIFEST = "sweep.json"
PROGRESS = "progress.json"
CONFIG_FILE = "config.json"
FAILED_FILE = "FAILED.json"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"
MANIFEST_VERSION = 1

#: Backend keys a model entry may set (forwarded as quant_vlm ``--model_args``).
MODEL_KEYS = ("pretrained", "name", "revision", "device", "dtype", "device_map", "trust_remote_code", "attn_implementation",
              "max_new_tokens", "verify", "cache", "cache_dir", "serve")
SPEC_KEYS = ("name", "output", "models", "methods", "bits", "design", "recipe", "calibration", "tasks", "limit", "batch_size",
             "log_samples", "include_fp", "seed", "bootstrap_iters", "gen_kwargs", "slurm")
DESIGNS = ("factorial", "one_at_a_time")
EXECUTORS = ("local", "slurm", "submitit-local", "debug")
#: How components are spelled in configuration ids (``toy__rtn__vit4_conn16_llm2``).
ID_NAMES = {"vit": "vit", "connector": "conn", "llm": "llm"}
_CALIB = {f: f"calib_{f}" for f in ("source", "samples", "seed", "max_seq_len", "split", "image_column", "text_column",
                                     "question_column", "revision")}


class SweepSpecError(ConfigurationError):
    """The sweep file is invalid; the message names the key and the valid choices."""


# ---------------------------------------------------------------------------
# The sweep file
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelEntry:
    """A model of the sweep: ``pretrained`` (None = the bundled default) and quant_vlm backend keys."""

    name: str
    pretrained: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodEntry:
    """A method of the sweep and the recipe keys it brings (``label`` names it in ids and reports)."""

    label: str
    method: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated sweep file."""

    name: str
    models: tuple[ModelEntry, ...]
    methods: tuple[MethodEntry, ...]
    bits: Mapping[str, tuple[int, ...]]
    tasks: tuple[str, ...]
    design: str = "factorial"
    recipe: Mapping[str, Any] = field(default_factory=dict)
    calibration: Mapping[str, Any] = field(default_factory=dict)
    limit: int | float | None = None
    batch_size: int = 1
    log_samples: bool = True
    include_fp: bool = True
    seed: int = 0
    bootstrap_iters: int = 100000
    gen_kwargs: str | None = None
    slurm: Mapping[str, Any] = field(default_factory=dict)
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))


@dataclass(frozen=True)
class SweepConfig:
    """One configuration: a model, a method and a bit width per component."""

    id: str
    model: ModelEntry
    method: MethodEntry | None  # None: the full-precision reference
    bits: Mapping[str, int]
    recipe_args: Mapping[str, Any]

    @property
    def method_label(self) -> str:
        return self.method.label if self.method else "fp16"

    def model_args(self, spec: SweepSpec) -> str:
        """The equivalent ``lmms-eval --model quant_vlm --model_args`` string."""
        items: dict[str, Any] = {}
        if self.model.pretrained:
            items["pretrained"] = self.model.pretrained
        items.update(self.model.args)
        items.update(self.recipe_args)
        return ",".join(f"{k}={_arg_str(v)}" for k, v in items.items())

    def digest(self, spec: SweepSpec) -> str:
        """Hash of everything that determines this configuration's result."""
        payload = {"model": {"pretrained": self.model.pretrained, **dict(self.model.args)},
                   "recipe": recipe_from_args(self.recipe_args).to_dict(), "tasks": list(spec.tasks), "limit": spec.limit,
                   "batch_size": spec.batch_size, "gen_kwargs": spec.gen_kwargs, "bootstrap_iters": spec.bootstrap_iters}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def describe(self, spec: SweepSpec) -> dict[str, Any]:
        return {"id": self.id, "model": self.model.name, "pretrained": self.model.pretrained, "method": self.method_label,
                "bits": dict(self.bits), "model_args": self.model_args(spec), "digest": self.digest(spec)}


def _arg_str(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "+".join(str(x) for x in v)
    return str(v)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _check_keys(data: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise SweepSpecError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(valid)}")


def _parse_model(entry: Any, i: int) -> ModelEntry:
    if entry is None or isinstance(entry, str):
        pretrained = entry
        args: dict[str, Any] = {}
    elif isinstance(entry, Mapping):
        _check_keys(entry, MODEL_KEYS, f"models[{i}]")
        args = {k: v for k, v in entry.items() if k not in ("pretrained", "name")}
        pretrained = entry.get("pretrained")
    else:
        raise SweepSpecError(f"models[{i}]: expected a name/path or a mapping of {', '.join(MODEL_KEYS)}, got {entry!r}")
    name = (entry.get("name") if isinstance(entry, Mapping) else None) or (Path(pretrained).name if pretrained else "default")
    return ModelEntry(name=_safe(str(name)), pretrained=str(pretrained) if pretrained else None, args=args)


def _parse_method(entry: Any, i: int) -> MethodEntry:
    from lmms_quant.recipe import METHODS

    if isinstance(entry, str):
        entry = {"method": entry}
    if not isinstance(entry, Mapping) or "method" not in entry:
        raise SweepSpecError(f"methods[{i}]: expected a method name ({', '.join(METHODS)}) or a mapping with 'method'")
    method = str(entry["method"]).lower()
    if method not in METHODS:
        raise SweepSpecError(f"methods[{i}]: unknown method {method!r}; valid: {', '.join(METHODS)}")
    options = {k: v for k, v in entry.items() if k not in ("method", "label")}
    bad = sorted(k for k in options if k not in RECIPE_ARG_KEYS or k.startswith("bits"))
    if bad:
        raise SweepSpecError(f"methods[{i}]: unknown or grid-owned key(s) {bad}; valid: recipe keys except bits*: "
                             f"{', '.join(k for k in RECIPE_ARG_KEYS if not k.startswith('bits'))}")
    return MethodEntry(label=_safe(str(entry.get("label") or method)), method=method, options=options)


def parse_spec(data: Mapping[str, Any], where: str = "sweep", base_dir: Path | None = None) -> SweepSpec:
    """Validate a sweep mapping (the YAML file's content)."""
    if not isinstance(data, Mapping):
        raise SweepSpecError(f"{where}: a sweep file must hold a mapping, got {type(data).__name__}")
    _check_keys(data, SPEC_KEYS, where)
    for key in ("models", "tasks", "bits"):
        if not data.get(key) and not (key == "models" and "models" in data):
            raise SweepSpecError(f"{where}: '{key}' is required")
    models_raw = data["models"] if isinstance(data["models"], list) else [data["models"]]
    models = tuple(_parse_model(m, i) for i, m in enumerate(models_raw))
    if len({m.name for m in models}) != len(models):
        raise SweepSpecError(f"{where}: models have duplicate names {[m.name for m in models]}; give each a 'name'")
    methods_raw = data.get("methods") or ["rtn"]
    methods = tuple(_parse_method(m, i) for i, m in enumerate(methods_raw if isinstance(methods_raw, list) else [methods_raw]))
    if len({m.label for m in methods}) != len(methods):
        raise SweepSpecError(f"{where}: methods have duplicate labels {[m.label for m in methods]}; give each a 'label'")
    bits_raw = data["bits"]
    if not isinstance(bits_raw, Mapping):
        raise SweepSpecError(f"{where}: 'bits' must map components ({', '.join(COMPONENTS)}) to lists of bit widths")
    _check_keys(bits_raw, COMPONENTS, f"{where}: bits")
    bits: dict[str, tuple[int, ...]] = {}
    for comp in COMPONENTS:
        values = bits_raw.get(comp, [16])
        values = values if isinstance(values, list) else [values]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v not in VALID_BITS:
                raise SweepSpecError(f"{where}: bits.{comp}: {v!r} is not a valid bit width; valid: {', '.join(map(str, VALID_BITS))}")
        bits[comp] = tuple(dict.fromkeys(values))
    design = str(data.get("design", "factorial"))
    if design not in DESIGNS:
        raise SweepSpecError(f"{where}: design {design!r} is unknown; valid: {', '.join(DESIGNS)}")
    recipe = dict(data.get("recipe") or {})
    bad = sorted(k for k in recipe if k not in RECIPE_ARG_KEYS or k.startswith("bits"))
    if bad:
        raise SweepSpecError(f"{where}: recipe: unknown or grid-owned key(s) {bad}; valid: recipe keys except bits*: "
                             f"{', '.join(k for k in RECIPE_ARG_KEYS if not k.startswith('bits'))}")
    if recipe.get("recipe") and base_dir is not None and not Path(recipe["recipe"]).is_absolute():
        recipe["recipe"] = str((base_dir / recipe["recipe"]).resolve())
    calibration = dict(data.get("calibration") or {})
    _check_keys(calibration, tuple(_CALIB), f"{where}: calibration")
    tasks_raw = data["tasks"]
    tasks = tuple(str(t) for t in (tasks_raw if isinstance(tasks_raw, list) else str(tasks_raw).split(",")))
    limit = data.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise SweepSpecError(f"{where}: limit must be a positive number (documents per task, or a fraction < 1), got {limit!r}")
    batch_size = data.get("batch_size", 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SweepSpecError(f"{where}: batch_size must be a positive integer, got {batch_size!r}")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, Mapping):
        raise SweepSpecError(f"{where}: slurm must be a mapping of submitit parameters (e.g. slurm_partition, timeout_min)")
    spec = SweepSpec(
        name=_safe(str(data.get("name") or "sweep")), models=models, methods=methods, bits=bits, tasks=tasks, design=design,
        recipe=recipe, calibration=calibration, limit=limit, batch_size=batch_size, log_samples=bool(data.get("log_samples", True)),
        include_fp=bool(data.get("include_fp", True)), seed=int(data.get("seed", 0)),
        bootstrap_iters=int(data.get("bootstrap_iters", 100000)), gen_kwargs=data.get("gen_kwargs"), slurm=dict(slurm),
        output=data.get("output"),
    )
    expand(spec)  # every recipe is checked here, before anything loads
    return spec


def load_spec(path: str | Path) -> SweepSpec:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SweepSpecError(f"sweep file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SweepSpecError(f"sweep file {str(p)!r} is not valid YAML: {exc}") from None
    return parse_spec(data, where=str(p), base_dir=p.resolve().parent)


def _bit_points(spec: SweepSpec) -> list[dict[str, int]]:
    fp = {c: 16 for c in COMPONENTS}
    if spec.design == "factorial":
        points = [dict(zip(COMPONENTS, combo)) for combo in product(*(spec.bits[c] for c in COMPONENTS))]
        return sorted(points, key=lambda p: p != fp)  # the reference first, so reports can use it while the sweep runs
    points = [fp]
    for comp in COMPONENTS:
        points += [{**fp, comp: b} for b in spec.bits[comp] if b != 16]
    return points


def expand(spec: SweepSpec) -> list[SweepConfig]:
    """Every configuration of the sweep, in run order (grouped by model).  The full-precision
    point (all components at 16) appears once per model, whatever the methods."""
    configs: list[SweepConfig] = []
    calib = {_CALIB[k]: v for k, v in spec.calibration.items()}
    for model in spec.models:
        seen_fp = False
        points = _bit_points(spec)
        if spec.include_fp and {c: 16 for c in COMPONENTS} not in points:
            points.insert(0, {c: 16 for c in COMPONENTS})
        for method in spec.methods:
            for bits in points:
                fp = all(b == 16 for b in bits.values())
                if fp and seen_fp:
                    continue
                args: dict[str, Any] = {"method": method.method} if not fp else {}
                args.update(spec.recipe)
                if not fp:
                    args.update(method.options)
                args.update({f"bits_{c}": b for c, b in bits.items()})
                args["seed"] = spec.seed
                try:
                    if recipe_from_args(args).needs_calibration:  # calibration keys only where they matter
                        args = {**args, **{k: v for k, v in calib.items() if k not in args}}
                        recipe_from_args(args)
                except RecipeError as exc:
                    raise SweepSpecError(f"model {model.name}, method {method.label}, bits {bits}: {exc}") from None
                bits_id = "_".join(f"{ID_NAMES[c]}{b}" for c, b in bits.items())
                cid = f"{model.name}__fp16" if fp else f"{model.name}__{method.label}__{bits_id}"
                configs.append(SweepConfig(id=cid, model=model, method=None if fp else method, bits=bits, recipe_args=args))
                seen_fp = seen_fp or fp
    return configs


# ---------------------------------------------------------------------------
# State on disk
# ---------------------------------------------------------------------------

def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one (tmp + fsync + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _results_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*_results.json")) if folder.is_dir() else []


@dataclass
class ConfigState:
    config: SweepConfig
    status: str  # done | failed | pending | conflict
    detail: str = ""


def sweep_status(spec: SweepSpec, out: Path) -> list[ConfigState]:
    """The state of every configuration, read from the output folder."""
    states = []
    for cfg in expand(spec):
        folder = out / cfg.id
        digest = cfg.digest(spec)
        recorded = None
        if (folder / CONFIG_FILE).is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                recorded = json.loads((folder / CONFIG_FILE).read_text()).get("digest")
        if _results_files(folder):
            if recorded is not None and recorded != digest:
                states.append(ConfigState(cfg, "conflict", f"its result was made with other settings (digest {recorded}, now {digest})"))
            else:
                states.append(ConfigState(cfg, "done"))
        elif (folder / FAILED_FILE).is_file():
            try:
                err = json.loads((folder / FAILED_FILE).read_text())
                detail = f"{err.get('error_type')}: {err.get('message')}"
            except (OSError, json.JSONDecodeError):
                detail = "failed (unreadable FAILED.json)"
            states.append(ConfigState(cfg, "failed", detail))
        else:
            states.append(ConfigState(cfg, "pending"))
    return states


def _write_manifest(spec: SweepSpec, out: Path) -> None:
    path = out / MANIFEST
    configs = [c.describe(spec) for c in expand(spec)]
    manifest = {"manifest_version": MANIFEST_VERSION, "name": spec.name, "spec": spec.to_dict(), "configs": configs}
    if path.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            old = json.loads(path.read_text())
            manifest["created"] = old.get("created")
            # configurations of an earlier spec stay listed: their results are still in the folder
            known = {c["id"] for c in configs}
            manifest["earlier_configs"] = [c for c in old.get("configs", []) + old.get("earlier_configs", []) if c["id"] not in known]
    manifest.setdefault("created", _dt.datetime.now().isoformat(timespec="seconds"))
    manifest["updated"] = _dt.datetime.now().isoformat(timespec="seconds")
    _write_json(path, manifest)


class Progress:
    """Counts for the sweep as a whole; writes ``progress.json`` and reports a line per configuration."""

    def __init__(self, spec: SweepSpec, out: Path, emit: Callable[[str], None]):
        self.spec, self.out, self.emit = spec, out, emit
        self.durations: list[float] = []
        self.started = time.time()

    def update(self, last: str | None = None, last_s: float | None = None, status: str = "") -> dict[str, Any]:
        if last_s is not None:
            self.durations.append(last_s)
        states = sweep_status(self.spec, self.out)
        counts = {k: sum(s.status == k for s in states) for k in ("done", "failed", "pending", "conflict")}
        remaining = counts["pending"]
        eta = (sum(self.durations) / len(self.durations)) * remaining if self.durations else None
        info = {"name": self.spec.name, "total": len(states), "done": counts["done"], "failed": counts["failed"],
                "remaining": remaining, "conflict": counts["conflict"], "eta_s": round(eta, 1) if eta is not None else None,
                "elapsed_s": round(time.time() - self.started, 1), "last": last, "last_status": status,
                "updated": _dt.datetime.now().isoformat(timespec="seconds")}
        _write_json(self.out / PROGRESS, info)
        line = (f"[sweep {self.spec.name}] {info['done']}/{info['total']} done, {info['failed']} failed, "
                f"{remaining} remaining" + (f", ETA {_fmt_s(eta)}" if eta is not None else ""))
        if last:
            line += f" | {last}: {status}" + (f" in {_fmt_s(last_s)}" if last_s is not None else "")
        self.emit(line)
        return info


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


@contextlib.contextmanager
def _claim(folder: Path) -> Iterator[bool]:
    """Exclusive, non-blocking lock on ``folder/.lock``; yields False when another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.uname().nodename} {os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)  # closing releases the lock (and so does the death of the process)


def _clean_partial(folder: Path) -> None:
    """Remove what an interrupted attempt left: staging folders, and samples without their results file."""
    for p in folder.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in folder.glob(".*.tmp"):
        p.unlink(missing_ok=True)
    dates = {f.name[: -len("_results.json")] for f in _results_files(folder)}
    for p in folder.glob("*_samples_*.jsonl"):
        if p.name.split("_samples_")[0] not in dates:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------

def _dist() -> tuple[int, int]:
    """(rank, world size) as set by ``accelerate launch`` or ``torchrun``."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _fingerprint(state: Mapping[str, Any]) -> str:
    """SHA-256 over every tensor of a state dict (names, then raw bytes)."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k]
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _LoadedModel:
    """A full-precision model loaded once, with a CPU snapshot to restore it before each configuration."""

    def __init__(self, entry: ModelEntry):
        import torch

        from lmms_quant.models import load_vlm

        args = dict(entry.args)
        rank, world = _dist()
        device = args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        if world > 1 and str(device) == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        t0 = time.perf_counter()
        self.loaded = load_vlm(entry.pretrained, revision=args.get("revision"), device=str(device), dtype=args.get("dtype", "auto"),
                               device_map=args.get("device_map"), trust_remote_code=bool(args.get("trust_remote_code", False)),
                               attn_implementation=args.get("attn_implementation"))
        self.load_s = time.perf_counter() - t0
        self.entry = entry
        self.snapshot = {k: v.detach().to("cpu", copy=True) for k, v in self.loaded.model.state_dict().items()}
        self.verify = bool(args.get("verify", True))  # verify=false also skips the restore check
        self.fingerprint = _fingerprint(self.snapshot) if self.verify else ""
        self.dirty = False

    def restore(self) -> float:
        """Put the full-precision weights back and check them; returns the seconds it took."""
        t0 = time.perf_counter()
        if self.dirty:
            self.loaded.model.load_state_dict(self.snapshot, strict=True)
            if self.verify and _fingerprint(self.loaded.model.state_dict()) != self.fingerprint:
                raise RuntimeError(f"{self.entry.name}: restoring the full-precision weights failed (fingerprint differs)")
        self.dirty = True
        return time.perf_counter() - t0


@contextlib.contextmanager
def _preloaded(model: _LoadedModel) -> Iterator[None]:
    """While active, quant_vlm's ``load_vlm`` hands out ``model`` (restored to full precision)
    instead of loading from disk, so ``QuantVLM(**model_args)`` runs exactly as under
    ``--model quant_vlm`` (recipe checks, calibration, cache, metadata) minus the load."""
    from lmms_quant.model_wrappers import quant_vlm

    original = quant_vlm.load_vlm

    def load_vlm(pretrained=None, **kwargs):
        if pretrained != model.entry.pretrained:
            raise RuntimeError(f"sweep: asked for {pretrained!r} while {model.entry.pretrained!r} is loaded")
        return model.loaded

    quant_vlm.load_vlm = load_vlm
    try:
        yield
    finally:
        quant_vlm.load_vlm = original


def backend_args(cfg: SweepConfig, spec: SweepSpec) -> dict[str, Any]:
    """The quant_vlm ``--model_args`` of a configuration, as keyword arguments."""
    args: dict[str, Any] = {"pretrained": cfg.model.pretrained} if cfg.model.pretrained else {}
    return {**args, **cfg.model.args, **cfg.recipe_args, "batch_size": spec.batch_size}


def _run_one(cfg: SweepConfig, spec: SweepSpec, model: _LoadedModel, out: Path, task_manager) -> None:
    """Restore, quantize (through quant_vlm itself), evaluate and write one configuration (atomically)."""
    from lmms_eval import evaluator
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker
    from lmms_eval.utils import get_datetime_str

    from lmms_quant.model_wrappers.quant_vlm import QuantVLM

    rank, _ = _dist()
    folder = out / cfg.id
    restore_s = model.restore()
    with _preloaded(model):
        lm = QuantVLM(**backend_args(cfg, spec))
    staging = folder / f"{STAGING_PREFIX}{os.getpid()}"
    tracker = EvaluationTracker(output_path=str(staging))
    datetime_str = get_datetime_str()
    t0 = time.perf_counter()
    results = evaluator.simple_evaluate(
        model=lm, model_args=cfg.model_args(spec), tasks=list(spec.tasks), batch_size=spec.batch_size,
        limit=float(spec.limit) if spec.limit is not None else None,
        log_samples=spec.log_samples, evaluation_tracker=tracker, task_manager=task_manager, gen_kwargs=spec.gen_kwargs,
        bootstrap_iters=spec.bootstrap_iters, datetime_str=datetime_str,
        # as lmms-eval's CLI decides: an initialised process group (ours, under a launcher) means torchrun collectives
        distributed_executor_backend="torchrun" if _dist()[1] > 1 and _dist_initialized() else "accelerate",
    )
    evaluate_s = time.perf_counter() - t0
    if rank != 0 or results is None:
        return
    meta = lm.metadata  # set when quant_vlm quantized (at construction, or at the first request)
    if meta is None:
        raise RuntimeError("quant_vlm recorded no quantization metadata for this configuration")
    meta["timings_s"].update({"load": round(model.load_s, 3), "restore": round(restore_s, 3), "evaluate": round(evaluate_s, 3)})
    meta["sweep"] = {"name": spec.name, "id": cfg.id, "method": cfg.method_label, "digest": cfg.digest(spec)}
    results[METADATA_KEY] = meta  # the plugin's hook writes the same object
    samples = results.pop("samples", None)
    results["config"]["model"] = "quant_vlm"  # what the equivalent CLI run records
    tracker.general_config_tracker.model_source = "quant_vlm"
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=datetime_str)
    if spec.log_samples and samples:
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    written = sorted(staging.rglob("*_results.json"))
    if len(written) != 1:  # lmms-eval logs and swallows its own write errors
        raise RuntimeError(f"lmms-eval did not write the results file under {staging}")
    for f in sorted(staging.rglob("*_samples_*.jsonl")):
        os.replace(f, folder / f.name)
    os.replace(written[0], folder / written[0].name)  # last: the result exists only once complete
    shutil.rmtree(staging, ignore_errors=True)
    (folder / FAILED_FILE).unlink(missing_ok=True)


def _record_failure(cfg: SweepConfig, out: Path, exc: BaseException) -> None:
    folder = out / cfg.id
    attempts = 1
    if (folder / FAILED_FILE).is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            attempts = int(json.loads((folder / FAILED_FILE).read_text()).get("attempts", 0)) + 1
    _write_json(folder / FAILED_FILE, {
        "id": cfg.id, "error_type": type(exc).__name__, "message": str(getattr(exc, "message", None) or exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), "attempts": attempts,
        "time": _dt.datetime.now().isoformat(timespec="seconds"), "host": os.uname().nodename, "pid": os.getpid(),
    })


def run_configs(spec: SweepSpec, out: str | Path, ids: Sequence[str], *, retry_failed: bool = False,
                emit: Callable[[str], None] | None = None) -> dict[str, str]:
    """Run the configurations ``ids`` of ``spec`` in this process (the body of every executor).

    Each model is loaded once; configurations done meanwhile (by another worker)
    or claimed by another live process are skipped.  Returns ``{id: status}``.
    Under ``accelerate launch`` (``WORLD_SIZE > 1``) every rank runs rank 0's
    list of still-pending configurations, and only rank 0 writes files.
    """
    from lmms_quant.model_wrappers import plugin

    out = Path(out)
    emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
    plugin.manifests()  # registers our task folder with lmms-eval's TaskManager
    rank, world = _dist()
    by_id = {c.id: c for c in expand(spec)}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise SweepSpecError(f"unknown configuration id(s) {unknown}")
    if world > 1:
        if rank == 0:
            ids = [i for i in ids if _runnable(out / i, retry_failed) is None]
        ids = _broadcast_ids(list(ids))
    progress = Progress(spec, out, emit) if rank == 0 else None
    task_manager = None
    outcome: dict[str, str] = {}
    loaded: _LoadedModel | None = None
    for cid in ids:
        cfg = by_id[cid]
        folder = out / cid
        with (_claim(folder) if world == 1 else contextlib.nullcontext(True)) as mine:
            skip = "busy" if not mine else (_runnable(folder, retry_failed) if world == 1 else None)
            if skip:
                outcome[cid] = skip
                continue
            if rank == 0:
                _clean_partial(folder)
                _write_json(folder / CONFIG_FILE, cfg.describe(spec))
            t0 = time.perf_counter()
            try:
                if loaded is None or loaded.entry != cfg.model:
                    loaded = None  # free the previous model before loading the next
                    loaded = _LoadedModel(cfg.model)
                task_manager = task_manager or _task_manager(spec.tasks)
                _run_one(cfg, spec, loaded, out, task_manager)
                outcome[cid] = "done"
            except KeyboardInterrupt:
                raise
            except (Exception, SystemExit) as exc:  # a failed configuration must not stop the sweep
                log.exception("sweep: configuration %s failed", cid)
                if rank == 0:
                    _record_failure(cfg, out, exc)
                outcome[cid] = "failed"
                loaded = None  # whatever state the failure left, the next configuration starts from a fresh load
            if progress is not None:
                progress.update(cid, time.perf_counter() - t0, outcome[cid])
    return outcome


def _task_manager(tasks: Sequence[str]):
    """lmms-eval's task index.  When every task is one of ours, the index of our task folder
    alone (seconds faster than indexing every lmms-eval task; ours all start with ``lq_``,
    so no built-in task can shadow them), else the full index, as the CLI builds it."""
    from lmms_eval.tasks import TaskManager

    fast = TaskManager("WARNING", include_defaults=False)
    if all(t in fast.all_tasks for t in tasks):
        return fast
    return TaskManager("WARNING")


def _runnable(folder: Path, retry_failed: bool) -> str | None:
    """None when the configuration in ``folder`` should run now, else why not (``done``/``failed``)."""
    if _results_files(folder):
        return "done"
    if (folder / FAILED_FILE).is_file() and not retry_failed:
        return "failed"
    return None


def _broadcast_ids(ids: list[str]) -> list[str]:
    """Under ``accelerate launch``: every rank runs rank 0's list, in the same order."""
    import torch.distributed as dist
    from accelerate import Accelerator

    Accelerator()  # initialises the process group
    box = [ids if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return list(box[0])


def _chunks(configs: list[SweepConfig], n: int) -> list[list[str]]:
    """``n`` nearly equal chunks, configurations of one model kept together where possible."""
    ordered = sorted(configs, key=lambda c: c.model.name)
    size = -(-len(ordered) // max(1, n))
    return [[c.id for c in ordered[i:i + size]] for i in range(0, len(ordered), size)]


def run_sweep(spec: SweepSpec, out: str | Path, *, retry_failed: bool = False, executor: str = "local", jobs: int = 1,
              executor_params: Mapping[str, Any] | None = None, wait: bool = True,
              emit: Callable[[str], None] | None = None) -> list[ConfigState]:
    """Run every configuration of ``spec`` that is not done yet; return the final states."""
    out = Path(out)
    emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    rank, _ = _dist()
    states = sweep_status(spec, out)
    conflicts = [s for s in states if s.status == "conflict"]
    if conflicts:
        raise SweepSpecError(
            f"{out}: {len(conflicts)} configuration(s) here were run with other settings, e.g. {conflicts[0].config.id}: "
            f"{conflicts[0].detail}; use another output folder, or delete those configuration folders")
    if rank == 0:
        _write_manifest(spec, out)
    todo = [s.config for s in states if s.status == "pending" or (s.status == "failed" and retry_failed)]
    skipped_failed = sum(s.status == "failed" for s in states) if not retry_failed else 0
    if rank == 0:
        emit(f"[sweep {spec.name}] {len(states)} configurations: {sum(s.status == 'done' for s in states)} done, "
             f"{len(todo)} to run" + (f", {skipped_failed} failed (rerun with --retry-failed)" if skipped_failed else "")
             + f"; output {out}")
    if not todo:
        return states
    if executor == "local":
        run_configs(spec, out, [c.id for c in todo], retry_failed=retry_failed, emit=emit)
    elif executor in ("slurm", "submitit-local", "debug"):
        _submit(spec, out, todo, retry_failed=retry_failed, executor=executor, jobs=jobs,
                params={**spec.slurm, **(executor_params or {})}, wait=wait, emit=emit)
    else:
        raise SweepSpecError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    return sweep_status(spec, out)


def _submit(spec: SweepSpec, out: Path, todo: list[SweepConfig], *, retry_failed: bool, executor: str, jobs: int,
            params: Mapping[str, Any], wait: bool, emit: Callable[[str], None]) -> None:
    try:
        import submitit
    except ImportError:
        raise SweepSpecError(f"executor {executor!r} needs submitit: pip install 'lmms-quant[analysis]'") from None
    cluster = {"slurm": "slurm", "submitit-local": "local", "debug": "debug"}[executor]
    ex = submitit.AutoExecutor(folder=str(out / ".submitit" / "%j"), cluster=cluster)
    params = dict(params)
    params.setdefault("name", f"lmms-quant-{spec.name}")
    if cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    ex.update_parameters(**params)
    chunks = _chunks(todo, jobs)
    with ex.batch():  # one job array on SLURM (one sbatch, one array task per chunk)
        submitted = [ex.submit(run_configs, spec, str(out), ids, retry_failed=retry_failed) for ids in chunks]
    emit(f"[sweep {spec.name}] submitted {len(submitted)} {executor} job(s): {', '.join(str(j.job_id) for j in submitted)}")
    if not wait:
        return
    for job in submitted:
        try:
            job.result()
        except Exception as exc:  # noqa: BLE001 - report every job, then the states
            emit(f"[sweep {spec.name}] job {job.job_id} failed: {type(exc).__name__}: {exc}")
    Progress(spec, out, emit).update()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of per-component recipes (resumable)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="the sweep YAML file")
    p.add_argument("--output", "-o", help="output folder (default: the file's 'output', else results/sweeps/<name>)")
    p.add_argument("--retry-failed", action="store_true", help="run failed configurations again")
    p.add_argument("--status", action="store_true", help="print every configuration's state and exit")
    p.add_argument("--dry-run", action="store_true", help="list the configurations and their --model_args, run nothing")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: this process; slurm: submitit jobs; submitit-local/debug: submitit's local executors")
    p.add_argument("--jobs", type=int, default=1, help="number of submitit jobs to split the remaining configurations into")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a submitit parameter, e.g. slurm_partition=gpu, timeout_min=240, gpus_per_node=1 (repeatable)")
    p.add_argument("--no-wait", action="store_true", help="with submitit: return after submitting")
    p.set_defaults(func=main)


def _param_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def main(ns: argparse.Namespace) -> int:
    try:
        spec = load_spec(ns.file)
    except SweepSpecError as exc:
        print(f"lmms-quant sweep: {exc}", file=sys.stderr)
        return 2
    out = Path(ns.output or spec.output or Path("results") / "sweeps" / spec.name)
    if ns.dry_run:
        for cfg in expand(spec):
            print(f"{cfg.id}\t--model_args {cfg.model_args(spec)}")
        print(f"{len(expand(spec))} configurations; tasks {','.join(spec.tasks)}; limit {spec.limit}; output {out}")
        return 0
    if ns.status:
        for s in sweep_status(spec, out):
            print(f"{s.status:9s} {s.config.id}" + (f"  ({s.detail})" if s.detail else ""))
        return 0
    params = {}
    for item in ns.param:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"lmms-quant sweep: --param {item!r} must be KEY=VALUE", file=sys.stderr)
            return 2
        params[key] = _param_value(value)
    try:
        states = run_sweep(spec, out, retry_failed=ns.retry_failed, executor=ns.executor, jobs=ns.jobs,
                           executor_params=params, wait=not ns.no_wait)
    except SweepSpecError as exc:
        print(f"lmms-quant sweep: {exc}", file=sys.stderr)
        return 2
    if _dist()[0] != 0 or ns.no_wait:
        return 0
    failed = [s for s in states if s.status == "failed"]
    for s in failed:
        print(f"failed: {s.config.id}: {s.detail}", file=sys.stderr)
    pending = [s for s in states if s.status == "pending"]
    if pending:
        print(f"{len(pending)} configuration(s) still pending (claimed by another worker, or interrupted)", file=sys.stderr)
    return 1 if failed or pending else 0
