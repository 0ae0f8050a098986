"""Leaderboard records: one JSON object per configuration, in a versioned schema.

``lmms-quant report DIR`` writes one record per results file to
``DIR/report/leaderboard/``; ``lmms-quant validate PATH...`` checks records
(files, folders of ``*.json``, or ``.jsonl`` files with one record a line)
and exits 0 only when every one is valid.  ``lmms-quant validate --schema``
prints the schema (JSON Schema 2020-12).

Schema 1.0, every key required unless marked optional:

* ``schema_version``  ``"1.0"`` (a reader accepts any ``1.x``; new optional keys bump the minor);
* ``model``           ``name``, ``revision`` (null: unpinned), ``class``; optional ``path``, ``family``, ``dtype``;
* ``recipe``          the full recipe (``Recipe.to_dict()``; it must load with ``Recipe.from_dict``);
* ``bits``, ``methods``  per component (``vit``, ``connector``, ``llm``): bit width (16 = untouched) and method (null at 16);
* ``bpw``             ``study`` and ``storage`` for the model, and ``components`` with both per component;
* ``scores``          task -> metric -> number; optional ``stderr`` of the same shape, ``n_samples`` task -> count, ``limit``;
* ``calibration``     the calibration used (null for data-free methods);
* ``versions``        at least ``lmms-eval`` and ``lmms-quant``;
* ``weights_sha256``  hash of every block Linear weight after quantization (64 hex digits);
* ``seed``            the recipe's seed;
* ``source``          ``config_id`` and optionally ``results_file``, ``date``, ``sweep``.

Validation uses ``jsonschema`` when it is installed and a small built-in
checker of the same schema otherwise, then checks what a schema cannot: the
recipe loads, and ``bits``/``methods`` agree with it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmms_quant.recipe import COMPONENTS, METHODS, VALID_BITS, Recipe, RecipeError

from .results import Run

__all__ = ["SCHEMA_VERSION", "SCHEMA", "make_record", "validate_record", "iter_records"]

SCHEMA_VERSION = "1.0"
_NUM = {"type": "number"}
_BPW = {"type": "object", "required": ["study", "storage"],
        "properties": {"study": {"type": "number", "minimum": 0, "maximum": 64}, "storage": {"type": "number", "minimum": 0, "maximum": 64}}}
_PER_TASK_NUMBERS = {"type": "object", "minProperties": 1, "additionalProperties": {"type": "object", "minProperties": 1, "additionalProperties": _NUM}}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "lmms-quant leaderboard record",
    "type": "object",
    "required": ["schema_version", "model", "recipe", "bits", "methods", "bpw", "scores", "calibration", "versions",
                 "weights_sha256", "seed", "source"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"type": "string", "pattern": r"^1\.[0-9]+$"},
        "model": {"type": "object", "required": ["name", "revision", "class"],
                  "properties": {"name": {"type": "string", "minLength": 1}, "revision": {"type": ["string", "null"]},
                                 "class": {"type": "string", "minLength": 1}, "path": {"type": ["string", "null"]},
                                 "family": {"type": ["string", "null"]}, "dtype": {"type": ["string", "null"]}}},
        "recipe": {"type": "object", "required": list(COMPONENTS)},
        "bits": {"type": "object", "required": list(COMPONENTS), "additionalProperties": False,
                 "properties": {c: {"enum": list(VALID_BITS)} for c in COMPONENTS}},
        "methods": {"type": "object", "required": list(COMPONENTS), "additionalProperties": False,
                    "properties": {c: {"enum": [*METHODS, None]} for c in COMPONENTS}},
        "bpw": {**_BPW, "required": ["study", "storage", "components"],
                "properties": {**_BPW["properties"], "components": {"type": "object", "additionalProperties": _BPW}}},
        "scores": _PER_TASK_NUMBERS,
        "stderr": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": _NUM}},
        "n_samples": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
        "limit": {"type": ["number", "null"]},
        "calibration": {"type": ["object", "null"]},
        "versions": {"type": "object", "required": ["lmms-eval", "lmms-quant"],
                     "properties": {"lmms-eval": {"type": "string"}, "lmms-quant": {"type": "string"}},
                     "additionalProperties": {"type": ["string", "null"]}},
        "weights_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "seed": {"type": "integer"},
        "source": {"type": "object", "required": ["config_id"],
                   "properties": {"config_id": {"type": "string", "minLength": 1}, "results_file": {"type": "string"},
                                  "date": {"type": "string"}, "sweep": {"type": ["string", "null"]}}},
    },
}


def make_record(run: Run) -> dict[str, Any]:
    """The leaderboard record of one run (it must carry our ``lmms_quant`` metadata)."""
    if run.metadata is None:
        raise ValueError(f"{run.path}: no lmms_quant metadata; only quant_vlm results make leaderboard records")
    model = run.model_info
    rec = {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": run.model, "revision": model.get("revision"), "class": model.get("class"), "path": model.get("path"),
                  "family": model.get("family"), "dtype": model.get("dtype")},
        "recipe": run.recipe,
        "bits": run.bits,
        "methods": run.methods,
        "bpw": {"study": run.bpw["model"]["study"], "storage": run.bpw["model"]["storage"],
                "components": {c: {"study": v["study"], "storage": v["storage"]} for c, v in run.bpw.items() if c != "model"}},
        "scores": run.scores,
        "stderr": run.stderr,
        "n_samples": run.n_samples,
        "limit": run.limit,
        "calibration": run.calibration,
        "versions": run.versions,
        "weights_sha256": run.weights_sha256,
        "seed": run.metadata.get("seed"),
        "source": {"config_id": run.config_id, "results_file": run.path.name, "date": run.date,
                   "sweep": (run.metadata.get("sweep") or {}).get("name")},
    }
    return rec


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool, "null": type(None)}


def _is_type(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


def _path(parts: list[Any]) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def _check(value: Any, schema: dict[str, Any], where: list[Any]) -> Iterator[str]:
    """The subset of JSON Schema that :data:`SCHEMA` uses, for when jsonschema is not installed."""
    here = _path(where)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            yield f"{here}: {value!r} is not of type {' or '.join(types)}"
            return
    if "enum" in schema and value not in schema["enum"]:
        yield f"{here}: {value!r} is not one of {schema['enum']}"
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            yield f"{here}: {value!r} does not match {schema['pattern']!r}"
        if len(value) < schema.get("minLength", 0):
            yield f"{here}: {value!r} is too short"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            yield f"{here}: {value!r} is less than the minimum of {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            yield f"{here}: {value!r} is greater than the maximum of {schema['maximum']}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                yield f"{here}: {key!r} is a required property"
        if len(value) < schema.get("minProperties", 0):
            yield f"{here}: {value!r} should be non-empty"
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, sub in value.items():
            if key in props:
                yield from _check(sub, props[key], [*where, key])
            elif extra is False:
                yield f"{here}: additional property {key!r} is not allowed"
            elif isinstance(extra, dict):
                yield from _check(sub, extra, [*where, key])


def _schema_errors(record: Any, use_jsonschema: bool | None = None) -> list[str]:
    if use_jsonschema is None:
        try:
            import jsonschema  # noqa: F401
            use_jsonschema = True
        except ImportError:
            use_jsonschema = False
    if use_jsonschema:
        from jsonschema import Draft202012Validator

        errors = sorted(Draft202012Validator(SCHEMA).iter_errors(record), key=lambda e: list(map(str, e.absolute_path)))
        return [f"{_path(list(e.absolute_path))}: {e.message}" for e in errors]
    return list(_check(record, SCHEMA, []))


def validate_record(record: Any, *, use_jsonschema: bool | None = None) -> list[str]:
    """Every problem of ``record`` (empty when valid).  ``use_jsonschema``: None = when installed."""
    errors = _schema_errors(record, use_jsonschema)
    if errors or not isinstance(record, dict):
        return errors
    try:
        recipe = Recipe.from_dict(record["recipe"])
    except RecipeError as exc:
        return [f"$.recipe: does not load as a recipe: {exc}"]
    for c in COMPONENTS:
        spec = recipe.component(c).spec
        if record["bits"][c] != spec.bits:
            errors.append(f"$.bits.{c}: {record['bits'][c]} but the recipe says {spec.bits}")
        expected = spec.method if spec.bits != 16 else None
        if record["methods"][c] != expected:
            errors.append(f"$.methods.{c}: {record['methods'][c]!r} but the recipe says {expected!r}")
    return errors


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(label, record)`` for a record file, a JSONL file, or every ``*.json`` / ``*.jsonl`` in a folder
    (a file that is not valid JSON yields its error message as the record's label and None)."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.suffix in (".json", ".jsonl") and f.is_file()) if p.is_dir() else [p]
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except OSError as exc:
            yield f"{f}: cannot read: {exc}", None
            continue
        if f.suffix == ".jsonl":
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    yield from _parse(f"{f}:{i}", line)
        else:
            yield from _parse(str(f), text)


def _parse(label: str, text: str) -> Iterator[tuple[str, Any]]:
    try:
        yield label, json.loads(text)
    except json.JSONDecodeError as exc:
        yield f"{label}: not valid JSON ({exc})", None


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="check leaderboard records against their schema", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="record files (.json, .jsonl) or folders of them")
    p.add_argument("--schema", action="store_true", help="print the record schema (JSON Schema 2020-12) and exit")
    p.set_defaults(func=main)


def main(ns: argparse.Namespace) -> int:
    if ns.schema:
        print(json.dumps(SCHEMA, indent=2))
        return 0
    if not ns.paths:
        print("lmms-quant validate: give record files or folders (or --schema)", file=sys.stderr)
        return 2
    n_ok = n_bad = 0
    for path in ns.paths:
        if not Path(path).exists():
            print(f"INVALID {path}: no such file or folder")
            n_bad += 1
            continue
        found = False
        for label, record in iter_records(path):
            found = True
            errors = ["the file could not be read as JSON"] if record is None else validate_record(record)
            if errors:
                n_bad += 1
                print(f"INVALID {label}")
                for e in errors:
                    print(f"  {e}")
            else:
                n_ok += 1
                print(f"ok      {label}")
        if not found:
            print(f"INVALID {path}: no .json or .jsonl records in this folder")
            n_bad += 1
    print(f"{n_ok} valid, {n_bad} invalid")
    return 1 if n_bad else 0
