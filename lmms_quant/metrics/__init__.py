"""Evaluation metrics: official VQA accuracy, COCO caption scores, retrieval recall.

Pure functions over predictions and references (or a similarity matrix); no model,
no lmms-eval import. Each module's docstring names the reference implementation it
reproduces.
"""

from lmms_quant.metrics.captions import (
    ALL_CAPTION_METRICS,
    CaptionScores,
    caption_scores,
    fallback_tokenize,
)
from lmms_quant.metrics.retrieval import recall_at_k, retrieval_ranks
from lmms_quant.metrics.vqa import gqa_exact_match, normalize_answer, vqa_accuracy

__all__ = [
    "ALL_CAPTION_METRICS",
    "CaptionScores",
    "caption_scores",
    "fallback_tokenize",
    "gqa_exact_match",
    "normalize_answer",
    "recall_at_k",
    "retrieval_ranks",
    "vqa_accuracy",
]
