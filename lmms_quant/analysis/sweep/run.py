"""Running configurations in this process: load each model once, restore its full-precision
weights before every configuration, quantize and evaluate through quant_vlm and lmms-eval's
Python API, and write the result atomically."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmms_quant.provenance import METADATA_KEY

from .spec import FAILED_FILE, STAGING_PREFIX, ModelEntry, SweepConfig, SweepSpec, SweepSpecError, expand
from .state import CONFIG_FILE, Progress, _claim, _clean_partial, _record_failure, _runnable, _write_json

log = logging.getLogger(__name__)


def _dist() -> tuple[int, int]:
    """(rank, world size) as set by ``accelerate launch`` or ``torchrun``."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _fingerprint(state: Mapping[str, Any]) -> str:
    """SHA-256 over every tensor of a state dict (names, then raw bytes)."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k]
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_model_entry(entry: ModelEntry) -> Any:
    """Load a sweep model entry as quant_vlm would (its device, dtype and loading keys): the default loader."""
    import torch

    from lmms_quant.models import load_vlm

    args = dict(entry.args)
    _, world = _dist()
    device = args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1 and str(device) == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return load_vlm(entry.pretrained, revision=args.get("revision"), device=str(device), dtype=args.get("dtype", "auto"),
                    device_map=args.get("device_map"), trust_remote_code=bool(args.get("trust_remote_code", False)),
                    attn_implementation=args.get("attn_implementation"))


#: ``loader(entry) -> LoadedVLM``: how an executor gets a model entry's full-precision model.
ModelLoader = Callable[[ModelEntry], Any]


class _LoadedModel:
    """A full-precision model loaded once, with a CPU snapshot to restore it before each configuration."""

    def __init__(self, entry: ModelEntry, loader: ModelLoader = load_model_entry):
        from lmms_quant.offload import is_offloaded

        t0 = time.perf_counter()
        self.loaded = loader(entry)
        self.load_s = time.perf_counter() - t0
        if is_offloaded(self.loaded.model):
            raise SweepSpecError(f"model {entry.name}: accelerate offloaded part of it (device_map); a sweep restores each configuration "
                                 "from a full-precision snapshot in memory, which an offloaded model does not fit; run it with "
                                 "`lmms-eval --model quant_vlm --model_args device_map=auto,...` per configuration")
        self.entry = entry
        self.snapshot = {k: v.detach().to("cpu", copy=True) for k, v in self.loaded.model.state_dict().items()}
        self.verify = bool(entry.args.get("verify", True))  # verify=false also skips the restore check
        self.fingerprint = _fingerprint(self.snapshot) if self.verify else ""
        self.dirty = False

    def restore(self) -> float:
        """Put the full-precision weights back and check them; returns the seconds it took."""
        t0 = time.perf_counter()
        if self.dirty:
            self.loaded.model.load_state_dict(self.snapshot, strict=True)
            if self.verify and _fingerprint(self.loaded.model.state_dict()) != self.fingerprint:
                raise RuntimeError(f"{self.entry.name}: restoring the full-precision weights failed (fingerprint differs)")
        self.dirty = True
        return time.perf_counter() - t0

    def hand_out(self, pretrained: str | None = None, **_: Any) -> Any:
        """quant_vlm's ``loader``: this model (restored to full precision) instead of a load from disk, so
        ``QuantVLM(loader=..., **model_args)`` runs exactly as ``--model quant_vlm`` does, minus the load."""
        if pretrained != self.entry.pretrained:
            raise RuntimeError(f"sweep: asked for {pretrained!r} while {self.entry.pretrained!r} is loaded")
        return self.loaded


def backend_args(cfg: SweepConfig, spec: SweepSpec) -> dict[str, Any]:
    """The quant_vlm ``--model_args`` of a configuration, as keyword arguments."""
    args: dict[str, Any] = {"pretrained": cfg.model.pretrained} if cfg.model.pretrained else {}
    return {**args, **cfg.model.args, **cfg.recipe_args, "batch_size": spec.batch_size}


def _run_one(cfg: SweepConfig, spec: SweepSpec, model: _LoadedModel, out: Path, task_manager) -> None:
    """Restore, quantize (through quant_vlm itself), evaluate and write one configuration (atomically)."""
    from lmms_quant.model_wrappers.quant_vlm import QuantVLM

    folder = out / cfg.id
    restore_s = model.restore()
    lm = QuantVLM(loader=model.hand_out, **backend_args(cfg, spec))
    staging = folder / f"{STAGING_PREFIX}{os.getpid()}"
    try:
        _evaluate_and_write(cfg, spec, model, lm, staging, task_manager, restore_s)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a failed or interrupted attempt leaves nothing half-written


def _evaluate_and_write(cfg: SweepConfig, spec: SweepSpec, model: _LoadedModel, lm: Any, staging: Path, task_manager,
                        restore_s: float) -> None:
    from lmms_eval import evaluator
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker
    from lmms_eval.utils import get_datetime_str

    rank, _ = _dist()
    folder = staging.parent
    tracker = EvaluationTracker(output_path=str(staging))
    datetime_str = get_datetime_str()
    t0 = time.perf_counter()
    results = evaluator.simple_evaluate(
        model=lm, model_args=cfg.model_args(spec), tasks=list(spec.tasks), batch_size=spec.batch_size,
        limit=float(spec.limit) if spec.limit is not None else None,
        log_samples=spec.log_samples, evaluation_tracker=tracker, task_manager=task_manager, gen_kwargs=spec.gen_kwargs,
        bootstrap_iters=spec.bootstrap_iters, datetime_str=datetime_str,
        # as lmms-eval's CLI decides: an initialised process group (ours, under a launcher) means torchrun collectives
        distributed_executor_backend="torchrun" if _dist()[1] > 1 and _dist_initialized() else "accelerate",
    )
    evaluate_s = time.perf_counter() - t0
    if rank != 0 or results is None:
        return
    meta = lm.metadata  # set when quant_vlm quantized (at construction, or at the first request)
    if meta is None:
        raise RuntimeError("quant_vlm recorded no quantization metadata for this configuration")
    meta["timings_s"].update({"load": round(model.load_s, 3), "restore": round(restore_s, 3), "evaluate": round(evaluate_s, 3)})
    meta["sweep"] = {"name": spec.name, "id": cfg.id, "method": cfg.method_label, "digest": cfg.digest(spec)}
    results[METADATA_KEY] = meta  # the plugin's hook writes the same object
    samples = results.pop("samples", None)
    results["config"]["model"] = "quant_vlm"  # what the equivalent CLI run records
    tracker.general_config_tracker.model_source = "quant_vlm"
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=datetime_str)
    if spec.log_samples and samples:
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    written = sorted(staging.rglob("*_results.json"))
    if len(written) != 1:  # lmms-eval logs and swallows its own write errors
        raise RuntimeError(f"lmms-eval did not write the results file under {staging}")
    for f in sorted(staging.rglob("*_samples_*.jsonl")):
        os.replace(f, folder / f.name)
    os.replace(written[0], folder / written[0].name)  # last: the result exists only once complete
    (folder / FAILED_FILE).unlink(missing_ok=True)


def run_configs(spec: SweepSpec, out: str | Path, ids: Sequence[str], *, retry_failed: bool = False,
                emit: Callable[[str], None] | None = None, loader: ModelLoader = load_model_entry) -> dict[str, str]:
    """Run the configurations ``ids`` of ``spec`` in this process (the body of every executor).

    ``loader`` loads a model entry's full-precision model (default :func:`load_model_entry`).

    Each model is loaded once; configurations done meanwhile (by another worker)
    or claimed by another live process are skipped.  Returns ``{id: status}``.
    Under ``accelerate launch`` (``WORLD_SIZE > 1``) every rank runs rank 0's
    list of still-pending configurations, and only rank 0 writes files.
    """
    from lmms_quant.model_wrappers import plugin

    out = Path(out)
    emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
    plugin.manifests()  # registers our task folder with lmms-eval's TaskManager
    rank, world = _dist()
    by_id = {c.id: c for c in expand(spec)}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise SweepSpecError(f"unknown configuration id(s) {unknown}")
    if world > 1:
        if rank == 0:
            ids = [i for i in ids if _runnable(out / i, retry_failed) is None]
        ids = _broadcast_ids(list(ids))
    progress = Progress(spec, out, emit) if rank == 0 else None
    task_manager = None
    outcome: dict[str, str] = {}
    loaded: _LoadedModel | None = None
    for cid in ids:
        cfg = by_id[cid]
        folder = out / cid
        with (_claim(folder) if world == 1 else contextlib.nullcontext(True)) as mine:
            skip = "busy" if not mine else (_runnable(folder, retry_failed) if world == 1 else None)
            if skip:
                outcome[cid] = skip
                continue
            if rank == 0:
                _clean_partial(folder)
                _write_json(folder / CONFIG_FILE, cfg.describe(spec))
            t0 = time.perf_counter()
            try:
                if loaded is None or loaded.entry != cfg.model:
                    loaded = None  # free the previous model before loading the next
                    loaded = _LoadedModel(cfg.model, loader)
                task_manager = task_manager or _task_manager(spec.tasks)
                _run_one(cfg, spec, loaded, out, task_manager)
                outcome[cid] = "done"
            except KeyboardInterrupt:
                raise
            except (Exception, SystemExit) as exc:  # a failed configuration must not stop the sweep
                log.exception("sweep: configuration %s failed", cid)
                if rank == 0:
                    _record_failure(cfg, out, exc)
                outcome[cid] = "failed"
                loaded = None  # whatever state the failure left, the next configuration starts from a fresh load
            if progress is not None:
                progress.update(cid, time.perf_counter() - t0, outcome[cid])
    return outcome


def _task_manager(tasks: Sequence[str]):
    """lmms-eval's task index.  When every task is one of ours, the index of our task folder
    alone (seconds faster than indexing every lmms-eval task; ours all start with ``lq_``,
    so no built-in task can shadow them), else the full index, as the CLI builds it."""
    from lmms_eval.tasks import TaskManager

    fast = TaskManager("WARNING", include_defaults=False)
    if all(t in fast.all_tasks for t in tasks):
        return fast
    return TaskManager("WARNING")


def _broadcast_ids(ids: list[str]) -> list[str]:
    """Under ``accelerate launch``: every rank runs rank 0's list, in the same order."""
    import torch.distributed as dist
    from accelerate import Accelerator

    Accelerator()  # initialises the process group
    box = [ids if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return list(box[0])
