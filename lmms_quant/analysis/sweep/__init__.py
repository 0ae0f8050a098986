"""Sweeps: a grid of per-component recipes run through lmms-eval, resumable (``lmms-quant sweep FILE.yaml``).

One module per job: :mod:`.spec` (the sweep file, validated and expanded into configurations),
:mod:`.plan` (how configurations are grouped into jobs), :mod:`.state` (the output folder as the
sweep's state), :mod:`.run` (running configurations in this process) and :mod:`.executors` (this
process or submitit/SLURM jobs); :mod:`.cli` is the command line and documents the folder layout.
"""

from .cli import add_parser, main
from .executors import run_sweep
from .run import run_configs
from .spec import (
    CONFIG_FILE,
    FAILED_FILE,
    STAGING_PREFIX,
    MethodEntry,
    ModelEntry,
    SweepConfig,
    SweepSpec,
    SweepSpecError,
    expand,
    load_spec,
    parse_spec,
)
from .state import ConfigState, atomic_write_text, sweep_status

__all__ = ["SweepSpecError", "SweepSpec", "SweepConfig", "ModelEntry", "MethodEntry", "ConfigState", "parse_spec", "load_spec", "expand",
           "sweep_status", "run_sweep", "run_configs", "atomic_write_text", "add_parser", "main", "CONFIG_FILE", "FAILED_FILE",
           "STAGING_PREFIX"]
