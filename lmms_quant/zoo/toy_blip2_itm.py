"""toy-blip2-itm: a BLIP-2 image-text retrieval model small enough to train on one CPU thread.

Architecture (transformers ``Blip2ForImageTextRetrieval``, LAVIS's
``blip2_image_text_matching``): BLIP-2's ViT over 64 x 64 images (8 px patches,
64 patch tokens and a CLS token), a Q-Former whose learned queries cross-attend
to every ViT token in each of its layers, and the three heads retrieval uses:
the image and text projections of image-text contrast (ITC) and the matching
head (ITM).  Texts go through the Q-Former's own text path (BERT-style,
bidirectional), tokenized with the world's word-level tokenizer; its leading
``<s>`` plays BERT's ``[CLS]``: the text feature is its output.

The losses of BLIP-2 stage 1 (without its captioning loss, which retrieval does
not use) are :func:`itc_loss` and :func:`itm_loss`; both are pure functions of
the model's outputs so tests can check them by hand.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import (
    Blip2Config,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessor,
    OPTConfig,
    PreTrainedTokenizerFast,
)

from lmms_quant.world import IMAGE_SIZE
from lmms_quant.zoo.toy_llava import CLIP_MEAN, CLIP_STD, check_sizes

__all__ = [
    "Blip2Sizes",
    "ToyItmSpec",
    "build_model",
    "build_processor",
    "caption_key",
    "vision_qformer_configs",
    "encode_images",
    "encode_texts",
    "itc_loss",
    "itc_similarity",
    "itm_logits",
    "itm_loss",
]


@dataclass(frozen=True)
class Blip2Sizes:
    """The ViT and Q-Former sizes of the zoo's BLIP-2 models (toy-blip2 starts from
    toy-blip2-itm's ViT and Q-Former, so both extend these)."""

    patch_size: int = 8
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 384
    qformer_hidden: int = 192
    qformer_layers: int = 2
    qformer_heads: int = 4
    qformer_mlp: int = 384
    num_query_tokens: int = 8


def vision_qformer_configs(
    spec: Blip2Sizes, tokenizer: PreTrainedTokenizerFast, **qformer: object
) -> tuple[Blip2VisionConfig, Blip2QFormerConfig]:
    """BLIP-2's ViT and Q-Former configs of ``spec``'s sizes (queries cross-attend in every
    layer, no dropout); ``qformer`` adds Q-Former settings (its text input)."""
    vision = Blip2VisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_mlp,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=spec.patch_size,
        initializer_range=0.02,  # BLIP-2's default (1e-10) assumes pretrained weights are loaded over it
    )
    qformer_config = Blip2QFormerConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.qformer_hidden,
        num_hidden_layers=spec.qformer_layers,
        num_attention_heads=spec.qformer_heads,
        intermediate_size=spec.qformer_mlp,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        cross_attention_frequency=1,
        encoder_hidden_size=spec.vision_hidden,
        pad_token_id=tokenizer.pad_token_id,
        **qformer,
    )
    return vision, qformer_config


@dataclass(frozen=True)
class ToyItmSpec(Blip2Sizes):
    """Sizes of toy-blip2-itm: :class:`Blip2Sizes` plus its ITC space and text length."""

    embed_dim: int = 128  # ITC space (``image_text_hidden_size``)
    max_text_len: int = 40

    def __post_init__(self) -> None:
        check_sizes(self, ("vision", "qformer"))

    @property
    def image_tokens(self) -> int:
        """ViT tokens the Q-Former attends to: every patch and CLS."""
        return (IMAGE_SIZE // self.patch_size) ** 2 + 1

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(spec: ToyItmSpec, tokenizer: PreTrainedTokenizerFast) -> Blip2ForImageTextRetrieval:
    """A randomly initialised toy-blip2-itm (call ``torch.manual_seed`` first)."""
    vision, qformer = vision_qformer_configs(spec, tokenizer, use_qformer_text_input=True, max_position_embeddings=spec.max_text_len)
    # Blip2Config needs a language model config; the retrieval model builds none.
    text = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=len(tokenizer))
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=spec.num_query_tokens,
        image_text_hidden_size=spec.embed_dim,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForImageTextRetrieval(config)
    torch.nn.init.normal_(model.query_tokens, std=0.02)  # BLIP-2 initialises the queries like the weights
    return model


