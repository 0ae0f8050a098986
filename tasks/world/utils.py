"""The offline twin tasks on the bundled synthetic world (tasks/data/world).

The JSONL files follow the lmms-lab hub schemas (VQAv2, COCO-Caption2017,
flickr30k), so the same functions serve the real data sets.
"""

from lmms_quant.metrics import vqa_accuracy
from lmms_quant.tasks._common import (  # noqa: F401  (the caption_* aggregations are named by the YAMLs)
    CAPTION_METRICS,
    DATA_DIR,
    RETRIEVAL_METRICS,
    caption_bleu1,
    caption_bleu2,
    caption_bleu3,
    caption_bleu4,
    caption_cider,
    caption_item,
    caption_meteor,
    caption_rougel,
    load_image,
    references,
    require,
    retrieval_aggregate,
    retrieval_process_results,  # noqa: F401 (process_results of lq_world_retrieval)
    vqa_answers,
)

ROOT = DATA_DIR / "world"
#: Images in the lq_world_retrieval gallery (each with five captions): 20 x 100 = 2,000 pairs keeps a
#: generative model's likelihood scoring (one forward pass per pair) short enough for the demo.
RETRIEVAL_GALLERY = 20


def doc_to_visual(doc):
    return [load_image(doc, "image", ROOT)]


def vqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{require(doc, 'question', str)}{kw.get('post_prompt', '')}"


def vqa_process_results(doc, results):
    """Official VQAv2 accuracy (vqaEval.py): the prediction is normalised together with
    the answers, and only when the answers disagree, exactly as the official code does."""
    return {"vqa_accuracy": vqa_accuracy(results[0], vqa_answers(doc))}


def caption_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return kw.get("prompt", require(doc, "question", str))


def caption_process_results(doc, results):
    item = caption_item(require(doc, "question_id", (str, int)), results[0], references(doc, "answer"))
    return {m: item for m in CAPTION_METRICS}


# ---------------------------------------------------------------- retrieval
def require_retrieval_backend(task, config=None):
    """Preflight: quant_vlm with a model family that can score image-text pairs."""
    from lmms_quant.model_wrappers.retrieval import check_retrieval_backend

    check_retrieval_backend(task, config)


def retrieval_gallery(dataset):
    """process_docs: the first RETRIEVAL_GALLERY images."""
    return dataset.select(range(min(RETRIEVAL_GALLERY, len(dataset))))


def retrieval_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The image's first caption (used only by quant_vlm's calib_source=task calibration)."""
    return references(doc, "caption")[0]


retrieval_i2t_r1, retrieval_i2t_r5, retrieval_i2t_r10, retrieval_t2i_r1, retrieval_t2i_r5, retrieval_t2i_r10, retrieval_mean = (
    retrieval_aggregate(m) for m in RETRIEVAL_METRICS
)
