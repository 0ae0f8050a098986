"""Calibration sets: what GPTQ and AWQ see, built the way the model will be used.

Each sample is an (image or none, prompt, target) record formatted with the
model's own prompt format and processor, so the LLM calibrates on the token
sequences the model really builds: image tokens, prompt and target text.

Sources (``calib_source``):

* ``world`` (default): the bundled calibration split of the synthetic world
  (``tasks/data/world/*_calibration.jsonl``), disjoint from its test split;
* a path to a JSONL file in the schema of our VQA (question/answers), caption
  (answer: list) or retrieval (caption: list) tasks, or generic
  ``{"image": path, "prompt": str, "target": str}`` rows; image paths are
  relative to the file;
* ``text``: the same records without images (text-only calibration; the vision
  encoder and connector then receive no activations and stay unquantized, with
  a warning).

``calib_samples`` records are drawn with ``calib_seed`` (without replacement).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .calibration import CalibrationSet
from .models import format_prompt
from .recipe import CalibrationSpec, RecipeError

__all__ = ["WORLD_CALIBRATION", "load_records", "build_calibration_set", "VQA_PROMPTS"]

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


def _world_dir() -> Path:
    try:
        import lmms_quant.tasks as tasks_pkg

        return Path(tasks_pkg.__file__).resolve().parent / "data" / "world"
    except ImportError:  # pragma: no cover
        return WORLD_CALIBRATION


def load_records(source: str, family: str) -> list[dict[str, Any]]:
    """Records ``{"image": Path | None, "prompt": str, "target": str, "id": str}`` of a source."""
    if source in ("world", "text"):
        root = _world_dir()
        files = [root / "vqa_calibration.jsonl", root / "captions_calibration.jsonl"]
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise RecipeError(f"calib_source {source!r}: no such file; valid: world, text, or a path to a JSONL file")
        files = [path]
    records = []
    for f in files:
        for i, line in enumerate(f.read_text().splitlines()):
            if line.strip():
                records.append(_record(json.loads(line), f, i, family))
    if source == "text":
        for r in records:
            r["image"] = None
    return records


def _record(row: dict[str, Any], f: Path, i: int, family: str) -> dict[str, Any]:
    where = f"{f.name} line {i + 1}"
    image = row.get("image")
    image = (f.parent / image) if isinstance(image, str) else None
    vqa = VQA_PROMPTS.get(family, VQA_PROMPTS["default"])
    cap = CAPTION_PROMPTS.get(family, CAPTION_PROMPTS["default"])
    if "prompt" in row and "target" in row:
        prompt, target = row["prompt"], row["target"]
    elif "question" in row and ("multiple_choice_answer" in row or "answers" in row):
        answer = row.get("multiple_choice_answer") or row["answers"][0]
        prompt, target = vqa.format(q=row["question"]), answer["answer"] if isinstance(answer, dict) else answer
    elif isinstance(row.get("answer"), list) and row["answer"]:
        prompt, target = cap, row["answer"][0]
    elif isinstance(row.get("caption"), list) and row["caption"]:
        prompt, target = cap, row["caption"][0]
    else:
        raise RecipeError(f"calibration {where}: unknown row shape {sorted(row)}; expected question+answers, answer (captions), "
                          "caption (retrieval) or prompt+target")
    return {"image": image, "prompt": str(prompt), "target": str(target), "id": f"{f.name}:{i}"}


def build_calibration_set(processor, family: str, spec: CalibrationSpec, device: torch.device | str,
                          dtype: torch.dtype) -> CalibrationSet:
    """Sample ``spec.samples`` records from ``spec.source`` and turn them into model inputs."""
    records = load_records(spec.source, family)
    warnings = []
    if spec.samples > len(records):
        warnings.append(f"calib_samples={spec.samples} but the source has {len(records)} records; using all")
    chosen = random.Random(spec.seed).sample(records, min(spec.samples, len(records)))
    batches = []
    for r in chosen:
        images = []
        if r["image"] is not None:
            with Image.open(r["image"]) as im:
                images = [im.convert("RGB")]
        text = format_prompt(processor, family, r["prompt"], len(images))
        sep = "" if text.endswith((" ", "\n")) or not text else " "
        kwargs = {"text": [f"{text}{sep}{r['target']}"], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        batch = dict(processor(**kwargs))
        if batch["input_ids"].shape[1] > spec.max_seq_len and not images:
            batch = {k: v[:, : spec.max_seq_len] for k, v in batch.items()}
        batches.append({k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device)) for k, v in batch.items()})
    if spec.source in ("text",):
        warnings.append("text-only calibration: the vision encoder and connector receive no activations")
    for w in warnings:
        log.warning("calibration: %s", w)
    return CalibrationSet(batches, spec.source, len(batches), spec.seed, spec.max_seq_len, warnings)
