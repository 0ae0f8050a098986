"""The AWQ checkpoint format (``quant_method: "awq"``, AutoAWQ ``version: "gemm"``): writer and CPU reader.

Layout per quantized Linear ``X`` of weight shape ``(out, in)``, as AutoAWQ
0.2 writes it (``awq/modules/linear/gemm.py``, ``WQLinear_GEMM.from_linear``)
and its GEMM kernels, transformers and vLLM read it:

* ``X.qweight``: ``int32`` ``(in, out / 8)``: the 4-bit codes of ``W^T``
  (``(in, out)``) packed along the **output** dimension, eight per word, in
  AutoAWQ's interleaved order: nibble ``i`` of word ``c`` holds output column
  ``8 c + [0, 2, 4, 6, 1, 3, 5, 7][i]``;
* ``X.qzeros``: ``int32`` ``(in / group_size, out / 8)``, the zero points packed the same way
  (stored as is, no offset);
* ``X.scales``: ``float16`` ``(in / group_size, out)``;
* ``X.bias`` unchanged.

``W[o, i] = scales[i // g, o] * (q[i, o] - zero[i // g, o])``.

What the format cannot express, and so is refused: bits other than 4 (GEMM
packs nibbles), per-channel or per-tensor grids and mixed group sizes (the
config has one ``group_size``), GPTQ act-order (``g_idx``), and AWQ input
scales that could not be folded into a previous op (AutoAWQ only expresses
those as a ``ScaledActivation`` after an activation function).  Symmetric
grids are written as ``zero_point: true`` with ``zero = 8`` (exact).
Modules left unquantized are listed in ``modules_to_not_convert``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..apply import QuantReport
from .pack import awq_order, awq_reverse_order, pack_int32, unpack_int32
from .qlayer import CheckpointError, CheckpointShapeError, QuantizedLinearData
from .save import collect_layers, input_scaled_layers, write_hf_checkpoint

__all__ = ["export_awq", "awq_layer_tensors", "read_awq_layer"]


def awq_layer_tensors(q: QuantizedLinearData, name: str = "layer") -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` of one layer in AutoAWQ's GEMM layout."""
    out, n_in = q.shape
    if q.bits != 4:
        raise CheckpointError(f"{name}: AutoAWQ GEMM checkpoints are 4-bit; this layer has {q.bits} bits")
    if q.group_size <= 0 or q.g_idx is not None:
        raise CheckpointError(f"{name}: AWQ checkpoints need contiguous groups of a fixed size (group_size > 0, no act-order); "
                              f"this layer has group_size {q.group_size}{' with g_idx' if q.g_idx is not None else ''}")
    if out % 8:
        raise CheckpointError(f"{name}: AWQ packing needs a multiple of 8 output features, got {out}")
    return {
        "qweight": pack_int32(awq_order(q.codes.t()), 4, dim=-1),
        "qzeros": pack_int32(awq_order(q.zero.t().round().to(torch.int64)), 4, dim=-1),
        "scales": q.scale.t().to(torch.float16).contiguous(),
    }


def read_awq_layer(prefix: str, t: dict[str, torch.Tensor], spec: dict[str, Any], shape: tuple[int, int]) -> QuantizedLinearData:
    """Rebuild one layer from its AutoAWQ GEMM tensors (shapes checked against ``shape``)."""
    out, n_in = shape
    bits, gs = int(spec["bits"]), int(spec["group_size"])
    if bits != 4:
        raise CheckpointError(f"{prefix}: AWQ GEMM layers are 4-bit, the config says {bits}")
    if gs <= 0 or n_in % gs:
        raise CheckpointError(f"{prefix}: AWQ group_size {gs} does not divide the input width {n_in}")
    n_groups = n_in // gs
    expected = {"qweight": (n_in, out // 8), "qzeros": (n_groups, out // 8), "scales": (n_groups, out)}
    for leaf, shp in expected.items():
        if leaf not in t:
            raise CheckpointError(f"checkpoint tensor {prefix}.{leaf} is missing")
        if tuple(t[leaf].shape) != shp:
            raise CheckpointShapeError(f"{prefix}.{leaf}", tuple(t[leaf].shape), shp, f"{out}x{n_in} Linear, 4 bits, group_size {gs}")
    codes = awq_reverse_order(unpack_int32(t["qweight"], 4, out, dim=-1)).t().contiguous()
    zero = awq_reverse_order(unpack_int32(t["qzeros"], 4, out, dim=-1)).float().t().contiguous()
    scale = t["scales"].float().t().contiguous()
    return QuantizedLinearData(codes, scale, zero, 4, gs, bool(spec.get("sym", False)), None, torch.float32)


def _not_converted(model: nn.Module, quantized: set[str]) -> list[str]:
    """Unquantized Linears, collapsed to a component root when none below it is quantized."""
    from ..plan import resolve_components

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        roots = [r for cb in resolve_components(model)[2].values() for r in cb.roots]
    except Exception:
        roots = []
    out: list[str] = []
    covered: set[str] = set()
    for root in roots:
        under = [n for n in linears if n == root or n.startswith(root + ".")]
        if under and not any(n in quantized for n in under):
            out.append(root)
            covered.update(under)
    out += [n for n in linears if n not in quantized and n not in covered]
    return out


def export_awq(model: nn.Module, report: QuantReport, out_dir: str | Path, processor: Any = None) -> Path:
    """Write ``model`` (quantized by :func:`~lmms_quant.quantize_`) as an AutoAWQ GEMM checkpoint.

    Every quantized Linear must share one 4-bit grouped spec; see the module
    docstring for what is refused.
    """
    layers, dense, _ = collect_layers(model, report)
    scaled = input_scaled_layers(dense)
    if scaled:
        raise CheckpointError(f"AWQ (AutoAWQ) checkpoints cannot express input scales on {scaled[:4]}...: AutoAWQ only folds "
                              "them into a previous op or a ScaledActivation; save with save_quantized instead")
    if not layers:
        raise CheckpointError("nothing is quantized: an AWQ checkpoint needs at least one quantized Linear")
    group_sizes = {q.group_size for q in layers.values()}
    if len(group_sizes) > 1:
        raise CheckpointError(f"AWQ checkpoints have one group_size; this model mixes {sorted(group_sizes)}")
    tensors = dict(dense)
    for name, q in layers.items():
        for leaf, t in awq_layer_tensors(q, name).items():
            tensors[f"{name}.{leaf}"] = t
    qc = {"quant_method": "awq", "bits": 4, "group_size": group_sizes.pop(), "zero_point": True, "version": "gemm",
          "modules_to_not_convert": _not_converted(model, set(layers)),
          "lmms_quant": {"recipe": report.recipe, "weights_sha256_simulated": report.weights_sha256}}
    return write_hf_checkpoint(model, out_dir, tensors, qc, processor)
