"""AWQ (Lin et al., MLSys 2024, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration") as pure tensor functions.

AWQ protects the weights that meet large activations by scaling input channel
``j`` of the weight up by ``s_j`` and the activation down by the same factor,
which leaves the full-precision output unchanged::

    W x = (W diag(s)) (diag(s)^-1 x)

so that the rounding error of the salient columns shrinks relative to the
signal.  The paper searches ``s = s_x ** ratio`` (``s_x`` the mean ``|x|`` of each
input channel) over a grid of ``ratio`` in ``[0, 1)`` to minimise

    || Q(W diag(s)) (diag(s)^-1 X) - W X ||^2

and then searches, per output channel and group, a clipping range that
minimises the group's output error (reference code: mit-han-lab/llm-awq,
``auto_scale.py`` and ``auto_clip.py``).

The steps are separate so that a search can be cached and re-applied:

1. ``res = search_scales(x, [W_q, W_k, W_v], bits)``: ``res.scales`` (``(n_in,)``);
2. for each linear, ``max_val = search_clip(x / res.scales, W * res.scales, bits)``;
3. ``qt = awq_quantize(W, res.scales, max_val, bits)``: ``qt.weight`` is
   ``Q(clip(W diag(s)))`` and must be fed ``x / s``.  The CALLER makes that
   true: fold ``1/s`` into the op that produces ``x`` when it is a norm or a
   linear with nothing non-linear in between (:func:`fold_scales_into_norm`,
   :func:`fold_scales_into_linear`), or divide the input explicitly.  For
   simulated quantization ``qt.weight / s`` is the equivalent weight on ``x``.

All rounding goes through :func:`lmms_quant.quantizers.rtn.fake_quantize`.
Output errors are computed from the input Gram matrix ``X^T X`` (accumulated in
token chunks) instead of materialising ``X W^T`` for every grid point: the
squared error of a weight change ``D`` over the tokens is
``trace(D X^T X D^T)``, exactly (memory: ``n_in^2`` floats, like GPTQ's Hessian).
Biases cancel in ``Q(..) x + b - (W x + b)``, so the searches take none, and
:func:`awq_quantize` needs no activations.

The published reference scores a scale on the output of the module the linears
sit in (llm-awq's ``module2inspect``: the attention for q/k/v, the MLP for its
first linears), so that the error is weighed by what the rest of that module
does with it.  The searches take that objective as ``output_loss``: a callable
that receives the equivalent weights ``Q(W diag(s)) diag(s)^-1`` of the linears
and returns the module's mean squared output error; running the module is the
caller's business (:mod:`lmms_quant.calibration`).  Without it, the objective
is the linears' own outputs, through the Gram matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmms_quant.quantizers.rtn import QuantizedTensor, fake_quantize, rtn_quantize

__all__ = [
    "AWQScaleResult",
    "OutputLoss",
    "activation_scale",
    "apply_clip",
    "awq_quantize",
    "fold_scales_into_linear",
    "fold_scales_into_norm",
    "search_clip",
    "search_scales",
    "search_scales_study_variant",
]

# Tokens per chunk when reducing over activations (bounds temporary memory to
# _TOKEN_CHUNK x n_in floats).
_TOKEN_CHUNK = 4096


@dataclass
class AWQScaleResult:
    """Output of a scale search.

    ``scales`` (``(n_in,)``, float32): multiply the weights' input columns by
    them and divide the input by them.  ``best_ratio``: the chosen grid point
    (the exponent of ``s_x``).  ``loss_per_ratio``: mean squared output error
    over all tokens and all outputs of the given linears, one per grid point,
    ``inf`` for a grid point that overflowed (study variant only).
    ``loss_per_ratio[0]`` is plain RTN (``s = 1``).
    """

    scales: torch.Tensor
    best_ratio: float
    loss_per_ratio: list[float]

    @property
    def best_loss(self) -> float:
        return min(self.loss_per_ratio)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """Mean ``|x|`` per input channel over all tokens: ``(..., n_in) -> (n_in,)`` float32."""
    x = _tokens(x)
    if x.shape[0] == 0:
        raise ValueError("activation_scale needs at least one token")
    total = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    for c in range(0, x.shape[0], _TOKEN_CHUNK):
        total += x[c : c + _TOKEN_CHUNK].float().abs().sum(dim=0)
    return total / x.shape[0]


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``X^T X`` (``(n_in, n_in)``, float32) over the tokens of ``x`` (``(n_tokens, n_in)``)."""
    G = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    for c in range(0, x.shape[0], _TOKEN_CHUNK):
        xc = x[c : c + _TOKEN_CHUNK].float()
        G.addmm_(xc.T, xc)
    return G


