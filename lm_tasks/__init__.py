"""lm-eval task YAMLs shipped with lmms-quant (installed as ``lmms_quant.lm_tasks``).

Kept apart from ``tasks/`` (lmms-eval's task folder) because the two harnesses
read different YAML dialects.  ``lmms-quant lm-eval`` adds this folder to
lm-eval's task search path; with the plain ``lm_eval`` CLI pass
``--include_path`` (see :func:`lmms_quant.model_wrappers.lm_eval_plugin.lm_tasks_dir`).
"""
