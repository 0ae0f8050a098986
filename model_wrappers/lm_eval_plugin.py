"""lm-eval (lm-evaluation-harness 0.4.13) hook: ``quant_llm``, ``lq_text_ppl`` and the results metadata.

lm-eval 0.4.13 has no plugin mechanism for installed packages: its model
registry is filled from a fixed table in ``lm_eval/models/__init__.py`` and by
``@register_model`` in modules that something imports; it reads no entry
points.  So the hook is explicit: :func:`install` (idempotent, and nothing
happens at import time)

* registers ``quant_llm`` lazily (lm-eval imports our backend only when asked);
* adds our ``lm_tasks/`` folder to every lm-eval ``TaskManager``, so
  ``--tasks lq_text_ppl`` works without ``--include_path``;
* moves the ``lmms_quant`` entry that our backend's ``get_model_info`` puts
  into ``results["config"]`` to the top level of the results JSON.

``lmms-quant lm-eval ARGS`` (:func:`run_lm_eval`) calls :func:`install` and
then lm-eval's own CLI.  From Python: call :func:`install`, then
``lm_eval.simple_evaluate(model="quant_llm", ...)``.
"""

from __future__ import annotations

import functools
import sys
import traceback
from pathlib import Path

__all__ = ["MODEL_NAME", "WRITTEN_RESULTS", "install", "lm_tasks_dir", "run_lm_eval"]

MODEL_NAME = "quant_llm"
_BACKEND_PATH = "lmms_quant.model_wrappers.lm_eval_backend:QuantLLM"
#: Results files written in this process (read by :func:`run_lm_eval` to say where they went).
WRITTEN_RESULTS: list[str] = []


def lm_tasks_dir() -> str:
    """Folder holding our lm-eval task YAMLs (installed as the ``lmms_quant.lm_tasks`` package)."""
    import lmms_quant.lm_tasks as pkg

    return str(Path(pkg.__file__).resolve().parent)


def _register_model() -> None:
    import lm_eval.models  # noqa: F401  -- lm-eval's own backends first: get_model() imports them only into an empty registry
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=_BACKEND_PATH)


def _register_tasks() -> None:
    from lm_eval.tasks import TaskManager

    if getattr(TaskManager.__init__, "_lmms_quant", False):
        return
    original = TaskManager.__init__

    @functools.wraps(original)
    def __init__(self, verbosity=None, include_path=None, include_defaults=True, metadata=None):
        paths = [] if include_path is None else list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
        ours = lm_tasks_dir()
        if not any(Path(p).resolve() == Path(ours) for p in paths):
            paths.append(ours)
        original(self, verbosity=verbosity, include_path=paths, include_defaults=include_defaults, metadata=metadata)

    __init__._lmms_quant = True  # type: ignore[attr-defined]
    TaskManager.__init__ = __init__


def lift_metadata(results: dict) -> dict:
    """Move ``results["config"]["lmms_quant"]`` (set by ``quant_llm``) to ``results["lmms_quant"]``, in place."""
    from lmms_quant.provenance import METADATA_KEY

    meta = (results.get("config") or {}).pop(METADATA_KEY, None)
    if meta is not None:
        results[METADATA_KEY] = meta
    return results


def _record_metadata() -> None:
    from lm_eval.loggers.evaluation_tracker import EvaluationTracker

    if getattr(EvaluationTracker.save_results_aggregated, "_lmms_quant", False):
        return
    original = EvaluationTracker.save_results_aggregated

    @functools.wraps(original)
    def save_results_aggregated(self, results, samples=None):
        lift_metadata(results)
        out = original(self, results, samples)
        date_id = getattr(self, "date_id", None)
        if self.output_path and date_id:
            path = Path(self.output_path)
            if path.suffix == ".json":  # lm-eval's two layouts for --output_path
                path = path.with_name(f"{path.stem}_{date_id}.json")
            else:
                path = path / str(self.general_config_tracker.model_name_sanitized) / f"results_{date_id}.json"
            if path.is_file():
                WRITTEN_RESULTS.append(str(path))
        return out

    save_results_aggregated._lmms_quant = True  # type: ignore[attr-defined]
    EvaluationTracker.save_results_aggregated = save_results_aggregated


def install() -> None:
    """Register ``quant_llm`` and ``lq_text_ppl`` with lm-eval and the metadata hook (idempotent)."""
    _register_model()
    _register_tasks()
    _record_metadata()


def run_lm_eval(argv: list[str]) -> int:
    """Run lm-eval's CLI (``lm-eval ARGV``) in this process with :func:`install` applied.

    Returns 0 on success and prints where the results JSON went; an exception
    from the evaluation prints its traceback and returns 1.  lm-eval's own
    argument errors exit through ``SystemExit`` as usual.
    """
    import lm_eval.__main__ as lm_main

    install()
    old_argv = sys.argv
    sys.argv = ["lm-eval", *argv]
    before = len(WRITTEN_RESULTS)
    try:
        lm_main.cli_evaluate()
    except Exception as exc:
        traceback.print_exc()
        print(f"lmms-quant: the evaluation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        sys.argv = old_argv
    for path in WRITTEN_RESULTS[before:]:
        print(f"results JSON: {path}")
    return 0
