"""The rounding primitive on hand-built tensors."""

import pytest
import torch

from lmms_quant.apply import count_levels
from lmms_quant.quantizers.rtn import compute_qparams, dequantize_codes, n_groups, rtn_quantize


def test_docstring_example_asymmetric_2bit():
    w = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    qt = rtn_quantize(w, bits=2, group_size=-1, sym=False)
    assert torch.allclose(qt.scale, torch.tensor([[2 / 3]]))
    assert qt.zero.item() == 2
    assert qt.codes.tolist() == [[0, 2, 3, 3]]
    assert torch.allclose(qt.weight, torch.tensor([[-4 / 3, 0.0, 2 / 3, 2 / 3]]))


def test_symmetric_zero_point_is_mid_range_and_zero_is_exact():
    w = torch.tensor([[-0.8, -0.1, 0.0, 0.3, 0.7]])
    qt = rtn_quantize(w, bits=4, sym=True)
    assert qt.zero.item() == 8
    assert torch.allclose(qt.scale, torch.tensor([[1.6 / 15]]))
    assert qt.weight[0, 2].item() == 0.0  # zero is representable


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 0, 16])
@pytest.mark.parametrize("sym", [True, False])
def test_levels_and_error_bound(bits, group_size, sym):
    torch.manual_seed(bits)
    w = torch.randn(8, 64)
    qt = rtn_quantize(w, bits, group_size, sym)
    assert count_levels(qt.weight, group_size) <= 2**bits
    # codes, scale and zero reproduce the weight
    g = 64 if group_size == -1 else (w.numel() if group_size == 0 else group_size)
    scale = qt.scale.reshape(-1, 1)
    zero = qt.zero.reshape(-1, 1)
    codes = qt.codes.float().reshape(-1, g)
    assert torch.allclose(dequantize_codes(codes, scale, zero).reshape(w.shape), qt.weight)
    assert qt.scale.numel() == n_groups(tuple(w.shape), group_size)
    # inside the representable range the error is at most half a step
    err = (qt.weight - w).abs().reshape(-1, g)
    lo = (scale * (0 - zero)).expand_as(err)
    hi = (scale * ((2**bits - 1) - zero)).expand_as(err)
    inside = (w.reshape(-1, g) >= lo) & (w.reshape(-1, g) <= hi)
    assert (err[inside] <= scale.expand_as(err)[inside] / 2 + 1e-6).all()


def test_more_bits_less_error_and_groups_help():
    torch.manual_seed(0)
    w = torch.randn(32, 256) * torch.logspace(-1, 1, 256)  # columns of very different scale
    errs = [((rtn_quantize(w, b).weight - w) ** 2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[3] < errs[2] / 100
    per_channel = ((rtn_quantize(w, 3, -1).weight - w) ** 2).mean()
    grouped = ((rtn_quantize(w, 3, 32).weight - w) ** 2).mean()
    per_tensor = ((rtn_quantize(w, 3, 0, sym=False).weight - w) ** 2).mean()
    assert grouped < 0.5 * per_channel
    assert per_channel < per_tensor


def test_asymmetric_beats_symmetric_on_one_sided_weights():
    torch.manual_seed(0)
    w = torch.rand(16, 64)  # all positive: symmetric wastes half its levels
    sym_err = ((rtn_quantize(w, 3, sym=True).weight - w) ** 2).mean()
    asym_err = ((rtn_quantize(w, 3, sym=False).weight - w) ** 2).mean()
    assert asym_err < 0.5 * sym_err


def test_all_zero_row_keeps_zero_and_finite_scale():
    w = torch.zeros(2, 8)
    qt = rtn_quantize(w, 3)
    assert torch.equal(qt.weight, w)
    assert torch.isfinite(qt.scale).all() and (qt.scale > 0).all()


def test_dtype_and_shape_preserved_and_conv_kernels_flatten():
    w = torch.randn(4, 3, 2, 2, dtype=torch.bfloat16)
    qt = rtn_quantize(w, 4, -1)
    assert qt.weight.shape == w.shape and qt.weight.dtype == torch.bfloat16
    assert count_levels(qt.weight, -1) <= 16


def test_bad_group_size_and_bits():
    with pytest.raises(ValueError, match="does not divide"):
        rtn_quantize(torch.randn(4, 10), 4, group_size=3)
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        compute_qparams(torch.randn(2, 2), 9, True)


def test_the_grid_proof_agrees_with_counting_levels():
    from lmms_quant.apply import count_levels, on_grid
    from lmms_quant.calibration import qparams_of
    from lmms_quant.quantizers.rtn import rtn_quantize

    torch.manual_seed(0)
    for group_size, sym, dtype in [(-1, True, torch.float32), (16, False, torch.float32), (0, False, torch.float32),
                                   (32, True, torch.bfloat16)]:
        w = torch.randn(24, 64).to(dtype)
        qt = rtn_quantize(w, 3, group_size, sym)
        qp = qparams_of(qt)
        assert on_grid(qt.weight, qp) and count_levels(qt.weight, group_size) <= 8
        row = qt.weight[3, :16]
        j = next(i for i in range(16) if int((row == row[i]).sum()) > 1)  # a value that occurs twice in its group
        off = qt.weight.clone()
        off[3, j] += 0.123  # moved off the grid: not proven, and its group gains a level
        assert not on_grid(off, qp)
        group = (slice(None), slice(None)) if group_size == 0 else (3, slice(0, 16 if group_size == 16 else 32 if group_size == 32 else 64))
        assert torch.unique(off[group]).numel() == torch.unique(qt.weight[group]).numel() + 1
        assert not on_grid(w, qp)  # the unquantized weight is not on it either
    assert not on_grid(qt.weight, {**qp, "g_idx": torch.zeros(64, dtype=torch.long)})  # act-order: left to counting
