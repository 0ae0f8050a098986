"""lm-eval's ``quant_llm`` backend: lm-eval's scoring conventions, the VLM's language model, and the wiring.

Every number is checked against a computation by hand on the same tiny model:
loglikelihoods are sums of log-softmax values, rolling loglikelihoods are
sums over lm-eval's disjoint windows, and the VLM side's weights match
``quant_vlm``'s bit for bit (``weights_sha256``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers as T
from lm_eval.api.instance import Instance
from torch import nn

from lmms_quant import RecipeError, quantize_, recipe_from_args
from lmms_quant.apply import count_levels
from lmms_quant.lm_tasks.text_utils import read_documents
from lmms_quant.model_wrappers import lm_eval_plugin
from lmms_quant.model_wrappers.exits import BackendExit
from lmms_quant.model_wrappers.lm_eval_backend import ConfigurationError, QuantLLM, language_model_of
from lmms_quant.plan import plan
from tests.fixtures.tiny_models import TXT, build, save_tiny_llava


def byte_bpe_tokenizer(vocab_size: int = 320) -> T.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained (in milliseconds) on the bundled lq_text_ppl corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([d["text"] for d in read_documents()], trainer)
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_llama(path, seed: int = 0, max_positions: int = 64):
    """A tiny random LlamaForCausalLM with a byte-level BPE tokenizer, saved to ``path`` (safetensors)."""
    tok = byte_bpe_tokenizer()
    cfg = T.LlamaConfig(**dict(TXT, vocab_size=len(tok)), max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def word_tokenizer(n_words: int) -> T.PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over w0..w{n-1} (for the 128-token vocabularies of the family fixtures)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *[f"w{i}" for i in range(n_words - 4)]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return str(save_tiny_llava(tmp_path_factory.mktemp("tiny_llava")))


def _ll_by_hand(model, ids: list[int], n_ctx: int) -> tuple[float, bool]:
    """Sum of log p(ids[i] | ids[:i]) for i >= n_ctx, and whether each was the argmax."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    pos = range(n_ctx, len(ids))
    return sum(float(logp[i - 1, ids[i]]) for i in pos), all(int(logp[i - 1].argmax()) == ids[i] for i in pos)


# --------------------------------------------------------------------------- lm-eval's conventions

def test_loglikelihood_is_the_summed_log_softmax_of_the_continuation(tiny_llama):
    lm = QuantLLM(pretrained=tiny_llama, batch_size=2)
    tok, model = lm.tokenizer, lm.model
    pairs = [("The brave men, living and dead,", " who struggled here"), ("Call me", " Ishmael."),
             ("It was the best of times, it was the worst of times, it was", " the age of wisdom"), ("", "Four score and seven")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        if ctx:
            ctx_ids, whole = tok(ctx).input_ids, tok(ctx + cont).input_ids
        else:  # lm-eval's empty context: the prefix token (BOS here) conditions the continuation
            ctx_ids, whole = [lm.prefix_token_id], [lm.prefix_token_id, *tok(cont).input_ids]
        want, want_greedy = _ll_by_hand(model, whole, len(ctx_ids))
        assert ll == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy
        assert ll < 0  # a sum of log-probabilities: higher is better (lmms-eval's backends return mean NLL instead)


def test_rolling_loglikelihood_is_the_sum_over_disjoint_windows(tiny_llama):
    text = read_documents()[4]["text"]  # the Gettysburg Address
    L = 16
    lm = QuantLLM(pretrained=tiny_llama, batch_size=3, max_length=L)
    tokens = lm.tokenizer(text).input_ids
    assert len(tokens) > 5 * L
    seq = [lm.prefix_token_id, *tokens]  # seq[j + 1] == tokens[j]
    want = 0.0
    for a in range(0, len(tokens), L):  # targets tokens[a:b], each window with as much context as fits
        b = min(a + L, len(tokens))
        s = max(0, b - L)
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(torch.tensor([seq[s:b]])).logits[0].double(), dim=-1)
        want += sum(float(logp[j - s, tokens[j]]) for j in range(a, b))
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert got[0] == pytest.approx(want, rel=1e-5)

    # one window when it all fits: the plain sum over the whole text after the prefix token
    short = read_documents()[3]["text"]
    full = QuantLLM(pretrained=tiny_llama, max_length=64)
    ids = [full.prefix_token_id, *full.tokenizer(short).input_ids][:64]
    if len(ids) == 64:
        short = full.tokenizer.decode(ids[1:40])
        ids = [full.prefix_token_id, *full.tokenizer(short).input_ids]
    got_short = full.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0)])[0]
    assert got_short == pytest.approx(_ll_by_hand(full.model, ids, 1)[0], rel=1e-5)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_sequence(tiny_llama):
    lm = QuantLLM(pretrained=tiny_llama, batch_size=2)
    prompts = ["It was the best of times, it was the worst of times", "We hold these truths"]  # the first is the longest: unpadded
    ids = lm.tokenizer(prompts[0], return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    free = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(free) > 2
    stop = free[len(free) // 2]  # a character the greedy continuation really produces
    got = lm.generate_until([Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 12, "do_sample": False}), i)
                             for i, p in enumerate(prompts)])
    assert got[0] == free.split(stop)[0]
    assert stop not in got[0] and isinstance(got[1], str)


