"""Evaluate a zoo VLM on the world: ``python -m tools.zoo.evaluate --model toy-llava [--split test] [--limit N] [--rtn] [--json FILE]``.

VQA accuracy, caption scores and, with ``--rtn``, the per-component quantization tables, as
:mod:`tools.zoo.scoring` computes them; a retrieval model (``--model toy-blip2-itm``) gets
recall@1/5/10 both ways instead (:func:`tools.zoo.train_itm.evaluate_itm`).  The zoo's own check of
its models, independent of lmms-eval.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lmms_quant.zoo import MODELS_DIR

from .scoring import DATA_DIR, SCHEMES, evaluate, load, load_rows, rtn_table
from .train_itm import evaluate_itm, is_itm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-llava", help="a folder name under lmms_quant/zoo/models")
    parser.add_argument("--model-dir", type=Path, default=None, help="overrides --model")
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--split", default="test", choices=["test", "calibration"])
    parser.add_argument("--limit", type=int, default=None, help="first N VQA rows / caption rows")
    parser.add_argument("--rtn", action="store_true", help="also the per-component tables (rtn and uniform schemes)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--k-test", type=int, default=16, help="retrieval models: LAVIS's second-stage candidates")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or MODELS_DIR / args.model
    if is_itm(model_dir):  # a retrieval model: recall instead of VQA and captions
        t0 = time.time()
        result = {"model_dir": str(model_dir), "split": args.split}
        result.update(evaluate_itm(model_dir, args.split, args.limit, rtn=args.rtn, bits=args.bits, k_test=args.k_test))
        result["seconds"] = round(time.time() - t0, 1)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return
    model, processor, model_type = load(model_dir)
    vqa_rows = load_rows(args.data / f"vqa_{args.split}.jsonl", args.limit)
    caption_rows = load_rows(args.data / f"captions_{args.split}.jsonl", args.limit)
    t0 = time.time()
    result: dict = {"model_dir": str(model_dir), "split": args.split, "n_vqa": len(vqa_rows)}
    result["n_captions"] = len(caption_rows)
    result["fp"] = evaluate(model, processor, model_type, vqa_rows, caption_rows)
    print(json.dumps(result["fp"], indent=1))
    if args.rtn:
        for scheme in SCHEMES:
            result[scheme] = rtn_table(model, processor, model_type, vqa_rows, bits=args.bits, scheme=scheme)
    result["seconds"] = round(time.time() - t0, 1)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "fp"}, indent=1))


if __name__ == "__main__":
    main()
