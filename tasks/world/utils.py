"""The offline twin tasks on the bundled synthetic world (tasks/data/world).

The JSONL files follow the lmms-lab hub schemas (VQAv2, COCO-Caption2017,
flickr30k), so the same functions serve the real data sets.
"""

from lmms_quant.metrics import vqa_accuracy
from lmms_quant.tasks._common import DATA_DIR, caption_aggregate, caption_item, load_image, references, require

ROOT = DATA_DIR / "world"


def doc_to_visual(doc):
    return [load_image(doc, "image", ROOT)]


def vqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{require(doc, 'question', str)}{kw.get('post_prompt', '')}"


def vqa_process_results(doc, results):
    """Official VQAv2 accuracy (vqaEval.py): the prediction is normalised together with
    the answers, and only when the answers disagree, exactly as the official code does."""
    answers = require(doc, "answers", list)
    if not answers:
        from lmms_quant.tasks._common import TaskDataError, doc_label

        raise TaskDataError(f"document {doc_label(doc)}: field 'answers' is empty")
    return {"vqa_accuracy": vqa_accuracy(results[0], answers)}


def caption_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return kw.get("prompt", require(doc, "question", str))


CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def caption_process_results(doc, results):
    item = caption_item(require(doc, "question_id", (str, int)), results[0], references(doc, "answer"))
    return {m: item for m in CAPTION_METRICS}


caption_bleu1 = caption_aggregate("Bleu_1")
caption_bleu2 = caption_aggregate("Bleu_2")
caption_bleu3 = caption_aggregate("Bleu_3")
caption_bleu4 = caption_aggregate("Bleu_4")
caption_meteor = caption_aggregate("METEOR")
caption_rougel = caption_aggregate("ROUGE_L")
caption_cider = caption_aggregate("CIDEr")
