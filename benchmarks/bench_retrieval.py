"""Retrieval at Flickr30k 1K scale: 1,000 images x 5,000 captions with a tiny random CLIP and BLIP-2 ITM.

    python benchmarks/bench_retrieval.py [--images 1000] [--captions-per-image 5] [--k-test 128] [--threads 1]

The scorers of ``model_wrappers/retrieval.py`` must cost encodings plus one
similarity matrix: one encoder pass per batch of images and per batch of
captions, never one per pair; BLIP-2 ITM adds LAVIS's re-ranking of at most
(N_img + N_txt) x k_test distinct pairs.  Prints the time split (image
encoding, text encoding, similarity, re-ranking, ranks) and the forward
passes, and checks those counts.  Images are random pixel tensors; captions
are drawn from a small vocabulary (seeded).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--k-test", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--pair-batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from lmms_quant import retrieval as RL
    from tests.fixtures.tiny_retrieval import WORDS, tiny_blip2_itm, tiny_clip

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = args.images, args.images * args.captions_per_image
    pixels = torch.randn(n_img, 3, 32, 32, generator=g)
    words = [w for w in WORDS if w.isalpha()]
    captions = [" ".join(words[i] for i in torch.randint(len(words), (8,), generator=g).tolist()) for _ in range(n_txt)]
    owner = [i // args.captions_per_image for i in range(n_txt)]
    print(f"gallery: {n_img} images x {n_txt} captions, batch {args.batch_size}, k_test {args.k_test}, {args.threads} thread(s)")
    print(f"{'scorer':<12} {'image enc':>10} {'text enc':>10} {'similarity':>10} {'re-rank':>10} {'ranks':>8} {'total':>8}   forward passes")

    for name in ("clip", "blip2_itm"):
        model, processor = tiny_clip() if name == "clip" else tiny_blip2_itm()
        stats = RL.RetrievalStats(n_images=n_img, n_texts=n_txt)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if name == "clip":
                sim = RL.dual_encoder_similarity(model, processor, pixels, captions, batch_size=args.batch_size, stats=stats)
                i2t_scores = t2i_scores = sim
            else:
                i2t_scores, t2i_scores = RL.blip2_itm_retrieval(model, processor, pixels, captions, k_test=args.k_test,
                                                               batch_size=args.batch_size, pair_batch_size=args.pair_batch_size,
                                                               stats=stats)
            t1 = time.perf_counter()
            RL.caption_ranks(i2t_scores, t2i_scores, owner)
        t2 = time.perf_counter()
        print(f"{name:<12} {stats.image_encode_s:>9.2f}s {stats.text_encode_s:>9.2f}s {stats.similarity_s:>9.2f}s "
              f"{stats.rerank_s:>9.2f}s {t2 - t1:>7.2f}s {t2 - t0:>7.2f}s   image {stats.image_forwards}, text {stats.text_forwards}, "
              f"re-rank {stats.rerank_forwards} ({stats.rerank_pairs:,} pairs)")
        assert stats.image_forwards == math.ceil(n_img / args.batch_size), "images must be encoded once, in batches"
        assert stats.text_forwards == math.ceil(n_txt / args.batch_size), "captions must be encoded once, in batches"
        if name == "clip":
            assert stats.rerank_forwards == 0
        else:
            assert stats.rerank_pairs <= (n_img + n_txt) * args.k_test
            assert stats.rerank_forwards == math.ceil(stats.rerank_pairs / args.pair_batch_size)
    print(f"(all-pairs scoring would take {n_img * n_txt:,} pair evaluations)")


if __name__ == "__main__":
    main()
