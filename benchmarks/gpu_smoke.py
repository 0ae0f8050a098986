"""CUDA checks of the library (no lmms-eval needed): load, calibrate, quantize, verify and generate on the GPU.

    python benchmarks/gpu_smoke.py

For RTN, GPTQ and AWQ on a tiny LLaVA in bfloat16 on CUDA: the level check
passes, the quantized model generates, and GPTQ's CUDA result matches its CPU
result (float32) to a stated tolerance.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmms_quant import quantize_, recipe_from_args  # noqa: E402
from lmms_quant.calibration_data import build_calibration_set  # noqa: E402
from lmms_quant.models import load_vlm  # noqa: E402
from lmms_quant.quantizers.gptq import accumulate_hessian, gptq_quantize, make_empty_hessian  # noqa: E402
from lmms_quant.recipe import CalibrationSpec  # noqa: E402
from tests.fixtures.tiny_models import save_tiny_llava  # noqa: E402


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    print("gpu:", torch.cuda.get_device_name(), "torch", torch.__version__)
    path = save_tiny_llava(Path(tempfile.mkdtemp()) / "tiny-llava")
    for method, extra in (("rtn", {}), ("gptq", {}), ("awq", {"group_size": 16})):
        v = load_vlm(str(path), device="cuda", dtype="bfloat16")
        calib = build_calibration_set(v.processor, v.family, CalibrationSpec(source="world", samples=16), "cuda", torch.bfloat16)
        t0 = time.perf_counter()
        report = quantize_(v.model, recipe_from_args({"method": method, "bits_llm": 3, "bits_vit": 4, **extra}), calibration=calib)
        torch.cuda.synchronize()
        q_s = time.perf_counter() - t0
        batch = {k: val for k, val in calib.batches[0].items()}
        out = v.model.generate(**batch, max_new_tokens=4, do_sample=False)
        print(f"{method}: quantized {len(report.modules)} layers on {next(v.model.parameters()).device} in {q_s:.2f}s, "
              f"bpw {report.bpw['model']['study']:.3f}, level check passed, generated {out.shape[1] - batch['input_ids'].shape[1]} tokens")
    # GPTQ CUDA vs CPU on one layer, float32
    torch.manual_seed(0)
    W = torch.randn(512, 1024)
    H, n = make_empty_hessian(1024), 0
    for _ in range(4):
        H, n = accumulate_hessian(H, n, torch.randn(2048, 1024) @ (torch.randn(1024, 1024) / 32))
    cpu = gptq_quantize(W, H, 4).weight
    gpu = gptq_quantize(W.cuda(), H.cuda(), 4).weight.cpu()
    same = (cpu - gpu).abs().le(1e-4).float().mean().item()
    print(f"gptq cuda vs cpu: {same * 100:.2f}% of entries within 1e-4, max abs diff {(cpu - gpu).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
