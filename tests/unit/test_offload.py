"""Models larger than one device: a tiny LLaVA loaded with ``device_map=auto`` and a ``max_memory`` that
forces half of it onto disk is quantized block by block (loaded, quantized, written back to the offload
folder) and gets exactly the weights of the in-memory run; the checkpoint on disk is never written."""

import hashlib

import pytest
import torch

from lmms_quant import quantize_, recipe_from_args
from lmms_quant.calibration_data import build_calibration_set
from lmms_quant.models import load_vlm, parse_max_memory
from lmms_quant.offload import is_offloaded, materialized, tensor_of
from lmms_quant.recipe import CalibrationSpec
from tests.fixtures.tiny_models import save_tiny_llava

RECIPES = {
    "rtn": {"method": "rtn", "bits": 4},
    "gptq": {"method": "gptq", "bits_vit": 4, "bits_llm": 3, "group_size": 16},
    "awq": {"method": "awq", "bits_vit": 4, "bits_llm": 3, "group_size": 16},
}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("m") / "tiny-llava", seed=7)


@pytest.fixture(scope="module")
def calib(llava_dir):
    v = load_vlm(str(llava_dir))
    return build_calibration_set(v.processor, v.family, CalibrationSpec(source="world", samples=4, seed=3), "cpu", torch.float32)


def offloaded(llava_dir, folder):
    size = sum(f.stat().st_size for f in llava_dir.glob("*.safetensors"))
    loaded = load_vlm(str(llava_dir), device_map="auto", max_memory={"cpu": size // 2}, offload_folder=str(folder))
    assert is_offloaded(loaded.model)
    return loaded.model


def checkpoint_sha(llava_dir):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(llava_dir.glob("*.safetensors"))}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_an_offloaded_model_quantizes_to_the_weights_of_the_in_memory_run(method, llava_dir, calib, tmp_path):
    recipe = recipe_from_args(RECIPES[method])
    in_memory = load_vlm(str(llava_dir)).model
    expected = quantize_(in_memory, recipe, calibration=calib)
    before = checkpoint_sha(llava_dir)

    model = offloaded(llava_dir, tmp_path / "offload")
    metas = [n for n, p in model.named_parameters() if p.is_meta]
    assert any(".language_model." in n for n in metas), "the LLM should be offloaded to disk"
    report = quantize_(model, recipe, calibration=calib, cache_dir=tmp_path / "cache")
    assert report.weights_sha256 == expected.weights_sha256
    assert [n for n, p in model.named_parameters() if p.is_meta] == metas  # put back: still offloaded
    with torch.no_grad():  # the forward loads the quantized weights from the offload folder
        assert torch.equal(model(**calib.batches[0]).logits, in_memory(**calib.batches[0]).logits)
    assert checkpoint_sha(llava_dir) == before

    again = offloaded(llava_dir, tmp_path / "offload2")  # a cache hit writes through the offload maps too
    hit = quantize_(again, recipe, calibration=calib, cache_dir=tmp_path / "cache")
    if method != "rtn":
        assert hit.calibration["cache"] == "hit"
    assert hit.weights_sha256 == expected.weights_sha256


def test_materialized_writes_changes_back_and_offloads_again(llava_dir, tmp_path):
    model = offloaded(llava_dir, tmp_path / "offload")
    name = next(n for n, p in model.named_parameters() if p.is_meta and n.endswith("q_proj.weight"))
    module = model.get_submodule(name.rsplit(".", 1)[0])
    original = tensor_of(model, name).clone()
    with materialized(module):
        assert not module.weight.is_meta
        module.weight.data.mul_(2)
    assert module.weight.is_meta and torch.equal(tensor_of(model, name), original * 2)


@pytest.mark.parametrize("spec, expected", [("cpu:2GiB;0:20GiB", {"cpu": "2GiB", 0: "20GiB"}), ("cpu:1000+1:5GB", {"cpu": 1000, 1: "5GB"})])
def test_max_memory_strings(spec, expected):
    assert parse_max_memory(spec) == expected


def test_bad_max_memory_and_offload_without_device_map_are_refused(llava_dir):
    with pytest.raises(ValueError, match="max_memory entry 'cpu' is not DEVICE:SIZE"):
        parse_max_memory("cpu")
    with pytest.raises(ValueError, match="need device_map"):
        load_vlm(str(llava_dir), max_memory="cpu:1GiB")


def test_quant_vlm_with_device_map_auto_and_offload_answers_as_in_memory(llava_dir, tmp_path, monkeypatch):
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from lmms_quant.model_wrappers.quant_vlm import QuantVLM

    monkeypatch.setenv("LMMS_QUANT_CACHE", str(tmp_path / "cache"))
    size = sum(f.stat().st_size for f in llava_dir.glob("*.safetensors"))
    common = {"pretrained": str(llava_dir), "bits_llm": 4, "bits_vit": 4, "serve": "quant_vlm", "max_new_tokens": 4}
    in_memory = QuantVLM(**common)
    offloaded_lm = QuantVLM(**common, device_map="auto", max_memory=f"cpu:{size // 2}", offload_folder=str(tmp_path / "off"))
    assert is_offloaded(offloaded_lm.model)
    assert offloaded_lm.metadata["quantization"]["weights_sha256"] == in_memory.metadata["quantization"]["weights_sha256"]
    docs = [{"image": Image.new("RGB", (32, 32), c)} for c in ("red", "blue")]
    requests = [Instance("generate_until", (f"q{i} what colour?", {"max_new_tokens": 4, "until": ["\n"]}, lambda d: [d["image"]], i,
                                            "t", "test"), i, {"task": "t", "doc_id": i, "repeats": 1}) for i in range(2)]
    answers = []
    for lm in (in_memory, offloaded_lm):
        lm.task_dict = {"t": {"test": docs}}
        answers.append(lm.generate_until(requests))
    assert answers[0] == answers[1]
