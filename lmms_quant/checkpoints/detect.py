"""Recognise a checkpoint that is already quantized, and say what it holds.

:func:`detect_quantization` reads a checkpoint's ``quantization_config``
(``config.json``) -- GPTQ (``quant_method: gptq``, AutoGPTQ/GPTQModel),
AWQ (``awq``, AutoAWQ) or compressed-tensors -- or our own
``lmms_quant_checkpoint.json``, and, given a folder, scans the safetensors
headers (no weights are read) to list every quantized Linear with its bits,
group size and symmetry, map them onto the VLM's components (vit, connector,
llm) with the architecture table, and compute bits per weight two ways:

* ``study``: quantized Linear weights at their bit width, every other
  parameter at 16 (the convention of :mod:`lmms_quant.bpw`);
* ``storage``: the bytes of every tensor in the files x 8 / the fp model's
  parameter count (scales, zero points, g_idx, and unquantized tensors at
  their stored width included).

:func:`ensure_not_quantized` is the guard against quantizing such a
checkpoint a second time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .qlayer import CheckpointError

__all__ = ["DetectedQuant", "detect_quantization", "ensure_not_quantized", "AlreadyQuantizedError", "layer_spec", "QUANT_MARKERS"]

#: method -> per-module tensor suffix that marks a quantized Linear in the files.
QUANT_MARKERS = {"gptq": "qweight", "awq": "qweight", "compressed-tensors": "weight_packed", "lmms-quant": "qweight"}
#: compressed-tensors formats whose quantized weights are stored as an int8 ``weight`` beside ``weight_scale``.
CT_UNPACKED_INT_FORMATS = ("naive-quantized", "int-quantized")
#: compressed-tensors formats the CPU dequantizer of this package reads.
CT_SUPPORTED_FORMATS = ("pack-quantized", *CT_UNPACKED_INT_FORMATS)

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class AlreadyQuantizedError(ConfigurationError):
    """The checkpoint is already quantized and a second quantization was not asked for explicitly."""


@dataclass
class DetectedQuant:
    """What :func:`detect_quantization` found.

    ``method``: ``gptq``, ``awq``, ``compressed-tensors`` or ``lmms-quant``;
    ``format``: GPTQ's ``checkpoint_format`` (``gptq`` = v1, ``gptq_v2``),
    AWQ's ``version`` (``gemm``...), compressed-tensors' ``format``, or
    ``lmms-quant-packed``.  ``bits``/``group_size``/``sym``: the global setting
    (``None`` where modules differ); ``modules``: per quantized Linear
    ``{bits, group_size, sym}`` (filled by a folder scan); ``components``:
    per component ``{quantized, linears, bits}``; ``bpw``: ``{"model"|component:
    {params, quantized_params, study, storage}}``; ``supported`` / ``reason``:
    whether :func:`~lmms_quant.checkpoints.load.load_prequantized` can
    dequantize it on the CPU.
    """

    method: str
    format: str | None
    bits: int | None
    group_size: int | None
    sym: bool | None
    desc_act: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    unquantized_linears: list[str] = field(default_factory=list)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    bpw: dict[str, dict[str, float | int]] = field(default_factory=dict)
    supported: bool = True
    reason: str = ""

    def describe(self) -> str:
        """One line for messages: method, format, bits, group size and the quantized components."""
        bits = self.bits if self.bits is not None else "/".join(str(b) for b in sorted({m["bits"] for m in self.modules.values()})) or "?"
        gs = {None: "mixed", -1: "per channel", 0: "per tensor"}.get(self.group_size, f"group {self.group_size}")
        comps = ", ".join(c for c, v in self.components.items() if v.get("quantized")) or "components not scanned"
        return f"{self.method} ({self.format}) {bits}-bit, {gs}, {'sym' if self.sym else 'asym' if self.sym is not None else 'mixed sym'}: {comps}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "format": self.format, "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "desc_act": self.desc_act, "config": self.config, "modules": self.modules, "unquantized_linears": self.unquantized_linears,
                "components": self.components, "bpw": self.bpw, "supported": self.supported, "reason": self.reason}


# ---------------------------------------------------------------- configs
def _quant_config_of(obj: Any) -> dict[str, Any] | None:
    """The ``quantization_config`` dict of a config dict / PretrainedConfig, or the dict itself."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        if "quant_method" in obj:
            return obj
        qc = obj.get("quantization_config") or obj.get("compression_config")
        if qc is None and isinstance(obj.get("text_config"), dict):
            qc = obj["text_config"].get("quantization_config")
        return _quant_config_of(qc) if qc is not None else None
    qc = getattr(obj, "quantization_config", None)
    if qc is None and hasattr(obj, "get_text_config"):
        qc = getattr(obj.get_text_config(), "quantization_config", None)
    if qc is None:
        return None
    return qc if isinstance(qc, dict) else qc.to_dict()


