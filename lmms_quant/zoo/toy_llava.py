"""toy-llava: a LLaVA-1.5-shaped VLM small enough to train on one CPU thread.

Architecture (transformers ``LlavaForConditionalGeneration``): a CLIP vision
tower over 64 x 64 images, LLaVA's two-layer GELU MLP projector, and a Llama
language model over the word-level world tokenizer.  The image enters the
prompt as one ``<image>`` token per patch (``vision_feature_select_strategy =
"default"`` drops CLS; ``vision_feature_layer = -1``).

Prompts (lmms-eval's ``llava_hf`` / the reference study's)::

    VQA:     "USER: <image>\\n{question}\\nAnswer the question using a single word or phrase. ASSISTANT:"
    caption: "USER: <image>\\nProvide a one-sentence caption for the provided image. ASSISTANT:"

and the target is ``" {answer}"`` followed by ``</s>``.  Training examples may hold
several turns (LLaVA's multi-turn format): a later turn's prompt is
:data:`FOLLOWUP_VQA_PROMPT` right after the previous turn's ``</s>``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from lmms_quant.world import IMAGE_SIZE

__all__ = [
    "CAPTION_PROMPT",
    "CLIP_MEAN",
    "CLIP_STD",
    "FOLLOWUP_VQA_PROMPT",
    "VQA_PROMPT",
    "ToyLlavaSpec",
    "build_model",
    "build_processor",
    "check_sizes",
    "encode_examples",
    "greedy_generation_config",
    "pixel_values",
]

VQA_PROMPT = "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:"
FOLLOWUP_VQA_PROMPT = " USER: {question}\nAnswer the question using a single word or phrase. ASSISTANT:"
CAPTION_PROMPT = "USER: <image>\nProvide a one-sentence caption for the provided image. ASSISTANT:"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = -100


def check_sizes(spec, parts: tuple[str, ...]) -> None:
    """Refuse a ``spec.patch_size`` that does not divide the image, or a ``spec.<part>_hidden``
    that is not a multiple of ``spec.<part>_heads`` (the zoo's specs name their sizes so)."""
    if IMAGE_SIZE % spec.patch_size:
        raise ValueError(f"patch_size must divide {IMAGE_SIZE}, got {spec.patch_size}")
    for part in parts:
        hidden, heads = getattr(spec, f"{part}_hidden"), getattr(spec, f"{part}_heads")
        if hidden % heads:
            raise ValueError(f"{part}_hidden ({hidden}) must be a multiple of {part}_heads ({heads})")


@dataclass(frozen=True)
class ToyLlavaSpec:
    """Sizes of toy-llava; every block linear of a component has the same width."""

    patch_size: int = 8
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 384
    text_hidden: int = 256
    text_layers: int = 2
    text_heads: int = 4
    text_mlp: int = 512
    max_positions: int = 256

    def __post_init__(self) -> None:
        check_sizes(self, ("vision", "text"))

    @property
    def image_tokens(self) -> int:
        return (IMAGE_SIZE // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(spec: ToyLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    """A randomly initialised toy-llava (call ``torch.manual_seed`` first)."""
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_mlp,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=spec.patch_size,
        num_channels=3,
        hidden_act="quick_gelu",
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_mlp,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=spec.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=spec.image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config = greedy_generation_config(tokenizer)
    return model


def greedy_generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """The zoo's generation defaults: greedy, at most 24 new tokens, the world tokenizer's special ids."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=24,
    )


def build_processor(spec: ToyLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """CLIP preprocessing at 64 px plus the tokenizer, with LLaVA's image-token expansion."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def pixel_values(images: list[np.ndarray]) -> torch.Tensor:
    """CLIP-normalised ``(B, 3, 64, 64)`` float32 from ``uint8 (64, 64, 3)`` arrays.

    Equals the processor's output for 64 x 64 inputs (no resize or crop happens);
    ``tests/unit/test_zoo.py`` checks this.
    """
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, conversations: list[list[tuple[str, str]]], image_tokens: int, image_first: bool = False
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for training.

    Each conversation is a list of ``(prompt, target)`` turns.  LLaVA's layout (the
    default): the first prompt holds ``<image>``, and a sequence is
    ``<s> prompt_1 target_1 </s> prompt_2 target_2 </s> ...`` with the image tokens
    expanded in place.  ``image_first`` is BLIP-2's: ``image_tokens`` image tokens
    come before ``<s>`` and no prompt holds ``<image>``.  Labels are ``-100``
    everywhere but on the target words and each ``</s>``.
    """
    image = "<image>" * image_tokens
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    rows, labels = [], []
    for turns in conversations:
        if not turns:
            raise ValueError("every conversation needs at least one (prompt, target) turn")
        if image_first and any("<image>" in prompt for prompt, _ in turns):
            raise ValueError("with image_first the image tokens go before <s>: no prompt may hold <image>")
        row: list[int] = [image_id] * image_tokens if image_first else []
        lab: list[int] = [IGNORE_INDEX] * len(row)
        for k, (prompt, target) in enumerate(turns):
            p = tokenizer(prompt.replace("<image>", image), add_special_tokens=k == 0)["input_ids"]
            t = tokenizer(" " + target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            row += p + t
            lab += [IGNORE_INDEX] * len(p) + t
        rows.append(row)
        labels.append(lab)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}
