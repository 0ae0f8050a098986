"""Exports other tools load (compressed-tensors, GPTQ, AWQ), their detection, CPU dequantization and refusals."""

import json

import pytest
import torch

from lmms_quant import quantize_, recipe_from_args
from lmms_quant.calibration_data import build_calibration_set
from lmms_quant.checkpoints import (
    AlreadyQuantizedError,
    CheckpointError,
    CheckpointShapeError,
    QuantizedLinearData,
    detect_quantization,
    ensure_not_quantized,
    export_awq,
    export_compressed_tensors,
    export_gptq,
    load_prequantized,
    save_quantized,
)
from lmms_quant.models import load_vlm
from lmms_quant.recipe import CalibrationSpec
from tests.fixtures.tiny_models import save_tiny_llava


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return str(save_tiny_llava(tmp_path_factory.mktemp("m") / "tiny-llava", seed=7))


def _quantized(llava_dir, args):
    v = load_vlm(llava_dir)
    return v, quantize_(v.model, recipe_from_args(args))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 7, 12, 30, 41, 5, 9, 22]])


def _fp16_scale_reference(model, report):
    """The simulated weights rebuilt with fp16-rounded scales: what GPTQ/AWQ files hold exactly."""
    mods = dict(model.named_modules())
    out = {}
    for name, qp in report.qparams.items():
        q = QuantizedLinearData.from_weight(mods[name].weight, qp, name)
        q.scale = q.scale.half().float()
        out[name] = q.dequantize()
    return out


@pytest.mark.parametrize("args", [
    {"bits": 4},                                                       # per channel sym
    {"bits": 8, "group_size": 16, "sym": False},                       # grouped asym
    {"bits_llm": 3, "bits_vit": 2, "group_size": 16, "sym": False},    # 2 and 3 bits, two components, one file
    {"method": "uniform", "bits": 6},                                  # per tensor asym
])
def test_compressed_tensors_export_loads_in_transformers_with_identical_outputs(llava_dir, tmp_path, args):
    pytest.importorskip("compressed_tensors")
    import transformers

    v, report = _quantized(llava_dir, args)
    out = export_compressed_tensors(v.model, report, tmp_path / "ct", v.processor)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert "lm_head" in qc["ignore"]
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out)  # transformers' own integration, on the CPU
    ref = _logits(v.model, IDS)
    assert torch.equal(_logits(hf, IDS), ref)
    ours, _, det = load_prequantized(out)  # our dequantizer gives the same model
    assert torch.equal(_logits(ours, IDS), ref)
    assert det.method == "compressed-tensors" and set(det.modules) == set(report.qparams)


