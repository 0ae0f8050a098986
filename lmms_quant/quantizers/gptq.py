"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers") as pure tensor functions.

For a linear layer with weight ``W`` (``(out, n_in)``) and calibration inputs
``X`` (``(n_in, n_tokens)``), GPTQ minimises the layer-output error
``||W X - Q X||_F^2 = trace((W - Q) X X^T (W - Q)^T)`` one input column at a
time: column ``j`` is rounded and the rounding error is spread over the
not-yet-quantized columns through the inverse Hessian ``Hinv = (2 X X^T / n)^-1``
(the Optimal Brain Surgeon update).  The update is computed from the upper
Cholesky factor of ``Hinv`` and applied lazily in blocks of ``blocksize``
columns, exactly as in the paper (Sections 3-4) and the reference code
(IST-DASLab/gptq, ``gptq.py``).  Names follow the paper: ``W``, ``H``, ``Hinv``.

Usage, with the calibration hooks living elsewhere::

    H, n = make_empty_hessian(n_in), 0
    for x in activations:                      # (..., n_in) each
        H, n = accumulate_hessian(H, n, x)
    result = gptq_quantize(W, H, bits=4)       # result.weight is the new weight

Every rounding goes through :mod:`lmms_quant.quantizers.rtn`
(``compute_qparams`` / ``quantize_codes`` / ``dequantize_codes``), so GPTQ and
RTN differ only in the error feedback, never in the quantizer.

