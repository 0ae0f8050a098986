"""Every method with its default settings runs on every bundled model and plans on every family of
the architecture table; a method with nothing to quantize is refused, never a silent no-op."""

import pytest
import torch

from lmms_quant import quantize_, recipe_from_args
from lmms_quant.calibration_data import build_calibration_set
from lmms_quant.model_wrappers.exits import BackendExit
from lmms_quant.model_wrappers.quant_vlm import QuantVLM
from lmms_quant.models import load_vlm, zoo_models
from lmms_quant.plan import plan
from lmms_quant.recipe import AUTO_GROUP_SIZES, METHODS, CalibrationSpec, QuantSpec, RecipeError
from tests.fixtures.tiny_models import BUILDERS, build


@pytest.mark.parametrize(("width", "group"), [(4096, 128), (576, 64), (192, 64), (160, 32), (32, 32), (100, -1)])
def test_auto_group_size_is_the_first_of_128_64_32_that_divides(width, group):
    assert AUTO_GROUP_SIZES == (128, 64, 32)
    assert QuantSpec(bits=4, method="awq", group_size="auto", sym=False).for_width(width).group_size == group
    assert QuantSpec(bits=4, method="rtn", group_size=16).for_width(width).group_size == 16  # only auto is resolved


def test_an_explicit_group_size_that_does_not_divide_is_still_refused():
    model = build("llava")  # widths 32 and 64
    with pytest.raises(RecipeError, match=r"group_size 128 does not divide the input width 32 of .*; choose a divisor of 32"):
        plan(model, recipe_from_args({"method": "awq", "group_size": 128, "bits": 4}))


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_with_defaults_plans_on_every_family(family, method):
    model = build(family)
    p = plan(model, recipe_from_args({"method": method, "bits": 4}))
    assert p.active and all(isinstance(t.spec.group_size, int) for t in p.active)
    for t in p.active:
        if method == "awq":  # the largest of 128/64/32 that divides this layer's width, else per channel
            divisors = [g for g in (128, 64, 32) if t.shape[1] % g == 0]
            assert t.spec.group_size == (divisors[0] if divisors else -1), (t.name, t.shape)
        else:
            assert t.spec.group_size == {"uniform": 0, "rtn": -1, "gptq": -1}[method]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_with_defaults_runs_on_every_bundled_model(method, one_thread):
    for name in zoo_models():
        v = load_vlm(name)
        recipe = recipe_from_args({"method": method, "bits": 3})
        calib = None
        if recipe.needs_calibration:
            calib = build_calibration_set(v.processor, v.family, CalibrationSpec(source="world", samples=2, seed=0), "cpu",
                                          torch.float32)
        report = quantize_(v.model, recipe, calibration=calib)
        assert report.modules, name
        if method == "awq" and name != "tiny-random-llava":
            widths = {m["name"]: m["group_size"] for m in report.modules}
            assert set(widths.values()) <= {128, 64, 32}, (name, set(widths.values()))


def test_a_method_without_a_bit_width_is_refused_naming_the_bits_keys(monkeypatch, tmp_path):
    import lmms_quant.model_wrappers.quant_vlm as qv

    monkeypatch.setattr(qv, "load_vlm", lambda *a, **k: pytest.fail("loaded a model for a run that quantizes nothing"))
    with pytest.raises(BackendExit, match=r"calib_source, method given but no component has a bit width, so nothing would be "
                                          r"quantized; set bits \(all components\) or bits_vit / bits_connector / bits_llm") as info:
        QuantVLM(method="gptq", calib_source=str(tmp_path))
    assert info.value.code == 2
    with pytest.raises(BackendExit, match=r"calib_source '/no/such/file.jsonl' is neither one of auto, world, task, text"):
        QuantVLM(method="gptq", bits=4, calib_source="/no/such/file.jsonl")
    with pytest.raises(BackendExit, match=r"method given but no component has a bit width"):
        QuantVLM(method="awq")
