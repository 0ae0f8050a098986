"""Several processes: ``torchrun --nproc_per_node 2 -m lmms_eval --model quant_vlm`` splits the requests by
rank (gloo on the CPU), gathers them and gives exactly the results of one process; every rank quantizes
the model itself, and their weight hashes are checked equal and recorded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
ARGS = ["--model", "quant_vlm", "--model_args", "bits_llm=4,bits_vit=4", "--tasks", "lq_world_vqa,lq_world_caption", "--limit", "8",
        "--log_samples"]


def run(cmd, out, tmp_path):
    proc = subprocess.run([*cmd, *ARGS, "--output_path", str(out)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results] = list(out.rglob("*_results.json"))
    samples = {}
    for f in out.rglob("*_samples_*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            samples[(f.name.split("_samples_")[1], row["doc_id"])] = row["filtered_resps"]
    return json.loads(results.read_text()), samples, proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_exactly_the_results_of_one(tmp_path):
    one, one_samples, _ = run([str(BIN / "lmms-eval")], tmp_path / "one", tmp_path)
    two, two_samples, proc = run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "lmms_eval"],
                                 tmp_path / "two", tmp_path)
    assert len(one_samples) == 16 and two_samples == one_samples
    # the same scores; CIDEr's sums over documents gathered in another order may differ in the last bit
    for task, metrics in one["results"].items():
        for key, value in metrics.items():
            expected = pytest.approx(value, rel=1e-12) if isinstance(value, float) else value
            assert two["results"][task][key] == expected, (task, key)
    # the requests were split: rank 0 (whose progress bar shows; the other ranks' are off) answered 8 of the 16
    assert "quant_vlm generate: 100%|██████████| 8/8" in proc.stderr and "16/16" not in proc.stderr
    q1, q2 = one["lmms_quant"], two["lmms_quant"]
    assert q2["quantization"]["weights_sha256"] == q1["quantization"]["weights_sha256"]
    assert q2["ranks"] == {"world_size": 2, "weights_sha256_equal": True} and "ranks" not in q1
