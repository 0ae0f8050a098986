"""What quant_vlm knows about lmms-eval's own tasks: the ones scored by an external judge model, and the
log-likelihood results that lmms-eval 0.7.x would otherwise mangle.

Judge-scored tasks (:data:`JUDGE_TASKS`) send model answers to an API model to extract or grade them.
Without the API's key they do not fail: mmbench's GPT fallback records a random letter for every answer
it cannot parse, after about 45 s of retries each; mathvista's judge returns "" (wrong or lucky scores).
quant_vlm refuses such a task before any generation unless the key is set, naming an offline variant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lmms_eval.api.instance import GenerationResult

from lmms_quant.errors import ConfigurationError

__all__ = ["JudgeTask", "JUDGE_TASKS", "check_judge_tasks", "LoglikelihoodResult"]


@dataclass(frozen=True)
class JudgeTask:
    judge: str
    env: str
    without_key: str
    instead: str


_MMBENCH = JudgeTask("OpenAI gpt-4o-2024-11-20 (answer extraction)", "OPENAI_API_KEY",
                     "each answer without a readable letter is retried for about 45 s, then scored as a random letter",
                     "the same rows scored offline: mmbench_en_dev_static")
_MATHVISTA = JudgeTask("OpenAI gpt-4o-2024-11-20 (answer extraction)", "OPENAI_API_KEY",
                       "lmms-eval fails while loading the task; with an unusable key the judge returns '' and answers "
                       "score 0 (or a lucky nearest choice)", "none offline")

#: lmms-eval task name -> its judge.
JUDGE_TASKS: dict[str, JudgeTask] = {
    "mmbench_en_dev": _MMBENCH, "mmbench_en_test": _MMBENCH, "mmbench_cn_dev": _MMBENCH, "mmbench_cn_test": _MMBENCH,
    **{name: _MATHVISTA for name in ("mathvista_testmini", "mathvista_testmini_cot", "mathvista_testmini_solution",
                                     "mathvista_testmini_format", "mathvista_test")},
}


def check_judge_tasks(tasks: set[str]) -> None:
    """Refuse judge-scored tasks whose judge has no key (a ConfigurationError naming the task and what to use)."""
    for task in sorted(tasks):
        judge = JUDGE_TASKS.get(task)
        if judge is not None and not os.environ.get(judge.env):
            raise ConfigurationError(
                f"task {task} is scored by an external judge ({judge.judge}) and {judge.env} is not set: {judge.without_key}. "
                f"Set {judge.env} to use the judge, or run {judge.instead}"
            )


class LoglikelihoodResult(GenerationResult):
    """``(mean negative log-likelihood, is_greedy)`` in a form lmms-eval 0.7.x keeps.

    lmms-eval 0.7.3 passes every response through ``unwrap_generation_output``, which turns a plain
    tuple into the string ``"(4.32, False)"``, so its built-in ``multiple_choice`` and ``loglikelihood``
    scoring fail (``too many values to unpack``).  A ``GenerationResult`` is unwrapped to its ``text``,
    here the tuple itself.  It also unpacks and indexes like the tuple, for direct callers.
    """

    def __init__(self, nll: float, is_greedy: bool) -> None:
        super().__init__(text=(float(nll), bool(is_greedy)))

    def __iter__(self):
        return iter(self.text)

    def __getitem__(self, index):
        return self.text[index]

    def __len__(self) -> int:
        return 2

    def __eq__(self, other) -> bool:
        return tuple(self.text) == (tuple(other.text) if isinstance(other, GenerationResult) else tuple(other))

    __hash__ = None
