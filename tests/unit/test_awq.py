"""Layer-level tests of AWQ (lmms_quant.quantizers.awq).

Fixed seeds, CPU only.  The margins against RTN were set well below the gaps
measured on these exact tensors (see each test).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmms_quant.quantizers.awq import (
    activation_scale,
    apply_clip,
    awq_quantize,
    fold_scales_into_linear,
    fold_scales_into_norm,
    search_clip,
    search_scales,
    search_scales_study_variant,
)
from lmms_quant.quantizers.rtn import fake_quantize, rtn_quantize

OUT, N_IN, GROUP = 64, 256, 32
OUTLIERS = [3, 50, 100, 200]


pytestmark = pytest.mark.usefixtures("one_thread")


def outlier_activations(seed: int, n_tokens: int = 2048) -> torch.Tensor:
    """Gaussian activations whose channels OUTLIERS are 50x larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, N_IN, generator=g)
    x[:, OUTLIERS] *= 50
    return x


@pytest.fixture(scope="module")
def toy() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A toy linear, calibration activations and held-out activations."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(OUT, N_IN, generator=g) * 0.02
    return W, outlier_activations(2), outlier_activations(3)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


def test_activation_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2000, 8, generator=g) * torch.arange(1, 9)  # 6000 tokens: more than one chunk
    torch.testing.assert_close(activation_scale(x), x.abs().reshape(-1, 8).mean(0), rtol=1e-5, atol=1e-6)


def test_search_scales_losses_are_output_mse(toy):
    """The Gram-matrix loss equals the materialised output MSE of
    Q(W diag(s)) (x / s) against W x, over two linears sharing x."""
    W, xc, _ = toy
    W2 = torch.randn(32, N_IN, generator=torch.Generator().manual_seed(7)) * 0.05
    res = search_scales(xc, [W, W2], bits=3, group_size=GROUP, n_grid=10)
    assert len(res.loss_per_ratio) == 10
    s_x = xc.abs().mean(0)
    ref_out = torch.cat([xc @ W.T, xc @ W2.T], dim=1)
    for i in (0, 3, 7):
        s = s_x.pow(i / 10).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out = torch.cat([(xc / s) @ fake_quantize(w * s, 3, GROUP, False).T for w in (W, W2)], dim=1)
        assert res.loss_per_ratio[i] == pytest.approx(mse(out, ref_out), rel=1e-3)
    # the published normalisation: max(s) * min(s) == 1
    assert float(res.scales.max() * res.scales.min()) == pytest.approx(1.0, rel=1e-5)
    assert res.best_loss == res.loss_per_ratio[round(res.best_ratio * 10)]


def test_output_loss_on_the_linear_itself_is_the_gram_objective(toy):
    """``output_loss`` gets the equivalent weights Q(W diag(s)) / s; scoring them on the
    linear's own output reproduces the Gram-matrix search point for point."""
    W, xc, _ = toy
    ref = xc @ W.T
    given = []

    def output_loss(weights):
        (Wq,) = weights
        given.append(Wq)
        return mse(xc @ Wq.T, ref)

    gram = search_scales(xc, [W], 3, GROUP, n_grid=10)
    out = search_scales(xc, [W], 3, GROUP, n_grid=10, output_loss=output_loss)
    assert len(given) == 10
    assert out.loss_per_ratio == pytest.approx(gram.loss_per_ratio, rel=1e-3)
    assert out.best_ratio == gram.best_ratio > 0 and torch.equal(out.scales, gram.scales)
    s = out.scales  # the last call was the last grid point; check the one chosen
    torch.testing.assert_close(given[round(out.best_ratio * 10)], fake_quantize(W * s, 3, GROUP, False) / s)


def test_output_loss_changes_the_choice_when_the_module_weighs_outputs(toy):
    """A module that reads only some of the linear's outputs (here: the rows without
    outlier-heavy weights) can prefer another ratio: the search follows the module."""
    W, xc, _ = toy
    keep = torch.zeros(OUT, dtype=torch.bool)
    keep[::4] = True
    ref = (xc @ W.T)[:, keep]
    picked = search_scales(xc, [W], 2, GROUP, n_grid=20, output_loss=lambda ws: mse((xc @ ws[0].T)[:, keep], ref))
    whole = search_scales(xc, [W], 2, GROUP, n_grid=20)
    assert picked.loss_per_ratio != pytest.approx(whole.loss_per_ratio, rel=1e-2)


