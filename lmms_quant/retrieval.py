"""Image-text retrieval scoring: one similarity matrix per gallery, for every family with a scorer.

The library half of retrieval (the harness half, which turns lmms-eval requests into galleries and
answers, is :mod:`lmms_quant.model_wrappers.retrieval`).  Scorers, as functions of
``(model, processor, images, captions)``:

* dual encoders (CLIP, SigLIP): cosine similarity of ``get_image_features`` and
  ``get_text_features``; N_img/B + N_txt/B encoder passes and one matrix product
  (:func:`dual_encoder_similarity`).
* BLIP-2 ITM (``Blip2ForImageTextRetrieval``): LAVIS's two stages (:func:`blip2_itm_retrieval`).
  ITC similarity is the max over the query embeddings; then for every image its ``k_test`` best
  captions, and for every caption its ``k_test`` best images, are re-scored by ITM logit + ITC
  score (everything else scores -inf).  Each distinct candidate pair is scored once.
* generative VLMs (BLIP-2 OPT, LLaVA, Qwen2-VL, Idefics3, ...): the mean log-likelihood of the
  caption's tokens after a prompt and the image (:func:`generative_pair_scorer`); N_img x N_txt
  forward passes, or a shortlist's top ``k_test`` re-scored (:func:`rerank_top_k`).

:func:`caption_ranks` turns the two score matrices into per-caption ranks (ties count in the
model's favour, as :mod:`lmms_quant.metrics.retrieval`).  :class:`RetrievalSettings` holds the
``retrieval_*`` settings; a setting, family or model that cannot work raises
:class:`RetrievalError` (a :class:`~lmms_quant.errors.ConfigurationError`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigurationError
from .metrics import retrieval_ranks

log = logging.getLogger(__name__)

__all__ = [
    "RetrievalError", "RetrievalSettings", "RetrievalStats", "SCORER_BY_FAMILY", "SHORTLIST_SCORERS", "blip_caption",
    "blip2_encode", "blip2_itc_similarity", "blip2_itm_logits", "blip2_itm_retrieval", "caption_ranks",
    "device_dtype", "dual_encoder_similarity", "generative_pair_scorer", "generative_retrieval", "rerank_top_k", "scorer_for",
]

#: Model family (``lmms_quant.architectures``) -> how it scores image-text pairs.
SCORER_BY_FAMILY: dict[str, str] = {
    "clip": "dual_encoder",
    "siglip": "dual_encoder",
    "blip2_itm": "blip2_itm",
    "blip2": "generative",
    "llava": "generative",
    "llava_next": "generative",
    "llava_onevision": "generative",
    "qwen2_vl": "generative",
    "qwen2_5_vl": "generative",
    "idefics3": "generative",
    "smolvlm": "generative",
}
#: Scorers that can serve as a generative model's first stage.
SHORTLIST_SCORERS = ("dual_encoder", "blip2_itm")


class RetrievalError(ConfigurationError):
    """A retrieval run that cannot work (model family, settings, gallery size); the message says why."""


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class RetrievalSettings:
    """The ``retrieval_*`` generation_kwargs of a retrieval task (all optional).

    Attributes:
        captions_field: document field holding the captions.
        captions_per_image: exact number of captions per image, or None (any, at least one).
        k_test: candidates re-ranked per query (BLIP-2 ITM; generative with a shortlist); >= 10.
        batch_size: images or captions per encoder forward pass.
        pair_batch_size: image-caption pairs per forward pass; None = 128 for BLIP-2 ITM, 16 for generative
            models (whose logits over the vocabulary for every position of the batch must fit in memory).
        max_text_len: caption tokens kept; None = 35 for BLIP-2 ITM (LAVIS), the model's limit otherwise.
        text_preprocess: ``none``, or ``blip`` (LAVIS's BlipCaptionProcessor: lower case,
            ``.!"()*#:;~`` removed, at most 50 words), as the study's retrieval code.
        shortlist: generative models only: a CLIP, SigLIP or BLIP-2 ITM checkpoint for the first stage.
        max_pairs: generative models without shortlist: the largest N_img x N_txt allowed.
        prompt: generative models: the instruction the caption answers, put in the model's
            prompt format with one image (BLIP-2 OPT captions best after an empty prompt).
    """

    captions_field: str = "caption"
    captions_per_image: int | None = None
    k_test: int = 128
    batch_size: int = 64
    pair_batch_size: int | None = None
    max_text_len: int | None = None
    text_preprocess: str = "none"
    shortlist: str | None = None
    max_pairs: int = 100_000
    prompt: str = "Provide a one-sentence caption for the provided image."

    def __post_init__(self) -> None:
        for name in ("k_test", "batch_size", "max_pairs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise RetrievalError(f"retrieval_{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.k_test < 10:
            raise RetrievalError(f"retrieval_k_test must be >= 10 so that R@10 is exact, got {self.k_test}")
        for name in ("captions_per_image", "max_text_len", "pair_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise RetrievalError(f"retrieval_{name} must be a positive integer or null, got {value!r}")
        if self.text_preprocess not in ("none", "blip"):
            raise RetrievalError(f"retrieval_text_preprocess must be 'none' or 'blip', got {self.text_preprocess!r}")

    @classmethod
    def from_generation_kwargs(cls, gen_kwargs: Mapping[str, Any]) -> RetrievalSettings:
        """Read the ``retrieval_<field>`` keys; unknown ``retrieval_*`` keys are refused."""
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in gen_kwargs.items():
            if not key.startswith("retrieval_"):
                continue
            name = key[len("retrieval_"):]
            if name not in names:
                raise RetrievalError(f"unknown setting {key!r}; valid: {', '.join('retrieval_' + n for n in sorted(names))}")
            values[name] = None if value in ("null", "None", "none", "") and name not in ("text_preprocess", "prompt") else value
        return cls(**values)


@dataclass
class RetrievalStats:
    """Where the time of one gallery went, and how many forward passes it took."""

    n_images: int = 0
    n_texts: int = 0
    image_encode_s: float = 0.0
    text_encode_s: float = 0.0
    similarity_s: float = 0.0
    rerank_s: float = 0.0
    image_forwards: int = 0
    text_forwards: int = 0
    rerank_forwards: int = 0
    rerank_pairs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


# --------------------------------------------------------------- plumbing
def device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` return a tensor (transformers 4) or an output whose pooler_output holds it (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@contextlib.contextmanager
def _right_padding(tokenizer):
    """Absolute position embeddings (CLIP, BERT) and per-token scoring need right padding;
    the backend keeps its tokenizer left-padded for generation."""
    old = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "right"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = old


def _pixel_batches(processor, images, batch_size: int):
    """Pixel tensors of ``batch_size`` images: a float tensor (N, C, H, W) is used as is."""
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if isinstance(chunk, torch.Tensor):
            yield chunk
        else:
            image_processor = getattr(processor, "image_processor", processor)
            yield image_processor(images=list(chunk), return_tensors="pt")["pixel_values"]


def _text_batches(tokenizer, captions: Sequence[str], batch_size: int, max_len: int | None, padding: Any = True):
    with _right_padding(tokenizer):
        for start in range(0, len(captions), batch_size):
            kw = {"truncation": True, "max_length": max_len} if max_len else {}
            yield tokenizer(list(captions[start:start + batch_size]), padding=padding, return_tensors="pt", **kw)


def _text_limit(model) -> int | None:
    cfg = getattr(model.config, "text_config", None) or getattr(model.config, "qformer_config", None)
    return getattr(cfg, "max_position_embeddings", None)


def blip_caption(text: str, max_words: int = 50) -> str:
    """LAVIS ``BlipCaptionProcessor`` (used by the study's retrieval code): lower case,
    ``.!"()*#:;~`` to spaces, single spaces, at most ``max_words`` words."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


# ------------------------------------------------------------ dual encoders
def dual_encoder_similarity(model, processor, images, captions: Sequence[str], *, batch_size: int = 64,
                            stats: RetrievalStats | None = None) -> torch.Tensor:
    """Cosine similarity (N_img, N_txt), float32, of a CLIP or SigLIP model.

    ``images``: PIL images, or a pixel tensor (N, C, H, W) already preprocessed.
    Every image and caption is encoded once; SigLIP text is padded to its
    training length (``max_length``), as its model card prescribes.
    """
    stats = stats if stats is not None else RetrievalStats()
    device, dtype = device_dtype(model)
    siglip = "siglip" in type(model).__name__.lower()
    limit = _text_limit(model)

    t0 = time.perf_counter()
    image_feats = []
    for px in _pixel_batches(processor, images, batch_size):
        image_feats.append(F.normalize(_features(model.get_image_features(pixel_values=px.to(device, dtype))).float(), dim=-1))
        stats.image_forwards += 1
    t1 = time.perf_counter()
    text_feats = []
    tokenizer = getattr(processor, "tokenizer", processor)
    for batch in _text_batches(tokenizer, captions, batch_size, limit, padding="max_length" if siglip else True):
        kw = {"input_ids": batch["input_ids"].to(device)}
        if "attention_mask" in batch and not siglip:
            kw["attention_mask"] = batch["attention_mask"].to(device)
        text_feats.append(F.normalize(_features(model.get_text_features(**kw)).float(), dim=-1))
        stats.text_forwards += 1
    t2 = time.perf_counter()
    sim = torch.cat(image_feats) @ torch.cat(text_feats).T
    stats.image_encode_s += t1 - t0
    stats.text_encode_s += t2 - t1
    stats.similarity_s += time.perf_counter() - t2
    return sim


# ---------------------------------------------------------------- BLIP-2 ITM
@dataclass
class Blip2Gallery:
    """Encoded BLIP-2 ITM gallery: ViT outputs (kept for ITM), query and text features."""

    vit: torch.Tensor  # (N_img, patches, d_vit)
    image_feats: torch.Tensor  # (N_img, n_query, d), unit norm
    text_ids: torch.Tensor  # (N_txt, L)
    text_mask: torch.Tensor  # (N_txt, L)
    text_feats: torch.Tensor  # (N_txt, d), unit norm


def blip2_encode(model, processor, images, captions: Sequence[str], *, batch_size: int = 64, max_text_len: int | None = 35,
                 stats: RetrievalStats | None = None) -> Blip2Gallery:
    """Encode every image (ViT, then the Q-Former's queries) and every caption (Q-Former text) once."""
    stats = stats if stats is not None else RetrievalStats()
    device, _ = device_dtype(model)
    vit_dtype = next(model.vision_model.parameters()).dtype
    qf_dtype = model.query_tokens.dtype
    t0 = time.perf_counter()
    vits, feats = [], []
    for px in _pixel_batches(processor, images, batch_size):
        vit = model.vision_model(pixel_values=px.to(device, vit_dtype)).last_hidden_state.to(qf_dtype)
        query = model.query_tokens.expand(vit.shape[0], -1, -1)
        out = model.qformer(query_embeds=query, encoder_hidden_states=vit,
                            encoder_attention_mask=torch.ones(vit.shape[:-1], dtype=torch.long, device=device))
        q = out.last_hidden_state.to(model.vision_projection.weight.dtype)
        feats.append(F.normalize(model.vision_projection(q).float(), dim=-1))
        vits.append(vit)
        stats.image_forwards += 1
    t1 = time.perf_counter()
    ids, masks, text_feats = [], [], []
    tokenizer = getattr(processor, "tokenizer", processor)
    for batch in _text_batches(tokenizer, captions, batch_size, max_text_len or _text_limit(model)):
        i, m = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = model.qformer(query_embeds=model.embeddings(input_ids=i), query_length=0, attention_mask=m)
        h = out.last_hidden_state[:, 0].to(model.text_projection.weight.dtype)
        text_feats.append(F.normalize(model.text_projection(h).float(), dim=-1))
        ids.append(i)
        masks.append(m)
        stats.text_forwards += 1
    stats.image_encode_s += t1 - t0
    stats.text_encode_s += time.perf_counter() - t1
    width = max(x.shape[1] for x in ids)
    pad = tokenizer.pad_token_id or 0
    ids = [F.pad(x, (0, width - x.shape[1]), value=pad) for x in ids]
    masks = [F.pad(x, (0, width - x.shape[1]), value=0) for x in masks]
    return Blip2Gallery(torch.cat(vits), torch.cat(feats), torch.cat(ids), torch.cat(masks), torch.cat(text_feats))


def blip2_itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """ITC similarity (N_img, N_txt): for each pair the max over the image's query embeddings."""
    return torch.cat([torch.einsum("iqd,td->iqt", image_feats[s:s + chunk], text_feats).amax(1)
                      for s in range(0, image_feats.shape[0], chunk)])


def blip2_itm_logits(model, vit: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """ITM "match" logit of each (image, text) row pair, averaged over the queries (LAVIS ``compute_itm``).

    ``vit``: (P, patches, d_vit) ViT outputs; ``text_ids``/``text_mask``: (P, L).  Returns (P,) float32.
    """
    n_query = model.query_tokens.shape[1]
    query = model.query_tokens.expand(vit.shape[0], -1, -1)
    mask = torch.cat([torch.ones(query.shape[:-1], dtype=text_mask.dtype, device=text_mask.device), text_mask], dim=1)
    out = model.qformer(query_embeds=model.embeddings(input_ids=text_ids, query_embeds=query), query_length=n_query,
                        attention_mask=mask, encoder_hidden_states=vit,
                        encoder_attention_mask=torch.ones(vit.shape[:-1], dtype=torch.long, device=vit.device))
    h = out.last_hidden_state[:, :n_query].to(model.itm_head.weight.dtype)
    return model.itm_head(h)[:, :, 1].mean(dim=1).float()


def blip2_itm_retrieval(model, processor, images, captions: Sequence[str], *, k_test: int = 128, batch_size: int = 64,
                        pair_batch_size: int = 128, max_text_len: int | None = 35,
                        stats: RetrievalStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LAVIS two-stage BLIP-2 retrieval: ``(i2t_scores, t2i_scores)``, both (N_img, N_txt).

    Stage 1 ranks by ITC; stage 2 scores each query's ``k_test`` best candidates
    by ITM logit + ITC score (LAVIS ``compute_sim_matrix``), everything else -inf.
    """
    stats = stats if stats is not None else RetrievalStats()
    gallery = blip2_encode(model, processor, images, captions, batch_size=batch_size, max_text_len=max_text_len, stats=stats)
    t0 = time.perf_counter()
    itc = blip2_itc_similarity(gallery.image_feats, gallery.text_feats)
    stats.similarity_s += time.perf_counter() - t0

    def score(pairs: torch.Tensor) -> torch.Tensor:
        i, t = pairs[:, 0].to(gallery.vit.device), pairs[:, 1].to(gallery.text_ids.device)
        return blip2_itm_logits(model, gallery.vit[i], gallery.text_ids[t], gallery.text_mask[t])

    return rerank_top_k(itc, k_test, score, add_first=True, pair_batch_size=pair_batch_size, stats=stats)


# -------------------------------------------------------------- re-ranking
def rerank_top_k(first: torch.Tensor, k: int, score_pairs: Callable[[torch.Tensor], torch.Tensor], *, add_first: bool,
                 pair_batch_size: int = 128, stats: RetrievalStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Second stage over a first-stage similarity ``first`` (N_img, N_txt).

    For every image its ``k`` best texts and for every text its ``k`` best images
    (by ``first``) are scored by ``score_pairs(pairs)`` (pairs: (P, 2) long
    tensor of (image, text) indices -> (P,) scores), plus ``first`` when
    ``add_first``.  Returns ``(i2t, t2i)`` matrices (N_img, N_txt), float32,
    holding those scores at the candidates of each direction and -inf
    elsewhere.  A pair that is a candidate in both directions is scored once.
    """
    stats = stats if stats is not None else RetrievalStats()
    t0 = time.perf_counter()
    n_img, n_txt = first.shape
    k_txt, k_img = min(k, n_txt), min(k, n_img)
    rows = torch.arange(n_img, device=first.device)
    cols = torch.arange(n_txt, device=first.device)
    i2t_pairs = torch.stack([rows.repeat_interleave(k_txt), first.topk(k_txt, dim=1).indices.flatten()], 1)
    t2i_pairs = torch.stack([first.topk(k_img, dim=0).indices.T.flatten(), cols.repeat_interleave(k_img)], 1)
    keys, inverse = torch.cat([i2t_pairs[:, 0] * n_txt + i2t_pairs[:, 1], t2i_pairs[:, 0] * n_txt + t2i_pairs[:, 1]]).unique(
        return_inverse=True)
    pairs = torch.stack([keys // n_txt, keys % n_txt], 1)
    scores = []
    for start in range(0, pairs.shape[0], pair_batch_size):
        scores.append(score_pairs(pairs[start:start + pair_batch_size]).float().to(first.device))
        stats.rerank_forwards += 1
    scores = torch.cat(scores)
    if add_first:
        scores = scores + first[pairs[:, 0], pairs[:, 1]].float()
    i2t = torch.full((n_img, n_txt), -torch.inf, device=first.device)
    t2i = torch.full((n_img, n_txt), -torch.inf, device=first.device)
    i2t[i2t_pairs[:, 0], i2t_pairs[:, 1]] = scores[inverse[: len(i2t_pairs)]]
    t2i[t2i_pairs[:, 0], t2i_pairs[:, 1]] = scores[inverse[len(i2t_pairs):]]
    stats.rerank_pairs += pairs.shape[0]
    stats.rerank_s += time.perf_counter() - t0
    return i2t, t2i


# -------------------------------------------------------------- generative
#: Classes whose prompt + image prefix runs once per image, its KV cache reused for every caption
#: (the vision tower and the image tokens are not recomputed per pair); other classes run every pair in full.
PREFIX_CACHED = ("LlavaForConditionalGeneration",)


def generative_pair_scorer(model, processor, images, captions: Sequence[str], *, prompt: str,
                           prefix_cache: bool | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``score_pairs`` function: mean log-probability of each caption's tokens given
    ``prompt`` (already in the model's format, with its image placeholder) and the image.

    The caption follows the prompt after one space.  For the classes in
    ``PREFIX_CACHED`` (or with ``prefix_cache=True``) the prompt and image run
    once per image and the caption batch continues from a copy of that KV
    cache; otherwise every pair is one full forward pass, with the prompt's
    length measured per image (image token counts may differ with the
    resolution).  Both give the same scores.  Decoder-only language models only.
    """
    text_cfg = getattr(model.config, "text_config", model.config)
    if getattr(text_cfg, "is_encoder_decoder", False):
        raise RetrievalError(f"{type(model).__name__} has an encoder-decoder language model ({type(text_cfg).__name__}); "
                               "generative retrieval scoring supports decoder-only language models")
    device, dtype = device_dtype(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    sep = "" if not prompt or prompt[-1].isspace() else " "
    prompt_len: dict[int, int] = {}
    prompt_ids = tokenizer(prompt)["input_ids"]
    prefix: dict[int, tuple] = {}  # the last image only: (prefix length, KV cache, logits after the prefix)

    def inputs(texts, ims):
        batch = processor(text=texts, images=ims, return_tensors="pt", padding=True)
        return {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device)) for k, v in batch.items()}

    def mean_logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, None]).mean()

    def full(pairs: torch.Tensor) -> torch.Tensor:
        with _right_padding(tokenizer):
            for i in pairs[:, 0].tolist():
                if i not in prompt_len:
                    prompt_len[i] = int(inputs([prompt], [images[i]])["attention_mask"].sum())
            batch = inputs([prompt + sep + captions[t] for t in pairs[:, 1].tolist()], [images[i] for i in pairs[:, 0].tolist()])
        logits = model(**batch).logits
        ids, lengths = batch["input_ids"], batch["attention_mask"].sum(1).tolist()
        out = []
        for b, (i, n) in enumerate(zip(pairs[:, 0].tolist(), lengths)):
            start = prompt_len[i]
            out.append(mean_logp(logits[b, start - 1:n - 1], ids[b, start:n]) if n > start else torch.tensor(-torch.inf))
        return torch.stack(out)

    def cached(pairs: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(pairs))
        for i in dict.fromkeys(pairs[:, 0].tolist()):
            rows = torch.nonzero(pairs[:, 0] == i).flatten().tolist()
            if i not in prefix:
                prefix.clear()
                out_prefix = model(**inputs([prompt], [images[i]]), use_cache=True)
                prefix[i] = (out_prefix.past_key_values.get_seq_length(), out_prefix.past_key_values, out_prefix.logits[0, -1])
            n_prefix, cache, last = prefix[i]
            caps = []
            for r in rows:
                ids = tokenizer(prompt + sep + captions[int(pairs[r, 1])])["input_ids"]
                if ids[:len(prompt_ids)] != prompt_ids:  # the caption merged into the prompt's last token
                    out[r] = full(pairs[r:r + 1])[0]
                    continue
                caps.append((r, ids[len(prompt_ids):]))
            if not caps:
                continue
            width = max(len(c) for _, c in caps)
            ids = torch.tensor([c + [tokenizer.pad_token_id or 0] * (width - len(c)) for _, c in caps], device=device)
            mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for _, c in caps], device=device)
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(caps))
            logits = model(input_ids=ids, attention_mask=torch.cat([torch.ones(len(caps), n_prefix, dtype=mask.dtype, device=device), mask], 1),
                           past_key_values=batch_cache, use_cache=True).logits
            for b, (r, c) in enumerate(caps):
                n = len(c)
                out[r] = mean_logp(torch.cat([last[None], logits[b, :n - 1]]), ids[b, :n]) if n else -torch.inf
        return out

    use_cache = type(model).__name__ in PREFIX_CACHED if prefix_cache is None else prefix_cache
    return cached if use_cache else full


def generative_retrieval(model, processor, images, captions, *, prompt, settings, first, stats):
    score = generative_pair_scorer(model, processor, images, captions, prompt=prompt)
    batch = settings.pair_batch_size or 16
    if first is not None:
        return rerank_top_k(first, settings.k_test, score, add_first=False, pair_batch_size=batch, stats=stats)
    t0 = time.perf_counter()
    n_img, n_txt = len(images), len(captions)
    pairs = torch.cartesian_prod(torch.arange(n_img), torch.arange(n_txt))
    scores = []
    for start in range(0, pairs.shape[0], batch):
        scores.append(score(pairs[start:start + batch]))
        stats.rerank_forwards += 1
    sim = torch.cat(scores).view(n_img, n_txt)
    stats.rerank_pairs += pairs.shape[0]
    stats.rerank_s += time.perf_counter() - t0
    return sim, sim


# ------------------------------------------------------------------- ranks
def caption_ranks(i2t_scores: torch.Tensor, t2i_scores: torch.Tensor, text_to_image: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per caption: its 0-based i2t rank for its own image and its image's t2i rank.

    ``i2t_scores``/``t2i_scores``: (N_img, N_txt); pass the same matrix twice for
    one-stage scorers.  Ties count in the model's favour (only strictly greater
    scores rank above), so the minimum i2t rank over an image's captions equals
    :func:`lmms_quant.metrics.retrieval_ranks`'s i2t rank, and the t2i ranks are its t2i ranks.
    """
    owner = torch.as_tensor(list(text_to_image), dtype=torch.long, device=i2t_scores.device)
    _, t2i = retrieval_ranks(t2i_scores, owner)
    n_img, n_txt = i2t_scores.shape
    i2t = torch.empty(n_txt, dtype=torch.long, device=i2t_scores.device)
    rows = max(1, (1 << 22) // n_txt)
    for start in range(0, n_img, rows):
        texts = torch.nonzero((owner >= start) & (owner < start + rows)).flatten()
        own = i2t_scores[owner[texts], texts]
        i2t[texts] = (i2t_scores[owner[texts]] > own[:, None]).sum(1)
    return i2t, t2i


def scorer_for(family: str | None, task: str = "retrieval") -> str:
    """The scorer kind of a model family, or RetrievalError naming the families that can."""
    if family not in SCORER_BY_FAMILY:
        raise RetrievalError(f"task {task}: model family {family!r} cannot do image-text retrieval; families with a scorer: "
                               + ", ".join(f"{f} ({k})" for f, k in SCORER_BY_FAMILY.items()))
    return SCORER_BY_FAMILY[family]
