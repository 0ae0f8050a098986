"""Bit packing (every width), the reference GPTQ/AWQ layouts, and exact code recovery."""

import pytest
import torch

from lmms_quant.checkpoints.autoawq import awq_layer_tensors, read_awq_layer
from lmms_quant.checkpoints.autogptq import gptq_layer_tensors, read_gptq_layer
from lmms_quant.checkpoints.pack import awq_order, awq_reverse_order, pack_int32, packed_words, unpack_int32
from lmms_quant.checkpoints.qlayer import CheckpointError, CheckpointShapeError, QuantizedLinearData
from lmms_quant.quantizers.gptq import accumulate_hessian, gptq_quantize, make_empty_hessian
from lmms_quant.quantizers.rtn import rtn_quantize


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(3, 64), (5, 37), (1, 1), (2, 33)])
def test_pack_unpack_round_trip_is_exact_for_every_width(bits, shape):
    g = torch.Generator().manual_seed(bits * 100 + shape[1])
    v = torch.randint(0, 2**bits, shape, generator=g)
    v[0, 0] = 2**bits - 1  # the extremes are present
    words = pack_int32(v, bits)
    assert words.dtype == torch.int32 and words.shape == (shape[0], packed_words(shape[1], bits))
    assert torch.equal(unpack_int32(words, bits, shape[1]).long(), v)
    words0 = pack_int32(v, bits, dim=0)
    assert words0.shape == (packed_words(shape[0], bits), shape[1])
    assert torch.equal(unpack_int32(words0, bits, shape[0], dim=0).long(), v)


def test_pack_layout_is_dense_lsb_first():
    assert pack_int32(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4).item() & 0xFFFFFFFF == 0x87654321
    # 3 bits: the 11th value (index 10) straddles words 0 and 1: its low 2 bits are bits 30-31 of word 0
    v = torch.zeros(1, 32, dtype=torch.long)
    v[0, 10] = 0b111
    w = pack_int32(v, 3)[0].tolist()
    assert w[0] & 0xFFFFFFFF == 0b11 << 30 and w[1] == 0b1 and w[2] == 0
    assert packed_words(32, 3) == 3 and packed_words(33, 3) == 4


