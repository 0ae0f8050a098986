"""Train a zoo VLM from scratch on the world, on the CPU, deterministically.

``python -m lmms_quant.zoo.train --model toy-llava [--steps N] [--out DIR] [--threads 1]``

Each step draws a fresh batch of train-split items (item ``step * B + j``), so
no image is seen twice; a fixed share of the examples are captioning examples
(one of the five references at random), the rest VQA (one of the item's
questions).  The loss is the cross-entropy on the answer tokens and ``</s>``
only.  AdamW with linear warm-up and cosine decay.  With one thread and
``torch.use_deterministic_algorithms(True)`` a run is bit-reproducible on the
same machine and library versions.

Progress (loss, learning rate, calibration-split VQA accuracy) is printed and
kept as the learning curve; the model, processor and a ``TRAINING.md`` are
written to ``--out`` (default: the shipped folder ``lmms_quant/zoo/models/<model>``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lmms_quant.world import DEFAULT_SEED, make_item
from lmms_quant.zoo import evaluate as ev
from lmms_quant.zoo.tokenizer import build_tokenizer
from lmms_quant.zoo.toy_llava import (
    CAPTION_PROMPT,
    VQA_PROMPT,
    ToyLlavaSpec,
    build_model,
    build_processor,
    encode_examples,
    pixel_values,
)

__all__ = ["RECIPES", "Recipe", "lr_at", "train_toy_llava"]

MODELS_DIR = Path(__file__).resolve().parent / "models"
MAX_FP32_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings; ``seed`` fixes the initialisation and the batch order."""

    steps: int = 3600
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    caption_fraction: float = 0.3
    seed: int = 0
    world_seed: int = DEFAULT_SEED
    eval_every: int = 300
    eval_items: int = 64  # calibration items for the learning curve (3 questions each)
    spec: ToyLlavaSpec = field(default_factory=ToyLlavaSpec)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 0.0 <= self.caption_fraction <= 1.0:
            raise ValueError(f"caption_fraction must be in [0, 1], got {self.caption_fraction}")


RECIPES: dict[str, Recipe] = {"toy-llava": Recipe()}


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine to ``min_lr_ratio * lr``."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    floor = recipe.min_lr_ratio
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def training_batch(step: int, recipe: Recipe) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Images, prompts and targets of one step; a pure function of ``(step, recipe)``."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy=recipe.seed, spawn_key=(step,)))
    images, prompts, targets = [], [], []
    for j in range(recipe.batch_size):
        item = make_item("train", step * recipe.batch_size + j, recipe.world_seed)
        images.append(item.image)
        if rng.random() < recipe.caption_fraction:
            prompts.append(CAPTION_PROMPT)
            targets.append(item.captions[int(rng.integers(len(item.captions)))])
        else:
            q = item.questions[int(rng.integers(len(item.questions)))]
            prompts.append(VQA_PROMPT.format(question=q.question))
            targets.append(q.answer)
    return images, prompts, targets


def _eval_rows(recipe: Recipe) -> tuple[list[dict], list[dict]]:
    """Calibration-split rows (VQA and captions) in the exported JSONL form."""
    from lmms_quant.world.export import caption_row, vqa_rows

    vqa, caps = [], []
    for i in range(recipe.eval_items):
        item = make_item("calibration", i, recipe.world_seed)
        image = Image.fromarray(item.image)
        vqa.extend({**row, "image": image} for row in vqa_rows(item))
        caps.append({**caption_row(item), "image": image})
    return vqa, caps


def _save(model, processor, out: Path) -> str:
    """Save model and processor; fp32 if it fits in 8 MB, else fp16 weights.

    The config keeps ``dtype = float32`` either way, so ``from_pretrained`` gives
    an fp32 model (fp16 weights are upcast exactly).
    """
    out.mkdir(parents=True, exist_ok=True)
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    dtype = torch.float32 if n_bytes <= MAX_FP32_BYTES else torch.float16
    model.to(dtype).save_pretrained(out)
    model.to(torch.float32)
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(out)
    return str(dtype).removeprefix("torch.")


