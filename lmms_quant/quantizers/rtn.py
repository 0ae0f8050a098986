"""Round-to-nearest (RTN): the one rounding primitive of lmms-quant.

Every method (the study's ``uniform``, plain ``rtn``, GPTQ's inner loop and
AWQ's scale and clip searches) rounds through :func:`fake_quantize` /
:func:`quantize_codes`, so a difference in accuracy between methods comes from
the algorithm, never from a second quantizer.

Conventions (those of the reference GPTQ code, IST-DASLab/gptq ``quant.py``):

* integer codes ``q`` lie in ``[0, maxq]`` with ``maxq = 2**bits - 1``;
* dequantised value ``w_hat = scale * (q - zero)``;
* asymmetric: ``scale = (max - min) / maxq``, ``zero = round(-min / scale)``,
  with the range widened to include 0;
* symmetric: ``scale = 2 * max|w| / maxq``, ``zero = (maxq + 1) / 2``.

Granularity is given by ``group_size``: ``-1`` one group per output row
(per channel), ``0`` the whole tensor (per tensor), ``g > 0`` contiguous groups
of ``g`` input columns inside each row.  ``g`` must divide the row length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "QuantizedTensor",
    "compute_qparams",
    "quantize_codes",
    "dequantize_codes",
    "fake_quantize",
    "rtn_quantize",
]


@dataclass
class QuantizedTensor:
    """Result of quantizing one 2-D weight.

    ``weight`` is the dequantised tensor (same shape and dtype as the input);
    ``scale`` and ``zero`` have shape ``(rows, n_groups)`` (per tensor:
    ``(1, 1)``), ``codes`` the integer codes as ``uint8`` in ``weight``'s shape.
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    sym: bool


def compute_qparams(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point for each row of ``x`` (shape ``(rows, n)``).

    Returns ``scale`` and ``zero`` of shape ``(rows, 1)`` in float32.  A row that is
    all zeros gets the range [-1, 1] so that its scale is never 0.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    maxq = 2**bits - 1
    x = x.float()
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    # Divide by a tensor, not a Python number: on CUDA PyTorch turns division by
    # a CPU scalar into multiplication by its reciprocal (one bit less exact),
    # so scales, and with them symmetric grids' exact ties, would differ
    # between CPU, CUDA and the GPTQ kernel (which divides exactly).
    scale = (xmax - xmin) / torch.full_like(xmax, maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero, 0, maxq)`` (float tensor)."""
    maxq = 2**bits - 1
    return (x.float() / scale).round_().add_(zero).clamp_(0, maxq)  # in place after the division: one allocation


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero)`` in float32."""
    return (q - zero).mul_(scale)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View a 2-D ``(rows, cols)`` weight as ``(n_groups_total, group_len)``."""
    rows, cols = w.shape
    if group_size == 0:
        return w.reshape(1, rows * cols)
    if group_size == -1 or group_size == cols:
        return w.reshape(rows, cols)
    if group_size < 0:
        raise ValueError(f"group_size must be -1 (per channel), 0 (per tensor) or a positive divisor, got {group_size}")
    if cols % group_size:
        raise ValueError(f"group_size {group_size} does not divide the row length {cols}")
    return w.reshape(rows * (cols // group_size), group_size)


def n_groups(shape: tuple[int, ...], group_size: int) -> int:
    """Number of (scale, zero) pairs a weight of ``shape`` needs."""
    rows = shape[0]
    cols = int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1
    if group_size == 0:
        return 1
    if group_size == -1 or group_size == cols:
        return rows
    return rows * (cols // group_size)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int = -1, sym: bool = True) -> QuantizedTensor:
    """Round-to-nearest quantization of a weight with min-max ranges.

    ``w`` has shape ``(out, in)`` (any trailing dims are flattened into ``in``,
    so convolution kernels work too).  The dequantised result has ``w``'s shape
    and dtype.

    Example: ``w = [[-1, 0, 0.5, 1]]`` at 2 bits, asymmetric, per channel:
    ``scale = 2/3``, ``zero = 2``, codes ``[0, 2, 3, 3]`` and
    ``w_hat = [[-4/3, 0, 2/3, 2/3]]`` (the levels are -4/3, -2/3, 0, 2/3).
    """
    shape, dtype = w.shape, w.dtype
    w2 = w.reshape(shape[0], -1) if w.dim() != 2 else w
    g = _grouped(w2.float(), group_size)
    scale, zero = compute_qparams(g, bits, sym)
    q = quantize_codes(g, scale, zero, bits)
    deq = dequantize_codes(q, scale, zero)
    rows = 1 if group_size == 0 else shape[0]
    return QuantizedTensor(
        weight=deq.reshape(shape).to(dtype),
        codes=q.to(torch.uint8).reshape(shape),
        scale=scale.reshape(rows, -1),
        zero=zero.reshape(rows, -1),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )


def fake_quantize(w: torch.Tensor, bits: int, group_size: int = -1, sym: bool = True) -> torch.Tensor:
    """Quantize-dequantize ``w``; shorthand for ``rtn_quantize(...).weight``."""
    return rtn_quantize(w, bits, group_size, sym).weight
