"""Captioning on the real data sets (lmms-lab hub schemas); scored by tasks/_common.caption_aggregate.

Field names as lmms-eval 0.7.3's own coco_cap, nocaps and flickr30k tasks read them:
COCO-Caption2017 ``question_id``/``answer``; yerevann/coco-karpathy ``cocoid``/``sentences``
(no image bytes: ``url``, or ``$LMMS_QUANT_COCO_ROOT``); flickr30k ``img_id``/``caption``;
NoCaps ``image_id``/``annotations_captions``.
"""

from lmms_quant.tasks._common import (  # noqa: F401  (the caption_* aggregations are named by the YAMLs)
    CAPTION_METRICS,
    caption_bleu1,
    caption_bleu2,
    caption_bleu3,
    caption_bleu4,
    caption_cider,
    caption_item,
    caption_meteor,
    caption_rougel,
    coco_karpathy_image,
    flickr30k_karpathy_test,  # noqa: F401 (process_docs of lq_flickr30k_cap_test)
    load_image,
    references,
    require,
    require_flickr30k_split,  # noqa: F401 (preflight)
)


def doc_to_visual(doc):
    return [load_image(doc, "image")]


def karpathy_doc_to_visual(doc):
    return [coco_karpathy_image(doc)]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return (lmms_eval_specific_kwargs or {}).get("prompt", "")


def _items(image_id, prediction, refs):
    item = caption_item(image_id, prediction, refs)
    return {m: item for m in CAPTION_METRICS}


def coco2017_process_results(doc, results):
    return _items(require(doc, "question_id", (str, int)), results[0], references(doc, "answer"))


def karpathy_process_results(doc, results):
    return _items(require(doc, "cocoid", int), results[0], references(doc, "sentences"))


def flickr30k_process_results(doc, results):
    return _items(require(doc, "img_id", (str, int)), results[0], references(doc, "caption", 5))


def nocaps_process_results(doc, results):
    return _items(require(doc, "image_id", int), results[0], references(doc, "annotations_captions"))


