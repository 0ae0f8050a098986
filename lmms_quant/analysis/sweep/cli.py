"""``lmms-quant sweep FILE.yaml``: run a grid of per-component recipes through lmms-eval.

A sweep file names models, methods, per-component bit grids, fixed recipe
options, tasks, ``limit`` and calibration (see :class:`SweepSpec` and
``examples/sweep_toy.yaml``).  The grid is expanded into configurations
(:func:`expand`), and each runs through lmms-eval's Python API
(``lmms_eval.evaluator.simple_evaluate`` with a model *instance*): the
full-precision model is loaded once per model and worker, its weights are
restored from a CPU snapshot before every configuration (and checked against
the snapshot's fingerprint), then quantized with :func:`lmms_quant.quantize_`.

Layout of the output folder::

    sweep.json                          the manifest: spec, and every configuration with its digest
    progress.json                       done / failed / remaining / ETA, rewritten after each configuration
    <config-id>/config.json             what the configuration is (model_args, recipe, digest)
    <config-id>/<date>_results.json     lmms-eval's results JSON, with the ``lmms_quant`` key
    <config-id>/<date>_samples_<task>.jsonl
    <config-id>/FAILED.json             the error of a failed configuration (until it succeeds)

Resuming: the state lives in the folder, not in memory.  A configuration is
done when its results JSON exists; that file is written last, by
``os.replace`` from a hidden staging folder, so a ``kill -9`` at any moment
leaves either a complete result or none.  A rerun skips done configurations,
retries failed ones only with ``--retry-failed``, and refuses to mix results
of changed settings (the digest).  Each configuration is claimed with an
exclusive ``flock`` on ``<config-id>/.lock`` (released by the kernel when a
process dies), so concurrent workers (SLURM jobs, one process per GPU) never
run the same configuration twice.

Executors: ``local`` (this process), ``slurm`` (submitit), ``submitit-local``
and ``debug`` (submitit's LocalExecutor and DebugExecutor, for testing).
Data-parallel evaluation of each configuration on several GPUs:
``accelerate launch --num_processes N -m lmms_quant.cli sweep FILE.yaml`` or
``torchrun --nproc_per_node N -m lmms_quant.cli sweep FILE.yaml`` (every rank
loads the model; lmms-eval shards the documents; rank 0 decides which
configurations run and writes the files).  Several workers on one output
folder (one per GPU) share the configurations out through the locks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .executors import run_sweep
from .run import _dist
from .spec import EXECUTORS, SweepSpecError, expand, load_spec
from .state import sweep_status


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of per-component recipes (resumable)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="the sweep YAML file")
    p.add_argument("--output", "-o", help="output folder (default: the file's 'output', else results/sweeps/<name>)")
    p.add_argument("--retry-failed", action="store_true", help="run failed configurations again")
    p.add_argument("--status", action="store_true", help="print every configuration's state and exit")
    p.add_argument("--dry-run", action="store_true", help="list the configurations and their --model_args, run nothing")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: this process; slurm: submitit jobs; submitit-local/debug: submitit's local executors")
    p.add_argument("--jobs", type=int, default=1, help="number of submitit jobs to split the remaining configurations into")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a submitit parameter, e.g. slurm_partition=gpu, timeout_min=240, gpus_per_node=1 (repeatable)")
    p.add_argument("--no-wait", action="store_true", help="with submitit: return after submitting")
    p.set_defaults(func=main)


def _param_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def main(ns: argparse.Namespace) -> int:
    try:
        spec = load_spec(ns.file)
    except SweepSpecError as exc:
        print(f"lmms-quant sweep: {exc}", file=sys.stderr)
        return 2
    out = Path(ns.output or spec.output or Path("results") / "sweeps" / spec.name)
    if ns.dry_run:
        for cfg in expand(spec):
            print(f"{cfg.id}\t--model_args {cfg.model_args(spec)}")
        print(f"{len(expand(spec))} configurations; tasks {','.join(spec.tasks)}; limit {spec.limit}; output {out}")
        return 0
    if ns.status:
        for s in sweep_status(spec, out):
            print(f"{s.status:9s} {s.config.id}" + (f"  ({s.detail})" if s.detail else ""))
        return 0
    params = {}
    for item in ns.param:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"lmms-quant sweep: --param {item!r} must be KEY=VALUE", file=sys.stderr)
            return 2
        params[key] = _param_value(value)
    try:
        states = run_sweep(spec, out, retry_failed=ns.retry_failed, executor=ns.executor, jobs=ns.jobs,
                           executor_params=params, wait=not ns.no_wait)
    except SweepSpecError as exc:
        print(f"lmms-quant sweep: {exc}", file=sys.stderr)
        return 2
    if _dist()[0] != 0 or ns.no_wait:
        return 0
    failed = [s for s in states if s.status == "failed"]
    for s in failed:
        print(f"failed: {s.config.id}: {s.detail}", file=sys.stderr)
    pending = [s for s in states if s.status == "pending"]
    if pending:
        print(f"{len(pending)} configuration(s) still pending (claimed by another worker, or interrupted)", file=sys.stderr)
    return 1 if failed or pending else 0
