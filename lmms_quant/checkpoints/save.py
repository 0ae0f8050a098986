"""Save a model quantized by :func:`lmms_quant.quantize_` as a real low-bit checkpoint.

Format ``lmms-quant-packed`` (version 1), one folder:

* ``config.json``, ``generation_config.json`` and the processor's files, as
  ``save_pretrained`` writes them (no ``quantization_config``: transformers
  alone cannot read this format, and must not mistake it for a plain one --
  there is no ``model.safetensors``, so a plain ``from_pretrained`` fails loudly);
* ``lmms_quant_packed.safetensors``: for each quantized Linear ``X``

  - ``X.qweight``: ``int32``, the ``uint`` codes of the ``(out, in)`` weight in
    row-major order, packed densely (:func:`~lmms_quant.checkpoints.pack.pack_int32`,
    ``ceil(out * in * bits / 32)`` words);
  - ``X.scales``: ``(rows, n_groups)`` float32 (exact) or float16 (``scale_dtype``);
  - ``X.qzeros``: the zero points packed like the codes (asymmetric grids only;
    symmetric grids have ``zero = 2**(bits - 1)``);
  - ``X.g_idx``: ``int32`` ``(in,)`` (GPTQ act-order with dynamic groups only);

  every other tensor of the state dict (biases, norms, embeddings, AWQ's
  ``awq_input_scale`` buffers) as it is; tensors sharing storage are stored once;
* the safetensors header metadata holds ``format``, ``format_version`` and
  ``lmms_quant``: JSON with the :class:`~lmms_quant.apply.QuantReport` dict
  (recipe, bpw, modules, hash...), the layout of every packed layer, the
  aliases, and the names :func:`~lmms_quant.apply.weights_hash` runs over;
* ``lmms_quant_checkpoint.json``: the same metadata, readable without safetensors
  (and the marker :func:`~lmms_quant.checkpoints.detect.detect_quantization` looks for).

With float32 scales (the default) the reloaded model is bit-identical: the
same weights hash, the same outputs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..apply import QuantReport, weights_hash
from .pack import pack_int32
from .qlayer import CheckpointError, QuantizedLinearData

__all__ = ["save_quantized", "FORMAT", "FORMAT_VERSION", "WEIGHTS_FILE", "INFO_FILE", "hash_names"]

FORMAT = "lmms-quant-packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "lmms_quant_packed.safetensors"
INFO_FILE = "lmms_quant_checkpoint.json"


def hash_names(model: nn.Module, report: QuantReport | dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(target names, extra tensors)`` that ``report.weights_sha256`` was computed over."""
    from ..plan import plan
    from ..recipe import Recipe

    rd = report.to_dict() if isinstance(report, QuantReport) else report
    names = [t.name for t in plan(model, Recipe.from_dict(rd["recipe"])).targets]
    extra = sorted(set((rd.get("calibration") or {}).get("changed_tensors", ())))
    return names, extra


