"""Image-text retrieval tasks: one request per image document, answered by quant_vlm's
retrieval scorers (model_wrappers/retrieval.py) with per-image ranks; R@K here.

Documents: lmms-lab-encoder/flickr30k rows (``image``, ``caption`` [5], ``sentids``, ``img_id``,
``filename``) and yerevann/coco-karpathy rows (``sentences``, ``filename``, ``filepath``, ``url``, ...).
"""

from lmms_quant.tasks._common import (
    RETRIEVAL_METRICS,
    coco_karpathy_image,
    flickr30k_karpathy_test,  # noqa: F401 (process_docs)
    load_image,
    references,
    require_flickr30k_split,  # noqa: F401 (preflight)
    retrieval_aggregate,
    retrieval_process_results,  # noqa: F401 (process_results)
)


def require_retrieval_backend(task, config=None):
    """Preflight: quant_vlm with a model family that can score image-text pairs."""
    from lmms_quant.model_wrappers.retrieval import check_retrieval_backend

    check_retrieval_backend(task, config)


def doc_to_visual(doc):
    return [load_image(doc, "image")]


def karpathy_doc_to_visual(doc):
    return [coco_karpathy_image(doc)]


def flickr30k_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The image's first caption: the request context, used only by quant_vlm's
    ``calib_source=task`` calibration (image + caption, the study's retrieval calibration)."""
    return references(doc, "caption")[0]


def karpathy_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return references(doc, "sentences")[0]


retrieval_i2t_r1, retrieval_i2t_r5, retrieval_i2t_r10, retrieval_t2i_r1, retrieval_t2i_r5, retrieval_t2i_r10, retrieval_mean = (
    retrieval_aggregate(m) for m in RETRIEVAL_METRICS
)
