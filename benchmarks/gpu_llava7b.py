"""Real low-bit LLaVA on a GPU: memory, speed and fake-versus-real parity of a 7B-shaped random-weight LLaVA-1.5.

    python benchmarks/gpu_llava7b.py                       # CUDA, 7B shapes, 4-bit (about 1-2 minutes on an H100)
    python benchmarks/gpu_llava7b.py --int8                # plus RTN w8 per-channel through the int8 kernel
    python benchmarks/gpu_llava7b.py --device cpu --tiny   # local smoke test of the same code path (tiny shapes)

The model is LlavaForConditionalGeneration built from a config with the
shapes of llava-1.5-7b: a CLIP ViT-L/14-336 vision tower (hidden 1024, 24
layers, 16 heads, MLP 4096, 336 px, patch 14: 576 image tokens), the
1024 -> 4096 -> 4096 projector and a Llama-7B text model (hidden 4096, 32
layers, 32 heads, MLP 11008, vocabulary 32064).  It is built directly on the
device in fp16 and initialised with seeded N(0, 0.02) weights (norm weights 1,
biases 0): no download, no processor; the input is one random 336x336 image
and 64 text tokens (``<s>``, 576 image tokens, 63 random ids: 640 positions).

Rows of the table (and of the JSON written to ``--json``, default
``$OUT/gpu_llava7b.json`` when ``$OUT`` is set):

* ``fp16``: the unquantized model;
* ``sim w4``: the same model after ``quantize_`` with RTN, 4 bits, symmetric,
  groups of 128, on the ViT and the LLM (the projector, embeddings and
  ``lm_head`` stay fp16) -- simulated: quantize-dequantize weights in fp16, so
  it costs what fp16 costs;
* ``real w4``: after ``to_lowbit_`` in place: every quantized Linear is a
  ``LowBitLinear`` whose codes stay packed and run through PyTorch's int4
  tinygemm kernel (``torch.ops.aten._weight_int4pack_mm``; on CUDA it takes
  bf16 activations and bf16 scales, so the output is cast back to fp16);
* with ``--int8``: ``sim w8`` / ``real w8``, the model rebuilt from the same
  seed and quantized with RTN, 8 bits, symmetric, per output channel, run
  through ``torch.ops.aten._weight_int8pack_mm``.

Columns: ``weights GiB`` (bytes of parameters and buffers,
``module_bytes``), ``peak GiB`` (``torch.cuda.max_memory_allocated`` over that
row's forwards, weights included; n/a on the CPU), ``prefill ms`` (median of a
forward of the 640-token prompt with the image, ``use_cache=True``, all
logits), ``decode ms`` (median of one single-token forward with the KV cache of
the 640-token prompt, cropped back after every step so that every step sees
the same cache), their ratios to fp16, the bpw the results JSON would report
(``QuantReport.bpw["model"]``, study convention and exact storage) and the
parity.

Parity (fake versus real): ``max |logits_real - logits_sim| / max |logits_sim|``
over all 640 x 32064 logits of the prompt.  The real model computes with bf16
activations and bf16 scales (tinygemm's contract) while the simulated model is
fp16, so the two differ by bf16 rounding (unit roundoff 2**-9, 8x fp16's)
accumulated through 24 + 32 blocks, and nothing else: the codes are the same
integers.  The same difference is measured for a bf16 copy of the simulated
model (``bf16 floor``, what bf16 alone costs, no kernel involved; it rounds
embeddings, norms, attention and ``lm_head`` too, so it is usually above the
real model's difference).  The stated tolerance is ``--tol``, default 0.05 of
the largest logit.  Why: a random LLaVA of the same depth (24 ViT + 32 LLM
blocks, narrower) on the CPU gave real-vs-sim 1.2e-2 and a bf16 floor of
2.1e-2, so 0.05 leaves a 2-4x margin for bf16 noise, while a wrong code,
scale, zero point, group or nibble order perturbs every weight by about a
quantization step, an error of the size of the 4-bit quantization error
itself (sim-vs-fp16, printed too: about 0.3 of the largest logit).  The
script prints PASS or FAIL (saying so when a FAIL is still within the bf16
floor) and exits 1 on FAIL.

``gate_proj us``: the first LLM block's ``mlp.gate_proj`` (4096 -> 11008)
timed alone on 1 token and on the prompt's tokens, i.e. the kernel without the
framework's per-layer Python overhead, which dominates a 1-token decode step.

Every number comes from this run; nothing is hard-coded.  Refuses to run
without CUDA unless ``--device cpu --tiny``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T0 = time.perf_counter()
GIB = 2**30
#: The Linear timed alone (4096 -> 11008 at 7B shapes).
LAYER = "model.language_model.layers.0.mlp.gate_proj"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def llava_config(tiny: bool):
    import transformers as T

    if tiny:  # every Linear's input width a multiple of 128 (tinygemm on CUDA); 4x4 patches -> 16 image tokens
        vision = T.CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=56, patch_size=14, projection_dim=128, hidden_act="quick_gelu")
        text = T.LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=1024, max_position_embeddings=1024, rms_norm_eps=1e-5)
        return T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=1000, image_seq_length=16,
                             projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2)
    vision = T.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = T.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
    return T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                         projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2)


@torch.no_grad()
def init_random_(model: torch.nn.Module, std: float = 0.02) -> None:
    """Seeded, deterministic init: norm weights 1, biases 0, every other parameter N(0, std)."""
    for mod in model.modules():
        is_norm = isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm")
        for pname, p in mod.named_parameters(recurse=False):
            if is_norm and pname == "weight":
                p.fill_(1.0)
            elif pname == "bias":
                p.zero_()
            else:
                p.normal_(0.0, std)


def build(cfg, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """LlavaForConditionalGeneration made directly on ``device`` in ``dtype`` (no CPU copy), then seeded init."""
    import transformers as T

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = T.LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(prev)
    torch.manual_seed(seed)
    init_random_(model)
    model.eval()
    bad = [n for n, p in model.named_parameters() if p.dtype != dtype or p.device.type != device.type]
    if bad:
        raise RuntimeError(f"{len(bad)} parameters not {dtype} on {device}, e.g. {bad[:3]}")
    return model


def make_inputs(cfg, device: torch.device, dtype: torch.dtype, n_text: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    img = cfg.image_token_index
    text = torch.randint(3, img, (n_text - 1,), generator=gen)
    ids = torch.cat([torch.tensor([1]), torch.full((cfg.image_seq_length,), img), text]).unsqueeze(0)
    size = cfg.vision_config.image_size
    pix = torch.randn(1, 3, size, size, generator=gen)
    return {"input_ids": ids.to(device), "pixel_values": pix.to(device, dtype)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: torch.device, warmup: int, repeat: int, after=None, max_s: float = 20.0) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU); ``after()`` runs after each call, untimed.

    Stops early once the calls have taken ``max_s`` seconds in all (a slow kernel:
    the int8 kernel at 640 tokens on an H100 took more than 9 s per prefill), keeping
    at least one sample (a warm-up call if need be).
    """
    times, spent = [], 0.0
    for i in range(warmup + repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = 1e3 * (time.perf_counter() - t0)
        if after is not None:
            after()
        if i >= warmup:
            times.append(ms)
        spent += ms / 1e3
        if spent > max_s:
            if not times:
                times.append(ms)
            break
    return statistics.median(times)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(model, inputs, device: torch.device, label: str, reps: dict) -> tuple[dict, torch.Tensor]:
    """Weights bytes, peak memory, prefill and decode latency of ``model``; also returns its prompt logits (float32)."""
    from lmms_quant.checkpoints.kernels import module_bytes

    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row = {"row": label, "weights_bytes": module_bytes(model)}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
        row["prefill_ms"] = median_ms(lambda: model(**inputs, use_cache=True), device, reps["warmup"], reps["prefill"])
        out = model(**inputs, use_cache=True)
        cache, n_past = out.past_key_values, out.past_key_values.get_seq_length()
        tok = out.logits[:, -1:].argmax(-1)
        del out
        row["decode_ms"] = median_ms(lambda: model(input_ids=tok, past_key_values=cache, use_cache=True), device,
                                     reps["warmup"], reps["decode"], after=lambda: _crop(cache, n_past))
        row["decode_kv_len"] = n_past
        cache = tok = None  # free the KV cache before the layer timings
        sync(device)
        row["peak_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        # one Linear alone (no framework overhead): 1 token and the whole prompt
        lin = model.get_submodule(LAYER)
        n_in = lin.in_features
        for m in (1, n_past):
            x = torch.randn(m, n_in, generator=torch.Generator().manual_seed(0)).to(device, torch.float16)
            row[f"layer_us_{'1' if m == 1 else 'prompt'}"] = 1e3 * median_ms(lambda x=x: lin(x), device, 3, reps["layer"])
    log(f"{label}: weights {row['weights_bytes'] / GIB:.3f} GiB, peak {_gib(row['peak_bytes'])} GiB, "
        f"prefill {row['prefill_ms']:.2f} ms, decode {row['decode_ms']:.2f} ms; gate_proj "
        f"{row['layer_us_1']:.1f} us (1 token) / {row['layer_us_prompt']:.1f} us ({n_past} tokens)")
    return row, logits


def _crop(cache, n_past: int) -> None:
    """Drop the tokens a decode step appended (a negative count: the form transformers >= 5.17 asks for)."""
    extra = cache.get_seq_length() - n_past
    if extra > 0:
        cache.crop(-extra)


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / GIB:.3f}"


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Max |a - b| relative to max |a|, plus the share of positions whose top-1 token agrees."""
    diff = (a - b).abs().max().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return {"max_abs": diff, "max_rel": diff / max(a.abs().max().item(), 1e-30), "top1_agree": top1}


def run_bits(cfg, inputs, device, args, reps, bits: int, fp_logits, rows: list[dict], info: dict) -> None:
    """Build (seeded), quantize (simulated), measure; bf16 floor; to_lowbit_ in place; measure; parity.

    Appends its rows to ``rows`` and its facts to ``info`` as it goes (a failure keeps what was measured)."""
    from lmms_quant import quantize_, recipe_from_args
    from lmms_quant.checkpoints import layers_from_report, to_lowbit_

    model = build(cfg, device, torch.float16, args.seed)
    gs = args.group_size if bits <= 4 else -1  # the int8 kernel takes one scale per output channel
    rargs = {"method": "rtn", "bits_llm": bits, "bits_vit": bits, "group_size": gs, "sym": True}
    log(f"w{bits}: quantize_ {rargs} (simulated)")
    t0 = time.perf_counter()
    report = quantize_(model, recipe_from_args(rargs))
    sync(device)
    info.update({"bits": bits, "recipe_args": rargs, "quantize_s": time.perf_counter() - t0, "n_quantized": len(report.modules),
            "bpw_study": report.bpw["model"]["study"], "bpw_storage": report.bpw["model"]["storage"],
            "bpw_components": {c: {k: report.bpw[c][k] for k in ("study", "storage")} for c in report.bpw if c != "model"}})
    log(f"w{bits}: {info['n_quantized']} Linear layers quantized in {info['quantize_s']:.1f}s; "
        f"bpw study {info['bpw_study']:.3f}, storage {info['bpw_storage']:.3f}")
    sim_row, sim_logits = measure(model, inputs, device, f"sim w{bits}", reps)
    sim_row.update(bpw_study=info["bpw_study"], bpw_storage=info["bpw_storage"])
    rows.append(sim_row)
    if fp_logits is not None:
        info["sim_vs_fp16"] = rel_diff(fp_logits, sim_logits)  # the quantization error itself, for scale
    # bf16 floor: what bf16 rounding alone costs the same simulated model
    ref = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        info["bf16_floor"] = rel_diff(sim_logits, ref(**inputs, use_cache=False).logits.float())
    del ref
    free(device)
    log(f"w{bits}: bf16 floor (bf16 copy of sim vs sim): max rel {info['bf16_floor']['max_rel']:.2e}")
    # real: pack the same integers and swap the Linears in place
    t0 = time.perf_counter()
    layers = layers_from_report(model, report)
    kinds = to_lowbit_(model, layers, act_dtype=torch.bfloat16)
    del layers
    report.qparams.clear()
    sync(device)
    info["to_lowbit_s"] = time.perf_counter() - t0
    counts: dict[str, int] = {}
    for k in kinds.values():
        counts[k.split(":")[0]] = counts.get(k.split(":")[0], 0) + 1
    info["kernels"] = counts
    info["simulated_reasons"] = sorted({k for k in kinds.values() if k.startswith("simulated")})[:5]
    log(f"w{bits}: to_lowbit_ in {info['to_lowbit_s']:.1f}s, layers per kernel {counts}")
    real_row, real_logits = measure(model, inputs, device, f"real w{bits}", reps)
    real_row.update(bpw_study=info["bpw_study"], bpw_storage=info["bpw_storage"])
    rows.append(real_row)
    par = rel_diff(sim_logits, real_logits)
    par.update(tol=args.tol, passed=bool(par["max_rel"] <= args.tol), bf16_floor=info["bf16_floor"]["max_rel"])
    real_row["parity"] = par
    info["parity"] = par
    par["within_bf16_floor"] = bool(par["max_rel"] <= info["bf16_floor"]["max_rel"])
    verdict = "PASS" if par["passed"] else "FAIL" + (" (but within the bf16 floor: precision, not packing)" if par["within_bf16_floor"] else "")
    log(f"w{bits}: parity real vs sim: max rel {par['max_rel']:.2e} (max abs {par['max_abs']:.3g}), "
        f"top-1 agree {par['top1_agree']:.4f}, tol {args.tol:g} -> {verdict}")
    del model, sim_logits, real_logits
    free(device)


def print_table(rows: list[dict]) -> None:
    fp = rows[0]

    def ratio(r, k):
        return "n/a" if r.get(k) is None or fp.get(k) is None else f"{r[k] / fp[k]:.2f}x"

    print("\n| row | weights GiB | peak GiB | prefill ms | decode ms | weights vs fp16 | peak vs fp16 | prefill vs fp16 "
          "| decode vs fp16 | gate_proj us 1 tok / prompt | bpw study / storage | parity (max rel, tol) |")
    print("|" + "---|" * 12)
    for r in rows:
        bpw = f"{r['bpw_study']:.3f} / {r['bpw_storage']:.3f}" if "bpw_study" in r else "16 / 16"
        par = r.get("parity")
        ptxt = "-" if par is None else f"{par['max_rel']:.2e} <= {par['tol']:g}: {'PASS' if par['passed'] else 'FAIL'}"
        print(f"| {r['row']} | {r['weights_bytes'] / GIB:.4f} | {_gib(r['peak_bytes'])} | {r['prefill_ms']:.2f} | {r['decode_ms']:.2f} | "
              f"{ratio(r, 'weights_bytes')} | {ratio(r, 'peak_bytes')} | {ratio(r, 'prefill_ms')} | {ratio(r, 'decode_ms')} | "
              f"{r['layer_us_1']:.1f} / {r['layer_us_prompt']:.1f} | {bpw} | {ptxt} |")
    print(flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="a tiny LLaVA config (local smoke test; required with --device cpu)")
    ap.add_argument("--int8", action="store_true", help="also RTN w8 per-channel through the int8 kernel (rebuilds the model)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=0.05, help="parity tolerance: max |dlogit| / max |logit| (default 0.05)")
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip --int8 if the 4-bit part took more than half of this")
    ap.add_argument("--json", type=Path, default=Path(os.environ["OUT"]) / "gpu_llava7b.json" if os.environ.get("OUT") else None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device: this benchmark needs a GPU (for a local smoke test run --device cpu --tiny)", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.tiny:
        print("error: --device cpu is only for the --tiny smoke test (a 7B model on the CPU is not what this measures)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    reps = ({"warmup": 2, "prefill": 10, "decode": 30, "layer": 50} if device.type == "cuda"
            else {"warmup": 1, "prefill": 3, "decode": 5, "layer": 5})
    import transformers

    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "seed": args.seed, "tiny": args.tiny,
            "dtype": "float16", "group_size": args.group_size, "text_tokens": args.text_tokens, "reps": reps,
            "decode": "one token through the KV cache of the prompt (cropped back after each step)",
            "prefill": "prompt with image, use_cache=True, all logits"}
    log(f"torch {meta['torch']}, transformers {meta['transformers']}, device {meta['device']}, seed {args.seed}")
    cfg = llava_config(args.tiny)
    t0 = time.perf_counter()
    model = build(cfg, device, torch.float16, args.seed)
    sync(device)
    meta["build_s"] = time.perf_counter() - t0
    meta["params"] = sum(p.numel() for p in model.parameters())
    inputs = make_inputs(cfg, device, torch.float16, args.text_tokens, args.seed)
    meta["prompt_len"] = int(inputs["input_ids"].shape[1])
    log(f"built {meta['params'] / 1e9:.3f}B-parameter LLaVA in {meta['build_s']:.1f}s; prompt {meta['prompt_len']} tokens "
        f"({cfg.image_seq_length} image + {args.text_tokens} text)")
    fp_row, fp_logits = measure(model, inputs, device, "fp16", reps)
    del model
    free(device)
    rows, runs = [fp_row], {}
    ok = True
    for bits in (4, 8) if args.int8 else (4,):
        if bits == 8 and time.perf_counter() - T0 > args.budget_s / 2:
            log(f"skipping w8: {time.perf_counter() - T0:.0f}s elapsed, more than half of --budget-s {args.budget_s:g}")
            runs["w8"] = {"skipped": "time budget"}
            continue
        info = runs[f"w{bits}"] = {}
        try:
            run_bits(cfg, inputs, device, args, reps, bits, fp_logits, rows, info)
        except Exception as exc:  # keep the rows measured so far; say what failed
            traceback.print_exc()
            info["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            log(f"w{bits}: FAILED: {info['error'][:300]}")
            free(device)
        ok &= bool(info.get("parity", {}).get("passed"))
    meta["total_s"] = time.perf_counter() - T0
    print_table(rows)
    for name, info in runs.items():
        if "error" in info:
            print(f"{name}: ERROR {info['error'][:500]}")
        if "parity" in info:
            print(f"{name}: kernels {info['kernels']}; parity max rel {info['parity']['max_rel']:.2e} vs bf16 floor "
                  f"{info['bf16_floor']['max_rel']:.2e}; sim-vs-fp16 (quantization error) {info.get('sim_vs_fp16', {}).get('max_rel', float('nan')):.2e}; "
                  f"top-1 agree real/sim {info['parity']['top1_agree']:.4f}")
    print(f"parity: {'PASS' if ok else 'FAIL'} (tolerance {args.tol:g}); total {meta['total_s']:.1f}s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1))
        log(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
