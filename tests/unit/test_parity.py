"""Parity with lmms-eval's own backends: the same tiny local model and tasks through lmms-eval's
backend and through quant_vlm at 16 bits give identical predictions per document (with
--log_samples' per-document responses), and quant_vlm records which backend served it."""

import os

import pytest
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager

from lmms_quant.model_wrappers.lmms_eval_tasks import LoglikelihoodResult
from lmms_quant.model_wrappers.plugin import manifests
from lmms_quant.model_wrappers.quant_vlm import QuantVLM
from tests.fixtures.lmms_eval_rows import FIXTURES, local_name, write_tasks
from tests.fixtures.local_models import save_qwen2_vl
from tests.fixtures.tiny_models import save_tiny_llava

#: VQA, yes/no, multiple choice by letter (generate_until), multiple choice by log-likelihood
PARITY_TASKS = ("chartqa", "pope", "ai2d", "worldvqa_mc_ppl")
#: lmms-eval's Qwen backends have no loglikelihood, so the log-likelihood task is compared on LLaVA only
GENERATION_TASKS = PARITY_TASKS[:3]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    manifests()  # our task folder and results hook, as lmms-eval's CLI would load them
    return write_tasks(tmp_path_factory.mktemp("tasks"), [f for f in FIXTURES if f.task in PARITY_TASKS])


def predictions(lm, task_dir, tmp_path, tasks=PARITY_TASKS):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # some tasks write submission files into the working directory
    try:
        out = simple_evaluate(model=lm, tasks=[local_name(t) for t in tasks],
                              task_manager=TaskManager(include_path=str(task_dir)), log_samples=True, batch_size=1, limit=4,
                              gen_kwargs="max_new_tokens=6")
    finally:
        os.chdir(cwd)
    preds = {t: [(s["doc_id"], s["resps"]) for s in samples] for t, samples in out["samples"].items()}
    assert sorted(preds) == sorted(local_name(t) for t in tasks) and all(len(p) >= 3 for p in preds.values()), preds
    return preds


