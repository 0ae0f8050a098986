"""The one calibration driver, shared by GPTQ and AWQ.

Sequential and multimodal, as GPTQ and AWQ are meant to run: the model is
walked segment by segment in forward order (a segment is one list of
transformer blocks: the ViT's layers, the Q-Former's, the LLM's; T5's encoder
and decoder are two), and block by block inside a segment.

1. The inputs of a segment's first block are captured by running the whole
   model on the calibration batches and stopping at that block, so the
   connector sees the (already quantized) ViT's features and the LLM sees the
   token sequences the model really builds: image tokens, prompt and target.
2. For each block: hooks record what its quantized Linears see (GPTQ: the
   Hessian ``2 X X^T / n``; AWQ: the inputs), the block runs on the captured
   inputs, the Linears are quantized (pure functions in
   :mod:`lmms_quant.quantizers`), and the block runs again to give the next
   block its inputs, now through quantized weights.

Hooks are always removed (a context manager).  Only one block's activations
live beyond the captured block inputs.  A layer that receives no activations
is left untouched with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import cache
from .architectures import AWQ_MAPPINGS, BLOCK_CARRIES, AWQMapping
from .errors import ConfigurationError
from .offload import assign, materialized, tensor_of
from .plan import LayerTarget, QuantPlan
from .quantizers import awq as awq_q
from .quantizers import gptq as gptq_q

__all__ = ["CalibrationSet", "CalibrationRecord", "StageStore", "run_calibrated", "fp_statistics", "pack_state", "restore_state",
           "INPUT_SCALE_BUFFER", "attach_input_scale", "calibration_hash", "qparams_of"]

log = logging.getLogger(__name__)

#: Name of the buffer that holds AWQ's explicit input scale on a Linear.
INPUT_SCALE_BUFFER = "awq_input_scale"
#: Linears whose AWQ clip search is skipped, as in the reference (attention scores are sensitive to q/k clipping).
_NO_CLIP = re.compile(r"(^|\.)(q_proj|k_proj|query|key|q|k|qkv)$")


@dataclass
class CalibrationSet:
    """Model-ready calibration batches plus what is recorded about them.

    ``batches``: dicts of model inputs (``input_ids``, ``attention_mask``,
    ``pixel_values``...) on the model's device, each a forward call.
    """

    batches: list[dict[str, torch.Tensor]]
    source: str
    n_samples: int
    seed: int
    max_seq_len: int
    warnings: list[str] = field(default_factory=list)
    #: For a ``datasets`` source: id, split, revision, fingerprint, columns, row count and the drawn samples' hash.
    dataset: dict[str, Any] | None = None

    @property
    def sha256(self) -> str:
        return calibration_hash(self.batches)

    def describe(self) -> dict[str, Any]:
        out = {"source": self.source, "samples": self.n_samples, "seed": self.seed, "max_seq_len": self.max_seq_len,
               "sha256": self.sha256, "warnings": list(self.warnings)}
        if self.dataset is not None:
            out["dataset"] = dict(self.dataset)
        return out


def calibration_hash(batches: Sequence[dict[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            t = batch[key]
            if isinstance(t, torch.Tensor):
                h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
    return h.hexdigest()


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def _hooks() -> Iterator[list]:
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def _input_scale_pre_hook(module: nn.Module, args: tuple) -> tuple:
    scale = getattr(module, INPUT_SCALE_BUFFER)
    return (args[0] / scale.to(args[0].dtype), *args[1:])


def attach_input_scale(linear: nn.Linear, scale: torch.Tensor) -> None:
    """Make ``linear`` divide its input by ``scale`` (AWQ where folding is not exact)."""
    if hasattr(linear, INPUT_SCALE_BUFFER):
        raise RuntimeError("AWQ input scale applied twice to the same Linear")
    linear.register_buffer(INPUT_SCALE_BUFFER, scale.detach().to(linear.weight.device, torch.float32))
    linear.register_forward_pre_hook(_input_scale_pre_hook)


def _is_kv_cache(value: Any) -> bool:
    """A transformers ``Cache`` (``DynamicCache``, ``EncoderDecoderCache``...), recognised by its methods."""
    return hasattr(value, "get_seq_length") and hasattr(value, "update")


def _without_kv_cache(kwargs: dict) -> dict:
    """The captured block kwargs with the model's key/value cache removed.

    A decoder called with ``use_cache`` (the default of causal LMs) hands every
    layer one shared cache.  The driver runs each block several times on the
    captured inputs; each run would append its keys and values to that cache,
    and a later run would attend to the stale ones of the first run (computed
    by the not-yet-quantized k/v projections) instead of its own.
    """
    out = {k: (None if _is_kv_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def _capture_first_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[dict]) -> list[tuple[tuple, dict]]:
    captured: list[tuple[tuple, dict]] = []

    def catch(module, args, kwargs):
        captured.append((args, _without_kv_cache(kwargs)))
        raise _StopForward

    with _hooks() as handles, torch.no_grad():
        handles.append(block.register_forward_pre_hook(catch, with_kwargs=True))
        for batch in batches:
            try:
                model(**batch)
            except _StopForward:
                pass
    return captured


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[Any]:
    """The block's outputs (as it returns them) on each captured input."""
    with torch.no_grad():
        return [block(*args, **kwargs) for args, kwargs in inputs]


