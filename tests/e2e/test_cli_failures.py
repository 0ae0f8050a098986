"""Every load-time and evaluation-time failure of quant_vlm ends plain ``lmms-eval`` with a non-zero
status and one clear line, no traceback (lmms-eval 0.7.3 itself catches errors and exits 0)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.tiny_models import save_tiny_llava

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
BROKEN_TASK = """task: lq_test_broken_visual
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 2
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""
BROKEN_UTILS = """def doc_to_visual(doc):
    raise OSError(f"image {doc['image']} cannot be read")


def process_results(doc, results):
    return {"exact": float(results[0] == doc["answer"])}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    good = save_tiny_llava(root / "tiny-llava")
    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {"good": str(good), "truncated": str(truncated)}


def lmms_eval(model_args, tmp_path, *extra, tasks="lq_world_vqa"):
    cmd = [str(BIN / "lmms-eval"), "--model", "quant_vlm", "--model_args", model_args, "--tasks", tasks, "--limit", "2",
           "--output_path", str(tmp_path / "out"), *extra]
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)


def lines_of_ours(stderr):
    return [line for line in stderr.splitlines() if line.startswith("lmms-quant:")]


@pytest.mark.parametrize(("case", "status", "line"), [
    ("missing", 2, "lmms-quant: model load failed: pretrained='/no/such/model': no such folder; give a local checkpoint folder"),
    ("truncated", 1, "lmms-quant: model load failed: "),
    ("cuda", 2, "lmms-quant: invalid --model_args: device=cuda but this machine has no CUDA device; valid here: cpu"),
    ("float7", 2, "lmms-quant: invalid --model_args: unknown dtype 'float7'; valid: auto, float32, fp32, float16, fp16, bfloat16, bf16"),
])
def test_load_failures_exit_nonzero_with_one_line(models, tmp_path, case, status, line):
    args = {"missing": "pretrained=/no/such/model", "truncated": f"pretrained={models['truncated']}",
            "cuda": f"pretrained={models['good']},device=cuda", "float7": f"pretrained={models['good']},dtype=float7"}[case]
    proc = lmms_eval(args, tmp_path)
    assert proc.returncode == status, proc.stderr[-3000:]
    ours = lines_of_ours(proc.stderr)
    assert len(ours) == 1 and ours[0].startswith(line), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert not list(tmp_path.rglob("*_results.json"))


def test_an_evaluation_time_failure_exits_nonzero_and_debug_shows_the_traceback(models, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text('{"question": "what colour?", "answer": "red", "image": "gone.png"}\n' * 2)
    (tasks / "broken.yaml").write_text(BROKEN_TASK.format(data=tasks / "data.jsonl"))
    (tasks / "utils.py").write_text(BROKEN_UTILS)
    proc = lmms_eval(f"pretrained={models['good']}", tmp_path, "--include_path", str(tasks), tasks="lq_test_broken_visual")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert lines_of_ours(proc.stderr) == ["lmms-quant: evaluation (generate_until) failed: OSError: image gone.png cannot be read"]
    assert "Traceback" not in proc.stderr
    debug = lmms_eval(f"pretrained={models['good']}", tmp_path, "--include_path", str(tasks), "--verbosity", "DEBUG",
                      tasks="lq_test_broken_visual")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and 'raise OSError(f"image' in debug.stderr
