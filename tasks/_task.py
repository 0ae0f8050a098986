"""``CheckedTask``: an lmms-eval task that runs preflight checks before its data set loads.

A task YAML opts in with lmms-eval's python-task key and lists its checks::

    class: !function lmms_quant.tasks._task.CheckedTask
    preflight:
      - !function utils.require_retrieval_backend

Each check is called as ``check(task_name, config)`` (``config``: the task's
YAML as a dict) when lmms-eval builds the task, before ``datasets`` downloads
or reads anything, so a run that cannot succeed (a model that cannot do
retrieval, a missing split file) stops before a multi-gigabyte download.
The checks raise; lmms-eval's model is already built at that point.

lmms-eval's ``TaskConfig`` rejects unknown keys, so ``class`` and
``preflight`` are removed before the rest of the config reaches it.  Python
tasks are built without lmms-eval's model name: ``lmms_eval_specific_kwargs``
use their ``default`` entry, which is what every ``lq_`` task uses anyway.
This module imports lmms-eval (slow), so only YAMLs that need it load it.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.task import ConfigurableTask

OUR_KEYS = ("class", "preflight")


class CheckedTask(ConfigurableTask):
    """A ConfigurableTask whose ``preflight`` callables run before ``download``."""

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        config = dict(config or {})
        self._preflight = list(config.get("preflight") or [])
        for check in self._preflight:
            if not callable(check):
                raise TypeError(f"task {config.get('task')!r}: every preflight entry must be a !function, got {check!r}")
        self._raw_config = {k: v for k, v in config.items() if k not in OUR_KEYS}
        super().__init__(config=self._raw_config, **kwargs)

    def download(self, dataset_kwargs=None) -> None:
        for check in self._preflight:
            check(self._raw_config.get("task"), self._raw_config)
        super().download(dataset_kwargs)
