"""End to end through the real lmms-eval CLI (subprocesses), on the bundled offline tasks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.tiny_models import save_tiny_llava

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return str(save_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava"))


def run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def test_quant_vlm_run_writes_results_with_quantization_metadata(tiny_llava, tmp_path):
    out = tmp_path / "out"
    proc = run([str(BIN / "lmms-eval"), "--model", "quant_vlm", "--model_args", f"pretrained={tiny_llava},bits_llm=3,bits_vit=4,group_size_vit=16",
                "--tasks", "lq_offline", "--limit", "6", "--batch_size", "3", "--output_path", str(out), "--log_samples"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.rglob("*_results.json"))
    assert len(files) == 1, proc.stderr[-3000:]
    results = json.loads(files[0].read_text())
    # the harness's own reporting, for both task types, without --include_path
    assert set(results["results"]) >= {"lq_world_vqa", "lq_world_caption"}
    assert 0.0 <= results["results"]["lq_world_vqa"]["vqa_accuracy,none"] <= 1.0
    assert "CIDEr,none" in results["results"]["lq_world_caption"]
    meta = results["lmms_quant"]
    q = meta["quantization"]
    assert q["recipe"]["llm"]["bits"] == 3 and q["recipe"]["vit"]["bits"] == 4 and q["recipe"]["vit"]["group_size"] == 16
    assert q["recipe"]["connector"]["bits"] == 16
    assert {m["component"] for m in q["quantized_modules"]} == {"vit", "llm"}
    assert len(q["quantized_modules"]) == 12 + 14
    assert 3 < q["bpw"]["model"]["study"] < 16 and q["bpw"]["llm"]["study"] < q["bpw"]["vit"]["study"]
    assert len(q["weights_sha256"]) == 64
    assert meta["versions"]["lmms-eval"] == "0.7.3" and meta["versions"]["transformers"]
    assert meta["seed"] == 0 and meta["model"]["class"] == "LlavaForConditionalGeneration"
    samples = list(out.rglob("*lq_world_vqa.jsonl"))
    assert samples, "per-sample log missing"


def test_bad_model_args_fail_the_process_before_loading(tiny_llava, tmp_path):
    proc = run([str(BIN / "lmms-eval"), "--model", "quant_vlm", "--model_args", f"pretrained={tiny_llava},bits_llm=9",
                "--tasks", "lq_world_vqa", "--limit", "2", "--output_path", str(tmp_path / "out")], tmp_path)
    assert proc.returncode != 0
    assert "bit width 9 is out of range; valid: 2, 3, 4, 5, 6, 7, 8, 16" in proc.stderr
    assert not list((tmp_path).rglob("*_results.json"))
    proc = run([str(BIN / "lmms-eval"), "--model", "quant_vlm", "--model_args", f"pretrained={tiny_llava},bitz=4",
                "--tasks", "lq_world_vqa", "--limit", "2"], tmp_path)
    assert proc.returncode != 0
    assert "unknown key(s) ['bitz']; valid backend keys: pretrained" in proc.stderr


def test_our_cli_exits_nonzero_when_the_evaluation_fails(tmp_path):
    proc = run([str(BIN / "lmms-quant"), "eval", "--model", "quant_vlm", "--model_args", "pretrained=/no/such/model",
                "--tasks", "lq_world_vqa", "--limit", "2"], tmp_path)
    assert proc.returncode == 2  # a configuration error (exit statuses: lmms_quant.errors.EXIT_STATUS)
    assert "lmms-quant: model load failed: pretrained='/no/such/model': no such folder" in proc.stderr


def test_a_regular_pip_install_serves_the_backend_and_the_tasks(tmp_path):
    """`pip install .` (not editable): build the wheel, install it to a folder that shadows the editable install."""
    root = Path(__file__).resolve().parents[2]
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(root), "-w", str(wheel_dir)], check=True, env=ENV, timeout=300)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *map(str, wheel_dir.glob("*.whl"))],
                   check=True, env=ENV, timeout=300)
    script = (
        "import sys, lmms_quant; print('FROM', lmms_quant.__file__)\n"
        "sys.argv = ['lmms-eval', '--model', 'quant_vlm', '--model_args', 'bits_llm=4', '--tasks', 'lq_world_vqa', '--limit', '2',"
        f" '--output_path', {str(tmp_path / 'out')!r}]\n"
        "from lmms_eval.__main__ import cli_evaluate; cli_evaluate()\n"
    )
    env = {**ENV, "PYTHONPATH": str(target), "LMMS_QUANT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert f"FROM {target}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = list((tmp_path / "out").rglob("*_results.json"))
    assert len(results) == 1, proc.stderr[-3000:]
    from lmms_quant.models import DEFAULT_MODEL

    assert json.loads(results[0].read_text())["lmms_quant"]["model"]["name"] == DEFAULT_MODEL


@pytest.mark.parametrize("method_args", ["method=gptq,bits_llm=3,bits_vit=4", "method=awq,group_size=16,bits_llm=3,bits_vit=4"])
def test_gptq_and_awq_through_the_cli_record_their_calibration(tmp_path, method_args):
    out = tmp_path / "out"
    env = {**ENV, "LMMS_QUANT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([str(BIN / "lmms-eval"), "--model", "quant_vlm", "--model_args",
                           f"pretrained=tiny-random-llava,{method_args},calib_samples=8,calib_seed=3",
                           "--tasks", "lq_world_vqa", "--limit", "3", "--output_path", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    q = json.loads(next(out.rglob("*_results.json")).read_text())["lmms_quant"]["quantization"]
    calib = q["calibration"]
    assert (calib["source"], calib["samples"], calib["seed"], calib["cache"]) == ("world", 8, 3, "miss")
    assert len(calib["sha256"]) == 64 and len(calib["layers"]) == 26
    assert {m["method"] for m in q["quantized_modules"]} == {method_args.split(",")[0].split("=")[1]}


def test_shipped_blip2_at_8_bits_through_the_cli_matches_full_precision(tmp_path):
    """toy-blip2 (BLIP-2 OPT) by zoo name: every component at 8 bits through lmms-eval's
    VQA and caption tasks, VQA within 2 points of the same model in full precision
    scored in process on the same rows, and captions that score."""
    import torch

    from lmms_quant.zoo import model_dir
    from tools.zoo import scoring as ev

    torch.set_num_threads(1)
    model, processor, model_type = ev.load(model_dir("toy-blip2"))
    rows = ev.load_rows(ev.DATA_DIR / "vqa_test.jsonl", limit=60)
    fp = ev.evaluate(model, processor, model_type, rows, [])["vqa"]
    out = tmp_path / "out"
    proc = run([str(BIN / "lmms-eval"), "--model", "quant_vlm", "--model_args", "pretrained=toy-blip2,bits_vit=8,bits_connector=8,bits_llm=8",
                "--tasks", "lq_world_vqa,lq_world_caption", "--limit", "60", "--batch_size", "30", "--output_path", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results_file] = list(out.rglob("*_results.json"))
    results = json.loads(results_file.read_text())
    assert results["lmms_quant"]["model"]["class"] == "Blip2ForConditionalGeneration"
    assert {m["component"] for m in results["lmms_quant"]["quantization"]["quantized_modules"]} == {"vit", "connector", "llm"}
    vqa = results["results"]["lq_world_vqa"]["vqa_accuracy,none"]
    assert abs(vqa - fp) <= 0.02, (vqa, fp)
    assert results["results"]["lq_world_caption"]["CIDEr,none"] > 1.0
