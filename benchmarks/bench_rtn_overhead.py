"""Data-free quantize_ (RTN) on a SmolLM2-135M-shaped model: time and peak RSS against the fp model.

    python benchmarks/bench_rtn_overhead.py [--threads 2] [--bits 4] [--group-size 64]

A random LlamaForCausalLM with SmolLM2-135M's shapes (hidden 576, MLP 1536, 30 layers, 9/3 heads,
vocabulary 49,152: 210 Linears in the decoder blocks) is built, then quantize_ runs once with the
levels check and the weights hash.  Prints seconds, peak RSS before and after, and their ratio,
and the share of the time the levels check takes.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import transformers as T

from lmms_quant import quantize_, recipe_from_args
from lmms_quant.apply import count_levels


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                        vocab_size=49152)
    model = T.LlamaForCausalLM(cfg).eval()
    fp_rss = peak_rss_mib()
    t0 = time.perf_counter()
    report = quantize_(model, recipe_from_args({"bits_llm": args.bits, "method": "rtn", "group_size": args.group_size}))
    seconds = time.perf_counter() - t0
    q_rss = peak_rss_mib()
    t0 = time.perf_counter()
    for name, mod in model.named_modules():
        if name in {m["name"] for m in report.modules[:30]}:
            count_levels(mod.weight, args.group_size)
    count_s = (time.perf_counter() - t0) * len(report.modules) / 30
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(report.modules)} quantized Linears, "
          f"{args.threads} threads")
    print(f"quantize_ {seconds:.2f} s (levels proven on the grid; counting them by sorting, the fallback, would add ~{count_s:.1f} s)")
    print(f"peak RSS fp model {fp_rss:.0f} MiB, after quantize_ {q_rss:.0f} MiB: ratio {q_rss / fp_rss:.3f}")
    print(f"weights_sha256 {report.weights_sha256[:16]}")


if __name__ == "__main__":
    main()