def _check_weights(weights: Sequence[torch.Tensor], n_in: int) -> None:
    if len(weights) == 0:
        raise ValueError("at least one weight is needed")
    for W in weights:
        if W.dim() != 2 or W.shape[1] != n_in:
            raise ValueError(f"each weight must have shape (out, {n_in}), got {tuple(W.shape)}")


def _scaled_quant_loss(
    weights: Sequence[torch.Tensor],
    G: torch.Tensor,
    n_tokens: int,
    s: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
) -> float:
    """Mean squared error of ``Q(W diag(s)) diag(s)^-1 x`` against ``W x`` over all outputs."""
    sse = 0.0
    n_out = 0
    for W in weights:
        Wf = W.float()
        D = fake_quantize(Wf * s, bits, group_size, sym) / s - Wf
        sse += float(((D @ G) * D).sum())
        n_out += W.shape[0]
    return sse / (n_tokens * n_out)


#: ``output_loss(equivalent_weights) -> mean squared error of the enclosing module's output``.
OutputLoss = Callable[[list[torch.Tensor]], float]


def _objective(
    x: torch.Tensor, weights: Sequence[torch.Tensor], bits: int, group_size: int, sym: bool, output_loss: OutputLoss | None
) -> Callable[[torch.Tensor], float]:
    """The loss of a scale vector ``s``: on the linears' outputs (Gram matrix) or through ``output_loss``."""
    if output_loss is None:
        G = _gram(x)
        return lambda s: _scaled_quant_loss(weights, G, x.shape[0], s, bits, group_size, sym)
    return lambda s: output_loss([fake_quantize(W.float() * s, bits, group_size, sym) / s for W in weights])


@torch.no_grad()
def search_scales(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    bits: int,
    group_size: int = 128,
    sym: bool = False,
    n_grid: int = 20,
    output_loss: OutputLoss | None = None,
) -> AWQScaleResult:
    """The published AWQ scale search for linears that share the input ``x``.

    ``x``: ``(..., n_in)`` calibration inputs; ``weights``: the ``(out_i, n_in)``
    weights of every linear fed by ``x`` (e.g. q, k and v).  For
    ``ratio = i / n_grid``, ``i = 0 .. n_grid - 1``: ``s = clamp(s_x ** ratio, min=1e-4)``,
    ``s = s / sqrt(max(s) * min(s))`` and the loss is the mean squared error
    of ``Q(W diag(s)) diag(s)^-1 X`` against ``W X`` summed over the linears.
    The first minimum wins, so ``ratio = 0`` (``s = 1``, plain RTN) is kept
    unless another ratio is strictly better: the chosen loss is never above RTN's.
    ``output_loss`` (see the module docstring) replaces that objective by the
    error of the enclosing module's output.
    """
    if n_grid < 1:
        raise ValueError(f"n_grid must be >= 1, got {n_grid}")
    x = _tokens(x)
    _check_weights(weights, x.shape[1])
    s_x = activation_scale(x)
    score = _objective(x, weights, bits, group_size, sym, output_loss)
    losses: list[float] = []
    best = (float("inf"), 0.0, torch.ones_like(s_x))
    for i in range(n_grid):
        ratio = i / n_grid
        s = s_x.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = score(s)
        losses.append(loss)
        if loss < best[0]:
            best = (loss, ratio, s)
    return AWQScaleResult(scales=best[2], best_ratio=best[1], loss_per_ratio=losses)


