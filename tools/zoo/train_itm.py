"""Train toy-blip2-itm (BLIP-2 image-text retrieval) on the world, on the CPU, deterministically.

Run through the zoo's one entry point: ``python -m tools.zoo.train --model toy-blip2-itm``.

**Stage 1** is toy-llava's: the ViT alone with the dense per-patch attribute
loss (:func:`tools.zoo.train.train_vision`).  **Stage 2** is BLIP-2's
representation stage without its captioning loss: image-text contrast (ITC,
learnable temperature) and image-text matching (ITM, one hard negative text per
image and one hard negative image per text, drawn from the ITC similarities),
plus the dense loss on the ViT (weight ``aux_weight``).

A batch is ``batch_size`` consecutive train-split items (fresh ones every step);
the world makes every odd item a twin of the even one before it (one attribute of
one object changed), so each batch holds hard negatives by construction.  Each
image comes with one of its five retrieval captions (``Item.retrieval_captions``,
the Flickr30k-style texts the retrieval task scores) and, with ``foils`` (the
default), one foil caption: the same template said of its scene with one attribute
of one object changed or two objects swapped (:func:`lmms_quant.world.foil_captions`,
FOIL-COCO's and NegCLIP's hard negative texts).  A foil joins every image's
image-to-text softmax in ITC and is one more ITM negative of its image; in-batch
negatives alone (twins included) leave the ITM head unable to bind attributes to
objects on a 500-image gallery.  A caption that is also, word for word, a caption
of another image in the batch counts as a positive of both
(:func:`~lmms_quant.zoo.toy_blip2_itm.caption_key`), so ITC never pushes a true
caption away and ITM never draws it as a negative.

The learning curve is LAVIS's two-stage retrieval (ITC, then ITM + ITC on each
query's ``k_test`` best candidates, :func:`lmms_quant.retrieval.blip2_itm_retrieval`,
the code lmms-eval runs through ``quant_vlm``) on the first ``eval_items``
calibration images and their captions.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lmms_quant.world import foil_captions, make_item
from lmms_quant.zoo.toy_blip2_itm import (
    ToyItmSpec,
    build_model,
    build_processor,
    caption_key,
    encode_images,
    encode_texts,
    itc_loss,
    itc_similarity,
    itm_loss,
)
from lmms_quant.zoo.toy_llava import pixel_values

from . import scoring as ev
from .schedule import Schedule, lr_at
from .tokenizer import build_tokenizer
from .vision import DenseProbe, dense_classes, markdown_table, patch_labels, save_training, train_vision

__all__ = [
    "GOAL_R1",
    "ItmRecipe",
    "evaluate_itm",
    "finish_itm",
    "is_itm",
    "recall_ceiling",
    "retrieval_metrics",
    "rtn_recall_table",
    "train_toy_blip2_itm",
    "training_batch",
]

GOAL_R1 = 70.0  # R@1 (percent) both ways the zoo's retrieval model should reach
GOAL_W8_DROP = 1.0  # 8-bit RTN within one point
COMPONENTS = ("vision", "projector")  # the ViT and the Q-Former (evaluate.COMPONENT_BLOCKS["blip-2"])


#: An item's texts by :attr:`ItmRecipe.captions`.
CAPTION_SETS = {"retrieval": lambda item: item.retrieval_captions, "reference": lambda item: item.captions}


@dataclass(frozen=True)
class ItmRecipe(Schedule):
    """toy-blip2-itm's recipe: the shared :class:`~tools.zoo.schedule.Schedule` plus ITC and ITM settings."""

    steps: int = 2400
    batch_size: int = 32
    lr: float = 5e-4
    eval_every: int = 400
    eval_items: int = 128  # calibration images of the learning curve (5 captions each)
    temperature: float = 0.07  # initial ITC temperature (learned, clamped to [0.01, 0.5], as BLIP)
    itm_weight: float = 1.0
    foils: bool = True  # one foil caption per image (world.foil_captions): an extra ITC text and ITM negative
    foil_moves: float = 0.0  # the chance that a foil moves one object (a region or relation changes) instead
    # which of each image's texts it trains on: "retrieval" (Item.retrieval_captions, what the retrieval
    # task scores) or "reference" (Item.captions, the captioning references; the first toy-blip2-itm's)
    captions: str = "retrieval"
    eval_k_test: int = 16
    spec: ToyItmSpec = field(default_factory=ToyItmSpec)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 2 or self.batch_size % 2:
            raise ValueError(f"batch_size must be an even number >= 2 (twins stay together), got {self.batch_size}")
        if not 0.01 <= self.temperature <= 0.5:
            raise ValueError(f"temperature must be in [0.01, 0.5], got {self.temperature}")
        if self.itm_weight < 0:
            raise ValueError(f"itm_weight must be >= 0, got {self.itm_weight}")
        if self.captions not in CAPTION_SETS:
            raise ValueError(f"captions must be one of {sorted(CAPTION_SETS)}, got {self.captions!r}")
        if self.foils and self.captions != "retrieval":
            raise ValueError("foils are retrieval captions of a changed scene: they need captions='retrieval'")
        if not 0.0 <= self.foil_moves <= 1.0:
            raise ValueError(f"foil_moves is a probability in [0, 1], got {self.foil_moves}")
        if self.foil_moves and not self.foils:
            raise ValueError("foil_moves shapes the foil captions: it needs foils=True")


