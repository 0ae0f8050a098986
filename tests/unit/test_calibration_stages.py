"""A grid that calibrates once per stage: prefix sharing (exact) and calib_mode=fp_inputs (GPTQ statistics of
the full-precision model, cached per component)."""

import pytest
import torch

from lmms_quant import quantize_, recipe_from_args
from lmms_quant.calibration_data import build_calibration_set
from lmms_quant.models import load_vlm
from lmms_quant.quantizers import gptq as gptq_q
from lmms_quant.recipe import CalibrationSpec, RecipeError
from tests.fixtures.tiny_models import save_tiny_llava


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return str(save_tiny_llava(tmp_path_factory.mktemp("m") / "tiny-llava", seed=5))


@pytest.fixture(scope="module")
def calib(llava_dir):
    v = load_vlm(llava_dir)
    return build_calibration_set(v.processor, v.family, CalibrationSpec(source="world", samples=8, seed=2), "cpu", torch.float32)


def fresh(llava_dir):
    return load_vlm(llava_dir).model


def gptq(**bits):
    return recipe_from_args({"method": "gptq", "group_size": 16, **bits})


def test_a_shared_vision_stage_gives_exactly_the_weights_of_a_separate_run(llava_dir, calib, tmp_path, monkeypatch):
    alone = quantize_(fresh(llava_dir), gptq(bits_vit=4, bits_llm=4), calibration=calib)  # no cache: nothing shared
    quantize_(fresh(llava_dir), gptq(bits_vit=4, bits_llm=3), calibration=calib, cache_dir=tmp_path)  # writes the ViT stage

    solved = []
    original = gptq_q.gptq_quantize
    monkeypatch.setattr(gptq_q, "gptq_quantize", lambda W, H, *a, **k: solved.append(W.shape) or original(W, H, *a, **k))
    model = fresh(llava_dir)
    shared = quantize_(model, gptq(bits_vit=4, bits_llm=4), calibration=calib, cache_dir=tmp_path)
    assert shared.calibration["stage"]["restored"] == ["vit"]
    assert shared.weights_sha256 == alone.weights_sha256  # bit for bit, the LLM included
    n_llm = sum(t["component"] == "llm" for t in shared.modules)
    assert len(solved) == n_llm  # only the LLM was solved; the ViT came from the stage
    assert shared.calibration["layers"].keys() == alone.calibration["layers"].keys()
    assert all(shared.qparams[n]["bits"] == alone.qparams[n]["bits"] for n in alone.qparams)

    other_vit = quantize_(fresh(llava_dir), gptq(bits_vit=3, bits_llm=4), calibration=calib, cache_dir=tmp_path)
    assert "stage" not in other_vit.calibration  # another ViT recipe: nothing to share


def test_a_stage_is_keyed_by_its_calibration_set(llava_dir, calib, tmp_path):
    from lmms_quant.calibration import CalibrationSet

    quantize_(fresh(llava_dir), gptq(bits_vit=4, bits_llm=3), calibration=calib, cache_dir=tmp_path)
    fewer = CalibrationSet(calib.batches[:4], "world", 4, 2, 512)
    run = quantize_(fresh(llava_dir), gptq(bits_vit=4, bits_llm=4), calibration=fewer, cache_dir=tmp_path)
    assert "stage" not in run.calibration


def test_fp_inputs_solves_every_layer_on_full_precision_hessians(llava_dir, calib, tmp_path):
    recipe = recipe_from_args({"method": "gptq", "group_size": 16, "bits_vit": 4, "bits_llm": 3, "calib_mode": "fp_inputs"})
    quantized = fresh(llava_dir)
    report = quantize_(quantized, recipe, calibration=calib, cache_dir=tmp_path)
    assert report.calibration["mode"] == "fp_inputs"

    # by hand: Hessians of the untouched model on the same batches, then GPTQ layer by layer
    model = fresh(llava_dir)
    modules = dict(model.named_modules())
    names = [m["name"] for m in report.modules]
    H = {n: [gptq_q.make_empty_hessian(modules[n].in_features), 0] for n in names}
    hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: H.__setitem__(n, list(gptq_q.accumulate_hessian(*H[n], a[0]))))
             for n in names]
    with torch.no_grad():
        for b in calib.batches:
            model(**b)
    for h in hooks:
        h.remove()
    bits = {m["name"]: m["bits"] for m in report.modules}
    for n in names:
        expected = gptq_q.gptq_quantize(modules[n].weight.data, H[n][0], bits[n], 16, True).weight
        assert torch.equal(dict(quantized.named_modules())[n].weight.data, expected), n


def test_fp_inputs_statistics_are_computed_once_per_component_and_calibration_set(llava_dir, calib, tmp_path, monkeypatch):
    from lmms_quant import calibration

    forwards = []
    original = calibration.fp_statistics

    def counting(model, qplan, calib_set, stages=None):
        handle = model.register_forward_pre_hook(lambda *a: forwards.append(1))
        try:
            return original(model, qplan, calib_set, stages)
        finally:
            handle.remove()

    monkeypatch.setattr("lmms_quant.apply.fp_statistics", counting)
    for llm_bits in (2, 3, 4):
        r = recipe_from_args({"method": "gptq", "group_size": 16, "bits_vit": 4, "bits_llm": llm_bits, "calib_mode": "fp_inputs"})
        quantize_(fresh(llava_dir), r, calibration=calib, cache_dir=tmp_path)
    assert len(forwards) == len(calib.batches)  # one pass over the batches, for the first grid point only
    r = recipe_from_args({"method": "gptq", "group_size": 16, "bits_vit": 3, "bits_llm": 2, "calib_mode": "fp_inputs"})
    quantize_(fresh(llava_dir), r, calibration=calib, cache_dir=tmp_path)
    assert len(forwards) == len(calib.batches)  # the ViT's bit width changes nothing: the statistics are full precision


@pytest.mark.parametrize("args, message", [
    ({"method": "awq", "bits": 4, "calib_mode": "fp_inputs"}, "AWQ searches its scales"),
    ({"method": "gptq", "bits": 4, "calib_mode": "parallel"}, "calib_mode 'parallel' is unknown; valid: sequential, fp_inputs"),
])
def test_calib_mode_errors_name_the_choices(args, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_args(args)


def test_fp_inputs_is_refused_when_the_hessians_would_not_fit(llava_dir, calib, monkeypatch):
    from lmms_quant.errors import ConfigurationError

    monkeypatch.setenv("LMMS_QUANT_FP_INPUTS_MAX_GIB", "1e-9")  # about 1 byte: less than any Hessian
    recipe = recipe_from_args({"method": "gptq", "group_size": 16, "bits_llm": 3, "calib_mode": "fp_inputs"})
    model = fresh(llava_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigurationError, match=r"fp_inputs holds every GPTQ layer's Hessian at once: .* use calib_mode=sequential"):
        quantize_(model, recipe, calibration=calib)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before any work