def _from_quant_config(qc: dict[str, Any]) -> DetectedQuant:
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    if method == "gptq":
        fmt = qc.get("checkpoint_format", "gptq")
        ok = fmt in ("gptq", "gptq_v2") and int(qc.get("bits", 0)) in (2, 3, 4, 8)
        return DetectedQuant("gptq", fmt, int(qc["bits"]), int(qc.get("group_size", -1)), bool(qc.get("sym", True)),
                             bool(qc.get("desc_act", False)), qc, supported=ok,
                             reason="" if ok else f"GPTQ checkpoint_format {fmt!r} / bits {qc.get('bits')} is not one this reader knows")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        ok = version == "gemm" and bits == 4
        return DetectedQuant("awq", version, bits, int(qc.get("group_size", qc.get("q_group_size", 128))),
                             not bool(qc.get("zero_point", True)), False, qc, supported=ok,
                             reason="" if ok else f"AWQ version {version!r} at {bits} bits: only AutoAWQ's 4-bit GEMM packing is read")
    if method == "compressed-tensors":
        fmt = qc.get("format")
        groups = qc.get("config_groups") or {}
        bits, gs, sym = _common([_ct_spec(s) for s in groups.values() if isinstance(s, dict) and s.get("weights")])
        fmts = {s.get("format") or fmt for s in groups.values() if isinstance(s, dict)}
        bad = sorted(f for f in fmts if f not in CT_SUPPORTED_FORMATS and not (f == "mixed-precision"))
        floats = [n for n, s in groups.items() if isinstance(s, dict) and (s.get("weights") or {}).get("type", "int") != "int"]
        acts = [n for n, s in groups.items() if isinstance(s, dict) and s.get("input_activations")]
        ok = not bad and not floats and not acts
        reason = "" if ok else (f"compressed-tensors format(s) {bad} " if bad else "") + (f"float weights in {floats} " if floats else "") + \
            (f"activation quantization in {acts}" if acts else "") + "; load it with transformers' compressed-tensors integration instead"
        return DetectedQuant("compressed-tensors", fmt, bits, gs, sym, False, qc, supported=ok, reason=reason.strip())
    return DetectedQuant(method or "unknown", None, qc.get("bits"), qc.get("group_size"), qc.get("sym"), False, qc, supported=False,
                         reason=f"quant_method {method!r} is not one of gptq, awq, compressed-tensors")


def _common(specs: list[dict[str, Any]]) -> tuple[Any, Any, Any]:
    """``(bits, group_size, sym)`` shared by all ``specs``, each ``None`` where they differ."""
    out = []
    for key in ("bits", "group_size", "sym"):
        values = {s[key] for s in specs}
        out.append(values.pop() if len(values) == 1 else None)
    return tuple(out)


def _ct_spec(scheme: dict[str, Any]) -> dict[str, Any]:
    w = scheme.get("weights") or {}
    strategy = w.get("strategy") or ("group" if (w.get("group_size") or 0) > 0 else "channel" if w.get("group_size") == -1 else "tensor")
    gs = {"channel": -1, "tensor": 0}.get(strategy, w.get("group_size"))
    return {"bits": int(w.get("num_bits", 8)), "group_size": gs, "sym": bool(w.get("symmetric", True)), "strategy": strategy,
            "actorder": w.get("actorder"), "type": w.get("type", "int")}


