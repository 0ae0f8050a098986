"""Image-text retrieval for ``quant_vlm``: lmms-eval requests in, one similarity matrix per gallery, ranks out.

The scoring is the library's (:mod:`lmms_quant.retrieval`); this module adapts lmms-eval's requests to it.

lmms-eval has no retrieval output type, so an ``lq_`` retrieval task is a
``generate_until`` task with one request per *image* document (an image and its
captions), marked in its YAML by ``generation_kwargs``::

    generation_kwargs:
      retrieval: true                  # answered here, not by generate()
      retrieval_captions_field: caption
      retrieval_captions_per_image: 5  # exact count, or null for "any, at least one"
      retrieval_k_test: 128            # re-ranked candidates per query (BLIP-2 ITM, shortlisted generative)

Any ``retrieval_*`` key can be overridden with lmms-eval's ``--gen_kwargs``
(e.g. ``--gen_kwargs retrieval_k_test=256``); :class:`RetrievalSettings` lists them.

``QuantVLM.generate_until`` hands such requests to :func:`serve_with_retrieval`.
Per (task, split) it takes the requested documents as the gallery (the whole
split, or the first N with ``--limit``: the gallery is then the limited set),
encodes every image once and every caption once, builds one similarity matrix
(plus a re-ranking stage where the scorer has one), turns it into ranks and
answers every image request with a compact JSON string, never embeddings::

    {"i2t":[0,3,1,0,7],"t2i":[0,0,2,1,0],"gallery":[1000,5000]}

``i2t[j]``: 0-based rank of the image's j-th caption among all captions for
this image; ``t2i[j]``: rank of this image among all images for its j-th
caption; ties count in the model's favour (as :mod:`lmms_quant.metrics.retrieval`).
The task's ``process_results`` parses it and its aggregations compute R@1/5/10
both ways and their mean (``tasks/_common.py``).

Scorers, as functions of ``(model, processor, images, captions)``:

* dual encoders (CLIP, SigLIP): cosine similarity of ``get_image_features`` and
  ``get_text_features``; N_img/B + N_txt/B encoder passes and one matrix product.
* BLIP-2 ITM (``Blip2ForImageTextRetrieval``): LAVIS's two stages.  ITC
  similarity is the max over the query embeddings; then for every image its
  ``k_test`` best captions, and for every caption its ``k_test`` best images,
  are re-scored by ITM logit + ITC score (everything else scores -inf).  Each
  distinct candidate pair is scored once: at most (N_img + N_txt) x k_test pairs.
* generative VLMs (BLIP-2 OPT, LLaVA, Qwen2-VL, Idefics3, ...): the mean
  log-likelihood of the caption's tokens after the task prompt and the image.
  Without a shortlist that is N_img x N_txt forward passes (5,000,000 for
  Flickr30k 1K; for LLaVA-1.5 over the caption tokens only, continuing a KV
  cache of the prompt and image computed once per image; for the other
  classes of the whole model), so it is refused above
  ``retrieval_max_pairs`` (default 100,000); ``retrieval_shortlist=<CLIP, SigLIP
  or BLIP-2 ITM checkpoint>`` adds a first stage whose top ``k_test`` candidates
  in both directions are re-scored by likelihood: (N_img + N_txt) x k_test passes.

A model family without a scorer is refused when the task is built, before its
data set loads (``tasks/_task.py`` preflight, :func:`check_retrieval_backend`),
and again when the first request arrives.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from types import SimpleNamespace
from typing import Any

import torch

from lmms_quant.retrieval import (
    SCORER_BY_FAMILY,
    SHORTLIST_SCORERS,
    RetrievalError,
    RetrievalSettings,
    RetrievalStats,
    blip2_encode,
    blip2_itc_similarity,
    blip2_itm_retrieval,
    blip_caption,
    caption_ranks,
    device_dtype,
    dual_encoder_similarity,
    generative_retrieval,
    scorer_for,
)

log = logging.getLogger(__name__)

__all__ = ["RetrievalRefused", "check_retrieval_backend", "is_retrieval_request", "retrieve", "serve_with_retrieval"]


class RetrievalRefused(SystemExit):
    """A retrieval run that cannot work (model family, settings, gallery size).

    A SystemExit, like the backend's ConfigurationExit, because lmms-eval's CLI
    catches every Exception and would still exit 0.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"lmms-quant: retrieval: {message}")
        self.message = message


