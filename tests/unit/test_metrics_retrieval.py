"""Retrieval recall@K against a brute-force reference and against eccv-caption."""

import warnings

import numpy as np
import pytest
import torch

from lmms_quant.metrics import recall_at_k, retrieval_ranks
from lmms_quant.metrics import retrieval as retrieval_module


def _brute_force(sim, owner, ks):
    """Pair-by-pair reference with the same optimistic tie rule."""
    n_images, n_texts = len(sim), len(sim[0])
    i2t, t2i = [], []
    for i in range(n_images):
        ranks = []
        for t in range(n_texts):
            if owner[t] == i:
                ranks.append(sum(sim[i][u] > sim[i][t] for u in range(n_texts)))
        i2t.append(min(ranks))
    for t in range(n_texts):
        own = sim[owner[t]][t]
        t2i.append(sum(sim[j][t] > own for j in range(n_images)))
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    return out, i2t, t2i


def test_hand_made_example():
    # Two images, four texts: texts 0, 1 describe image 0, texts 2, 3 image 1.
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.8, 0.2],  # image 0: best text is 1 (its own) -> rank 0
            [0.7, 0.3, 0.2, 0.1],  # image 1: own texts 2, 3 beaten by 0 and 1 -> rank 2
        ]
    )
    owner = [0, 0, 1, 1]
    i2t, t2i = retrieval_ranks(sim, owner)
    assert i2t.tolist() == [0, 2]
    # text 0: image 1 scores 0.7 > 0.1 -> 1; text 1: 0.9 best -> 0;
    # text 2: 0.8 (image 0) > 0.2 -> 1; text 3: 0.2 > 0.1 -> 1.
    assert t2i.tolist() == [1, 0, 1, 1]
    result = recall_at_k(sim, owner, ks=(1, 2))
    assert result == {
        "i2t_R@1": 50.0,
        "i2t_R@2": 50.0,
        "t2i_R@1": 25.0,
        "t2i_R@2": 100.0,
        "rsum": 225.0,
        "mean_recall": 56.25,
    }


def test_ties_are_counted_optimistically():
    # All equal: nothing is strictly greater, so every rank is 0.
    result = recall_at_k(np.zeros((3, 6)), [0, 0, 1, 1, 2, 2], ks=(1,))
    assert result["i2t_R@1"] == 100.0
    assert result["t2i_R@1"] == 100.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk_elements", [7, 1 << 20])
def test_matches_brute_force_with_ties(seed, chunk_elements, monkeypatch):
    monkeypatch.setattr(retrieval_module, "_CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(seed)
    n_images = int(rng.integers(2, 9))
    n_texts = n_images + int(rng.integers(0, 15))
    owner = np.concatenate([np.arange(n_images), rng.integers(0, n_images, n_texts - n_images)])
    rng.shuffle(owner)
    # Few distinct values -> many ties.
    sim = rng.integers(0, 4, size=(n_images, n_texts)).astype(np.float32)
    ks = (1, 2, 5)
    expected, exp_i2t, exp_t2i = _brute_force(sim.tolist(), owner.tolist(), ks)
    i2t, t2i = retrieval_ranks(torch.from_numpy(sim), owner.tolist())
    assert i2t.tolist() == exp_i2t
    assert t2i.tolist() == exp_t2i
    result = recall_at_k(sim, owner, ks=ks)
    assert {k: v for k, v in result.items() if "@" in k} == expected
    assert result["rsum"] == pytest.approx(sum(expected.values()), abs=1e-9)
    assert result["mean_recall"] == pytest.approx(sum(expected.values()) / 6, abs=1e-9)


def test_input_types_agree():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(5, 12))
    owner = np.repeat(np.arange(5), [2, 3, 2, 4, 1])
    reference = recall_at_k(sim, owner)
    assert recall_at_k(torch.from_numpy(sim), torch.from_numpy(owner)) == reference
    assert recall_at_k(sim.astype(np.float32), owner.tolist()) == reference
    # Integers are cast to float64.
    assert recall_at_k(np.round(sim * 1e6).astype(np.int64), owner) == reference


