"""Recipe parsing, precedence and every validation error."""

import pytest

from lmms_quant.recipe import ComponentRecipe, QuantSpec, Recipe, RecipeError, load_recipe, recipe_from_args


def test_flat_model_args_and_method_defaults():
    r = recipe_from_args({"bits_llm": 3, "bits_vit": 4})
    assert r.llm.spec == QuantSpec(bits=3, method="rtn", group_size=-1, sym=True)
    assert r.vit.spec.bits == 4 and r.connector.spec.bits == 16
    awq = recipe_from_args({"bits": 4, "method": "awq"})
    assert (awq.vit.spec.group_size, awq.vit.spec.sym) == ("auto", False)  # 128, 64 or 32 per layer width
    uni = recipe_from_args({"bits_llm": 6, "method_llm": "uniform"})
    assert (uni.llm.spec.group_size, uni.llm.spec.sym, uni.llm.spec.quantize_bias) == (0, False, True)


def test_component_keys_override_global_keys():
    r = recipe_from_args({"bits": 4, "bits_llm": 3, "group_size": 64, "group_size_vit": -1, "sym_llm": False})
    assert (r.vit.spec.bits, r.vit.spec.group_size) == (4, -1)
    assert (r.llm.spec.bits, r.llm.spec.group_size, r.llm.spec.sym) == (3, 64, False)
    assert r.connector.spec.bits == 4


def test_auto_typed_strings_are_accepted():
    r = recipe_from_args({"bits_llm": "3", "sym": "false", "group_size": "128"})
    assert r.llm.spec.bits == 3 and r.llm.spec.sym is False and r.llm.spec.group_size == 128


@pytest.mark.parametrize(
    "args, message",
    [
        ({"bitz_llm": 3}, r"unknown recipe key\(s\) \['bitz_llm'\]; valid: bits, method"),
        ({"bits_llm": 9}, r"bit width 9 is out of range; valid: 2, 3, 4, 5, 6, 7, 8, 16"),
        ({"bits_vit": 1}, r"bit width 1 is out of range"),
        ({"bits_vit": "four"}, r"bit width must be an integer, got 'four'"),
        ({"method": "hqq"}, r"unknown method 'hqq'; valid: uniform, rtn, gptq, awq"),
        ({"method_llm": "gptqq"}, r"unknown method 'gptqq'"),
        ({"sym": "maybe"}, r"expected true or false, got 'maybe'"),
        ({"group_size": -5, "bits": 4}, r"group_size must be -1 \(per channel\), 0 \(per tensor\)"),
        ({"bits": 4, "method": "uniform", "group_size": 128}, r"per-tensor asymmetric"),
        ({"blocks_vit": "front+back", "bits_vit": 4}, r"block selector 'back' is invalid; valid: front, middle, end"),
        ({"layers_llm": "ffn", "bits_llm": 4}, r"layers must be one of all, attn, mlp"),
        ({"calib_samples": 0}, r"calib_samples must be >= 1"),
        ({"recipe": "/nonexistent/recipe.yaml"}, r"recipe file '/nonexistent/recipe.yaml' does not exist"),
        ({"bits_vit": 4, "act_order_vit": True}, r"act_order, static_groups and damp are options of method 'gptq' only.*'rtn'"),
        ({"bits": 4, "method": "awq", "damp": 0.1}, r"damp are options of method 'gptq' only, but no component uses it \(methods: awq\)"),
        ({"bits": 4, "method": "gptq", "damp": 0}, r"damp must be a number in \(0, 1\).*got 0.0"),
        ({"bits": 4, "method": "gptq", "damp": "lots"}, r"damp: expected a number in \(0, 1\), got 'lots'"),
        ({"bits": 4, "method": "gptq", "act_order": "sometimes"}, r"act_order: expected true or false, got 'sometimes'"),
    ],
)
def test_every_recipe_error_names_problem_and_choices(args, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_args(args)


def test_recipe_file_with_overrides_blocks_and_skip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        """
bits: 4
vit: {bits: 3, blocks: [front, end], layers: mlp}
llm: {method: awq, group_size: 64}
overrides:
  - pattern: 're:layers\\.0\\.self_attn\\.q_proj'
    bits: 8
  - pattern: 'fc2'
    method: uniform
skip: ['lm_head']
calibration: {samples: 16, seed: 3}
"""
    )
    r = load_recipe(path)
    assert r.vit.spec.bits == 3 and r.vit.blocks == ("front", "end") and r.vit.layers == "mlp"
    assert r.llm.spec.method == "awq" and r.llm.spec.group_size == 64 and r.llm.spec.sym is False
    assert r.overrides[0].pattern == r"layers\.0\.self_attn\.q_proj" and r.overrides[0].bits == 8
    assert r.calibration.samples == 16 and r.calibration.seed == 3
    # flat keys override the file
    r2 = recipe_from_args({"recipe": str(path), "bits_vit": 2})
    assert r2.vit.spec.bits == 2 and r2.vit.blocks == ("front", "end")
    # a rule switching method takes that method's defaults for what it does not set
    assert r.overrides[1].apply(r.vit.spec) == QuantSpec(bits=3, method="uniform", group_size=0, sym=False, quantize_bias=True)


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vit: {bits: 4, colour: red}\n")
    with pytest.raises(RecipeError, match=r"vit: unknown key\(s\) \['colour'\]; valid: bits, method"):
        load_recipe(bad)
    bad.write_text("overrides: [{bits: 4}]\n")
    with pytest.raises(RecipeError, match=r"overrides\[0\] must be a mapping with a 'pattern' key"):
        load_recipe(bad)
    bad.write_text("overrides: [{pattern: '(', bits: 4}]\n")
    with pytest.raises(RecipeError, match=r"not a valid regex"):
        load_recipe(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match=r"must hold a mapping, got list"):
        load_recipe(bad)
    bad.write_text("vit: {bits: [\n")
    with pytest.raises(RecipeError, match=r"is not valid YAML"):
        load_recipe(bad)