_FOIL_MOVE_TRIES = 64  # draws of a moved foil before an image's foil changes an attribute instead


def training_batch(step: int, recipe: ItmRecipe) -> tuple[list, list[str], torch.Tensor, torch.Tensor]:
    """Images, texts, ``positive`` and dense patch labels of one step.

    A pure function of ``(step, recipe)``.  ``texts`` holds one of each image's five
    captions (``recipe.captions``: by default the retrieval captions, the ones the
    retrieval task scores) and then, with
    ``recipe.foils``, one foil caption per image: the same template for a scene with
    one attribute changed, two objects swapped or (``recipe.foil_moves``) one object
    moved (:func:`lmms_quant.world.foil_captions`).
    ``positive`` is ``(B, len(texts))``: ``positive[i, t]`` where text ``t`` is one of
    image ``i``'s captions (up to the world's free word choices).
    """
    rng = np.random.default_rng(np.random.SeedSequence(entropy=recipe.seed, spawn_key=(1, step)))
    items = [make_item("train", step * recipe.batch_size + j, recipe.world_seed) for j in range(recipe.batch_size)]
    own = [CAPTION_SETS[recipe.captions](it) for it in items]
    picks = [int(rng.integers(len(c))) for c in own]
    texts = [c[k] for c, k in zip(own, picks)]
    keys = [{caption_key(c) for c in captions} for captions in own]
    if recipe.foils:
        for it, k, true_keys in zip(items, picks, keys):
            foil, tries = foil_captions(it, rng, recipe.foil_moves)[k], 1
            while caption_key(foil) in true_keys:  # a foil must be false of its image (a moved object can stay put)
                # some layouts leave no place where a move changes the description: then attributes or a swap
                foil, tries = foil_captions(it, rng, recipe.foil_moves if tries < _FOIL_MOVE_TRIES else 0.0)[k], tries + 1
            texts.append(foil)
    positive = torch.tensor([[caption_key(c) in keys[i] for c in texts] for i in range(len(items))])
    dense = torch.from_numpy(np.stack([patch_labels(it.scene, recipe.spec.patch_size, recipe.dense_position_bins) for it in items]))
    return [it.image for it in items], texts, positive, dense


def _retrieval_rows(split: str, n: int, world_seed: int) -> list[dict]:
    from lmms_quant.world.export import retrieval_rows

    rows = []
    for i in range(n):
        item = make_item(split, i, world_seed)
        rows.extend({**row, "image": Image.fromarray(item.image)} for row in retrieval_rows(item))
    return rows