@pytest.mark.parametrize(
    ("similarity", "owner", "ks", "message"),
    [
        (np.zeros(4), [0, 0, 0, 0], (1,), r"\(n_images, n_texts\).*\(4,\)"),
        (np.zeros((2, 0)), [], (1,), r"got \(2, 0\)"),
        (np.zeros((2, 3)), [0, 1], (1,), r"shape \(3,\).*got \(2,\)"),
        (np.zeros((2, 3)), [0, 1, 2], (1,), r"\[0, 1\]"),
        (np.zeros((2, 3)), [0, 1, -1], (1,), r"\[0, 1\]"),
        (np.zeros((2, 3)), [0, 0, 0], (1,), r"no text.*\[1\]"),
        (np.zeros((2, 3)), [0.0, 1.0, 1.0], (1,), "integers"),
        (np.array([[0.0, np.nan, 1.0], [0, 0, 0]]), [0, 1, 1], (1,), "NaN"),
        (np.zeros((2, 3), dtype=bool), [0, 1, 1], (1,), "real-valued"),
        ([[0.0, 1.0]], [0, 0], (1,), "torch.Tensor or np.ndarray"),
        (np.zeros((2, 3)), [0, 1, 1], (), "ks"),
        (np.zeros((2, 3)), [0, 1, 1], (0, 1), "ks"),
    ],
)
def test_rejects_bad_input(similarity, owner, ks, message):
    with pytest.raises(ValueError, match=message):
        recall_at_k(similarity, owner, ks=ks)


def _coco5k_similarity(i2t_gt, image_ids, caption_ids, rng):
    """A 5000 x 25000 float32 similarity whose relevant orderings have no ties.

    Non-matching pairs get even integers 2 * ((c_i + d_t) mod P) (P prime), distinct
    along every row and every column; matching pairs get odd integers near the top
    (a geometric rank offset), so they never tie with a non-matching pair. All
    values are below 2**24, hence exact in float32.
    """
    p = 25013
    n_images, n_texts = len(image_ids), len(caption_ids)
    c = torch.from_numpy(rng.permutation(p)[:n_images].astype(np.float32))
    d = torch.from_numpy(rng.permutation(p)[:n_texts].astype(np.float32))
    sim = c[:, None] + d[None, :]
    torch.remainder(sim, p, out=sim)
    sim.mul_(2)
    col = {cid: j for j, cid in enumerate(caption_ids)}
    rows, cols = [], []
    for i, iid in enumerate(image_ids):
        for cid in i2t_gt[iid]:
            rows.append(i)
            cols.append(col[cid])
    offset = rng.geometric(1 / 40, size=len(rows)) - 1
    values = 2 * np.maximum(p - offset, 0) + 1
    sim[rows, cols] = torch.from_numpy(values.astype(np.float32))
    return sim


def test_matches_eccv_caption_on_coco_5k_structure():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "failed to import ujson"
        eccv_caption = pytest.importorskip("eccv_caption")
        metrics = eccv_caption.Metrics()
    i2t_gt, t2i_gt = metrics.coco_gts["i2t"], metrics.coco_gts["t2i"]
    image_ids = sorted(i2t_gt)
    caption_ids = sorted(t2i_gt)
    assert (len(image_ids), len(caption_ids)) == (5000, 25000)

    sim = _coco5k_similarity(i2t_gt, image_ids, caption_ids, np.random.default_rng(0))
    row = {iid: i for i, iid in enumerate(image_ids)}
    owner = [row[t2i_gt[cid][0]] for cid in caption_ids]
    ours = recall_at_k(sim, owner, ks=(1, 5, 10))

    top_texts = torch.topk(sim, 10, dim=1).indices.tolist()
    top_images = torch.topk(sim, 10, dim=0).indices.T.tolist()
    del sim
    retrieved = {
        "i2t": {iid: [caption_ids[j] for j in top_texts[i]] for i, iid in enumerate(image_ids)},
        "t2i": {cid: [image_ids[j] for j in top_images[t]] for t, cid in enumerate(caption_ids)},
    }
    for k in (1, 5, 10):
        theirs = metrics.coco_5k_recalls(retrieved, "all", K=k)
        assert ours[f"i2t_R@{k}"] == pytest.approx(100 * theirs["i2t"], abs=1e-9)
        assert ours[f"t2i_R@{k}"] == pytest.approx(100 * theirs["t2i"], abs=1e-9)
    # The synthetic ranks must make the comparison informative.
    assert 5 < ours["i2t_R@1"] < ours["i2t_R@10"] < 95
    assert 5 < ours["t2i_R@1"] < ours["t2i_R@10"] < 95
