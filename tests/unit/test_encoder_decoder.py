"""BLIP-2 with a Flan-T5-style (T5) language model through quant_vlm: generation and log-likelihood
equal to transformers done by hand, and GPTQ/AWQ calibration reaching the encoder and the decoder."""

import pytest
import torch
import transformers as T
from lmms_eval.api.instance import Instance
from PIL import Image

from lmms_quant.model_wrappers.quant_vlm import QuantVLM
from tests.fixtures.local_models import save_blip2_t5

META = {"task": "t", "doc_id": 0, "repeats": 1}
QUESTIONS = ["what colour is the circle?", "how many shapes are there?", "is there a square?"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return save_blip2_t5(tmp_path_factory.mktemp("m") / "blip2-t5", seed=0)


def docs():
    return [{"question": q, "image": Image.new("RGB", (64, 64), c)} for q, c in zip(QUESTIONS, ["red", "blue", "green"])]


@pytest.fixture(scope="module")
def lm(t5_dir, tmp_path_factory, one_thread):
    model = QuantVLM(pretrained=str(t5_dir), cache=False)
    model.task_dict = {"t": {"test": docs()}}
    return model


def gen_requests(max_new_tokens=5):
    kw = {"max_new_tokens": max_new_tokens, "until": ["\n\n"]}
    return [Instance("generate_until", (f"Question: {q} Short answer:", dict(kw), lambda d: [d["image"]], i, "t", "test"), i, META)
            for i, q in enumerate(QUESTIONS)]


def test_generation_equals_transformers_generate_and_decode(lm, t5_dir):
    assert lm._encoder_decoder and lm.recipe.is_noop
    ours = lm.generate_until(gen_requests())
    model = T.Blip2ForConditionalGeneration.from_pretrained(t5_dir).eval()
    processor = T.Blip2Processor.from_pretrained(t5_dir)
    expected = []
    for d in docs():
        inputs = processor(images=[d["image"]], text=[f"Question: {d['question']} Short answer:"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=1)
        expected.append(processor.tokenizer.decode(out[0], skip_special_tokens=True).strip())
    assert ours == expected
    assert all(len(text.split()) >= 1 for text in ours), ours  # the old decoder-only slicing gave '' for every prompt


def test_loglikelihood_is_the_mean_nll_of_the_decoder_labels(lm, t5_dir):
    model = T.Blip2ForConditionalGeneration.from_pretrained(t5_dir).eval()
    processor = T.Blip2Processor.from_pretrained(t5_dir)
    d = docs()[0]
    req = Instance("loglikelihood", ("Question: what colour is the circle? Short answer:", "red circle",
                                     lambda doc: [doc["image"]], 0, "t", "test"), 0, META)
    (nll, greedy), = lm.loglikelihood([req])
    enc = processor(images=[d["image"]], text=["Question: what colour is the circle? Short answer:"], return_tensors="pt")
    target = processor.tokenizer("red circle", add_special_tokens=False)["input_ids"]
    assert len(target) == 2
    # decoder inputs by hand: the start token, then the target shifted right
    dec = torch.tensor([[model.config.text_config.decoder_start_token_id, *target[:-1]]])
    with torch.no_grad():
        logp = model(**enc, decoder_input_ids=dec).logits.log_softmax(-1)[0]
    by_hand = -sum(logp[i, t].item() for i, t in enumerate(target)) / len(target)
    assert nll == pytest.approx(by_hand, rel=1e-5) and nll > 0
    assert greedy == all(int(logp[i].argmax()) == t for i, t in enumerate(target))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibration_reaches_the_t5_encoder_and_decoder(t5_dir, method, one_thread):
    extra = {"group_size": 16} if method == "awq" else {}
    lm = QuantVLM(pretrained=str(t5_dir), method=method, bits_llm=4, calib_source="world", calib_samples=4, cache=False, **extra)
    layers = lm.report.calibration["layers"]
    enc = [n for n in layers if ".encoder.block." in n]
    dec = [n for n in layers if ".decoder.block." in n]
    # 2 encoder blocks x (q, k, v, o, wi_0, wi_1, wo); 2 decoder blocks also have the cross-attention's q, k, v, o
    assert len(enc) == 2 * 7 and len(dec) == 2 * 11, sorted(layers)
    assert not lm.report.calibration["unquantized"]


def test_encoder_decoder_calibration_batches_put_the_target_in_the_labels(t5_dir):
    from lmms_quant.calibration_data import build_calibration_set
    from lmms_quant.recipe import CalibrationSpec

    processor = T.Blip2Processor.from_pretrained(t5_dir)
    calib = build_calibration_set(processor, "blip2", CalibrationSpec(source="world", samples=3, seed=0), "cpu", torch.float32,
                                  encoder_decoder=True)
    for batch in calib.batches:
        prompt = processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
        target = processor.tokenizer.decode(batch["labels"][0], skip_special_tokens=True)
        assert int(batch["labels"][0, -1]) == processor.tokenizer.eos_token_id and target
        assert target not in prompt  # the target is decoder-only, not appended to the encoder's prompt


def test_t5_blocks_carry_their_position_biases_block_to_block(t5_dir):
    """The sequential driver runs T5 blocks one at a time; block 0 computes the relative position bias that
    the stack hands to every later block.  Block 1 run on what the driver carries must give exactly what it
    gives inside the full model (with the bias dropped it attends without positions)."""
    from lmms_quant.calibration import _capture_first_block_inputs, _next_inputs, _run_block
    from lmms_quant.calibration_data import build_calibration_set
    from lmms_quant.recipe import CalibrationSpec

    model = T.Blip2ForConditionalGeneration.from_pretrained(t5_dir).eval()
    processor = T.Blip2Processor.from_pretrained(t5_dir)
    calib = build_calibration_set(processor, "blip2", CalibrationSpec(source="world", samples=1, seed=0), "cpu", torch.float32,
                                  encoder_decoder=True)
    for stack in (model.language_model.encoder, model.language_model.decoder):
        seen = []
        handle = stack.block[1].register_forward_hook(lambda m, a, out, seen=seen: seen.append(out[0].clone()))
        with torch.no_grad():
            model(**calib.batches[0])
        handle.remove()
        inputs = _capture_first_block_inputs(model, stack.block[0], calib.batches)
        carried = _next_inputs(stack.block[0], inputs[0], _run_block(stack.block[0], inputs)[0])
        assert torch.allclose(_run_block(stack.block[1], [carried])[0][0], seen[0], atol=1e-6)


def test_batched_loglikelihood_equals_one_by_one(lm):
    conts = ["red circle", "two", "yes there is a square"]
    reqs = lambda: [Instance("loglikelihood", (f"Question: {q} Short answer:", c, lambda d: [d["image"]], i, "t", "test"), i, META)  # noqa: E731
                    for i, (q, c) in enumerate(zip(QUESTIONS, conts))]
    lm.batch_size_per_gpu = 3
    try:
        batched = lm.loglikelihood(reqs())
    finally:
        lm.batch_size_per_gpu = 1
    single = [lm.loglikelihood([r])[0] for r in reqs()]
    for (nll_b, greedy_b), (nll_1, greedy_1) in zip(batched, single, strict=True):
        assert nll_b == pytest.approx(nll_1, abs=1e-4) and greedy_b == greedy_1
