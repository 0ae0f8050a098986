"""Calibration sets: what GPTQ and AWQ see, built the way the model will be used.

Each sample is an (image or none, prompt, target) record formatted with the
model's own prompt format and processor, so the LLM calibrates on the token
sequences the model really builds: image tokens, prompt and target text.  An
encoder-decoder LM (BLIP-2's Flan-T5) gets image and prompt in its encoder and
the target as decoder labels, so both halves of the T5 see activations.

Sources (``calib_source``, see :class:`~lmms_quant.recipe.CalibrationSpec`):

* ``auto`` (default): ``world`` for the bundled toy models, else
  :data:`~lmms_quant.recipe.DEFAULT_HUB_CALIBRATION` (:func:`resolve_source`);
* ``world``: the bundled calibration split of the synthetic world
  (``tasks/data/world/*_calibration.jsonl``), disjoint from its test split;
* a JSONL file in the schema of our VQA (question/answers), caption
  (answer: list) or retrieval (caption: list) tasks, or generic
  ``{"image": path, "prompt": str, "target": str}`` rows; image paths are
  relative to the file;
* a ``datasets`` source, read with the ``datasets`` library: a hub id, a
  ``save_to_disk`` folder, parquet, or an image folder with a captions file;
* ``text``: the world records without images (text-only calibration; the vision
  encoder and connector then receive no activations and stay unquantized, with
  a warning).

``calib_samples`` records are drawn with ``calib_seed`` (without replacement).
:func:`load_calibration_rows` reads and checks a source without a model (so a
broken source fails before anything loads); :func:`build_calibration_set`
turns the rows into model inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .calibration import CalibrationSet
from .errors import DataError
from .models import format_prompt
from .recipe import DEFAULT_HUB_CALIBRATION, CalibrationSpec, RecipeError

__all__ = ["WORLD_CALIBRATION", "CalibrationRows", "resolve_source", "load_calibration_rows", "prepare_calibration", "load_records",
           "build_calibration_set", "VQA_PROMPTS", "IMAGE_COLUMNS", "TEXT_COLUMNS", "QUESTION_COLUMNS"]

log = logging.getLogger(__name__)

WORLD_CALIBRATION = Path(__file__).resolve().parent.parent / "tasks" / "data" / "world"
if not WORLD_CALIBRATION.is_dir():  # installed: tasks/ lives inside the package
    WORLD_CALIBRATION = Path(__file__).resolve().parent / "tasks" / "data" / "world"

#: family -> VQA prompt (``{q}`` the question); the default is LLaVA's.
VQA_PROMPTS = {
    "blip2": "Question: {q} Short answer:",
    "default": "{q}\nAnswer the question using a single word or phrase.",
}
CAPTION_PROMPTS = {"blip2": "", "default": "Provide a one-sentence caption for the provided image."}

#: Column names tried, in order, when a ``datasets`` source does not name its columns.
IMAGE_COLUMNS = ("image", "img", "images", "jpg", "png")
TEXT_COLUMNS = ("caption", "captions", "text", "sentences", "sentence", "sentences_raw", "answer", "answers",
                "multiple_choice_answer")
QUESTION_COLUMNS = ("question", "query", "prompt", "instruction")
#: Text columns whose values answer a question (the VQA prompt applies to them).
_ANSWER_COLUMNS = ("answer", "answers", "multiple_choice_answer")


@dataclass
class CalibrationRows:
    """Drawn calibration records, before any model formats them.

    Each row: ``image`` (a PIL image, a path, or None), ``question`` (or None), ``target``,
    ``kind`` (``vqa``, ``caption`` or ``prompt``) and ``id``.  ``dataset`` describes a
    ``datasets`` source (id, split, revision, fingerprint, columns, size) for the results.
    """

    spec: CalibrationSpec
    rows: list[dict[str, Any]]
    available: int
    dataset: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        """A hash of the drawn samples: ids, texts and image pixels, in draw order."""
        h = hashlib.sha256()
        for r in self.rows:
            h.update(json.dumps([r["id"], r["kind"], r["question"], r["target"]]).encode())
            image = _open_image(r["image"])
            if image is not None:
                h.update(f"{image.size}".encode())
                h.update(image.tobytes())
        return h.hexdigest()


def resolve_source(spec: CalibrationSpec, model_name: str | None, bundled: bool) -> CalibrationSpec:
    """``calib_source=auto`` made concrete: ``world`` for a bundled toy model, else the default hub set."""
    if spec.source != "auto":
        return spec
    if bundled:
        return dataclasses.replace(spec, source="world")
    return dataclasses.replace(spec, source=DEFAULT_HUB_CALIBRATION["source"], split=spec.split or DEFAULT_HUB_CALIBRATION["split"])


def prepare_calibration(recipe, pretrained: str | None, model_name: str | None = None):
    """``(recipe, rows)`` for a run about to load ``pretrained``: ``calib_source=auto`` resolved in the
    recipe (what the results record) and its rows read and checked, before any model loads.  ``rows``
    is None when the recipe needs no calibration data or calibrates on the task's own documents."""
    if not recipe.needs_calibration or recipe.calibration.source == "task":
        return recipe, None
    from .models import is_bundled

    spec = resolve_source(recipe.calibration, model_name or pretrained, is_bundled(pretrained))
    return dataclasses.replace(recipe, calibration=spec), load_calibration_rows(spec, model_name=model_name or pretrained)


