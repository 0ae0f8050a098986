"""Layer-level tests of GPTQ (lmms_quant.quantizers.gptq).

Fixed seeds, CPU only.  The margins against RTN were set well below the gaps
measured on these exact tensors (see each test).
"""

from __future__ import annotations

import logging

import pytest
import torch

from lmms_quant.quantizers.gptq import (
    accumulate_hessian,
    gptq_quantize,
    make_empty_hessian,
    reconstruction_error,
)
from lmms_quant.quantizers.rtn import compute_qparams, dequantize_codes, fake_quantize, quantize_codes, rtn_quantize

OUT, N_IN, N_TOK = 64, 256, 2048


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random weight and the Hessian of correlated activations ``x = z @ A``."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(OUT, N_IN, generator=g)
    z = torch.randn(N_TOK, N_IN, generator=g)
    A = torch.randn(N_IN, N_IN, generator=g) / N_IN**0.5
    x = z @ A
    H, n = make_empty_hessian(N_IN), 0
    for chunk in x.split(500):
        H, n = accumulate_hessian(H, n, chunk)
    return W, H, x


def naive_gptq(W, H, bits, group_size, sym, percdamp, actorder):
    """Column-by-column OBS quantization with the explicit inverse Hessian (float64).

    No lazy batches and no Cholesky: after rounding column j,
    ``W[:, j+1:] -= err * Hinv[j, j+1:] / Hinv[j, j]`` and j is removed from
    ``Hinv`` by the rank-1 update ``Hinv -= Hinv[:, j] Hinv[j, :] / Hinv[j, j]``
    (applied to the trailing block, the only part read afterwards).
    Group parameters are taken from the current weights when a group starts.
    """
    W = W.double().clone()
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    n = W.shape[1]
    if group_size == -1:
        scale, zero = compute_qparams(W, bits, sym)
    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(n)
    W = W[:, perm]
    H = H[perm][:, perm]
    H += percdamp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for j in range(n):
        if group_size > 0 and j % group_size == 0:
            scale, zero = compute_qparams(W[:, j : j + group_size], bits, sym)
        q = dequantize_codes(quantize_codes(W[:, j : j + 1], scale, zero, bits), scale, zero).flatten().double()
        err = W[:, j] - q
        W[:, j + 1 :] -= torch.outer(err, Hinv[j, j + 1 :] / Hinv[j, j])
        # rank-1 removal of row/column j (only the trailing block is read again)
        Hinv[j + 1 :, j + 1 :] -= torch.outer(Hinv[j + 1 :, j], Hinv[j, j + 1 :]) / Hinv[j, j]
        Q[:, j] = q
    return Q[:, torch.argsort(perm)].float()