@torch.no_grad()
def retrieval_metrics(model, processor, rows: Sequence[dict], k_test: int = 16, batch_size: int = 64) -> dict[str, float]:
    """Recall@1/5/10 both ways (percent) of LAVIS two-stage retrieval over ``rows``
    (each an ``image`` with its ``caption`` list), exactly as ``quant_vlm`` scores it."""
    from lmms_quant.metrics import recall_at_k
    from lmms_quant.retrieval import blip2_itm_retrieval

    model.eval()
    images = [r["image"] for r in rows]
    captions = [c for r in rows for c in r["caption"]]
    owner = [i for i, r in enumerate(rows) for _ in r["caption"]]
    i2t, t2i = blip2_itm_retrieval(model, processor, images, captions, k_test=k_test, batch_size=batch_size)
    a, b = recall_at_k(i2t, owner), recall_at_k(t2i, owner)
    out = {k: v for k, v in a.items() if k.startswith("i2t")} | {k: v for k, v in b.items() if k.startswith("t2i")}
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def train_toy_blip2_itm(recipe: ItmRecipe, out: Path | None, log: Callable[[str], None] = print, device: str = "cpu") -> dict:
    """Train toy-blip2-itm with ``recipe``; save to ``out`` (unless None); return the report."""
    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer(image_token_attribute=False)  # see build_tokenizer: a Blip2Processor bug
    spec = recipe.spec
    model = build_model(spec, tokenizer).to(device)
    processor = build_processor(spec, tokenizer)
    text_tok = copy.copy(tokenizer)
    text_tok.padding_side = "right"
    n_params = sum(p.numel() for p in model.parameters())
    log(f"toy-blip2-itm: {n_params:,} parameters, {spec.image_tokens} ViT tokens, {spec.num_query_tokens} queries, vocab {len(tokenizer)}")
    eval_rows = _retrieval_rows("calibration", recipe.eval_items, recipe.world_seed)
    t0 = time.time()
    probe = DenseProbe(spec.vision_hidden, dense_classes(recipe.dense_position_bins)).to(device)
    vision_curve = train_vision(model.vision_model, probe, recipe, log=log, device=device)
    log_temp = torch.nn.Parameter(torch.tensor(math.log(recipe.temperature), device=device))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": [*probe.parameters(), log_temp], "weight_decay": 0.0},
        ],
        lr=recipe.lr,
        betas=recipe.betas,
    )
    generator = torch.Generator(device=device).manual_seed(recipe.seed)
    curve: list[dict] = []
    parts: list[tuple[float, float]] = []
    for step in range(recipe.steps):
        model.train()
        lr = lr_at(step, recipe)
        for group in opt.param_groups:
            group["lr"] = lr
        images, texts, positive, dense = training_batch(step, recipe)
        b = len(images)
        enc = text_tok(texts, padding=True, truncation=True, max_length=spec.max_text_len, return_tensors="pt").to(device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        positive = positive.to(device)
        vit, patches, image_feats = encode_images(model, pixel_values(images).to(device))
        text_feats = encode_texts(model, ids, mask)
        sim = itc_similarity(image_feats, text_feats)
        temperature = log_temp.exp().clamp(0.01, 0.5)
        l_itc = itc_loss(sim, positive, temperature, foils=len(texts) - b)
        foil = {"foil_ids": ids[b:], "foil_mask": mask[b:]} if len(texts) > b else {}
        l_itm = itm_loss(model, vit, ids[:b], mask[:b], sim[:, :b].detach(), positive[:, :b], generator, **foil)
        loss = l_itc + recipe.itm_weight * l_itm
        if recipe.aux_weight > 0:
            loss = loss + recipe.aux_weight * probe.loss(patches, dense.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *probe.parameters()], recipe.grad_clip)
        opt.step()
        parts.append((float(l_itc.detach()), float(l_itm.detach())))
        if (step + 1) % 50 == 0:
            itc, itm = np.mean(parts[-50:], axis=0)
            log(
                f"step {step + 1}/{recipe.steps} itc {itc:.4f} itm {itm:.4f} temp {float(temperature.detach()):.4f} lr {lr:.2e} {time.time() - t0:.0f}s"
            )
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            m = retrieval_metrics(model, processor, eval_rows, k_test=recipe.eval_k_test)
            itc, itm = np.mean(parts[-50:], axis=0)
            point = {"step": step + 1, "seconds": round(time.time() - t0, 1), "itc": float(itc), "itm": float(itm)}
            point.update({k: round(v, 2) for k, v in m.items()})
            curve.append(point)
            log("eval " + json.dumps(point))
    seconds = time.time() - t0
    report = {
        "model": "toy-blip2-itm",
        "parameters": n_params,
        "recipe": asdict(recipe),
        "temperature": float(log_temp.exp().clamp(0.01, 0.5)),
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "vision_curve": vision_curve,
        "curve": curve,
    }
    return save_training(model, processor, report, out, log)