def _refusing(fn):
    """Library refusals (:class:`RetrievalError`) leave the harness as :class:`RetrievalRefused`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RetrievalError as exc:
            raise RetrievalRefused(str(exc)) from None
    return wrapper


@_refusing
def check_retrieval_backend(task: str, config: Mapping[str, Any] | None = None) -> None:
    """Preflight of retrieval tasks (``tasks/_task.py``): runs when lmms-eval builds the task, after
    the model and before the data set loads.

    Refuses invalid ``retrieval_*`` settings, a run without a quant_vlm model
    (another backend would answer with generated text), and a model family
    without a scorer.  The family comes from the live quant_vlm backends' metadata; with
    ``calib_source=task`` quantization (and so that record) waits for the first
    requests, and the family is checked then, still before any image loads.
    """
    RetrievalSettings.from_generation_kwargs((config or {}).get("generation_kwargs") or {})
    from .registry import LIVE_BACKENDS

    backends = list(LIVE_BACKENDS)
    if not backends:
        raise RetrievalRefused(f"task {task}: retrieval tasks are answered by --model quant_vlm (one similarity matrix per "
                               "gallery); no quant_vlm model has been built in this process")
    for lm in backends:
        if lm.metadata:
            scorer_for(lm.metadata.get("model", {}).get("family"), task)


def is_retrieval_request(request) -> bool:
    """Whether an lmms-eval generate_until request belongs to a retrieval task (``retrieval: true``)."""
    gen = request.args[1] if len(request.args) > 1 else None
    return isinstance(gen, Mapping) and bool(gen.get("retrieval"))


def distributed() -> bool:
    """Whether this process is one of several (torchrun / accelerate launch) with a process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@_refusing
def serve_with_retrieval(lm, requests: list, generate: Callable[[list], list[str]]) -> list[str]:
    """Answer retrieval requests here and pass the others to ``generate``, keeping lmms-eval's order.

    With several processes, lmms-eval hands each rank a share of a gallery's image documents; the ranks
    exchange which documents they hold (a collective: every rank calls this, with or without retrieval
    requests), every rank scores the whole gallery (its documents are on every rank) and answers its own
    requests, so the ranks are exactly those of one process.
    """
    answers: list[str | None] = [None] * len(requests)
    galleries: dict[tuple[str, str], list[int]] = {}
    rest = []
    for i, request in enumerate(requests):
        if is_retrieval_request(request):
            galleries.setdefault((request.args[4], request.args[5]), []).append(i)
        else:
            rest.append(i)
    whole = _gather_galleries({key: [requests[i].args[3] for i in idx] for key, idx in galleries.items()}) if distributed() else None
    for (task, split), idx in galleries.items():
        if whole is None:
            texts = retrieve(lm, [requests[i] for i in idx], task, split)
        else:  # the whole gallery, in document order (as one process sees it); lmms-eval's rank padding repeats a request
            ids = whole[(task, split)]
            template = requests[idx[0]].args
            by_id = dict(zip(ids, retrieve(lm, [SimpleNamespace(args=(*template[:3], d, task, split)) for d in ids], task, split)))
            texts = [by_id[requests[i].args[3]] for i in idx]
        for i, text in zip(idx, texts, strict=True):
            answers[i] = text
    if rest:
        for i, text in zip(rest, generate([requests[i] for i in rest]), strict=True):
            answers[i] = text
    return answers  # type: ignore[return-value]


def _gather_galleries(local: dict[tuple[str, str], list[int]]) -> dict[tuple[str, str], list[int]]:
    """Every rank's retrieval documents per gallery: ``{(task, split): sorted unique doc ids}``."""
    import torch.distributed as dist

    shares: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, local)
    whole: dict[tuple[str, str], set[int]] = {}
    for share in shares:
        for key, ids in (share or {}).items():
            whole.setdefault(key, set()).update(ids)
    return {key: sorted(ids) for key, ids in whole.items()}


_SHORTLIST_MODELS: dict[tuple[str, str], Any] = {}


def _shortlist_similarity(path: str, device, images, captions, settings, stats) -> torch.Tensor:
    from lmms_quant.models import load_vlm

    key = (path, str(device))
    if key not in _SHORTLIST_MODELS:
        _SHORTLIST_MODELS[key] = load_vlm(path, device=str(device))
    loaded = _SHORTLIST_MODELS[key]
    kind = SCORER_BY_FAMILY.get(loaded.family)
    if kind not in SHORTLIST_SCORERS:
        raise RetrievalRefused(f"retrieval_shortlist={path!r} is a {loaded.family!r} model; the first stage needs a CLIP, SigLIP "
                               "or BLIP-2 ITM checkpoint")
    if kind == "dual_encoder":
        return dual_encoder_similarity(loaded.model, loaded.processor, images, captions, batch_size=settings.batch_size, stats=stats)
    gallery = blip2_encode(loaded.model, loaded.processor, images, captions, batch_size=settings.batch_size,
                           max_text_len=settings.max_text_len or 35, stats=stats)
    t0 = time.perf_counter()
    sim = blip2_itc_similarity(gallery.image_feats, gallery.text_feats)
    stats.similarity_s += time.perf_counter() - t0
    return sim


