"""Scoring a zoo VLM on the world: VQA accuracy, caption scores, per-component RTN tables
(the command line is :mod:`tools.zoo.evaluate`; retrieval models are scored by
:func:`tools.zoo.train_itm.evaluate_itm`).

* VQA: greedy answers to the lmms-eval prompt, scored with the official VQAv2
  accuracy (:func:`lmms_quant.metrics.vqa.vqa_accuracy`), overall and per kind.
* Captions: greedy captions scored with BLEU-4 and CIDEr-D (pycocoevalcap; texts
  are lower-cased and split on spaces, since every world caption is already in
  that form, so no Java PTB tokenizer is needed) and the share of captions that
  equal one of the five references.
* Quantization tables: round-to-nearest
  (:func:`lmms_quant.quantizers.rtn.fake_quantize`) on every ``nn.Linear`` weight
  inside one component's transformer blocks (for the projector: its two
  linears), the rest of the model untouched, in two schemes (:data:`SCHEMES`):
  ``rtn`` (per output channel, symmetric: lmms-quant's ``rtn``) and ``uniform``
  (per tensor, asymmetric min-max, biases rounded too: the study's baseline).

This is the zoo's own check of its models, independent of lmms-eval.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from lmms_quant.metrics.vqa import vqa_accuracy
from lmms_quant.quantizers.rtn import fake_quantize
from lmms_quant.world import KIND_OF_QUESTION_TYPE

__all__ = [
    "COMPONENT_BLOCKS",
    "SCHEMES",
    "caption_metrics",
    "component_table",
    "generate",
    "load_rows",
    "quantize_component",
    "rtn_table",
    "vqa_metrics",
]

DATA_DIR = Path(__file__).resolve().parents[2] / "tasks" / "data" / "world"
# The prompts quant_vlm sends each family for the world tasks (lmms-eval's default
# post_prompt inside the family's template), which the zoo's models are trained on.
VQA_PROMPTS = {
    "llava": "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:",
    "blip-2": "{question}\nAnswer the question using a single word or phrase.",
}
CAPTION_PROMPTS = {
    "llava": "USER: <image>\nProvide a one-sentence caption for the provided image. ASSISTANT:",
    "blip-2": "Provide a one-sentence caption for the provided image.",
}
# Where each component's transformer blocks live, per model_type (module paths of
# transformers 5.x); "projector" has no blocks, its linears are quantized directly.
COMPONENT_BLOCKS: dict[str, dict[str, str]] = {
    "llava": {
        "vision": "model.vision_tower.encoder.layers",
        "projector": "model.multi_modal_projector",
        "llm": "model.language_model.layers",
    },
    "blip-2": {
        "vision": "vision_model.encoder.layers",
        "projector": "qformer.encoder.layer",
        "llm": "language_model.model.decoder.layers",
    },
}


# The quantization schemes of the zoo's tables: (group_size, sym, round biases too).
SCHEMES: dict[str, tuple[int, bool, bool]] = {
    "rtn": (-1, True, False),  # lmms-quant's `rtn` default: per output channel, symmetric
    "uniform": (0, False, True),  # the study's baseline: per tensor, asymmetric min-max, biases too
}


def load_rows(path: Path, limit: int | None = None) -> list[dict]:
    """Rows of a JSONL file, with ``image`` opened as an RGB PIL image."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            with Image.open(path.parent / row["image"]) as im:
                row["image"] = im.convert("RGB")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


