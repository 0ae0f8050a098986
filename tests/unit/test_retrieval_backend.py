"""Retrieval inside the harness (model_wrappers/retrieval.py): ranks, re-ranking, the three scorers, serving, refusals."""

import json
import types

import numpy as np
import pytest
import torch
from lmms_eval.api.instance import Instance
from PIL import Image

from lmms_quant import retrieval as RL
from lmms_quant.metrics import recall_at_k, retrieval_ranks
from lmms_quant.model_wrappers import retrieval as R
from lmms_quant.tasks._common import RETRIEVAL_METRICS, TaskDataError, retrieval_aggregate, retrieval_process_results
from tests.fixtures.tiny_models import save_tiny_llava
from tests.fixtures.tiny_retrieval import tiny_blip2_itm, tiny_clip

torch.set_num_threads(1)

# 3 images x 6 captions (captions 2i, 2i+1 describe image i). Hand-checked ranks below.
SIM = torch.tensor([
    [0.9, 0.1, 0.8, 0.2, 0.0, 0.3],   # image 0: its captions 0.9 (i2t rank 0), 0.1 (rank 4: 0.9 0.8 0.2 0.3 above)
    [0.5, 0.4, 0.3, 0.6, 0.7, 0.1],   # image 1: 0.3 (rank 4: 0.5 0.4 0.6 0.7), 0.6 (rank 1: 0.7)
    [0.2, 0.9, 0.1, 0.0, 0.6, 0.6],   # image 2: 0.6 and 0.6 (rank 1 each: 0.9; the tie counts in the model's favour)
])
OWNER = [0, 0, 1, 1, 2, 2]


def test_caption_ranks_on_a_hand_made_similarity():
    i2t, t2i = RL.caption_ranks(SIM, SIM, OWNER)
    assert i2t.tolist() == [0, 4, 4, 1, 1, 1]
    # column t: images scoring strictly above its own, e.g. caption 1 (0.1 for image 0): 0.4 and 0.9 -> 2
    assert t2i.tolist() == [0, 2, 1, 0, 1, 0]
    best_i2t, t2i_ref = retrieval_ranks(SIM, OWNER)
    assert best_i2t.tolist() == [0, 1, 1] and t2i.tolist() == t2i_ref.tolist()


def _items(i2t, t2i, owner, n_img):
    items = []
    for j in range(n_img):
        idx = [t for t, o in enumerate(owner) if o == j]
        answer = json.dumps({"i2t": [i2t[t] for t in idx], "t2i": [t2i[t] for t in idx], "gallery": [n_img, len(owner)]})
        items.append(retrieval_process_results({"img_id": str(j)}, [answer])["i2t_R@1"])
    return items


def test_aggregation_equals_recall_at_k():
    i2t, t2i = RL.caption_ranks(SIM, SIM, OWNER)
    items = _items(i2t.tolist(), t2i.tolist(), OWNER, 3)
    got = {m: retrieval_aggregate(m)(items) for m in RETRIEVAL_METRICS}
    ref = recall_at_k(SIM, OWNER)
    assert got == pytest.approx({m: ref[m] for m in RETRIEVAL_METRICS})
    assert got["i2t_R@1"] == pytest.approx(100 / 3) and got["t2i_R@1"] == pytest.approx(50.0)
    assert got["i2t_R@5"] == got["t2i_R@5"] == 100.0
    assert got["mean_recall"] == pytest.approx((100 / 3 + 100 + 100 + 50 + 100 + 100) / 6)


def test_aggregation_refuses_an_incomplete_gallery():
    i2t, t2i = RL.caption_ranks(SIM, SIM, OWNER)
    items = _items(i2t.tolist(), t2i.tolist(), OWNER, 3)
    with pytest.raises(TaskDataError, match="do not form one gallery"):
        retrieval_aggregate("i2t_R@1")(items[:2])
    with pytest.raises(TaskDataError, match="not a retrieval result"):
        retrieval_process_results({"img_id": "7"}, ["a dog on the grass"])