@_refusing
def retrieve(lm, requests: list, task: str, split: str) -> list[str]:
    """Score one gallery (the requested image documents of ``task``/``split``) and answer each request.

    ``lm`` needs ``model``, ``processor``, ``family``, ``task_dict`` and, for
    generative scorers, ``_format(context, n_images)`` (QuantVLM has them).
    Captions are checked first, then the gallery size, then images load.
    """
    from lmms_quant.tasks._common import TaskDataError, doc_label, retrieval_captions

    settings = RetrievalSettings.from_generation_kwargs(requests[0].args[1])
    kind = scorer_for(getattr(lm, "family", None), task)
    docs = lm.task_dict[task][split]
    doc_ids = [r.args[3] for r in requests]
    if len(set(doc_ids)) != len(doc_ids):
        raise TaskDataError(f"task {task}: the same image document was requested twice; retrieval needs one request per image")
    captions: list[str] = []
    owner: list[int] = []
    for j, doc_id in enumerate(doc_ids):
        caps = retrieval_captions(docs[doc_id], settings.captions_field, settings.captions_per_image)
        captions += [blip_caption(c) for c in caps] if settings.text_preprocess == "blip" else caps
        owner += [j] * len(caps)
    n_img, n_txt = len(doc_ids), len(captions)
    if kind == "generative" and settings.shortlist is None and n_img * n_txt > settings.max_pairs:
        raise RetrievalRefused(
            f"task {task}: generative scoring of {n_img} images x {n_txt} captions is {n_img * n_txt:,} forward passes of "
            f"the whole model (over retrieval_max_pairs={settings.max_pairs:,}); pass --gen_kwargs "
            "retrieval_shortlist=<CLIP/SigLIP/BLIP-2 ITM checkpoint> to re-rank a first stage's top retrieval_k_test, "
            "raise retrieval_max_pairs, or use --limit"
        )
    images = []
    for request, doc_id in zip(requests, doc_ids):
        visuals = [v for v in (request.args[2](docs[doc_id]) or []) if v is not None]
        if len(visuals) != 1:
            raise TaskDataError(f"document {doc_label(docs[doc_id])}: retrieval needs exactly one image per document "
                                f"(field 'image'), got {len(visuals)}")
        images.append(visuals[0])

    stats = RetrievalStats(n_images=n_img, n_texts=n_txt)
    model, processor = lm.model, lm.processor
    with torch.inference_mode():
        if kind == "dual_encoder":
            sim = dual_encoder_similarity(model, processor, images, captions, batch_size=settings.batch_size, stats=stats)
            i2t_scores, t2i_scores = sim, sim
        elif kind == "blip2_itm":
            i2t_scores, t2i_scores = blip2_itm_retrieval(
                model, processor, images, captions, k_test=settings.k_test, batch_size=settings.batch_size,
                pair_batch_size=settings.pair_batch_size or 128, max_text_len=settings.max_text_len or 35, stats=stats)
        else:
            device, _ = device_dtype(model)
            first = None if settings.shortlist is None else _shortlist_similarity(
                settings.shortlist, device, images, captions, settings, stats)
            prompt = lm._format(settings.prompt, 1)
            i2t_scores, t2i_scores = generative_retrieval(model, processor, images, captions, prompt=prompt, settings=settings,
                                                           first=first, stats=stats)
        i2t, t2i = caption_ranks(i2t_scores, t2i_scores, owner)
    i2t, t2i = i2t.tolist(), t2i.tolist()
    counts = [0] * n_img
    for j in owner:
        counts[j] += 1
    answers, start = [], 0
    for n in counts:  # an image's captions are contiguous
        answers.append(json.dumps({"i2t": i2t[start:start + n], "t2i": t2i[start:start + n], "gallery": [n_img, n_txt]},
                                  separators=(",", ":")))
        start += n
    meta = getattr(lm, "metadata", None)
    if isinstance(meta, dict):
        meta.setdefault("retrieval", {})[task] = {"scorer": kind, **stats.to_dict(), "settings": asdict(settings)}
    log.info("retrieval %s: %s scorer, %d images x %d captions: %s", task, kind, n_img, n_txt, stats.to_dict())
    return answers
