"""VQAv2 accuracy and GQA exact match, computed as the official VQA evaluation does.

Reference: ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of GT-Vision-Lab/VQA,
commit a013f00 (2021-03-11, "Fixed processing answers bug"), the head of master.
Every table and regular expression below is copied from that file.

For one question with human answers ``a_1..a_n`` (n = 10 in VQAv2) the official
accuracy of a prediction ``p`` is the mean over the n leave-one-out subsets::

    acc(p) = 1/n * sum_j min(1, #{i != j : a_i == p} / 3)

so with n = 10, 1 matching human gives 0.3, 2 give 0.6, 3 give 0.9 and 4 or more
give 1.0.

Behaviour of the official code that is reproduced on purpose:

* Newlines and tabs become spaces and the ends are stripped, for the prediction
  and for every answer.
* Punctuation and digit/article normalisation (``processPunctuation`` then
  ``processDigitArticle``) is applied to the answers *and to the prediction* only
  when the answers are not all identical. When all human answers agree, the
  prediction must equal that answer verbatim (after the whitespace clean-up):
  ``"Two"`` or ``"2"`` against ten ``"two"`` scores 0. Real VQAv2 answers are
  already normalised, so this matters only for unnormalised ground truth. Older
  copies of the script (LAVIS, pre-2021 forks) always normalise the prediction
  and only punctuation-normalise the answers; lmms-eval 0.7.3 always normalises
  both; neither is followed here.
* ``periodStrip`` is the official ``(?!<=\\d)(\\.)(?!\\d)`` (a mistyped look-behind,
  so a period is removed unless a digit follows it), and the official call passes
  ``re.UNICODE`` (= 32) as the *count* argument, so at most 32 periods are
  removed. ``\\d`` is ASCII-only, as in the official Python 2 code where the flag
  never reached the pattern.
* The official code leaves an answer out by comparing answer dicts by value,
  which removes exactly one answer because VQAv2's ``answer_id`` values are
  distinct. Here the answer is left out by position, which gives the same result
  on official data and stays correct for answers without ``answer_id`` (where
  lmms-eval's dict comparison drops every duplicate answer at once).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = ["gqa_exact_match", "normalize_answer", "vqa_accuracy"]

# Verbatim from vqaEval.py (including its oddities, e.g. "somebody'd" -> "somebodyd"
# and capitalised keys that can never match after lower-casing).
# fmt: off
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = ("a", "an", "the")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)", re.ASCII)
_PUNCT = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
    "@", "`", ",", "?", "!",
)
# fmt: on
# The official code calls ``periodStrip.sub("", text, re.UNICODE)``: the flag lands
# in the ``count`` parameter.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_MATCHES_FOR_FULL_CREDIT = 3


def _clean_whitespace(text: str) -> str:
    """Official first step: newlines and tabs to spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """``VQAEval.processPunctuation``: delete or space out punctuation, drop periods.

    A punctuation mark is deleted when it touches a space anywhere in the input or
    when the input holds a digit-comma-digit group; otherwise it becomes a space.
    """
    out = text
    delete = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if delete or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle``: lower-case, number words to digits, drop
    articles, expand contractions written without apostrophe, single spaces."""
    words = []
    for word in text.lower().split():
        word = _MANUAL_MAP.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def _normalize(text: str) -> str:
    return _process_digit_article(_process_punctuation(text))


def normalize_answer(s: str) -> str:
    """Return the official VQA normal form of one answer string.

    Applies, in the official order: newline/tab to space and strip,
    ``processPunctuation``, ``processDigitArticle``. For example
    ``"A dog."`` -> ``"dog"``, ``"Two"`` -> ``"2"``, ``"dont"`` -> ``"don't"``.

    Raises:
        ValueError: if ``s`` is not a string.
    """
    _check_str(s, "the answer")
    return _normalize(_clean_whitespace(s))


def vqa_accuracy(prediction: str, answers: Sequence[str | Mapping[str, object]]) -> float:
    """Official VQA accuracy of one prediction, in [0, 1].

    Args:
        prediction: the model's answer.
        answers: the human answers (10 in VQAv2), as strings or as dicts with an
            ``"answer"`` string (lmms-lab format; ``answer_confidence`` and
            ``answer_id`` are ignored and may be absent).

    Returns:
        The mean over the leave-one-out subsets of ``min(1, matches / 3)``; see the
        module docstring for the normalisation rules, which follow the official
        code exactly (including normalising only when the answers disagree).

    Raises:
        ValueError: if ``prediction`` is not a string, ``answers`` is empty or a
            bare string, or an answer is neither a string nor a dict holding an
            ``"answer"`` string.
    """
    _check_str(prediction, "the prediction")
    gt = [_clean_whitespace(a) for a in _answer_strings(answers)]
    pred = _clean_whitespace(prediction)
    if len(set(gt)) > 1:
        gt = [_normalize(a) for a in gt]
        pred = _normalize(pred)
    matches = [a == pred for a in gt]
    n_match = sum(matches)
    gt_acc = [min(1, float(n_match - m) / _MATCHES_FOR_FULL_CREDIT) for m in matches]
    return float(sum(gt_acc)) / len(gt_acc)


def gqa_exact_match(prediction: str, answer: str) -> float:
    """GQA accuracy of one prediction: 1.0 if ``normalize_answer`` of both agree.

    Args:
        prediction: the model's answer.
        answer: GQA's single ground-truth answer.

    Returns:
        1.0 or 0.0. Both sides are always normalised (a single answer has no
        disagreement to trigger the VQA rule).

    Raises:
        ValueError: if either argument is not a string.
    """
    _check_str(prediction, "the prediction")
    _check_str(answer, "the answer")
    return float(normalize_answer(prediction) == normalize_answer(answer))


def _check_str(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__}: {value!r}")


def _answer_strings(answers: Sequence[str | Mapping[str, object]]) -> list[str]:
    if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence):
        raise ValueError(f"answers must be a list of str or of {{'answer': str, ...}} dicts, got {type(answers).__name__}: {answers!r}")
    if len(answers) == 0:
        raise ValueError("answers is empty: VQA accuracy needs at least one answer")
    out = []
    for i, item in enumerate(answers):
        if isinstance(item, Mapping):
            if "answer" not in item:
                raise ValueError(f"answers[{i}] is a dict without an 'answer' key: {item!r}")
            item = item["answer"]
        _check_str(item, f"answers[{i}]")
        out.append(item)
    return out
