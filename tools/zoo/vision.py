"""Stage 1 of every toy model: the vision tower alone, trained on dense per-patch labels of the
world's ground truth (colour, shape, size, optionally the object's centre), and the helpers that
every trainer shares (saving a model, Markdown tables).  Imported by :mod:`tools.zoo.train` and
:mod:`tools.zoo.train_itm`; imports neither."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmms_quant.world import COLOURS, IMAGE_SIZE, SHAPES, SIZES, make_item
from lmms_quant.world.scene import Scene, object_masks
from lmms_quant.zoo.toy_llava import pixel_values

from .schedule import Schedule, lr_at

MAX_FP32_BYTES = 8 * 1024 * 1024

# Dense labels: colour (6 + background), shape (3 + background), size (2 + background);
# with position bins, also the column and row of the object's centre (bins + background).
_COLOURS, _SHAPES, _SIZES = list(COLOURS), list(SHAPES), list(SIZES)
DENSE_CLASSES = (len(_COLOURS) + 1, len(_SHAPES) + 1, len(_SIZES) + 1)
MIN_COVER = 0.25  # a patch belongs to an object that covers at least this share of it


def dense_classes(position_bins: int = 0) -> tuple[int, ...]:
    """Classes per dense label column: :data:`DENSE_CLASSES`, then two of ``position_bins + 1`` if > 0."""
    return DENSE_CLASSES + ((position_bins + 1,) * 2 if position_bins > 0 else ())


def patch_labels(scene: Scene, patch_size: int, position_bins: int = 0) -> np.ndarray:
    """``(n_patches, 3)`` int64 labels (colour, shape, size) in row-major patch order.

    A patch takes the attributes of the object covering most of its pixels, if that
    object covers at least ``MIN_COVER`` of them; otherwise the background class
    (the last index of each attribute).  With ``position_bins`` > 0, two more
    columns: the bin of that object's centre column and row (``position_bins``
    equal bins across the image).
    """
    g = IMAGE_SIZE // patch_size
    classes = dense_classes(position_bins)
    background = [n - 1 for n in classes]
    labels = np.tile(np.array(background, dtype=np.int64), (g * g, 1))
    masks = object_masks(scene)  # (n_objects, 64, 64)
    if not len(masks):
        return labels
    cover = masks.reshape(len(masks), g, patch_size, g, patch_size).sum(axis=(2, 4)).reshape(len(masks), -1)
    best = cover.argmax(axis=0)
    enough = cover.max(axis=0) >= MIN_COVER * patch_size * patch_size
    for k, obj in enumerate(scene.objects):
        sel = enough & (best == k)
        row = [_COLOURS.index(obj.colour), _SHAPES.index(obj.shape), _SIZES.index(obj.size)]
        if position_bins > 0:
            row += [position_bin(obj.x, position_bins), position_bin(obj.y, position_bins)]
        labels[sel] = row
    return labels


def position_bin(v: float, bins: int) -> int:
    return min(bins - 1, int(v * bins / IMAGE_SIZE))


class DenseProbe(torch.nn.Module):
    """A linear probe from each patch token to the attribute logits (training only)."""

    def __init__(self, hidden: int, classes: tuple[int, ...] = DENSE_CLASSES) -> None:
        super().__init__()
        self.classes = tuple(classes)
        self.proj = torch.nn.Linear(hidden, sum(self.classes))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.proj(tokens).split(self.classes, dim=-1)
        return sum(
            torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), labels[..., k].reshape(-1)) for k, z in enumerate(logits)
        ) / len(logits)

    @torch.no_grad()
    def accuracy(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Per-attribute accuracy on the patches that belong to an object."""
        logits = self.proj(tokens).split(self.classes, dim=-1)
        fg = labels[..., 0] < self.classes[0] - 1
        names = ("colour", "shape", "size", "column", "row")
        return {n: float((z.argmax(-1) == labels[..., k])[fg].float().mean()) for k, (n, z) in enumerate(zip(names, logits))}


def patch_tokens(vision_tower, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's last-layer patch tokens (CLS dropped): what LLaVA feeds its projector."""
    return vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]


def save_model(model, processor, out: Path) -> str:
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
    # the learning curve's calls leave truncation and padding set on the fast tokenizer's backend, which
    # save_pretrained would write into tokenizer.json; a shipped tokenizer starts without either
    backend = processor.tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    processor.save_pretrained(out)
    return str(dtype).removeprefix("torch.")


def save_training(model, processor, report: dict, out: Path | None, log: Callable[[str], None]) -> dict:
    """Save a trained model (:func:`save_model`) and its ``training_log.json`` to ``out`` (unless None); returns ``report``."""
    if out is not None:
        report["saved_dtype"] = save_model(model.cpu(), processor, out)
        (out / "training_log.json").write_text(json.dumps(report, indent=1) + "\n")
        log(f"saved to {out}")
    return report


VISION_INDEX_OFFSET = 10_000_000  # stage-1 images are train items from here on (stage 2 starts at 0)


def train_vision(
    tower: torch.nn.Module,
    probe: DenseProbe,
    recipe: Any,
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
    held_y = torch.from_numpy(np.stack([patch_labels(it.scene, recipe.spec.patch_size, recipe.dense_position_bins) for it in held_out])).to(device)
    curve, losses, t0 = [], [], time.time()
    B = recipe.vision_batch_size
    for step in range(recipe.vision_steps):
        tower.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        items = [make_item("train", VISION_INDEX_OFFSET + step * B + j, recipe.world_seed) for j in range(B)]
        x = pixel_values([it.image for it in items]).to(device)
        y = torch.from_numpy(np.stack([patch_labels(it.scene, recipe.spec.patch_size, recipe.dense_position_bins) for it in items])).to(device)
        loss = probe.loss(patch_tokens(tower, x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == recipe.vision_steps:
            tower.eval()
            with torch.no_grad():
                acc = probe.accuracy(patch_tokens(tower, held_x), held_y)
            point = {"step": step + 1, "seconds": round(time.time() - t0, 1), "loss": float(np.mean(losses[-100:]))}
            point.update({k: round(v, 4) for k, v in acc.items()})
            curve.append(point)
            log("stage 1 " + json.dumps(point))
    return curve


def markdown_table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


