"""A grid that calibrates once per stage, against one separate calibration per grid point.

    python benchmarks/bench_grid_calibration.py                          # toy-llava 6 x 6 and toy-blip2 3 x 3, GPTQ
    python benchmarks/bench_grid_calibration.py --model toy-llava --bits 2,3,4,5,6,8 --vqa 300

For every (ViT bits, LLM bits) point of the grid (the connector stays at 16) it quantizes the model with
GPTQ three ways and prints the quantization time of the whole grid (``quantize_`` only; the model load and
the calibration set are shared) and its ratio to the separate runs:

* ``separate``: one sequential calibration per point, no cache (what a grid cost before);
* ``prefix``: sequential, exact, one cache folder for the grid, run in the sweep's order (ViT bits outer):
  every point whose ViT recipe was calibrated before restores that stage and calibrates only the LLM;
  each point's weights hash must equal the separate run's (checked, the script fails otherwise);
* ``prefix+fp_inputs``: ``calib_mode=fp_inputs``: the full-precision Hessians are computed once for the
  grid and every point costs only the per-layer solve.

``--vqa N`` also scores each point of the exact and fp_inputs grids on the first N VQA rows of the world's
test split (greedy, the zoo's own scorer) and prints the accuracy difference.  Run from a checkout (it
imports tools.zoo for that scorer).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmms_quant import quantize_, recipe_from_args  # noqa: E402
from lmms_quant.calibration_data import build_calibration_set  # noqa: E402
from lmms_quant.models import load_vlm  # noqa: E402
from lmms_quant.recipe import CalibrationSpec  # noqa: E402


def run_grid(loaded, snapshot, calib, points, base, cache_dir, vqa=None):
    """``{point: (seconds, weights_sha256, vqa or None)}`` for every point, in order."""
    out = {}
    for vit, llm in points:
        loaded.model.load_state_dict(snapshot)
        recipe = recipe_from_args({**base, "bits_vit": vit, "bits_llm": llm})
        t0 = time.perf_counter()
        report = quantize_(loaded.model, recipe, calibration=calib, cache_dir=cache_dir)
        seconds = time.perf_counter() - t0
        out[(vit, llm)] = (seconds, report.weights_sha256, vqa(loaded.model) if vqa else None)
    return out


def scorer(loaded, n):
    from tools.zoo import scoring

    rows = scoring.load_rows(ROOT / "tasks" / "data" / "world" / "vqa_test.jsonl", n)
    model_type = {"llava": "llava", "blip2": "blip-2"}[loaded.family]
    return lambda model: scoring.evaluate(model, loaded.processor, model_type, rows, [])["vqa"]


def bench(name: str, bits: list[int], samples: int, vqa_rows: int, group_size: int) -> None:
    torch.manual_seed(0)
    loaded = load_vlm(name, device="cpu", dtype="float32")
    snapshot = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    calib = build_calibration_set(loaded.processor, loaded.family, CalibrationSpec(source="world", samples=samples, seed=42), "cpu",
                                  torch.float32)
    points = list(itertools.product(bits, bits))  # ViT bits outer: the sweep's order
    base = {"method": "gptq", "group_size": group_size, "calib_samples": samples}
    n_params = sum(p.numel() for p in loaded.model.parameters())
    print(f"\n{name}: {n_params:,} parameters, {len(points)} points ({len(bits)} ViT x {len(bits)} LLM bit widths), "
          f"GPTQ g{group_size}, {samples} calibration samples, torch threads {torch.get_num_threads()}")
    vqa = scorer(loaded, vqa_rows) if vqa_rows else None
    separate = run_grid(loaded, snapshot, calib, points, base, None)
    with tempfile.TemporaryDirectory() as d:
        prefix = run_grid(loaded, snapshot, calib, points, base, Path(d) / "cache", vqa)
    with tempfile.TemporaryDirectory() as d:
        fp = run_grid(loaded, snapshot, calib, points, {**base, "calib_mode": "fp_inputs"}, Path(d) / "cache", vqa)
    mismatched = [p for p in points if prefix[p][1] != separate[p][1]]
    total = {k: sum(v[0] for v in grid.values()) for k, grid in (("separate", separate), ("prefix", prefix), ("fp", fp))}
    print(f"  separate runs            {total['separate']:7.1f} s   1.00x")
    print(f"  prefix sharing (exact)   {total['prefix']:7.1f} s   {total['prefix'] / total['separate']:.2f}x   "
          f"weights identical to the separate runs: {len(points) - len(mismatched)}/{len(points)}")
    print(f"  prefix + fp_inputs       {total['fp']:7.1f} s   {total['fp'] / total['separate']:.2f}x")
    if vqa:
        diffs = [fp[p][2] - prefix[p][2] for p in points]
        print(f"  VQA on {vqa_rows} test rows, fp_inputs - sequential: mean {sum(diffs) / len(diffs):+.4f}, "
              f"min {min(diffs):+.4f}, max {max(diffs):+.4f}")
        print("  per point (vit, llm): sequential / fp_inputs")
        for p in points:
            print(f"    {p}: {prefix[p][2]:.4f} / {fp[p][2]:.4f}")
    if mismatched:
        raise SystemExit(f"prefix sharing changed the weights of {mismatched}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model(s); default: toy-llava (6 x 6) and toy-blip2 (3 x 3)")
    parser.add_argument("--bits", help="comma-separated bit widths of the grid (default 2,3,4,5,6,8; 2,4,8 for the second model)")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--vqa", type=int, default=0, help="score every point on the first N VQA test rows")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = args.model or ["toy-llava", "toy-blip2"]
    for i, name in enumerate(models):
        default = [2, 3, 4, 5, 6, 8] if i == 0 else [2, 4, 8]
        bench(name, [int(b) for b in args.bits.split(",")] if args.bits else default, args.samples, args.vqa, args.group_size)


if __name__ == "__main__":
    main()
