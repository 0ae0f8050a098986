"""The calibration driver (GPTQ and AWQ on whole models), calibration sets and the cache."""

import pytest
import torch

from lmms_quant import quantize_, recipe_from_args
from lmms_quant.calibration import INPUT_SCALE_BUFFER, CalibrationSet
from lmms_quant.calibration_data import build_calibration_set, load_records
from lmms_quant.models import load_vlm
from lmms_quant.quantizers import awq as awq_q
from lmms_quant.quantizers.rtn import QuantizedTensor
from lmms_quant.recipe import CalibrationSpec, RecipeError
from tests.fixtures.tiny_models import build, save_tiny_llava


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return str(save_tiny_llava(tmp_path_factory.mktemp("m") / "tiny-llava", seed=3))


@pytest.fixture(scope="module")
def calib(llava_dir):
    v = load_vlm(llava_dir)
    return build_calibration_set(v.processor, v.family, CalibrationSpec(source="world", samples=12, seed=1), "cpu", torch.float32)


def fresh(llava_dir):
    return load_vlm(llava_dir).model


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits.reshape(-1) for b in batches])


def test_calibration_set_is_seeded_multimodal_and_hashed(llava_dir, calib):
    v = load_vlm(llava_dir)
    again = build_calibration_set(v.processor, v.family, CalibrationSpec(source="world", samples=12, seed=1), "cpu", torch.float32)
    other = build_calibration_set(v.processor, v.family, CalibrationSpec(source="world", samples=12, seed=2), "cpu", torch.float32)
    assert calib.sha256 == again.sha256 != other.sha256
    assert len(calib.batches) == 12 and all("pixel_values" in b for b in calib.batches)
    image_token = v.model.config.image_token_index
    assert all(int((b["input_ids"] == image_token).sum()) == 17 for b in calib.batches)  # 16 patches + CLS
    records = load_records("world", "llava")
    assert len(records) == 384 + 128 and records[0]["prompt"].endswith("Answer the question using a single word or phrase.")
    assert load_records("world", "blip2")[0]["prompt"].startswith("Question: ")
    with pytest.raises(RecipeError, match=r"calib_source '/no/file.jsonl' is neither one of auto, world, task, text, an existing local path \(JSONL file, "
                                         r"parquet file or folder, save_to_disk folder, image folder\) nor a hub dataset id"):
        CalibrationSpec(source="/no/file.jsonl")


def test_gptq_on_a_whole_model_beats_rtn(llava_dir, calib):
    fp = logits(fresh(llava_dir), calib.batches[:4])
    errs = {}
    for method in ("rtn", "gptq"):
        m = fresh(llava_dir)
        report = quantize_(m, recipe_from_args({"method": method, "bits_llm": 3, "bits_vit": 3}), calibration=calib)
        errs[method] = (logits(m, calib.batches[:4]) - fp).pow(2).mean().item()
        if method == "gptq":
            assert len(report.calibration["layers"]) == 26 and report.calibration["samples"] == 12
            assert report.calibration["sha256"] == calib.sha256
    assert errs["gptq"] < 0.8 * errs["rtn"], errs


