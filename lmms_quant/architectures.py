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

__all__ = ["ComponentMap", "Architecture", "ARCHITECTURES", "LANGUAGE_MODELS", "BLOCK_CARRIES", "ATTN_PATTERN", "MLP_PATTERN", "architecture_for"]

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


#: Text-only causal LMs, studied alone (lm-eval's ``quant_llm``): the text models
#: of the VLM families above.  Only the ``llm`` component exists; ``lm_head`` is
#: part of it but, as in every VLM, stays unquantized unless an override says so.
_CAUSAL_LM = _cm(["model", "lm_head"], ["model.layers", "model.decoder.layers"], "language model")
LANGUAGE_MODELS: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(family="llama", vit=None, connector=None, llm=_CAUSAL_LM),
    "MistralForCausalLM": Architecture(family="mistral", vit=None, connector=None, llm=_CAUSAL_LM),
    "Qwen2ForCausalLM": Architecture(family="qwen2", vit=None, connector=None, llm=_CAUSAL_LM),
    "OPTForCausalLM": Architecture(family="opt", vit=None, connector=None, llm=_CAUSAL_LM),
}


def architecture_for(model) -> Architecture | None:
    """The table row for ``model``'s class (or a parent class), from
    :data:`ARCHITECTURES` or :data:`LANGUAGE_MODELS`, or ``None``."""
    for cls in type(model).__mro__:
        for table in (ARCHITECTURES, LANGUAGE_MODELS):
            if cls.__name__ in table:
                return table[cls.__name__]
    return None


# ---------------------------------------------------------------------------
# AWQ: which operation feeds which linears, per transformer block class.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AWQMapping:
    """Linears (block-relative names) that share one input, and where their AWQ
    scale is folded.

    ``prev``: the block-relative name of the norm or linear that produces the
    input with nothing non-linear in between (the scale is folded into it,
    exactly), or ``None``: the input comes from outside the block or through a
    non-linearity (GELU, SiLU...), so the scale is applied by dividing the
    input explicitly (an ``awq_input_scale`` buffer and a forward pre-hook).
    Names that a given block lacks are ignored (T5 encoder vs decoder blocks,
    Q-Former layers with and without cross-attention).

    ``inspect``: the block-relative name of the module whose output scores a
    candidate scale (llm-awq's ``module2inspect``: the attention for q/k/v, the
    MLP for its first linears; ``""`` is the block itself), or ``None``: the
    linears' own outputs (exact and cheaper, and the same thing when the linear
    is alone in what follows, as o_proj or down_proj).
    """

    prev: str | None
    linears: tuple[str, ...]
    inspect: str | None = None


def _m(prev, *linears, inspect=None):
    return AWQMapping(prev, tuple(linears), inspect)


_CLIP_LIKE = (
    _m("layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", inspect="self_attn"),
    _m("self_attn.v_proj", "self_attn.out_proj"),
    _m("layer_norm2", "mlp.fc1", inspect="mlp"),
    _m(None, "mlp.fc2"),  # after GELU: never folded
)
_LLAMA_LIKE = (
    _m("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", inspect="self_attn"),
    _m("self_attn.v_proj", "self_attn.o_proj"),  # falls back to input scaling when GQA makes the shapes differ
    _m("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", inspect="mlp"),
    _m("mlp.up_proj", "mlp.down_proj"),  # down_proj sees act(gate) * up: linear in up_proj's output
)
_T5 = (
    _m("layer.0.layer_norm", "layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v", inspect="layer.0.SelfAttention"),
    _m("layer.0.SelfAttention.v", "layer.0.SelfAttention.o"),
    _m("layer.1.layer_norm", "layer.1.EncDecAttention.q"),
    _m(None, "layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v"),
    _m("layer.1.EncDecAttention.v", "layer.1.EncDecAttention.o"),
    _m("layer.1.layer_norm", "layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1", inspect="layer.1.DenseReluDense"),
    _m(None, "layer.1.DenseReluDense.wo"),
    _m("layer.2.layer_norm", "layer.2.DenseReluDense.wi", "layer.2.DenseReluDense.wi_0", "layer.2.DenseReluDense.wi_1", inspect="layer.2.DenseReluDense"),
    _m(None, "layer.2.DenseReluDense.wo"),
)