def _next_inputs(block: nn.Module, inp: tuple[tuple, dict], out: Any) -> tuple[tuple, dict]:
    """The next block's inputs: ``inp`` with the hidden states (and what :data:`BLOCK_CARRIES` names) from ``out``."""
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    args, kwargs = inp
    if not args:
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        return args, {**kwargs, key: hidden}
    args = [hidden, *args[1:]]
    for out_i, arg_i in BLOCK_CARRIES.get(type(block).__name__, {}).items():
        if isinstance(out, (tuple, list)) and out_i < len(out) and out[out_i] is not None and arg_i < len(args):
            args[arg_i] = out[out_i]
    return tuple(args), kwargs


def _segments(qplan: QuantPlan) -> list[tuple[str, list[str]]]:
    """``(component, blocks)``: consecutive blocks that share a parent ModuleList, in plan order (= forward order of components)."""
    segments: list[tuple[str, list[str]]] = []
    for name, comp in qplan.components.items():
        for bpath in comp.blocks:
            parent = bpath.rsplit(".", 1)[0] if re.search(r"\.\d+$", bpath) else bpath
            if segments and segments[-1][0] == name and segments[-1][1][0].rsplit(".", 1)[0] == parent and re.search(r"\.\d+$", bpath):
                segments[-1][1].append(bpath)
            else:
                segments.append((name, [bpath]))
    return segments


@dataclass
class CalibrationRecord:
    """What the calibration driver did, layer by layer; :meth:`to_dict` is the ``calibration`` record of a
    :class:`~lmms_quant.apply.QuantReport` (the calibration set's description, then these fields)."""

    source: dict[str, Any]  # CalibrationSet.describe(): source, count, seed, hash, warnings
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # per quantized layer: method, losses, choices
    changed_tensors: list[str] = field(default_factory=list)  # every tensor the driver wrote (for the cache)
    unquantized: list[str] = field(default_factory=list)  # layers left at 16 bits, each with a warning
    qparams: dict[str, dict[str, Any]] = field(default_factory=dict)  # what packing needs: scale, zero, g_idx, spec
    stage: dict[str, Any] | None = None  # the cached prefix of components this run restored, if any
    mode: str = "sequential"  # or "fp_inputs": every target solved on statistics of the full-precision model

    @property
    def warnings(self) -> list[str]:
        return self.source.setdefault("warnings", [])

    def skip(self, layers: list[str], message: str) -> None:
        """Leave ``layers`` unquantized, with a warning (logged and recorded)."""
        log.warning(message)
        self.warnings.append(message)
        self.unquantized.extend(layers)

    def to_dict(self) -> dict[str, Any]:
        out = {**self.source, "layers": self.layers, "changed_tensors": self.changed_tensors, "unquantized": self.unquantized,
               "qparams": self.qparams}
        if self.mode != "sequential":
            out["mode"] = self.mode
        if self.stage is not None:
            out["stage"] = self.stage
        return out


