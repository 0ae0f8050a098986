"""GPTQ's Triton block kernel (lmms_quant.quantizers.gptq_kernels) against the PyTorch column loop.

The kernel runs on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``,
set before Triton compiles anything, so in a subprocess).  Two levels:

* one block, on data where float32 is exact (weights k/8, a unit-diagonal
  upper-triangular Hinv with a few off-diagonal entries +-1, power-of-two scales and integer
  zero points): fused or unfused multiply-adds agree, so the kernel must
  reproduce the PyTorch loop bit for bit (codes, values, errors) with fixed
  and with per-column (static) parameters; with parameters computed in the
  kernel (dynamic groups), on random data and Hinv = I, bit for bit too,
  group parameters included;
* whole ``gptq_quantize`` calls on random layers for every grouping the kernel
  handles (``benchmarks/gpu_gptq_kernel.py --small``): codes agree to >= 98 %
  and the layer-output error to 1 %.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmms_quant.quantizers import gptq_kernels
from lmms_quant.quantizers.gptq import gptq_quantize

REPO = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")

_BLOCK_SCRIPT = r'''
import torch
from lmms_quant.quantizers import gptq_kernels as K
from lmms_quant.quantizers.rtn import compute_qparams, dequantize_codes, quantize_codes

def eager(W1, Hinv1, bits, sym, params):
    """The PyTorch loop of gptq_quantize for one block; params(i, W1) -> (s, z) or None (keep)."""
    W1 = W1.clone(); Q = torch.empty_like(W1); C = torch.empty_like(W1); E = torch.empty_like(W1); s = z = None
    for i in range(W1.shape[0]):
        p = params(i, W1)
        if p is not None:
            s, z = p
        w = W1[i]; C[i] = quantize_codes(w, s, z, bits); Q[i] = dequantize_codes(C[i], s, z)
        err = torch.sub(w, Q[i], out=E[i]).div_(Hinv1[i, i]); W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
    return Q, C, E

g = torch.Generator().manual_seed(0)
width, out = 32, 37
W1 = torch.randint(-16, 17, (width, out), generator=g).float() / 8
# sparse off-diagonal entries of +-1: every update adds a multiple of 1/8, so no bits are lost
Hinv1 = torch.triu(torch.randint(-1, 2, (width, width), generator=g).float() * (torch.rand(width, width, generator=g) < 0.1), 1)
Hinv1 += torch.eye(width)
failures = []
for bits, sym in ((4, True), (3, False), (2, False), (8, True)):
    maxq = 2**bits - 1
    # MODE_FIXED: dyadic per-row scales and integer zeros, so every value stays exact
    sc = 2.0 ** -torch.randint(1, 4, (out,), generator=g).float()
    zc = torch.full((out,), (maxq + 1) / 2) if sym else torch.randint(0, maxq + 1, (out,), generator=g).float()
    ref = eager(W1, Hinv1, bits, sym, lambda i, W, sc=sc, zc=zc: (sc, zc) if i == 0 else None)
    got = [torch.empty_like(W1) for _ in range(3)]
    K.gptq_block(W1.clone(), Hinv1, *got, bits, sym, K.MODE_FIXED, scale=sc, zero=zc)
    # MODE_STATIC: a table of 3 groups (dyadic scales), looked up per column
    ts = 2.0 ** -torch.randint(1, 4, (3, out), generator=g).float()
    tz = torch.full((3, out), (maxq + 1) / 2) if sym else torch.randint(0, maxq + 1, (3, out), generator=g).float()
    gidx = torch.tensor([(7 * c) % 3 for c in range(width)], dtype=torch.int32)
    ref_s = eager(W1, Hinv1, bits, sym, lambda i, W: (ts[gidx[i]], tz[gidx[i]]))
    got_s = [torch.empty_like(W1) for _ in range(3)]
    K.gptq_block(W1.clone(), Hinv1, *got_s, bits, sym, K.MODE_STATIC, gidx=gidx, group_scale=ts, group_zero=tz)
    # MODE_DYNAMIC: groups of 8, parameters from the current columns (compute_qparams), written at group_base.
    # Their scales are not dyadic, so the errors are inexact and a fused multiply-add would round differently:
    # the block runs with Hinv = I here (no update within the block); the updates are checked above.
    params = []
    def dyn(i, W):
        if i % 8:
            return None
        s, z = compute_qparams(W[i:i + 8].T, bits, sym); params.append((s.view(-1), z.view(-1))); return params[-1]
    Wr = torch.randn(width, out, generator=g)
    eye = torch.eye(width)
    ref_d = eager(Wr, eye, bits, sym, dyn)
    gs = torch.full((6, out), -1.0); gz = torch.full((6, out), -1.0)
    got_d = [torch.empty_like(W1) for _ in range(3)]
    K.gptq_block(Wr.clone(), eye, *got_d, bits, sym, K.MODE_DYNAMIC, group_scale=gs, group_zero=gz, group_size=8, group_base=2)
    checks = [("fixed", ref, got), ("static", ref_s, got_s), ("dynamic", ref_d, got_d)]
    for mode, r, k in checks:
        for name, a, b in zip(("q", "codes", "err"), r, k):
            if not torch.equal(a, b):
                failures.append(f"{bits}-bit sym={sym} {mode} {name}: max diff {(a - b).abs().max().item():.3g}")
        if torch.unique(k[1]).numel() < min(maxq + 1, 4):
            failures.append(f"{bits}-bit sym={sym} {mode}: degenerate data, codes {torch.unique(k[1]).tolist()}")
    want_s = torch.stack([p[0] for p in params]); want_z = torch.stack([p[1] for p in params])
    if not (torch.equal(gs[2:6], want_s) and torch.equal(gz[2:6], want_z) and bool((gs[:2] == -1).all())):
        failures.append(f"{bits}-bit sym={sym} dynamic: group parameters not written at rows 2..5")
print("FAILURES", failures)
raise SystemExit(1 if failures else 0)
'''


def _interpreted(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@needs_triton
def test_kernel_block_is_bit_identical_to_the_torch_loop_on_exact_data():
    proc = _interpreted(["-c", _BLOCK_SCRIPT])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILURES []" in proc.stdout


@needs_triton
def test_gptq_quantize_triton_matches_torch_for_every_grouping():
    proc = _interpreted([str(REPO / "benchmarks" / "gpu_gptq_kernel.py"), "--device", "cpu", "--small", "--min-codes", "0.98"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "codes equal" in line]
    assert len(lines) == 8 and all(line.endswith("| ok") for line in lines), proc.stdout
    assert "all agree" in proc.stdout


_FALLBACK_SCRIPT = r'''
import logging
import torch
from lmms_quant.quantizers import gptq, gptq_kernels

real = gptq_kernels.gptq_block
calls = {"n": 0}
def flaky(*args, **kwargs):  # the kernel works for two blocks, then "fails to build"
    calls["n"] += 1
    if calls["n"] > 2:
        raise RuntimeError("simulated compile failure")
    return real(*args, **kwargs)
gptq_kernels.gptq_block = flaky
gptq._use_kernel = lambda kernel, *a: kernel == "auto"  # "auto" takes the kernel on the CPU here
warnings = []
logging.getLogger("lmms_quant.quantizers.gptq").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: warnings.append(r.getMessage())})())
torch.manual_seed(0)
W = torch.randn(24, 128)
X = torch.randn(512, 128) @ (torch.randn(128, 128) / 11)
H = 2 * X.T @ X / 512
failures = []
for g, act, static in ((-1, False, False), (16, False, False), (64, False, False), (16, True, True)):
    calls["n"], warnings[:] = 0, []
    a = gptq.gptq_quantize(W, H, 3, g, False, blocksize=32, actorder=act, static_groups=static, kernel="auto")
    b = gptq.gptq_quantize(W, H, 3, g, False, blocksize=32, actorder=act, static_groups=static, kernel="torch")
    same = (a.quantized.codes == b.quantized.codes).float().mean().item()
    rel = abs(a.error - b.error) / b.error
    if calls["n"] != 3 or not any("continuing with the PyTorch loop" in w for w in warnings):
        failures.append(f"g={g}: kernel calls {calls['n']}, warnings {warnings}")
    if a.quantized.scale.shape != b.quantized.scale.shape or same < 0.98 or rel > 1e-3:
        failures.append(f"g={g}: codes equal {same:.4f}, error rel {rel:.2e}, scale {tuple(a.quantized.scale.shape)} vs {tuple(b.quantized.scale.shape)}")
    if not torch.allclose(a.dequantize(), a.weight, atol=1e-6):
        failures.append(f"g={g}: codes, scales and zeros do not reproduce the weight")
print("FAILURES", failures)
raise SystemExit(1 if failures else 0)
'''


@needs_triton
def test_a_kernel_that_fails_mid_run_hands_over_to_the_torch_loop():
    """Blocks 1-2 in the kernel, the rest in PyTorch (groups begun by the kernel keep their parameters,
    including a group of 64 that spans the switch): the same result as the PyTorch loop, with a warning."""
    proc = _interpreted(["-c", _FALLBACK_SCRIPT])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILURES []" in proc.stdout


def test_kernel_choice_errors_name_the_valid_choices():
    W, H = torch.randn(8, 16), torch.eye(16)
    with pytest.raises(ValueError, match="auto, torch, triton"):
        gptq_quantize(W, H, 4, kernel="cuda")
    if not gptq_kernels.interpreting():
        with pytest.raises(ValueError, match="CUDA tensor"):
            gptq_quantize(W, H, 4, kernel="triton")


@needs_triton
def test_triton_refuses_groups_that_straddle_blocks(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # makes a CPU tensor eligible; nothing is compiled here
    with pytest.raises(ValueError, match="group_size dividing blocksize"):
        gptq_quantize(torch.randn(8, 96), torch.eye(96), 4, group_size=48, blocksize=32, kernel="triton")


def test_auto_on_cpu_is_the_torch_loop():
    torch.manual_seed(0)
    W = torch.randn(16, 64)
    X = torch.randn(256, 64)
    H = 2 * X.T @ X / 256
    a = gptq_quantize(W, H, 3, group_size=16, kernel="auto")
    b = gptq_quantize(W, H, 3, group_size=16, kernel="torch")
    assert torch.equal(a.weight, b.weight) and torch.equal(a.quantized.codes, b.quantized.codes)


def test_kernel_checks_its_inputs():
    if gptq_kernels.triton is None:
        pytest.skip("Triton not installed")
    W1 = torch.zeros(8, 4)
    out = [torch.empty(8, 4) for _ in range(3)]
    with pytest.raises(ValueError, match="Hinv1 must be float32 with unit column stride"):
        gptq_kernels.gptq_block(W1, torch.eye(16)[::2, ::2], *out, 4, True, gptq_kernels.MODE_FIXED, scale=torch.ones(4), zero=torch.zeros(4))
    with pytest.raises(ValueError, match="MODE_DYNAMIC needs a group size dividing"):
        gptq_kernels.gptq_block(W1, torch.eye(8), *out, 4, True, gptq_kernels.MODE_DYNAMIC, group_size=3,
                                group_scale=torch.empty(3, 4), group_zero=torch.empty(3, 4))
    with pytest.raises(ValueError, match="scale / zero must have 1 or 4 elements"):
        gptq_kernels.gptq_block(W1, torch.eye(8), *out, 4, True, gptq_kernels.MODE_FIXED, scale=torch.ones(3), zero=torch.zeros(3))
