"""GPTQ's column loop in one Triton kernel per lazy block (CUDA).

:func:`lmms_quant.quantizers.gptq.gptq_quantize` quantizes one input column at
a time and spreads its error over the block's later columns.  In PyTorch that
is about ten small kernels per column; on a GPU the launches, not the
arithmetic, then set the time (4096 columns: about 40,000 launches).  The
rows of ``W`` (output channels) are independent in that loop: row ``r``'s
update reads only row ``r`` and the block of ``Hinv``.  So
:func:`gptq_block` runs the whole block in one launch: each program holds a
tile of ``BLOCK_R`` rows by the block's columns in registers and walks the
columns in order, doing exactly what the PyTorch loop does for its rows:

* ``w``: the column's current values;
* the quantization parameters of its group: fixed per row (per channel, per
  tensor, or computed by the caller at a group that starts with the block),
  looked up per column (static groups), or, for groups that lie inside the
  block, computed in the kernel from the tile as it stands when the group's
  first column is reached (``compute_qparams`` of the group's current
  columns), then written to ``group_scale`` / ``group_zero``;
* ``codes = clamp(round(w / scale) + zero, 0, maxq)``, ``q = scale * (codes - zero)``
  (``quantize_codes`` / ``dequantize_codes``; division correctly rounded,
  ties to even, as PyTorch);
* ``err = (w - q) / Hinv[j, j]``, then ``tile -= Hinv[j, :] err`` (rank-one update;
  ``Hinv`` is upper triangular, so only later columns move).

The caller keeps everything else (Hessian, Cholesky, block-to-block GEMM,
losses, act-order), so both paths share one definition of the algorithm; the
tests compare them column for column (``TRITON_INTERPRET=1`` runs the kernel
on the CPU).
"""

from __future__ import annotations

import os

import torch

__all__ = ["MODE_DYNAMIC", "MODE_FIXED", "MODE_STATIC", "gptq_block", "triton_available"]

MODE_FIXED = 0    # one (scale, zero) per row for the whole block
MODE_STATIC = 1   # per column: group gidx[j] of a (n_groups, out) table
MODE_DYNAMIC = 2  # groups of GROUP columns inside the block, parameters from the current tile

BLOCK_R = 16  # rows of W per program

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs run the PyTorch loop
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``, the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(t: torch.Tensor) -> bool:
    """Whether :func:`gptq_block` can run on ``t``'s device: Triton importable and
    ``t`` on CUDA (or on the CPU under the Triton interpreter)."""
    if triton is None:
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        # Round to nearest, ties to even, as torch.round: adding and subtracting
        # 1.5 * 2**23 leaves an integer in float32's round-to-nearest-even mode
        # (exact for |x| < 2**22; larger values are clamped first, and every
        # code is clamped to [0, 255] afterwards anyway).
        x = tl.minimum(tl.maximum(x, -4194304.0), 4194304.0)
        big = 12582912.0
        return (x + big) - big

    @triton.jit
    def _gptq_block_kernel(
        w_ptr, hinv_ptr, q_ptr, codes_ptr, err_ptr,
        scale_ptr, zero_ptr, gidx_ptr, gscale_ptr, gzero_ptr,
        n_rows, width, group_base,
        stride_wc, stride_hr, stride_qc, stride_ec, stride_s, stride_gt, stride_go,
        maxq, sym_zero,
        MODE: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
        WIDTH: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, WIDTH)
        rmask = rows < n_rows
        cmask = cols < width
        mask2 = cmask[:, None] & rmask[None, :]
        # tile[c, r]: column c of the block (a row of W^T), output row r
        tile = tl.load(w_ptr + cols[:, None] * stride_wc + rows[None, :], mask=mask2, other=0.0)
        s = tl.full((BLOCK_R,), 1.0, tl.float32)
        z = tl.zeros((BLOCK_R,), tl.float32)
        if MODE == 0:
            s = tl.load(scale_ptr + rows * stride_s, mask=rmask, other=1.0)
            z = tl.load(zero_ptr + rows * stride_s, mask=rmask, other=0.0)
        for j in range(0, width):
            sel = cols[:, None] == j
            w = tl.sum(tl.where(sel, tile, 0.0), axis=0)
            if MODE == 1:
                g = tl.load(gidx_ptr + j)
                s = tl.load(gscale_ptr + g * stride_gt + rows * stride_go, mask=rmask, other=1.0)
                z = tl.load(gzero_ptr + g * stride_gt + rows * stride_go, mask=rmask, other=0.0)
            if MODE == 2:
                if j % GROUP == 0:
                    ing = (cols[:, None] >= j) & (cols[:, None] < j + GROUP)
                    xmin = tl.minimum(tl.min(tl.where(ing, tile, float("inf")), axis=0), 0.0)
                    xmax = tl.maximum(tl.max(tl.where(ing, tile, float("-inf")), axis=0), 0.0)
                    if SYM:
                        xmax = tl.maximum(-xmin, xmax)
                        xmin = -xmax
                    empty = (xmin == 0.0) & (xmax == 0.0)
                    xmin = tl.where(empty, -1.0, xmin)
                    xmax = tl.where(empty, 1.0, xmax)
                    s = tl.div_rn(xmax - xmin, tl.full((BLOCK_R,), 0.0, tl.float32) + maxq)
                    if SYM:
                        z = tl.full((BLOCK_R,), 0.0, tl.float32) + sym_zero
                    else:
                        z = _round_half_even(tl.div_rn(-xmin, s))
                    gi = group_base + j // GROUP
                    tl.store(gscale_ptr + gi * stride_gt + rows * stride_go, s, mask=rmask)
                    tl.store(gzero_ptr + gi * stride_gt + rows * stride_go, z, mask=rmask)
            code = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(w, s)) + z, 0.0), maxq)
            q = s * (code - z)
            d = tl.load(hinv_ptr + j * stride_hr + j)
            err = tl.div_rn(w - q, d)
            tl.store(codes_ptr + j * stride_qc + rows, code, mask=rmask)
            tl.store(q_ptr + j * stride_qc + rows, q, mask=rmask)
            tl.store(err_ptr + j * stride_ec + rows, err, mask=rmask)
            h = tl.load(hinv_ptr + j * stride_hr + cols, mask=cmask & (cols >= j), other=0.0)
            tile = tile - h[:, None] * err[None, :]


