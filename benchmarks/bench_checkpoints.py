"""Real low-bit checkpoints: bytes on disk and in memory against the bpw the results report, and real-kernel speed.

    python benchmarks/bench_checkpoints.py                 # built-in tiny-random-llava
    python benchmarks/bench_checkpoints.py --large         # plus a ~130M-parameter random LLaVA config

For each recipe the model is quantized (simulated, RTN / uniform), saved as
``lmms-quant-packed`` and exported to compressed-tensors (and to GPTQ / AWQ
where those formats can express the recipe).  It prints

* ``bpw study`` / ``bpw storage``: ``report.bpw["model"]`` (what the results JSON says);
* ``disk <fmt>``: that checkpoint's tensor bytes x 8 / parameters (every
  tensor included: fp32 embeddings, norms, scales, zero points), and ``hdr``
  the size of our file's safetensors header (it carries the QuantReport JSON);
* ``mem sim`` / ``mem real fp32`` / ``mem real bf16``: bytes of parameters and
  buffers x 8 / parameters, for the simulated fp32 model and after
  :func:`~lmms_quant.checkpoints.to_lowbit_` (packed int4/int8, scales in fp32
  or bf16; the unquantized tensors stay fp32, resp. bf16);
* ``parity fp32`` / ``parity bf16``: fake-vs-real parity, the max logit
  difference relative to the largest logit, real kernels against the
  simulated model, with float32 activations (16 tokens) and bf16 activations;
* ``ms fp32`` / ``ms bf16`` / ``ms real bf16``: median forward time on one
  text sequence (``--seq`` tokens) of the unquantized model in fp32 and bf16,
  and of the real low-bit model with bf16 activations (one thread); ``1 tok``:
  the same for a single token (the memory-bound decode case weight-only kernels target).  The
  kernels' float32-activation path is a slow reference on the CPU (10-60x
  slower than a dense matmul), so it is checked for parity but not timed.

Every number comes from this run; nothing is hard-coded.  CPU only (the CUDA
path of the kernels is not exercised here).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES = {
    "rtn w4 g128 (all)": {"bits": 4, "group_size": 128, "sym": False},
    "rtn w4 per-ch (llm) / w8 (vit)": {"bits_llm": 4, "bits_vit": 8},
    "rtn w3 g64 (all)": {"bits": 3, "group_size": 64, "sym": False},
    "uniform w8 per-tensor (all)": {"method": "uniform", "bits": 8},
    "rtn w2 g32 (llm)": {"bits_llm": 2, "group_size_llm": 32, "sym_llm": False},
}
TINY_RECIPES = {  # the tiny model's rows are 32-64 wide
    "rtn w4 g32 (all)": {"bits": 4, "group_size": 32, "sym": False},
    "rtn w4 per-ch (llm) / w8 (vit)": {"bits_llm": 4, "bits_vit": 8},
    "rtn w3 per-ch (all)": {"bits": 3},
    "uniform w8 per-tensor (all)": {"method": "uniform", "bits": 8},
    "rtn w2 g32 (llm)": {"bits_llm": 2, "group_size_llm": 32, "sym_llm": False},
}


def save_large_llava(path: Path, seed: int = 0) -> Path:
    """A randomly initialised LLaVA of about 130M parameters (no processor)."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    vision = T.CLIPVisionConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8, image_size=224, patch_size=32)
    text = T.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
                         vocab_size=32000)
    cfg = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999, vision_feature_layer=-1,
                        vision_feature_select_strategy="full")
    T.LlavaForConditionalGeneration(cfg).eval().save_pretrained(path)
    return path


def _bits(nbytes: float, params: int) -> float:
    return 8 * nbytes / params


def _file_bytes(folder: Path) -> tuple[int, int]:
    """``(tensor bytes, header bytes)`` of the folder's safetensors files (the header holds the JSON metadata)."""
    import struct

    data = header = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
        header += 8 + n
        data += f.stat().st_size - 8 - n
    return data, header


