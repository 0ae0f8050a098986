"""VQA on the real data sets (lmms-lab hub schemas).

VQAv2, TextVQA, OK-VQA and VizWiz: official VQA accuracy (lmms_quant.metrics.vqa_accuracy)
over ``answers`` (records with ``answer`` for VQAv2, strings for the others). GQA: exact
match after VQA normalisation against ``answer``; its images come from ``imageId`` via
``$LMMS_QUANT_GQA_IMAGES`` (a folder or local parquet files) or the hub image set.
"""

from lmms_quant.metrics import gqa_exact_match, vqa_accuracy
from lmms_quant.tasks._common import GQA_IMAGES, load_image, prompt_text, require, vqa_answers

#: The study's LLaVA VQAv2 subset: the first 21,435 validation questions (10% of 214,354).
STUDY_VQAV2_QUESTIONS = 21_435


def doc_to_visual(doc):
    return [load_image(doc, "image")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return prompt_text(doc, "question", lmms_eval_specific_kwargs)


def vqa_process_results(doc, results):
    return {"vqa_accuracy": vqa_accuracy(results[0], vqa_answers(doc))}


def gqa_doc_to_visual(doc):
    return [GQA_IMAGES(require(doc, "imageId", str), doc, "imageId")]


def gqa_process_results(doc, results):
    return {"exact_match": gqa_exact_match(results[0], require(doc, "answer", str))}


def vqav2_study_subset(dataset):
    """process_docs: the first 21,435 rows of the validation split, in the hub's order."""
    return dataset.select(range(min(STUDY_VQAV2_QUESTIONS, len(dataset))))