def run_calibrated(model: nn.Module, qplan: QuantPlan, calib: CalibrationSet, *, gptq_blocksize: int = 128,
                   awq_grid: int = 20, stages: StageStore | None = None,
                   statistics: dict[str, tuple[torch.Tensor, int]] | None = None) -> dict[str, Any]:
    """Quantize every GPTQ/AWQ target of ``qplan`` in place.

    Sequential (the default, the study's protocol): component by component in forward order,
    block by block.  Data-free targets must already be quantized (so calibration sees them).
    With ``stages``, what a prefix of the components (the vision encoder, then the connector)
    calibrated to is cached, and a later run whose prefix has the same targets, specs and
    calibration set restores it and calibrates only the rest: the result is identical.

    ``statistics`` (``calib_mode=fp_inputs``, GPTQ only): each target's ``(H, n)`` from the
    full-precision model (:func:`fp_statistics`); every target is then solved on its own.

    Returns the calibration record (source, count, seed, hash, per-layer losses, warnings) and
    the names of every tensor it changed (for the cache).
    """
    by_block: dict[str, list[LayerTarget]] = {}
    for t in qplan.active:
        if t.spec.method in ("gptq", "awq"):
            by_block.setdefault(_block_of(t, qplan), []).append(t)
    described = calib.describe()  # hashes the batches: once
    record = CalibrationRecord(dict(described, warnings=list(described["warnings"])), mode="sequential" if statistics is None else "fp_inputs")
    model_was_training = model.training
    model.eval()
    if statistics is not None:
        _solve_from_statistics(model, [t for ts in by_block.values() for t in ts], statistics, record, gptq_blocksize)
    else:
        _run_sequential(model, qplan, calib, described, by_block, record, gptq_blocksize, awq_grid, stages)
    model.train(model_was_training)
    return record.to_dict()


def _run_sequential(model: nn.Module, qplan: QuantPlan, calib: CalibrationSet, described: dict[str, Any],
                    by_block: dict[str, list[LayerTarget]], record: CalibrationRecord, blocksize: int, grid: int,
                    stages: StageStore | None) -> None:
    modules = dict(model.named_modules())
    segments = _segments(qplan)
    calibrated = [c for c in qplan.components if any(b in by_block for comp, seg in segments if comp == c for b in seg)]
    done = _restore_stage(model, qplan, described, record, stages, calibrated, (blocksize, grid)) if stages else set()
    last_segment = {comp: i for i, (comp, _) in enumerate(segments)}
    for i_seg, (comp, segment) in enumerate(segments):
        if comp in done:
            continue
        if any(b in by_block for b in segment):
            _calibrate_segment(model, modules, calib, segment, by_block, record, blocksize, grid)
        if stages and last_segment[comp] == i_seg and comp in calibrated[:-1]:
            prefix = list(qplan.components)[: list(qplan.components).index(comp) + 1]
            stages.save("stage", _stage_payload(qplan, described, prefix, (blocksize, grid)), *pack_state(model, record.to_dict()))


def _calibrate_segment(model: nn.Module, modules: dict[str, nn.Module], calib: CalibrationSet, segment: list[str],
                       by_block: dict[str, list[LayerTarget]], record: CalibrationRecord, blocksize: int, grid: int) -> None:
    """One segment, block by block: quantize a block's targets on its inputs, then run it to give the next block its inputs."""
    first = segment[0]
    inputs = _capture_first_block_inputs(model, modules[first], calib.batches)
    if not inputs:
        record.skip([t.name for b in segment for t in by_block.get(b, [])],
                    f"{first}: the calibration batches never reached this block; its layers are left unquantized")
        return
    last_needed = max(i for i, b in enumerate(segment) if b in by_block)
    for i, bpath in enumerate(segment[: last_needed + 1]):
        block = modules[bpath]
        targets = by_block.get(bpath, [])
        if targets:
            _quantize_block(block, bpath, targets, inputs, record, blocksize, grid)
        if i < last_needed:
            outs = _run_block(block, inputs)
            inputs = [_next_inputs(block, inp, out) for inp, out in zip(inputs, outs)]


