"""Bit-packing of integer codes into ``int32`` words, for any width from 2 to 8 bits.

One layout serves every format this package reads or writes: **dense,
LSB-first**.  Along the packed dimension, element ``i`` occupies the global
bits ``[i * bits, (i + 1) * bits)`` of the word stream, word ``k`` holding
the global bits ``[32 k, 32 k + 32)`` with bit 0 the least significant.  An
element may straddle two words (3, 5, 6, 7 bits).  ``n`` elements take
``ceil(n * bits / 32)`` words.

This is, bit for bit:

* compressed-tensors 0.19 ``pack_to_int32`` (``pack-quantized``) after its
  signed-to-unsigned offset ``+2**(bits-1)``
  (``compressed_tensors/compressors/pack_quantized/helpers.py``);
* AutoGPTQ's ``QuantLinear.pack`` (``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py``):
  for 2/4/8 bits ``32 // bits`` values per word, lowest bits first; for 3
  bits its hand-written loop that puts 10 values in a word and splits the
  11th and 22nd across word boundaries -- the same dense stream;
* AutoAWQ's GEMM packing (``awq/modules/linear/gemm.py``) once the output
  columns are put in its interleaved order, see :func:`awq_order`.

Pure functions of tensors; no model, no I/O.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pack_int32", "unpack_int32", "packed_words", "AWQ_ORDER", "AWQ_REVERSE_ORDER", "awq_order", "awq_reverse_order"]

#: AutoAWQ GEMM: nibble ``i`` of a packed word holds output column ``AWQ_ORDER[i]`` of its 8-column block.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: Its inverse: column ``j`` of the block sits in nibble ``AWQ_REVERSE_ORDER[j]``.
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def packed_words(n: int, bits: int) -> int:
    """Number of ``int32`` words that hold ``n`` values of ``bits`` bits."""
    return math.ceil(n * bits / 32)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def pack_int32(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned integer ``values`` (each in ``[0, 2**bits)``) along ``dim``.

    ``values``: any integer (or integral float) tensor.  Returns ``int32`` with
    ``values.shape[dim]`` replaced by ``ceil(n * bits / 32)``.  Raises
    ``ValueError`` for a value outside the range (nothing is silently masked).

    Example (4 bits, one row): ``[1, 2, 3, 4, 5, 6, 7, 8]`` packs to the single
    word ``0x87654321``.
    """
    _check_bits(bits)
    v = values.detach()
    if v.is_floating_point():
        if not torch.equal(v, v.round()):
            raise ValueError("pack_int32: values must be integers")
    v = v.to(torch.int32)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"pack_int32: values must lie in [0, {2**bits - 1}] for {bits} bits, got [{int(v.min())}, {int(v.max())}]")
    v = v.movedim(dim, -1)
    lead, n = v.shape[:-1], v.shape[-1]
    n_words = packed_words(n, bits)
    pad = (-n) % 32
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    # (32, ..., n_chunks): position inside the 32-value chunk first, so each step reads contiguous memory
    chunks = v.reshape(*lead, -1, 32).movedim(-1, 0).contiguous()
    words = torch.zeros(bits, *chunks.shape[1:], dtype=torch.int32, device=v.device)
    for i in range(32):
        k, off = divmod(i * bits, 32)
        x = chunks[i]
        words[k] |= x << off  # int32 shifts wrap: the bits past 31 are dropped, as intended
        if off + bits > 32:  # the value straddles two words
            words[k + 1] |= x >> (32 - off)
    words = words.movedim(0, -1).reshape(*lead, -1)[..., :n_words]
    return words.movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``n`` values of ``bits`` bits along ``dim``.

    ``words`` must be ``int32`` with at least ``ceil(n * bits / 32)`` entries
    along ``dim`` (surplus words must be zero padding, as the formats write it).
    Returns ``uint8``.
    """
    _check_bits(bits)
    if words.dtype != torch.int32:
        raise ValueError(f"unpack_int32: expected int32 words, got {words.dtype}")
    w = words.detach().movedim(dim, -1)
    need = packed_words(n, bits)
    if w.shape[-1] < need:
        raise ValueError(f"unpack_int32: {n} values of {bits} bits need {need} words, got {w.shape[-1]}")
    lead, n_chunks = w.shape[:-1], math.ceil(n / 32)
    w = w[..., : n_chunks * bits]
    if w.shape[-1] < n_chunks * bits:
        w = torch.nn.functional.pad(w, (0, n_chunks * bits - w.shape[-1]))
    w = w.reshape(*lead, n_chunks, bits).movedim(-1, 0).contiguous()  # (bits, ..., n_chunks)
    values = torch.empty(32, *w.shape[1:], dtype=torch.int32, device=w.device)
    for i in range(32):
        k, off = divmod(i * bits, 32)
        lo = min(bits, 32 - off)
        x = (w[k] >> off) & ((1 << lo) - 1)  # the mask also removes the sign bits of the arithmetic shift
        if lo < bits:
            x = x | ((w[k + 1] & ((1 << (bits - lo)) - 1)) << lo)
        values[i] = x
    values = values.movedim(0, -1).reshape(*lead, -1)[..., :n]
    return values.to(torch.uint8).movedim(-1, dim).contiguous()


def awq_order(columns: torch.Tensor) -> torch.Tensor:
    """Put the last dim (output columns, a multiple of 8) into AutoAWQ's packing order.

    After this, :func:`pack_int32` (4 bits, last dim) gives AutoAWQ GEMM's ``qweight`` / ``qzeros``.
    """
    n = columns.shape[-1]
    if n % 8:
        raise ValueError(f"AWQ packing needs a multiple of 8 output columns, got {n}")
    idx = (torch.arange(n, device=columns.device).reshape(-1, 8)[:, list(AWQ_ORDER)]).reshape(-1)
    return columns.index_select(-1, idx)


def awq_reverse_order(columns: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`awq_order` (applied to values unpacked from an AWQ word stream)."""
    n = columns.shape[-1]
    if n % 8:
        raise ValueError(f"AWQ packing needs a multiple of 8 output columns, got {n}")
    idx = (torch.arange(n, device=columns.device).reshape(-1, 8)[:, list(AWQ_REVERSE_ORDER)]).reshape(-1)
    return columns.index_select(-1, idx)