def test_compressed_tensors_also_decompresses_with_its_own_api(llava_dir, tmp_path):
    ct = pytest.importorskip("compressed_tensors")
    from safetensors.torch import load_file

    v, report = _quantized(llava_dir, {"bits": 5, "group_size": 32, "sym": False})
    out = export_compressed_tensors(v.model, report, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = ct.quantization.QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    sd = load_file(str(out / "model.safetensors"))
    name = "model.language_model.layers.1.self_attn.o_proj"
    local = {k[len(name) + 1:]: t for k, t in sd.items() if k.startswith(name + ".")}
    w = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    assert torch.equal(w, dict(v.model.named_modules())[name].weight)


def test_compressed_tensors_refuses_awq_input_scales(llava_dir, tmp_path):
    v = load_vlm(llava_dir)
    calib = build_calibration_set(v.processor, v.family, CalibrationSpec(source="world", samples=2, seed=1), "cpu", torch.float32)
    report = quantize_(v.model, recipe_from_args({"method": "awq", "bits_connector": 4, "group_size": 16}), calibration=calib)
    for export in (export_compressed_tensors, export_gptq, export_awq):
        with pytest.raises(CheckpointError, match="input scales"):
            export(v.model, report, tmp_path / export.__name__)


@pytest.mark.parametrize("fmt,args", [
    ("gptq", {"bits": 4}),
    ("gptq_v2", {"bits_llm": 3, "bits_vit": 2, "group_size": 16, "sym": False}),
    ("gptq_v2", {"method": "uniform", "bits": 8}),
])
def test_gptq_checkpoint_is_detected_and_dequantized_on_cpu(llava_dir, tmp_path, fmt, args):
    v, report = _quantized(llava_dir, args)
    out = export_gptq(v.model, report, tmp_path / "gptq", v.processor, checkpoint_format=fmt)
    det = detect_quantization(out)
    assert det.method == "gptq" and det.format == fmt
    assert set(det.modules) == set(report.qparams)
    want_bits = {m["bits"] for m in report.modules}
    assert {m["bits"] for m in det.modules.values()} == want_bits
    quantized_components = {c for c, v_ in det.components.items() if v_["quantized"]}
    assert quantized_components == {m["component"] for m in report.modules}
    assert det.bpw["model"]["study"] == pytest.approx(report.bpw["model"]["study"])
    assert det.bpw["model"]["storage"] > det.bpw["model"]["study"]  # scales, zeros, g_idx and fp32 tensors count
    model, processor, det2 = load_prequantized(out)
    assert processor is not None and det2.method == "gptq"
    ref = _fp16_scale_reference(v.model, report)
    mods = dict(model.named_modules())
    for name, w in ref.items():
        assert torch.equal(mods[name].weight, w), name  # exactly the file's grid: fp16 scales
    assert (_logits(model, IDS) - _logits(v.model, IDS)).abs().max() < 1e-2


def test_awq_checkpoint_is_detected_and_dequantized_on_cpu(llava_dir, tmp_path):
    v, report = _quantized(llava_dir, {"bits_llm": 4, "group_size": 16, "sym": False})
    out = export_awq(v.model, report, tmp_path / "awq", v.processor)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["version"] == "gemm" and "model.vision_tower" in qc["modules_to_not_convert"]
    det = detect_quantization(out)
    assert (det.method, det.bits, det.group_size) == ("awq", 4, 16)
    assert {c for c, x in det.components.items() if x["quantized"]} == {"llm"}
    model, _, _ = load_prequantized(out)
    mods = dict(model.named_modules())
    for name, w in _fp16_scale_reference(v.model, report).items():
        assert torch.equal(mods[name].weight, w), name


def test_awq_export_refuses_what_autoawq_cannot_express(llava_dir, tmp_path):
    v, report = _quantized(llava_dir, {"bits": 3, "group_size": 16})
    with pytest.raises(CheckpointError, match="4-bit"):
        export_awq(v.model, report, tmp_path / "a")
    v, report = _quantized(llava_dir, {"bits": 4})
    with pytest.raises(CheckpointError, match="group_size"):
        export_awq(v.model, report, tmp_path / "b")


def test_gptq_export_refuses_widths_autogptq_cannot_pack(llava_dir, tmp_path):
    v, report = _quantized(llava_dir, {"bits": 5})
    with pytest.raises(CheckpointError, match="not 5"):
        export_gptq(v.model, report, tmp_path / "g")


def test_detection_of_configs_and_of_our_format(llava_dir, tmp_path):
    assert detect_quantization(llava_dir) is None
    assert detect_quantization({"architectures": ["X"]}) is None
    det = detect_quantization({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}})
    assert (det.method, det.bits, det.group_size, det.desc_act, det.supported) == ("gptq", 4, 128, True, True)
    det = detect_quantization({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemv"})
    assert det.method == "awq" and not det.supported and "gemm" in det.reason.lower()
    det = detect_quantization({"quant_method": "compressed-tensors", "format": "float-quantized",
                               "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}}})
    assert not det.supported
    v, report = _quantized(llava_dir, {"bits_llm": 3})
    out = save_quantized(v.model, report, tmp_path / "ours")
    det = detect_quantization(out)
    assert det.method == "lmms-quant" and det.bits == 3 and set(det.modules) == set(report.qparams)
    assert det.bpw["model"]["study"] == pytest.approx(report.bpw["model"]["study"])
    model, _, _ = load_prequantized(out)
    assert torch.equal(_logits(model, IDS), _logits(v.model, IDS))


def test_quantizing_a_quantized_checkpoint_twice_needs_asking(llava_dir, tmp_path):
    v, report = _quantized(llava_dir, {"bits": 4})
    out = export_gptq(v.model, report, tmp_path / "g")
    with pytest.raises(AlreadyQuantizedError, match="already quantized.*gptq.*requantize=true"):
        ensure_not_quantized(out)
    assert ensure_not_quantized(out, requantize=True).method == "gptq"
    assert ensure_not_quantized(llava_dir) is None


def test_gptq_tensor_with_a_wrong_shape_is_refused(llava_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    v, report = _quantized(llava_dir, {"bits": 4})
    out = export_gptq(v.model, report, tmp_path / "g")
    sd = load_file(str(out / "model.safetensors"))
    key = "model.language_model.layers.0.mlp.gate_proj.scales"
    sd[key] = torch.cat([sd[key], sd[key]], dim=1)  # (1, 128) instead of (1, 64)
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(CheckpointShapeError, match=r"gate_proj.scales' has shape \[1, 128\] but the model config expects \[1, 64\]"):
        load_prequantized(out)


def test_pickle_only_checkpoints_are_refused(llava_dir, tmp_path):
    v, report = _quantized(llava_dir, {"bits": 4})
    out = export_gptq(v.model, report, tmp_path / "g")
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_prequantized(out)