def test_gptq_options_reach_the_algorithm(llava_dir, calib):
    """act_order, static_groups and damp from model_args change what GPTQ does, and the report says so."""
    from lmms_quant.apply import count_levels
    from lmms_quant.quantizers.rtn import dequantize_codes, quantize_codes

    # 2 bits in groups of 16: a contiguous run of 16 columns holds more than 4 values once act-order regroups
    # them, so the level check (on by default) must follow g_idx
    base = {"method": "gptq", "bits_llm": 2, "group_size_llm": 16}
    plain = quantize_(fresh(llava_dir), recipe_from_args(base), calibration=calib)
    m = fresh(llava_dir)
    ordered = quantize_(m, recipe_from_args({**base, "act_order": True, "damp": 0.05}), calibration=calib)
    static = quantize_(fresh(llava_dir), recipe_from_args({**base, "act_order": True, "static_groups": True}), calibration=calib)
    layers = ordered.calibration["layers"]
    assert layers and all(v["percdamp"] == pytest.approx(0.05) for v in layers.values())
    assert all(v["percdamp"] == pytest.approx(0.01) for v in plain.calibration["layers"].values())
    modules = dict(m.named_modules())
    permuted = 0
    for name, qp in ordered.qparams.items():
        g_idx = qp["g_idx"]
        assert g_idx is not None and static.qparams[name]["g_idx"] is None and plain.qparams[name]["g_idx"] is None
        n_in = g_idx.numel()
        permuted += not torch.equal(g_idx, torch.arange(n_in) // 16)
        assert count_levels(modules[name].weight, 16, g_idx) <= 4 < count_levels(modules[name].weight, 16)
        # the weight is reproduced by the groups g_idx names (act-order with dynamic groups)
        w = modules[name].weight.detach().float()
        scale, zero = qp["scale"][:, g_idx.long()], qp["zero"][:, g_idx.long()]
        assert torch.allclose(dequantize_codes(quantize_codes(w, scale, zero, 2), scale, zero), w, atol=1e-5), name
    assert permuted > 0
    assert ordered.recipe["llm"]["act_order"] is True and ordered.recipe["llm"]["damp"] == 0.05


def _identity_rounding(monkeypatch):
    """AWQ with rounding and clipping switched off: what remains is scaling and folding, which must be exact."""
    def no_round(W, scales, max_val, bits, group_size=128, sym=False):
        Ws = W.float() * scales.float()
        return QuantizedTensor(Ws.to(W.dtype), torch.zeros_like(Ws, dtype=torch.uint8), scales, scales, bits, group_size, sym)

    monkeypatch.setattr(awq_q, "awq_quantize", no_round)
    monkeypatch.setattr(awq_q, "search_clip", lambda x, W, *a, **k: torch.full((W.shape[0], 1), float("inf")))


def test_awq_scales_are_folded_exactly_on_llava(llava_dir, calib, monkeypatch):
    _identity_rounding(monkeypatch)
    fp = logits(fresh(llava_dir), calib.batches[:3])
    m = fresh(llava_dir)
    report = quantize_(m, recipe_from_args({"method": "awq", "bits": 4, "group_size": 16}), calibration=calib, check=False)
    layers = report.calibration["layers"]
    assert layers["model.language_model.layers.0.self_attn.q_proj"]["scale_applied_by"] == "input_layernorm"
    assert layers["model.language_model.layers.0.mlp.down_proj"]["scale_applied_by"] == "mlp.up_proj"
    assert layers["model.vision_tower.encoder.layers.0.mlp.fc2"]["scale_applied_by"] == "input scaling"  # after GELU
    assert hasattr(dict(m.named_modules())["model.multi_modal_projector.linear_2"], INPUT_SCALE_BUFFER)
    assert any(r["ratio"] > 0 for r in layers.values())  # scales were really applied
    torch.testing.assert_close(logits(m, calib.batches[:3]), fp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["blip2_opt", "blip2_t5"])
def test_awq_scales_are_folded_exactly_on_blip2(name, monkeypatch):
    _identity_rounding(monkeypatch)
    torch.manual_seed(0)
    image_tokens = torch.full((1, 4), 127)  # BLIP-2 wants num_query_tokens image tokens
    batches = [{"pixel_values": torch.randn(1, 3, 32, 32), "input_ids": torch.cat([image_tokens, torch.randint(4, 120, (1, 7))], 1)}
               for _ in range(3)]
    if name == "blip2_t5":
        for b in batches:
            b["labels"] = torch.randint(4, 120, (1, 5))
    model = build(name)
    fp = logits(model, batches)
    report = quantize_(model, recipe_from_args({"method": "awq", "bits": 4, "group_size": 16}), calibration=CalibrationSet(batches, "t", 3, 0, 64),
                       check=False)
    assert len(report.calibration["layers"]) == len(report.modules)
    torch.testing.assert_close(logits(model, batches), fp, rtol=1e-4, atol=1e-4)


def test_awq_scores_qkv_scales_on_the_attention_output(llava_dir, calib):
    """llm-awq's module2inspect: the q/k/v scale minimises the error of the attention's
    output (o_proj included), recomputed here by brute force over the grid on a copy of
    the full-precision attention; gate/up are scored on the MLP, o_proj on itself."""
    import copy

    from lmms_quant.quantizers.rtn import fake_quantize

    fp = fresh(llava_dir)
    layer = fp.model.language_model.layers[0]
    seen, xs = [], []
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, a, k, o: seen.append((a, k, o[0])), with_kwargs=True),
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1]))),
    ]
    with torch.no_grad():
        for b in calib.batches:
            fp(**b, use_cache=False)
    for h in hooks:
        h.remove()
    x = torch.cat(xs)
    s_x = x.abs().mean(0)
    names = ("q_proj", "k_proj", "v_proj")
    losses = []
    for i in range(20):
        s = s_x.pow(i / 20).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        attn = copy.deepcopy(layer.self_attn)
        for n in names:
            lin = getattr(attn, n)
            lin.weight.data = fake_quantize(lin.weight.data * s, 3, 16, False) / s
        with torch.no_grad():
            sq = sum(float((attn(*a, **k)[0] - o).pow(2).sum()) for a, k, o in seen)
        losses.append(sq / sum(o.numel() for _, _, o in seen))

    m = fresh(llava_dir)
    report = quantize_(m, recipe_from_args({"method_llm": "awq", "bits_llm": 3, "group_size": 16}), calibration=calib)
    row = report.calibration["layers"]["model.language_model.layers.0.self_attn.q_proj"]
    assert row["scale_scored_on"] == "self_attn output"
    assert row["loss"] == pytest.approx(min(losses), rel=1e-4)
    assert row["ratio"] == losses.index(min(losses)) / 20
    layers = report.calibration["layers"]
    assert layers["model.language_model.layers.0.mlp.up_proj"]["scale_scored_on"] == "mlp output"
    assert layers["model.language_model.layers.0.self_attn.o_proj"]["scale_scored_on"] == "linear outputs"