def test_accumulate_hessian_is_running_mean():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 70, 16, generator=g)
    H, n = make_empty_hessian(16), 0
    for batch in x.split(1):  # (1, 70, 16): leading dims are tokens
        H, n = accumulate_hessian(H, n, batch)
    H, n = accumulate_hessian(H, n, torch.zeros(0, 16))
    flat = x.reshape(-1, 16)
    assert n == 210
    torch.testing.assert_close(H, 2 * flat.T @ flat / 210, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        accumulate_hessian(H, n, torch.zeros(4, 15))


def test_reconstruction_error_is_output_error(layer):
    W, H, x = layer
    Q = fake_quantize(W, 3)
    expected = 2 / N_TOK * ((W - Q) @ x.T).pow(2).sum()
    assert reconstruction_error(W, Q, H) == pytest.approx(float(expected), rel=1e-4)


def test_worked_2x2_example():
    """The example of the module docstring."""
    W = torch.tensor([[0.75, 0.2]])
    H = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    res = gptq_quantize(W, H, bits=2)
    torch.testing.assert_close(res.weight, torch.tensor([[0.5, 0.5]]))
    assert res.error == pytest.approx(0.0175, abs=1e-6)
    assert reconstruction_error(W, fake_quantize(W, 2), H) == pytest.approx(0.1925, abs=1e-6)


# Measured GPTQ / RTN reconstruction-error ratios on this layer (symmetric):
#   per channel: 0.51 / 0.49 (2 bits, act-order off / on), 0.47 / 0.45 (3), 0.49 / 0.46 (4)
#   group 64:    0.71 / 0.71 (2 bits),                     0.51 / 0.49 (3), 0.50 / 0.45 (4)
@pytest.mark.parametrize("actorder", [False, True])
@pytest.mark.parametrize("group_size, margin", [(-1, 0.6), (64, 0.8)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn(layer, bits, group_size, margin, actorder):
    W, H, _ = layer
    res = gptq_quantize(W, H, bits, group_size=group_size, actorder=actorder)
    rtn = reconstruction_error(W, fake_quantize(W, bits, group_size, True), H)
    assert res.error == pytest.approx(reconstruction_error(W, res.weight, H), rel=1e-5)
    assert res.error <= margin * rtn
    # at most 2**bits distinct values in each row of each group
    groups = torch.zeros(N_IN, dtype=torch.long) if group_size == -1 else torch.arange(N_IN) // group_size
    if res.g_idx is not None:
        groups = res.g_idx
    for k in groups.unique():
        cols = res.weight[:, groups == k]
        assert max(len(row.unique()) for row in cols) <= 2**bits


@pytest.mark.parametrize(
    "bits, group_size, sym, actorder",
    [(3, -1, True, False), (3, -1, True, True), (3, 64, True, False), (3, 64, True, True), (2, 64, False, True), (4, 32, False, False)],
)
def test_matches_naive_obs(layer, bits, group_size, sym, actorder):
    """Lazy batches + Cholesky give the naive OBS result.

    Criterion: at least 99% of the entries agree within 1e-4, and the two
    reconstruction errors agree within 1%.  Exact agreement everywhere is not
    guaranteed: float32 (GPTQ) and float64 (naive) can round a value sitting
    on a tie differently, and that one code then propagates along its row.
    Measured (1 thread): all entries within 6e-6; with the earlier (out, n_in)
    loop layout one near tie flipped in one case (3 bits, group 64, act-order),
    changing 9 of 16384 entries of one row.
    """
    W, H, _ = layer
    res = gptq_quantize(W, H, bits, group_size=group_size, sym=sym, actorder=actorder, blocksize=128)
    ref = naive_gptq(W, H, bits, group_size, sym, 0.01, actorder)
    agree = ((res.weight - ref).abs() <= 1e-4).float().mean()
    assert agree >= 0.99
    assert res.error == pytest.approx(reconstruction_error(W, ref, H), rel=0.01)


def test_result_does_not_depend_on_blocksize(layer):
    """Groups that start inside a block use exactly updated weights, so the block
    size (here also sizes that neither divide nor are divided by 64) changes
    nothing but float rounding (criterion as in test_matches_naive_obs; measured:
    all entries within 1e-4)."""
    W, H, _ = layer
    ref = gptq_quantize(W, H, 3, group_size=64, blocksize=256).weight
    for blocksize in (1, 16, 48, 100, 128):
        out = gptq_quantize(W, H, 3, group_size=64, blocksize=blocksize).weight
        assert ((out - ref).abs() <= 1e-4).float().mean() >= 0.99


@pytest.mark.parametrize(
    "group_size, sym, actorder, static_groups",
    [
        (-1, True, False, False),
        (-1, False, True, False),
        (0, True, False, False),
        (64, True, False, False),
        (64, False, True, False),
        (64, True, True, True),
        (32, False, False, True),
    ],
)
def test_codes_scale_zero_reproduce_weight(layer, group_size, sym, actorder, static_groups):
    W, H, _ = layer
    res = gptq_quantize(W, H, 3, group_size=group_size, sym=sym, actorder=actorder, static_groups=static_groups)
    qt = res.quantized
    assert qt.codes.dtype == torch.uint8 and int(qt.codes.max()) <= 7
    assert torch.equal(res.dequantize(), res.weight)
    # g_idx is needed exactly for act-order with dynamic groups
    assert (res.g_idx is not None) == (actorder and group_size > 0 and not static_groups)
    if res.g_idx is None:  # the rtn.py convention: contiguous groups of the original columns
        n_groups = {-1: OUT, 0: 1}.get(group_size, OUT * N_IN // max(group_size, 1))
        assert qt.scale.numel() == qt.zero.numel() == n_groups
        flat = qt.codes.float().reshape(n_groups, -1)
        deq = dequantize_codes(flat, qt.scale.reshape(-1, 1), qt.zero.reshape(-1, 1)).reshape(OUT, N_IN)
        assert torch.equal(deq, res.weight)
    else:
        assert sorted(torch.bincount(res.g_idx).tolist()) == [group_size] * (N_IN // group_size)


def test_static_groups_use_original_column_groups(layer):
    W, H, _ = layer
    res = gptq_quantize(W, H, 4, group_size=64, actorder=True, static_groups=True)
    ref = rtn_quantize(W, 4, group_size=64, sym=True)
    assert torch.equal(res.quantized.scale, ref.scale)
    assert torch.equal(res.quantized.zero, ref.zero)


def test_dead_inputs_are_zeroed(layer):
    W, H, _ = layer
    H = H.clone()
    H[5, :] = 0
    H[:, 5] = 0
    W_before, H_before = W.clone(), H.clone()
    res = gptq_quantize(W, H, 4)
    assert res.n_dead == 1
    assert torch.all(res.weight[:, 5] == 0)
    assert torch.isfinite(res.weight).all()
    assert torch.equal(W, W_before) and torch.equal(H, H_before)  # inputs untouched


def test_dtype_is_kept(layer):
    W, H, _ = layer
    res = gptq_quantize(W.half(), H, 4)
    assert res.weight.dtype == torch.float16
    assert res.error <= reconstruction_error(W, fake_quantize(W, 4), H)


def test_damping_escalates_on_indefinite_hessian(layer, caplog):
    """Shift H so that its smallest eigenvalue is -0.05 * mean(diag H): the default
    damping 0.01 fails, 0.1 works."""
    W, H, _ = layer
    mean_diag = float(torch.diag(H).mean())
    shift = float(torch.linalg.eigvalsh(H.double()).min()) + 0.05 * mean_diag
    H_bad = H - shift * torch.eye(N_IN)
    with caplog.at_level(logging.WARNING, logger="lmms_quant.quantizers.gptq"):
        res = gptq_quantize(W, H_bad, 4, percdamp=0.01)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "Cholesky" in r.getMessage()]
    assert len(warnings) == 1
    assert res.percdamp == pytest.approx(0.1)
    assert torch.isfinite(res.weight).all()


def test_hopeless_hessian_raises(caplog):
    H = torch.ones(8, 8) - 2000 * torch.eye(8)  # mean diag < 0
    with pytest.raises(torch.linalg.LinAlgError):
        gptq_quantize(torch.randn(4, 8), H, 4)
    H = torch.eye(8)
    H[0, 0] = -6.9  # mean(diag H) = 0.0125 > 0, but an eigenvalue below -100 * mean(diag H)
    with caplog.at_level(logging.WARNING, logger="lmms_quant.quantizers.gptq"), pytest.raises(torch.linalg.LinAlgError):
        gptq_quantize(torch.randn(4, 8), H, 4)
    assert len(caplog.records) == 4  # percdamp 0.01 -> 0.1 -> 1 -> 10 -> 100, then the error


def test_all_zero_hessian_raises():
    with pytest.raises(ValueError, match="no calibration activations"):
        gptq_quantize(torch.randn(4, 8), make_empty_hessian(8), 4)


@pytest.mark.parametrize(
    "kwargs",
    [{"group_size": 3}, {"group_size": -2}, {"static_groups": True}, {"blocksize": 0}, {"percdamp": 0.0}],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), 4, **kwargs)