def test_ratio_zero_is_rtn(toy):
    W, xc, _ = toy
    res = search_scales(xc, [W], bits=4, group_size=GROUP, n_grid=1)  # the grid is {0}
    assert res.best_ratio == 0.0 and torch.equal(res.scales, torch.ones(N_IN))
    qt, ref = awq_quantize(W, res.scales, None, 4, GROUP), rtn_quantize(W, 4, GROUP, sym=False)
    for field in ("weight", "codes", "scale", "zero"):
        assert torch.equal(getattr(qt, field), getattr(ref, field))
    full = search_scales(xc, [W], bits=4, group_size=GROUP)
    assert full.loss_per_ratio[0] == pytest.approx(mse(xc @ ref.weight.T, xc @ W.T), rel=1e-4)
    assert full.best_loss <= full.loss_per_ratio[0]


# Measured AWQ / RTN held-out output MSE on this toy (asymmetric, group 32):
#   3 bits 0.107 (best ratio 0.5), 4 bits 0.108 (ratio 0.4); without clip search 0.136 and 0.126.
@pytest.mark.parametrize("bits", [3, 4])
def test_awq_beats_rtn_on_outlier_channels(toy, bits):
    W, xc, xt = toy
    res = search_scales(xc, [W], bits, GROUP)
    s = res.scales
    max_val = search_clip(xc / s, W * s, bits, GROUP)
    qt = awq_quantize(W, s, max_val, bits, GROUP)
    ref = xt @ W.T
    awq_mse = mse((xt / s) @ qt.weight.T, ref)
    rtn_mse = mse(xt @ fake_quantize(W, bits, GROUP, False).T, ref)
    assert res.best_ratio > 0
    assert awq_mse <= 0.5 * rtn_mse
    noclip_mse = mse((xt / s) @ awq_quantize(W, s, None, bits, GROUP).weight.T, ref)
    assert awq_mse <= noclip_mse


def _brute_force_clip(x, W, bits, group_size, sym, n_grid, max_shrink):
    """Per (row, group): materialise the group's outputs for every shrink and pick the first minimum."""
    out, n_in = W.shape
    n_groups = n_in // group_size
    best = torch.zeros(out, n_groups)
    for r in range(out):
        for k in range(n_groups):
            cols = slice(k * group_size, (k + 1) * group_size)
            w = W[r, cols]
            org = float(w.abs().max())
            errs = []
            for i_s in range(int(max_shrink * n_grid)):
                m = org * (1 - i_s / n_grid)
                q = fake_quantize(w.clamp(-m, m).reshape(1, -1), bits, -1, sym).flatten()
                errs.append((float((x[:, cols] @ q - x[:, cols] @ w).pow(2).mean()), m))
            best[r, k] = min(errs, key=lambda e: e[0])[1]  # min() keeps the first of equal errors
    return best


@pytest.mark.parametrize("sym", [False, True])
def test_search_clip_matches_brute_force(sym):
    g = torch.Generator().manual_seed(4)
    W = torch.randn(6, 32, generator=g)
    x = torch.randn(100, 32, generator=g)
    max_val = search_clip(x, W, 3, group_size=8, sym=sym, n_sample_tokens=50, oc_batch=4)
    assert max_val.shape == (6, 4)
    expected = _brute_force_clip(x[::2], W, 3, 8, sym, n_grid=20, max_shrink=0.5)  # 100 // 50: every 2nd token
    torch.testing.assert_close(max_val, expected, rtol=1e-6, atol=0)
    org_max = W.abs().reshape(6, 4, 8).amax(-1)
    assert torch.all(max_val <= org_max) and torch.any(max_val < org_max)  # some groups are clipped
    clipped = apply_clip(W, max_val)
    assert torch.all(clipped.reshape(6, 4, 8).abs() <= max_val.unsqueeze(-1))
    per_channel = search_clip(x, W, 3, group_size=-1, sym=sym)
    assert per_channel.shape == (6, 1)
    with pytest.raises(ValueError):
        search_clip(x, W, 3, group_size=0)