def test_round_trip_through_dict():
    r = recipe_from_args({"bits_llm": 3, "method_llm": "gptq", "bits_vit": 4, "blocks_vit": "0-5", "calib_samples": 32, "seed": 7})
    again = Recipe.from_dict(r.to_dict())
    assert again == r
    g = recipe_from_args({"bits": 4, "method_llm": "gptq", "act_order_llm": "true", "static_groups_llm": True, "damp_llm": "0.05"})
    assert Recipe.from_dict(g.to_dict()) == g and g.to_dict()["llm"]["act_order"] is True


def test_gptq_options_global_keys_reach_only_gptq_components():
    r = recipe_from_args({"bits": 4, "method_llm": "gptq", "method_vit": "awq", "act_order": "true", "damp": "0.05"})
    assert (r.llm.spec.act_order, r.llm.spec.static_groups, r.llm.spec.damp) == (True, False, 0.05)
    assert (r.vit.spec.act_order, r.vit.spec.damp) == (False, 0.01) and r.vit.spec.method == "awq"
    assert r.connector.spec == QuantSpec(bits=4, method="rtn")
    # an override may turn act-order on for some GPTQ layers only
    f = Recipe.from_dict({"bits": 3, "method": "gptq", "overrides": [{"pattern": r"mlp\.", "act_order": True}]})
    assert f.overrides[0].apply(f.llm.spec).act_order is True and f.llm.spec.act_order is False


def test_block_selection_thirds_and_ranges():
    c = ComponentRecipe(blocks=("front",))
    assert c.block_indices(12) == set(range(0, 4))
    assert ComponentRecipe(blocks=("middle",)).block_indices(12) == set(range(4, 8))
    assert ComponentRecipe(blocks=("end",)).block_indices(39) == set(range(26, 39))
    assert ComponentRecipe(blocks=("0-2", "7")).block_indices(10) == {0, 1, 2, 7}
    with pytest.raises(RecipeError, match=r"block range '5-12' is outside the component's 10 blocks \(0-9\)"):
        ComponentRecipe(blocks=("5-12",)).block_indices(10)


def test_noop_and_needs_calibration():
    assert recipe_from_args({}).is_noop
    assert not recipe_from_args({"bits_llm": 4}).is_noop
    assert recipe_from_args({"bits_llm": 4, "method_llm": "gptq"}).needs_calibration
    assert not recipe_from_args({"bits_llm": 4}).needs_calibration
