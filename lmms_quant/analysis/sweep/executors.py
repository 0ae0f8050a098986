"""Where configurations run: this process (``local``), or submitit jobs (``slurm``, ``submitit-local``, ``debug``)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .plan import _chunks
from .run import ModelLoader, _dist, load_model_entry, run_configs
from .spec import EXECUTORS, SweepConfig, SweepSpec, SweepSpecError
from .state import ConfigState, Progress, _write_manifest, sweep_status


def run_sweep(spec: SweepSpec, out: str | Path, *, retry_failed: bool = False, executor: str = "local", jobs: int = 1,
              executor_params: Mapping[str, Any] | None = None, wait: bool = True,
              emit: Callable[[str], None] | None = None, loader: ModelLoader = load_model_entry) -> list[ConfigState]:
    """Run every configuration of ``spec`` that is not done yet; return the final states.

    ``loader(entry)`` loads a model entry's full-precision model; a submitit executor pickles it
    into its jobs, so there it must be a module-level function.
    """
    out = Path(out)
    emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    rank, _ = _dist()
    states = sweep_status(spec, out)
    conflicts = [s for s in states if s.status == "conflict"]
    if conflicts:
        raise SweepSpecError(
            f"{out}: {len(conflicts)} configuration(s) here were run with other settings, e.g. {conflicts[0].config.id}: "
            f"{conflicts[0].detail}; use another output folder, or delete those configuration folders")
    if rank == 0:
        _write_manifest(spec, out)
    todo = [s.config for s in states if s.status == "pending" or (s.status == "failed" and retry_failed)]
    skipped_failed = sum(s.status == "failed" for s in states) if not retry_failed else 0
    if rank == 0:
        emit(f"[sweep {spec.name}] {len(states)} configurations: {sum(s.status == 'done' for s in states)} done, "
             f"{len(todo)} to run" + (f", {skipped_failed} failed (rerun with --retry-failed)" if skipped_failed else "")
             + f"; output {out}")
    if not todo:
        return states
    if executor == "local":
        run_configs(spec, out, [c.id for c in todo], retry_failed=retry_failed, emit=emit, loader=loader)
    elif executor in ("slurm", "submitit-local", "debug"):
        _submit(spec, out, todo, retry_failed=retry_failed, executor=executor, jobs=jobs,
                params={**spec.slurm, **(executor_params or {})}, wait=wait, emit=emit, loader=loader)
    else:
        raise SweepSpecError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    return sweep_status(spec, out)


def _submit(spec: SweepSpec, out: Path, todo: list[SweepConfig], *, retry_failed: bool, executor: str, jobs: int,
            params: Mapping[str, Any], wait: bool, emit: Callable[[str], None], loader: ModelLoader) -> None:
    try:
        import submitit
    except ImportError:
        raise SweepSpecError(f"executor {executor!r} needs submitit: pip install 'lmms-quant[analysis]'") from None
    cluster = {"slurm": "slurm", "submitit-local": "local", "debug": "debug"}[executor]
    ex = submitit.AutoExecutor(folder=str(out / ".submitit" / "%j"), cluster=cluster)
    params = dict(params)
    params.setdefault("name", f"lmms-quant-{spec.name}")
    if cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    ex.update_parameters(**params)
    chunks = _chunks(todo, jobs)
    with ex.batch():  # one job array on SLURM (one sbatch, one array task per chunk)
        submitted = [ex.submit(_job, spec, str(out), ids, retry_failed, loader) for ids in chunks]
    emit(f"[sweep {spec.name}] submitted {len(submitted)} {executor} job(s): {', '.join(str(j.job_id) for j in submitted)}")
    if not wait:
        return
    for job in submitted:
        try:
            job.result()
        except Exception as exc:  # noqa: BLE001 - report every job, then the states
            emit(f"[sweep {spec.name}] job {job.job_id} failed: {type(exc).__name__}: {exc}")
    Progress(spec, out, emit).update()


class Cancelled(KeyboardInterrupt):
    """SIGTERM reached a submitit job: ``scancel``, or the end of its time limit."""


def _stop(signum: int, frame: Any) -> None:
    raise Cancelled(f"signal {signum}: the job was cancelled")


def _job(spec: SweepSpec, out: str, ids: list[str], retry_failed: bool, loader: ModelLoader) -> dict[str, str]:
    """The body of a submitit job.  submitit ignores SIGTERM (it waits for SLURM's USR2 to checkpoint), so
    a cancelled job would run on until SLURM's KillWait and could still finish its configuration after
    ``scancel``; a sweep job has nothing to checkpoint, so SIGTERM stops it at once: the interrupted
    configuration leaves no staging folder and stays pending, and a rerun of the sweep picks it up."""
    signal.signal(signal.SIGTERM, _stop)
    return run_configs(spec, out, ids, retry_failed=retry_failed, loader=loader)
