"""Component discovery on every family, and that quantization touches exactly the planned modules."""

import re

import pytest
import torch
from torch import nn

from lmms_quant import QuantizationCheckError, RecipeError, quantize_, recipe_from_args
from lmms_quant.apply import count_levels, verify
from lmms_quant.plan import UnsupportedModelError, plan, resolve_components
from lmms_quant.recipe import load_recipe
from tests.fixtures.tiny_models import BUILDERS, build

# family fixture -> (components present, expected block counts, a module path in each component's first block)
EXPECTED = {
    "blip2_opt": {"vit": (2, "vision_model.encoder.layers.0.self_attn.qkv"), "connector": (2, "qformer.encoder.layer.0.attention.attention.query"),
                  "llm": (2, "language_model.model.decoder.layers.0.fc1")},
    "blip2_t5": {"vit": (2, "vision_model.encoder.layers.0.mlp.fc1"), "connector": (2, "qformer.encoder.layer.0.crossattention.attention.key"),
                 "llm": (4, "language_model.encoder.block.0.layer.0.SelfAttention.q")},
    "blip2_itm": {"vit": (2, "vision_model.encoder.layers.0.self_attn.projection"), "connector": (2, "qformer.encoder.layer.0.intermediate_query.dense")},
    "llava": {"vit": (2, "model.vision_tower.encoder.layers.0.self_attn.q_proj"), "connector": (1, "model.multi_modal_projector.linear_1"),
              "llm": (2, "model.language_model.layers.0.mlp.gate_proj")},
    "llava_next": {"vit": (2, "model.vision_tower.encoder.layers.1.mlp.fc2"), "connector": (1, "model.multi_modal_projector.linear_2"),
                   "llm": (2, "model.language_model.layers.1.self_attn.o_proj")},
    "llava_onevision": {"vit": (2, "model.vision_tower.encoder.layers.0.self_attn.k_proj"),
                        "connector": (1, "model.multi_modal_projector.linear_1"), "llm": (2, "model.language_model.layers.0.self_attn.v_proj")},
    "qwen2_vl": {"vit": (2, "model.visual.blocks.0.attn.qkv"), "connector": (1, "model.visual.merger.mlp.0"),
                 "llm": (2, "model.language_model.layers.0.mlp.down_proj")},
    "qwen2_5_vl": {"vit": (2, "model.visual.blocks.1.mlp.gate_proj"), "connector": (1, "model.visual.merger.mlp.2"),
                   "llm": (2, "model.language_model.layers.1.mlp.up_proj")},
    "idefics3": {"vit": (2, "model.vision_model.encoder.layers.0.self_attn.out_proj"), "connector": (1, "model.connector.modality_projection.proj"),
                 "llm": (2, "model.text_model.layers.0.self_attn.q_proj")},
    "smolvlm": {"vit": (2, "model.vision_model.encoder.layers.1.mlp.fc1"), "connector": (1, "model.connector.modality_projection.proj"),
                "llm": (2, "model.text_model.layers.1.mlp.down_proj")},
    "clip": {"vit": (2, "vision_model.encoder.layers.0.self_attn.q_proj"), "connector": (2, "visual_projection"),
             "llm": (2, "text_model.encoder.layers.0.mlp.fc1")},
    "siglip": {"vit": (2, "vision_model.encoder.layers.0.mlp.fc2"), "connector": (2, "vision_model.head.mlp.fc1"),
               "llm": (2, "text_model.encoder.layers.1.self_attn.q_proj")},
}


def test_every_supported_family_has_a_fixture():
    from lmms_quant.architectures import ARCHITECTURES

    covered = {type(build(n)).__name__ for n in BUILDERS}
    assert covered == set(ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_component_discovery(name):
    model = build(name)
    _, _, comps = resolve_components(model)
    assert set(comps) == set(EXPECTED[name])
    qplan = plan(model, recipe_from_args({}))
    names = {t.name for t in qplan.targets}
    for comp, (n_blocks, example) in EXPECTED[name].items():
        assert len(comps[comp].blocks) == n_blocks, comp
        assert example in names, (comp, example)
        assert next(t for t in qplan.targets if t.name == example).component == comp
    # no Linear is claimed by two components, and every target is a Linear
    assert len(names) == len(qplan.targets)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[t.name], nn.Linear) for t in qplan.targets)
    # lm_head and embeddings are never targets by default
    assert not any(re.search(r"lm_head|embed", t.name) for t in qplan.targets)


def _changed(before, model):
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("name", ["blip2_opt", "llava", "qwen2_vl", "idefics3"])
@pytest.mark.parametrize("component", ["vit", "connector", "llm"])
def test_quantization_touches_exactly_the_component(name, component):
    model = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = quantize_(model, recipe_from_args({f"bits_{component}": 3}))
    planned = {m["name"] + ".weight" for m in report.modules}
    assert planned and all(m["component"] == component for m in report.modules)
    assert _changed(before, model) == planned
    assert report.components[component]["n_quantized"] == len(planned)
    for m in report.modules:
        w = dict(model.named_modules())[m["name"]].weight
        assert count_levels(w, -1) <= 8


def test_qwen2_vl_merger_is_connector_not_vit():
    model = build("qwen2_vl")
    qplan = plan(model, recipe_from_args({}))
    assert {t.component for t in qplan.targets if ".merger." in t.name} == {"connector"}
    assert all(qplan.param_owner[n] == "connector" for n in qplan.param_owner if ".merger." in n)
    assert all(qplan.param_owner[n] == "vit" for n in qplan.param_owner if n.startswith("model.visual.blocks"))