def build_processor(spec: ToyItmSpec, tokenizer: PreTrainedTokenizerFast) -> Blip2Processor:
    """BLIP-2's image processor at 64 px (CLIP mean and std, so it equals
    :func:`lmms_quant.zoo.toy_llava.pixel_values`) and the world tokenizer."""
    image_processor = BlipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    )
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=spec.num_query_tokens)


def encode_images(model: Blip2ForImageTextRetrieval, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(vit, patch_tokens, image_feats)``: the ViT's output (what ITM cross-attends to), its
    last layer's patch tokens before the final norm (for the dense loss) and the unit-norm
    ITC features of the queries ``(B, n_query, embed_dim)``."""
    out = model.vision_model(pixel_values=pixels, output_hidden_states=True)
    vit = out.last_hidden_state
    query = model.query_tokens.expand(vit.shape[0], -1, -1)
    mask = torch.ones(vit.shape[:-1], dtype=torch.long, device=vit.device)
    q = model.qformer(query_embeds=query, encoder_hidden_states=vit, encoder_attention_mask=mask).last_hidden_state
    return vit, out.hidden_states[-1][:, 1:], F.normalize(model.vision_projection(q), dim=-1)


def encode_texts(model: Blip2ForImageTextRetrieval, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Unit-norm ITC text features ``(T, embed_dim)``: the Q-Former text path's first token."""
    h = model.qformer(query_embeds=model.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask).last_hidden_state
    return F.normalize(model.text_projection(h[:, 0]), dim=-1)


def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """``(B_img, B_txt)`` cosine similarity, the best query per pair (BLIP-2's ITC)."""
    return torch.einsum("iqd,td->iqt", image_feats, text_feats).amax(dim=1)


def itc_loss(sim: torch.Tensor, positive: torch.Tensor, temperature: torch.Tensor | float, foils: int = 0) -> torch.Tensor:
    """Contrastive loss both ways over a batch, with several positives allowed.

    ``positive[i, t]`` is True where text ``t`` is true of image ``i`` (its own caption,
    and any other image's caption that says the same thing, which would otherwise be
    a false negative); each direction's target spreads evenly over the positives.
    The last ``foils`` texts are hard negative texts (NegCLIP's): they join every
    image's text softmax but have no text-to-image term of their own.
    """
    n_text = sim.shape[1] - foils
    if not 0 <= foils < sim.shape[1]:
        raise ValueError(f"foils must be in [0, {sim.shape[1]}) for {sim.shape[1]} texts, got {foils}")
    if not bool(positive.any(dim=1).all()) or not bool(positive[:, :n_text].any(dim=0).all()):
        raise ValueError("every image and every text (foils aside) needs at least one positive")
    logits = sim / temperature
    target = positive.float()
    i2t = -(F.log_softmax(logits, dim=1) * (target / target.sum(1, keepdim=True))).sum(1).mean()
    logits, target = logits[:, :n_text], target[:, :n_text]
    t2i = -(F.log_softmax(logits, dim=0) * (target / target.sum(0, keepdim=True))).sum(0).mean()
    return (i2t + t2i) / 2


def itm_logits(model: Blip2ForImageTextRetrieval, vit: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(P, 2)`` ITM logits (no match, match) of row-aligned (image, text) pairs, averaged over the
    queries as ``Blip2ForImageTextRetrieval`` and LAVIS do."""
    n_query = model.query_tokens.shape[1]
    query = model.query_tokens.expand(vit.shape[0], -1, -1)
    mask = torch.cat([torch.ones(query.shape[:-1], dtype=attention_mask.dtype, device=vit.device), attention_mask], dim=1)
    out = model.qformer(
        query_embeds=model.embeddings(input_ids=input_ids, query_embeds=query),
        query_length=n_query,
        attention_mask=mask,
        encoder_hidden_states=vit,
        encoder_attention_mask=torch.ones(vit.shape[:-1], dtype=torch.long, device=vit.device),
    )
    return model.itm_head(out.last_hidden_state[:, :n_query]).mean(dim=1)


def itm_loss(
    model: Blip2ForImageTextRetrieval,
    vit: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sim: torch.Tensor,
    positive: torch.Tensor,
    generator: torch.Generator,
    foil_ids: torch.Tensor | None = None,
    foil_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """BLIP's ITM loss with hard negatives mined from the ITC similarity.

    Batch ``i`` pairs image ``i`` with text ``i`` (a match).  Each image also gets one
    negative text and each text one negative image, drawn with probability
    ``softmax(sim)`` over the non-positives (hard negatives are the likely ones);
    cross-entropy over the ``3B`` pairs.  With ``foil_ids``/``foil_mask`` (``B`` texts,
    row ``i`` false of image ``i``), the pairs (image ``i``, foil ``i``) join as ``B``
    more negatives.  ``sim`` and ``positive`` are ``(B, B)``: the batch's own texts.
    """
    b = vit.shape[0]
    if bool(positive.all(dim=1).any()) or bool(positive.all(dim=0).any()):
        raise ValueError("every image and every text needs at least one negative in the batch")
    if (foil_ids is None) != (foil_mask is None) or (foil_ids is not None and foil_ids.shape[0] != b):
        raise ValueError(f"foil_ids and foil_mask go together, one foil text per image ({b})")
    with torch.no_grad():
        neg_text = torch.multinomial(_negative_weights(sim, positive), 1, generator=generator).squeeze(1)
        neg_image = torch.multinomial(_negative_weights(sim.T, positive.T), 1, generator=generator).squeeze(1)
    idx = torch.arange(b, device=vit.device)
    vit_all = [vit, vit, vit[neg_image]]
    ids_all = [input_ids, input_ids[neg_text], input_ids]
    mask_all = [attention_mask, attention_mask[neg_text], attention_mask]
    labels = [torch.ones_like(idx), torch.zeros_like(idx), torch.zeros_like(idx)]
    if foil_ids is not None:
        width = max(input_ids.shape[1], foil_ids.shape[1])
        ids_all = [F.pad(t, (0, width - t.shape[1])) for t in [*ids_all, foil_ids]]
        mask_all = [F.pad(t, (0, width - t.shape[1])) for t in [*mask_all, foil_mask]]
        vit_all.append(vit)
        labels.append(torch.zeros_like(idx))
    return F.cross_entropy(itm_logits(model, torch.cat(vit_all), torch.cat(ids_all), torch.cat(mask_all)), torch.cat(labels))


def _negative_weights(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Row-wise ``softmax(sim)`` over the non-positives (a floor keeps underflowed rows drawable)."""
    w = torch.softmax(sim.float(), dim=1) + 1e-12
    return w.masked_fill(positive, 0.0)


_SYNONYMS = (
    (re.compile(r"\b(dark|black) background\b"), "BG background"),
    (re.compile(r"\ban? (image|picture)\b"), "a IMG"),
    (re.compile(r"\bthe (image|picture)\b"), "the IMG"),
)


def caption_key(caption: str) -> str:
    """A caption with the world's free word choices (``dark``/``black`` background,
    ``image``/``picture``) folded, so two captions that say the same thing compare equal."""
    text = caption.lower().strip()
    for pattern, repl in _SYNONYMS:
        text = pattern.sub(repl, text)
    return text