def _stage_payload(qplan: QuantPlan, described: dict[str, Any], prefix: list[str], settings: tuple[int, int]) -> dict[str, Any]:
    """What determines the calibrated state of the components ``prefix`` (the first ones in forward order):
    their targets and specs (data-free ones too: later calibration sees them), the calibration set and the
    driver's settings.  Later components never run before these, so they do not enter."""
    return {"components": prefix, "targets": [[t.name, t.spec.to_dict()] for t in qplan.targets if t.component in prefix],
            "calibration": described, "gptq_blocksize": settings[0], "awq_grid": settings[1]}


def _restore_stage(model: nn.Module, qplan: QuantPlan, described: dict[str, Any], record: CalibrationRecord, stages: StageStore,
                   calibrated: list[str], settings: tuple[int, int]) -> set[str]:
    """Restore the longest cached prefix of calibrated components (never the last one: that is the whole
    result, cached elsewhere); returns the components it covers."""
    order = list(qplan.components)
    for comp in reversed(calibrated[:-1]):
        prefix = order[: order.index(comp) + 1]
        payload = _stage_payload(qplan, described, prefix, settings)
        hit = stages.load("stage", payload)
        if hit is None:
            continue
        tensors, info = hit
        record.qparams.update(restore_state(model, tensors, info))
        record.layers.update(info["layers"])
        record.changed_tensors.extend(info["changed_tensors"])
        record.unquantized.extend(info["unquantized"])
        record.warnings.extend(w for w in info.get("warnings", []) if w not in record.warnings)
        record.stage = {"restored": prefix, "key": stages.key("stage", payload)}
        log.info("calibration: restored the calibrated %s from the stage cache", "+".join(prefix))
        return set(prefix)
    return set()