@torch.no_grad()
def search_scales_study_variant(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    bits: int,
    group_size: int = 128,
    sym: bool = False,
    n_grid: int = 20,
    output_loss: OutputLoss | None = None,
) -> AWQScaleResult:
    """The reference study's scale search (gautomdas/mmq ``awq/quantizer.py``). NOT the published AWQ.

    Kept only so that the study can be reproduced.  It differs from
    :func:`search_scales` in that the INTEGER ``ratio = 0 .. n_grid - 1`` is the
    exponent (``s = clamp(s_x ** ratio, min=1e-4)``, so ``s_x ** 19`` at the end of
    the grid), non-finite scales are set to 1, a grid point whose scaled weight
    overflows (in the weights' dtype) is skipped (loss ``inf``), and there is no
    normalisation.  The objective is the same as :func:`search_scales`'s
    (``output_loss``: the enclosing module's output, as the study measured it).
    """
    if n_grid < 1:
        raise ValueError(f"n_grid must be >= 1, got {n_grid}")
    x = _tokens(x)
    _check_weights(weights, x.shape[1])
    s_x = activation_scale(x)
    score = _objective(x, weights, bits, group_size, sym, output_loss)
    losses: list[float] = []
    best = (float("inf"), 0.0, torch.ones_like(s_x))
    for ratio in range(n_grid):
        s = s_x.pow(ratio).clamp(min=1e-4)
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        if not all(bool(torch.isfinite(W * s.to(W.dtype)).all()) for W in weights):
            losses.append(float("inf"))
            continue
        loss = score(s)
        if math.isnan(loss):  # inf / inf
            loss = float("inf")
        losses.append(loss)
        if loss < best[0]:
            best = (loss, float(ratio), s)
    return AWQScaleResult(scales=best[2], best_ratio=best[1], loss_per_ratio=losses)


def _group_len(n_in: int, group_size: int) -> int:
    if group_size == -1:
        return n_in
    if group_size <= 0 or n_in % group_size:
        raise ValueError(f"clip search needs group_size -1 (per channel) or a positive divisor of {n_in}, got {group_size}")
    return group_size


@torch.no_grad()
def search_clip(
    x: torch.Tensor,
    W: torch.Tensor,
    bits: int,
    group_size: int = 128,
    sym: bool = False,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_tokens: int = 512,
    oc_batch: int = 256,
) -> torch.Tensor:
    """The published AWQ clip search (llm-awq ``auto_clip_layer``).

    ``x``: ``(..., n_in)`` inputs of the linear with weight ``W`` (``(out, n_in)``);
    after :func:`search_scales` pass the scaled pair ``(x / s, W * s)``.  Every
    ``n_tokens // n_sample_tokens``-th token is used.  For each output channel
    and group, the range ``[-m, m]`` with ``m = max|w| * (1 - i / n_grid)``,
    ``i = 0 .. int(max_shrink * n_grid) - 1``, that minimises the mean over
    tokens of the group's squared output error ``(x_g . (Q(clip(w_g)) - w_g))^2``
    is kept.  ``i = 0`` is no clipping and wins ties.

    Returns ``max_val`` of shape ``(out, n_groups)`` (``n_groups = 1`` for
    ``group_size = -1``); per-tensor (``group_size = 0``) is not supported.
    Output channels are processed ``oc_batch`` at a time.  The reference skips
    the query and key projections (their error passes through ``q k^T``); that
    choice belongs to the caller.
    """
    x = _tokens(x)
    out, n_in = W.shape
    if x.shape[1] != n_in:
        raise ValueError(f"x has {x.shape[1]} features, W expects {n_in}")
    g = _group_len(n_in, group_size)
    n_groups = n_in // g
    n_steps = int(max_shrink * n_grid)
    if n_steps < 1:
        raise ValueError(f"max_shrink * n_grid must be >= 1, got {max_shrink} * {n_grid}")
    step = max(1, x.shape[0] // n_sample_tokens)
    xs = x[::step].float().reshape(-1, n_groups, g)
    # Per-group Gram matrices (n_groups, g, g): the error of a change D in group k
    # summed over tokens is D_k^T G_k D_k.
    G = torch.einsum("tki,tkj->kij", xs, xs)
    n_tok = xs.shape[0]

    best_all = []
    for o1 in range(0, out, oc_batch):
        w = W[o1 : o1 + oc_batch].float()
        wg = w.reshape(-1, n_groups, g)
        org_max = wg.abs().amax(dim=-1)  # (rows, n_groups)
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i_s in range(n_steps):
            max_val = org_max * (1 - i_s / n_grid)
            cur = torch.clamp(wg, -max_val.unsqueeze(-1), max_val.unsqueeze(-1)).reshape(w.shape)
            D = (fake_quantize(cur, bits, group_size, sym) - w).reshape(-1, n_groups, g)
            err = torch.einsum("rki,kij,rkj->rk", D, G, D) / n_tok
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, max_val, best_max)
        best_all.append(best_max)
    return torch.cat(best_all, dim=0)


