"""lmms-eval plugin hook (entry-point group ``lmms_eval.models``).

lmms-eval 0.7.3 calls :func:`manifests` while it imports ``lmms_eval.models``,
which happens before the CLI builds its task index.  Besides returning our
model manifest, the call adds our ``tasks/`` folder to every ``TaskManager``'s
search path, so ``--tasks lq_...`` works without ``--include_path`` after
``pip install`` (the ``LMMS_EVAL_PLUGINS`` route for tasks is broken in
0.7.3: the task index is built before the plugin path is added).  Nothing
happens at import time; the patch is applied once, only when lmms-eval asks.
"""

from __future__ import annotations

import functools
from pathlib import Path

#: Results files written in this process (read by our CLI to say where they went).
WRITTEN_RESULTS: list[str] = []


def tasks_dir() -> str:
    """Folder holding our task YAMLs (installed as the ``lmms_quant.tasks`` package)."""
    import lmms_quant.tasks as tasks_pkg

    return str(Path(tasks_pkg.__file__).resolve().parent)


def _register_tasks() -> None:
    from lmms_eval.tasks import TaskManager

    if getattr(TaskManager.initialize_tasks, "_lmms_quant", False):
        return
    original = TaskManager.initialize_tasks

    @functools.wraps(original)
    def initialize_tasks(self, include_path=None, include_defaults=True):
        paths = [] if include_path is None else ([include_path] if isinstance(include_path, str) else list(include_path))
        ours = tasks_dir()
        if ours not in paths:
            paths.append(ours)
        return original(self, include_path=paths, include_defaults=include_defaults)

    initialize_tasks._lmms_quant = True  # type: ignore[attr-defined]
    TaskManager.initialize_tasks = initialize_tasks


def attach_metadata(results: dict | None, lm) -> dict | None:
    """``results`` with the backend's quantization metadata under ``lmms_quant`` (when ``lm`` has any)."""
    metadata = getattr(lm, "metadata", None)
    if isinstance(results, dict) and isinstance(metadata, dict):
        from lmms_quant.provenance import METADATA_KEY

        results[METADATA_KEY] = metadata
    return results


def carry_metadata_into_results() -> None:
    """Make lmms-eval's ``evaluate(lm, ...)`` put the backend's metadata into the results it returns.

    lmms-eval 0.7.3 never asks a model for its info, so the results JSON would not say which
    recipe produced it.  ``evaluate`` is the one place that holds both the model and the results:
    wrapped, it returns results with the backend's own ``metadata`` under a top-level
    ``lmms_quant`` key (recipe, bits per weight, quantized modules, versions, seed, weight hash,
    serving), which the tracker saves with the rest.  Called by each quant_vlm backend when it
    is built (``lmms_eval.evaluator`` cannot be imported while lmms-eval loads its plugins);
    idempotent.
    """
    import lmms_eval.evaluator as evaluator

    if getattr(evaluator.evaluate, "_lmms_quant", False):
        return
    original = evaluator.evaluate

    @functools.wraps(original)
    def evaluate(*args, **kwargs):
        lm = kwargs["lm"] if "lm" in kwargs else args[0]
        return attach_metadata(original(*args, **kwargs), lm)

    evaluate._lmms_quant = True  # type: ignore[attr-defined]
    evaluator.evaluate = evaluate


def _note_written_results() -> None:
    """Note where the tracker wrote each results file (``lmms-quant eval`` prints it)."""
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker

    if getattr(EvaluationTracker.save_results_aggregated, "_lmms_quant", False):
        return
    original = EvaluationTracker.save_results_aggregated

    @functools.wraps(original)
    def save_results_aggregated(self, results, samples, datetime_str):
        out = original(self, results, samples, datetime_str)
        if self.output_path and getattr(self, "date_id", None):
            path = Path(self.output_path) / self.general_config_tracker.model_name_sanitized / f"{self.date_id}_results.json"
            if path.is_file():
                WRITTEN_RESULTS.append(str(path))
        return out

    save_results_aggregated._lmms_quant = True  # type: ignore[attr-defined]
    EvaluationTracker.save_results_aggregated = save_results_aggregated


def manifests():
    """Entry-point payload: our ModelManifest(s); also registers our tasks and metadata hook."""
    from lmms_eval.models.registry_v2 import ModelManifest

    _register_tasks()
    _note_written_results()
    return [ModelManifest(model_id="quant_vlm", simple_class_path="lmms_quant.model_wrappers.quant_vlm.QuantVLM")]
