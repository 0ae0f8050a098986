"""Helpers shared by our task YAMLs' utils: loading images, checking documents,
and scoring captions once per aggregation.

Errors name the document and the field, so a malformed data set fails with a
message a user can act on instead of a KeyError deep inside lmms-eval.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from lmms_quant.metrics import caption_scores

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent
DATA_DIR = TASKS_DIR / "data"


class TaskDataError(ValueError):
    """A task document is missing a field or holds a value of the wrong shape."""


def doc_label(doc: Mapping[str, Any]) -> str:
    for key in ("question_id", "id", "img_id", "image_id", "filename", "file_name"):
        if key in doc:
            return f"{key}={doc[key]!r}"
    return "a document without an id"


def require(doc: Mapping[str, Any], field: str, kind: type | tuple[type, ...]) -> Any:
    if field not in doc:
        raise TaskDataError(f"document {doc_label(doc)}: missing field {field!r}; it has {sorted(doc)}")
    value = doc[field]
    if not isinstance(value, kind):
        raise TaskDataError(f"document {doc_label(doc)}: field {field!r} should be {kind}, got {type(value).__name__}")
    return value


def load_image(doc: Mapping[str, Any], field: str = "image", root: Path | None = None) -> Image.Image:
    """The document's image as RGB: a PIL image (hub data sets), an encoded
    ``{"bytes": ...}`` record (parquet), or a path relative to ``root``."""
    if field not in doc or doc[field] is None:
        raise TaskDataError(f"document {doc_label(doc)}: missing field {field!r}")
    value = doc[field]
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, Mapping) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    if isinstance(value, Mapping) and value.get("path"):
        value = value["path"]
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and root is not None:
            path = root / path
        if not path.is_file():
            raise TaskDataError(f"document {doc_label(doc)}: image file {str(path)!r} (field {field!r}) does not exist")
        with Image.open(path) as im:
            return im.convert("RGB")
    raise TaskDataError(f"document {doc_label(doc)}: field {field!r} holds a {type(value).__name__}, not an image or a path")


def references(doc: Mapping[str, Any], field: str, expected: int | None = None) -> list[str]:
    refs = require(doc, field, list)
    if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise TaskDataError(f"document {doc_label(doc)}: field {field!r} must be a non-empty list of non-empty strings")
    if expected is not None and len(refs) != expected:
        raise TaskDataError(f"document {doc_label(doc)}: field {field!r} has {len(refs)} entries, expected {expected}")
    return refs


# ----------------------------------------------------------------- captions
_CAPTION_CACHE: dict[str, Any] = {}


def caption_item(doc_id: Any, prediction: str, refs: list[str]) -> dict[str, Any]:
    return {"image_id": doc_id, "pred": prediction, "refs": refs}


def caption_aggregate(metric: str) -> Callable[[list[dict[str, Any]]], float]:
    """An lmms-eval aggregation for one caption metric.

    lmms-eval calls one aggregation per metric over identical item lists; the
    first call scores every metric at once (one PTB tokenisation, one METEOR
    process) and the rest read the cached result.
    """

    def aggregate(items: list[dict[str, Any]]) -> float:
        key = hashlib.sha256(json.dumps([[str(i["image_id"]), i["pred"], i["refs"]] for i in items]).encode()).hexdigest()
        if key not in _CAPTION_CACHE:
            refs = {str(i["image_id"]): i["refs"] for i in items}
            preds = {str(i["image_id"]): i["pred"] for i in items}
            result = caption_scores(refs, preds)
            for note in result.warnings:
                log.warning("caption metrics: %s", note)
            _CAPTION_CACHE.clear()
            _CAPTION_CACHE[key] = result
        value = _CAPTION_CACHE[key].scores[metric]
        return float("nan") if value is None else float(value)

    aggregate.__name__ = f"caption_{metric}"
    return aggregate