def test_blocks_layers_overrides_and_skip():
    model = build("llava")
    r = recipe_from_args({"bits_llm": 4, "blocks_llm": "1", "layers_llm": "attn", "bits_vit": 3, "layers_vit": "mlp"})
    active = {t.name: t for t in plan(model, r).active}
    assert set(active) == {
        *(f"model.language_model.layers.1.self_attn.{p}_proj" for p in "qkvo"),
        *(f"model.vision_tower.encoder.layers.{i}.mlp.fc{j}" for i in (0, 1) for j in (1, 2)),
    }


def test_overrides_and_skip_from_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "bits: 4\n"
        "overrides:\n"
        "  - {pattern: 'layers\\.0\\.mlp\\.down_proj', bits: 8}\n"
        "  - {pattern: 'multi_modal_projector', skip: true}\n"
        "skip: ['vision_tower.encoder.layers.1']\n"
    )
    qplan = plan(build("llava"), load_recipe(path))
    active = {t.name: t.spec.bits for t in qplan.active}
    assert active["model.language_model.layers.0.mlp.down_proj"] == 8
    assert active["model.language_model.layers.1.mlp.down_proj"] == 4
    assert not any("multi_modal_projector" in n or "vision_tower.encoder.layers.1." in n for n in active)
    assert "model.vision_tower.encoder.layers.0.mlp.fc1" in active


def test_patterns_that_match_nothing_are_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("bits: 4\noverrides: [{pattern: 'no_such_layer', bits: 8}]\n")
    with pytest.raises(RecipeError, match=r"override pattern 'no_such_layer' matches no quantizable Linear of LlavaForConditionalGeneration"):
        plan(build("llava"), load_recipe(path))


def test_group_size_that_does_not_divide_is_refused_before_any_weight_changes():
    model = build("llava")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=r"group_size 24 does not divide the input width (32|64) of model\.vision_tower"):
        quantize_(model, recipe_from_args({"bits_llm": 4, "bits_vit": 4, "group_size": 24}))
    assert _changed(before, model) == set()


def test_component_absent_from_model_is_refused():
    with pytest.raises(RecipeError, match=r"Blip2ForImageTextRetrieval has no 'llm' component, but the recipe quantizes it; components here: vit, connector"):
        plan(build("blip2_itm"), recipe_from_args({"bits_llm": 4}))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.decoder = nn.Sequential(nn.Linear(8, 8))


def test_unsupported_class_error_lists_supported_and_explains_patterns(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"(?s)Custom is not in the architecture table; supported: .*Blip2ForConditionalGeneration.*component_patterns"):
        plan(Custom(), recipe_from_args({"bits_llm": 4}))
    path = tmp_path / "r.yaml"
    path.write_text("bits: 4\ncomponent_patterns: {vit: '^encoder\\.', llm: '^decoder\\.'}\n")
    model = Custom()
    report = quantize_(model, load_recipe(path))
    assert {m["name"] for m in report.modules} == {"encoder.0", "encoder.1", "decoder.0"}
    assert {m["component"] for m in report.modules} == {"vit", "llm"}


def test_uniform_quantizes_bias_per_tensor():
    model = build("blip2_opt")
    fc1 = dict(model.named_modules())["language_model.model.decoder.layers.0.fc1"]
    with torch.no_grad():
        fc1.bias.copy_(torch.randn_like(fc1.bias))  # random init leaves biases at zero
    assert torch.unique(fc1.bias).numel() > 8
    report = quantize_(model, recipe_from_args({"bits_llm": 3, "method_llm": "uniform"}))
    assert count_levels(fc1.weight, 0) <= 8
    assert torch.unique(fc1.bias).numel() <= 8
    assert report.modules[0]["group_size"] == 0
    # rtn leaves biases alone unless asked
    model = build("blip2_opt")
    fc1 = dict(model.named_modules())["language_model.model.decoder.layers.0.fc1"]
    with torch.no_grad():
        fc1.bias.copy_(torch.randn_like(fc1.bias))
    bias = fc1.bias.detach().clone()
    quantize_(model, recipe_from_args({"bits_llm": 3}))
    assert torch.equal(fc1.bias, bias)


def test_verify_fails_loudly_on_an_unquantized_weight():
    model = build("llava")
    r = recipe_from_args({"bits_llm": 2})
    quantize_(model, r)
    target = dict(model.named_modules())["model.language_model.layers.0.mlp.up_proj"]
    with torch.no_grad():
        target.weight.add_(torch.randn_like(target.weight) * 1e-3)  # as if a tool forgot to quantize it
    with pytest.raises(QuantizationCheckError, match=r"model\.language_model\.layers\.0\.mlp\.up_proj: \d+ distinct values in one group, more than 2\^2 = 4"):
        verify(model, plan(model, r))


def test_report_lists_modules_counts_shares_and_is_deterministic():
    r = recipe_from_args({"bits_llm": 4, "bits_vit": 4})
    a, b = build("llava", seed=1), build("llava", seed=1)
    ra, rb = quantize_(a, r), quantize_(b, r)
    assert ra.weights_sha256 == rb.weights_sha256
    rc = quantize_(build("llava", seed=2), r)
    assert rc.weights_sha256 != ra.weights_sha256
    d = ra.to_dict()
    assert d["components"]["llm"]["n_quantized"] == 2 * 7
    assert d["components"]["vit"]["n_quantized"] == 2 * 6
    total = d["bpw"]["model"]["params"]
    assert d["components"]["llm"]["share_of_model_params"] == pytest.approx(d["components"]["llm"]["quantized_params"] / total)
    assert d["recipe"]["llm"]["bits"] == 4


def test_global_bits_skip_absent_components_but_explicit_ones_do_not():
    report = quantize_(build("blip2_itm"), recipe_from_args({"bits": 4}))
    assert {m["component"] for m in report.modules} == {"vit", "connector"}
