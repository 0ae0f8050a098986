"""Retrieval end to end through the real lmms-eval CLI: a tiny random CLIP (saved with a CLIPProcessor) on lq_world_retrieval."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.tiny_retrieval import save_tiny_clip

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
RECALLS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]


def test_retrieval_through_the_cli_reports_recalls_and_logs_ranks_not_embeddings(tmp_path):
    model = save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "out"
    proc = subprocess.run([str(BIN / "lmms-eval"), "--model", "quant_vlm", "--model_args", f"pretrained={model},bits_vit=4,bits_llm=4",
                           "--tasks", "lq_world_retrieval", "--limit", "12", "--output_path", str(out), "--log_samples"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results_file] = list(out.rglob("*_results.json"))
    results = json.loads(results_file.read_text())
    metrics = results["results"]["lq_world_retrieval"]
    assert set(f"{m},none" for m in [*RECALLS, "mean_recall"]) <= set(metrics)
    # the backend scored one gallery, the 12 --limit images and their 60 captions, with one encoder pass per batch of 64
    stats = results["lmms_quant"]["retrieval"]["lq_world_retrieval"]
    assert (stats["scorer"], stats["n_images"], stats["n_texts"]) == ("dual_encoder", 12, 60)
    assert (stats["image_forwards"], stats["text_forwards"], stats["rerank_forwards"]) == (1, 1, 0)
    assert {m["component"] for m in results["lmms_quant"]["quantization"]["quantized_modules"]} == {"vit", "llm"}

    [samples_file] = list(out.rglob("*samples_lq_world_retrieval.jsonl"))
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 12 and max(len(line) for line in samples_file.read_text().splitlines()) < 2000
    answers = [json.loads(s["filtered_resps"]) for s in samples]
    assert all(set(a) == {"i2t", "t2i", "gallery"} and a["gallery"] == [12, 60] and len(a["i2t"]) == 5 for a in answers)
    assert all(isinstance(r, int) for a in answers for r in a["i2t"] + a["t2i"])  # ranks, never embeddings
    # the reported recalls are those of the logged ranks
    for metric in RECALLS:
        direction, k = metric.split("_R@")
        ranks = [min(a["i2t"]) for a in answers] if direction == "i2t" else [r for a in answers for r in a["t2i"]]
        assert metrics[f"{metric},none"] == pytest.approx(100 * sum(r < int(k) for r in ranks) / len(ranks))
    assert metrics["mean_recall,none"] == pytest.approx(sum(metrics[f"{m},none"] for m in RECALLS) / 6)


def test_shipped_blip2_itm_at_8_bits_through_the_cli_matches_full_precision(tmp_path):
    """toy-blip2-itm by zoo name on the full-gallery task: LAVIS two-stage scoring, ViT and Q-Former
    at 8 bits, recall within 2 points of the same model in full precision scored in process."""
    from lmms_quant.zoo import model_dir
    from tools.zoo.train_itm import evaluate_itm

    fp = evaluate_itm(model_dir("toy-blip2-itm"), "test", limit=100, k_test=16, log=lambda s: None)["fp"]
    out = tmp_path / "out"
    proc = subprocess.run([str(BIN / "lmms-eval"), "--model", "quant_vlm", "--model_args", "pretrained=toy-blip2-itm,bits_vit=8,bits_connector=8",
                           "--tasks", "lq_world_retrieval_full", "--limit", "100", "--output_path", str(out)],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results_file] = list(out.rglob("*_results.json"))
    results = json.loads(results_file.read_text())
    stats = results["lmms_quant"]["retrieval"]["lq_world_retrieval_full"]
    assert (stats["scorer"], stats["n_images"], stats["n_texts"]) == ("blip2_itm", 100, 500)
    assert stats["rerank_pairs"] > 0
    assert {m["component"] for m in results["lmms_quant"]["quantization"]["quantized_modules"]} == {"vit", "connector"}
    metrics = results["results"]["lq_world_retrieval_full"]
    for m in ("i2t_R@1", "t2i_R@1"):
        assert abs(metrics[f"{m},none"] - fp[m]) <= 2.0, (m, metrics[f"{m},none"], fp[m])