def test_pack_refuses_values_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_int32(torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="integers"):
        pack_int32(torch.tensor([[0.5]]), 3)
    with pytest.raises(ValueError, match="need"):
        unpack_int32(torch.zeros(1, 1, dtype=torch.int32), 4, 9)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_matches_compressed_tensors_pack_to_int32(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    v = torch.randint(0, 2**bits, (6, 70), generator=torch.Generator().manual_seed(bits))
    signed = (v - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_int32(v, bits), helpers.pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(v, bits, dim=0), helpers.pack_to_int32(signed, bits, packed_dim=0))


def _autogptq_pack_reference(intweight, bits):
    """AutoGPTQ 0.7 QuantLinear.pack's loop (qlinear_cuda_old.py), transcribed: intweight is (in, out)."""
    import numpy as np

    intweight = intweight.numpy().astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        elif bits == 3:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return torch.from_numpy(qweight.astype(np.int32))


def _autoawq_pack_reference(intweight):
    """AutoAWQ 0.2 WQLinear_GEMM.from_linear's loop (gemm.py), transcribed: intweight is (in, out), 4 bits."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    qweight = torch.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]].to(torch.int32) << (i * 4)
    return qweight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_packing_follows_autogptq_including_v1_zero_offset(bits):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(bits))
    qt = rtn_quantize(w, bits, 32, sym=False)
    qt.zero.clamp_(min=1)  # v1 cannot store a zero point of 0
    qt.codes = torch.clamp(torch.round(w / qt.scale.repeat_interleave(32, 1)) + qt.zero.repeat_interleave(32, 1), 0, 2**bits - 1).to(torch.uint8)
    q = QuantizedLinearData(qt.codes, qt.scale, qt.zero, bits, 32, False)
    t = gptq_layer_tensors(q, "gptq")
    assert t["qweight"].shape == (96 * bits // 32, 64) and t["scales"].dtype == torch.float16
    assert torch.equal(t["qweight"], _autogptq_pack_reference(q.codes.t().long(), bits))
    assert torch.equal(t["qzeros"], _autogptq_pack_reference((q.zero.t().long() - 1).t(), bits).t())  # qzeros packs along out
    back = read_gptq_layer("x", t, {"bits": bits, "group_size": 32, "sym": False}, (64, 96), "gptq")
    assert torch.equal(back.codes, q.codes) and torch.equal(back.zero, q.zero)
    assert torch.equal(back.scale, q.scale.half().float())


def test_gptq_v1_sym_4bit_zeros_are_the_familiar_0x77777777():
    qt = rtn_quantize(torch.randn(32, 64), 4, -1, sym=True)
    t = gptq_layer_tensors(QuantizedLinearData(qt.codes, qt.scale, qt.zero, 4, -1, True), "gptq")
    assert t["qzeros"].unique().tolist() == [0x77777777]
    assert t["g_idx"].tolist() == [0] * 64


def test_gptq_v1_refuses_a_zero_point_of_zero_and_v2_stores_it():
    qt = rtn_quantize(torch.rand(32, 64), 4, -1, sym=False)  # all weights >= 0: min clamps to 0, zero = 0
    q = QuantizedLinearData(qt.codes, qt.scale, qt.zero, 4, -1, False)
    assert int(q.zero.min()) == 0
    with pytest.raises(CheckpointError, match="gptq_v2"):
        gptq_layer_tensors(q, "gptq")
    back = read_gptq_layer("x", gptq_layer_tensors(q, "gptq_v2"), {"bits": 4, "group_size": -1, "sym": False}, (32, 64), "gptq_v2")
    assert torch.equal(back.zero, q.zero)


def test_gptq_act_order_round_trips_through_g_idx():
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 64)
    H, n = accumulate_hessian(make_empty_hessian(64), 0, x)
    res = gptq_quantize(W, H, 4, group_size=16, sym=False, actorder=True)
    assert res.g_idx is not None
    qp = {"scale": res.quantized.scale, "zero": res.quantized.zero, "g_idx": res.g_idx, "bits": 4, "group_size": 16, "sym": False}
    q = QuantizedLinearData.from_weight(res.weight, qp)
    assert torch.equal(q.codes, res.quantized.codes) and torch.equal(q.dequantize(), res.weight)
    q.zero.clamp_(min=1)
    t = gptq_layer_tensors(q, "gptq_v2")
    back = read_gptq_layer("x", t, {"bits": 4, "group_size": 16, "sym": False}, (32, 64), "gptq_v2")
    assert back.g_idx is not None and torch.equal(back.g_idx, res.g_idx)


def test_awq_packing_follows_autoawq_order():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    qt = rtn_quantize(w, 4, 32, sym=False)
    q = QuantizedLinearData(qt.codes, qt.scale, qt.zero, 4, 32, False)
    t = awq_layer_tensors(q)
    assert t["qweight"].shape == (64, 2) and t["qzeros"].shape == (2, 2) and t["scales"].shape == (2, 16)
    assert torch.equal(t["qweight"], _autoawq_pack_reference(q.codes.t().long()))
    assert torch.equal(t["qzeros"], _autoawq_pack_reference(q.zero.t().long()))
    assert torch.equal(awq_reverse_order(awq_order(torch.arange(16))), torch.arange(16))
    back = read_awq_layer("x", t, {"bits": 4, "group_size": 32, "sym": False}, (16, 64))
    assert torch.equal(back.codes, q.codes) and torch.equal(back.zero, q.zero)
    with pytest.raises(CheckpointShapeError, match=r"'x.qweight' has shape \[64, 2\].*expects \[32, 2\]"):
        read_awq_layer("x", t, {"bits": 4, "group_size": 32, "sym": False}, (16, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group_size,sym", [(8, -1, True), (3, 16, False), (4, 0, False), (2, -1, False)])
def test_codes_are_recovered_exactly_from_a_simulated_weight(dtype, bits, group_size, sym):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits)).to(dtype)
    qt = rtn_quantize(w, bits, group_size, sym)
    qp = {"scale": qt.scale, "zero": qt.zero, "g_idx": None, "bits": bits, "group_size": group_size, "sym": sym}
    q = QuantizedLinearData.from_weight(qt.weight, qp)
    assert torch.equal(q.dequantize(), qt.weight)  # bit for bit, in the model's dtype
    assert int(q.codes.max()) <= 2**bits - 1


def test_a_weight_off_its_grid_is_refused():
    qt = rtn_quantize(torch.randn(8, 32), 4, -1, True)
    qp = {"scale": qt.scale, "zero": qt.zero, "g_idx": None, "bits": 4, "group_size": -1, "sym": True}
    moved = qt.weight.clone()
    moved[0, 0] += 0.3 * qt.scale[0, 0]
    with pytest.raises(CheckpointError, match="not on the 4-bit grid"):
        QuantizedLinearData.from_weight(moved, qp, "lin")
