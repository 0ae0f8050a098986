"""Label-free fidelity from per-sample logs (``--log_samples``).

* agreement: the share of documents whose output equals the full-precision
  run's output on the same document (``doc_id``), after stripping whitespace;
* empty generations: outputs that are empty after stripping;
* degenerate generations: a word n-gram (n = 1..4) repeated three or more
  times in a row (``"user user user"``, ``"a b a b a b"``), the usual failure of
  a broken low-bit language model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["output_text", "is_empty", "is_degenerate", "fidelity"]


def output_text(sample: Mapping[str, Any]) -> str:
    """The model output of one logged sample, as a string (lists of one are unwrapped)."""
    out = sample.get("filtered_resps", sample.get("resps"))
    while isinstance(out, list) and len(out) == 1:
        out = out[0]
    return out.strip() if isinstance(out, str) else repr(out)


def is_empty(text: str) -> bool:
    return not text.strip()


def is_degenerate(text: str, *, max_n: int = 4, repeats: int = 3) -> bool:
    """True when some word n-gram (n <= ``max_n``) occurs ``repeats`` times in a row."""
    words = text.split()
    for n in range(1, max_n + 1):
        for i in range(0, len(words) - n * repeats + 1):
            gram = words[i:i + n]
            if all(words[i + r * n:i + (r + 1) * n] == gram for r in range(1, repeats)):
                return True
    return False


def fidelity(samples: Iterable[Mapping[str, Any]], reference: Iterable[Mapping[str, Any]] | None) -> dict[str, Any]:
    """``{"n", "n_empty", "n_degenerate", "agree", "n_compared"}`` for one run and task;
    ``agree`` (a share) is None without a reference run or documents in common."""
    outs = {s["doc_id"]: output_text(s) for s in samples}
    res: dict[str, Any] = {"n": len(outs), "n_empty": sum(is_empty(t) for t in outs.values()),
                           "n_degenerate": sum(is_degenerate(t) for t in outs.values()), "agree": None, "n_compared": 0}
    if reference is not None:
        ref = {s["doc_id"]: output_text(s) for s in reference}
        common = sorted(set(outs) & set(ref), key=str)
        if common:
            res["n_compared"] = len(common)
            res["agree"] = sum(outs[d] == ref[d] for d in common) / len(common)
    return res