def test_rerank_scores_each_candidate_pair_once_and_leaves_the_rest_at_minus_inf():
    calls = []

    def score(pairs):
        calls.append(pairs.clone())
        return (10 * pairs[:, 0] + pairs[:, 1]).float()

    stats = RL.RetrievalStats()
    i2t, t2i = RL.rerank_top_k(SIM, 2, score, add_first=False, pair_batch_size=4, stats=stats)
    pairs = torch.cat(calls)
    keys = (pairs[:, 0] * 6 + pairs[:, 1]).tolist()
    assert len(keys) == len(set(keys)) == stats.rerank_pairs
    # i2t candidates: top-2 texts per image; t2i: top-2 images per text
    assert torch.isfinite(i2t).sum(1).tolist() == [2, 2, 2]
    assert torch.isfinite(t2i).sum(0).tolist() == [2] * 6
    assert i2t[0, 0] == 0 and i2t[0, 2] == 2 and i2t[2, 1] == 21
    assert stats.rerank_forwards == (stats.rerank_pairs + 3) // 4
    # with k covering everything, re-ranking scores every pair: the result is the full matrix, both ways
    full_i2t, full_t2i = RL.rerank_top_k(SIM, 10, lambda p: SIM[p[:, 0], p[:, 1]], add_first=True)
    assert torch.equal(full_i2t, 2 * SIM) and torch.equal(full_t2i, 2 * SIM)


def _images(n, size=40):
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


CAPTIONS = ["a red circle", "a small red circle", "two blue squares", "a blue square", "a green triangle", "one triangle"]


def test_dual_encoder_similarity_is_clips_cosine_similarity():
    model, processor = tiny_clip()
    images = _images(3)
    stats = RL.RetrievalStats()
    with torch.inference_mode():
        sim = RL.dual_encoder_similarity(model, processor, images, CAPTIONS, batch_size=2, stats=stats)
        ref = model(**processor(text=CAPTIONS, images=images, return_tensors="pt", padding=True)).logits_per_image / model.logit_scale.exp()
    assert sim.shape == (3, 6)
    torch.testing.assert_close(sim, ref, atol=1e-5, rtol=1e-5)
    assert (stats.image_forwards, stats.text_forwards, stats.rerank_forwards) == (2, 3, 0)