def _ct_match(name: str, module_classes: tuple[str, ...], target: str) -> bool:
    """compressed-tensors' matching: an exact module name, ``re:`` + a regex (``re.match``), or a class name in the MRO."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target in module_classes or (target == "Linear" and "LinearBase" in module_classes)


def layer_spec(det: DetectedQuant, name: str, module_classes: tuple[str, ...] = ("Linear",)) -> dict[str, Any] | None:
    """The ``{bits, group_size, sym}`` the checkpoint's config gives module ``name``, or ``None`` when it leaves it unquantized."""
    qc = det.config
    if det.method == "gptq":
        spec = {"bits": int(qc["bits"]), "group_size": int(qc.get("group_size", -1)), "sym": bool(qc.get("sym", True)),
                "desc_act": bool(qc.get("desc_act", False))}
        for pattern, override in (qc.get("dynamic") or {}).items():  # GPTQModel: first matching rule wins
            if pattern.startswith("-:"):
                if re.match(pattern[2:], name):
                    return None
                continue
            if re.match(pattern.removeprefix("+:"), name):
                return {**spec, **{k: override[k] for k in ("bits", "group_size", "sym", "desc_act") if k in override}}
        return spec
    if det.method == "awq":
        skip = qc.get("modules_to_not_convert") or []
        if any(s and s in name for s in skip):
            return None
        return {"bits": int(qc.get("bits", qc.get("w_bit", 4))), "group_size": int(qc.get("group_size", qc.get("q_group_size", 128))),
                "sym": not bool(qc.get("zero_point", True))}
    if det.method == "compressed-tensors":
        ignore = qc.get("ignore") or []
        if any(_ct_match(name, module_classes, t) for t in ignore):
            return None
        for scheme in (qc.get("config_groups") or {}).values():
            if isinstance(scheme, dict) and scheme.get("weights") and any(_ct_match(name, module_classes, t) for t in scheme.get("targets", [])):
                spec = _ct_spec(scheme)
                spec["format"] = scheme.get("format") or qc.get("format")
                return spec
        return None
    if det.method == "lmms-quant":
        return det.modules.get(name)
    return None


# ---------------------------------------------------------------- detection
def detect_quantization(path_or_config: Any, *, scan: bool = True, trust_remote_code: bool = False) -> DetectedQuant | None:
    """Describe the quantization of a checkpoint, or return ``None`` when it is not quantized.

    ``path_or_config``: a checkpoint folder, its ``config.json``, a config dict,
    a ``quantization_config`` dict or a transformers ``PretrainedConfig``.  With
    a folder and ``scan`` (default), the safetensors headers are scanned and a
    meta-device skeleton of the model is built from its config, to fill
    ``modules``, ``components`` and ``bpw``.
    """
    from .save import INFO_FILE

    folder = None
    if isinstance(path_or_config, (str, Path)):
        p = Path(path_or_config)
        if p.is_file() and p.name == "config.json":
            folder, cfg = p.parent, json.loads(p.read_text())
        elif p.is_dir():
            folder = p
            if (p / INFO_FILE).is_file():
                return _detect_ours(p, scan, trust_remote_code)
            if not (p / "config.json").is_file():
                raise CheckpointError(f"{p}: no config.json")
            cfg = json.loads((p / "config.json").read_text())
        else:
            raise CheckpointError(f"{p}: not a checkpoint folder or config.json")
    else:
        cfg = path_or_config
    qc = _quant_config_of(cfg)
    if qc is None:
        return None
    det = _from_quant_config(qc)
    if folder is not None and scan:
        _scan(det, folder, trust_remote_code)
    return det


def _detect_ours(folder: Path, scan: bool, trust_remote_code: bool) -> DetectedQuant:
    from .save import INFO_FILE

    info = json.loads((folder / INFO_FILE).read_text())
    layers = {n: {k: v[k] for k in ("bits", "group_size", "sym")} for n, v in info.get("layers", {}).items()}
    bits, gs, sym = _common(list(layers.values()))
    det = DetectedQuant("lmms-quant", info.get("format"), bits, gs, sym, False, {"recipe": info.get("report", {}).get("recipe")},
                        modules=layers)
    if scan:
        _scan(det, folder, trust_remote_code)
    return det


