"""Load quantized checkpoints back into plain transformers models on the CPU.

* :func:`load_quantized` reads our ``lmms-quant-packed`` format
  (:mod:`~lmms_quant.checkpoints.save`) and returns the simulated model exactly
  as :func:`~lmms_quant.quantize_` left it (same weights hash; AWQ input scales
  re-attached), its processor and the stored ``QuantReport`` dict.
* :func:`load_prequantized` reads a checkpoint quantized elsewhere -- GPTQ
  (AutoGPTQ v1 / GPTQModel v2 packing), AWQ (AutoAWQ GEMM) or
  compressed-tensors (``pack-quantized``, ``naive-quantized``,
  ``int-quantized``) -- and dequantizes every packed Linear into the requested
  float dtype, so lmms-quant evaluates it with no auto-gptq / autoawq / GPU
  kernel.  Numerically the result is the checkpoint's own grid:
  ``scale * (q - zero)`` with the checkpoint's (e.g. fp16) scales.

Both build the model skeleton from the config and refuse any tensor whose
shape differs from what the config implies
(:class:`~lmms_quant.checkpoints.qlayer.CheckpointShapeError`), any missing or
unexpected tensor, and any pickle file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._hf import assign_state, build_skeleton, legacy_renamer, load_processor, read_config, safetensors_files
from .detect import QUANT_MARKERS, DetectedQuant, detect_quantization, layer_spec
from .pack import packed_words, unpack_int32
from .qlayer import CheckpointError, CheckpointShapeError, QuantizedLinearData

__all__ = ["load_quantized", "load_prequantized", "read_packed_layers", "is_packed_checkpoint", "LAYER_READERS"]


def is_packed_checkpoint(path: str | Path) -> bool:
    """True for a folder written by :func:`~lmms_quant.checkpoints.save.save_quantized`."""
    from .save import INFO_FILE

    return Path(path).is_dir() and (Path(path) / INFO_FILE).is_file()


def _read_all(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            meta.update(fh.metadata() or {})
            for k in fh.keys():
                if k in tensors:
                    raise CheckpointError(f"tensor {k!r} appears in two files of the checkpoint")
                tensors[k] = fh.get_tensor(k)
    return tensors, meta


def _expect(name: str, t: torch.Tensor | None, shape: tuple[int, ...], why: str = "") -> torch.Tensor:
    if t is None:
        raise CheckpointError(f"checkpoint tensor {name!r} is missing")
    if tuple(t.shape) != tuple(shape):
        raise CheckpointShapeError(name, tuple(t.shape), tuple(shape), why)
    return t


# ---------------------------------------------------------------- our format
def _read_ours(prefix: str, t: dict[str, torch.Tensor], spec: dict[str, Any], shape: tuple[int, int]) -> QuantizedLinearData:
    out, n_in = shape
    bits, gs, sym = int(spec["bits"]), int(spec["group_size"]), bool(spec["sym"])
    if list(spec["shape"]) != [out, n_in]:
        raise CheckpointShapeError(f"{prefix}.weight", tuple(spec["shape"]), shape, f"stored packed as {prefix}.qweight")
    rows, n_groups = (1, 1) if gs == 0 else (out, 1) if gs in (-1, n_in) else (out, n_in // gs)
    words = _expect(f"{prefix}.qweight", t.get("qweight"), (packed_words(out * n_in, bits),), f"{out}x{n_in} codes at {bits} bits")
    scale = _expect(f"{prefix}.scales", t.get("scales"), (rows, n_groups), f"group_size {gs}").float()
    codes = unpack_int32(words, bits, out * n_in).reshape(out, n_in)
    if sym:
        zero = torch.full((rows, n_groups), float(2 ** (bits - 1)))
    else:
        zw = _expect(f"{prefix}.qzeros", t.get("qzeros"), (packed_words(rows * n_groups, bits),), "packed zero points")
        zero = unpack_int32(zw, bits, rows * n_groups).reshape(rows, n_groups).float()
    g_idx = None
    if spec.get("g_idx"):
        g_idx = _expect(f"{prefix}.g_idx", t.get("g_idx"), (n_in,)).long()
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
            raise CheckpointError(f"{prefix}.g_idx: group indices outside [0, {n_groups})")
    dtype = getattr(torch, spec.get("dtype", "float32"))
    return QuantizedLinearData(codes, scale, zero, bits, -1 if gs == n_in else gs, sym, g_idx, dtype)


def read_packed_layers(path: str | Path) -> tuple[dict[str, QuantizedLinearData], dict[str, Any]]:
    """The integer layers and the metadata of an ``lmms-quant-packed`` checkpoint (no model is built)."""
    from .save import FORMAT, WEIGHTS_FILE

    tensors, meta = _read_all([Path(path) / WEIGHTS_FILE])
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} is not an {FORMAT} file (metadata format {meta.get('format')!r})")
    info = json.loads(meta["lmms_quant"])
    layers = {}
    for name, spec in info["layers"].items():
        local = {leaf: tensors[f"{name}.{leaf}"] for leaf in ("qweight", "scales", "qzeros", "g_idx") if f"{name}.{leaf}" in tensors}
        layers[name] = _read_ours(name, local, spec, tuple(spec["shape"]))
    return layers, info


def load_quantized(path: str | Path, *, device: str = "cpu", trust_remote_code: bool = False,
                   verify: bool = True) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load an ``lmms-quant-packed`` checkpoint: ``(model, processor or None, QuantReport dict)``.

    The weights are rebuilt with the quantizers' own arithmetic, so the model
    is the one that was saved; with ``verify`` (default) its
    :func:`~lmms_quant.apply.weights_hash` is recomputed and must equal the
    stored one (for a checkpoint saved with exact float32 scales).
    """
    from ..apply import weights_hash
    from ..calibration import INPUT_SCALE_BUFFER, attach_input_scale
    from .save import FORMAT, FORMAT_VERSION, WEIGHTS_FILE

    path = Path(path)
    if not is_packed_checkpoint(path):
        raise CheckpointError(f"{path}: not an {FORMAT} checkpoint (no lmms_quant_checkpoint.json)")
    tensors, meta = _read_all([path / WEIGHTS_FILE])
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                              f"this lmms-quant reads {FORMAT} up to version {FORMAT_VERSION}")
    info = json.loads(meta["lmms_quant"])
    config = read_config(path, trust_remote_code)
    model = build_skeleton(config, trust_remote_code, dtype=getattr(torch, info.get("dtype") or "float32", None))
    if type(model).__name__ != info.get("model_class", type(model).__name__):
        raise CheckpointError(f"{path}: saved from {info['model_class']}, but its config builds {type(model).__name__}")
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    for name, spec in info["layers"].items():
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear):
            raise CheckpointError(f"{path}: packed layer {name!r} is not a Linear of {type(model).__name__}")
        local = {leaf: tensors.pop(f"{name}.{leaf}") for leaf in ("qweight", "scales", "qzeros", "g_idx") if f"{name}.{leaf}" in tensors}
        q = _read_ours(name, local, spec, tuple(mod.weight.shape))
        state[f"{name}.weight"] = q.dequantize()
    input_scales = {k: tensors.pop(k) for k in list(tensors) if k.endswith("." + INPUT_SCALE_BUFFER)}
    state.update(tensors)
    for alias, src in info.get("aliases", {}).items():
        if alias.endswith("." + INPUT_SCALE_BUFFER):
            input_scales[alias] = input_scales[src]
        elif src in state:
            state[alias] = state[src]
    assign_state(model, state)
    for key, scale in input_scales.items():
        owner = key[: -len(INPUT_SCALE_BUFFER) - 1]
        lin = modules.get(owner)
        if not isinstance(lin, nn.Linear):
            raise CheckpointError(f"{path}: AWQ input scale {key!r} belongs to no Linear")
        _expect(key, scale, (lin.in_features,), "one scale per input feature")
        attach_input_scale(lin, scale)
    _load_generation_config(model, path)
    model.eval()
    if verify and info.get("exact", True):
        got = weights_hash(model, info["hash"]["names"], info["hash"]["extra"])
        if got != info["hash"]["sha256"]:
            raise CheckpointError(f"{path}: the reloaded weights hash {got[:16]}... differs from the saved {info['hash']['sha256'][:16]}...; "
                                  "the checkpoint is corrupt or was edited")
    model.to(device)
    return model, load_processor(path, trust_remote_code), info["report"]


