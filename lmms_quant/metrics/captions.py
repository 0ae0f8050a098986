"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) as the COCO toolkit.

Reference: pycocoevalcap 1.2 (the PyPI build of tylin/coco-caption). The scores are
those of ``pycocoevalcap.eval.COCOEvalCap``: PTB tokenisation (Stanford CoreNLP
3.4.1, ``-preserveLines -lowerCase``) with the toolkit's punctuation tokens dropped,
then ``Bleu(4)`` (``option='closest'``), ``Meteor`` (1.5, ``-l en -norm``),
``Rouge`` (LCS F-measure, beta 1.2) and ``Cider`` (CIDEr-D, sigma 6, IDF from the
references of the evaluated set, so a single image always scores 0).

Differences from calling the toolkit the standard way, all about cost or failure:

* One Java tokeniser run per call for references and predictions together (the
  toolkit runs it twice) and METEOR's JVM is started once, only when METEOR is
  asked for. PTB tokenises line by line, so the tokens are the same.
* Characters that Java treats as line breaks (CR, U+2028, U+2029, VT, FF) become
  spaces first; the toolkit would silently shift every later caption by a line.
* Without Java, BLEU, ROUGE-L and CIDEr use ``fallback_tokenize``, a pure-Python
  approximation of PTB tokenisation; METEOR is reported as ``None``. Both facts are
  logged and recorded in the result (``tokenizer="fallback"``, ``warnings``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

__all__ = [
    "ALL_CAPTION_METRICS",
    "CaptionScores",
    "caption_scores",
    "fallback_tokenize",
]

logger = logging.getLogger(__name__)

ALL_CAPTION_METRICS = (
    "Bleu_1",
    "Bleu_2",
    "Bleu_3",
    "Bleu_4",
    "METEOR",
    "ROUGE_L",
    "CIDEr",
)
_BLEU = ALL_CAPTION_METRICS[:4]
# Tokens the toolkit removes after PTB tokenisation (ptbtokenizer.PUNCTUATIONS).
_PTB_DROPPED = frozenset(ptbtokenizer.PUNCTUATIONS)
# Java's PTBTokenizer ends a line at these as well as at "\n".
_JAVA_LINE_BREAKS = re.compile("[\r\u2028\u2029\x0b\x0c]")


@dataclass(frozen=True)
class CaptionScores:
    """Corpus scores of one ``caption_scores`` call.

    Attributes:
        scores: metric name -> corpus score (the toolkit's ``COCOEvalCap.eval``
            value); ``None`` for METEOR when Java is missing.
        per_image: metric name -> {key: score of that image}, for computed metrics.
        tokenizer: ``"ptb"`` (the toolkit's Java PTB tokenizer) or ``"fallback"``
            (``fallback_tokenize``; scores are then not comparable to published ones).
        meteor_available: whether Java was found, i.e. METEOR can be computed.
        warnings: human-readable notes about anything that departs from the toolkit.
    """

    scores: dict[str, float | None]
    per_image: dict[str, dict[Hashable, float]]
    tokenizer: str
    meteor_available: bool
    warnings: tuple[str, ...] = field(default=())

    def __getitem__(self, metric: str) -> float | None:
        return self.scores[metric]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary without the per-image scores."""
        return {
            "scores": dict(self.scores),
            "tokenizer": self.tokenizer,
            "meteor_available": self.meteor_available,
            "warnings": list(self.warnings),
        }


def caption_scores(
    references: Mapping[Hashable, Sequence[str]],
    predictions: Mapping[Hashable, str],
    metrics: Sequence[str] = ALL_CAPTION_METRICS,
) -> CaptionScores:
    """Score one predicted caption per image against its reference captions.

    Args:
        references: image key -> non-empty list of reference captions (raw text).
        predictions: image key -> the predicted caption (raw text); same keys.
        metrics: a non-empty subset of ``ALL_CAPTION_METRICS``.

    Returns:
        A ``CaptionScores`` whose figures equal pycocoevalcap's (PTB tokenizer, then
        each scorer) when Java is present.

    Raises:
        ValueError: on unknown metric names, mismatched keys, an empty or non-list
            reference set, or a non-string caption; the message names the key.
        RuntimeError: if Java is present but the tokenizer or METEOR fails.
    """
    wanted = _check_metrics(metrics)
    keys = _check_inputs(references, predictions)
    java = shutil.which("java")
    notes: list[str] = []

    ref_counts = [len(references[k]) for k in keys]
    sentences = [c for k in keys for c in references[k]] + [predictions[k] for k in keys]
    if java is not None:
        tokens = _ptb_tokenize(sentences, java)
        tokenizer = "ptb"
    else:
        tokens = [fallback_tokenize(s) for s in sentences]
        tokenizer = "fallback"
        notes.append(
            "java not found: captions tokenised by the pure-Python fallback, not by "
            "PTBTokenizer; BLEU/ROUGE-L/CIDEr may differ from the COCO toolkit's"
        )
    gts: dict[int, list[str]] = {}
    start = 0
    for i, n in enumerate(ref_counts):
        gts[i] = tokens[start : start + n]
        start += n
    res = {i: [tokens[start + i]] for i in range(len(keys))}

    if "CIDEr" in wanted and len(keys) < 2:
        notes.append("CIDEr's IDF comes from the evaluated set: one image scores 0")

    scores: dict[str, float | None] = {}
    per_image: dict[str, dict[Hashable, float]] = {}

    def record(name: str, corpus: float, images: Sequence[float]) -> None:
        scores[name] = float(corpus)
        per_image[name] = {k: float(v) for k, v in zip(keys, images, strict=True)}

    if wanted & set(_BLEU):
        bleu, bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
        for n, name in enumerate(_BLEU):
            if name in wanted:
                record(name, bleu[n], bleu_images[n])
    if "METEOR" in wanted:
        if java is None:
            scores["METEOR"] = None
            notes.append("java not found: METEOR not computed (reported as None)")
        else:
            record("METEOR", *_meteor(gts, res))
    if "ROUGE_L" in wanted:
        record("ROUGE_L", *Rouge().compute_score(gts, res))
    if "CIDEr" in wanted:
        record("CIDEr", *Cider().compute_score(gts, res))

    for note in notes:
        logger.warning(note)
    ordered = {m: scores[m] for m in ALL_CAPTION_METRICS if m in wanted}
    return CaptionScores(
        scores=ordered,
        per_image=per_image,
        tokenizer=tokenizer,
        meteor_available=java is not None,
        warnings=tuple(notes),
    )


# --------------------------------------------------------------------------- Java


def _ptb_tokenize(sentences: list[str], java: str) -> list[str]:
    """Run the toolkit's PTBTokenizer command once over ``sentences``.

    Same command, jar and post-processing as ``ptbtokenizer.PTBTokenizer.tokenize``
    (lower-cased tokens, ``PUNCTUATIONS`` dropped), but the temporary file lives in
    the system temp dir, not in site-packages, and the line count is checked.
    """
    jar_dir = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
    text = "\n".join(_JAVA_LINE_BREAKS.sub(" ", s.replace("\n", " ")) for s in sentences)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "wb") as f:
            f.write(text.encode())
        cmd = [
            java,
            "-cp",
            ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR,
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            path,
        ]
        proc = subprocess.run(cmd, cwd=jar_dir, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed (exit {proc.returncode}): {proc.stderr.decode()[-2000:]}")
    # -preserveLines writes exactly one "\n" per input "\n", so n captions give n lines.
    lines = proc.stdout.decode().split("\n")
    if len(lines) != len(sentences):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(sentences)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in _PTB_DROPPED) for line in lines]


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
    """Start METEOR 1.5 once, score every image, and always stop the JVM."""
    scorer = Meteor()
    proc = scorer.meteor_p
    try:
        return scorer.compute_score(gts, res)
    except (ValueError, OSError) as exc:
        proc.kill()
        err = proc.stderr.read().decode(errors="replace")[-2000:]
        raise RuntimeError(f"METEOR (Java) failed: {exc}; stderr: {err}") from exc
    finally:
        if scorer.lock.locked():  # compute_score does not release it on errors,
            scorer.lock.release()  # and Meteor.__del__ would then block forever
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# ------------------------------------------------------------------ fallback PTB

_BRACKETS = {
    "(": "-lrb-",
    ")": "-rrb-",
    "[": "-lsb-",
    "]": "-rsb-",
    "{": "-lcb-",
    "}": "-rcb-",
}
_SPLIT_WORDS = {
    "cannot": "can not",
    "gonna": "gon na",
    "gotta": "got ta",
    "wanna": "wan na",
    "gimme": "gim me",
    "lemme": "lem me",
}
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "inc", "ltd"})
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)(?=\W|$)")
_QUOTE = re.compile(r"(?:(?<=\s)|^)'+|'+(?=\s|$)")
_SPLIT_PUNCT = re.compile(r"(\.\.\.|--|[?!]+|[;%$#]|,(?!\d)|(?<!\d),|:(?!\d)|(?<!\d):)")


def fallback_tokenize(sentence: str) -> str:
    """Approximate PTB tokenisation + the toolkit's punctuation removal, in Python.

    Lower-cases; writes brackets as ``-lrb-``/``-rrb-``/... (kept by the toolkit,
    which only drops the upper-case forms); drops double and quoting single quotes,
    backquotes and the ``PUNCTUATIONS`` tokens (``. , : ; ? ! - -- ...``); splits off
    clitics (``can't`` -> ``ca n't``, ``dog's`` -> ``dog 's``) and ``% $ #``; keeps
    periods inside numbers and acronyms (``3.5``, ``u.s.a.``), commas and colons
    between digits, and hyphens inside words. Used only when Java is missing.

    Returns:
        The space-separated tokens, as the toolkit's tokenizer returns them.
    """
    s = sentence.lower().replace("\u2019", "'").replace("\u2018", "'")
    s = re.sub(r"([()\[\]{}])", r" \1 ", s)
    s = re.sub('["`\u201c\u201d]', " ", s)
    s = _QUOTE.sub(" ", s)
    s = _SPLIT_PUNCT.sub(r" \1 ", s)
    tokens: list[str] = []
    for word in s.split():
        word = _SPLIT_WORDS.get(word, word)
        word = _CLITIC.sub(r" \1 ", word)
        for token in word.split():
            token = _BRACKETS.get(token) or token.strip("-") or token
            if token.endswith(".") and token not in _PTB_DROPPED:
                stem = token.rstrip(".")
                if stem and "." not in stem and stem not in _ABBREVIATIONS:
                    token = stem  # a sentence period: PTB splits it off, then dropped
            if token not in _PTB_DROPPED:
                tokens.append(token)
    return " ".join(tokens)


# ------------------------------------------------------------------ validation


def _check_metrics(metrics: Sequence[str]) -> set[str]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in ALL_CAPTION_METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {ALL_CAPTION_METRICS}, got {list(metrics)!r}")
    return set(metrics)


def _check_inputs(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str]) -> list[Hashable]:
    if not isinstance(references, Mapping) or not isinstance(predictions, Mapping):
        raise ValueError(
            f"references and predictions must be mappings keyed by image, got {type(references).__name__} and {type(predictions).__name__}"
        )
    if not references:
        raise ValueError("references is empty: nothing to score")
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing or extra:
        raise ValueError(
            "predictions and references must have the same keys: "
            f"no prediction for {missing[:5]!r}{' ...' if len(missing) > 5 else ''}, "
            f"no references for {extra[:5]!r}{' ...' if len(extra) > 5 else ''}"
        )
    for key, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise ValueError(f"references[{key!r}] must be a list of str, got {type(refs).__name__}")
        if len(refs) == 0:
            raise ValueError(f"references[{key!r}] is empty")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise ValueError(f"references[{key!r}][{j}] must be a str, got {type(ref).__name__}")
        if not isinstance(predictions[key], str):
            raise ValueError(f"predictions[{key!r}] must be a str, got {type(predictions[key]).__name__}")
    return list(references)