# --------------------------------------------------------------------------- the VLM's language model

def test_vlm_language_model_has_quant_vlms_weights_and_runs_decoder_plus_head(tiny_llava):
    from lmms_quant.model_wrappers.quant_vlm import QuantVLM

    args = {"bits_llm": 3, "bits_vit": 4, "method": "rtn", "seed": 0}
    vlm_side = QuantVLM(pretrained=tiny_llava, **args)
    lm = QuantLLM(pretrained=tiny_llava, **args)
    meta = lm.get_model_info()["lmms_quant"]
    assert meta["quantization"]["weights_sha256"] == vlm_side.report.weights_sha256
    assert meta["quantization"]["recipe"] == vlm_side.report.recipe
    assert meta["model"]["kind"] == "vlm" and meta["model"]["class"] == "LlavaForConditionalGeneration"
    assert meta["quantization"]["bpw"]["llm"]["study"] < 16 and meta["quantization"]["bpw"]["vit"]["study"] < 16
    vlm = lm.model
    assert isinstance(vlm, T.LlavaForConditionalGeneration)  # served text-only, quantized in place
    modules = dict(vlm.named_modules())
    first = {c: next(m["name"] for m in meta["quantization"]["quantized_modules"] if m["component"] == c) for c in ("vit", "llm")}
    assert count_levels(modules[first["llm"]].weight, -1) <= 2**3 < count_levels(modules[first["llm"]].weight, 0)
    assert count_levels(modules[first["vit"]].weight, -1) <= 2**4
    ids = lm.tokenizer("USER: what colour is the circle ? ASSISTANT: red", return_tensors="pt").input_ids
    with torch.no_grad():
        served = lm._model_call(ids)
        by_hand = vlm.lm_head(vlm.model.language_model(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(served, by_hand)
    for name, p in vlm.named_parameters():  # the same tensors as the lmms-eval side, bit for bit
        assert torch.equal(p, dict(vlm_side.model.named_parameters())[name]), name


def test_gptq_on_the_vlm_matches_quant_vlm(tiny_llava, tmp_path):
    from lmms_quant.model_wrappers.quant_vlm import QuantVLM

    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"prompt": "what colour is the circle ?", "target": w}) + "\n" for w in ["red", "blue", "green"]))
    args = {"bits_llm": 4, "method_llm": "gptq", "calib_source": str(calib), "calib_samples": 3, "cache": False}
    lm = QuantLLM(pretrained=tiny_llava, **args)
    assert lm.quant_report.weights_sha256 == QuantVLM(pretrained=tiny_llava, **args).report.weights_sha256
    assert lm.quant_report.calibration is not None


def test_language_model_of_each_family():
    blip2 = build("blip2_opt")
    assert language_model_of(blip2) is blip2.language_model and isinstance(blip2.language_model, T.OPTForCausalLM)
    assert language_model_of(build("blip2_t5")).config.is_encoder_decoder
    for name in ("llava", "qwen2_vl", "idefics3", "smolvlm"):
        m = build(name)
        assert language_model_of(m) is m
    for name in ("clip", "blip2_itm"):
        with pytest.raises(ValueError, match="no language-model head"):
            language_model_of(build(name))


def test_blip2_is_scored_through_its_opt_after_quantizing_the_whole_vlm():
    model = build("blip2_opt")
    lm = QuantLLM(pretrained=model, tokenizer=word_tokenizer(128), bits_llm=3, bits_vit=4, bits_connector=4)
    assert lm.model is model.language_model
    comps = lm.quant_report.components
    assert comps["vit"]["n_quantized"] > 0 and comps["connector"]["n_quantized"] > 0 and comps["llm"]["n_quantized"] > 0
    ctx, cont = "w5 w9 w17", " w3 w40"
    ll, _ = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])[0]
    ids = lm.tokenizer(ctx + cont).input_ids
    assert ll == pytest.approx(_ll_by_hand(model.language_model, ids, len(lm.tokenizer(ctx).input_ids))[0], rel=1e-5)


def test_flan_t5_blip2_is_scored_as_seq2seq():
    model = build("blip2_t5")
    lm = QuantLLM(pretrained=model, tokenizer=word_tokenizer(128), bits_llm=4)
    assert lm.backend == "seq2seq" and lm.model is model.language_model
    ctx, cont = "w5 w9 w17", "w3 w40"
    ll, _ = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])[0]
    enc, dec = lm.tokenizer(ctx, return_tensors="pt").input_ids, lm.tokenizer(cont, return_tensors="pt").input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model.language_model(input_ids=enc, labels=dec).logits[0].double(), dim=-1)
    assert ll == pytest.approx(float(logp.gather(1, dec[0, :, None]).sum()), rel=1e-5)


# --------------------------------------------------------------------------- plain causal LMs (architectures.LANGUAGE_MODELS)