@dataclass(frozen=True)
class StageStore:
    """Calibration work shared between runs, on disk (:mod:`lmms_quant.cache` entries): a prefix of
    components calibrated (``stage``) and full-precision statistics (``fp_hessians``), keyed by the
    model's full-precision weights, what determines the entry and the code version."""

    cache_dir: Path
    fingerprint: str

    def key(self, kind: str, payload: dict[str, Any]) -> str:
        return cache.cache_key(self.fingerprint, {"kind": kind, **payload}, {})

    def load(self, kind: str, payload: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        return cache.load_entry(self.cache_dir, self.key(kind, payload))

    def save(self, kind: str, payload: dict[str, Any], tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        cache.save_entry(self.cache_dir, self.key(kind, payload), tensors, info)


_QP = "qparams/"


def pack_state(model: nn.Module, record: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, info)`` for a cache entry: every tensor the calibration changed and its qparams' tensors;
    ``info`` is the record without them (``qparams_meta`` keeps each spec)."""
    tensors = {n: tensor_of(model, n) for n in record["changed_tensors"]}
    meta = {}
    for name, qp in record["qparams"].items():
        for k in ("scale", "zero", "g_idx"):
            if qp[k] is not None:
                tensors[f"{_QP}{name}/{k}"] = qp[k]
        meta[name] = {k: qp[k] for k in ("bits", "group_size", "sym")}
    return tensors, {**{k: v for k, v in record.items() if k != "qparams"}, "qparams_meta": meta}


def restore_state(model: nn.Module, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Write a :func:`pack_state` entry back into ``model`` (AWQ input scales re-attached); returns its qparams."""
    modules = dict(model.named_modules())
    for name, t in tensors.items():
        if name.startswith(_QP):
            continue
        owner, _, leaf = name.rpartition(".")
        if leaf == INPUT_SCALE_BUFFER:
            with materialized(modules[owner]):  # an offloaded Linear keeps the new buffer in its offload map
                attach_input_scale(modules[owner], t)
        else:
            assign(model, name, t)
    return {name: {**spec, **{k: tensors.get(f"{_QP}{name}/{k}") for k in ("scale", "zero", "g_idx")}}
            for name, spec in info.get("qparams_meta", {}).items()}


def _check_statistics_fit(targets: list[LayerTarget]) -> None:
    """Refuse fp_inputs when the Hessians would not fit (half the physical memory, or the environment's limit)."""
    need = sum(4 * t.shape[1] ** 2 for t in targets)
    limit_gib = os.environ.get("LMMS_QUANT_FP_INPUTS_MAX_GIB")
    limit = float(limit_gib) * 2**30 if limit_gib else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    if need > limit:
        raise ConfigurationError(
            f"calib_mode=fp_inputs holds every GPTQ layer's Hessian at once: {need / 2**30:.1f} GiB for these {len(targets)} layers, "
            f"over the limit of {limit / 2**30:.1f} GiB (half the memory, or $LMMS_QUANT_FP_INPUTS_MAX_GIB); use calib_mode=sequential "
            "(the default), which holds one block's at a time, or fewer components")


def fp_statistics(model: nn.Module, qplan: QuantPlan, calib: CalibrationSet,
                  stages: StageStore | None = None) -> dict[str, tuple[torch.Tensor, int]]:
    """``calib_mode=fp_inputs``: every GPTQ target's ``(H, n)`` from the full-precision model, in one pass
    over the calibration batches; with ``stages``, cached on disk per component (its targets and the
    calibration set), so a grid pays for them once and every bit width costs only the per-layer solve.
    Call it before anything is quantized.

    Every Hessian is held at once (``n_in^2`` float32 each: about 28 GiB for a 7B LLaMA's LLM), so a
    model whose Hessians exceed half the machine's memory (or ``$LMMS_QUANT_FP_INPUTS_MAX_GIB``) is
    refused with a :class:`~lmms_quant.errors.ConfigurationError` before any work."""
    modules = dict(model.named_modules())
    targets: dict[str, list[LayerTarget]] = {}
    for t in qplan.active:
        if t.spec.method == "gptq":
            targets.setdefault(t.component, []).append(t)
    _check_statistics_fit([t for ts in targets.values() for t in ts])
    payload = {c: {"component": c, "targets": [[t.name, t.shape[1]] for t in ts], "calibration": calib.describe()} for c, ts in targets.items()}
    stats: dict[str, tuple[torch.Tensor, int]] = {}
    missing = []
    for comp, ts in targets.items():
        hit = stages.load("fp_hessians", payload[comp]) if stages else None
        if hit is None:
            missing += ts
        else:
            stats.update({t.name: (hit[0][t.name], int(hit[1]["n"][t.name])) for t in ts})
    if missing:
        fresh = {t.name: [gptq_q.make_empty_hessian(t.shape[1], modules[t.name].weight.device), 0] for t in missing}
        with _hooks() as handles, torch.no_grad():
            for t in missing:

                def hook(module, args, _out, name=t.name):
                    fresh[name] = list(gptq_q.accumulate_hessian(*fresh[name], args[0].detach()))

                handles.append(modules[t.name].register_forward_hook(hook))
            was_training = model.training
            model.eval()
            for batch in calib.batches:
                model(**batch)
            model.train(was_training)
        stats.update({name: (H, n) for name, (H, n) in fresh.items()})
        for comp in {t.component for t in missing}:
            if stages:
                names = [t.name for t in targets[comp]]
                stages.save("fp_hessians", payload[comp], {n: stats[n][0] for n in names}, {"n": {n: stats[n][1] for n in names}})
    return stats


def _solve_from_statistics(model: nn.Module, targets: list[LayerTarget], statistics: dict[str, tuple[torch.Tensor, int]],
                           record: CalibrationRecord, blocksize: int) -> None:
    modules = dict(model.named_modules())
    for t in targets:
        if t.spec.method != "gptq":
            raise ValueError(f"{t.name}: calib_mode=fp_inputs solves GPTQ only, got method {t.spec.method!r}")
        H, n = statistics[t.name]
        with materialized(modules[t.name]):
            _gptq_solve(modules[t.name], t, H, n, record, blocksize)


def _block_of(t: LayerTarget, qplan: QuantPlan) -> str:
    return qplan.components[t.component].blocks[t.block]


def _rel(name: str, bpath: str) -> str:
    return "" if name == bpath else name[len(bpath) + 1:]


def _quantize_block(block: nn.Module, bpath: str, targets: list[LayerTarget], inputs, record: CalibrationRecord, blocksize: int,
                    grid: int) -> None:
    gptq_targets = [t for t in targets if t.spec.method == "gptq"]
    awq_targets = [t for t in targets if t.spec.method == "awq"]
    with materialized(block):  # an offloaded block: loaded once, quantized, written back
        if gptq_targets:
            _gptq_block(block, bpath, gptq_targets, inputs, record, blocksize)
        if awq_targets:
            _awq_block(block, bpath, awq_targets, inputs, record, grid)


def _linear(block: nn.Module, rel: str) -> nn.Linear:
    return block if rel == "" else block.get_submodule(rel)


def _gptq_block(block: nn.Module, bpath: str, targets: list[LayerTarget], inputs, record: CalibrationRecord, blocksize: int) -> None:
    """GPTQ on one block: each target's Hessian from the block's calibration inputs, then the solve."""
    stats: dict[str, list] = {}
    with _hooks() as handles:
        for t in targets:
            lin = _linear(block, _rel(t.name, bpath))
            stats[t.name] = [gptq_q.make_empty_hessian(lin.in_features, lin.weight.device), 0]

            def hook(module, args, _out, name=t.name):
                x = args[0]
                if hasattr(module, INPUT_SCALE_BUFFER):  # the Linear's real input is x / s
                    x = x / getattr(module, INPUT_SCALE_BUFFER).to(x.dtype)
                H, n = stats[name]
                stats[name] = list(gptq_q.accumulate_hessian(H, n, x.detach()))

            handles.append(lin.register_forward_hook(hook))
        _run_block(block, inputs)
    for t in targets:
        _gptq_solve(_linear(block, _rel(t.name, bpath)), t, *stats.pop(t.name), record, blocksize)


def _gptq_solve(lin: nn.Linear, t: LayerTarget, H: torch.Tensor, n: int, record: CalibrationRecord, blocksize: int) -> None:
    """GPTQ on one Linear given its Hessian; a Linear that saw no activations is left unquantized."""
    if n == 0 or not bool(H.any()):
        record.skip([t.name], f"{t.name}: received no calibration activations; left unquantized")
        return
    sp = t.spec
    res = gptq_q.gptq_quantize(lin.weight.data, H, sp.bits, sp.group_size, sp.sym, blocksize=blocksize, percdamp=sp.damp,
                               actorder=sp.act_order, static_groups=sp.static_groups)
    lin.weight.data.copy_(res.weight.to(lin.weight.dtype))
    record.qparams[t.name] = qparams_of(res.quantized, res.g_idx)
    record.layers[t.name] = {"method": "gptq", "loss": res.loss, "error": res.error, "percdamp": res.percdamp}
    record.changed_tensors.append(f"{t.name}.weight")


@dataclass
class _AwqGroup:
    """Linears of one block that share an input, and so one AWQ scale: a row of AWQ_MAPPINGS present in the block."""

    mapping: AWQMapping
    names: list[str]  # relative to the block ("" is the block itself)
    lins: list[nn.Linear]
    inputs: list[torch.Tensor] = field(default_factory=list)  # the shared input, (tokens, n_in) per call
    x: torch.Tensor | None = None  # the inputs concatenated, (all tokens, n_in)
    spec: tuple[int, int, bool] = (0, 0, True)  # (bits, group_size, sym), shared by the group
    search: awq_q.AWQScaleResult | None = None
    scales: torch.Tensor | None = None
    applied_by: str = ""  # the module the scales were folded into, or "input scaling"

    @property
    def scored_on(self) -> str:
        return "linear outputs" if self.mapping.inspect is None else (self.mapping.inspect or "block") + " output"


def _awq_groups(block: nn.Module, bpath: str, wanted: dict[str, LayerTarget]) -> list[_AwqGroup]:
    """The block's AWQ groups covering every wanted linear (an error names an unmapped class or linear)."""
    cls = type(block).__name__
    if cls not in AWQ_MAPPINGS:
        raise ValueError(f"AWQ has no mapping for block class {cls} ({bpath}); mapped classes: {', '.join(sorted(AWQ_MAPPINGS))}. "
                         "Add a row to AWQ_MAPPINGS in lmms_quant/architectures.py")
    groups = []
    for mapping in AWQ_MAPPINGS[cls]:
        present = [n for n in mapping.linears if n in wanted]
        if present:
            groups.append(_AwqGroup(mapping, present, [_linear(block, n) for n in present]))
    missing = sorted(set(wanted) - {n for g in groups for n in g.names})
    if missing:
        raise ValueError(f"AWQ mapping for {cls} does not cover {missing}; extend AWQ_MAPPINGS in lmms_quant/architectures.py")
    return groups


def _record_awq_inputs(block: nn.Module, bpath: str, groups: list[_AwqGroup], inputs) -> dict[str, tuple[nn.Module, list]]:
    """Run the full-precision block once: each group's input, and the calls ``(args, kwargs, output)``
    of every module that scores a group's scale (``mapping.inspect``), by that module's name."""
    inspected = {g.mapping.inspect: (_inspect_module(block, bpath, g.mapping, g.names), []) for g in groups if g.mapping.inspect is not None}
    with _hooks() as handles:
        for g in groups:

            def hook(module, args, _out, group=g):
                group.inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]))

            handles.append(g.lins[0].register_forward_hook(hook))
        for module, seen in inspected.values():

            def record(module, args, kwargs, out, seen=seen):
                seen.append((args, _without_kv_cache(kwargs), (out[0] if isinstance(out, (tuple, list)) else out).detach()))

            handles.append(module.register_forward_hook(record, with_kwargs=True))
        _run_block(block, inputs)
    return inspected


