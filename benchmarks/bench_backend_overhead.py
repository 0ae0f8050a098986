"""quant_vlm at 16 bits against lmms-eval's own llava_hf backend: same model, same task, same prompts.

    python benchmarks/bench_backend_overhead.py --limit 200

Both backends are built first (load time excluded), then timed through
lmms-eval's ``simple_evaluate`` on ``lq_world_vqa`` with ``--limit`` documents
at batch size 1 (llava_hf supports no other).  quant_vlm runs twice per batch
size: ``serve=auto`` (for a LLaVA, lmms-eval's own llava_hf serves the requests,
one at a time) and ``serve=quant_vlm`` (its own batched serving) at batch sizes
1 and 8.  Log-likelihood: ``--limit`` requests (each document's question and its
answer as the continuation) through ``loglikelihood`` directly, llava_hf against
quant_vlm's own serving at batch sizes 1 and 8, with the largest difference of
the mean NLLs.  The model is the built-in tiny LLaVA saved with a chat template
so that both backends build the identical prompt.  Prints documents per second
and the ratios to llava_hf (goal >= 1.0 at every batch size).

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
        "quant_vlm own (bs 1)": ("quant_vlm", f"pretrained={path},serve=quant_vlm", 1),
        "quant_vlm own (bs 8)": ("quant_vlm", f"pretrained={path},serve=quant_vlm", 8),
    }
    rates, answers, models = {}, {}, {}
    for label, (name, margs, bs) in runs.items():
        lm = get_model(name, force_simple=True).create_from_arg_string(margs, {"batch_size": bs, "device": "cpu"})
        lm.clean = lambda: None  # lmms-eval's default clean() deletes the model after each evaluate; we repeat runs
        models[label] = lm
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = evaluator.simple_evaluate(model=lm, tasks=["lq_world_vqa"], limit=args.limit, batch_size=bs, log_samples=True,
                                            verbosity="ERROR")
            best = min(best, time.perf_counter() - t0)
        rates[label] = args.limit / best
        answers[label] = [s["filtered_resps"][0] for s in out["samples"]["lq_world_vqa"]]
        print(f"{label:22s} {rates[label]:8.1f} docs/s  ({best:.2f}s for {args.limit} docs, best of {args.repeats})", flush=True)
    print("generate_until:")
    for label in runs:
        if label.startswith("quant_vlm"):
            same = sum(a == b for a, b in zip(answers["llava_hf (bs 1)"], answers[label]))
            print(f"  {label:22s} / llava_hf (bs 1): {rates[label] / rates['llava_hf (bs 1)']:.3f}x, identical answers {same}/{args.limit}")
    loglikelihood(models, args.limit, args.repeats)


def loglikelihood(models, limit, repeats) -> None:
    """Each document's question with its answer as the continuation, through ``loglikelihood``."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict(["lq_world_vqa"], TaskManager("ERROR"))["lq_world_vqa"]
    docs = task.test_docs()
    requests = [Instance("loglikelihood", (task.doc_to_text(docs[i]), " " + docs[i]["multiple_choice_answer"], task.doc_to_visual, i,
                                          "lq_world_vqa", "test"), i, {"task": "lq_world_vqa", "doc_id": i, "repeats": 1})
                for i in range(limit)]
    print("loglikelihood:")
    results, rates = {}, {}
    for label in ("llava_hf (bs 1)", "quant_vlm own (bs 1)", "quant_vlm own (bs 8)"):
        lm = models[label]
        lm.task_dict = {"lq_world_vqa": {"test": docs}}
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            results[label] = [tuple(r) for r in lm.loglikelihood(requests)]
            best = min(best, time.perf_counter() - t0)
        rates[label] = limit / best
        diff = max(abs(a[0] - b[0]) for a, b in zip(results[label], results["llava_hf (bs 1)"]))
        print(f"  {label:22s} {rates[label]:8.1f} req/s  {rates[label] / rates['llava_hf (bs 1)']:.3f}x llava_hf; "
              f"max |mean NLL - llava_hf's| {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
