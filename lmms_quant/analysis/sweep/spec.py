"""The sweep file: its typed entries, its validation, and its expansion into configurations."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from lmms_quant.errors import ConfigurationError
from lmms_quant.recipe import COMPONENTS, RECIPE_ARG_KEYS, VALID_BITS, RecipeError, recipe_from_args

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
_CALIB = {f: f"calib_{f}" for f in ("source", "samples", "seed", "max_seq_len", "split", "image_column", "text_column", "mode",
                                     "question_column", "revision")}


class SweepSpecError(ConfigurationError):
    """The sweep file is invalid; the message names the key and the valid choices."""


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