def test_an_inspect_module_must_hold_its_linears(llava_dir, calib, monkeypatch):
    from lmms_quant import architectures
    from lmms_quant.architectures import AWQMapping

    rows = list(architectures.AWQ_MAPPINGS["LlamaDecoderLayer"])
    rows[0] = AWQMapping(rows[0].prev, rows[0].linears, "mlp")
    monkeypatch.setitem(architectures.AWQ_MAPPINGS, "LlamaDecoderLayer", tuple(rows))
    with pytest.raises(ValueError, match=r"\['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'\] are not inside the inspected module 'mlp'"):
        quantize_(fresh(llava_dir), recipe_from_args({"method_llm": "awq", "bits_llm": 3, "group_size": 16}), calibration=calib)
    rows[0] = AWQMapping(rows[0].prev, rows[0].linears, "attention")
    monkeypatch.setitem(architectures.AWQ_MAPPINGS, "LlamaDecoderLayer", tuple(rows))
    with pytest.raises(ValueError, match=r"scores .* on 'attention', which the block lacks"):
        quantize_(fresh(llava_dir), recipe_from_args({"method_llm": "awq", "bits_llm": 3, "group_size": 16}), calibration=calib)


def test_awq_on_a_whole_model_quantizes_every_target(llava_dir, calib):
    m = fresh(llava_dir)
    report = quantize_(m, recipe_from_args({"method": "awq", "bits": 4, "group_size": 16}), calibration=calib)
    assert {x["component"] for x in report.modules} == {"vit", "connector", "llm"}
    assert len(report.calibration["layers"]) == len(report.modules) == 28


def test_llm_calibration_sees_the_quantized_vit(llava_dir, calib):
    def llm_weights(bits_vit):
        m = fresh(llava_dir)
        quantize_(m, recipe_from_args({"bits_vit": bits_vit, "method_llm": "gptq", "bits_llm": 3}), calibration=calib)
        return dict(m.named_parameters())["model.language_model.layers.0.self_attn.q_proj.weight"].detach().clone()

    assert not torch.equal(llm_weights(16), llm_weights(2))


def test_text_only_calibration_leaves_the_vit_untouched_with_a_warning(llava_dir):
    v = load_vlm(llava_dir)
    before = {k: p.detach().clone() for k, p in v.model.named_parameters()}
    text = build_calibration_set(v.processor, v.family, CalibrationSpec(source="text", samples=6), "cpu", torch.float32)
    report = quantize_(v.model, recipe_from_args({"method": "gptq", "bits": 4}), calibration=text)
    assert any("never reached" in w for w in report.warnings)
    assert {x["component"] for x in report.modules} == {"llm"}
    after = dict(v.model.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("model.vision_tower"))
    assert report.bpw["vit"]["study"] == 16