def train_toy_llava(
    recipe: Recipe, out: Path | None, log: Callable[[str], None] = print, device: str = "cpu"
) -> dict:
    """Train toy-llava with ``recipe``; save to ``out`` (unless None); return a report.

    ``device`` other than ``"cpu"`` is for exploring recipes quickly; the shipped
    model is trained on the CPU.
    """
    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer()
    spec = recipe.spec
    model = build_model(spec, tokenizer).to(device)
    processor = build_processor(spec, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"toy-llava: {n_params:,} parameters, {spec.image_tokens} image tokens, vocab {len(tokenizer)}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=recipe.betas,
    )
    eval_vqa, eval_caps = _eval_rows(recipe)
    curve: list[dict] = []
    losses: list[float] = []
    t0 = time.time()
    for step in range(recipe.steps):
        model.train()
        lr = lr_at(step, recipe)
        for group in opt.param_groups:
            group["lr"] = lr
        images, prompts, targets = training_batch(step, recipe)
        batch = encode_examples(tokenizer, prompts, targets, spec.image_tokens)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(pixel_values=pixel_values(images).to(device), **batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            log(f"step {step + 1}/{recipe.steps} loss {np.mean(losses[-50:]):.4f} lr {lr:.2e} {time.time() - t0:.0f}s")
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            m = ev.evaluate(model, processor, "llava", eval_vqa, eval_caps[:32])
            point = {"step": step + 1, "seconds": round(time.time() - t0, 1), "loss": float(np.mean(losses[-50:]))}
            point.update({k: round(v, 4) for k, v in m.items() if isinstance(v, float)})
            curve.append(point)
            log("eval " + json.dumps(point))
            log("  caption: " + m["examples"][0])
    seconds = time.time() - t0
    report = {
        "model": "toy-llava",
        "parameters": n_params,
        "recipe": asdict(recipe),
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "curve": curve,
    }
    if out is not None:
        report["saved_dtype"] = _save(model.cpu(), processor, out)
        (out / "training_log.json").write_text(json.dumps(report, indent=1) + "\n")
        log(f"saved to {out}")
    return report


def _table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def training_md(report: dict, evaluation: dict | None) -> str:
    """The ``TRAINING.md`` of a shipped model: recipe, wall time, curve, metrics."""
    r = report["recipe"]
    lines = [
        f"# {report['model']}",
        "",
        "Trained from scratch on the synthetic world (`lmms_quant.world`) by",
        f"`python -m lmms_quant.zoo.train --model {report['model']}` (one CPU thread, deterministic).",
        "",
        "## Recipe",
        "",
        f"- parameters: {report['parameters']:,}; weights stored as {report.get('saved_dtype', 'float32')}"
        " (the config says float32: loading upcasts exactly)",
        f"- architecture: {json.dumps(r['spec'])}",
        f"- seed {r['seed']}, world seed {r['world_seed']}; {r['steps']} steps of batch {r['batch_size']}"
        f" (fresh train-split images each step, {r['steps'] * r['batch_size']:,} in all)",
        f"- AdamW lr {r['lr']}, betas {tuple(r['betas'])}, weight decay {r['weight_decay']} (not on norms, biases,"
        f" embeddings), {r['warmup']} warm-up steps then cosine to {r['min_lr_ratio']} x lr, grad-norm clip"
        f" {r['grad_clip']}",
        f"- {r['caption_fraction']:.0%} captioning examples, the rest VQA; loss on the answer tokens and `</s>` only",
        f"- wall time {report['train_seconds'] / 60:.1f} min on {report['threads']} thread(s)"
        f" (torch {report['torch']}, Python {report['python']}; the machine was shared, so time varies)",
        "",
        "## Learning curve (calibration split, first "
        f"{r['eval_items']} images; VQA = official VQAv2 accuracy)",
        "",
    ]
    kinds = ["colour", "shape", "count", "existence", "position", "size"]
    rows = [["step", "min", "loss", "VQA", *kinds, "CIDEr"]]
    for p in report["curve"]:
        rows.append(
            [str(p["step"]), f"{p['seconds'] / 60:.1f}", f"{p['loss']:.3f}", f"{p.get('vqa', 0):.3f}"]
            + [f"{p.get('vqa/' + k, 0):.2f}" for k in kinds]
            + [f"{p.get('cider', 0):.2f}"]
        )
    lines += [_table(rows), ""]
    if evaluation:
        fp = evaluation["fp"]
        lines += [
            f"## Final metrics (test split: {evaluation['n_vqa']} VQA questions, {evaluation['n_captions']} images)",
            "",
            f"- VQA accuracy {fp['vqa']:.4f}; per kind: "
            + ", ".join(f"{k} {fp['vqa/' + k]:.3f}" for k in kinds if "vqa/" + k in fp),
            f"- captions: BLEU-4 {fp['bleu4']:.3f}, CIDEr-D {fp['cider']:.3f},"
            f" exactly one of the references {fp['caption_exact']:.1%}",
            "- example captions: " + "; ".join(f"\"{c}\"" for c in fp["examples"][:4]),
            "",
        ]
        if "rtn" in evaluation:
            bits = sorted({int(b) for comp in evaluation["rtn"].values() for b in comp})
            rows = [["component quantized (RTN, per channel, symmetric)", *[f"W{b}" for b in bits]]]
            for comp, accs in evaluation["rtn"].items():
                rows.append([comp] + [f"{accs[str(b)] if str(b) in accs else accs[b]:.4f}" for b in bits])
            lines += [
                f"## VQA accuracy with one component quantized (full precision: {fp['vqa']:.4f})",
                "",
                "Every `nn.Linear` weight inside the component's transformer blocks (the projector: its two",
                "linears) goes through `lmms_quant.quantizers.rtn.fake_quantize(w, bits, group_size=-1, sym=True)`.",
                "",
                _table(rows),
                "",
            ]
    return "\n".join(lines)


def finish(out: Path, log: Callable[[str], None] = print, rtn: bool = True) -> dict:
    """Evaluate the saved model on the exported test split and write ``TRAINING.md``."""
    report = json.loads((out / "training_log.json").read_text())
    model, processor, model_type = ev.load(out)
    vqa = ev.load_rows(ev.DATA_DIR / "vqa_test.jsonl")
    caps = ev.load_rows(ev.DATA_DIR / "captions_test.jsonl")
    evaluation = {"n_vqa": len(vqa), "n_captions": len(caps)}
    evaluation["fp"] = ev.evaluate(model, processor, model_type, vqa, caps)
    log("test " + json.dumps({k: v for k, v in evaluation["fp"].items()}))
    if rtn:
        evaluation["rtn"] = ev.rtn_table(model, processor, model_type, vqa, log=log)
    (out / "evaluation.json").write_text(json.dumps(evaluation, indent=1) + "\n")
    (out / "TRAINING.md").write_text(training_md(report, evaluation))
    return evaluation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-llava", choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument("--out", type=Path, default=None, help="default: lmms_quant/zoo/models/<model>")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation and TRAINING.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    recipe = RECIPES[args.model]
    if args.steps is not None:
        recipe = Recipe(**{**asdict(recipe), "steps": args.steps, "spec": recipe.spec})
    out = args.out or MODELS_DIR / args.model
    log = lambda s: print(s, flush=True)  # noqa: E731
    train_toy_llava(recipe, out, log=log)
    if not args.no_eval:
        finish(out, log=log)


if __name__ == "__main__":
    main()