def rtn_recall_table(
    model,
    processor,
    rows: Sequence[dict],
    k_test: int,
    bits: Sequence[int] = (2, 3, 4, 8),
    scheme: str = "rtn",
    log: Callable[[str], None] = print,
) -> dict[str, dict[int, dict[str, float]]]:
    """Recall with one component (ViT or Q-Former) fake-quantized in ``scheme`` at each bit width."""

    def score(q) -> dict[str, float]:
        m = retrieval_metrics(q, processor, rows, k_test=k_test)
        return {k: m[k] for k in ("i2t_R@1", "t2i_R@1", "mean_recall")}

    return ev.component_table(model, "blip-2", score, bits, COMPONENTS, scheme, log)


def recall_ceiling(rows: Sequence[dict]) -> dict[str, float]:
    """The best R@1 (percent) any model can expect on ``rows`` when a caption that is
    also (word for word, :func:`caption_key`) a caption of k images is matched to one
    of them at random: t2i scores ``1/k`` for it; an image scores its best caption's ``1/k``.
    """
    owners: dict[str, set[int]] = {}
    for i, r in enumerate(rows):
        for c in r["caption"]:
            owners.setdefault(caption_key(c), set()).add(i)
    t2i = [1 / len(owners[caption_key(c)]) for r in rows for c in r["caption"]]
    i2t = [max(1 / len(owners[caption_key(c)]) for c in r["caption"]) for r in rows]
    return {"i2t_R@1": 100 * float(np.mean(i2t)), "t2i_R@1": 100 * float(np.mean(t2i))}


def training_md(report: dict, evaluation: dict | None) -> str:
    r = report["recipe"]
    lines = [
        f"# {report['model']}",
        "",
        "Trained from scratch on the synthetic world (`lmms_quant.world`) by",
        f"`python -m tools.zoo.train --model {report['model']}` (one CPU thread, deterministic).",
        "",
        "## Recipe",
        "",
        f"- parameters: {report['parameters']:,}; weights stored as {report.get('saved_dtype', 'float32')}",
        f"- architecture (`Blip2ForImageTextRetrieval`): {json.dumps(r['spec'])}",
        f"- seed {r['seed']}, world seed {r['world_seed']}; stage 1 (ViT, dense per-patch labels"
        + (f" with the object centre's column and row in {r['dense_position_bins']} bins each" if r.get("dense_position_bins") else "")
        + f") {r['vision_steps']} steps of"
        f" batch {r['vision_batch_size']}; stage 2 (ITC + ITM + dense) {r['steps']} steps of batch {r['batch_size']}"
        f" consecutive train items (twins together), one of five {r.get('captions', 'reference')} captions each"
        + (", and one foil caption per image (the same template, one attribute changed or two objects swapped"
           + (f"; {r['foil_moves']:.0%} of them move an object instead" if r.get("foil_moves") else "")
           + ") as an extra ITC text and ITM negative" if r.get("foils") else ""),
        f"- AdamW lr {r['lr']}, betas {tuple(r['betas'])}, weight decay {r['weight_decay']}, {r['warmup']} warm-up steps then"
        f" cosine to {r['min_lr_ratio']} x lr, grad-norm clip {r['grad_clip']}; ITC temperature learned from"
        f" {r['temperature']} (final {report['temperature']:.4f}); ITM weight {r['itm_weight']}, dense weight {r['aux_weight']}",
        f"- wall time {report['train_seconds'] / 60:.1f} min on {report['threads']} thread(s)"
        f" (torch {report['torch']}, Python {report['python']}; the machine was shared, so time varies)",
        "",
        f"## Learning curve (calibration split: first {r['eval_items']} images x 5 captions; LAVIS two-stage, k_test {r['eval_k_test']})",
        "",
    ]
    keys = ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "mean_recall")
    rows = [["step", "min", "itc loss", "itm loss", *keys]]
    for p in report["curve"]:
        rows.append([str(p["step"]), f"{p['seconds'] / 60:.1f}", f"{p['itc']:.3f}", f"{p['itm']:.3f}"] + [f"{p[k]:.1f}" for k in keys])
    lines += [markdown_table(rows), ""]
    if evaluation:
        fp, ceiling = evaluation["fp"], evaluation["ceiling"]
        lines += [
            f"## Final metrics (test split: {evaluation['n_images']} images x {evaluation['n_captions']} captions;"
            f" LAVIS two-stage, k_test {evaluation['k_test']})",
            "",
            "- " + ", ".join(f"{k} {v:.1f}" for k, v in fp.items()),
            f"- ceiling (a caption shared word for word by k test images is matched to one of them at random):"
            f" i2t_R@1 {ceiling['i2t_R@1']:.1f}, t2i_R@1 {ceiling['t2i_R@1']:.1f}",
            "",
        ]
        for scheme, title in (("rtn", "RTN, per channel, symmetric"), ("uniform", "the study's uniform: per tensor, asymmetric")):
            if scheme not in evaluation:
                continue
            table = evaluation[scheme]
            bits = sorted({int(b) for comp in table.values() for b in comp})
            head = [f"component quantized ({title})"] + [f"W{b} {d}" for b in bits for d in ("i2t", "t2i")]
            body = [
                [comp] + [f"{v[str(b)][f'{d}_R@1'] if str(b) in v else v[b][f'{d}_R@1']:.1f}" for b in bits for d in ("i2t", "t2i")]
                for comp, v in table.items()
            ]
            lines += [
                f"## R@1 with one component quantized: {scheme} (full precision: i2t {fp['i2t_R@1']:.1f}, t2i {fp['t2i_R@1']:.1f})",
                "",
                "`projector` is the Q-Former's layers (BLIP-2's connector).",
                "",
                markdown_table([head, *body]),
                "",
            ]
        met = fp["i2t_R@1"] >= GOAL_R1 and fp["t2i_R@1"] >= GOAL_R1
        lines += [
            "## Against the project's goals",
            "",
            f"- R@1 both ways >= {GOAL_R1:.0f} on the {evaluation['n_images']}-image test gallery: {'met' if met else 'NOT met'}"
            f" (i2t {fp['i2t_R@1']:.1f}, t2i {fp['t2i_R@1']:.1f}; the data's t2i ceiling is {ceiling['t2i_R@1']:.1f})",
        ]
        if "rtn" in evaluation:
            worst = max(fp[k] - (v.get("8") or v.get(8))[k] for v in evaluation["rtn"].values() for k in ("i2t_R@1", "t2i_R@1"))
            lines.append(
                f"- 8-bit RTN within {GOAL_W8_DROP:.0f} point of full precision: {'met' if worst <= GOAL_W8_DROP else 'NOT met'}"
                f" (largest loss {worst:.1f})"
            )
        lines.append("")
    return "\n".join(lines)