def _world_dir() -> Path:
    """The bundled world data: ``tasks/data/world`` in a checkout, ``lmms_quant/tasks/data/world`` installed
    (located, not imported: the core does not import the task layer)."""
    import importlib.util

    spec = importlib.util.find_spec("lmms_quant.tasks")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / "data" / "world"
    return WORLD_CALIBRATION  # pragma: no cover


def load_calibration_rows(spec: CalibrationSpec, model_name: str | None = None) -> CalibrationRows:
    """Read ``spec.source`` and draw ``spec.samples`` rows with ``spec.seed``.

    Raises :class:`~lmms_quant.errors.DataError` (naming the source, what is wrong and how to
    pass a local copy) when the source cannot be read or has no usable rows.
    """
    if spec.source in ("auto", "task"):
        raise RecipeError(f"calib_source={spec.source} is resolved by the backend (resolve_source / the task's documents), "
                          "not read from disk")
    if spec.is_dataset:
        return _dataset_rows(spec, model_name)
    records = _jsonl_records(spec.source)
    warnings = []
    if spec.samples > len(records):
        warnings.append(f"calib_samples={spec.samples} but the source has {len(records)} records; using all")
    chosen = random.Random(spec.seed).sample(records, min(spec.samples, len(records)))
    if spec.source == "text":
        chosen = [{**r, "image": None} for r in chosen]
        warnings.append("text-only calibration: the vision encoder and connector receive no activations")
    return CalibrationRows(spec, chosen, len(records), None, warnings)


def load_records(source: str, family: str) -> list[dict[str, Any]]:
    """Every record of a JSONL source (``world``, ``text`` or a file) as ``{"image", "prompt", "target", "id"}``,
    with the prompt in ``family``'s format."""
    records = _jsonl_records(source)
    if source == "text":
        records = [{**r, "image": None} for r in records]
    return [{"image": r["image"], "prompt": _prompt(r, family), "target": r["target"], "id": r["id"]} for r in records]


def _jsonl_records(source: str) -> list[dict[str, Any]]:
    if source in ("world", "text"):
        root = _world_dir()
        files = [root / "vqa_calibration.jsonl", root / "captions_calibration.jsonl"]
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"calib_source {source!r}: no such file; valid: world, text, a JSONL file or a datasets source")
        files = [path]
    records = []
    for f in files:
        for i, line in enumerate(f.read_text().splitlines()):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"calibration {f.name} line {i + 1}: not valid JSON ({exc.msg})") from None
                records.append(_jsonl_record(row, f, i))
    if not records:
        raise DataError(f"calib_source {source!r}: the file has no records")
    return records


def _jsonl_record(row: dict[str, Any], f: Path, i: int) -> dict[str, Any]:
    where = f"{f.name} line {i + 1}"
    if not isinstance(row, dict):
        raise DataError(f"calibration {where}: expected a JSON object, got {type(row).__name__}")
    image = row.get("image")
    image = (f.parent / image) if isinstance(image, str) else None
    if image is not None and not image.is_file():
        raise DataError(f"calibration {where}: image {str(image)!r} does not exist (paths are relative to the JSONL file)")
    rid = f"{f.name}:{i}"
    if "prompt" in row and "target" in row:
        return _row(image, str(row["prompt"]), row["target"], "prompt", rid)
    if "question" in row and ("multiple_choice_answer" in row or "answers" in row):
        return _row(image, str(row["question"]), row.get("multiple_choice_answer") or row["answers"], "vqa", rid)
    if isinstance(row.get("answer"), list) and row["answer"]:
        return _row(image, None, row["answer"], "caption", rid)
    if isinstance(row.get("caption"), list) and row["caption"]:
        return _row(image, None, row["caption"], "caption", rid)
    raise DataError(f"calibration {where}: unknown row shape {sorted(row)}; expected question+answers, answer (captions), "
                    "caption (retrieval) or prompt+target")