def spy_inputs(model) -> list[tuple]:
    """Record what each ``model.generate`` call receives: the prompt's token ids and a hash of the pixels."""
    import hashlib

    seen: list[tuple] = []
    original = model.generate

    def generate(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        pixels = kwargs.get("pixel_values")
        digest = None if pixels is None else hashlib.sha256(pixels.float().contiguous().numpy().tobytes()).hexdigest()
        seen.extend((tuple(row.tolist()), digest) for row in ids)
        return original(*args, **kwargs)

    model.generate = generate
    return seen


FAMILIES = {
    # family: (writer, lmms-eval backend class path, its kwargs, quant_vlm dtype)
    "llava": (lambda p: save_tiny_llava(p, seed=2), "lmms_eval.models.simple.llava_hf.LlavaHf",
              {"device": "cpu", "device_map": "cpu", "dtype": "float32"}, "float32"),
    "qwen2_vl": (lambda p: save_qwen2_vl(p, seed=2, version="2"), "lmms_eval.models.simple.qwen2_vl.Qwen2_VL",
                 {"device": "cpu", "device_map": "cpu"}, "float32"),
    "qwen2_5_vl": (lambda p: save_qwen2_vl(p, seed=2, version="2.5"), "lmms_eval.models.simple.qwen2_5_vl.Qwen2_5_VL",
                   {"device": "cpu", "device_map": "cpu"}, "bfloat16"),  # the backend loads bfloat16, always
}


@pytest.mark.parametrize("family", [pytest.param(f, marks=[pytest.mark.slow] if f.startswith("qwen") else []) for f in sorted(FAMILIES)])
def test_quant_vlm_at_16_bits_predicts_exactly_what_lmms_evals_backend_predicts(family, task_dir, tmp_path, one_thread):
    import importlib

    writer, class_path, kwargs, dtype = FAMILIES[family]
    model_dir = str(writer(tmp_path / family))
    module, name = class_path.rsplit(".", 1)
    tasks = PARITY_TASKS if family == "llava" else GENERATION_TASKS
    backend = getattr(importlib.import_module(module), name)

    class Reference(backend):
        """The backend as it is, its (nll, is_greedy) pairs wrapped as quant_vlm wraps them: lmms-eval 0.7.3's
        unwrap_generation_output turns a bare tuple into a string, so multiple_choice fails on its own backends."""

        def loglikelihood(self, requests):
            return [LoglikelihoodResult(*r) for r in super().loglikelihood(requests)]

    ref_lm = Reference(pretrained=model_dir, **kwargs)
    ref_inputs = spy_inputs(ref_lm.model)
    reference = predictions(ref_lm, task_dir, tmp_path, tasks)
    lm = QuantVLM(pretrained=model_dir, device="cpu", dtype=dtype)
    assert lm.serving["by"] == class_path.split(".")[-2] and lm.serving["lmms_eval"] == "0.7.3"
    assert lm.recipe.is_noop
    our_inputs = spy_inputs(lm.model)
    ours = predictions(lm, task_dir, tmp_path, tasks)
    assert ours == reference
    # the same prompts and pixels reach the model (a tiny random model may answer alike whatever it is shown)
    assert ref_inputs and sorted(our_inputs) == sorted(ref_inputs)
    # the study's prompt formats stay behind serve=quant_vlm
    assert QuantVLM(pretrained=model_dir, device="cpu", dtype=dtype, serve="quant_vlm").serving["by"] == "quant_vlm"


def test_the_backend_serves_the_quantized_model(tmp_path, one_thread):
    from lmms_quant.apply import count_levels

    model_dir = str(save_tiny_llava(tmp_path / "llava", seed=2))
    lm = QuantVLM(pretrained=model_dir, device="cpu", bits_llm=2, cache=False)
    assert lm._delegate.model is lm.model
    w = lm._delegate.model.model.language_model.layers[0].mlp.down_proj.weight
    assert count_levels(w, -1) <= 4
    assert lm.metadata["serving"]["by"] == "llava_hf"


def test_serve_lmms_eval_is_refused_for_a_family_lmms_eval_has_no_backend_for():
    from lmms_quant.model_wrappers.exits import BackendExit

    with pytest.raises(BackendExit, match=r"lmms-eval 0.7.3 has no backend of its own for the 'blip2' family; families it serves: "
                                          r"llava, llava_next, llava_onevision, qwen2_5_vl, qwen2_vl; use serve=quant_vlm"):
        QuantVLM(pretrained="toy-blip2", serve="lmms_eval")
    with pytest.raises(BackendExit, match=r"unknown serve 'vllm'; valid: auto, lmms_eval, quant_vlm"):
        QuantVLM(pretrained="toy-blip2", serve="vllm")


@pytest.mark.parametrize("name", [pytest.param("llava_hf"), pytest.param("qwen2_5_vl", marks=pytest.mark.slow)])
def test_the_chat_backend_the_cli_resolves(name, task_dir, tmp_path, one_thread):
    """``--model llava_hf`` / ``--model qwen2_5_vl`` resolve to lmms-eval 0.7.3's *chat* backends (chat wins
    over simple unless --force_simple).  quant_vlm serves through the simple ones.  LLaVA's chat backend
    feeds the model exactly what quant_vlm does; Qwen2.5-VL's chat backend tokenizes the same prompts but
    preprocesses the images differently, so compare quant_vlm with ``--model qwen2_5_vl --force_simple``
    (docs/lmms-eval-quirks.md)."""
    from lmms_eval.models import get_model

    from lmms_quant.builtin_models import save_tiny_llava as save_chat_llava

    if name == "llava_hf":
        model_dir, kwargs, dtype = str(save_chat_llava(tmp_path / "llava", chat_template=True)), {"dtype": "float32"}, "float32"
    else:
        model_dir, kwargs, dtype = str(save_qwen2_vl(tmp_path / "qwen", seed=2, version="2.5")), {}, "bfloat16"
    chat_cls = get_model(name)
    assert not getattr(chat_cls, "is_simple", True), f"{name} should resolve to a chat backend"
    chat = chat_cls(pretrained=model_dir, device="cpu", device_map="cpu", **kwargs)
    chat_inputs = spy_inputs(chat.model)
    chat_preds = predictions(chat, task_dir, tmp_path, GENERATION_TASKS)
    lm = QuantVLM(pretrained=model_dir, device="cpu", dtype=dtype)
    our_inputs = spy_inputs(lm.model)
    ours = predictions(lm, task_dir, tmp_path, GENERATION_TASKS)
    assert chat_inputs and sorted(ids for ids, _ in our_inputs) == sorted(ids for ids, _ in chat_inputs)  # the same prompts
    if name == "llava_hf":
        assert sorted(our_inputs) == sorted(chat_inputs) and ours == chat_preds
    else:  # upstream: the chat backend's image preprocessing differs from the simple backend's
        assert sorted(our_inputs) != sorted(chat_inputs)