def is_itm(model_dir: Path) -> bool:
    """Whether the saved model in ``model_dir`` is a BLIP-2 retrieval model (no text generation)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return "Blip2ForImageTextRetrieval" in config.get("architectures", [])


def evaluate_itm(
    model_dir: Path,
    split: str = "test",
    limit: int | None = None,
    rtn: bool = False,
    bits: Sequence[int] = (2, 3, 4, 8),
    k_test: int = 16,
    log: Callable[[str], None] = print,
) -> dict:
    """Recall (and with ``rtn`` the per-component tables) of a saved retrieval model on the
    exported ``split`` of the world (the first ``limit`` images)."""
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    model = Blip2ForImageTextRetrieval.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    rows = ev.load_rows(ev.DATA_DIR / f"retrieval_{split}.jsonl", limit)
    evaluation = {"n_images": len(rows), "n_captions": sum(len(r["caption"]) for r in rows), "k_test": k_test}
    evaluation["ceiling"] = recall_ceiling(rows)
    evaluation["fp"] = retrieval_metrics(model, processor, rows, k_test=k_test)
    log(f"{split} " + json.dumps(evaluation["fp"]))
    if rtn:
        for scheme in ev.SCHEMES:
            evaluation[scheme] = rtn_recall_table(model, processor, rows, k_test, bits=bits, scheme=scheme, log=log)
    return evaluation


def finish_itm(out: Path, log: Callable[[str], None] = print, rtn: bool = True, k_test: int = 16) -> dict:
    """Evaluate the saved model on the exported test split and write ``evaluation.json`` and ``TRAINING.md``."""
    report = json.loads((out / "training_log.json").read_text())
    evaluation = evaluate_itm(out, rtn=rtn, k_test=k_test, log=log)
    (out / "evaluation.json").write_text(json.dumps(evaluation, indent=1) + "\n")
    (out / "TRAINING.md").write_text(training_md(report, evaluation))
    return evaluation