def bench(path: Path, recipes: dict, seq: int, workdir: Path) -> list[dict]:
    import torch
    import transformers

    from lmms_quant import quantize_, recipe_from_args
    from lmms_quant.checkpoints import (
        CheckpointError,
        export_awq,
        export_compressed_tensors,
        export_gptq,
        layers_from_report,
        load_quantized,
        save_quantized,
        to_lowbit_,
    )
    from lmms_quant.checkpoints.kernels import module_bytes, parity, time_forward

    def load():
        return transformers.LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()

    fp = load()
    params = sum(p.numel() for p in {id(p): p for p in fp.parameters()}.values())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(fp.config.text_config.vocab_size, 1000) - 1, (1, seq), generator=gen)
    short = ids[:, :16]  # parity of the float32-activation kernels, which are a slow reference path on the CPU
    fp_ms = 1e3 * time_forward(partial(_logits, fp, ids), repeat=3)
    fp_bf16 = copy.deepcopy(fp).to(torch.bfloat16)
    bf16_ms = 1e3 * time_forward(partial(_logits, fp_bf16, ids), repeat=3)
    bf16_ms1 = 1e3 * time_forward(partial(_logits, fp_bf16, ids[:, :1]), repeat=5)
    fp_bf16 = None
    rows = []
    for label, args in recipes.items():
        sim = load()
        report = quantize_(sim, recipe_from_args(args))
        row = {"recipe": label, "params": params, "bpw_study": report.bpw["model"]["study"], "bpw_storage": report.bpw["model"]["storage"]}
        for fmt, writer in (("ours", save_quantized), ("ct", export_compressed_tensors), ("gptq", export_gptq), ("awq", export_awq)):
            out = workdir / fmt
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            try:
                writer(sim, report, out)
            except CheckpointError as exc:
                row[f"disk_{fmt}"] = None
                row[f"why_not_{fmt}"] = str(exc).split(";")[0][:90]
                continue
            row[f"save_s_{fmt}"] = time.perf_counter() - t0
            data, header = _file_bytes(out)
            row[f"disk_{fmt}"] = _bits(data, params)
            row[f"header_kb_{fmt}"] = header / 1024
        t0 = time.perf_counter()
        model, _, _ = load_quantized(workdir / "ours")
        row["load_s_ours"] = time.perf_counter() - t0
        del model
        layers = layers_from_report(sim, report)
        # float32 activations: exact parity, slow kernels
        real32 = copy.deepcopy(sim)
        kinds = to_lowbit_(real32, layers)
        row["kernels"] = sorted({k.split(":")[0] for k in kinds.values()})
        row["mem_sim"] = _bits(module_bytes(sim), params)
        row["mem_real32"] = _bits(module_bytes(real32), params)
        row["parity32"] = parity(partial(_logits, sim, short), partial(_logits, real32, short))["max_rel"]
        real32 = None
        # bf16 activations: the kernels' fast path, against the simulated model cast to bf16
        sim16 = copy.deepcopy(sim).to(torch.bfloat16)
        real16 = copy.deepcopy(sim16)
        to_lowbit_(real16, layers, act_dtype=torch.bfloat16)
        row["mem_real16"] = _bits(module_bytes(real16), params)
        row["parity16"] = parity(partial(_logits, sim16, ids), partial(_logits, real16, ids))["max_rel"]
        row["ms_fp32"], row["ms_bf16"] = fp_ms, bf16_ms
        row["ms_real16"] = 1e3 * time_forward(partial(_logits, real16, ids), repeat=3)
        row["ms_bf16_1"] = bf16_ms1
        row["ms_real16_1"] = 1e3 * time_forward(partial(_logits, real16, ids[:, :1]), repeat=5)
        sim = sim16 = real16 = None
        rows.append(row)
    return rows


def _logits(model, ids):
    return model(input_ids=ids).logits


def _fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}: {rows[0]['params']:,} parameters (fp32)\n")
    print("| recipe | bpw study | bpw storage | disk ours | hdr KB | disk ct | disk gptq | disk awq | mem sim | mem real fp32 | mem real bf16 "
          "| kernels | parity fp32 | parity bf16 | ms fp32 | ms bf16 | ms real bf16 | ms bf16 1 tok | ms real bf16 1 tok |")
    print("|" + "---|" * 19)
    for r in rows:
        print(f"| {r['recipe']} | {r['bpw_study']:.2f} | {r['bpw_storage']:.2f} | {_fmt(r['disk_ours'])} | {r['header_kb_ours']:.0f} | {_fmt(r['disk_ct'])} | "
              f"{_fmt(r['disk_gptq'])} | {_fmt(r['disk_awq'])} | {r['mem_sim']:.2f} | {r['mem_real32']:.2f} | {r['mem_real16']:.2f} | "
              f"{'+'.join(r['kernels'])} | {r['parity32']:.1e} | {r['parity16']:.1e} | {r['ms_fp32']:.1f} | {r['ms_bf16']:.1f} | {r['ms_real16']:.1f} | "
              f"{r['ms_bf16_1']:.2f} | {r['ms_real16_1']:.2f} |")
    why = {(fmt, r[f"why_not_{fmt}"]) for r in rows for fmt in ("ct", "gptq", "awq") if r.get(f"why_not_{fmt}")}
    for fmt, reason in sorted(why):
        print(f"- {fmt} n/a: {reason}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", action="store_true", help="also run the ~130M-parameter random LLaVA")
    ap.add_argument("--seq", type=int, default=128, help="tokens in the timed forward")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    import torch

    from lmms_quant.models import resolve_pretrained

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        results = {"tiny-random-llava": bench(Path(resolve_pretrained("tiny-random-llava")[1]), TINY_RECIPES, min(args.seq, 64), work)}
        print_rows("tiny-random-llava", results["tiny-random-llava"])
        if args.large:
            path = save_large_llava(work / "large-llava")
            results["random-llava-130m"] = bench(path, RECIPES, args.seq, work)
            print_rows("random LLaVA (CLIP 512x4, Llama 1024x4, vocab 32000)", results["random-llava-130m"])
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
