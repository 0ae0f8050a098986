"""Several processes: ``torchrun --nproc_per_node 2 -m lmms_eval --model quant_vlm`` and
``accelerate launch --multi_gpu --num_processes 2 -m lmms_eval ...`` (on a machine without GPUs accelerate
starts the processes and they talk over gloo on the CPU) split the requests by rank, gather them and give
exactly the results of one process; every rank quantizes the model itself, and their weight hashes are
checked equal and recorded.  Retrieval: the ranks exchange which documents of the gallery they hold and
each scores the whole gallery, so the ranks (and recall) are those of one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
ARGS = ["--model", "quant_vlm", "--model_args", "bits_llm=4,bits_vit=4", "--tasks", "lq_world_vqa,lq_world_caption,lq_world_retrieval", "--limit", "8",
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


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    one, samples, _ = run([str(BIN / "lmms-eval")], tmp / "out", tmp)
    return one, samples


LAUNCHERS = {
    "torchrun": lambda port: [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), "-m", "lmms_eval"],
    # accelerate launch --cpu starts one process (its CPU path needs mpirun for more); --multi_gpu starts N, gloo on the CPU
    "accelerate": lambda port: [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "lmms_eval"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_give_exactly_the_results_of_one(one_process, launcher, tmp_path):
    one, one_samples = one_process
    two, two_samples, proc = run(LAUNCHERS[launcher](free_port()), tmp_path / "two", tmp_path)
    assert len(one_samples) == 24 and two_samples == one_samples  # retrieval: every rank scored the whole 8-image gallery
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
