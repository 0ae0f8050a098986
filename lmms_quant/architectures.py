"""Where each VLM family keeps its vision encoder, connector and language model.

This module is data.  :data:`ARCHITECTURES` maps a transformers class name to
an :class:`Architecture`: for each component, the module paths that belong to
it (``roots``) and the module lists whose entries are its transformer blocks
(``blocks``).  Adding a family means adding a row, not code.

Paths are dotted module names; a root or block list that does not exist in a
given model (e.g. the T5 paths of an OPT-based BLIP-2) is ignored, but every
component must resolve to at least one module.  A ``blocks`` entry that names a
single module rather than a ``ModuleList`` (LLaVA's MLP projector) makes that
module one block.  Parameters are assigned to the component with the longest
matching root, so Qwen2-VL's merger (inside ``model.visual``) is the connector,
not the vision encoder.

Layer kinds (for ``layers=attn`` / ``layers=mlp`` recipes) are regexes over a
Linear's name relative to its block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ComponentMap", "Architecture", "ARCHITECTURES", "ATTN_PATTERN", "MLP_PATTERN", "architecture_for"]

#: Block-relative Linear names that belong to attention.
ATTN_PATTERN = r"^(self_attn|attention|crossattention|attn|self_attention|layer\.\d+\.(SelfAttention|EncDecAttention))\."
#: Block-relative Linear names that belong to the feed-forward network.
MLP_PATTERN = r"^(mlp|intermediate(_query)?|output(_query)?|fc1|fc2|feed_forward|layer\.\d+\.DenseReluDense)\b"


@dataclass(frozen=True)
class ComponentMap:
    """Module paths of one component inside a model."""

    roots: tuple[str, ...]
    blocks: tuple[str, ...]
    label: str = ""


@dataclass(frozen=True)
class Architecture:
    """Component maps of one model class; a component may be absent (``None``)."""

    family: str
    vit: ComponentMap | None
    connector: ComponentMap | None
    llm: ComponentMap | None
    attn_pattern: str = ATTN_PATTERN
    mlp_pattern: str = MLP_PATTERN
    notes: str = field(default="", compare=False)


def _cm(roots, blocks, label=""):
    return ComponentMap(tuple(roots), tuple(blocks), label)


_LLAVA = dict(
    vit=_cm(["model.vision_tower"], ["model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers"], "vision tower"),
    connector=_cm(["model.multi_modal_projector", "model.image_newline"], ["model.multi_modal_projector"], "MLP projector"),
    llm=_cm(["model.language_model", "lm_head"], ["model.language_model.layers"], "language model"),
)
_QWEN2VL = dict(
    vit=_cm(["model.visual"], ["model.visual.blocks"], "vision transformer"),
    connector=_cm(["model.visual.merger"], ["model.visual.merger"], "patch merger"),
    llm=_cm(["model.language_model", "lm_head"], ["model.language_model.layers"], "language model"),
)
_IDEFICS3 = dict(
    vit=_cm(["model.vision_model"], ["model.vision_model.encoder.layers"], "vision encoder"),
    connector=_cm(["model.connector"], ["model.connector"], "pixel-shuffle connector"),
    llm=_cm(["model.text_model", "lm_head"], ["model.text_model.layers"], "language model"),
)
_BLIP2_VIT = _cm(["vision_model"], ["vision_model.encoder.layers"], "ViT")

ARCHITECTURES: dict[str, Architecture] = {
    "Blip2ForConditionalGeneration": Architecture(
        family="blip2",
        vit=_BLIP2_VIT,
        connector=_cm(["qformer", "query_tokens", "language_projection"], ["qformer.encoder.layer"], "Q-Former"),
        llm=_cm(
            ["language_model"],
            ["language_model.model.decoder.layers", "language_model.encoder.block", "language_model.decoder.block"],
            "language model (OPT or Flan-T5)",
        ),
    ),
    "Blip2ForImageTextRetrieval": Architecture(
        family="blip2_itm",
        vit=_BLIP2_VIT,
        connector=_cm(
            ["qformer", "query_tokens", "embeddings", "vision_projection", "text_projection", "itm_head"],
            ["qformer.encoder.layer"],
            "Q-Former",
        ),
        llm=None,
        notes="Image-text matching model: no language model.",
    ),
    "LlavaForConditionalGeneration": Architecture(family="llava", **_LLAVA),
    "LlavaNextForConditionalGeneration": Architecture(family="llava_next", **_LLAVA),
    "LlavaOnevisionForConditionalGeneration": Architecture(family="llava_onevision", **_LLAVA),
    "Qwen2VLForConditionalGeneration": Architecture(family="qwen2_vl", **_QWEN2VL),
    "Qwen2_5_VLForConditionalGeneration": Architecture(family="qwen2_5_vl", **_QWEN2VL),
    "Idefics3ForConditionalGeneration": Architecture(family="idefics3", **_IDEFICS3),
    "SmolVLMForConditionalGeneration": Architecture(family="smolvlm", **_IDEFICS3),
    "CLIPModel": Architecture(
        family="clip",
        vit=_cm(["vision_model"], ["vision_model.encoder.layers"], "image encoder"),
        connector=_cm(["visual_projection", "text_projection", "logit_scale"], ["visual_projection", "text_projection"], "projections"),
        llm=_cm(["text_model"], ["text_model.encoder.layers"], "text encoder"),
        notes="Dual encoder: the 'llm' slot is the text encoder.",
    ),
    "SiglipModel": Architecture(
        family="siglip",
        vit=_cm(["vision_model"], ["vision_model.encoder.layers"], "image encoder"),
        connector=_cm(["vision_model.head", "text_model.head", "logit_scale", "logit_bias"], ["vision_model.head", "text_model.head"], "pooling heads"),
        llm=_cm(["text_model"], ["text_model.encoder.layers"], "text encoder"),
        notes="Dual encoder: the 'llm' slot is the text encoder.",
    ),
}


def architecture_for(model) -> Architecture | None:
    """The table row for ``model``'s class (or a parent class), or ``None``."""
    for cls in type(model).__mro__:
        if cls.__name__ in ARCHITECTURES:
            return ARCHITECTURES[cls.__name__]
    return None
