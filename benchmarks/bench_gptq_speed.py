"""GPTQ speed at LLaMA-7B layer shapes: lmms-quant's gptq_quantize vs llm-compressor's.

    python benchmarks/bench_gptq_speed.py --device cuda            # H100: 128 x 2048 calibration tokens
    python benchmarks/bench_gptq_speed.py --device cpu --tokens 8192
    python benchmarks/bench_gptq_speed.py --device cuda --kernels auto,torch --llmcompressor   # Triton kernel and PyTorch loop

Random weights (out x in) and a Hessian 2 X^T X / n from random correlated
activations (``tokens`` rows, accumulated in chunks).  Times only the
quantization call (Hessian building excluded), after one warm-up, and prints
each time and the ratio ours / theirs when llm-compressor is importable
(``--llmcompressor``; it is an optional, separate environment).  ``--kernels``
picks ``gptq_quantize``'s block loop: ``auto`` (the Triton kernel on CUDA, the
PyTorch loop on the CPU), ``torch`` or ``triton``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmms_quant.quantizers.gptq import accumulate_hessian, gptq_quantize, make_empty_hessian, reconstruction_error  # noqa: E402
from lmms_quant.quantizers.rtn import fake_quantize  # noqa: E402

SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096), "4096x11008": (4096, 11008), "256x512": (256, 512)}


def hessian(n_in: int, tokens: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    mix = (torch.randn(n_in, n_in, generator=g) / n_in**0.5).to(device)
    H, n = make_empty_hessian(n_in, device), 0
    chunk = 4096
    for start in range(0, tokens, chunk):
        z = torch.randn(min(chunk, tokens - start), n_in, generator=g).to(device)
        H, n = accumulate_hessian(H, n, z @ mix + 0.1 * z)
    return H


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device: str, repeat: int = 1) -> tuple[float, float]:
    """``(wall, cpu)`` seconds per call after one warm-up; ``cpu`` is this process's CPU time
    (all threads), the steadier figure on a shared machine."""
    fn()  # warm-up
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat, (time.process_time() - c0) / repeat


def llmcompressor_fn(W: torch.Tensor, H: torch.Tensor, bits: int, blocksize: int, percdamp: float):
    """llm-compressor 0.14's GPTQ core on the same weight and Hessian (per channel, symmetric, no act-order).

    In 0.14 ``quantize_weight`` takes stacked ``(batch, rows, cols)`` weights and
    ``(batch, cols, cols)`` Hessians (both used as scratch buffers, so each call
    gets fresh copies), plus the weight observer's min-max scale and zero point,
    here computed with compressed-tensors' ``calculate_qparams`` as the observer
    does; it returns ``(weights, losses, rtn_fallback)``.  The result holder
    ``out["q"]`` gets the quantized ``(rows, cols)`` weight.
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    args = QuantizationArgs(num_bits=bits, symmetric=True, strategy=QuantizationStrategy.CHANNEL, actorder=None)
    scale, zero_point = calculate_qparams(W.amin(dim=1, keepdim=True), W.amax(dim=1, keepdim=True), args)
    out: dict[str, torch.Tensor] = {}

    def run():
        q, _losses, fallback = quantize_weight(weights=W.unsqueeze(0).clone(), hessians=H.unsqueeze(0).clone(),
                                               scale=scale.unsqueeze(0), zero_point=zero_point.unsqueeze(0), global_scale=None,
                                               quant_args=args, blocksize=blocksize, percdamp=percdamp)
        if bool(fallback.any()):
            raise RuntimeError("llm-compressor fell back to RTN (Hessian not positive definite)")
        out["q"] = q[0]

    return run, out


def _ours(res: dict, W, H, bits: int, blocksize: int, kernel: str) -> None:
    res["q"] = gptq_quantize(W, H, bits, -1, True, blocksize=blocksize, kernel=kernel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=128 * 2048)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--blocksize", type=int, default=128)
    ap.add_argument("--shapes", default="4096x4096,4096x11008", help=f"comma-separated, of {', '.join(SHAPES)} (256x512: a smoke test)")
    ap.add_argument("--llmcompressor", action="store_true", help="also time llm-compressor's quantize_weight")
    ap.add_argument("--kernels", default="auto",
                    help="comma-separated gptq_quantize kernels to time: auto (Triton on CUDA), torch, triton; e.g. auto,torch")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"device={args.device} torch={torch.__version__} tokens={args.tokens} bits={args.bits} blocksize={args.blocksize}"
          + (f" gpu={torch.cuda.get_device_name()}" if args.device.startswith("cuda") else f" threads={torch.get_num_threads()}"))
    for name in args.shapes.split(","):
        out_f, in_f = SHAPES[name]
        W = torch.randn(out_f, in_f, device=args.device) / in_f**0.5
        t0 = time.perf_counter()
        H = hessian(in_f, args.tokens, args.device)
        sync(args.device)
        h_s = time.perf_counter() - t0
        err_rtn = reconstruction_error(W, fake_quantize(W, args.bits, -1, True), H)
        line = f"{name}: hessian {h_s:.2f}s"
        times = {}
        for kernel in args.kernels.split(","):
            res: dict = {}
            t_ours, c_ours = time_call(functools.partial(_ours, res, W, H, args.bits, args.blocksize, kernel), args.device)
            times[kernel] = (t_ours, c_ours)
            err = reconstruction_error(W, res["q"].weight, H)
            line += f" | ours ({kernel}) {t_ours:.3f}s (cpu {c_ours:.3f}s), error/RTN {err / err_rtn:.3f}"
        if args.llmcompressor:
            try:
                theirs, out = llmcompressor_fn(W, H, args.bits, args.blocksize, 0.01)
                t_theirs, c_theirs = time_call(theirs, args.device)
                err_theirs = reconstruction_error(W, out["q"], H)
                line += f" | llm-compressor {t_theirs:.3f}s (cpu {c_theirs:.3f}s), error/RTN {err_theirs / err_rtn:.3f}"
                for kernel, (t_ours, c_ours) in times.items():
                    line += f" | ratio ours ({kernel}) / theirs: wall {t_ours / t_theirs:.2f}, cpu {c_ours / c_theirs:.2f}"
            except ImportError as exc:
                line += f" | llm-compressor not importable ({exc})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