def _search_awq_scale(g: _AwqGroup, bpath: str, wanted: dict[str, LayerTarget], inspected: dict[str, tuple[nn.Module, list]],
                      grid: int) -> None:
    """The group's scale, searched on the full-precision block (llm-awq's ``auto_scale``)."""
    specs = {(wanted[n].spec.bits, wanted[n].spec.group_size, wanted[n].spec.sym) for n in g.names}
    if len(specs) > 1:
        raise ValueError(f"AWQ: {g.names} in {bpath} share one input and so one scale, but the recipe gives them different specs {sorted(specs)}")
    g.spec = specs.pop()
    g.x = torch.cat(g.inputs)
    g.inputs = []
    output_loss = None
    if g.mapping.inspect is not None:
        module, seen = inspected[g.mapping.inspect]
        output_loss = module_output_loss(module, g.lins, seen)
    bits, gsize, sym = g.spec
    g.search = awq_q.search_scales(g.x, [lin.weight.data for lin in g.lins], bits, gsize, sym, n_grid=grid, output_loss=output_loss)


def _apply_awq_scale(block: nn.Module, bpath: str, g: _AwqGroup, record: CalibrationRecord) -> None:
    """Fold the scale into the module before the group (a norm, or a Linear whose outputs are the
    group's inputs one to one), else attach it to the group's linears as an input scaling."""
    s = g.scales = g.search.scales.to(g.lins[0].weight.device)
    prev = block.get_submodule(g.mapping.prev) if g.mapping.prev else None
    if isinstance(prev, nn.Linear) and prev.out_features != s.numel():
        prev = None  # e.g. grouped-query attention: v_proj's outputs are not o_proj's inputs one to one
    if prev is None:
        for lin in g.lins:
            attach_input_scale(lin, s)
        g.applied_by = "input scaling"
        return
    bias = None if getattr(prev, "bias", None) is None else prev.bias.data
    fold = awq_q.fold_scales_into_linear if isinstance(prev, nn.Linear) else awq_q.fold_scales_into_norm
    w, b = fold(prev.weight.data, bias, s)
    prev.weight.data.copy_(w)
    record.changed_tensors.append(_full(bpath, g.mapping.prev, "weight"))
    if b is not None:
        prev.bias.data.copy_(b)
        record.changed_tensors.append(_full(bpath, g.mapping.prev, "bias"))
    g.applied_by = g.mapping.prev


