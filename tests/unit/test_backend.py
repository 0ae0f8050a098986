"""The quant_vlm backend in-process: request conventions, batching, errors."""

import pytest
import torch
from lmms_eval.api.instance import Instance
from PIL import Image

from lmms_quant.model_wrappers.quant_vlm import ConfigurationExit, QuantVLM


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    import os

    os.environ["LMMS_QUANT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    model = QuantVLM(pretrained="tiny-random-llava", bits_llm=4, batch_size=3)
    docs = [{"question": q, "image": Image.new("RGB", (32, 32), c)} for q, c in
            [("what colour?", "red"), ("how many shapes are there?", "blue"), ("is there a circle?", "green"), ("what shape?", "white"),
             ("left or right?", "yellow")]]
    model.task_dict = {"t": {"test": docs}}
    return model


META = {"task": "t", "doc_id": 0, "repeats": 1}


def gen_requests(n, gen_kwargs=None):
    kw = gen_kwargs or {"max_new_tokens": 3, "until": ["\n"]}
    return [Instance("generate_until", (f"q{i} what colour ?", dict(kw), lambda d: [d["image"]], i, "t", "test"), i, META) for i in range(n)]


def test_batched_generation_matches_one_by_one_and_keeps_order(lm):
    reqs = gen_requests(5)
    batched = lm.generate_until(reqs)
    lm.batch_size_per_gpu = 1
    try:
        single = [lm.generate_until([r])[0] for r in gen_requests(5)]
    finally:
        lm.batch_size_per_gpu = 3
    assert batched == single and len(batched) == 5


def test_loglikelihood_is_mean_nll_and_greedy_flag(lm):
    doc = lm.task_dict["t"]["test"][0]
    req = Instance("loglikelihood", ("what colour?", " red", lambda d: [d["image"]], 0, "t", "test"), 0, META)
    (nll, greedy), = lm.loglikelihood([req])
    prompt = lm._format("what colour?", 1)
    full = lm._inputs([prompt + " red"], [[doc["image"]]])
    n_prompt = lm._inputs([prompt], [[doc["image"]]])["input_ids"].shape[1]
    with torch.no_grad():
        logp = lm.model(**full).logits.log_softmax(-1)[0]
    ids = full["input_ids"][0]
    by_hand = -torch.stack([logp[i - 1, ids[i]] for i in range(n_prompt, len(ids))]).mean().item()
    assert nll == pytest.approx(by_hand, rel=1e-5) and nll > 0
    assert isinstance(greedy, bool)


def test_model_survives_lmms_eval_clean(lm):
    lm.clean()
    assert lm.model is not None and len(lm.generate_until(gen_requests(1))) == 1


def test_multi_round_is_a_clear_not_implemented(lm):
    with pytest.raises(NotImplementedError, match="quant_vlm does not support multi-round generation"):
        lm.generate_until_multi_round([])


def test_configuration_errors_exit_before_loading():
    with pytest.raises(ConfigurationExit, match=r"unknown key\(s\) \['bogus'\]; valid backend keys: pretrained"):
        QuantVLM(pretrained="/definitely/not/loaded", bogus=1)
    with pytest.raises(ConfigurationExit, match=r"bit width 1 is out of range"):
        QuantVLM(pretrained="/definitely/not/loaded", bits_vit=1)
    with pytest.raises(ConfigurationExit, match=r"batch_size must be >= 1"):
        QuantVLM(pretrained="/definitely/not/loaded", batch_size=0)


def test_task_generation_settings_reach_generate(lm, monkeypatch):
    seen = {}
    original = lm.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(lm.model, "generate", spy)
    lm.generate_until(gen_requests(1, {"max_new_tokens": 4, "num_beams": 2, "min_length": 1, "length_penalty": 0.0, "until": ["\n"]}))
    assert (seen["num_beams"], seen["min_length"], seen["length_penalty"], seen["max_new_tokens"]) == (2, 1, 0.0, 4)


def test_save_reload_prequantized_refuse_requantize_and_real_lowbit(tmp_path):
    saved_dir = tmp_path / "q"
    first = QuantVLM(pretrained="tiny-random-llava", bits_llm=4, bits_vit=3, save_quantized=str(saved_dir))
    first.task_dict = {"t": {"test": [{"image": Image.new("RGB", (32, 32), "red")}]}}
    expected = first.generate_until(gen_requests(1))
    sha = first.metadata["quantization"]["weights_sha256"]

    # no recipe: evaluate it as saved; a local folder of a LLaVA is served by lmms-eval's llava_hf unless told,
    # and the saved toy was served by quant_vlm itself
    again = QuantVLM(pretrained=str(saved_dir), serve="quant_vlm")
    again.task_dict = first.task_dict
    assert again.generate_until(gen_requests(1)) == expected
    assert again.metadata["quantization"]["weights_sha256"] == sha
    assert again.metadata["timings_s"]["quantize"] == 0.0

    with pytest.raises(ConfigurationExit, match=r"already quantized|requantize"):
        QuantVLM(pretrained=str(saved_dir), bits_llm=3)
    QuantVLM(pretrained=str(saved_dir), bits_llm=3, requantize=True)  # explicitly asked: allowed

    real = QuantVLM(pretrained="tiny-random-llava", bits_llm=4, bits_vit=3, real_lowbit=True)
    real.task_dict = first.task_dict
    assert len(real.metadata["real_lowbit_layers"]) == 26
    assert real.generate_until(gen_requests(1)) == expected


def ll_requests():
    pairs = [("what colour?", " red"), ("how many shapes are there?", " two large shapes"), ("is there a circle?", " no"),
             ("what shape?", " a small white square on the left"), ("left or right?", " right")]
    return [Instance("loglikelihood", (q, c, lambda d: [d["image"]], i, "t", "test"), i, META) for i, (q, c) in enumerate(pairs)]


def test_batched_loglikelihood_equals_one_by_one(lm):
    """Batches of 3 (prompts and continuations of different lengths, right padded) score what batches of 1 do."""
    batched = lm.loglikelihood(ll_requests())
    lm.batch_size_per_gpu = 1
    try:
        single = [lm.loglikelihood([r])[0] for r in ll_requests()]
    finally:
        lm.batch_size_per_gpu = 3
    assert len(batched) == 5 and len({round(nll, 3) for nll, _ in single}) > 1
    for (nll_b, greedy_b), (nll_1, greedy_1) in zip(batched, single):
        assert nll_b == pytest.approx(nll_1, abs=1e-4) and greedy_b == greedy_1
