"""Image-text retrieval recall@K (Flickr30k / COCO Karpathy-split protocol).

Reference: the ``report_metrics`` of LAVIS's retrieval task (itself from ALBEF and
VSE++) and ``compute_r_at_k`` of eccv-caption 0.1.0 (COCO 5K recalls):

* image-to-text (i2t, LAVIS "txt_r@K", text retrieval): an image is a hit at K if
  *any* of its ground-truth texts is among its K most similar texts;
* text-to-image (t2i, LAVIS "img_r@K", image retrieval): a text is a hit at K if
  its one image is among its K most similar images.

Ties: a candidate's 0-based rank is the number of candidates with a *strictly
greater* similarity (the optimistic rule), so tied candidates share the best rank
and the result never depends on sort order. LAVIS uses ``np.argsort`` order
instead, which only differs when scores tie exactly; with low-precision
(e.g. quantized) similarities ties become more frequent and this rule counts them
in the model's favour.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["recall_at_k", "retrieval_ranks"]

# Elements of one (rows x n_texts) block of comparisons: 8 MiB as bool, 64 MiB while
# torch sums it as int64. Much smaller blocks were slower on CPU.
_CHUNK_ELEMENTS = 1 << 23


def retrieval_ranks(similarity: torch.Tensor | np.ndarray, text_to_image: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the best ground truth for every image and every text.

    Args:
        similarity: ``(n_images, n_texts)`` scores, higher = more similar; a float
            tensor or array on any device (integer dtypes are cast to float64).
        text_to_image: length ``n_texts``; ``text_to_image[t]`` is the index of the
            image that text ``t`` describes. Every image needs at least one text.

    Returns:
        ``(i2t_ranks, t2i_ranks)``, int64 tensors of shapes ``(n_images,)`` and
        ``(n_texts,)`` on the similarity's device. ``i2t_ranks[i]`` is the number
        of texts scoring strictly higher for image ``i`` than its best-scoring
        ground-truth text; ``t2i_ranks[t]`` the number of images scoring strictly
        higher for text ``t`` than its own image.

    The matrix is read in blocks of rows, so beyond the input the memory used is
    under 100 MiB plus ``O(n_images + n_texts)``, also for 5000 x 25000.

    Raises:
        ValueError: on a wrong shape, dtype, NaN, an out-of-range image index, or an
            image with no text.
    """
    sim, owner = _check(similarity, text_to_image)
    n_images, n_texts = sim.shape
    # positive[t] = similarity of text t to its own image.
    positive = sim[owner, torch.arange(n_texts, device=sim.device)]
    # best[i] = highest similarity of image i to any of its ground-truth texts.
    best = torch.full((n_images,), -torch.inf, dtype=sim.dtype, device=sim.device)
    best = best.scatter_reduce(0, owner, positive, reduce="amax")

    i2t = torch.empty(n_images, dtype=torch.long, device=sim.device)
    t2i = torch.zeros(n_texts, dtype=torch.long, device=sim.device)
    rows = max(1, _CHUNK_ELEMENTS // n_texts)
    for start in range(0, n_images, rows):
        block = sim[start : start + rows]
        # A sum is NaN if the block holds a NaN (or both infinities): cheap test first.
        if bool(torch.isnan(block.sum())) and bool(torch.isnan(block).any()):
            raise ValueError(f"similarity contains NaN (in rows {start}-{start + rows})")
        i2t[start : start + rows] = (block > best[start : start + rows, None]).sum(1)
        t2i += (block > positive[None, :]).sum(0)
    return i2t, t2i


def recall_at_k(
    similarity: torch.Tensor | np.ndarray,
    text_to_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K in both directions, in percent (0-100).

    Args:
        similarity: ``(n_images, n_texts)`` image-text scores, higher = better
            (e.g. 1000 x 5000 for Flickr30k 1K test, 5000 x 25000 for COCO 5K).
        text_to_image: length ``n_texts``, the image index of each text.
        ks: the cut-offs K, positive integers.

    Returns:
        ``{"i2t_R@K": ..., "t2i_R@K": ... for each K, "rsum": sum of those values,
        "mean_recall": their mean}``; with the default ks, ``mean_recall`` is the
        mean of the six recalls (LAVIS's ``r_mean``) and ``rsum`` their sum (the
        RSUM of VSE++/SCAN papers). Ranks follow ``retrieval_ranks`` (ties counted
        optimistically).

    Raises:
        ValueError: see ``retrieval_ranks``; also for an empty or non-positive ks.
    """
    ks = _check_ks(ks)
    i2t, t2i = retrieval_ranks(similarity, text_to_image)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * int((ranks < k).sum()) / ranks.numel()
    values = list(out.values())
    out["rsum"] = float(sum(values))
    out["mean_recall"] = out["rsum"] / len(values)
    return out


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if not ks or bad:
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return ks


def _check(similarity: torch.Tensor | np.ndarray, text_to_image: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(similarity, (torch.Tensor, np.ndarray)):
        raise ValueError(f"similarity must be a torch.Tensor or np.ndarray of shape (n_images, n_texts), got {type(similarity).__name__}")
    sim = torch.as_tensor(similarity)
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"similarity must have shape (n_images, n_texts) with both > 0, got {tuple(sim.shape)}")
    if sim.dtype == torch.bool or sim.is_complex():
        raise ValueError(f"similarity must be real-valued, got dtype {sim.dtype}")
    if not sim.is_floating_point():
        sim = sim.double()

    owner = text_to_image.detach() if isinstance(text_to_image, torch.Tensor) else torch.as_tensor(np.asarray(text_to_image))
    n_images, n_texts = sim.shape
    if owner.ndim != 1 or owner.numel() != n_texts:
        raise ValueError(f"text_to_image must have shape ({n_texts},) to match similarity {tuple(sim.shape)}, got {tuple(owner.shape)}")
    if owner.dtype == torch.bool or owner.is_floating_point() or owner.is_complex():
        raise ValueError(f"text_to_image must hold integers, got dtype {owner.dtype}")
    owner = owner.to(device=sim.device, dtype=torch.long)
    if int(owner.min()) < 0 or int(owner.max()) >= n_images:
        raise ValueError(f"text_to_image values must lie in [0, {n_images - 1}], got min {int(owner.min())}, max {int(owner.max())}")
    counts = torch.bincount(owner, minlength=n_images)
    orphans = torch.nonzero(counts == 0).flatten()
    if orphans.numel():
        raise ValueError(
            f"{orphans.numel()} image(s) have no text in text_to_image, e.g. {orphans[:5].tolist()}; every image needs a ground-truth text"
        )
    return sim, owner
