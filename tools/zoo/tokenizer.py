"""A word-level tokenizer that covers the prompts and every word of the world.

Built offline with the ``tokenizers`` library and wrapped as a transformers
``PreTrainedTokenizerFast``.  Text is lower-cased and split on whitespace and
punctuation (``\\w+|[^\\w\\s]+``); each piece is one token, and a piece outside
the vocabulary becomes ``<unk>``.  Ids 0-4 are the special tokens ``<pad>``,
``<s>``, ``</s>``, ``<unk>`` and ``<image>``; ``<s>`` is prepended to every
encoded text.  The decoder joins words with spaces and glues punctuation back
(``"shapes , a"`` -> ``"shapes, a"``).
"""

from __future__ import annotations

import functools
import re

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lmms_quant.world import COLOURS, SHAPES, SIZES, make_item
from lmms_quant.world.language import _DISSENT, _NUMBER_WORDS

__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "world_vocabulary"]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
# Prompts of lmms-eval and of the reference study (LLaVA and BLIP-2 forms).
PROMPT_TEXTS = (
    "USER: <image>\n{q}\nAnswer the question using a single word or phrase. ASSISTANT:",
    "USER: <image>\nProvide a one-sentence caption for the provided image. ASSISTANT:",
    "Question: {q} Short answer:",
    "A short image caption:",
)
_EXTRA_WORDS = (
    # Words a reader might use about this world; cheap to include.
    "yes no image picture photo shape shapes object objects thing things one two three zero none "
    "left right above below top bottom middle center corner next to of the a an and in on with is are "
    "there what which where how many color colour size small large big tiny relative side "
    "circles squares triangles"
)
_SAMPLE_ITEMS = 4000  # train items scanned for words (templates vary by scene)
_WORD = re.compile(r"\w+|[^\w\s]+")


def world_vocabulary(n_items: int = _SAMPLE_ITEMS) -> list[str]:
    """Sorted lower-cased words of the prompts, the world's texts and its answers (computed once per process:
    sampling 4,000 scenes takes about 40 s)."""
    return list(_world_vocabulary(n_items))


@functools.lru_cache(maxsize=4)
def _world_vocabulary(n_items: int) -> tuple[str, ...]:
    words: set[str] = set()

    def add(text: str) -> None:
        words.update(_WORD.findall(text.lower()))

    for text in PROMPT_TEXTS:
        add(text.replace("<image>", " ").replace("{q}", " "))
    add(_EXTRA_WORDS)
    add(" ".join(COLOURS) + " " + " ".join(SHAPES) + " " + " ".join(SIZES))
    add(" ".join(_DISSENT.values()) + " " + " ".join(_NUMBER_WORDS.values()) + " 0 1 2 3 4")
    for i in range(n_items):
        item = make_item("train", i)
        for c in item.captions:
            add(c)
        for q in item.questions:
            add(q.question)
            for a in q.answers:
                add(a)
    return tuple(sorted(words))


def build_tokenizer(vocabulary: list[str] | None = None, image_token_attribute: bool = True) -> PreTrainedTokenizerFast:
    """The world tokenizer as a ``PreTrainedTokenizerFast`` (left padding).

    ``image_token_attribute=False`` leaves out the ``tokenizer.image_token`` attribute (the
    ``<image>`` token itself stays, id 4): transformers 5.17's ``Blip2Processor`` calls
    ``.content`` on a tokenizer's ``image_token``, which is a ``str``, and fails on every
    image-and-text call; without the attribute it makes its own ``AddedToken``.
    """
    words = world_vocabulary() if vocabulary is None else vocabulary
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"} if image_token_attribute else {},
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