def test_fold_into_norm_is_exact():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 7, 32, generator=g)
    gamma, beta = torch.randn(32, generator=g), torch.randn(32, generator=g)
    W, b = torch.randn(16, 32, generator=g), torch.randn(16, generator=g)
    s = torch.exp(torch.randn(32, generator=g))
    ref = F.linear(F.layer_norm(x, (32,), gamma, beta), W, b)
    gamma_s, beta_s = fold_scales_into_norm(gamma, beta, s)
    torch.testing.assert_close(F.linear(F.layer_norm(x, (32,), gamma_s, beta_s), W * s, b), ref, rtol=0, atol=1e-5)
    # RMSNorm: no bias
    ref = F.linear(F.rms_norm(x, (32,), gamma), W)
    gamma_s, none = fold_scales_into_norm(gamma, None, s)
    assert none is None
    torch.testing.assert_close(F.linear(F.rms_norm(x, (32,), gamma_s), W * s), ref, rtol=0, atol=1e-5)
    # with quantization: the folded norm feeds Q(W diag(s)) exactly x / s
    qt = awq_quantize(W, s, None, 4, group_size=8)
    y = F.layer_norm(x, (32,), gamma, beta)
    y_s = F.layer_norm(x, (32,), *fold_scales_into_norm(gamma, beta, s))
    torch.testing.assert_close(y_s @ qt.weight.T, (y / s) @ qt.weight.T, rtol=0, atol=1e-4)


def test_fold_into_linear_is_exact():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(50, 24, generator=g)
    prev_W, prev_b = torch.randn(32, 24, generator=g), torch.randn(32, generator=g)
    W = torch.randn(16, 32, generator=g)
    s = torch.exp(torch.randn(32, generator=g))
    ref = F.linear(F.linear(x, prev_W, prev_b), W)
    pW, pb = fold_scales_into_linear(prev_W, prev_b, s)
    torch.testing.assert_close(F.linear(F.linear(x, pW, pb), W * s), ref, rtol=1e-5, atol=1e-5)
    pW, pb = fold_scales_into_linear(prev_W, None, s)
    assert pb is None
    with pytest.raises(ValueError):
        fold_scales_into_linear(prev_W[:5], None, s)


# Measured best losses at 4 bits, asymmetric, group 32: published 0.0037 (ratio 0.4),
# study variant 0.0261 (integer exponent 1: s = s_x, too strong); 3 bits 0.0167 vs 0.0445.
@pytest.mark.parametrize("bits", [3, 4])
def test_study_variant_differs_where_it_matters(toy, bits):
    W, xc, _ = toy
    published = search_scales(xc, [W], bits, GROUP)
    study = search_scales_study_variant(xc, [W], bits, GROUP)
    assert study.best_ratio == int(study.best_ratio)
    assert study.loss_per_ratio[0] == pytest.approx(published.loss_per_ratio[0], rel=1e-6)  # both start at RTN
    s_x = activation_scale(xc)
    assert torch.equal(study.scales, s_x.pow(int(study.best_ratio)).clamp(min=1e-4))  # not normalised
    assert published.best_loss <= 0.5 * study.best_loss


def test_study_variant_skips_overflowing_ratios():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(64, 16, generator=g)
    x[:, 0] *= 100  # s_x ~ 80: s_x ** 3 > 65504 overflows float16 weights
    W = torch.randn(8, 16, generator=g).half()
    res = search_scales_study_variant(x, [W], 4, group_size=8, n_grid=6)
    assert all(loss == float("inf") for loss in res.loss_per_ratio[3:])
    assert all(loss < float("inf") for loss in res.loss_per_ratio[:3])
    assert res.best_ratio in (0.0, 1.0, 2.0)


def test_awq_quantize_validates_and_keeps_dtype(toy):
    W, _, _ = toy
    qt = awq_quantize(W.half(), torch.ones(N_IN), None, 4, GROUP)
    assert qt.weight.dtype == torch.float16
    with pytest.raises(ValueError):
        awq_quantize(W, torch.ones(N_IN - 1), None, 4, GROUP)
    with pytest.raises(ValueError):
        apply_clip(W, torch.ones(OUT, 3))
    with pytest.raises(ValueError):
        search_scales(torch.randn(10, N_IN), [torch.randn(4, N_IN - 1)], 4, GROUP)
