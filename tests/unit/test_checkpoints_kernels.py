"""Real low-bit execution (int4 tinygemm, int8 row-wise kernels) against the simulated model: fake-vs-real parity."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lmms_quant import quantize_, recipe_from_args
from lmms_quant.checkpoints import LowBitLinear, QuantizedLinearData, layers_from_report, load_quantized, save_quantized, to_lowbit_
from lmms_quant.checkpoints.kernels import choose_kernel, module_bytes, parity
from lmms_quant.checkpoints.load import read_packed_layers
from lmms_quant.models import load_vlm
from lmms_quant.quantizers.gptq import accumulate_hessian, gptq_quantize, make_empty_hessian
from lmms_quant.quantizers.rtn import rtn_quantize
from tests.fixtures.tiny_models import save_tiny_llava

#: fp32: the kernels accumulate in another order than x @ W^T; bf16: scales and tinygemm's float zero are rounded to bf16.
FP32_REL_TOL = 1e-5
BF16_REL_TOL = 3e-2


def _layer(bits, group_size, sym, shape=(48, 128), seed=0):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    qt = rtn_quantize(w, bits, group_size, sym)
    qp = {"scale": qt.scale, "zero": qt.zero, "g_idx": None, "bits": bits, "group_size": group_size, "sym": sym}
    return QuantizedLinearData.from_weight(qt.weight, qp)


@pytest.mark.parametrize("bits,group_size,sym,kernel", [
    (4, 32, False, "int4"), (4, 128, True, "int4"), (3, 64, False, "int4"), (2, -1, False, "int4"), (4, 0, False, "int4"),
    (8, -1, False, "int8"), (8, -1, True, "int8"), (6, 0, False, "int8"), (5, -1, True, "int8"),
])
def test_kernel_matches_the_dequantized_weight(bits, group_size, sym, kernel):
    q = _layer(bits, group_size, sym)
    bias = torch.randn(48)
    lin = LowBitLinear(q, bias)
    assert lin.kernel == kernel
    x = torch.randn(3, 5, 128)
    ref = F.linear(x, q.dequantize(), bias)
    got = lin(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= FP32_REL_TOL * ref.abs().max()


def test_act_order_groups_run_through_int4_by_permuting_inputs():
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 128)
    H, _ = accumulate_hessian(make_empty_hessian(128), 0, x)
    res = gptq_quantize(W, H, 4, group_size=32, sym=False, actorder=True)
    qp = {"scale": res.quantized.scale, "zero": res.quantized.zero, "g_idx": res.g_idx, "bits": 4, "group_size": 32, "sym": False}
    q = QuantizedLinearData.from_weight(res.weight, qp)
    lin = LowBitLinear(q)
    assert lin.kernel == "int4" and lin.perm is not None
    xs = torch.randn(4, 128)
    ref = F.linear(xs, res.weight)
    assert (lin(xs) - ref).abs().max() <= FP32_REL_TOL * ref.abs().max()


def test_grouped_wide_grids_have_no_kernel_and_stay_simulated():
    choice = choose_kernel(_layer(6, 32, False))
    assert choice.kernel is None and "no int4 kernel" in choice.reason
    assert choose_kernel(_layer(4, 16, False)).kernel is None  # tinygemm has no groups of 16


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return str(save_tiny_llava(tmp_path_factory.mktemp("m") / "tiny-llava", seed=9))


IDS = torch.tensor([[1, 7, 12, 30, 41, 5, 9, 22], [2, 8, 13, 31, 40, 6, 10, 23]])


@pytest.mark.parametrize("args,kernels", [
    ({"bits": 4, "group_size": 32, "sym": False}, {"int4"}),
    ({"bits_llm": 3, "bits_vit": 2}, {"int4"}),
    ({"method": "uniform", "bits": 8}, {"int8"}),
    ({"bits_llm": 6, "group_size_llm": 16, "bits_vit": 4}, {"int4", "simulated"}),
])
def test_fake_vs_real_parity_on_a_whole_model(llava_dir, args, kernels):
    v = load_vlm(llava_dir)
    report = quantize_(v.model, recipe_from_args(args))
    real = copy.deepcopy(v.model)
    done = to_lowbit_(real, layers_from_report(v.model, report))
    assert {k.split(":")[0] for k in done.values()} == kernels
    p = parity(lambda: v.model(input_ids=IDS).logits, lambda: real(input_ids=IDS).logits)
    assert p["max_rel"] <= FP32_REL_TOL
    if "simulated" not in kernels:
        assert module_bytes(real) < 0.6 * module_bytes(v.model)


def test_bf16_parity_within_the_stated_tolerance(llava_dir):
    v = load_vlm(llava_dir, dtype="bfloat16")
    report = quantize_(v.model, recipe_from_args({"bits": 4, "group_size": 32, "sym": False}))
    real = copy.deepcopy(v.model)
    to_lowbit_(real, layers_from_report(v.model, report))
    p = parity(lambda: v.model(input_ids=IDS).logits, lambda: real(input_ids=IDS).logits)
    assert 0 < p["max_rel"] <= BF16_REL_TOL


def test_a_saved_checkpoint_runs_for_real_without_the_report(llava_dir, tmp_path):
    v = load_vlm(llava_dir)
    report = quantize_(v.model, recipe_from_args({"bits": 4, "group_size": 32}))
    out = save_quantized(v.model, report, tmp_path / "q")
    model, _, _ = load_quantized(out)
    layers, _ = read_packed_layers(out)
    to_lowbit_(model, layers)
    assert isinstance(model.model.language_model.layers[0].mlp.up_proj, LowBitLinear)
    assert parity(lambda: v.model(input_ids=IDS).logits, lambda: model(input_ids=IDS).logits)["max_rel"] <= FP32_REL_TOL


def test_torchao_backend_builds_its_int4_tensor_from_our_codes(llava_dir):
    pytest.importorskip("torchao")
    v = load_vlm(llava_dir)
    report = quantize_(v.model, recipe_from_args({"bits": 4, "group_size": 32, "sym": False}))
    real = copy.deepcopy(v.model)
    done = to_lowbit_(real, layers_from_report(v.model, report), backend="torchao")
    assert set(done.values()) == {"int4 (torchao)"}
    assert type(real.model.language_model.layers[0].mlp.up_proj.weight).__name__ == "Int4OpaqueTensor"
    assert parity(lambda: v.model(input_ids=IDS).logits, lambda: real(input_ids=IDS).logits)["max_rel"] <= FP32_REL_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels need a GPU")
def test_cuda_int4_and_int8_parity():
    for bits, gs, kernel in [(4, 128, "int4"), (8, -1, "int8")]:
        q = _layer(bits, gs, False, shape=(256, 512))
        lin = LowBitLinear(q, device="cuda", act_dtype=torch.bfloat16)
        assert lin.kernel == kernel
        x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), q.dequantize().cuda())
        assert (lin(x).float() - ref).abs().max() <= BF16_REL_TOL * ref.abs().max()