def _quantize_awq_group(bpath: str, g: _AwqGroup, record: CalibrationRecord) -> None:
    """Clip search (skipped for the linears ``_NO_CLIP`` names) and rounding of the scaled weights."""
    bits, gsize, sym = g.spec
    xs_scaled = g.x / g.scales.to(g.x.dtype)
    for n, lin in zip(g.names, g.lins):
        Ws = lin.weight.data.float() * g.scales
        max_val = None if _NO_CLIP.search(n or "x") else awq_q.search_clip(xs_scaled, Ws, bits, gsize, sym)
        qt = awq_q.awq_quantize(lin.weight.data, g.scales, max_val, bits, gsize, sym)
        lin.weight.data.copy_(qt.weight.to(lin.weight.dtype))
        full = _full(bpath, n, "")
        record.qparams[full] = qparams_of(qt)
        record.layers[full] = {"method": "awq", "ratio": g.search.best_ratio, "loss": g.search.best_loss,
                               "scale_applied_by": g.applied_by, "scale_scored_on": g.scored_on, "clipped": max_val is not None}
        record.changed_tensors.append(_full(bpath, n, "weight"))
    for n, lin in zip(g.names, g.lins):
        if hasattr(lin, INPUT_SCALE_BUFFER):
            record.changed_tensors.append(_full(bpath, n, INPUT_SCALE_BUFFER))


