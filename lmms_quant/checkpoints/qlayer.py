"""One quantized Linear as integers: codes, scale, zero point, group map.

:class:`QuantizedLinearData` is what every writer in this package packs and
every reader rebuilds.  It follows the rounding convention of
:mod:`lmms_quant.quantizers.rtn`: codes ``q`` in ``[0, 2**bits - 1]``,
``w_hat = scale * (q - zero)`` computed in float32, symmetric grids have
``zero = 2**(bits - 1)``.

:meth:`QuantizedLinearData.from_weight` recovers the codes of a simulated
(quantize-dequantize) weight from its scale and zero point and checks, bit for
bit, that the same float32 arithmetic the quantizers used gives the weight
back.  That check is what makes a reloaded checkpoint's weights (and so
:func:`lmms_quant.apply.weights_hash`) identical to the in-memory model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckError

__all__ = ["QuantizedLinearData", "CheckpointError", "CheckpointShapeError", "expand_groups"]


class CheckpointError(CheckError):
    """A checkpoint cannot be written or read as asked (the message says why)."""


class CheckpointShapeError(CheckpointError):
    """A tensor in a checkpoint does not have the shape its config implies."""

    def __init__(self, tensor: str, found: tuple[int, ...], expected: tuple[int, ...], why: str = "") -> None:
        self.tensor, self.found, self.expected = tensor, tuple(found), tuple(expected)
        super().__init__(
            f"checkpoint tensor {tensor!r} has shape {list(self.found)} but the model config expects {list(self.expected)}"
            + (f" ({why})" if why else "") + "; refusing to load a checkpoint that does not match its config"
        )


def expand_groups(t: torch.Tensor, shape: tuple[int, int], group_size: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Broadcast a per-group tensor ``t`` (``(rows, n_groups)``) to the weight's ``(out, in)`` shape."""
    out, n_in = shape
    if group_size == 0:
        return t.reshape(1, 1).expand(out, n_in)
    if g_idx is not None:
        return t[:, g_idx.long()]
    n_groups = t.shape[1]
    return t.repeat_interleave(n_in // n_groups, dim=1)


@dataclass
class QuantizedLinearData:
    """Integer form of one quantized Linear weight of shape ``(out, in)``.

    ``codes``: ``uint8`` ``(out, in)``; ``scale`` / ``zero``: float32
    ``(out, n_groups)`` (per tensor ``(1, 1)``); ``g_idx``: ``(in,)`` group of
    each input column, or ``None`` for contiguous groups.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    g_idx: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "shape": list(self.shape),
                "dtype": str(self.dtype).replace("torch.", ""), "g_idx": self.g_idx is not None}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * (codes - zero)`` in float32, cast to ``dtype`` (default: the original weight's)."""
        s = expand_groups(self.scale.float(), self.shape, self.group_size, self.g_idx)
        z = expand_groups(self.zero.float(), self.shape, self.group_size, self.g_idx)
        return (s * (self.codes.float() - z)).to(dtype or self.dtype)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, qparams: dict[str, Any], name: str = "weight", device: torch.device | str = "cpu"
    ) -> QuantizedLinearData:
        """Recover the codes of a simulated weight from ``qparams`` (``QuantReport.qparams[name]``).

        The work is done on ``device`` and the result's tensors live there (pass the
        weight's own device to keep a GPU model's codes on the GPU: a 7B model's
        weights take minutes to decode on one CPU thread).

        Raises :class:`CheckpointError` unless ``scale * (codes - zero)`` cast to
        the weight's dtype reproduces every element bit for bit.
        """
        w = weight.detach().to(device)
        if w.dim() != 2:
            raise CheckpointError(f"{name}: expected a 2-D Linear weight, got shape {list(w.shape)}")
        bits, gs, sym = int(qparams["bits"]), int(qparams["group_size"]), bool(qparams["sym"])
        scale = qparams["scale"].detach().to(device).float()
        zero = qparams["zero"].detach().to(device).float()
        g_idx = qparams.get("g_idx")
        g_idx = None if g_idx is None else g_idx.detach().to(device).long()
        out, n_in = w.shape
        if gs == -1 or gs == n_in:
            want = (out, 1)
        elif gs == 0:
            want = (1, 1)
        else:
            want = (out, n_in // gs)
        if tuple(scale.shape) != want or tuple(zero.shape) != want:
            raise CheckpointError(f"{name}: scale/zero have shapes {list(scale.shape)}/{list(zero.shape)}, expected {list(want)} "
                                  f"for a {list(w.shape)} weight with group_size {gs}")
        if gs == n_in:
            gs = -1
        maxq = 2**bits - 1
        s = expand_groups(scale, (out, n_in), gs, g_idx)
        z = expand_groups(zero, (out, n_in), gs, g_idx)
        codes = torch.clamp(torch.round(w.float() / s) + z, 0, maxq)
        # A weight stored in bf16/fp16 may round to a neighbouring code: pick the code whose
        # dequantised value, cast like the quantizer cast it, is exactly the stored weight.
        for _ in range(2):
            bad = (s * (codes - z)).to(w.dtype) != w
            if not bool(bad.any()):
                break
            for step in (-1.0, 1.0):
                cand = torch.clamp(codes + step, 0, maxq)
                fix = bad & ((s * (cand - z)).to(w.dtype) == w)
                codes = torch.where(fix, cand, codes)
                bad = bad & ~fix
        bad = (s * (codes - z)).to(w.dtype) != w
        if bool(bad.any()):
            diff = ((s * (codes - z)).to(w.dtype).float() - w.float()).abs().max().item()
            raise CheckpointError(
                f"{name}: {int(bad.sum())} of {w.numel()} weights are not on the {bits}-bit grid of the reported scale and zero point "
                f"(max |difference| {diff:.3g}); the model was changed after quantization or the qparams belong to another model"
            )
        return cls(codes=codes.to(torch.uint8), scale=scale, zero=zero, bits=bits, group_size=gs, sym=sym, g_idx=g_idx, dtype=w.dtype)