def _fixed_params(mode: int, scale, zero, n_rows: int, dummy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """MODE_FIXED's ``(scale, zero, stride)``, checked; other modes get ``dummy`` pointers they never read."""
    if mode != MODE_FIXED:
        return dummy, dummy, 0
    if scale is None or zero is None:
        raise ValueError("MODE_FIXED needs scale and zero")
    scale, zero = scale.reshape(-1).contiguous(), zero.reshape(-1).contiguous()
    if scale.numel() not in (1, n_rows) or zero.numel() != scale.numel():
        raise ValueError(f"scale / zero must have 1 or {n_rows} elements, got {scale.numel()} / {zero.numel()}")
    return scale, zero, 0 if scale.numel() == 1 else 1


def _group_params(mode: int, group_scale, group_zero, gidx, group_size: int, width: int,
                  dummy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int, torch.Tensor]:
    """MODE_STATIC / MODE_DYNAMIC's group tables (with their strides) and MODE_STATIC's ``gidx``, checked."""
    if mode == MODE_DYNAMIC and (group_size <= 0 or width % group_size):
        raise ValueError(f"MODE_DYNAMIC needs a group size dividing the block width {width}, got {group_size}")
    if mode not in (MODE_STATIC, MODE_DYNAMIC):
        return dummy, dummy, 0, 0, dummy
    if group_scale is None or group_zero is None or group_scale.stride() != group_zero.stride() or group_scale.stride(-1) != 1:
        raise ValueError("MODE_STATIC / MODE_DYNAMIC need group_scale and group_zero of shape (n_groups, out), unit column stride")
    if mode == MODE_DYNAMIC:
        return group_scale, group_zero, group_scale.stride(0), 1, dummy
    if gidx is None or gidx.numel() != width:
        raise ValueError(f"MODE_STATIC needs gidx with {width} entries")
    return group_scale, group_zero, group_scale.stride(0), 1, gidx.to(torch.int32).contiguous()


def gptq_block(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    Q1: torch.Tensor,
    codes1: torch.Tensor,
    Err1: torch.Tensor,
    bits: int,
    sym: bool,
    mode: int,
    *,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    gidx: torch.Tensor | None = None,
    group_scale: torch.Tensor | None = None,
    group_zero: torch.Tensor | None = None,
    group_size: int = 0,
    group_base: int = 0,
) -> None:
    """One lazy GPTQ block on the transposed weight, in one kernel launch.

    ``W1``: ``(width, out)`` float32, the block's columns of ``W`` as rows
    (contiguous), as updated by all earlier blocks; it is used as scratch.
    ``Hinv1``: ``(width, width)`` block of the upper Cholesky factor of the
    inverse Hessian (unit column stride).  Outputs, each ``(width, out)`` with
    unit column stride: ``Q1`` (quantized values), ``codes1`` (integer codes as
    float), ``Err1`` (the scaled errors ``(w - q) / Hinv[j, j]`` the caller
    propagates to later blocks).

    ``mode``: :data:`MODE_FIXED` with ``scale`` / ``zero`` of ``out`` (or 1)
    elements; :data:`MODE_STATIC` with ``gidx`` (``(width,)`` int32: each
    column's group) into ``group_scale`` / ``group_zero`` (``(n_groups, out)``);
    :data:`MODE_DYNAMIC` with ``group_size`` dividing ``width``: groups
    ``group_base + j // group_size`` get their parameters written to
    ``group_scale`` / ``group_zero``.
    """
    if triton is None:
        raise RuntimeError("the fused GPTQ block needs Triton (pip install triton; it comes with CUDA builds of PyTorch)")
    width, n_rows = W1.shape
    if width == 0:
        return
    for name, t in (("W1", W1), ("Q1", Q1), ("codes1", codes1), ("Err1", Err1), ("Hinv1", Hinv1)):
        if t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be float32 with unit column stride, got {t.dtype} strides {t.stride()}")
    scale, zero, stride_s = _fixed_params(mode, scale, zero, n_rows, dummy=W1)
    group_scale, group_zero, stride_gt, stride_go, gidx = _group_params(mode, group_scale, group_zero, gidx, group_size, width, dummy=W1)
    maxq = float(2**bits - 1)
    grid = (triton.cdiv(n_rows, BLOCK_R),)
    _gptq_block_kernel[grid](
        W1, Hinv1, Q1, codes1, Err1,
        scale, zero, gidx, group_scale, group_zero,
        n_rows, width, group_base,
        W1.stride(0), Hinv1.stride(0), Q1.stride(0), Err1.stride(0), stride_s, stride_gt, stride_go,
        maxq, (maxq + 1) / 2,
        MODE=mode, GROUP=max(group_size, 1), SYM=sym,
        WIDTH=triton.next_power_of_2(width), BLOCK_R=BLOCK_R,
        num_warps=4,
    )
