"""Train a zoo VLM from scratch on the world, on the CPU, deterministically.

``python -m lmms_quant.zoo.train --model toy-llava [--steps N] [--out DIR] [--threads 1]``

(``--model toy-blip2-itm`` trains the retrieval model: :mod:`lmms_quant.zoo.train_itm`.)

Two stages.  **Stage 1** trains the vision tower alone with dense supervision
from the world's ground truth: a linear probe (discarded afterwards) on every
patch token of the tower's last layer predicts the colour, shape and size of the
object covering that patch (or background).  Learning shapes only through the
language-model loss was the bottleneck (shape stayed at chance after 3,600 steps);
per-patch labels teach it in a few hundred steps.  **Stage 2** trains the whole
VLM on captioning and VQA, keeping the dense loss (weight ``aux_weight``) on the
tower so its features stay grounded.

In stage 2, each step draws a fresh batch of train-split items (item ``step * B + j``), so
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
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lmms_quant.world import COLOURS, IMAGE_SIZE, SHAPES, SIZES, make_item
from lmms_quant.world.scene import Scene, object_masks
from lmms_quant.zoo import evaluate as ev
from lmms_quant.zoo.schedule import Schedule, lr_at
from lmms_quant.zoo.tokenizer import build_tokenizer
from lmms_quant.zoo.toy_llava import (
    CAPTION_PROMPT,
    FOLLOWUP_VQA_PROMPT,
    VQA_PROMPT,
    ToyLlavaSpec,
    build_model,
    build_processor,
    encode_examples,
    pixel_values,
)
from lmms_quant.zoo.train_itm import ItmRecipe, finish_itm, train_toy_blip2_itm

__all__ = ["RECIPES", "Recipe", "lr_at", "patch_labels", "train_toy_llava"]

MODELS_DIR = Path(__file__).resolve().parent / "models"
GOAL_VQA = 0.90  # full-precision VQA accuracy the zoo's generative models should reach
GOAL_W2_DROP = 0.20  # VQA points 2-bit RTN on the LLM or the vision encoder should cost
MAX_FP32_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Recipe(Schedule):
    """toy-llava's recipe: the shared :class:`~lmms_quant.zoo.schedule.Schedule` plus its examples' make-up."""

    caption_fraction: float = 0.3
    vqa_turns: int = 1  # questions of the item per example (LLaVA multi-turn); a caption turn may come first
    spec: ToyLlavaSpec = field(default_factory=ToyLlavaSpec)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vqa_turns < 1:
            raise ValueError(f"vqa_turns must be >= 1, got {self.vqa_turns}")
        if not 0.0 <= self.caption_fraction <= 1.0:
            raise ValueError(f"caption_fraction must be in [0, 1], got {self.caption_fraction}")


# toy-llava: a 4-layer language model (2 layers learned single-object questions but
# stalled at 0.65 VQA by step 1,800, with relative-position questions near 0.3).
RECIPES: dict[str, Recipe | ItmRecipe] = {
    "toy-llava": Recipe(steps=3600, eval_every=600, vqa_turns=3, spec=ToyLlavaSpec(text_layers=4)),
    "toy-blip2-itm": ItmRecipe(),
}


# Dense labels: colour (6 + background), shape (3 + background), size (2 + background).
_COLOURS, _SHAPES, _SIZES = list(COLOURS), list(SHAPES), list(SIZES)
DENSE_CLASSES = (len(_COLOURS) + 1, len(_SHAPES) + 1, len(_SIZES) + 1)
MIN_COVER = 0.25  # a patch belongs to an object that covers at least this share of it


def patch_labels(scene: Scene, patch_size: int) -> np.ndarray:
    """``(n_patches, 3)`` int64 labels (colour, shape, size) in row-major patch order.

    A patch takes the attributes of the object covering most of its pixels, if that
    object covers at least ``MIN_COVER`` of them; otherwise the background class
    (the last index of each attribute).
    """
    g = IMAGE_SIZE // patch_size
    background = [n - 1 for n in DENSE_CLASSES]
    labels = np.tile(np.array(background, dtype=np.int64), (g * g, 1))
    masks = object_masks(scene)  # (n_objects, 64, 64)
    if not len(masks):
        return labels
    cover = masks.reshape(len(masks), g, patch_size, g, patch_size).sum(axis=(2, 4)).reshape(len(masks), -1)
    best = cover.argmax(axis=0)
    enough = cover.max(axis=0) >= MIN_COVER * patch_size * patch_size
    for k, obj in enumerate(scene.objects):
        sel = enough & (best == k)
        labels[sel] = (_COLOURS.index(obj.colour), _SHAPES.index(obj.shape), _SIZES.index(obj.size))
    return labels


class DenseProbe(torch.nn.Module):
    """A linear probe from each patch token to the three attribute logits (training only)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(hidden, sum(DENSE_CLASSES))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.proj(tokens).split(DENSE_CLASSES, dim=-1)
        return sum(
            torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), labels[..., k].reshape(-1)) for k, z in enumerate(logits)
        ) / len(logits)

    @torch.no_grad()
    def accuracy(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Per-attribute accuracy on the patches that belong to an object."""
        logits = self.proj(tokens).split(DENSE_CLASSES, dim=-1)
        fg = labels[..., 0] < DENSE_CLASSES[0] - 1
        names = ("colour", "shape", "size")
        return {n: float((z.argmax(-1) == labels[..., k])[fg].float().mean()) for k, (n, z) in enumerate(zip(names, logits))}


def _patch_tokens(vision_tower, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's last-layer patch tokens (CLS dropped): what LLaVA feeds its projector."""
    return vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]