def test_unmapped_block_is_a_clear_awq_error(llava_dir, calib, monkeypatch):
    from lmms_quant import architectures

    monkeypatch.delitem(architectures.AWQ_MAPPINGS, "CLIPEncoderLayer")
    with pytest.raises(ValueError, match=r"AWQ has no mapping for block class CLIPEncoderLayer \(model\.vision_tower\.encoder\.layers\.0\); mapped classes: "):
        quantize_(fresh(llava_dir), recipe_from_args({"method": "awq", "bits_vit": 4, "group_size": 16}), calibration=calib)


def test_cache_hit_restores_identical_weights_and_corruption_is_recomputed(llava_dir, calib, tmp_path, caplog):
    r = recipe_from_args({"method": "awq", "bits_llm": 3, "bits_vit": 4, "group_size": 16})
    first = quantize_(fresh(llava_dir), r, calibration=calib, cache_dir=tmp_path)
    m2 = fresh(llava_dir)
    second = quantize_(m2, r, calibration=calib, cache_dir=tmp_path)
    assert (first.calibration["cache"], second.calibration["cache"]) == ("miss", "hit")
    assert first.weights_sha256 == second.weights_sha256
    entry = tmp_path / second.calibration["cache_key"] / "tensors.safetensors"
    data = bytearray(entry.read_bytes())
    data[-10] ^= 0xFF
    entry.write_bytes(bytes(data))
    third = quantize_(fresh(llava_dir), r, calibration=calib, cache_dir=tmp_path)
    assert third.calibration["cache"] == "miss" and third.weights_sha256 == first.weights_sha256
    assert "corrupt or partial" in caplog.text
    # a different calibration set is a different entry
    other = quantize_(fresh(llava_dir), r, calibration=CalibrationSet(calib.batches[:5], "world", 5, 1, 512), cache_dir=tmp_path)
    assert other.calibration["cache"] == "miss" and other.calibration["cache_key"] != first.calibration["cache_key"]


def test_qparams_reproduce_every_quantized_weight_also_from_the_cache(llava_dir, calib, tmp_path):
    from lmms_quant.quantizers.rtn import dequantize_codes, quantize_codes

    r = recipe_from_args({"method": "gptq", "bits_llm": 3, "method_vit": "rtn", "bits_vit": 4, "group_size_vit": 16, "sym_vit": False})
    for attempt in ("miss", "hit"):
        m = fresh(llava_dir)
        report = quantize_(m, r, calibration=calib, cache_dir=tmp_path)
        assert (report.calibration["cache"] == attempt) and set(report.qparams) == {x["name"] for x in report.modules}
        modules = dict(m.named_modules())
        for name, qp in report.qparams.items():
            w = modules[name].weight.detach().float()
            g = w.shape[1] if qp["group_size"] == -1 else qp["group_size"]
            scale, zero = qp["scale"].reshape(-1, 1), qp["zero"].reshape(-1, 1)
            wg = w.reshape(-1, g)
            assert torch.allclose(dequantize_codes(quantize_codes(wg, scale, zero, qp["bits"]), scale, zero), wg, atol=1e-5), name


def test_block_reruns_do_not_reuse_the_kv_cache_of_a_causal_lm():
    # A causal LM hands its layers a shared DynamicCache by default; a block re-run
    # after quantization must attend to its own (new) keys and values, not to the
    # ones cached by the first run.
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmms_quant.calibration import _capture_first_block_inputs, _run_block

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    block = model.model.layers[0]
    inputs = _capture_first_block_inputs(model, block, [{"input_ids": torch.randint(0, 64, (2, 12))}])
    before = _run_block(block, inputs)[0]
    with torch.no_grad():
        block.self_attn.v_proj.weight.mul_(0.5)
    after = _run_block(block, inputs)[0]
    args, kwargs = inputs[0]
    with torch.no_grad():
        expected = block(*args, **{**kwargs, "past_key_values": None, "use_cache": False})
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected)
