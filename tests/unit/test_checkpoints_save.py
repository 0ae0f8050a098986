"""lmms-quant-packed checkpoints: real storage, bit-identical reload, metadata, and the refusals."""

import json

import pytest
import torch

from lmms_quant import quantize_, recipe_from_args
from lmms_quant.apply import weights_hash
from lmms_quant.calibration import INPUT_SCALE_BUFFER
from lmms_quant.calibration_data import build_calibration_set
from lmms_quant.checkpoints import CheckpointError, CheckpointShapeError, load_quantized, read_packed_layers, save_quantized
from lmms_quant.checkpoints.save import INFO_FILE, WEIGHTS_FILE, hash_names
from lmms_quant.models import load_vlm
from lmms_quant.recipe import CalibrationSpec
from tests.fixtures.tiny_models import save_tiny_llava


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return str(save_tiny_llava(tmp_path_factory.mktemp("m") / "tiny-llava", seed=5))


def _inputs(vlm):
    from PIL import Image

    img = Image.new("RGB", (32, 32), (200, 30, 30))
    return vlm.processor(text=["USER: <image>\nwhat colour is the shape? ASSISTANT:"], images=[img], return_tensors="pt")


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("args", [
    {"bits_llm": 3, "bits_vit": 4},                                   # per channel sym, two widths
    {"bits": 2, "group_size": 16, "sym": False},                      # grouped asym, 2 bits
    {"method": "uniform", "bits_vit": 5, "bits_llm": 8},              # per tensor asym (the study's baseline)
    {"bits_llm": 6, "group_size_llm": 32, "bits_connector": 7},
])
def test_reload_is_bit_identical(llava_dir, tmp_path, args):
    v = load_vlm(llava_dir)
    report = quantize_(v.model, recipe_from_args(args))
    inputs = _inputs(v)
    out = save_quantized(v.model, report, tmp_path / "q", v.processor)
    model, processor, rd = load_quantized(out)
    names, extra = hash_names(model, rd)
    assert weights_hash(model, names, extra) == report.weights_sha256 == rd["weights_sha256"]
    assert torch.equal(_logits(model, inputs), _logits(v.model, inputs))
    assert rd["recipe"] == report.recipe and rd["bpw"] == report.bpw
    assert processor is not None and type(processor).__name__ == type(v.processor).__name__
    gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, v.model.generate(**inputs, max_new_tokens=4, do_sample=False))


