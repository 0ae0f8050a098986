"""The public verb: :func:`quantize_` a model in place with a recipe.

``quantize_(model, recipe)`` plans (:mod:`lmms_quant.plan`), quantizes every
planned Linear (data-free methods here; GPTQ and AWQ through the calibration
driver), checks the result and returns a :class:`QuantReport` that is
JSON-serialisable and goes beside every result.

The check is deliberately paranoid: after quantization every quantized weight
must take at most ``2**bits`` distinct values in each quantization group, or
:class:`QuantizationCheckError` is raised.  Tools that silently evaluated the
unquantized model have burned users before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bpw import bits_per_weight
from .calibration import (
    INPUT_SCALE_BUFFER,
    CalibrationSet,
    StageStore,
    fp_statistics,
    pack_state,
    qparams_of,
    restore_state,
    run_calibrated,
)
from .errors import CheckError
from .offload import materialized, tensor_of
from .plan import LayerTarget, QuantPlan, plan
from .quantizers.rtn import _grouped, dequantize_codes, quantize_codes, rtn_quantize
from .recipe import Recipe

__all__ = ["QuantReport", "QuantizationCheckError", "quantize_", "count_levels", "weights_hash"]

log = logging.getLogger(__name__)

DATA_FREE_METHODS = ("uniform", "rtn")


class QuantizationCheckError(CheckError):
    """A weight that should be quantized has more distinct values than its bit width allows."""


@dataclass
class QuantReport:
    """What :func:`quantize_` did; :meth:`to_dict` is stored with every result."""

    model_class: str
    family: str
    recipe: dict[str, Any]
    components: dict[str, dict[str, Any]]
    modules: list[dict[str, Any]]
    bpw: dict[str, dict[str, float | int]]
    weights_sha256: str
    calibration: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    #: Per quantized Linear: scale, zero (``(rows, n_groups)``), g_idx, bits, group_size, sym; in memory only
    #: (not in :meth:`to_dict`), for packing real low-bit checkpoints.
    qparams: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_class": self.model_class,
            "family": self.family,
            "recipe": self.recipe,
            "components": self.components,
            "bpw": self.bpw,
            "quantized_modules": self.modules,
            "weights_sha256": self.weights_sha256,
            "calibration": self.calibration,
            "warnings": self.warnings,
        }


def count_levels(w: torch.Tensor, group_size: int, g_idx: torch.Tensor | None = None) -> int:
    """Largest number of distinct values in any quantization group of ``w``.

    ``group_size``: -1 per row, 0 whole tensor, ``g > 0`` groups of ``g``
    columns within each row: contiguous ones, or, when ``g_idx`` is given (GPTQ
    act-order with dynamic groups), the columns ``g_idx`` assigns to each group.
    """
    w2 = w.detach().reshape(w.shape[0], -1).float()
    if group_size == 0:
        return int(torch.unique(w2).numel())
    if group_size > 0:
        if g_idx is not None:
            w2 = w2[:, torch.argsort(g_idx.to(w2.device), stable=True)]
        w2 = w2.reshape(-1, group_size)
    s, _ = torch.sort(w2, dim=1)
    distinct = (s[:, 1:] != s[:, :-1]).sum(dim=1) + 1
    return int(distinct.max())


def on_grid(w: torch.Tensor, qparams: dict[str, Any]) -> bool:
    """True when every value of ``w`` is ``scale * (code - zero)`` of its group for an integer code in
    ``[0, 2^bits - 1]``: then no group holds more than ``2^bits`` distinct values.

    A linear-time proof of what :func:`count_levels` counts (a sort per group); ``False`` means
    only "not proven" (act-order's regrouped columns, scales of another shape), and the caller counts.
    """
    if qparams.get("g_idx") is not None or qparams.get("group_size") is None:
        return False
    g = _grouped(w.detach().reshape(w.shape[0], -1).float(), qparams["group_size"])
    scale = qparams["scale"].to(g.device, torch.float32).reshape(-1, 1)
    zero = qparams["zero"].to(g.device, torch.float32).reshape(-1, 1)
    if scale.shape[0] != g.shape[0] or zero.shape[0] != g.shape[0]:
        return False
    grid = dequantize_codes(quantize_codes(g, scale, zero, qparams["bits"]), scale, zero)
    return bool(torch.equal(grid.to(w.dtype), g.to(w.dtype)))


def weights_hash(model: nn.Module, names: Iterable[str], extra: Iterable[str] = ()) -> str:
    """SHA-256 over the named modules' weights, biases and AWQ input scales (in
    the given order), then over the ``extra`` tensors (e.g. norms that AWQ
    folded scales into), sorted by name.  Offloaded tensors are read from their offload map."""
    h = hashlib.sha256()
    modules = dict(model.named_modules())
    for name in names:
        mod = modules[name]
        for pname in ("weight", "bias", INPUT_SCALE_BUFFER):
            if getattr(mod, pname, None) is not None:
                _update(h, f"{name}.{pname}", tensor_of(model, f"{name}.{pname}"))
    for key in sorted(set(extra)):
        _update(h, key, tensor_of(model, key))
    return h.hexdigest()


def _update(h, key: str, t: torch.Tensor) -> None:
    h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
    h.update(t.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())


def _quantize_data_free(mod: nn.Linear, target: LayerTarget) -> dict[str, Any]:
    spec = target.spec
    qt = rtn_quantize(mod.weight.data, spec.bits, spec.group_size, spec.sym)
    mod.weight.data.copy_(qt.weight)
    if spec.quantize_bias and mod.bias is not None:
        b = mod.bias.data.reshape(1, -1)
        mod.bias.data.copy_(rtn_quantize(b, spec.bits, 0, False).weight.reshape(-1))
    return qparams_of(qt)


def verify(model: nn.Module, qplan: QuantPlan, qparams: dict[str, dict[str, Any]] | None = None) -> None:
    """Raise :class:`QuantizationCheckError` unless every active target is really quantized.

    ``qparams`` (name -> what :func:`~lmms_quant.calibration.qparams_of` returns) supplies
    GPTQ's ``g_idx`` where act-order regrouped the columns.
    """
    for t in qplan.active:
        w = tensor_of(model, f"{t.name}.weight")  # an offloaded weight is read from its offload map
        if w.is_meta:
            raise QuantizationCheckError(f"{t.name}: weight is on the meta device; nothing was quantized")
        qp = (qparams or {}).get(t.name) or {}
        if qp.get("bits") == t.spec.bits and on_grid(w, qp):
            continue
        levels = count_levels(w, t.spec.group_size, qp.get("g_idx"))
        if levels > 2**t.spec.bits:
            raise QuantizationCheckError(
                f"{t.name}: {levels} distinct values in one group, more than 2^{t.spec.bits} = {2**t.spec.bits}; "
                "the weight was not quantized as planned"
            )


def _calibrate_cached(model, qplan, recipe, calib, fingerprint, cache_dir, statistics=None) -> dict[str, Any]:
    """Run the calibration driver, or restore its result from the cache (whose stages it shares)."""
    if cache_dir is None:
        return {**run_calibrated(model, qplan, calib, statistics=statistics), "cache": "disabled"}
    from . import cache

    key = cache.cache_key(fingerprint, recipe.to_dict(), calib.describe())
    hit = cache.load_entry(Path(cache_dir), key)
    if hit is not None:
        tensors, info = hit
        qparams = restore_state(model, tensors, info)
        info = {k: v for k, v in info.items() if k != "qparams_meta"}
        log.info("calibrated quantization restored from cache %s", key[:16])
        return {**info, "qparams": qparams, "cache": "hit", "cache_key": key}
    info = run_calibrated(model, qplan, calib, statistics=statistics, stages=StageStore(Path(cache_dir), fingerprint))
    cache.save_entry(Path(cache_dir), key, *pack_state(model, info))
    return {**info, "cache": "miss", "cache_key": key}


def _component_summary(qplan: QuantPlan, bpw: dict[str, dict[str, float | int]], recipe: Recipe) -> dict[str, dict[str, Any]]:
    total = bpw["model"]["params"]
    out = {}
    for comp, cb in qplan.components.items():
        targets = [t for t in qplan.targets if t.component == comp]
        active = [t for t in targets if t.spec.active]
        numel = sum(_numel(t.shape) for t in active)
        out[comp] = {
            "label": cb.label,
            "roots": list(cb.roots),
            "n_blocks": len(cb.blocks),
            "spec": recipe.component(comp).spec.to_dict(),
            "n_linear": len(targets),
            "n_quantized": len(active),
            "quantized_params": numel,
            "share_of_model_params": numel / total if total else 0.0,
            "params": bpw.get(comp, {}).get("params", 0),
        }
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def quantize_(
    model: nn.Module,
    recipe: Recipe,
    calibration: CalibrationSet | Callable[[], CalibrationSet] | None = None,
    *,
    check: bool = True,
    cache_dir: str | Path | None = None,
) -> QuantReport:
    """Quantize ``model`` in place (simulated: weights are rounded and stored
    back in the model's dtype) and return a :class:`QuantReport`.

    Data-free methods (``uniform``, ``rtn``) run first, so that GPTQ and AWQ
    calibrate on a model whose other parts are already quantized.
    ``calibration``: for GPTQ/AWQ, a :class:`~lmms_quant.calibration.CalibrationSet`
    or a zero-argument callable returning one (called only when needed).
    ``cache_dir``: where calibrated quantizations are cached (:mod:`lmms_quant.cache`);
    ``None`` disables the cache.
    """
    qplan = plan(model, recipe)
    modules = dict(model.named_modules())
    calibrated = [t for t in qplan.active if t.spec.method not in DATA_FREE_METHODS]
    if calibrated and calibration is None:
        raise ValueError(f"methods {sorted({t.spec.method for t in calibrated})} need calibration data; pass calibration=...")
    fingerprint = weights_hash(model, [t.name for t in qplan.targets]) if calibrated and cache_dir is not None else None
    qparams: dict[str, dict[str, Any]] = {}
    calib = (calibration() if callable(calibration) else calibration) if calibrated else None
    statistics = None
    if calibrated and recipe.calibration.mode == "fp_inputs":  # statistics of the full-precision model: before any rounding
        stages = StageStore(Path(cache_dir), fingerprint) if cache_dir is not None else None
        statistics = fp_statistics(model, qplan, calib, stages)
    with torch.no_grad():
        for t in qplan.active:
            if t.spec.method in DATA_FREE_METHODS:
                with materialized(modules[t.name]):  # an offloaded Linear: loaded, rounded, written back
                    qparams[t.name] = _quantize_data_free(modules[t.name], t)
    calib_info = None
    if calibrated:
        calib_info = _calibrate_cached(model, qplan, recipe, calib, fingerprint, cache_dir, statistics)
        qparams.update(calib_info.pop("qparams"))
        if calib_info["unquantized"]:  # left untouched with a warning: report them as 16-bit
            skipped = set(calib_info["unquantized"])
            qplan.targets = [dataclasses.replace(t, spec=dataclasses.replace(t.spec, bits=16)) if t.name in skipped else t
                             for t in qplan.targets]
    if check:
        verify(model, qplan, qparams)
    bpw = bits_per_weight(qplan)
    report = QuantReport(
        model_class=qplan.model_class,
        family=qplan.family,
        recipe=recipe.to_dict(),
        components=_component_summary(qplan, bpw, recipe),
        modules=[
            {"name": t.name, "component": t.component, "block": t.block, "kind": t.kind, "shape": list(t.shape),
             "bits": t.spec.bits, "method": t.spec.method, "group_size": t.spec.group_size, "sym": t.spec.sym}
            for t in qplan.active
        ],
        bpw=bpw,
        weights_sha256=weights_hash(model, [t.name for t in qplan.targets], (calib_info or {}).get("changed_tensors", ())),
        calibration=calib_info,
        warnings=list((calib_info or {}).get("warnings", [])),
        qparams=qparams,
    )
    log.info("quantized %d Linear layers; model bpw %.3f (study) / %.3f (storage)",
             len(qplan.active), bpw["model"]["study"], bpw["model"]["storage"])
    return report
