"""Export to the compressed-tensors format (``pack-quantized``) and read it back on the CPU.

compressed-tensors 0.19 (the format of llm-compressor, loaded by vLLM and by
transformers' compressed-tensors integration) stores integer weights as

* ``X.weight_packed``: ``int32`` ``(out, ceil(in * bits / 32))``, the signed
  codes ``q - 2**(bits-1)`` offset back to unsigned and packed densely along
  the input dimension -- bit for bit our :func:`~lmms_quant.checkpoints.pack.pack_int32`
  of the unsigned codes (1 to 8 bits);
* ``X.weight_scale``: ``(out, n_groups)`` (``channel``: ``(out, 1)``;
  ``tensor``: ``(1,)``) in the model's dtype;
* ``X.weight_zero_point`` (asymmetric only): for ``group``/``channel`` the
  signed zero points packed along the **output** dimension
  (``(ceil(out * bits / 32), n_groups)``); for ``tensor`` an unpacked ``(1,)``;
* ``X.weight_shape``: ``int64`` ``[out, in]``.

``W = (q_signed - zp_signed) * scale``, which is our ``scale * (q - zero)``.

One file can mix specs: each ``config_groups`` entry is a scheme (bits,
strategy, group size, symmetry) with its own ``targets``; we write exact
module names, so per-component (or per-layer) bit widths go in one file, and
every other Linear goes into ``ignore`` (vLLM requires every Linear to be
matched or ignored).  What it cannot express, and so is refused: AWQ input
scales (no per-input-channel activation scale for weight-only schemes) and
GPTQ act-order with dynamic groups (``actorder: "group"`` / ``g_idx`` was
removed in 0.19).  Scales take the model's dtype: the export is exact for
float32 models and rounds scales to bf16/fp16 otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..apply import QuantReport
from .pack import pack_int32, packed_words, unpack_int32
from .qlayer import CheckpointError, CheckpointShapeError, QuantizedLinearData
from .save import collect_layers, input_scaled_layers, write_hf_checkpoint

__all__ = ["export_compressed_tensors", "ct_layer_tensors", "read_ct_layer", "ct_scheme"]


def ct_scheme(q: QuantizedLinearData) -> dict[str, Any]:
    """The ``weights`` QuantizationArgs of a layer."""
    strategy = {0: "tensor", -1: "channel"}.get(q.group_size, "group")
    return {"num_bits": q.bits, "type": "int", "symmetric": q.sym, "strategy": strategy,
            "group_size": q.group_size if strategy == "group" else None, "dynamic": False, "actorder": None, "observer": "minmax"}


def ct_layer_tensors(q: QuantizedLinearData, dtype: torch.dtype, name: str = "layer") -> dict[str, torch.Tensor]:
    """``weight_packed``, ``weight_scale``, ``weight_shape`` (and ``weight_zero_point``) of one layer."""
    if q.g_idx is not None:
        raise CheckpointError(f"{name}: act-order groups (g_idx) cannot be expressed in compressed-tensors 0.19 (actorder 'group' was removed)")
    out, n_in = q.shape
    half = 2 ** (q.bits - 1)
    t = {"weight_packed": pack_int32(q.codes, q.bits, dim=1),
         "weight_shape": torch.tensor([out, n_in], dtype=torch.int64)}
    if q.group_size == 0:
        t["weight_scale"] = q.scale.reshape(1).to(dtype)
        if not q.sym:
            t["weight_zero_point"] = (q.zero.reshape(1) - half).to(torch.int8)
    else:
        t["weight_scale"] = q.scale.to(dtype).contiguous()
        if not q.sym:
            t["weight_zero_point"] = pack_int32(q.zero.round().to(torch.int64), q.bits, dim=0)
    return t


def read_ct_layer(prefix: str, t: dict[str, torch.Tensor], spec: dict[str, Any], shape: tuple[int, int]) -> QuantizedLinearData:
    """Rebuild one layer from compressed-tensors tensors (``pack-quantized``, or ``naive``/``int-quantized``
    int8 weights), checking every shape against ``shape`` (and against ``weight_shape`` when present)."""
    out, n_in = shape
    bits, gs, sym = int(spec["bits"]), int(spec["group_size"]), bool(spec["sym"])
    half = 2 ** (bits - 1)
    if spec.get("actorder") == "group" or "weight_g_idx" in t:
        raise CheckpointError(f"{prefix}: act-order groups (weight_g_idx) are not supported by this reader")
    if "weight_shape" in t and [int(x) for x in t["weight_shape"].tolist()] != [out, n_in]:
        raise CheckpointShapeError(f"{prefix}.weight_shape", tuple(int(x) for x in t["weight_shape"].tolist()), shape,
                                   "the dense weight shape recorded in the checkpoint")
    n_groups = 1 if gs in (0, -1) else n_in // gs
    scale_shape = (1,) if gs == 0 else (out, n_groups)
    if "weight_scale" not in t:
        raise CheckpointError(f"checkpoint tensor {prefix}.weight_scale is missing")
    if tuple(t["weight_scale"].shape) != scale_shape and not (gs == 0 and t["weight_scale"].numel() == 1):
        raise CheckpointShapeError(f"{prefix}.weight_scale", tuple(t["weight_scale"].shape), scale_shape, f"strategy {spec.get('strategy')}")
    if "weight_packed" in t:
        want = (out, packed_words(n_in, bits))
        if tuple(t["weight_packed"].shape) != want:
            raise CheckpointShapeError(f"{prefix}.weight_packed", tuple(t["weight_packed"].shape), want, f"{bits}-bit codes of a {out}x{n_in} weight")
        codes = unpack_int32(t["weight_packed"], bits, n_in, dim=1)
    elif "weight" in t:
        if tuple(t["weight"].shape) != (out, n_in):
            raise CheckpointShapeError(f"{prefix}.weight", tuple(t["weight"].shape), (out, n_in))
        codes = (t["weight"].to(torch.int16) + half).to(torch.uint8)
    else:
        raise CheckpointError(f"checkpoint tensor {prefix}.weight_packed is missing")
    rows = 1 if gs == 0 else out
    scale = t["weight_scale"].float().reshape(rows, n_groups)
    if sym:
        zero = torch.full((rows, n_groups), float(half))
    elif "weight_zero_point" not in t:
        raise CheckpointError(f"checkpoint tensor {prefix}.weight_zero_point is missing (asymmetric scheme)")
    elif gs != 0 and "weight_packed" in t:
        want = (packed_words(out, bits), n_groups)
        if tuple(t["weight_zero_point"].shape) != want:
            raise CheckpointShapeError(f"{prefix}.weight_zero_point", tuple(t["weight_zero_point"].shape), want, "zero points packed along rows")
        zero = unpack_int32(t["weight_zero_point"], bits, out, dim=0).float()
    else:
        zp = t["weight_zero_point"]
        if zp.numel() != rows * n_groups:
            raise CheckpointShapeError(f"{prefix}.weight_zero_point", tuple(zp.shape), scale_shape)
        zero = zp.float().reshape(rows, n_groups) + half
    return QuantizedLinearData(codes, scale, zero, bits, gs, sym, None, torch.float32)


def export_compressed_tensors(model: nn.Module, report: QuantReport, out_dir: str | Path, processor: Any = None) -> Path:
    """Write ``model`` (quantized by :func:`~lmms_quant.quantize_`) as a compressed-tensors
    ``pack-quantized`` checkpoint: one config group per distinct (bits, strategy,
    group size, symmetry), targets by exact module name, every other Linear ignored.

    Refuses AWQ input scales and act-order ``g_idx``.  Exact for float32 models.
    """
    layers, dense, _ = collect_layers(model, report)
    scaled = input_scaled_layers(dense)
    if scaled:
        raise CheckpointError(f"compressed-tensors cannot express AWQ input scales (x / s before {scaled[:4]}...); "
                              "save with save_quantized (lmms-quant-packed) instead")
    if not layers:
        raise CheckpointError("nothing is quantized: a compressed-tensors checkpoint needs at least one quantized Linear")
    dtype = next(iter(dense.values())).dtype if dense else torch.float32
    tensors = dict(dense)
    groups: dict[tuple, dict[str, Any]] = {}
    for name, q in layers.items():
        w_dtype = q.dtype if q.dtype.is_floating_point else dtype
        for leaf, t in ct_layer_tensors(q, w_dtype, name).items():
            tensors[f"{name}.{leaf}"] = t
        scheme = ct_scheme(q)
        key = tuple(sorted((k, v) for k, v in scheme.items()))
        groups.setdefault(key, {"targets": [], "weights": scheme, "input_activations": None, "output_activations": None,
                                "format": "pack-quantized"})["targets"].append(name)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    qc = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    return write_hf_checkpoint(model, out_dir, tensors, qc, processor)