def _layer_tensors(name: str, q: QuantizedLinearData, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {f"{name}.qweight": pack_int32(q.codes.reshape(-1), q.bits),
           f"{name}.scales": q.scale.to(scale_dtype).contiguous()}
    if not q.sym:
        out[f"{name}.qzeros"] = pack_int32(q.zero.reshape(-1), q.bits)
    if q.g_idx is not None:
        out[f"{name}.g_idx"] = q.g_idx.to(torch.int32).contiguous()
    return out


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one copy of tensors that share storage; return ``(unique, {alias: kept key})``."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        unique[key] = t
    return unique, aliases


def collect_layers(model: nn.Module, report: QuantReport) -> tuple[dict[str, QuantizedLinearData], dict[str, torch.Tensor], dict[str, str]]:
    """What every writer needs: ``(integer layers, the other tensors of the state dict, aliases)``.

    Checks first that ``model`` is still what ``report`` describes (same weights
    hash) and that every quantized weight lies exactly on its grid.  Tensors
    sharing storage (tied embeddings) are kept once; ``aliases`` maps each
    dropped key to the kept one.
    """
    if not report.qparams and report.modules:
        raise CheckpointError("report.qparams is empty: this QuantReport does not carry the scales and zero points needed to pack "
                              "(it was restored from JSON?); quantize the model again in this process")
    names, extra = hash_names(model, report)
    if weights_hash(model, names, extra) != report.weights_sha256:
        raise CheckpointError("the model's weights hash differs from report.weights_sha256: the model was changed after quantize_ "
                              "(or the report belongs to another model); refusing to write a checkpoint that would misdescribe it")
    modules = dict(model.named_modules())
    layers = {name: QuantizedLinearData.from_weight(modules[name].weight, qp, name) for name, qp in report.qparams.items()}
    packed_weights = {f"{n}.weight" for n in layers}
    state = {k: v for k, v in model.state_dict().items() if k not in packed_weights}
    unique, aliases = _dedupe(state)
    return layers, {k: v.detach().cpu().contiguous() for k, v in unique.items()}, aliases


def input_scaled_layers(dense: dict[str, torch.Tensor]) -> list[str]:
    """Linears that divide their input by an AWQ input scale (``awq_input_scale`` buffers)."""
    from ..calibration import INPUT_SCALE_BUFFER

    return sorted(k[: -len(INPUT_SCALE_BUFFER) - 1] for k in dense if k.endswith("." + INPUT_SCALE_BUFFER))


def write_hf_checkpoint(model: nn.Module, out_dir: str | Path, tensors: dict[str, torch.Tensor],
                        quantization_config: dict[str, Any] | None, processor: Any = None,
                        weights_file: str = "model.safetensors", metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` plus the config (with ``quantization_config``), generation config and processor,
    the way ``save_pretrained`` lays a folder out."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / weights_file), metadata={"format": "pt", **(metadata or {})})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if quantization_config is not None:
        config.quantization_config = quantization_config
    config.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    return out


def save_quantized(model: nn.Module, report: QuantReport, out_dir: str | Path, processor: Any = None, *,
                   scale_dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` (quantized in place by :func:`~lmms_quant.quantize_`, which returned
    ``report``) to ``out_dir`` in the ``lmms-quant-packed`` format; returns the folder.

    The model must still be in the state ``report`` describes: its weights hash is
    recomputed and compared first, and every quantized weight must lie exactly
    on its grid (:meth:`QuantizedLinearData.from_weight`).  ``scale_dtype=torch.float16``
    halves the scale overhead (the storage bpw of ``report.bpw`` assumes fp16 scales)
    but makes the reloaded weights differ from the simulated ones by the scale's
    rounding; the metadata then says ``"exact": false``.
    """
    if scale_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"scale_dtype must be torch.float32 (exact) or torch.float16, got {scale_dtype}")
    layers, dense, aliases = collect_layers(model, report)
    names, extra = hash_names(model, report)
    tensors: dict[str, torch.Tensor] = dict(dense)
    for name, q in layers.items():
        tensors.update(_layer_tensors(name, q, scale_dtype))
    layers = {name: q.spec() for name, q in layers.items()}
    rd = report.to_dict()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "exact": scale_dtype == torch.float32,
        "scale_dtype": str(scale_dtype).replace("torch.", ""),
        "model_class": type(model).__name__,
        "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
        "layers": layers,
        "aliases": aliases,
        "hash": {"names": names, "extra": extra, "sha256": report.weights_sha256},
        "report": rd,
    }
    out = Path(out_dir)
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        if (out / stale).exists():
            raise CheckpointError(f"{out / stale} exists: write the packed checkpoint into an empty folder")
    text = json.dumps(meta, sort_keys=True, default=str)
    write_hf_checkpoint(model, out, tensors, None, processor, weights_file=WEIGHTS_FILE,
                        metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION), "lmms_quant": text})
    (out / INFO_FILE).write_text(json.dumps({k: v for k, v in meta.items()}, indent=1, sort_keys=True, default=str))
    return out