def training_batch(step: int, recipe: Recipe) -> tuple[list[np.ndarray], list[list[tuple[str, str]]], torch.Tensor]:
    """Images, conversations and dense patch labels of one stage-2 step; a pure function of ``(step, recipe)``.

    With probability ``caption_fraction`` a conversation opens with a captioning turn
    (one of the five references) and then asks ``vqa_turns - 1`` of the item's
    questions; otherwise it asks ``vqa_turns`` of them (in a random order, fewer if
    the item has fewer).
    """
    rng = np.random.default_rng(np.random.SeedSequence(entropy=recipe.seed, spawn_key=(step,)))
    images, conversations, dense = [], [], []
    for j in range(recipe.batch_size):
        item = make_item("train", step * recipe.batch_size + j, recipe.world_seed)
        images.append(item.image)
        dense.append(patch_labels(item.scene, recipe.spec.patch_size))
        turns: list[tuple[str, str]] = []
        n_questions = recipe.vqa_turns
        if rng.random() < recipe.caption_fraction:
            turns.append((CAPTION_PROMPT, item.captions[int(rng.integers(len(item.captions)))]))
            n_questions -= 1
        for k in rng.permutation(len(item.questions))[:n_questions]:
            q = item.questions[int(k)]
            prompt = FOLLOWUP_VQA_PROMPT if turns else VQA_PROMPT
            turns.append((prompt.format(question=q.question), q.answer))
        conversations.append(turns)
    return images, conversations, torch.from_numpy(np.stack(dense))


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


VISION_INDEX_OFFSET = 10_000_000  # stage-1 images are train items from here on (stage 2 starts at 0)


