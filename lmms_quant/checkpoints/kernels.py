"""Real low-bit execution: run packed integer weights through int4/int8 matmul kernels.

The simulated model computes ``x @ (scale * (q - zero))^T`` with a float
weight.  :func:`to_lowbit_` swaps each quantized Linear for a
:class:`LowBitLinear` that keeps the integers packed and calls a weight-only
kernel on the same codes, scales and zero points -- nothing is re-quantized,
so the only difference from the simulated model is the kernel's arithmetic
(fake-versus-real parity, :func:`parity`).

Kernels (PyTorch ATen ops; torchao 0.18's CPU int4 weight-only tensor,
``Int4OpaqueTensor``, calls the same ``_weight_int4pack_mm_for_cpu``):

* ``int4``: tinygemm, ``w = (q - 8) * s + m`` per group of 32/64/128/256
  input columns, with ``m = s * (8 - zero)``.  Any grid of at most 4 bits
  (2- and 3-bit codes are valid int4 codes, stored at 4 bits).  Per-channel
  and per-tensor grids are expanded to groups (exact).  GPTQ act-order
  (``g_idx``) runs by permuting the input columns once per call.  CPU:
  ``_convert_weight_to_int4pack_for_cpu`` / ``_weight_int4pack_mm_for_cpu``
  (fp32, bf16, fp16 activations).  CUDA: ``_convert_weight_to_int4pack`` /
  ``_weight_int4pack_mm`` (bf16 activations, ``in % 128 == 0``,
  ``out % 8 == 0``) -- written to the same contract, **untested** here.
* ``int8``: ``_weight_int8pack_mm`` (int8 weight, one scale per output row),
  any per-channel or per-tensor grid of at most 8 bits: ``q - 2**(b-1)`` fits
  int8 and an asymmetric zero point becomes the rank-one correction
  ``sum(x) * s * (2**(b-1) - zero)``.  CPU tested; CUDA untested.

Grouped grids of 5-8 bits have no kernel here and stay simulated
(:func:`to_lowbit_` says which layers, and why).

Speed: on the CPU both kernels are fast with bf16 activations and a slow
reference path with float32 activations (measured 10-60x slower than a dense
fp32 matmul on AVX-512, one thread).  ``act_dtype`` defaults to the weight's
dtype (exact parity); pass ``act_dtype=torch.bfloat16`` for speed (parity
then within the bf16 tolerance).  On an H100 (torch 2.11) the int4 kernel ran
a 4096x11008 layer 1.6x faster than the bf16 matmul for one token and slower
for 16; the CUDA int8 kernel was 7-50x slower than bf16 (memory only).

With ``backend="torchao"``, int4 layers are instead installed as torchao
``Int4OpaqueTensor`` weights (CPU) built from our codes, keeping the Linear
module and its hooks; it needs ``torchao`` (the ``export`` extra).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .qlayer import QuantizedLinearData, expand_groups

__all__ = ["LowBitLinear", "choose_kernel", "to_lowbit_", "layers_from_report", "parity", "module_bytes", "time_forward", "TINYGEMM_GROUPS"]

#: Group sizes the tinygemm int4 kernels accept.
TINYGEMM_GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True)
class KernelChoice:
    kernel: str | None  # "int4", "int8" or None (stays simulated)
    group_size: int = 0  # the group size the int4 kernel runs with
    reason: str = ""


def choose_kernel(q: QuantizedLinearData, device_type: str = "cpu") -> KernelChoice:
    """Which kernel can run ``q`` exactly on ``device_type``, or why none can."""
    out, n_in = q.shape
    if q.bits <= 4:
        if q.group_size > 0:
            g = q.group_size
        else:  # per channel / per tensor: any tinygemm group size dividing the row works (the scale repeats)
            g = next((c for c in reversed(TINYGEMM_GROUPS) if n_in % c == 0), 0)
        ok = g in TINYGEMM_GROUPS and n_in % g == 0
        if ok and device_type == "cuda" and (n_in % 128 or out % 8):
            ok = False
        if ok:
            return KernelChoice("int4", g)
    if q.group_size in (0, -1) and q.g_idx is None:
        return KernelChoice("int8")
    return KernelChoice(None, 0, f"{q.bits}-bit, group_size {q.group_size}, shape {list(q.shape)}: no int4 kernel "
                                 f"(needs <= 4 bits and groups of {TINYGEMM_GROUPS}) and no int8 kernel (needs per-channel or per-tensor)")


class LowBitLinear(nn.Module):
    """A Linear whose weight stays packed and runs through an int4 or int8 kernel.

    Built from a :class:`QuantizedLinearData`; ``bias`` and AWQ's ``input_scale``
    (the input is divided by it, as the simulated model's hook does) are kept.
    ``act_dtype`` is the activation dtype the packed scales are prepared for.
    """

    def __init__(self, q: QuantizedLinearData, bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                 *, device: torch.device | str = "cpu", act_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        device = torch.device(device)
        choice = choose_kernel(q, device.type)
        if choice.kernel is None:
            raise ValueError(choice.reason)
        self.kernel, self.group_size = choice.kernel, choice.group_size
        self.out_features, self.in_features = q.shape
        self.bits = q.bits
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, act_dtype))
        from ..calibration import INPUT_SCALE_BUFFER

        self._input_scale_name = INPUT_SCALE_BUFFER
        self.register_buffer(INPUT_SCALE_BUFFER, None if input_scale is None else input_scale.detach().to(device, torch.float32))
        perm = None
        codes, g_idx = q.codes, q.g_idx
        if device.type == "cuda":  # prepare the codes on the GPU (a 7B model's codes are too slow to shuffle on the CPU)
            codes = codes.to(device)
            g_idx = None if g_idx is None else g_idx.to(device)
        if g_idx is not None:  # act-order: sort columns by group so that every group is contiguous
            perm = torch.argsort(g_idx, stable=True)
            codes, g_idx = codes[:, perm], g_idx[perm]
        self.register_buffer("perm", None if perm is None else perm.to(device))
        if self.kernel == "int4":
            self._init_int4(q, codes, g_idx, device, act_dtype)
        else:
            self._init_int8(q, device, act_dtype)

    def _init_int4(self, q, codes, g_idx, device, act_dtype) -> None:
        out, n_in = q.shape
        g = self.group_size
        n_groups = n_in // g
        if q.group_size > 0:
            scale, zero = q.scale.float(), q.zero.float()
            if g_idx is not None:  # after sorting, group j covers columns [j g, (j + 1) g)
                if not torch.equal(g_idx, torch.arange(n_in, device=g_idx.device) // g):
                    raise ValueError("act-order groups are not all of group_size columns")
        else:  # repeat the per-row / per-tensor parameters for each kernel group
            scale = expand_groups(q.scale.float(), (out, n_in), q.group_size, None)[:, ::g].contiguous()
            zero = expand_groups(q.zero.float(), (out, n_in), q.group_size, None)[:, ::g].contiguous()
        # Centre narrower codes on tinygemm's midpoint 8 (w = s (q + o - (z + o)) is the same weight): the float
        # zero m = s (8 - z - o) then stays small, and rounding it to bf16 costs little.
        offset = 8 - 2 ** (q.bits - 1)
        codes = codes.to(torch.int32) + offset
        m = scale * (8.0 - (zero + offset))
        sz = torch.stack([scale, m], dim=-1).transpose(0, 1).contiguous()  # (n_groups, out, 2)
        assert sz.shape == (n_groups, out, 2)
        if device.type == "cuda":
            act_dtype = torch.bfloat16  # the CUDA tinygemm kernel takes bf16 only
            c = codes.to(torch.int32)
            u8 = (c[:, ::2] << 4 | c[:, 1::2]).to(torch.uint8).to(device)
            packed = torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), 8)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.act_dtype = act_dtype
        self.register_buffer("qweight", packed.to(device))
        self.register_buffer("scales_and_zeros", sz.to(device, act_dtype))

    def _init_int8(self, q, device, act_dtype) -> None:
        out, n_in = q.shape
        half = 2 ** (q.bits - 1)
        scale = expand_groups(q.scale.float(), (out, n_in), q.group_size, None)[:, 0].contiguous()
        zero = expand_groups(q.zero.float(), (out, n_in), q.group_size, None)[:, 0].contiguous()
        self.act_dtype = act_dtype
        self.register_buffer("qweight", (q.codes.to(device, torch.int16) - half).to(torch.int8).contiguous())
        self.register_buffer("scales", scale.to(device, act_dtype))
        corr = scale * (half - zero)
        self.register_buffer("zero_correction", None if not bool(corr.any()) else corr.to(device, act_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        scale_in = getattr(self, self._input_scale_name)
        if scale_in is not None:
            x = x / scale_in.to(x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(self.act_dtype)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.kernel == "int4":
            if self.qweight.is_cuda:
                y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), self.qweight, self.group_size, self.scales_and_zeros)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.qweight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales)
            if self.zero_correction is not None:
                y = y + x2.sum(dim=1, keepdim=True) * self.zero_correction
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(in_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, kernel={self.kernel}, group_size={self.group_size}"


def layers_from_report(model: nn.Module, report) -> dict[str, QuantizedLinearData]:
    """The integer layers of a simulated model, from its ``QuantReport`` (codes recovered exactly).

    Each layer is decoded on its weight's device (a GPU model's codes stay on the GPU).
    """
    modules = dict(model.named_modules())
    return {
        name: QuantizedLinearData.from_weight(modules[name].weight, qp, name, device=modules[name].weight.device)
        for name, qp in report.qparams.items()
    }


def _torchao_int4(lin: nn.Linear, q: QuantizedLinearData, choice: KernelChoice, act_dtype: torch.dtype) -> bool:
    """Install torchao's Int4OpaqueTensor (CPU) built from our codes as ``lin.weight``; False if not applicable."""
    if choice.kernel != "int4" or q.g_idx is not None or lin.weight.device.type != "cpu":
        return False
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

    ref = LowBitLinear(q, device="cpu", act_dtype=act_dtype)
    t = Int4OpaqueTensor(qdata=ref.qweight, scale_and_zero=ref.scales_and_zeros, block_size=[1, choice.group_size],
                         shape=torch.Size(q.shape))
    lin.weight = nn.Parameter(t, requires_grad=False)
    return True