def test_blip2_itc_and_itm_match_transformers_forward():
    model, processor = tiny_blip2_itm()
    images = _images(2)
    with torch.inference_mode():
        gallery = RL.blip2_encode(model, processor, images, CAPTIONS[:3], batch_size=2, max_text_len=35)
        itc = RL.blip2_itc_similarity(gallery.image_feats, gallery.text_feats)
        px = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        tok = processor.tokenizer(CAPTIONS[:3], padding=True, return_tensors="pt")
        for i in range(2):
            out = model(pixel_values=px[i:i + 1], input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            torch.testing.assert_close(itc[i], out.logits_per_image[0], atol=1e-5, rtol=1e-5)
            itm = RL.blip2_itm_logits(model, gallery.vit[[i] * 3], gallery.text_ids, gallery.text_mask)
            ref = model(pixel_values=px[[i] * 3], input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                        use_image_text_matching_head=True).logits_per_image[:, 1]
            torch.testing.assert_close(itm, ref, atol=1e-5, rtol=1e-5)


def test_blip2_two_stage_with_k_covering_the_gallery_is_itm_plus_itc_everywhere():
    model, processor = tiny_blip2_itm()
    images = _images(3)
    stats = RL.RetrievalStats()
    with torch.inference_mode():
        i2t, t2i = RL.blip2_itm_retrieval(model, processor, images, CAPTIONS, k_test=128, batch_size=2, pair_batch_size=5, stats=stats)
        g = RL.blip2_encode(model, processor, images, CAPTIONS, batch_size=8)
        itc = RL.blip2_itc_similarity(g.image_feats, g.text_feats)
        pairs = torch.cartesian_prod(torch.arange(3), torch.arange(6))
        full = (RL.blip2_itm_logits(model, g.vit[pairs[:, 0]], g.text_ids[pairs[:, 1]], g.text_mask[pairs[:, 1]]).view(3, 6) + itc)
    torch.testing.assert_close(i2t, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t2i, full, atol=1e-5, rtol=1e-5)
    assert stats.rerank_pairs == 18 and stats.rerank_forwards == 4 and stats.image_forwards == 2 and stats.text_forwards == 3


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from lmms_quant.models import load_vlm

    return load_vlm(str(save_tiny_llava(tmp_path_factory.mktemp("m") / "llava")))


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_generative_score_is_the_mean_caption_log_likelihood(tiny_llava, prefix_cache):
    model, processor = tiny_llava.model, tiny_llava.processor
    images = _images(2, 32)
    prompt = "USER: <image>\nProvide a one-sentence caption for the provided image. ASSISTANT:"
    score = RL.generative_pair_scorer(model, processor, images, CAPTIONS[:2], prompt=prompt, prefix_cache=prefix_cache)
    with torch.inference_mode():
        got = score(torch.tensor([[0, 0], [1, 1], [0, 1]]))
        for (i, t), value in zip([(0, 0), (1, 1), (0, 1)], got):
            full = processor(text=[prompt + " " + CAPTIONS[t]], images=[images[i]], return_tensors="pt")
            n_prompt = processor(text=[prompt], images=[images[i]], return_tensors="pt")["input_ids"].shape[1]
            labels = full["input_ids"].clone()
            labels[:, :n_prompt] = -100
            nll = model(**full, labels=labels).loss
            assert float(value) == pytest.approx(-float(nll), abs=1e-4)


# ------------------------------------------------------------------ serving
DOCS = [{"img_id": str(i), "image": im, "caption": CAPTIONS[2 * i:2 * i + 2]} for i, im in enumerate(_images(3))]
GEN = {"retrieval": True, "retrieval_captions_field": "caption", "retrieval_captions_per_image": 2, "until": ["\n\n"]}


def _instance(args):
    return Instance("generate_until", args, idx=0, metadata={"task": args[4], "doc_id": args[3], "repeats": 1})


def _request(doc_id, gen=None, task="lq_test_retrieval", ctx="ctx"):
    return _instance((ctx, dict(gen or GEN), lambda d: [d["image"]], doc_id, task, "test"))


def _lm(model, processor, family, docs=DOCS, task="lq_test_retrieval"):
    return types.SimpleNamespace(model=model, processor=processor, family=family, task_dict={task: {"test": docs}}, world_size=1,
                                 _format=lambda ctx, n: f"USER: <image>\n{ctx} ASSISTANT:")


def test_serving_answers_each_image_with_ranks_and_keeps_other_requests_in_order():
    model, processor = tiny_clip()
    lm = _lm(model, processor, "clip")
    requests = [_request(2), _request(0), _request(0, gen={"max_new_tokens": 4}, task="other"), _request(1)]
    seen = []
    answers = R.serve_with_retrieval(lm, requests, lambda reqs: seen.extend(reqs) or ["generated"] * len(reqs))
    assert [r.args[4] for r in seen] == ["other"] and answers[2] == "generated"
    parsed = [json.loads(a) for a in (answers[1], answers[3], answers[0])]  # doc order 0, 1, 2
    assert all(set(p) == {"i2t", "t2i", "gallery"} and p["gallery"] == [3, 6] and len(p["i2t"]) == 2 for p in parsed)
    assert max(len(a) for a in (answers[0], answers[1], answers[3])) < 80  # ranks only, no embeddings
    with torch.inference_mode():
        sim = RL.dual_encoder_similarity(model, processor, [d["image"] for d in DOCS], CAPTIONS)
    items = [retrieval_process_results(DOCS[j], [answers[k]])["i2t_R@1"] for j, k in ((0, 1), (1, 3), (2, 0))]
    ref = recall_at_k(sim, OWNER)
    assert {m: retrieval_aggregate(m)(items) for m in RETRIEVAL_METRICS} == pytest.approx({m: ref[m] for m in RETRIEVAL_METRICS})


def test_with_limit_the_gallery_is_the_requested_images():
    model, processor = tiny_clip()
    answers = R.retrieve(_lm(model, processor, "clip"), [_request(0), _request(1)], "lq_test_retrieval", "test")
    assert [json.loads(a)["gallery"] for a in answers] == [[2, 4], [2, 4]]


def test_generative_scoring_with_and_without_a_shortlist(tiny_llava, tmp_path):
    from tests.fixtures.tiny_retrieval import save_tiny_clip

    lm = _lm(tiny_llava.model, tiny_llava.processor, "llava")
    full = R.retrieve(lm, [_request(i, gen={**GEN, "retrieval_pair_batch_size": 4}) for i in range(3)], "lq_test_retrieval", "test")
    assert [json.loads(a)["gallery"] for a in full] == [[3, 6]] * 3
    # a first stage whose top k_test covers the gallery re-scores every pair: the same ranks
    shortlist = {**GEN, "retrieval_shortlist": str(save_tiny_clip(tmp_path / "clip")), "retrieval_k_test": 10}
    assert R.retrieve(lm, [_request(i, gen=shortlist) for i in range(3)], "lq_test_retrieval", "test") == full
    with pytest.raises(R.RetrievalRefused, match="the first stage needs a CLIP, SigLIP or BLIP-2 ITM checkpoint"):
        llava_dir = str(tmp_path / "llava")
        save_tiny_llava(llava_dir)
        R.retrieve(lm, [_request(0, gen={**GEN, "retrieval_shortlist": llava_dir})], "lq_test_retrieval", "test")


def _exploding(doc):
    raise AssertionError("images must not load")


def test_refusals_come_before_any_image_loads(monkeypatch):
    requests = [_instance(("c", dict(GEN), _exploding, i, "lq_test_retrieval", "test")) for i in range(3)]
    with pytest.raises(R.RetrievalRefused, match="model family 'qwen3_omni' cannot do image-text retrieval"):
        R.retrieve(_lm(None, None, "qwen3_omni"), requests, "lq_test_retrieval", "test")
    tight = [_instance(("c", {**GEN, "retrieval_max_pairs": 10}, _exploding, i, "lq_test_retrieval", "test")) for i in range(3)]
    with pytest.raises(R.RetrievalRefused, match=r"3 images x 6 captions is 18 forward passes .* retrieval_shortlist"):
        R.retrieve(_lm(None, None, "llava"), tight, "lq_test_retrieval", "test")
    with pytest.raises(RL.RetrievalError, match="retrieval_k_test must be >= 10"):
        RL.RetrievalSettings.from_generation_kwargs({"retrieval": True, "retrieval_k_test": 5})
    with pytest.raises(RL.RetrievalError, match="unknown setting 'retrieval_topk'; valid: retrieval_batch_size"):
        RL.RetrievalSettings.from_generation_kwargs({"retrieval_topk": 5})


def test_encoder_decoder_language_models_are_refused():
    from tests.fixtures.tiny_models import build

    with pytest.raises(RL.RetrievalError, match="encoder-decoder language model"):
        RL.generative_pair_scorer(build("blip2_t5"), None, [], [], prompt="")


class _Backend:
    """Stands in for a live quant_vlm backend (the registry holds weak references)."""

    def __init__(self, metadata):
        self.metadata = metadata


def test_preflight_refuses_without_quant_vlm_and_for_a_family_without_scorer(monkeypatch):
    import weakref

    from lmms_quant.model_wrappers import registry

    monkeypatch.setattr(registry, "LIVE_BACKENDS", weakref.WeakSet())
    with pytest.raises(R.RetrievalRefused, match="answered by --model quant_vlm"):
        R.check_retrieval_backend("lq_world_retrieval", {})
    backend = _Backend({"model": {"family": "idefics2"}})
    registry.LIVE_BACKENDS.add(backend)
    with pytest.raises(R.RetrievalRefused, match="'idefics2' cannot do image-text retrieval"):
        R.check_retrieval_backend("lq_world_retrieval", {})
    backend.metadata = {"model": {"family": "blip2_itm"}}
    R.check_retrieval_backend("lq_world_retrieval", {"generation_kwargs": GEN})
    backend.metadata = None  # quantization deferred (calib_source=task): checked per request
    R.check_retrieval_backend("lq_world_retrieval", {})


def test_bad_documents_name_the_document_and_the_field():
    model, processor = tiny_clip()
    short = [dict(DOCS[0]), dict(DOCS[1], caption=["only one"])]
    with pytest.raises(TaskDataError, match=r"document img_id='1': field 'caption' has 1 entries, expected 2"):
        R.retrieve(_lm(model, processor, "clip", docs=short), [_request(0), _request(1)], "lq_test_retrieval", "test")
    empty = [dict(DOCS[0], caption=[])]
    with pytest.raises(TaskDataError, match=r"document img_id='0': field 'caption' must be a non-empty list"):
        R.retrieve(_lm(model, processor, "clip", docs=empty), [_request(0)], "lq_test_retrieval", "test")
    no_image = [{"img_id": "5", "caption": CAPTIONS[:2]}]
    from lmms_quant.tasks._common import load_image

    req = _instance(("c", dict(GEN), lambda d: [load_image(d, "image")], 0, "lq_test_retrieval", "test"))
    with pytest.raises(TaskDataError, match=r"document img_id='5': missing field 'image'"):
        R.retrieve(_lm(model, processor, "clip", docs=no_image), [req], "lq_test_retrieval", "test")


def test_blip_caption_preprocessing_as_lavis():
    assert RL.blip_caption('A dog: "running"  on (the) GRASS.\n') == "a dog running on the grass"
    assert len(RL.blip_caption(" ".join(["w"] * 60)).split()) == 50