def apply_clip(W: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """Clamp each group of ``W`` (``(out, n_in)``) to ``[-max_val, max_val]`` (``max_val``: ``(out, n_groups)``)."""
    out, n_in = W.shape
    if max_val.dim() != 2 or max_val.shape[0] != out or n_in % max_val.shape[1]:
        raise ValueError(f"max_val of shape {tuple(max_val.shape)} does not fit W of shape {tuple(W.shape)}")
    m = max_val.to(W.dtype).unsqueeze(-1)
    return torch.clamp(W.reshape(out, max_val.shape[1], -1), -m, m).reshape(out, n_in)


def awq_quantize(
    W: torch.Tensor,
    scales: torch.Tensor,
    max_val: torch.Tensor | None,
    bits: int,
    group_size: int = 128,
    sym: bool = False,
) -> QuantizedTensor:
    """Quantize ``clip(W diag(s))`` with RTN.

    ``W``: ``(out, n_in)``; ``scales``: ``(n_in,)`` from a scale search;
    ``max_val``: ``(out, n_groups)`` from :func:`search_clip` on the scaled
    weight, or ``None`` for no clipping.  The returned ``weight`` (``W``'s
    dtype) expects the input ``x / s``: the caller must fold ``1/s`` into the
    preceding op or divide the input (see the module docstring).
    """
    if scales.shape != (W.shape[1],):
        raise ValueError(f"scales must have shape ({W.shape[1]},), got {tuple(scales.shape)}")
    Ws = W.float() * scales.float()
    if max_val is not None:
        Ws = apply_clip(Ws, max_val)
    qt = rtn_quantize(Ws, bits, group_size, sym)
    qt.weight = qt.weight.to(W.dtype)
    return qt


def fold_scales_into_norm(
    norm_weight: torch.Tensor, norm_bias: torch.Tensor | None, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New ``(weight, bias)`` of a LayerNorm / RMSNorm whose output is divided by ``s``.

    Exact: the norm's output is ``gamma * n(x) + beta``, so ``(gamma / s, beta / s)``
    yields it divided by ``s``.  Valid only if the norm feeds the scaled
    linears directly.
    """
    w = norm_weight / s.to(norm_weight.dtype)
    b = None if norm_bias is None else norm_bias / s.to(norm_bias.dtype)
    return w, b


def fold_scales_into_linear(prev_W: torch.Tensor, prev_b: torch.Tensor | None, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New ``(weight, bias)`` of a linear (``(n_in, k)``) whose output is divided by ``s``.

    Exact when nothing non-linear sits between this linear and the scaled ones
    (e.g. v_proj before o_proj).  Row ``j`` of ``prev_W`` and ``prev_b[j]`` are
    divided by ``s[j]``.
    """
    if prev_W.shape[0] != s.shape[0]:
        raise ValueError(f"prev_W has {prev_W.shape[0]} outputs, s has {s.shape[0]} entries")
    W = prev_W / s.to(prev_W.dtype).unsqueeze(1)
    b = None if prev_b is None else prev_b / s.to(prev_b.dtype)
    return W, b
