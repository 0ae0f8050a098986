"""Bits-per-weight arithmetic: hand-computed cases and the study's published figures."""

import pytest
import torch
import transformers as T

from lmms_quant import plan, recipe_from_args
from lmms_quant.bpw import bits_per_weight
from tests.fixtures.tiny_models import build


def blip2_opt_2_7b():
    """Salesforce/blip2-opt-2.7b's shapes (HF config: OPT vocabulary padded to 50304), on the meta device."""
    text = T.OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, vocab_size=50304,
                       word_embed_proj_dim=2560, max_position_embeddings=2048)
    with torch.device("meta"):
        return T.Blip2ForConditionalGeneration(T.Blip2Config(vision_config={}, qformer_config={}, text_config=text, num_query_tokens=32))


def llava_1_5_7b():
    """llava-hf/llava-1.5-7b-hf's shapes on the meta device."""
    vision = T.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
                                patch_size=14, projection_dim=768)
    text = T.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32064)
    with torch.device("meta"):
        return T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000))


def test_blip2_opt_2_7b_matches_the_study():
    qplan = plan(blip2_opt_2_7b(), recipe_from_args({"bits": 4}))
    bpw = bits_per_weight(qplan)
    # parameter counts published with the study (FACTS.md)
    assert bpw["model"]["params"] == 3_744_761_856
    assert bpw["vit"]["quantized_params"] == 984_023_040
    assert bpw["connector"]["quantized_params"] == 104_988_672
    assert bpw["llm"]["quantized_params"] == 2_516_582_400
    assert round(bpw["model"]["study"], 2) == 4.45
    # storage adds one fp16 scale per output channel (symmetric: no zero point)
    channels = sum(t.shape[0] for t in qplan.active)
    quantized = sum(t.shape[0] * t.shape[1] for t in qplan.active)
    other = 3_744_761_856 - quantized
    expected = (4 * quantized + 16 * channels + 32 * other) / 3_744_761_856  # meta tensors are fp32: 32 bits each
    assert bpw["model"]["storage"] == pytest.approx(expected, rel=1e-12)


def test_llava_1_5_7b_matches_the_study():
    bpw = bits_per_weight(plan(llava_1_5_7b(), recipe_from_args({"bits_vit": 4, "bits_llm": 4})))
    assert bpw["model"]["params"] == 7_063_427_072
    assert bpw["vit"]["quantized_params"] == 301_989_888
    assert bpw["llm"]["quantized_params"] == 6_476_005_376
    # The counts match the study exactly; its formula then gives 4.4849, which the study prints as 4.49.
    assert bpw["model"]["study"] == pytest.approx(4.4849, abs=1e-4)
    assert abs(bpw["model"]["study"] - 4.49) < 0.01


def test_mixed_bits_by_hand():
    model = build("llava")
    r = recipe_from_args({"bits_llm": 3, "bits_vit": 8, "group_size_vit": 16, "sym_vit": False})
    qplan = plan(model, r)
    bpw = bits_per_weight(qplan)
    total = sum(p.numel() for p in model.parameters())
    # tiny llava: 2 ViT layers of 4 x (32x32) attention + 32x64 + 64x32 MLP; 2 Llama layers of 4 x (32x32) + 3 x (32x64)
    vit_q = 2 * (4 * 32 * 32 + 2 * 32 * 64)
    llm_q = 2 * (4 * 32 * 32 + 3 * 32 * 64)
    assert bpw["vit"]["quantized_params"] == vit_q and bpw["llm"]["quantized_params"] == llm_q
    assert bpw["model"]["study"] == pytest.approx((8 * vit_q + 3 * llm_q + 16 * (total - vit_q - llm_q)) / total)
    # storage: ViT groups of 16 columns with fp16 scale and 8-bit zero; LLM per channel fp16 scale; the rest fp32
    vit_groups = vit_q // 16
    llm_rows = 2 * (4 * 32 + 2 * 64 + 32)
    storage = 8 * vit_q + vit_groups * (16 + 8) + 3 * llm_q + llm_rows * 16 + 32 * (total - vit_q - llm_q)
    assert bpw["model"]["storage"] == pytest.approx(storage / total)
    # per component, the untouched connector stays at 16 (study) and 32 (fp32 storage)
    assert bpw["connector"]["study"] == 16 and bpw["connector"]["storage"] == 32


def test_uniform_bias_counts_in_storage_only():
    model = build("blip2_opt")
    bpw = bits_per_weight(plan(model, recipe_from_args({"bits_llm": 4, "method_llm": "uniform"})))
    bpw_nobias = bits_per_weight(plan(model, recipe_from_args({"bits_llm": 4, "method_llm": "uniform", "quantize_bias_llm": False})))
    assert bpw["llm"]["study"] == bpw_nobias["llm"]["study"]
    assert bpw["llm"]["storage"] < bpw_nobias["llm"]["storage"]


def test_all_sixteen_is_sixteen():
    bpw = bits_per_weight(plan(build("qwen2_vl"), recipe_from_args({})))
    assert bpw["model"]["study"] == 16 and bpw["model"]["quantized_params"] == 0