def _text(value: Any) -> str | None:
    """A text out of a cell: the first usable entry of a list, the answer of an answer dict, a string."""
    if isinstance(value, (list, tuple)):
        return next((t for t in map(_text, value) if t), None)
    if isinstance(value, dict):
        return _text(value.get("answer") or value.get("raw") or value.get("text"))
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _row(image: Any, question: str | None, target: Any, kind: str, rid: str) -> dict[str, Any]:
    return {"image": image, "question": question, "target": _text(target) or "", "kind": kind, "id": rid}


def _prompt(row: dict[str, Any], family: str) -> str:
    if row["kind"] == "vqa":
        return VQA_PROMPTS.get(family, VQA_PROMPTS["default"]).format(q=row["question"])
    if row["kind"] == "caption":
        return CAPTION_PROMPTS.get(family, CAPTION_PROMPTS["default"])
    return row["question"] or ""


# ---------------------------------------------------------------- datasets sources
def _how_to_pass_local(spec: CalibrationSpec) -> str:
    return (f"pass a local copy: calib_source=/path/to/folder (written by datasets' save_to_disk, parquet files, or an image "
            f"folder with metadata.jsonl) with calib_split if needed, or calib_source=world to calibrate on the bundled toy "
            f"world (e.g. `datasets.load_dataset({spec.source!r}, split={spec.split or 'train'!r}).save_to_disk(...)` on a "
            f"machine with internet)")


def _open_dataset(spec: CalibrationSpec, model_name: str | None):
    """The ``datasets`` object of a source (a Dataset or a DatasetDict)."""
    import datasets

    path = Path(spec.source).expanduser()
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json", "dataset_info.json")) \
                and not any(path.glob("*.parquet")):
            return datasets.load_from_disk(str(path))
        if path.is_file() and path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(path))
        if path.is_dir() and any(path.rglob("*.parquet")):
            return datasets.load_dataset("parquet", data_files=sorted(str(p) for p in path.rglob("*.parquet")))
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path))
        if path.exists():
            raise DataError(f"calib_source {spec.source!r}: a file of this type is not a calibration source; valid: a .jsonl "
                            "or .parquet file, a save_to_disk folder, a parquet folder, an image folder, or a hub dataset id")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; the message says which
        raise DataError(f"calib_source {spec.source!r}: the local dataset cannot be read: {type(exc).__name__}: {exc}") from None
    try:
        kwargs = {"split": spec.split} if spec.split else {}
        return datasets.load_dataset(spec.source, revision=spec.revision, **kwargs)
    except Exception as exc:  # noqa: BLE001
        who = f"model {model_name!r}: " if model_name else ""
        raise DataError(
            f"{who}calibration set {spec.source!r} (split {spec.split or 'default'}) could not be loaded from the hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Offline or without access, "
            + _how_to_pass_local(spec)
        ) from None


def _pick_split(ds, spec: CalibrationSpec):
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds, spec.split or str(ds.split or "train")
    splits = list(ds)
    if spec.split:
        if spec.split not in ds:
            raise DataError(f"calib_source {spec.source!r} has no split {spec.split!r}; valid: {', '.join(splits)}")
        return ds[spec.split], spec.split
    if len(splits) == 1:
        return ds[splits[0]], splits[0]
    if "train" in ds:
        return ds["train"], "train"
    raise DataError(f"calib_source {spec.source!r} has several splits ({', '.join(splits)}); choose one with calib_split")


def _column(ds, given: str | None, candidates: tuple[str, ...], what: str, spec: CalibrationSpec, *, image: bool = False,
            required: bool = True) -> str | None:
    import datasets

    names = list(ds.column_names)
    if given is not None:
        if given not in names:
            raise DataError(f"calib_source {spec.source!r}: no {what} column {given!r}; columns: {', '.join(names)}")
        return given
    if image:
        typed = [n for n in names if isinstance(ds.features.get(n), datasets.Image)]
        if typed:
            return typed[0]
    found = next((n for n in candidates if n in names), None)
    if found is None and required:
        raise DataError(f"calib_source {spec.source!r}: cannot tell which column holds the {what} (tried {', '.join(candidates)}); "
                        f"name it with calib_{what}_column; columns: {', '.join(names)}")
    return found


