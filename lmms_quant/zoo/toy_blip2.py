"""toy-blip2: a generative BLIP-2 (ViT, Q-Former, OPT) small enough to train on one CPU thread.

Architecture (transformers ``Blip2ForConditionalGeneration``, the study's BLIP-2
OPT family): toy-blip2-itm's ViT and Q-Former (same sizes, same 8 learned
queries), BLIP-2's linear ``language_projection`` from the queries to the
language model, and an OPT decoder (pre-norm, ReLU, learned positions, tied
input and output embeddings) over the world's word-level tokenizer.

BLIP-2's two stages: the ViT and Q-Former start from the shipped retrieval model
(:func:`init_from_itm`, BLIP-2's representation-learning stage), then the whole
model learns to caption and answer (:mod:`tools.zoo.train`, stage 2).

The processor puts the ``num_query_tokens`` image tokens before ``<s>`` (BLIP-2's
layout); the prompts are the ones ``quant_vlm`` sends a BLIP-2 model for the world
tasks (lmms-eval's default ``post_prompt``; the ``blip2`` prompt template is the
bare text)::

    VQA:     "{question}\\nAnswer the question using a single word or phrase."
    caption: "Provide a one-sentence caption for the provided image."

and the target is ``" {answer}"`` followed by ``</s>``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    OPTConfig,
    PreTrainedTokenizerFast,
)

from lmms_quant.zoo.toy_blip2_itm import Blip2Sizes, vision_qformer_configs
from lmms_quant.zoo.toy_blip2_itm import build_processor as build_itm_processor
from lmms_quant.zoo.toy_llava import check_sizes, greedy_generation_config

__all__ = [
    "CAPTION_PROMPT",
    "FOLLOWUP_VQA_PROMPT",
    "VQA_PROMPT",
    "ToyBlip2Spec",
    "build_model",
    "build_processor",
    "init_from_itm",
]

VQA_PROMPT = "{question}\nAnswer the question using a single word or phrase."
FOLLOWUP_VQA_PROMPT = " " + VQA_PROMPT
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


@dataclass(frozen=True)
class ToyBlip2Spec(Blip2Sizes):
    """Sizes of toy-blip2: toy-blip2-itm's ViT and Q-Former (:class:`Blip2Sizes`, which it
    starts from) plus the OPT language model."""

    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_mlp: int = 512
    max_positions: int = 128

    def __post_init__(self) -> None:
        check_sizes(self, ("vision", "qformer", "text"))

    @property
    def image_tokens(self) -> int:
        """Positions the image takes in the language model's input: one per query."""
        return self.num_query_tokens

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(spec: ToyBlip2Spec, tokenizer: PreTrainedTokenizerFast) -> Blip2ForConditionalGeneration:
    """A randomly initialised toy-blip2 (call ``torch.manual_seed`` first)."""
    vision, qformer = vision_qformer_configs(spec, tokenizer, use_qformer_text_input=False)
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        word_embed_proj_dim=spec.text_hidden,
        ffn_dim=spec.text_mlp,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.max_positions,
        do_layer_norm_before=True,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=spec.num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(config)
    torch.nn.init.normal_(model.query_tokens, std=0.02)
    model.generation_config = greedy_generation_config(tokenizer)
    return model


def build_processor(spec: ToyBlip2Spec, tokenizer: PreTrainedTokenizerFast) -> Blip2Processor:
    """toy-blip2-itm's processor: 64 px with CLIP mean and std, ``num_query_tokens`` image tokens first."""
    return build_itm_processor(spec, tokenizer)


def init_from_itm(model: Blip2ForConditionalGeneration, itm_dir: str | Path) -> list[str]:
    """Copy the ViT, the Q-Former (its query path) and the queries of a toy-blip2-itm into ``model``.

    Returns the names copied.  Refuses a retrieval model whose shapes differ, or one
    that lacks a tensor the generative model's vision side needs; the retrieval-only
    tensors (text embeddings, the Q-Former's text feed-forward, ITC and ITM heads)
    are left out.
    """
    path = Path(itm_dir) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no toy-blip2-itm weights at {path}; train it first: python -m tools.zoo.train --model toy-blip2-itm")
    source = load_file(str(path))
    target = model.state_dict()
    wanted = [n for n in target if n.startswith(("vision_model.", "qformer.")) or n == "query_tokens"]
    missing = [n for n in wanted if n not in source]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors the generative model needs, e.g. {missing[:3]}")
    bad = [f"{n}: {tuple(source[n].shape)} vs {tuple(target[n].shape)}" for n in wanted if source[n].shape != target[n].shape]
    if bad:
        raise ValueError(f"{path} does not match this spec's vision/Q-Former sizes: {bad[:3]}")
    with torch.no_grad():
        for n in wanted:
            target[n].copy_(source[n].to(target[n].dtype))
    return wanted
