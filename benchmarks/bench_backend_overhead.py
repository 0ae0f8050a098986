"""quant_vlm at 16 bits against lmms-eval's own llava_hf backend: same model, same task, same prompts.

    python benchmarks/bench_backend_overhead.py --limit 200

Both backends are built first (load time excluded), then timed through
lmms-eval's ``simple_evaluate`` on ``lq_world_vqa`` with ``--limit`` documents
at batch size 1 (llava_hf supports no other); quant_vlm is also timed at
batch size 8.  The model is the built-in tiny LLaVA saved with a chat template
so that both backends build the identical prompt.  Prints documents per second
and the ratio quant_vlm / llava_hf (goal >= 0.95 at batch size 1).

llava_hf imports ``decord`` (for video), which lmms-eval does not declare; the
benchmark registers an empty stand-in module because no video is read.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    sys.modules.setdefault("decord", types.SimpleNamespace(VideoReader=None, cpu=None))
    import torch
    from lmms_eval import evaluator
    from lmms_eval.models import get_model

    from lmms_quant.builtin_models import save_tiny_llava

    torch.set_num_threads(1)
    path = save_tiny_llava(Path(tempfile.mkdtemp()) / "tiny-llava-chat", chat_template=True)
    runs = {
        "llava_hf (bs 1)": ("llava_hf", f"pretrained={path},dtype=float32,device_map=cpu", 1),
        "quant_vlm (bs 1)": ("quant_vlm", f"pretrained={path}", 1),
        "quant_vlm (bs 8)": ("quant_vlm", f"pretrained={path}", 8),
    }
    rates, answers = {}, {}
    for label, (name, margs, bs) in runs.items():
        lm = get_model(name, force_simple=True).create_from_arg_string(margs, {"batch_size": bs, "device": "cpu"})
        lm.clean = lambda: None  # lmms-eval's default clean() deletes the model after each evaluate; we repeat runs
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = evaluator.simple_evaluate(model=lm, tasks=["lq_world_vqa"], limit=args.limit, batch_size=bs, log_samples=True,
                                            verbosity="ERROR")
            best = min(best, time.perf_counter() - t0)
        rates[label] = args.limit / best
        answers[label] = [s["filtered_resps"][0] for s in out["samples"]["lq_world_vqa"]]
        print(f"{label:18s} {rates[label]:8.1f} docs/s  ({best:.2f}s for {args.limit} docs, best of {args.repeats})", flush=True)
    same = sum(a == b for a, b in zip(answers["llava_hf (bs 1)"], answers["quant_vlm (bs 1)"]))
    print(f"identical answers quant_vlm vs llava_hf: {same}/{args.limit}")
    print(f"throughput ratio quant_vlm/llava_hf at batch size 1: {rates['quant_vlm (bs 1)'] / rates['llava_hf (bs 1)']:.3f} (goal >= 0.95)")
    print(f"throughput ratio quant_vlm (bs 8)/llava_hf (bs 1): {rates['quant_vlm (bs 8)'] / rates['llava_hf (bs 1)']:.3f}")


if __name__ == "__main__":
    main()
