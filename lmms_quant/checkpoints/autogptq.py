"""The GPTQ checkpoint format (``quant_method: "gptq"``): writer and CPU reader.

Layout per quantized Linear ``X`` of weight shape ``(out, in)``, as AutoGPTQ
0.7 writes it (``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py``,
``QuantLinear.pack``) and transformers/optimum and GPTQModel read it:

* ``X.qweight``: ``int32`` ``(in * bits / 32, out)``: the codes of ``W^T``
  (``(in, out)``) packed densely along the **input** dimension
  (:func:`~lmms_quant.checkpoints.pack.pack_int32`, ``dim=0``);
* ``X.qzeros``: ``int32`` ``(n_groups, out * bits / 32)``: zero points packed
  along the **output** dimension.  ``checkpoint_format: "gptq"`` (v1, AutoGPTQ)
  stores ``zero - 1`` and readers add the 1 back after masking, so a zero
  point of 0 is not representable (AutoGPTQ's own packer corrupts it);
  ``"gptq_v2"`` (GPTQModel) stores ``zero`` as is;
* ``X.scales``: ``float16`` ``(n_groups, out)``;
* ``X.g_idx``: ``int32`` ``(in,)``, the group of every input column
  (``i // group_size`` without act-order);
* ``X.bias`` unchanged.

``W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])``.

The config holds one ``bits`` / ``group_size`` / ``sym`` / ``desc_act``; modules
with another spec go into GPTQModel's ``dynamic`` map (``{"+:regex": {...}}``,
first match wins).  Per-tensor grids are written per channel (the same scale
repeated, exact).  Scales are fp16 as the format requires, so the reloaded
weights equal the simulated ones up to the scale's fp16 rounding.  AWQ input
scales cannot be expressed and are refused.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..apply import QuantReport
from .pack import pack_int32, unpack_int32
from .qlayer import CheckpointError, CheckpointShapeError, QuantizedLinearData
from .save import collect_layers, input_scaled_layers, write_hf_checkpoint

__all__ = ["export_gptq", "gptq_layer_tensors", "read_gptq_layer", "GPTQ_BITS"]

#: Widths AutoGPTQ's packers and kernels know.
GPTQ_BITS = (2, 3, 4, 8)


def _groups(q: QuantizedLinearData) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(group_size for the config, g_idx (in,), scale (n_groups, out), zero (n_groups, out))``."""
    out, n_in = q.shape
    if q.group_size == 0:  # per tensor: one group, the scale repeated for every output channel
        return -1, torch.zeros(n_in, dtype=torch.int32), q.scale.expand(1, out), q.zero.expand(1, out)
    if q.group_size == -1:
        return -1, torch.zeros(n_in, dtype=torch.int32), q.scale.t(), q.zero.t()
    g_idx = q.g_idx if q.g_idx is not None else torch.arange(n_in) // q.group_size
    return q.group_size, g_idx.to(torch.int32), q.scale.t(), q.zero.t()