#: Block class name -> {output index: positional input index}: what a block returns that the next block of
#: its list takes as input besides the hidden states.  T5's stack computes the relative position biases
#: (self-attention, and cross-attention in the decoder) in its first block and hands them on; a driver that
#: runs the blocks one by one must do the same, or every later block attends without position bias.
BLOCK_CARRIES: dict[str, dict[int, int]] = {"T5Block": {1: 2, 2: 5}}

#: Block class name -> AWQ mappings.  A block class missing here cannot use AWQ.
AWQ_MAPPINGS: dict[str, tuple[AWQMapping, ...]] = {
    "CLIPEncoderLayer": _CLIP_LIKE,
    "SiglipEncoderLayer": _CLIP_LIKE,
    "Idefics3EncoderLayer": _CLIP_LIKE,
    "SmolVLMEncoderLayer": _CLIP_LIKE,
    "Blip2EncoderLayer": (
        _m("layer_norm1", "self_attn.qkv", inspect="self_attn"),
        _m(None, "self_attn.projection"),
        _m("layer_norm2", "mlp.fc1", inspect="mlp"),
        _m(None, "mlp.fc2"),
    ),
    "LlamaDecoderLayer": _LLAMA_LIKE,
    "Qwen2DecoderLayer": _LLAMA_LIKE,
    "Qwen2VLDecoderLayer": _LLAMA_LIKE,
    "Qwen2_5_VLDecoderLayer": _LLAMA_LIKE,
    "MistralDecoderLayer": _LLAMA_LIKE,
    "OPTDecoderLayer": (
        _m("self_attn_layer_norm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", inspect="self_attn"),
        _m("self_attn.v_proj", "self_attn.out_proj"),
        _m("final_layer_norm", "fc1"),  # fc1 and fc2 sit in the block itself: fc1 is scored alone, as llm-awq does
        _m(None, "fc2"),
    ),
    "T5Block": _T5,
    "Blip2QFormerLayer": (  # post-LN layers: every input comes from outside the block or through attention
        _m(None, "attention.attention.query", "attention.attention.key", "attention.attention.value"),
        _m("attention.attention.value", "attention.output.dense"),
        _m(None, "crossattention.attention.query"),
        _m(None, "crossattention.attention.key", "crossattention.attention.value"),
        _m("crossattention.attention.value", "crossattention.output.dense"),
        _m(None, "intermediate_query.dense"),
        _m(None, "output_query.dense"),
        _m(None, "intermediate.dense"),
        _m(None, "output.dense"),
    ),
    "Qwen2VLVisionBlock": (
        _m("norm1", "attn.qkv", inspect="attn"),
        _m(None, "attn.proj"),
        _m("norm2", "mlp.fc1", inspect="mlp"),
        _m(None, "mlp.fc2"),
    ),
    "Qwen2_5_VLVisionBlock": (
        _m("norm1", "attn.qkv", inspect="attn"),
        _m(None, "attn.proj"),
        _m("norm2", "mlp.gate_proj", "mlp.up_proj", inspect="mlp"),
        _m("mlp.up_proj", "mlp.down_proj"),
    ),
    "LlavaMultiModalProjector": (_m(None, "linear_1", inspect=""), _m(None, "linear_2")),
    "LlavaNextMultiModalProjector": (_m(None, "linear_1", inspect=""), _m(None, "linear_2")),
    "LlavaOnevisionMultiModalProjector": (_m(None, "linear_1", inspect=""), _m(None, "linear_2")),
    "Qwen2VLPatchMerger": (_m(None, "mlp.0", inspect="mlp"), _m(None, "mlp.2")),
    "PatchMerger": (_m(None, "mlp.0", inspect="mlp"), _m(None, "mlp.2")),
    "Qwen2_5_VLPatchMerger": (_m(None, "mlp.0", inspect="mlp"), _m(None, "mlp.2")),
    "Idefics3Connector": (_m(None, "modality_projection.proj"),),
    "SmolVLMConnector": (_m(None, "modality_projection.proj"),),
    "SiglipMultiheadAttentionPoolingHead": (_m(None, "attention.out_proj"), _m("layernorm", "mlp.fc1", inspect="mlp"), _m(None, "mlp.fc2")),
    # a block that is a single Linear (CLIP's projections, SigLIP's text head)
    "Linear": (_m(None, ""),),
}