@torch.no_grad()
def generate(
    model: nn.Module,
    processor,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions (the new text only, stripped) for each image/prompt pair."""
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        inputs = processor(
            text=list(prompts[i : i + batch_size]),
            images=list(images[i : i + batch_size]),
            return_tensors="pt",
            padding=True,
        ).to(model.device)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = ids[:, inputs["input_ids"].shape[1] :]
        out.extend(t.strip() for t in processor.batch_decode(new, skip_special_tokens=True))
    return out


def vqa_metrics(rows: Sequence[dict], predictions: Sequence[str]) -> dict[str, float]:
    """Official VQA accuracy overall (``"vqa"``) and per kind (``"vqa/colour"``...)."""
    per_kind: dict[str, list[float]] = defaultdict(list)
    for row, pred in zip(rows, predictions, strict=True):
        acc = vqa_accuracy(pred, row["answers"])
        per_kind["vqa"].append(acc)
        per_kind[f"vqa/{KIND_OF_QUESTION_TYPE[row['question_type']]}"].append(acc)
    return {k: sum(v) / len(v) for k, v in sorted(per_kind.items())}


def caption_metrics(references: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """BLEU-4, CIDEr-D and exact match (prediction equals one of the references)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    def tok(s: str) -> str:
        return " ".join(s.lower().replace(",", " ,").split())

    gts = {i: [tok(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tok(p)] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    exact = sum(res[i][0] in gts[i] for i in gts) / len(gts)
    return {"bleu4": float(bleu[3]), "cider": float(cider), "caption_exact": exact}


def _component_linears(model: nn.Module, model_type: str, component: str) -> list[nn.Linear]:
    paths = COMPONENT_BLOCKS[model_type]
    if component not in paths:
        raise ValueError(f"component must be one of {sorted(paths)}, got {component!r}")
    module = model.get_submodule(paths[component])
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def quantize_component(model: nn.Module, model_type: str, component: str, bits: int, scheme: str = "rtn") -> int:
    """Fake-quantize the block linears of one component in ``scheme`` (:data:`SCHEMES`).

    Works in place; returns the number of weights quantized.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    group_size, sym, with_bias = SCHEMES[scheme]
    n = 0
    for lin in _component_linears(model, model_type, component):
        lin.weight.copy_(fake_quantize(lin.weight, bits, group_size=group_size, sym=sym))
        if with_bias and lin.bias is not None:
            lin.bias.copy_(fake_quantize(lin.bias.reshape(1, -1), bits, group_size=0, sym=False).reshape(-1))
        n += lin.weight.numel()
    return n


def evaluate(model: nn.Module, processor, model_type: str, vqa_rows: list[dict], caption_rows: list[dict]) -> dict:
    """VQA and caption metrics of ``model`` on the given rows."""
    metrics: dict[str, float] = {}
    if vqa_rows:
        prompts = [VQA_PROMPTS[model_type].format(question=r["question"]) for r in vqa_rows]
        preds = generate(model, processor, [r["image"] for r in vqa_rows], prompts, max_new_tokens=4)
        metrics.update(vqa_metrics(vqa_rows, preds))
    if caption_rows:
        prompts = [CAPTION_PROMPTS[model_type]] * len(caption_rows)
        caps = generate(model, processor, [r["image"] for r in caption_rows], prompts, max_new_tokens=24)
        metrics.update(caption_metrics([r["answer"] for r in caption_rows], caps))
        metrics["examples"] = caps[:8]
    return metrics


def rtn_table(
    model: nn.Module,
    processor,
    model_type: str,
    vqa_rows: list[dict],
    bits: Sequence[int] = (2, 3, 4, 8),
    components: Sequence[str] = ("vision", "projector", "llm"),
    log: Callable[[str], None] = print,
    scheme: str = "rtn",
) -> dict[str, dict[int, float]]:
    """VQA accuracy with one component quantized (``scheme``, :data:`SCHEMES`) at each bit width."""
    return component_table(
        model, model_type, lambda q: evaluate(q, processor, model_type, vqa_rows, [])["vqa"], bits, components, scheme, log
    )


def component_table(
    model: nn.Module,
    model_type: str,
    score: Callable[[nn.Module], Any],
    bits: Sequence[int],
    components: Sequence[str],
    scheme: str = "rtn",
    log: Callable[[str], None] = print,
) -> dict[str, dict[int, Any]]:
    """``score`` of a copy of ``model`` with one component quantized (``scheme``), per component and bit width."""
    table: dict[str, dict[int, Any]] = {}
    for comp in components:
        table[comp] = {}
        for b in bits:
            q = copy.deepcopy(model)
            quantize_component(q, model_type, comp, b, scheme)
            table[comp][b] = score(q)
            shown = f"{table[comp][b]:.4f}" if isinstance(table[comp][b], float) else json.dumps(table[comp][b])
            log(f"{scheme} {comp} w{b}: {shown}")
    return table


def load(model_dir: Path):
    """``(model, processor, model_type)`` loaded offline from ``model_dir``, fp32."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    config = AutoConfig.from_pretrained(model_dir)
    if "Blip2ForImageTextRetrieval" in (config.architectures or []):
        raise ValueError(
            f"{model_dir} is a retrieval model (Blip2ForImageTextRetrieval): it neither answers nor captions;"
            " evaluate it with tools.zoo.train_itm.evaluate_itm or `python -m tools.zoo.evaluate`"
        )
    model_type = {"llava": "llava", "blip-2": "blip-2"}[config.model_type]
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir)
    return model.eval(), processor, model_type