def _causal_lms():
    opt = T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=128, word_embed_proj_dim=32)
    return {"llama": T.LlamaForCausalLM(T.LlamaConfig(**TXT)), "mistral": T.MistralForCausalLM(T.MistralConfig(**TXT)),
            "qwen2": T.Qwen2ForCausalLM(T.Qwen2Config(**TXT)), "opt": T.OPTForCausalLM(opt)}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt"])
def test_bits_llm_quantizes_the_decoder_layers_of_a_plain_causal_lm(family):
    torch.manual_seed(0)
    model = _causal_lms()[family].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = quantize_(model, recipe_from_args({"bits_llm": 3}))
    assert report.family == family and report.components["llm"]["n_blocks"] == 2
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    assert changed == linears  # every decoder-layer Linear, nothing else (embeddings, norms, lm_head untouched)
    with pytest.raises(RecipeError, match="no 'vit' component"):
        plan(_causal_lms()[family], recipe_from_args({"bits_vit": 4}))


def test_plain_causal_lm_through_the_backend(tiny_llama):
    lm = QuantLLM(pretrained=tiny_llama, bits_llm=4, group_size_llm=16)
    meta = lm.get_model_info()["lmms_quant"]
    assert meta["model"]["kind"] == "llm" and meta["quantization"]["family"] == "llama"
    assert {m["component"] for m in meta["quantization"]["quantized_modules"]} == {"llm"}
    assert len(meta["quantization"]["quantized_modules"]) == 2 * 7
    assert count_levels(lm.model.model.layers[1].self_attn.o_proj.weight, 16) <= 16


# --------------------------------------------------------------------------- configuration errors

@pytest.mark.parametrize(("args", "match"), [
    ({"bitz_llm": 3}, "unknown key.*bitz_llm.*bits_llm"),
    ({"bits_llm": 9}, "bit width 9"),
    ({"bits_llm": 4, "method": "gptq", "calib_source": "task"}, "calib_source=task"),
])
def test_bad_model_args_fail_before_loading(args, match, capsys):
    with pytest.raises(BackendExit, match=match) as info:
        QuantLLM(pretrained="/no/such/model", **args)
    assert info.value.code == 2 and isinstance(info.value.__cause__, ConfigurationError)
    assert capsys.readouterr().err.strip() == f"lmms-quant: model load failed: {info.value.__cause__}"


def test_calibrated_methods_need_a_vlm(tiny_llama):
    with pytest.raises(BackendExit, match="plain causal LM") as info:
        QuantLLM(pretrained=tiny_llama, bits_llm=4, method="gptq", calib_source="world")
    assert info.value.code == 2


def test_the_default_calibration_of_a_hub_model_offline_names_the_model_the_set_and_the_way_out(tiny_llama):
    with pytest.raises(BackendExit, match=r"calibration set 'lmms-lab/flickr30k' \(split test\) could not be loaded") as info:
        QuantLLM(pretrained=tiny_llama, bits_llm=4, method="gptq")
    assert info.value.code == 3 and tiny_llama in str(info.value) and "calib_source=/path/to/folder" in str(info.value)


# --------------------------------------------------------------------------- wiring: registry, task, results JSON

def test_install_registers_the_backend_and_the_task():
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    lm_eval_plugin.install()
    lm_eval_plugin.install()  # idempotent: one wrapper, not two
    assert get_model("quant_llm") is QuantLLM
    assert not getattr(TaskManager.__init__.__wrapped__, "_lmms_quant", False)
    tm = TaskManager(include_defaults=False)
    assert "lq_text_ppl" in tm.all_tasks
    task = tm.load(["lq_text_ppl"])["tasks"]["lq_text_ppl"]
    docs = list(task.test_docs())
    assert [d["title"] for d in docs] == [d["title"] for d in read_documents()] and len(docs) == 6
    assert sum(task.count_words(task.doc_to_target(d)) for d in docs) == 3756
    assert task.OUTPUT_TYPE == "loglikelihood_rolling"
    assert set(task.aggregation()) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}


def test_install_in_a_fresh_process_keeps_lm_evals_own_backends():
    code = ("from lmms_quant.model_wrappers.lm_eval_plugin import install; install(); "
            "from lm_eval.api.registry import model_registry as r; print('hf' in r, 'quant_llm' in r)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["True", "True"], proc.stderr[-2000:]


def test_results_json_gets_a_top_level_lmms_quant_key(tmp_path):
    from lm_eval.loggers import EvaluationTracker

    lm_eval_plugin.install()
    tracker = EvaluationTracker(output_path=str(tmp_path))
    tracker.general_config_tracker.log_experiment_args(model_source="quant_llm", model_args="pretrained=tiny", system_instruction=None,
                                                       chat_template=None, fewshot_as_multiturn=False)
    meta = {"quantization": {"weights_sha256": "abc"}, "seed": 0}
    before = len(lm_eval_plugin.WRITTEN_RESULTS)
    tracker.save_results_aggregated(results={"results": {}, "config": {"model": "quant_llm", "lmms_quant": meta}}, samples=None)
    written = lm_eval_plugin.WRITTEN_RESULTS[before:]
    assert len(written) == 1
    saved = json.loads(open(written[0]).read())
    assert saved["lmms_quant"] == meta and "lmms_quant" not in saved["config"]