Worked 2x2 example (per channel, symmetric, 2 bits; levels ``{-1, -0.5, 0, 0.5}``
for a row whose max ``|w|`` is 0.75):  ``W = [[0.75, 0.2]]``,
``H = [[1, 0.9], [0.9, 1]]``.  Column 0 rounds 0.75 to 0.5 (error 0.25 after the
``clamp`` at the top code ``maxq = 3``).  The OBS update moves column 1 by
``0.25 * 0.9 = 0.225`` (``Hinv[0, 1] / Hinv[0, 0] = -H[0, 1] / H[1, 1]``), to
0.425, which rounds to 0.5 where RTN would give 0.0: the output error
``trace(E H E^T)`` drops from 0.1925 (RTN, ``E = [0.25, 0.2]``) to 0.0175
(GPTQ, ``E = [0.25, -0.3]``).  (The default damping, 0.01, changes neither.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from lmms_quant.quantizers import gptq_kernels as kernels
from lmms_quant.quantizers.rtn import QuantizedTensor, compute_qparams, dequantize_codes, quantize_codes

__all__ = [
    "GPTQResult",
    "accumulate_hessian",
    "gptq_quantize",
    "make_empty_hessian",
    "reconstruction_error",
]

logger = logging.getLogger(__name__)

# Damping escalation when the Cholesky factorisation fails: the relative damping
# ``percdamp`` is multiplied by this factor until it exceeds the cap.
_DAMP_GROWTH = 10.0
_MAX_PERCDAMP = 100.0

KERNELS = ("auto", "torch", "triton")


@dataclass
class GPTQResult:
    """Output of :func:`gptq_quantize`.

    ``quantized`` holds the dequantised weight (input shape and dtype), the
    ``uint8`` codes in the original column order, and ``scale`` / ``zero`` of
    shape ``(out, n_groups)`` (per tensor ``(1, 1)``).

    ``g_idx`` is ``None`` when the groups are the contiguous column groups of the
    :class:`~lmms_quant.quantizers.rtn.QuantizedTensor` convention (per channel,
    per tensor, groups without act-order, or act-order with static groups).
    With act-order and dynamic groups the groups are contiguous in the
    *permuted* order, so ``g_idx`` (``(n_in,)``, int64) gives the group of each
    original column: ``weight[:, j] = scale[:, g_idx[j]] * (codes[:, j] - zero[:, g_idx[j]])``
    (see :meth:`dequantize`).

    ``loss`` is the reference code's OBS estimate ``sum (w - q)^2 / (2 d^2)``
    (``d`` the diagonal of the Cholesky factor of ``Hinv``); ``error`` is the
    exact :func:`reconstruction_error` of the result on the undamped ``H``,
    computed on first access (it costs ``out * n_in^2`` multiply-adds, as much
    as GPTQ's own updates; the ``H`` given must not change before then);
    ``percdamp`` / ``damp`` the relative / absolute damping finally used;
    ``n_dead`` the number of inputs with ``H[i, i] == 0``.
    """

    quantized: QuantizedTensor
    g_idx: torch.Tensor | None
    loss: float
    percdamp: float
    damp: float
    n_dead: int
    _error_inputs: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    _error: float | None = field(default=None, repr=False, compare=False)

    @property
    def error(self) -> float:
        """``trace((W - Q) H (W - Q)^T)`` on the ``W`` and undamped ``H`` given to :func:`gptq_quantize`."""
        if self._error is None:
            W, H = self._error_inputs
            self._error = reconstruction_error(W, self.quantized.weight, H.float())
            self._error_inputs = None
        return self._error

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight, ``(out, n_in)``."""
        return self.quantized.weight

    def dequantize(self) -> torch.Tensor:
        """Rebuild the weight (float32) from codes, scale, zero and ``g_idx``."""
        qt = self.quantized
        codes = qt.codes.float()
        out, n_in = codes.shape
        if qt.group_size == 0:
            return dequantize_codes(codes, qt.scale, qt.zero)
        if self.g_idx is not None:
            return dequantize_codes(codes, qt.scale[:, self.g_idx], qt.zero[:, self.g_idx])
        n_groups = qt.scale.shape[1]
        grouped = codes.reshape(out, n_groups, n_in // n_groups)
        return dequantize_codes(grouped, qt.scale.unsqueeze(-1), qt.zero.unsqueeze(-1)).reshape(out, n_in)


def make_empty_hessian(n_in: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A zero ``(n_in, n_in)`` float32 Hessian accumulator."""
    return torch.zeros(n_in, n_in, dtype=torch.float32, device=device)


def accumulate_hessian(H: torch.Tensor, n_seen: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running Hessian ``H = 2 X X^T / n``.

    ``x`` has shape ``(..., n_in)``; every leading index is one token.  ``H`` is
    updated in place (and returned) so that it stays the mean over all
    ``n_seen`` tokens seen so far; returns ``(H, n_seen + n_tokens)``.  ``x`` must
    already be on ``H``'s device.

    The reference code counts sequences instead of tokens; GPTQ is invariant to
    a global scale of ``H`` (the damping is relative), so only the weighting of
    batches with different sequence lengths differs, and counting tokens is the
    one that matches the objective ``||W X - Q X||^2`` over all tokens.
    """
    n_in = H.shape[0]
    if x.shape[-1] != n_in:
        raise ValueError(f"activations have {x.shape[-1]} features, the Hessian expects {n_in}")
    x = x.reshape(-1, n_in).to(H.dtype)
    n_new = x.shape[0]
    if n_new == 0:
        return H, n_seen
    n_total = n_seen + n_new
    H.mul_(n_seen / n_total)
    x = x * math.sqrt(2.0 / n_total)
    H.addmm_(x.T, x)
    return H, n_total


def reconstruction_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """``trace((W - Q) H (W - Q)^T)``: with ``H = 2 X X^T / n`` this is
    ``2 / n * ||(W - Q) X||_F^2``, the layer-output error GPTQ minimises."""
    E = (W.float() - Q.float()).to(H.dtype)
    return float(((E @ H) * E).sum())


def _all_finite(x: torch.Tensor) -> bool:
    """``bool(torch.isfinite(x).all())`` in one reduction pass without temporaries
    (``aminmax`` propagates NaN, and an infinity is the min or the max)."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1`` with ``damp = percdamp * mean(diag H)``.

    If a factorisation fails, the relative damping is raised by ``_DAMP_GROWTH``
    (with a warning each time) up to ``_MAX_PERCDAMP``; then a
    ``torch.linalg.LinAlgError`` is raised.  Returns ``(Hinv, percdamp, damp)``.
    """
    mean_diag = float(torch.diag(H).mean())
    if not mean_diag > 0:
        raise torch.linalg.LinAlgError(f"GPTQ: mean(diag H) = {mean_diag:.3g} is not positive; H is not a valid Hessian")
    rel = percdamp
    while True:
        damp = rel * mean_diag
        Hd = H.clone()
        Hd.diagonal().add_(damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and _all_finite(Hinv):
                return Hinv, rel, damp
        if rel * _DAMP_GROWTH > _MAX_PERCDAMP:
            raise torch.linalg.LinAlgError(
                f"GPTQ: Cholesky factorisation of the damped Hessian failed even with "
                f"percdamp={rel:g} (damp={damp:.3g}); H is far from positive semi-definite"
            )
        logger.warning(
            "GPTQ: Cholesky factorisation failed with percdamp=%g (damp=%.3g); retrying with percdamp=%g",
            rel,
            damp,
            rel * _DAMP_GROWTH,
        )
        rel *= _DAMP_GROWTH


def _use_kernel(kernel: str, WT: torch.Tensor, group_size: int, blocksize: int, static: bool) -> bool:
    """Whether the blocks run in the Triton kernel (see ``gptq_quantize``'s ``kernel``)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "torch":
        return False
    fits = group_size <= 0 or static or blocksize % group_size == 0 or group_size % blocksize == 0
    if kernel == "auto":
        return fits and WT.is_cuda and kernels.triton_available(WT)
    if not kernels.triton_available(WT):
        raise ValueError("kernel='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on the CPU); "
                         f"got a tensor on {WT.device}{'' if kernels.triton is not None else ' and no Triton'}; use kernel='torch' or 'auto'")
    if not fits:
        raise ValueError(f"kernel='triton' needs group_size dividing blocksize or a multiple of it (or static groups); "
                         f"got group_size={group_size}, blocksize={blocksize}; use kernel='torch' or 'auto'")
    return True


def _check_args(W: torch.Tensor, H: torch.Tensor, group_size: int, blocksize: int, percdamp: float, static_groups: bool) -> None:
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (out, n_in), got shape {tuple(W.shape)}")
    n_in = W.shape[1]
    if H.shape != (n_in, n_in):
        raise ValueError(f"H must have shape ({n_in}, {n_in}) for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if group_size < -1 or (group_size > 0 and n_in % group_size):
        raise ValueError(f"group_size must be -1 (per channel), 0 (per tensor) or a positive divisor of {n_in}, got {group_size}")
    if static_groups and group_size <= 0:
        raise ValueError(f"static_groups needs group_size > 0, got {group_size}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if not percdamp > 0:
        raise ValueError(f"percdamp must be > 0, got {percdamp}")
    if not _all_finite(H):
        raise ValueError("H contains NaN or inf")
    if not bool(H.any()):
        raise ValueError("H is all zero: the layer received no calibration activations; leave it unquantized (do not run GPTQ on it)")


@dataclass
class _Grid:
    """The quantization grid of every column as GPTQ reaches it: ``fixed`` per channel or per
    tensor (from the whole weight), else one ``(scale, zero)`` row of ``table_s`` / ``table_z``
    (``(n_groups, out)``) per group: static groups filled up front, dynamic groups as they start."""

    bits: int
    sym: bool
    group_size: int
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None  # (out, 1) or (1, 1) each
    table_s: torch.Tensor | None = None
    table_z: torch.Tensor | None = None
    static_group: list[int] | None = None  # static groups: each (permuted) column's group, as Python ints (no device sync)
    static_gidx: torch.Tensor | None = None  # the same as an int32 tensor, for the kernel

    def column(self, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out,)`` scale and zero of column ``col`` (its group started already)."""
        if self.fixed is not None:
            return self.fixed[0].view(-1), self.fixed[1].view(-1)
        g = self.static_group[col] if self.static_group is not None else col // self.group_size
        return self.table_s[g], self.table_z[g]

    def start_group(self, col: int, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters of the dynamic group starting at ``col`` from its ``current`` ``(out, g)`` weights."""
        scale, zero = compute_qparams(current, self.bits, self.sym)
        g = col // self.group_size
        self.table_s[g], self.table_z[g] = scale.view(-1), zero.view(-1)
        return self.table_s[g], self.table_z[g]

    def dynamic(self) -> bool:
        return self.fixed is None and self.static_group is None

    def result_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` in :class:`QuantizedTensor`'s layout: ``(out, n_groups)`` for groups."""
        if self.fixed is not None:
            return self.fixed
        return self.table_s.T.contiguous(), self.table_z.T.contiguous()


def _prepare(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool, static_groups: bool,
             actorder: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, _Grid]:
    """``(WT, H, dead, perm, grid)``: the float32 transposed weight and Hessian with dead inputs
    handled, permuted by decreasing ``diag(H)`` under ``actorder``, and the grid's fixed parameters.

    GPTQ runs on ``W^T`` (``(n_in, out)``): each column of ``W`` is a contiguous row, so every
    per-column read, write and rank-1 update touches contiguous memory; the operations are those
    of the ``(out, n_in)`` layout.
    """
    n_in, n_out = W.shape[1], W.shape[0]
    WT = W.detach().to(torch.float32, copy=True).T.contiguous()
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    WT[dead] = 0
    grid = _Grid(bits, sym, group_size)
    if group_size <= 0:
        grid.fixed = compute_qparams(WT.T if group_size == -1 else WT.reshape(1, -1), bits, sym)
    elif static_groups:
        static = [compute_qparams(WT[c : c + group_size].T, bits, sym) for c in range(0, n_in, group_size)]
        grid.table_s = torch.stack([s.view(-1) for s, _ in static])
        grid.table_z = torch.stack([z.view(-1) for _, z in static])
    else:
        grid.table_s = torch.empty(n_in // group_size, n_out, dtype=torch.float32, device=WT.device)
        grid.table_z = torch.empty_like(grid.table_s)
    perm = None
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        WT, H = WT[perm], H[perm][:, perm]
    if static_groups and group_size > 0:
        gidx = (perm if perm is not None else torch.arange(n_in, device=WT.device)) // group_size
        grid.static_group, grid.static_gidx = gidx.tolist(), gidx.to(torch.int32)
    return WT, H, dead, perm, grid


def _torch_block(WT: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor, QT: torch.Tensor,
                 codesT: torch.Tensor, i1: int, grid: _Grid) -> None:
    """One lazy block, column by column (the paper's inner loop): round column ``i1 + i`` of the
    block ``W1``, keep its scaled error in ``Err1[i]``, and update the block's later columns."""
    i2 = i1 + len(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    s, z = (None, None) if i1 % max(grid.group_size, 1) == 0 and grid.dynamic() else grid.column(i1)
    for i in range(i2 - i1):
        col = i1 + i
        if grid.static_group is not None:
            s, z = grid.column(col)
        elif grid.dynamic() and col % grid.group_size == 0:
            # the group's columns as updated by every earlier column: inside the block W1 is current;
            # beyond it the block's pending errors have not reached WT yet
            end = col + grid.group_size
            current = W1[i : min(end, i2) - i1].T
            if end > i2:
                current = torch.cat([current, WT[i2:end].T - Err1[:i].T @ Hinv[i1:col, i2:end]], dim=1)
            s, z = grid.start_group(col, current)
        w = W1[i]
        codesT[col] = quantize_codes(w, s, z, grid.bits)
        QT[col] = dequantize_codes(codesT[col], s, z)
        err = torch.sub(w, QT[col], out=Err1[i]).div_(Hinv1[i, i])
        W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)


def _kernel_block(WT: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv_rows: torch.Tensor, QT: torch.Tensor,
                  codesT: torch.Tensor, i1: int, grid: _Grid, blocksize: int) -> None:
    """The same block in one Triton kernel (:func:`lmms_quant.quantizers.gptq_kernels.gptq_block`)."""
    i2, gs = i1 + len(W1), grid.group_size
    if grid.static_group is not None:
        mode, params = kernels.MODE_STATIC, {"gidx": grid.static_gidx[i1:i2], "group_scale": grid.table_s, "group_zero": grid.table_z}
    elif gs > 0 and blocksize % gs == 0:  # groups inside the block: the kernel computes them from the current columns
        mode, params = kernels.MODE_DYNAMIC, {"group_scale": grid.table_s, "group_zero": grid.table_z, "group_size": gs,
                                              "group_base": i1 // gs}
    else:  # per channel, per tensor, or groups of whole blocks (parameters at a group's first block)
        s, z = grid.start_group(i1, WT[i1 : i1 + gs].T) if gs > 0 and i1 % gs == 0 else grid.column(i1)
        mode, params = kernels.MODE_FIXED, {"scale": s, "zero": z}
    kernels.gptq_block(W1, Hinv_rows[i1:i2, i1:i2], QT[i1:i2], codesT[i1:i2], Err1, grid.bits, grid.sym, mode, **params)


def _quantize_columns(WT: torch.Tensor, Hinv: torch.Tensor, grid: _Grid, blocksize: int,
                      kernel: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(QT, codesT, losses)``: every column rounded in lazy blocks of ``blocksize``; each block's
    errors reach the later columns in one GEMM.  ``losses`` is the OBS loss ``err^2 / 2`` per row of W."""
    n_in = WT.shape[0]
    QT, codesT = torch.empty_like(WT), torch.empty_like(WT)
    losses = torch.zeros(WT.shape[1], dtype=WT.dtype, device=WT.device)
    use_kernel = _use_kernel(kernel, WT, grid.group_size, blocksize, grid.static_group is not None)
    # the kernel reads rows of a row-major copy (cholesky_ex returns Hinv column-major); the GEMM below
    # keeps using Hinv, so both paths propagate errors with the same summation order
    Hinv_rows = Hinv.contiguous() if use_kernel else Hinv
    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        W1 = WT[i1:i2].clone()
        Err1 = torch.empty_like(W1)
        if use_kernel:
            try:
                _kernel_block(WT, W1, Err1, Hinv_rows, QT, codesT, i1, grid, blocksize)
            except Exception as exc:  # noqa: BLE001 - a kernel that does not build on this GPU: finish in PyTorch
                if kernel == "triton" or isinstance(exc, ValueError):
                    raise
                logger.warning("GPTQ: the Triton block kernel failed (%s: %s); continuing with the PyTorch loop", type(exc).__name__, exc)
                use_kernel = False  # groups begun by the kernel keep their parameters in the grid
        if not use_kernel:
            _torch_block(WT, W1, Err1, Hinv, QT, codesT, i1, grid)
        losses += Err1.square().sum(dim=0) / 2
        WT[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)
    return QT, codesT, losses


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = -1,
    sym: bool = True,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    static_groups: bool = False,
    kernel: str = "auto",
) -> GPTQResult:
    """Quantize ``W`` (``(out, n_in)``) with GPTQ given ``H = 2 X X^T / n`` (``(n_in, n_in)``).

    * ``group_size``: ``-1`` per output channel, ``0`` per tensor (both with
      parameters from the whole weight before any update), ``g > 0`` groups of
      ``g`` input columns whose parameters are computed when the group's first
      column is reached, from the weights as updated by all earlier columns.
      The reference computes them from a partly stale copy when a group starts
      inside a lazy block; here they are exact, so the result does not depend
      on ``blocksize`` (identical to the reference when ``g`` is a multiple of
      ``blocksize``).
    * ``static_groups``: all group parameters are computed up front from the
      original ``W`` on the original column groups.
    * ``actorder``: columns are processed in order of decreasing ``diag(H)``
      and restored at the end.  Without static groups the groups are then
      contiguous in the permuted order and ``g_idx`` is returned.
    * Dead inputs (``H[i, i] == 0``) get ``H[i, i] = 1`` and ``W[:, i] = 0``
      before anything else, as in the reference.
    * Damping ``percdamp * mean(diag H)`` is added to ``diag(H)``; it is raised
      tenfold with a warning while the Cholesky factorisation fails (see
      ``_inverse_hessian_cholesky``).
    * ``kernel``: how each lazy block's column loop runs.  ``"torch"``: a
      PyTorch loop over the columns; ``"triton"``: the whole block in one
      Triton kernel (:mod:`lmms_quant.quantizers.gptq_kernels`; CUDA, or the
      CPU under ``TRITON_INTERPRET=1``), the same operations row by row;
      ``"auto"`` (default): Triton on CUDA when it is importable and the groups
      fit the blocks (per channel, per tensor, static groups, or ``group_size``
      dividing or a multiple of ``blocksize``), else PyTorch.  If the kernel
      fails to compile, ``"auto"`` warns and finishes in PyTorch.

    Raises ``ValueError`` for an all-zero ``H`` (a layer that saw no
    calibration data: the caller must leave it untouched) and for invalid
    arguments.  ``W`` and ``H`` are not modified; work is done in float32 on
    their device.
    """
    _check_args(W, H, group_size, blocksize, percdamp, static_groups)
    n_in = W.shape[1]
    if group_size == n_in:
        group_size = -1
    W_orig = W.detach().to(torch.float32, copy=True)  # for the lazy error: the caller may overwrite W with the result
    WT, H_work, dead, perm, grid = _prepare(W, H, bits, group_size, sym, static_groups, actorder)
    Hinv, percdamp_used, damp = _inverse_hessian_cholesky(H_work, percdamp)
    QT, codesT, losses = _quantize_columns(WT, Hinv, grid, blocksize, kernel)

    # back to the original column order and to (out, n_in), after the casts (fewer bytes to move)
    QT, codesT = QT.to(W.dtype), codesT.to(torch.uint8)
    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        QT, codesT = QT[invperm], codesT[invperm]
        if grid.dynamic():
            g_idx = (torch.arange(n_in, device=WT.device) // group_size)[invperm]
    scale, zero = grid.result_params()
    quantized = QuantizedTensor(weight=QT.T.contiguous(), codes=codesT.T.contiguous(), scale=scale, zero=zero, bits=bits,
                                group_size=group_size, sym=sym)
    return GPTQResult(quantized=quantized, g_idx=g_idx, loss=float(losses.sum()), _error_inputs=(W_orig, H),
                      percdamp=percdamp_used, damp=damp, n_dead=int(dead.sum()))