def gptq_layer_tensors(q: QuantizedLinearData, checkpoint_format: str = "gptq", name: str = "layer") -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` of one layer in the GPTQ layout."""
    out, n_in = q.shape
    if q.bits not in GPTQ_BITS:
        raise CheckpointError(f"{name}: GPTQ checkpoints hold {GPTQ_BITS} bits, not {q.bits}")
    if (n_in * q.bits) % 32 or (out * q.bits) % 32:
        raise CheckpointError(f"{name}: GPTQ packing needs in*bits and out*bits to be multiples of 32; shape {[out, n_in]} at {q.bits} bits")
    _, g_idx, scale, zero = _groups(q)
    zero = zero.round().to(torch.int64)
    if checkpoint_format == "gptq":
        if int(zero.min()) < 1:
            raise CheckpointError(f"{name}: a zero point of 0 cannot be stored in GPTQ v1 (it stores zero - 1); "
                                  "write checkpoint_format='gptq_v2' instead")
        stored = zero - 1
    elif checkpoint_format == "gptq_v2":
        stored = zero
    else:
        raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    return {
        "qweight": pack_int32(q.codes.t(), q.bits, dim=0),
        "qzeros": pack_int32(stored, q.bits, dim=1),
        "scales": scale.to(torch.float16).contiguous(),
        "g_idx": g_idx.contiguous(),
    }


def read_gptq_layer(prefix: str, t: dict[str, torch.Tensor], spec: dict[str, Any], shape: tuple[int, int],
                    checkpoint_format: str = "gptq") -> QuantizedLinearData:
    """Rebuild one layer's codes, scales and zero points from its GPTQ tensors (shapes checked against ``shape``)."""
    out, n_in = shape
    bits, gs = int(spec["bits"]), int(spec["group_size"])
    n_groups = 1 if gs <= 0 else -(-n_in // gs)
    expected = {"qweight": (n_in * bits // 32, out), "qzeros": (n_groups, out * bits // 32), "scales": (n_groups, out)}
    for leaf, shp in expected.items():
        if leaf not in t:
            raise CheckpointError(f"checkpoint tensor {prefix}.{leaf} is missing")
        if tuple(t[leaf].shape) != shp:
            raise CheckpointShapeError(f"{prefix}.{leaf}", tuple(t[leaf].shape), shp, f"{out}x{n_in} Linear, {bits} bits, group_size {gs}")
    codes = unpack_int32(t["qweight"], bits, n_in, dim=0).t()
    zero = unpack_int32(t["qzeros"], bits, out, dim=1).to(torch.int64)
    if checkpoint_format == "gptq":  # v1: the stored value is zero - 1 (masked to bits), read back as stored + 1
        zero = zero + 1
    scale = t["scales"].float().t().contiguous()
    zero = zero.float().t().contiguous()
    g_idx = None
    if "g_idx" in t:
        if tuple(t["g_idx"].shape) != (n_in,):
            raise CheckpointShapeError(f"{prefix}.g_idx", tuple(t["g_idx"].shape), (n_in,))
        g_idx = t["g_idx"].long()
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
            raise CheckpointError(f"{prefix}.g_idx: group indices outside [0, {n_groups})")
    contiguous = torch.arange(n_in) // gs if gs > 0 else torch.zeros(n_in, dtype=torch.long)
    if g_idx is None or torch.equal(g_idx, contiguous):
        g_idx = None
    return QuantizedLinearData(codes, scale, zero, bits, gs if gs > 0 else -1, bool(spec.get("sym", True)), g_idx, torch.float32)


def _dynamic(layers: dict[str, dict[str, Any]], default: dict[str, Any]) -> dict[str, dict[str, Any]]:
    by_spec: dict[tuple, list[str]] = {}
    for name, spec in layers.items():
        if spec != default:
            by_spec.setdefault(tuple(sorted(spec.items())), []).append(name)
    return {"+:^(?:" + "|".join(re.escape(n) for n in names) + ")$": dict(key) for key, names in by_spec.items()}


def export_gptq(model: nn.Module, report: QuantReport, out_dir: str | Path, processor: Any = None, *,
                checkpoint_format: str = "gptq") -> Path:
    """Write ``model`` (quantized by :func:`~lmms_quant.quantize_`) as a GPTQ checkpoint.

    ``checkpoint_format``: ``"gptq"`` (AutoGPTQ v1, what transformers/optimum
    expect) or ``"gptq_v2"`` (GPTQModel).  Refuses bits outside
    :data:`GPTQ_BITS`, AWQ input scales, and (v1) zero points of 0.
    """
    layers, dense, _ = collect_layers(model, report)
    scaled = input_scaled_layers(dense)
    if scaled:
        raise CheckpointError(f"GPTQ checkpoints cannot express AWQ input scales (x / s before {scaled[:4]}...); "
                              "save with save_quantized (lmms-quant-packed) instead")
    tensors = dict(dense)
    specs: dict[str, dict[str, Any]] = {}
    for name, q in layers.items():
        for leaf, t in gptq_layer_tensors(q, checkpoint_format, name).items():
            tensors[f"{name}.{leaf}"] = t
        gs, _, _, _ = _groups(q)
        specs[name] = {"bits": q.bits, "group_size": gs, "sym": q.sym, "desc_act": q.g_idx is not None}
    if not specs:
        raise CheckpointError("nothing is quantized: a GPTQ checkpoint needs at least one quantized Linear")
    default = dict(Counter(tuple(sorted(s.items())) for s in specs.values()).most_common(1)[0][0])
    qc = {"quant_method": "gptq", **default, "checkpoint_format": checkpoint_format, "true_sequential": True,
          "damp_percent": 0.01, "static_groups": False, "dynamic": _dynamic(specs, default) or None,
          "lmms_quant": {"recipe": report.recipe, "weights_sha256_simulated": report.weights_sha256}}
    return write_hf_checkpoint(model, out_dir, tensors, qc, processor)