def _load_generation_config(model: nn.Module, path: Path) -> None:
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))


# ---------------------------------------------------------------- checkpoints quantized elsewhere
def _gptq_reader(prefix, t, spec, shape, det):
    from .autogptq import read_gptq_layer

    return read_gptq_layer(prefix, t, spec, shape, det.format)


def _awq_reader(prefix, t, spec, shape, det):
    from .autoawq import read_awq_layer

    return read_awq_layer(prefix, t, spec, shape)


def _ct_reader(prefix, t, spec, shape, det):
    from .compressed_tensors import read_ct_layer

    return read_ct_layer(prefix, t, spec, shape)


#: method -> (per-module tensor leaves, reader(prefix, tensors, spec, (out, in), detected) -> QuantizedLinearData)
LAYER_READERS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "gptq": (("qweight", "qzeros", "scales", "g_idx"), _gptq_reader),
    "awq": (("qweight", "qzeros", "scales"), _awq_reader),
    "compressed-tensors": (("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "weight"), _ct_reader),
}


def load_prequantized(path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                      trust_remote_code: bool = False) -> tuple[nn.Module, Any, DetectedQuant]:
    """Load a GPTQ / AWQ / compressed-tensors (or our packed) checkpoint with every quantized
    Linear dequantized to ``dtype``: ``(model, processor or None, detection)``.

    The model is a plain transformers model (``config.quantization_config``
    removed), ready for lmms-quant's backend; ``detection`` (bpw, quantized
    components and modules) belongs in the results metadata.
    """
    path = Path(path)
    det = detect_quantization(path, scan=True, trust_remote_code=trust_remote_code)
    if det is None:
        raise CheckpointError(f"{path}: not a quantized checkpoint (no quantization_config); load it with lmms_quant.models.load_vlm")
    if det.method == "lmms-quant":
        model, processor, _ = load_quantized(path, device=device, trust_remote_code=trust_remote_code)
        return model, processor, det
    if not det.supported:
        raise CheckpointError(f"{path}: {det.reason}")
    leaves, reader = LAYER_READERS[det.method]
    config = read_config(path, trust_remote_code)
    del config.quantization_config
    model = build_skeleton(config, trust_remote_code, dtype=dtype)
    rename = legacy_renamer(model)
    modules = dict(model.named_modules())
    raw, _ = _read_all(safetensors_files(path))
    marker = QUANT_MARKERS[det.method]
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        mod, _, leaf = key.rpartition(".")
        new_mod = rename(mod + ".weight")[: -len(".weight")] if mod else mod
        by_module.setdefault(new_mod, {})[leaf] = t
    quantized = {m for m, leaves_here in by_module.items() if marker in leaves_here
                 or (det.method == "compressed-tensors" and "weight_scale" in leaves_here)}
    state: dict[str, torch.Tensor] = {}
    for mod_name, local in by_module.items():
        if mod_name in quantized:
            mod = modules.get(mod_name)
            if not isinstance(mod, nn.Linear):
                raise CheckpointError(f"{path}: quantized tensors for {mod_name!r}, which is not a Linear of {type(model).__name__}")
            classes = tuple(c.__name__ for c in type(mod).__mro__)
            spec = layer_spec(det, mod_name, classes)
            if spec is None:
                raise CheckpointError(f"{path}: {mod_name} holds quantized tensors but its quantization_config leaves it unquantized")
            q_local = {k: local.pop(k) for k in list(local) if k in leaves}
            q = reader(mod_name, q_local, spec, tuple(mod.weight.shape), det)
            state[f"{mod_name}.weight"] = q.dequantize(dtype)
        for leaf, t in local.items():
            dense[f"{mod_name}.{leaf}" if mod_name else leaf] = t
    for key, t in dense.items():
        state[key] = t.to(dtype) if t.is_floating_point() else t
    assign_state(model, state)
    _load_generation_config(model, path)
    model.eval().to(device)
    return model, load_processor(path, trust_remote_code), det
