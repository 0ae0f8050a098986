"""Bits per weight, by the study's convention and by exact storage cost.

* ``study`` (arXiv 2601.15287): ``(sum of bits x numel over the Linear weights
  inside transformer blocks + 16 x numel of every other parameter) / all
  parameters``.  Scales and zero points are not counted; biases count at 16.
* ``storage``: what the quantized model really costs to store: each quantized
  weight at its bit width plus one fp16 scale per group and, when asymmetric,
  one zero point per group at the weight's bit width; a quantized bias at its
  bit width plus one fp16 scale and one zero point; every other parameter at
  its dtype's width (so an fp32 model costs 32 bits per untouched weight).

Both work from a :class:`~lmms_quant.plan.QuantPlan` alone, so they can be
computed for a meta-device model that was never downloaded.
"""

from __future__ import annotations

from .plan import QuantPlan
from .quantizers.rtn import n_groups

__all__ = ["SCALE_BITS", "bits_per_weight"]

#: Stored precision of every scale (fp16).
SCALE_BITS = 16


def _weight_storage_bits(shape: tuple[int, ...], bits: int, group_size: int, sym: bool) -> int:
    numel = 1
    for d in shape:
        numel *= d
    groups = n_groups(shape, group_size)
    return numel * bits + groups * SCALE_BITS + (0 if sym else groups * bits)


def bits_per_weight(plan: QuantPlan) -> dict[str, dict[str, float | int]]:
    """Per component (and ``"model"``): ``params``, ``study``, ``storage`` (bits
    per weight) and ``quantized_params`` (weights below 16 bits).

    Components with no parameters are omitted.
    """
    targets = {f"{t.name}.weight": t for t in plan.targets}
    biases = {f"{t.name}.bias": t for t in plan.targets if t.has_bias}
    acc: dict[str, dict[str, float]] = {}

    def add(group: str, numel: int, study: float, storage: float, quantized: int) -> None:
        a = acc.setdefault(group, {"params": 0, "study_bits": 0.0, "storage_bits": 0.0, "quantized_params": 0})
        a["params"] += numel
        a["study_bits"] += study
        a["storage_bits"] += storage
        a["quantized_params"] += quantized

    for pname, numel in plan.param_numel.items():
        comp = plan.param_owner[pname]
        dtype_bits = plan.param_bits[pname]
        if pname in targets and targets[pname].spec.active:
            spec = targets[pname].spec
            study = numel * spec.bits
            storage = _weight_storage_bits(targets[pname].shape, spec.bits, spec.group_size, spec.sym)
            quantized = numel
        elif pname in biases and biases[pname].spec.active and biases[pname].spec.quantize_bias:
            spec = biases[pname].spec
            study = numel * 16
            storage = numel * spec.bits + SCALE_BITS + spec.bits
            quantized = 0
        else:
            study, storage, quantized = numel * 16, numel * dtype_bits, 0
        for group in (comp, "model"):
            add(group, numel, study, storage, quantized)

    out: dict[str, dict[str, float | int]] = {}
    for group, a in acc.items():
        if a["params"] == 0:
            continue
        out[group] = {
            "params": int(a["params"]),
            "quantized_params": int(a["quantized_params"]),
            "study": a["study_bits"] / a["params"],
            "storage": a["storage_bits"] / a["params"],
        }
    return out
