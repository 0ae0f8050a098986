"""Quantization recipes: typed, validated configuration.

A :class:`Recipe` says, for each VLM component (``vit``, ``connector``,
``llm``), which method and bit width its weights get, plus finer rules
(per-layer regex overrides, block ranges, attention- or MLP-only, skips).
It is built from lmms-eval ``--model_args`` (:func:`recipe_from_args`) or a
YAML file (:func:`load_recipe`), validated at construction, and round-trips
through :meth:`Recipe.to_dict` so that it is stored beside every result.

Precedence, lowest to highest: method defaults < global keys (``bits``,
``method``, ``group_size``, ``sym``) < per-component keys (``bits_llm``...) <
layer overrides in file order (the last matching override wins) < ``skip``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigurationError

__all__ = [
    "COMPONENTS",
    "METHODS",
    "VALID_BITS",
    "RecipeError",
    "QuantSpec",
    "LayerRule",
    "ComponentRecipe",
    "CalibrationSpec",
    "CALIB_MODES",
    "DEFAULT_HUB_CALIBRATION",
    "AUTO_GROUP_SIZES",
    "Recipe",
    "recipe_from_args",
    "load_recipe",
]

COMPONENTS = ("vit", "connector", "llm")
#: 16 means "left untouched".
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
#: Method name -> defaults that the method implies unless the recipe says otherwise.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # The reference study's baseline: one (scale, zero) per tensor, asymmetric min-max, biases too.
    "uniform": {"group_size": 0, "sym": False, "quantize_bias": True},
    "rtn": {"group_size": -1, "sym": True, "quantize_bias": False},
    "gptq": {"group_size": -1, "sym": True, "quantize_bias": False},
    "awq": {"group_size": "auto", "sym": False, "quantize_bias": False},
}
#: ``group_size=auto`` (AWQ's default): per Linear, the first of these that divides its input width, else
#: per output channel (-1).  128 is the study's and the AWQ paper's setting; the toy ViT's width 192 gets 64.
AUTO_GROUP_SIZES = (128, 64, 32)
METHODS = tuple(METHOD_DEFAULTS)
#: GPTQ's damping default: a fraction of the Hessian's mean diagonal (the reference code's ``percdamp``).
DEFAULT_DAMP = 0.01
LAYER_SETS = ("all", "attn", "mlp")
CALIB_SOURCES = ("auto", "world", "task", "text")
#: ``calib_mode``: ``sequential`` (the study's and the GPTQ/AWQ papers': each block calibrated on the outputs of the
#: blocks before it, already quantized) or ``fp_inputs`` (GPTQ only: each layer's Hessian from the full-precision
#: model, computed once per component and calibration set and cached, so every bit width of a grid costs only the solve).
CALIB_MODES = ("sequential", "fp_inputs")
#: The calibration set ``calib_source=auto`` gives a model that is not a bundled toy: llm-compressor's VLM examples'
#: choice (image + caption; 31,783 Flickr30k images in one ``test`` split).
DEFAULT_HUB_CALIBRATION = {"source": "lmms-lab/flickr30k", "split": "test"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
BLOCK_THIRDS = ("front", "middle", "end")


class RecipeError(ConfigurationError):
    """A recipe is invalid.  The message names the problem and the valid choices."""


def _choices(values) -> str:
    return ", ".join(str(v) for v in values)


def _check_bits(bits: Any, where: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        try:
            bits = int(str(bits))
        except ValueError:
            raise RecipeError(f"{where}: bit width must be an integer, got {bits!r}; valid: {_choices(VALID_BITS)}") from None
    if bits not in VALID_BITS:
        raise RecipeError(f"{where}: bit width {bits} is out of range; valid: {_choices(VALID_BITS)} (16 = untouched)")
    return bits


def _check_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise RecipeError(f"{where}: expected true or false, got {value!r}")


def _check_number(value: Any, where: str, kind: type, expected: str) -> Any:
    """``kind(value)`` (``int`` or ``float``, strings accepted); booleans and anything else are refused."""
    if isinstance(value, bool):
        raise RecipeError(f"{where}: expected {expected}, got {value!r}")
    try:
        return kind(str(value))
    except ValueError:
        raise RecipeError(f"{where}: expected {expected}, got {value!r}") from None


def _check_int(value: Any, where: str) -> int:
    return _check_number(value, where, int, "an integer")


@dataclass(frozen=True)
class QuantSpec:
    """How one weight tensor is quantized.

    ``bits``: 2-8, or 16 for untouched.  ``group_size``: -1 one scale per output
    channel, 0 one per tensor, ``g > 0`` groups of ``g`` input columns.
    ``sym``: symmetric (zero point fixed at mid-range) or asymmetric min-max.
    ``quantize_bias``: also round the bias (per tensor, asymmetric), as the study's
    uniform baseline does.  GPTQ only: ``act_order`` (columns in order of
    decreasing Hessian diagonal), ``static_groups`` (group parameters from the
    original weight, before any update) and ``damp`` (the damping, a fraction of
    the Hessian's mean diagonal; raised tenfold with a warning while the
    Cholesky factorisation fails).
    """

    bits: int = 16
    method: str = "rtn"
    group_size: int | str = -1
    sym: bool = True
    quantize_bias: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = DEFAULT_DAMP

    def __post_init__(self) -> None:
        _check_bits(self.bits, "bits")
        if self.method not in METHODS:
            raise RecipeError(f"unknown method {self.method!r}; valid: {_choices(METHODS)}")
        if self.group_size != "auto" and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                                          or self.group_size < -1):
            raise RecipeError(f"group_size must be -1 (per channel), 0 (per tensor), a positive integer or 'auto' "
                              f"(the first of {', '.join(map(str, AUTO_GROUP_SIZES))} that divides each layer's width, else -1), "
                              f"got {self.group_size!r}")
        if self.method == "uniform" and (self.group_size != 0 or self.sym):
            raise RecipeError(
                "method 'uniform' is the study's per-tensor asymmetric min-max (group_size=0, sym=false); "
                "use method 'rtn' for per-channel or per-group rounding"
            )
        if self.method != "gptq" and (self.act_order or self.static_groups or self.damp != DEFAULT_DAMP):
            raise RecipeError(
                f"act_order, static_groups and damp are options of method 'gptq' only, but this spec's method is {self.method!r}; "
                "set them per component (act_order_llm=true) or drop them"
            )
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise RecipeError(f"damp must be a number in (0, 1) (a fraction of the Hessian's mean diagonal), got {self.damp!r}")

    @property
    def active(self) -> bool:
        """False when the weight stays at 16 bits (untouched)."""
        return self.bits != 16

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_width(self, width: int) -> QuantSpec:
        """This spec with ``group_size=auto`` resolved for a layer of input width ``width``."""
        if self.group_size != "auto":
            return self
        return dataclasses.replace(self, group_size=next((g for g in AUTO_GROUP_SIZES if width % g == 0), -1))


@dataclass(frozen=True)
class LayerRule:
    """A per-layer override: modules whose full name matches ``pattern`` (a
    Python regex, matched with ``re.search``; an optional ``re:`` prefix is
    accepted) get the fields of ``spec`` that are set, or are skipped."""

    pattern: str
    bits: int | None = None
    method: str | None = None
    group_size: int | None = None
    sym: bool | None = None
    quantize_bias: bool | None = None
    act_order: bool | None = None
    static_groups: bool | None = None
    damp: float | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        pat = self.pattern[3:] if self.pattern.startswith("re:") else self.pattern
        try:
            re.compile(pat)
        except re.error as exc:
            raise RecipeError(f"override pattern {self.pattern!r} is not a valid regex: {exc}") from None
        object.__setattr__(self, "pattern", pat)
        if self.bits is not None:
            _check_bits(self.bits, f"override {pat!r}")
        if self.method is not None and self.method not in METHODS:
            raise RecipeError(f"override {pat!r}: unknown method {self.method!r}; valid: {_choices(METHODS)}")

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None

    def apply(self, spec: QuantSpec) -> QuantSpec:
        changes = {k: getattr(self, k) for k in _SPEC_KEYS if getattr(self, k) is not None}
        if "method" in changes and changes["method"] != spec.method:
            # A new method brings its own defaults for what the rule does not set.
            defaults = {k: v for k, v in METHOD_DEFAULTS[changes["method"]].items() if k not in changes}
            changes = {**defaults, **changes}
        return dataclasses.replace(spec, **changes)


@dataclass(frozen=True)
class ComponentRecipe:
    """The recipe of one component: its spec, and which of its blocks and layers it covers.

    ``blocks``: ``None`` for all blocks, or a tuple of block selectors, each one of
    ``front``/``middle``/``end`` (the study's thirds) or an index range ``"a-b"``
    (inclusive) or a single index.  ``layers``: ``all``, ``attn`` or ``mlp``.
    """

    spec: QuantSpec = field(default_factory=QuantSpec)
    blocks: tuple[str, ...] | None = None
    layers: str = "all"
    #: True when the recipe names this component itself (``bits_llm=...``), False when
    #: it only inherits global keys; only an explicit component must exist in the model.
    explicit: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        if self.layers not in LAYER_SETS:
            raise RecipeError(f"layers must be one of {_choices(LAYER_SETS)}, got {self.layers!r}")
        if self.blocks is not None:
            for sel in self.blocks:
                if sel in BLOCK_THIRDS:
                    continue
                if not re.fullmatch(r"\d+(-\d+)?", str(sel)):
                    raise RecipeError(f"block selector {sel!r} is invalid; valid: {_choices(BLOCK_THIRDS)}, an index 'k' or a range 'a-b'")

    def block_indices(self, n_blocks: int) -> set[int]:
        """Indices of the selected blocks among ``n_blocks``."""
        if self.blocks is None:
            return set(range(n_blocks))
        out: set[int] = set()
        third = [round(n_blocks * i / 3) for i in range(4)]
        for sel in self.blocks:
            if sel in BLOCK_THIRDS:
                k = BLOCK_THIRDS.index(sel)
                out.update(range(third[k], third[k + 1]))
            else:
                a, _, b = str(sel).partition("-")
                lo, hi = int(a), int(b or a)
                if hi >= n_blocks or lo > hi:
                    raise RecipeError(f"block range {sel!r} is outside the component's {n_blocks} blocks (0-{n_blocks - 1})")
                out.update(range(lo, hi + 1))
        return out


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration data for GPTQ and AWQ.

    ``source``:

    * ``auto`` (the default): ``world`` for the bundled toy models, else
      :data:`DEFAULT_HUB_CALIBRATION` (a real image-caption set), resolved when the model is known;
    * ``world`` (the bundled calibration split of the synthetic world), ``task`` (the evaluated
      task's own documents: the study's protocol; it overlaps the test split), ``text`` (text only);
    * a JSONL file of our task schema;
    * a ``datasets`` source: a hub id (``lmms-lab/flickr30k``), a folder written by
      ``save_to_disk``, a parquet file or folder of parquet files, or an image folder with a
      ``metadata.jsonl`` / ``metadata.csv`` captions file (``datasets``' ``imagefolder``).

    ``split``, ``image_column``, ``text_column``, ``question_column`` and ``revision`` apply to
    ``datasets`` sources; columns are inferred where obvious (an ``Image`` feature; ``caption``,
    ``text``, ``answer``...; ``question``) and a named column that is missing is an error.

    ``mode``: one of :data:`CALIB_MODES` (default ``sequential``).
    """

    source: str = "auto"
    samples: int = 128
    seed: int = 42
    max_seq_len: int = 512
    split: str | None = None
    image_column: str | None = None
    text_column: str | None = None
    question_column: str | None = None
    revision: str | None = None
    mode: str = "sequential"

    def __post_init__(self) -> None:
        if self.mode not in CALIB_MODES:
            raise RecipeError(f"calib_mode {self.mode!r} is unknown; valid: {_choices(CALIB_MODES)}")
        if not isinstance(self.source, str) or not self.source:
            raise RecipeError(f"calib_source must be a non-empty string, got {self.source!r}")
        if self.source not in CALIB_SOURCES and not Path(self.source).expanduser().exists() and not _HUB_ID.fullmatch(self.source):
            raise RecipeError(
                f"calib_source {self.source!r} is neither one of {_choices(CALIB_SOURCES)}, an existing local path "
                "(JSONL file, parquet file or folder, save_to_disk folder, image folder) nor a hub dataset id (org/name)"
            )
        if self.samples < 1:
            raise RecipeError(f"calib_samples must be >= 1, got {self.samples}")
        if self.max_seq_len < 1:
            raise RecipeError(f"calib_max_seq_len must be >= 1, got {self.max_seq_len}")
        for key in ("split", "image_column", "text_column", "question_column", "revision"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise RecipeError(f"calib_{key} must be a non-empty string, got {value!r}")

    @property
    def is_dataset(self) -> bool:
        """A ``datasets`` source (hub id or local dataset), not one of the named sources or a JSONL file."""
        return self.source not in CALIB_SOURCES and not self.source.endswith(".jsonl")


@dataclass(frozen=True)
class Recipe:
    """A full per-component quantization recipe."""

    vit: ComponentRecipe = field(default_factory=ComponentRecipe)
    connector: ComponentRecipe = field(default_factory=ComponentRecipe)
    llm: ComponentRecipe = field(default_factory=ComponentRecipe)
    overrides: tuple[LayerRule, ...] = ()
    skip: tuple[str, ...] = ()
    #: Component -> regex over module names, for models the architecture table does not know.
    component_patterns: Mapping[str, str] | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    seed: int = 0

    def __post_init__(self) -> None:
        for pat in self.skip:
            try:
                re.compile(pat)
            except re.error as exc:
                raise RecipeError(f"skip pattern {pat!r} is not a valid regex: {exc}") from None
        if self.component_patterns is not None:
            unknown = set(self.component_patterns) - set(COMPONENTS)
            if unknown:
                raise RecipeError(f"component_patterns: unknown component(s) {sorted(unknown)}; valid: {_choices(COMPONENTS)}")
        if self.calibration.mode == "fp_inputs":
            methods = {self.component(c).spec.method for c in COMPONENTS if self.component(c).spec.active} | {r.method for r in self.overrides if r.method}
            if "awq" in methods:
                raise RecipeError("calib_mode=fp_inputs solves GPTQ layers from full-precision statistics; AWQ searches its scales by "
                                  "replaying each block on its inputs, so it needs calib_mode=sequential (the default)")

    def component(self, name: str) -> ComponentRecipe:
        if name not in COMPONENTS:
            raise RecipeError(f"unknown component {name!r}; valid: {_choices(COMPONENTS)}")
        return getattr(self, name)

    @property
    def is_noop(self) -> bool:
        """True when nothing would be quantized."""
        return not any(self.component(c).spec.active for c in COMPONENTS) and not any(
            r.bits not in (None, 16) for r in self.overrides
        )

    @property
    def needs_calibration(self) -> bool:
        methods = {self.component(c).spec.method for c in COMPONENTS if self.component(c).spec.active}
        methods |= {r.method for r in self.overrides if r.method}
        return bool(methods & {"gptq", "awq"})

    def to_dict(self) -> dict[str, Any]:
        """The recipe in the file form that :func:`load_recipe` reads back."""
        comps = {
            c: {**self.component(c).spec.to_dict(), "blocks": list(self.component(c).blocks) if self.component(c).blocks else None,
                "layers": self.component(c).layers, "explicit": self.component(c).explicit}
            for c in COMPONENTS
        }
        return {
            **comps,
            "overrides": [{k: v for k, v in dataclasses.asdict(r).items() if v is not None and not (k == "skip" and v is False)}
                          for r in self.overrides],
            "skip": list(self.skip),
            "component_patterns": dict(self.component_patterns) if self.component_patterns else None,
            "calibration": dataclasses.asdict(self.calibration),
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        return _recipe_from_mapping(data, where="recipe")


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------

_SPEC_KEYS = ("bits", "method", "group_size", "sym", "quantize_bias", "act_order", "static_groups", "damp")
_GPTQ_ONLY_KEYS = ("act_order", "static_groups", "damp")
_CALIB_FIELDS = ("source", "samples", "seed", "max_seq_len", "split", "image_column", "text_column", "question_column", "revision", "mode")
_CALIB_KEYS = {f"calib_{f}": f for f in _CALIB_FIELDS}
#: Every key --model_args may carry for the recipe.
RECIPE_ARG_KEYS = tuple(
    [*_SPEC_KEYS, *(f"{k}_{c}" for k in _SPEC_KEYS for c in COMPONENTS), *(f"blocks_{c}" for c in COMPONENTS),
     *(f"layers_{c}" for c in COMPONENTS), *_CALIB_KEYS, "recipe", "seed"]
)


def _coerce_spec_value(key: str, value: Any, where: str) -> Any:
    if key == "bits":
        return _check_bits(value, where)
    if key == "method":
        value = str(value).lower()
        if value not in METHODS:
            raise RecipeError(f"{where}: unknown method {value!r}; valid: {_choices(METHODS)}")
        return value
    if key == "group_size":
        return "auto" if str(value).lower() == "auto" else _check_int(value, where)
    if key == "damp":
        return _check_number(value, where, float, "a number in (0, 1)")
    return _check_bool(value, where)


def _build_spec(method: str | None, values: Mapping[str, Any]) -> QuantSpec:
    method = method or "rtn"
    merged = {**METHOD_DEFAULTS[method], **{k: v for k, v in values.items() if v is not None}, "method": method}
    return QuantSpec(**merged)


def _parse_blocks(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p for p in re.split(r"[+;\s]+", value) if p]
    elif isinstance(value, (list, tuple)):
        parts = [str(p) for p in value]
    else:
        parts = [str(value)]
    if not parts:
        raise RecipeError(f"{where}: empty block selection")
    return tuple(parts)


def recipe_from_args(args: Mapping[str, Any]) -> Recipe:
    """Build a :class:`Recipe` from flat ``--model_args`` keys.

    Keys: ``bits``, ``method``, ``group_size``, ``sym``, ``quantize_bias``, and for
    GPTQ ``act_order``, ``static_groups``, ``damp`` (all components) and their per-component forms ``bits_vit``, ``method_llm``,
    ``group_size_connector``...; ``blocks_<c>`` (e.g. ``front+end`` or ``0-3``),
    ``layers_<c>`` (``all``/``attn``/``mlp``); ``calib_source``,
    ``calib_samples``, ``calib_seed``, ``calib_max_seq_len``; ``seed``;
    ``recipe=FILE.yaml`` for a file whose keys the flat keys then override.
    Unknown keys raise :class:`RecipeError` naming the valid keys.
    """
    unknown = sorted(set(args) - set(RECIPE_ARG_KEYS))
    if unknown:
        raise RecipeError(f"unknown recipe key(s) {unknown}; valid: {_choices(RECIPE_ARG_KEYS)}")
    base: dict[str, Any] = {}
    if args.get("recipe"):
        base = _read_yaml(args["recipe"])
    data = _merge_flat_into_mapping(base, {k: v for k, v in args.items() if k != "recipe"})
    return _recipe_from_mapping(data, where=str(args.get("recipe") or "model_args"))

#: The model_args that choose how to quantize but not how many bits: alone they would quantize nothing.
METHOD_ARG_KEYS = tuple(k for k in RECIPE_ARG_KEYS if not k.startswith(("bits", "blocks_", "layers_")) and k not in ("recipe", "seed"))


def _merge_flat_into_mapping(base: Mapping[str, Any], flat: Mapping[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for key, value in flat.items():
        if key in _CALIB_KEYS:
            data.setdefault("calibration", {})[_CALIB_KEYS[key]] = value
            continue
        if key == "seed":
            data["seed"] = value
            continue
        m = re.fullmatch(rf"({'|'.join((*_SPEC_KEYS, 'blocks', 'layers'))})(?:_(vit|connector|llm))?", key)
        assert m, key  # guaranteed by the key check
        field_name, comp = m.group(1), m.group(2)
        if comp is None:
            data[field_name] = value
        else:
            data.setdefault(comp, {})[field_name] = value
    return data


_TOP_KEYS = ("vit", "connector", "llm", *_SPEC_KEYS, "overrides", "skip", "component_patterns", "calibration", "seed")
_COMPONENT_KEYS = (*_SPEC_KEYS, "blocks", "layers", "explicit")
_RULE_KEYS = ("pattern", *_SPEC_KEYS, "skip")


def _recipe_from_mapping(data: Mapping[str, Any], where: str) -> Recipe:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: a recipe must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; valid: {_choices(_TOP_KEYS)}")
    global_vals = {k: _coerce_spec_value(k, data[k], f"{where}: {k}") for k in _SPEC_KEYS if k in data}
    components = {}
    for comp in COMPONENTS:
        cdata = data.get(comp) or {}
        if not isinstance(cdata, Mapping):
            raise RecipeError(f"{where}: {comp} must be a mapping of {_choices(_COMPONENT_KEYS)}")
        bad = sorted(set(cdata) - set(_COMPONENT_KEYS))
        if bad:
            raise RecipeError(f"{where}: {comp}: unknown key(s) {bad}; valid: {_choices(_COMPONENT_KEYS)}")
        vals = dict(global_vals)
        vals.update({k: _coerce_spec_value(k, cdata[k], f"{where}: {comp}.{k}") for k in _SPEC_KEYS if k in cdata})
        method = vals.pop("method", None)
        if (method or "rtn") != "gptq":
            # Global GPTQ options (act_order=true) apply to the GPTQ components only; a component's own key stays strict.
            for k in _GPTQ_ONLY_KEYS:
                if k in global_vals and k not in cdata:
                    vals.pop(k, None)
        spec = _build_spec(method, vals)
        components[comp] = ComponentRecipe(
            spec=spec,
            blocks=_parse_blocks(cdata.get("blocks"), f"{where}: {comp}.blocks"),
            layers=str(cdata.get("layers", "all")),
            explicit=_check_bool(cdata.get("explicit", bool(cdata)), f"{where}: {comp}.explicit"),
        )
    given = [k for k in _GPTQ_ONLY_KEYS if k in global_vals]
    if given and not any(c.spec.method == "gptq" for c in components.values()) and not any(
        isinstance(r, Mapping) and str(r.get("method", "")).lower() == "gptq" for r in data.get("overrides") or ()
    ):
        methods = sorted({c.spec.method for c in components.values()})
        raise RecipeError(f"{where}: {', '.join(given)} are options of method 'gptq' only, but no component uses it (methods: {', '.join(methods)})")
    rules = []
    for i, rule in enumerate(data.get("overrides") or ()):
        if not isinstance(rule, Mapping) or "pattern" not in rule:
            raise RecipeError(f"{where}: overrides[{i}] must be a mapping with a 'pattern' key and any of {_choices(_RULE_KEYS)}")
        bad = sorted(set(rule) - set(_RULE_KEYS))
        if bad:
            raise RecipeError(f"{where}: overrides[{i}]: unknown key(s) {bad}; valid: {_choices(_RULE_KEYS)}")
        vals = {k: _coerce_spec_value(k, rule[k], f"{where}: overrides[{i}].{k}") for k in _SPEC_KEYS if k in rule}
        rules.append(LayerRule(pattern=str(rule["pattern"]), skip=_check_bool(rule.get("skip", False), f"overrides[{i}].skip"), **vals))
    skip = data.get("skip") or ()
    if isinstance(skip, str):
        skip = (skip,)
    calib = data.get("calibration") or {}
    if not isinstance(calib, Mapping):
        raise RecipeError(f"{where}: calibration must be a mapping of {', '.join(_CALIB_FIELDS)}")
    bad = sorted(set(calib) - set(_CALIB_FIELDS))
    if bad:
        raise RecipeError(f"{where}: calibration: unknown key(s) {bad}; valid: {', '.join(_CALIB_FIELDS)}")
    calibration = CalibrationSpec(
        source=str(calib.get("source", "auto")),
        **{k: _check_int(calib[k], f"{where}: calibration.{k}") for k in ("samples", "seed", "max_seq_len") if k in calib},
        **{k: (None if calib[k] is None else str(calib[k])) for k in _CALIB_FIELDS[4:] if k in calib},
    )
    patterns = data.get("component_patterns")
    return Recipe(
        overrides=tuple(rules),
        skip=tuple(str(s) for s in skip),
        component_patterns=dict(patterns) if patterns else None,
        calibration=calibration,
        seed=_check_int(data.get("seed", 0), f"{where}: seed"),
        **components,
    )


def _read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe file {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise RecipeError(f"recipe file {str(p)!r} must hold a mapping, got {type(data).__name__}")
    return dict(data)


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe file (the same keys as :meth:`Recipe.to_dict`, or the nested short form)."""
    return _recipe_from_mapping(_read_yaml(path), where=str(path))