def _awq_block(block: nn.Module, bpath: str, targets: list[LayerTarget], inputs, record: CalibrationRecord, grid: int) -> None:
    """AWQ on one block: record the inputs on the full-precision block, search every group's scale
    there, then fold or attach all scales, then clip and round (llm-awq's order)."""
    wanted = {_rel(t.name, bpath): t for t in targets}
    groups = _awq_groups(block, bpath, wanted)
    inspected = _record_awq_inputs(block, bpath, groups, inputs)
    searched = []
    for g in groups:
        if not g.inputs:
            record.skip([_full(bpath, n, "") for n in g.names], f"{bpath}: {g.names} received no calibration activations; left unquantized")
            continue
        _search_awq_scale(g, bpath, wanted, inspected, grid)
        searched.append(g)
    inspected.clear()
    for g in searched:
        _apply_awq_scale(block, bpath, g, record)
    for g in searched:
        _quantize_awq_group(bpath, g, record)


def _inspect_module(block: nn.Module, bpath: str, mapping: AWQMapping, names: list[str]) -> nn.Module:
    """The module named by ``mapping.inspect`` (``""``: the block); it must hold every linear of the group."""
    try:
        module = block.get_submodule(mapping.inspect)
    except AttributeError:
        raise ValueError(f"AWQ mapping of {type(block).__name__} ({bpath}) scores {names} on {mapping.inspect!r}, which the block lacks;"
                         " fix `inspect` in AWQ_MAPPINGS (lmms_quant/architectures.py)") from None
    outside = [n for n in names if mapping.inspect and not n.startswith(mapping.inspect + ".")]
    if outside:
        raise ValueError(f"AWQ mapping of {type(block).__name__} ({bpath}): {outside} are not inside the inspected module {mapping.inspect!r},"
                         " so their rounding would not change its output; fix `inspect` in AWQ_MAPPINGS (lmms_quant/architectures.py)")
    return module


def module_output_loss(module: nn.Module, linears: Sequence[nn.Linear], seen: Sequence[tuple[tuple, dict, torch.Tensor]]) -> awq_q.OutputLoss:
    """AWQ's ``output_loss`` for ``linears`` inside ``module``: the mean squared error of the
    module's output on its recorded calls ``seen`` (``(args, kwargs, full-precision output)``)
    when the linears' weights are the given ones; the weights are restored afterwards."""

    @torch.no_grad()
    def loss(weights: list[torch.Tensor]) -> float:
        originals = [lin.weight.data for lin in linears]
        sse, n = 0.0, 0
        try:
            for lin, w in zip(linears, weights, strict=True):
                lin.weight.data = w.to(lin.weight.device, lin.weight.dtype)
            for args, kwargs, ref in seen:
                out = module(*args, **kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                sse += float((out.float() - ref.float()).pow(2).sum())
                n += ref.numel()
        finally:
            for lin, w in zip(linears, originals):
                lin.weight.data = w
        return sse / max(n, 1)

    return loss


def qparams_of(qt, g_idx: torch.Tensor | None = None) -> dict[str, Any]:
    """What packing a quantized weight needs besides the weight: scale, zero, g_idx and the spec."""
    return {"scale": qt.scale.detach().cpu(), "zero": qt.zero.detach().cpu(), "g_idx": None if g_idx is None else g_idx.detach().cpu(),
            "bits": qt.bits, "group_size": qt.group_size, "sym": qt.sym}


def _full(bpath: str, rel: str | None, leaf: str) -> str:
    return ".".join(p for p in (bpath, rel, leaf) if p)