def test_storage_is_really_low_bit(llava_dir, tmp_path):
    v = load_vlm(llava_dir)
    report = quantize_(v.model, recipe_from_args({"bits": 3, "group_size": 32, "sym": False}))
    save_quantized(v.model, report, tmp_path / "q")
    layers, info = read_packed_layers(tmp_path / "q")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / WEIGHTS_FILE), "pt") as f:
        for name, q in layers.items():
            words = f.get_slice(f"{name}.qweight").get_shape()[0]
            assert words * 32 == pytest.approx(q.codes.numel() * 3, abs=31)  # 3 bits per weight, no padding per row
            assert f.get_slice(f"{name}.qzeros").get_shape()[0] == -(-q.zero.numel() * 3 // 32)
            assert f"{name}.weight" not in f.keys()
    assert json.loads((tmp_path / "q" / INFO_FILE).read_text())["report"]["recipe"] == report.recipe


def test_awq_input_scales_and_folded_norms_survive(llava_dir, tmp_path):
    v = load_vlm(llava_dir)
    calib = build_calibration_set(v.processor, v.family, CalibrationSpec(source="world", samples=2, seed=1), "cpu", torch.float32)
    recipe = recipe_from_args({"method": "awq", "bits_vit": 4, "bits_connector": 4, "group_size": 16})
    report = quantize_(v.model, recipe, calibration=calib)
    scaled = [n for n, m in v.model.named_modules() if hasattr(m, INPUT_SCALE_BUFFER)]
    assert scaled, "the tiny LLaVA's vision fc2 and projector get explicit input scales"
    save_quantized(v.model, report, tmp_path / "awq", v.processor)
    model, _, rd = load_quantized(tmp_path / "awq")
    mods = dict(model.named_modules())
    for n in scaled:
        assert torch.equal(getattr(mods[n], INPUT_SCALE_BUFFER), getattr(dict(v.model.named_modules())[n], INPUT_SCALE_BUFFER))
    names, extra = hash_names(model, rd)
    assert extra and weights_hash(model, names, extra) == report.weights_sha256
    inputs = _inputs(v)
    assert torch.equal(_logits(model, inputs), _logits(v.model, inputs))


def test_bf16_model_reloads_bit_identical(llava_dir, tmp_path):
    v = load_vlm(llava_dir, dtype="bfloat16")
    report = quantize_(v.model, recipe_from_args({"bits": 8, "sym": False}))
    save_quantized(v.model, report, tmp_path / "b")
    model, _, rd = load_quantized(tmp_path / "b")
    assert model.dtype == torch.bfloat16
    names, extra = hash_names(model, rd)
    assert weights_hash(model, names, extra) == report.weights_sha256


def test_fp16_scales_are_smaller_and_marked_inexact(llava_dir, tmp_path):
    v = load_vlm(llava_dir)
    report = quantize_(v.model, recipe_from_args({"bits": 4, "group_size": 16}))
    exact = save_quantized(v.model, report, tmp_path / "f32")
    half = save_quantized(v.model, report, tmp_path / "f16", scale_dtype=torch.float16)
    assert (half / WEIGHTS_FILE).stat().st_size < (exact / WEIGHTS_FILE).stat().st_size
    model, _, _ = load_quantized(half)  # no hash check for an inexact checkpoint
    inputs = _inputs(v)
    ref = _logits(v.model, inputs)
    assert (_logits(model, inputs) - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert json.loads((half / INFO_FILE).read_text())["exact"] is False


def test_refuses_to_save_a_model_changed_after_quantization(llava_dir, tmp_path):
    v = load_vlm(llava_dir)
    report = quantize_(v.model, recipe_from_args({"bits": 4}))
    with torch.no_grad():
        v.model.model.language_model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    with pytest.raises(CheckpointError, match="weights hash differs"):
        save_quantized(v.model, report, tmp_path / "x")


def test_shape_mismatch_with_the_config_is_refused_naming_the_tensor(llava_dir, tmp_path):
    v = load_vlm(llava_dir)
    report = quantize_(v.model, recipe_from_args({"bits": 4}))
    out = save_quantized(v.model, report, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96  # was 64
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointShapeError) as err:
        load_quantized(out)
    msg = str(err.value)
    assert "model.language_model.layers.0.mlp." in msg
    assert ("[64, 32]" in msg and "[96, 32]" in msg) or ("[32, 64]" in msg and "[32, 96]" in msg)


def test_a_tampered_weight_fails_the_hash_check(llava_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    v = load_vlm(llava_dir)
    report = quantize_(v.model, recipe_from_args({"bits": 4}))
    out = save_quantized(v.model, report, tmp_path / "q")
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(out / WEIGHTS_FILE))
    key = "model.language_model.layers.0.mlp.up_proj.scales"
    tensors[key] = tensors[key] * 1.01
    save_file(tensors, str(out / WEIGHTS_FILE), metadata=meta)
    with pytest.raises(CheckpointError, match="weights hash"):
        load_quantized(out)


def test_plain_from_pretrained_cannot_mistake_it_for_an_fp_checkpoint(llava_dir, tmp_path):
    import transformers

    v = load_vlm(llava_dir)
    report = quantize_(v.model, recipe_from_args({"bits": 4}))
    out = save_quantized(v.model, report, tmp_path / "q")
    with pytest.raises(OSError):
        transformers.LlavaForConditionalGeneration.from_pretrained(out, use_safetensors=True)