def to_lowbit_(model: nn.Module, layers: dict[str, QuantizedLinearData], *, backend: str = "aten",
               act_dtype: torch.dtype | None = None) -> dict[str, str]:
    """Replace each quantized Linear named in ``layers`` by its real low-bit version, in place.

    Returns ``{name: "int4" | "int8" | "simulated: <reason>"}``.  ``backend``:
    ``"aten"`` (:class:`LowBitLinear`) or ``"torchao"`` (int4 layers as torchao
    tensors on the CPU, the rest as with ``"aten"``).  ``act_dtype`` defaults to
    each Linear's weight dtype.
    """
    if backend not in ("aten", "torchao"):
        raise ValueError(f"backend must be 'aten' or 'torchao', got {backend!r}")
    from ..calibration import INPUT_SCALE_BUFFER

    modules = dict(model.named_modules())
    done: dict[str, str] = {}
    for name, q in layers.items():
        lin = modules[name]
        device = lin.weight.device
        adt = act_dtype or lin.weight.dtype
        choice = choose_kernel(q, device.type)
        if choice.kernel is None:
            done[name] = f"simulated: {choice.reason}"
            continue
        if backend == "torchao" and _torchao_int4(lin, q, choice, adt):
            done[name] = "int4 (torchao)"
            continue
        new = LowBitLinear(q, lin.bias, getattr(lin, INPUT_SCALE_BUFFER, None), device=device, act_dtype=adt)
        parent_name, _, leaf = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, leaf, new)
        done[name] = choice.kernel
    return done


def module_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``model`` (tied tensors once; tensor subclasses by their inner data)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        inner = [getattr(t, n) for n in getattr(t, "tensor_data_names", [])] if hasattr(t, "tensor_data_names") else [t]
        for x in inner:
            if x is None or id(x) in seen:
                continue
            seen.add(id(x))
            total += x.numel() * x.element_size()
    return total


def parity(simulated: Callable[[], torch.Tensor], real: Callable[[], torch.Tensor]) -> dict[str, float]:
    """Max absolute and relative (to the simulated output's max magnitude) difference of two forwards."""
    with torch.no_grad():
        a, b = simulated().float(), real().float()
    diff = (a - b).abs().max().item()
    return {"max_abs": diff, "max_rel": diff / max(a.abs().max().item(), 1e-30)}


def time_forward(fn: Callable[[], Any], repeat: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs (after one warm-up)."""
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