def _dataset_rows(spec: CalibrationSpec, model_name: str | None) -> CalibrationRows:
    ds, split = _pick_split(_open_dataset(spec, model_name), spec)
    image_col = _column(ds, spec.image_column, IMAGE_COLUMNS, "image", spec, image=True)
    text_col = _column(ds, spec.text_column, TEXT_COLUMNS, "text", spec)
    question_col = _column(ds, spec.question_column, QUESTION_COLUMNS, "question", spec, required=False)
    n = len(ds)
    if n == 0:
        raise DataError(f"calib_source {spec.source!r} split {split!r} has no rows")
    warnings = [] if spec.samples <= n else [f"calib_samples={spec.samples} but split {split!r} has {n} rows; using all"]
    indices = random.Random(spec.seed).sample(range(n), min(spec.samples, n))
    picked = ds.select(indices)
    rows = []
    for i, rec in zip(indices, picked):
        image = rec[image_col]
        if isinstance(image, (list, tuple)):
            image = image[0] if image else None
        if image is None:
            raise DataError(f"calib_source {spec.source!r} row {i}: column {image_col!r} holds no image")
        question = _text(rec[question_col]) if question_col else None
        target = _text(rec[text_col])
        if not target:
            raise DataError(f"calib_source {spec.source!r} row {i}: column {text_col!r} holds no text")
        if question is None:
            kind = "caption"
        else:
            kind = "vqa" if text_col in _ANSWER_COLUMNS and len(target.split()) <= 5 else "prompt"
        rows.append(_row(image, question, target, kind, f"{split}:{i}"))
    described = {"id": spec.source, "split": split, "revision": spec.revision, "fingerprint": getattr(ds, "_fingerprint", None),
                 "rows": n, "columns": {"image": image_col, "text": text_col, "question": question_col}}
    out = CalibrationRows(spec, rows, n, described, warnings)
    described["samples_sha256"] = out.sha256
    return out


# ---------------------------------------------------------------- model inputs
def _open_image(image: Any) -> Image.Image | None:
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def build_calibration_set(processor, family: str, source: CalibrationSpec | CalibrationRows, device: torch.device | str,
                          dtype: torch.dtype, *, encoder_decoder: bool = False) -> CalibrationSet:
    """Model inputs for the drawn rows of ``source`` (a spec is read with :func:`load_calibration_rows`).

    ``encoder_decoder``: the prompt (with the image) goes to the encoder and the target, ended by
    the tokenizer's EOS, to the decoder as ``labels``; otherwise prompt and target are one sequence.
    """
    drawn = source if isinstance(source, CalibrationRows) else load_calibration_rows(source)
    spec = drawn.spec
    tokenizer = getattr(processor, "tokenizer", processor)
    batches = []
    for r in drawn.rows:
        image = _open_image(r["image"])
        images = [image] if image is not None else []
        text = format_prompt(processor, family, _prompt(r, family), len(images))
        if encoder_decoder:
            kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
            labels = tokenizer(r["target"], add_special_tokens=False)["input_ids"][: spec.max_seq_len - 1]
            if tokenizer.eos_token_id is not None:
                labels = [*labels, tokenizer.eos_token_id]
        else:
            sep = "" if text.endswith((" ", "\n")) or not text else " "
            kwargs = {"text": [f"{text}{sep}{r['target']}"], "return_tensors": "pt"}
            labels = None
        if images:
            kwargs["images"] = images
        batch = dict(processor(**kwargs))
        if batch["input_ids"].shape[1] > spec.max_seq_len and not images:
            batch = {k: v[:, : spec.max_seq_len] for k, v in batch.items()}
        if labels is not None:
            batch["labels"] = torch.tensor([labels])
        batches.append({k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device)) for k, v in batch.items()})
    for w in drawn.warnings:
        log.warning("calibration: %s", w)
    return CalibrationSet(batches, spec.source, len(batches), spec.seed, spec.max_seq_len, list(drawn.warnings),
                          dataset=drawn.dataset)