def train_vision(
    tower: torch.nn.Module,
    probe: DenseProbe,
    recipe: Recipe,
    log: Callable[[str], None] = print,
    device: str = "cpu",
) -> list[dict]:
    """Stage 1: the vision tower and the dense probe alone; returns the learning curve.

    Images are train-split items ``VISION_INDEX_OFFSET + step * B + j`` (disjoint
    from stage 2's); warm-up then cosine like stage 2, with ``vision_lr``.
    """
    if recipe.vision_steps == 0:
        return []
    params = [*tower.parameters(), *probe.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.vision_lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    schedule = Schedule(
        steps=recipe.vision_steps,
        lr=recipe.vision_lr,
        warmup=min(recipe.warmup, recipe.vision_steps),
        min_lr_ratio=recipe.min_lr_ratio,
    )
    held_out = [make_item("calibration", i, recipe.world_seed) for i in range(recipe.eval_items)]
    held_x = pixel_values([it.image for it in held_out]).to(device)
    held_y = torch.from_numpy(np.stack([patch_labels(it.scene, recipe.spec.patch_size) for it in held_out])).to(device)
    curve, losses, t0 = [], [], time.time()
    B = recipe.vision_batch_size
    for step in range(recipe.vision_steps):
        tower.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        items = [make_item("train", VISION_INDEX_OFFSET + step * B + j, recipe.world_seed) for j in range(B)]
        x = pixel_values([it.image for it in items]).to(device)
        y = torch.from_numpy(np.stack([patch_labels(it.scene, recipe.spec.patch_size) for it in items])).to(device)
        loss = probe.loss(_patch_tokens(tower, x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == recipe.vision_steps:
            tower.eval()
            with torch.no_grad():
                acc = probe.accuracy(_patch_tokens(tower, held_x), held_y)
            point = {"step": step + 1, "seconds": round(time.time() - t0, 1), "loss": float(np.mean(losses[-100:]))}
            point.update({k: round(v, 4) for k, v in acc.items()})
            curve.append(point)
            log("stage 1 " + json.dumps(point))
    return curve


def train_toy_llava(recipe: Recipe, out: Path | None, log: Callable[[str], None] = print, device: str = "cpu") -> dict:
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
    eval_vqa, eval_caps = _eval_rows(recipe)
    t0 = time.time()
    probe = DenseProbe(spec.vision_hidden).to(device)  # created after the model: the seed fixes both
    vision_curve = train_vision(model.model.vision_tower, probe, recipe, log=log, device=device)
    # Stage 2: the dense loss rides on the tower's last layer inside LLaVA's own forward.
    captured: list[torch.Tensor] = []

    def capture(_module, _inputs, out) -> None:
        captured.append(out[0] if isinstance(out, tuple) else out)

    last_layer = model.model.vision_tower.encoder.layers[-1]
    hook = last_layer.register_forward_hook(capture)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": list(probe.parameters()), "weight_decay": 0.0},
        ],
        lr=recipe.lr,
        betas=recipe.betas,
    )
    curve: list[dict] = []
    losses: list[float] = []
    for step in range(recipe.steps):
        model.train()
        lr = lr_at(step, recipe)
        for group in opt.param_groups:
            group["lr"] = lr
        images, conversations, dense = training_batch(step, recipe)
        batch = encode_examples(tokenizer, conversations, spec.image_tokens)
        batch = {k: v.to(device) for k, v in batch.items()}
        captured.clear()
        lm_loss = model(pixel_values=pixel_values(images).to(device), **batch).loss
        loss = lm_loss
        if recipe.aux_weight > 0:
            loss = loss + recipe.aux_weight * probe.loss(captured[-1][:, 1:], dense.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *probe.parameters()], recipe.grad_clip)
        opt.step()
        losses.append(float(lm_loss.detach()))
        if (step + 1) % 50 == 0:
            log(f"step {step + 1}/{recipe.steps} loss {np.mean(losses[-50:]):.4f} lr {lr:.2e} {time.time() - t0:.0f}s")
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            hook.remove()  # generation must not grow the capture list
            m = ev.evaluate(model, processor, "llava", eval_vqa, eval_caps[:32])
            hook = last_layer.register_forward_hook(capture)
            point = {"step": step + 1, "seconds": round(time.time() - t0, 1), "loss": float(np.mean(losses[-50:]))}
            point.update({k: round(v, 4) for k, v in m.items() if isinstance(v, float)})
            curve.append(point)
            log("eval " + json.dumps(point))
            log("  caption: " + m["examples"][0])
    hook.remove()
    seconds = time.time() - t0
    report = {
        "model": "toy-llava",
        "parameters": n_params,
        "recipe": asdict(recipe),
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "vision_curve": vision_curve,
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


def _at_bits(accs: dict, bits: int) -> float:
    """``accs[bits]``: keys are ints in a fresh evaluation, strings once read back from JSON."""
    return accs[str(bits)] if str(bits) in accs else accs[bits]


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
        f"- {r['caption_fraction']:.0%} of the examples open with a captioning turn; each example asks"
        f" {r.get('vqa_turns', 1)} turn(s) in all (LLaVA's multi-turn format, the item's questions in a random order);"
        " loss on the answer tokens and each `</s>` only",
        f"- wall time {report['train_seconds'] / 60:.1f} min on {report['threads']} thread(s)"
        f" (torch {report['torch']}, Python {report['python']}; the machine was shared, so time varies)",
        "",
        f"## Learning curve (calibration split, first {r['eval_items']} images; VQA = official VQAv2 accuracy)",
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
            f"- VQA accuracy {fp['vqa']:.4f}; per kind: " + ", ".join(f"{k} {fp['vqa/' + k]:.3f}" for k in kinds if "vqa/" + k in fp),
            f"- captions: BLEU-4 {fp['bleu4']:.3f}, CIDEr-D {fp['cider']:.3f}, exactly one of the references {fp['caption_exact']:.1%}",
            "- example captions: " + "; ".join(f'"{c}"' for c in fp["examples"][:4]),
            "",
        ]
        titles = {"rtn": "RTN, per channel, symmetric", "uniform": "the study's uniform: per tensor, asymmetric"}
        drops: dict[str, float] = {}
        for scheme, title in titles.items():
            if scheme not in evaluation:
                continue
            group_size, sym, with_bias = ev.SCHEMES[scheme]
            args = f"group_size={group_size}, sym={sym}" + ("; biases too" if with_bias else "")
            table = evaluation[scheme]
            bits = sorted({int(b) for comp in table.values() for b in comp})
            rows = [[f"component quantized ({title})", *[f"W{b}" for b in bits]]]
            for comp, accs in table.items():
                rows.append([comp] + [f"{_at_bits(accs, b):.4f}" for b in bits])
            lines += [
                f"## VQA accuracy with one component quantized: {scheme} (full precision: {fp['vqa']:.4f})",
                "",
                "Every `nn.Linear` weight inside the component's transformer blocks (the projector: its two",
                f"linears) goes through `lmms_quant.quantizers.rtn.fake_quantize(w, bits, {args})`.",
                "",
                _table(rows),
                "",
            ]
            at2 = {c: fp["vqa"] - _at_bits(a, 2) for c, a in table.items() if c in ("vision", "llm") and ("2" in a or 2 in a)}
            if at2:
                drops[scheme] = max(at2.values())
        met_fp = fp["vqa"] >= GOAL_VQA
        lines += [
            "## Against the project's goals",
            "",
            f"- full-precision VQA {fp['vqa']:.3f} (goal >= {GOAL_VQA}): {'met' if met_fp else 'NOT met'}",
        ]
        for scheme, drop in drops.items():
            lines.append(
                f"- largest VQA loss from 2-bit {scheme} on the vision encoder or the LLM {100 * drop:.1f} points"
                f" (goal >= {100 * GOAL_W2_DROP:.0f}): {'met' if drop >= GOAL_W2_DROP else 'NOT met'}"
            )
        lines.append("")
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
        for scheme in ev.SCHEMES:
            evaluation[scheme] = ev.rtn_table(model, processor, model_type, vqa, log=log, scheme=scheme)
    (out / "evaluation.json").write_text(json.dumps(evaluation, indent=1) + "\n")
    (out / "TRAINING.md").write_text(training_md(report, evaluation))
    return evaluation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-llava", choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's stage-2 steps")
    parser.add_argument("--vision-steps", type=int, default=None, help="override the recipe's stage-1 steps")
    parser.add_argument("--aux-weight", type=float, default=None, help="override the stage-2 dense-loss weight")
    parser.add_argument("--eval-every", type=int, default=None, help="override how often the curve is measured")
    parser.add_argument("--device", default="cpu", help="cpu (the shipped models) or cuda (exploring recipes only)")
    parser.add_argument("--out", type=Path, default=None, help="default: lmms_quant/zoo/models/<model>")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation and TRAINING.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    recipe = RECIPES[args.model]
    overrides = {
        k: v
        for k, v in {
            "steps": args.steps,
            "vision_steps": args.vision_steps,
            "aux_weight": args.aux_weight,
            "eval_every": args.eval_every,
        }.items()
        if v is not None
    }
    if overrides:
        recipe = replace(recipe, **overrides)
    out = args.out or MODELS_DIR / args.model
    log = lambda s: print(s, flush=True)  # noqa: E731
    train, evaluate = (train_toy_blip2_itm, finish_itm) if isinstance(recipe, ItmRecipe) else (train_toy_llava, finish)
    train(recipe, out, log=log, device=args.device)
    if not args.no_eval:
        evaluate(out, log=log)


if __name__ == "__main__":
    main()