def _scan(det: DetectedQuant, folder: Path, trust_remote_code: bool) -> None:
    """Fill modules, components and bpw from the safetensors headers and a meta skeleton."""
    from torch import nn

    from ..plan import resolve_components
    from ._hf import build_skeleton, iter_safetensors_headers, legacy_renamer, read_config, safetensors_files

    files = safetensors_files(folder)
    headers = list(iter_safetensors_headers(files))
    config = read_config(folder, trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    skeleton = build_skeleton(config, trust_remote_code)
    rename = legacy_renamer(skeleton)
    modules = dict(skeleton.named_modules())
    marker = QUANT_MARKERS.get(det.method, "qweight")
    quantized: dict[str, dict[str, Any]] = {}
    stored_bytes: dict[str, int] = {}
    for key, _, dtype, shape in headers:
        mod, _, leaf = key.rpartition(".")
        mod_new = rename(mod + ".weight")[: -len(".weight")] if mod else mod
        numel = 1
        for d in shape:
            numel *= d
        stored_bytes[f"{mod_new}.{leaf}" if mod else leaf] = numel * _DTYPE_BYTES.get(dtype, 4)
        is_q = leaf == marker or (det.method == "compressed-tensors" and leaf == "weight_scale")
        if is_q and mod_new in modules:
            classes = tuple(c.__name__ for c in type(modules[mod_new]).__mro__)
            spec = layer_spec(det, mod_new, classes) if det.method != "lmms-quant" else det.modules.get(mod_new)
            if spec is None:
                raise CheckpointError(f"{folder}: {key} holds quantized weights but the quantization_config leaves {mod_new} unquantized")
            quantized[mod_new] = {k: spec[k] for k in ("bits", "group_size", "sym")}
    det.modules = dict(sorted(quantized.items()))
    _, _, comps = resolve_components(skeleton)
    roots = [(c, r) for c, cb in comps.items() for r in cb.roots]
    block_linears = {f"{b}.{n}" if n else b: c for c, cb in comps.items() for b in cb.blocks
                     for n, m in modules[b].named_modules() if isinstance(m, nn.Linear)}
    det.unquantized_linears = sorted(n for n in block_linears if n not in quantized)

    def owner(name: str) -> str:
        best, best_len = "other", -1
        for comp, root in roots:
            if (name == root or name.startswith(root + ".")) and len(root) > best_len:
                best, best_len = comp, len(root)
        return best

    acc: dict[str, dict[str, float]] = {}
    seen: set[int] = set()
    for pname, p in skeleton.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        mod = pname.rpartition(".")[0]
        bits = quantized[mod]["bits"] if pname.endswith(".weight") and mod in quantized else 16
        for group in (owner(pname), "model"):
            a = acc.setdefault(group, {"params": 0, "quantized_params": 0, "study_bits": 0.0, "storage_bits": 0.0})
            a["params"] += p.numel()
            a["study_bits"] += bits * p.numel()
            a["quantized_params"] += p.numel() if bits < 16 else 0
    for key, nbytes in stored_bytes.items():
        for group in (owner(key), "model"):
            acc.setdefault(group, {"params": 0, "quantized_params": 0, "study_bits": 0.0, "storage_bits": 0.0})["storage_bits"] += 8 * nbytes
    det.bpw = {g: {"params": int(a["params"]), "quantized_params": int(a["quantized_params"]),
                   "study": a["study_bits"] / a["params"] if a["params"] else 0.0,
                   "storage": a["storage_bits"] / a["params"] if a["params"] else 0.0} for g, a in acc.items() if a["params"]}
    det.components = {}
    for comp in comps:
        names = [n for n, c in block_linears.items() if c == comp]
        q = [n for n in quantized if owner(n) == comp]
        det.components[comp] = {"quantized": len(q), "block_linears": len(names),
                                "bits": sorted({quantized[n]["bits"] for n in q})}
    extra = [n for n in quantized if owner(n) not in comps]
    if extra:
        det.components["other"] = {"quantized": len(extra), "block_linears": 0, "bits": sorted({quantized[n]["bits"] for n in extra})}
    if quantized:
        det.bits, det.group_size, det.sym = _common(list(quantized.values()))


def ensure_not_quantized(pretrained: Any, *, requantize: bool = False, detected: DetectedQuant | None = None,
                         name: str | None = None) -> DetectedQuant | None:
    """Raise :class:`AlreadyQuantizedError` when ``pretrained`` is already quantized, unless
    ``requantize`` is true (then the detection is returned and quantizing goes ahead).

    ``pretrained``: anything :func:`detect_quantization` takes (a folder, a config
    dict, a transformers config -- use the config for hub ids); pass ``detected``
    to reuse an earlier detection and ``name`` for the message.  Returns ``None``
    for an unquantized checkpoint.
    """
    det = detected if detected is not None else detect_quantization(pretrained, scan=False)
    if det is None or requantize:
        return det
    label = name or (str(pretrained) if isinstance(pretrained, (str, Path)) else "this checkpoint")
    raise AlreadyQuantizedError(
        f"{label} is already quantized ({det.describe()}); quantizing it again would stack a second rounding on the first. "
        "Evaluate it as it is (leave every bits_* key at 16), or pass requantize=true to quantize the dequantized weights anyway."
    )
