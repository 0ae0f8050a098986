"""One sweep vs separate lmms-eval runs: wall time of a 3x3 grid (bits_vit x bits_llm).

    python benchmarks/bench_sweep.py                       # the bundled toy-llava, else a tiny random LLaVA
    python benchmarks/bench_sweep.py --limit 16 --bits 2,4,16 --model /path/to/model

Runs the same nine configurations twice, each time in fresh processes:

1. ``lmms-quant sweep`` once (the model is loaded once, restored and requantized per configuration);
2. ``lmms-eval --model quant_vlm`` nine times (one CLI process per configuration).

Prints both wall times, their ratio (the goal is <= 0.5), and whether the two
ways gave the same scores and the same quantized-weight hashes per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def model_path(arg: str | None, work: Path) -> str:
    if arg:
        return arg
    from lmms_quant.models import DEFAULT_MODEL, zoo_models

    if DEFAULT_MODEL in zoo_models():
        return DEFAULT_MODEL
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.tiny_models import save_tiny_llava

    return str(save_tiny_llava(work / "tiny-llava"))


def results_by_config(folder: Path) -> dict[str, dict]:
    out = {}
    for f in folder.rglob("*_results.json"):
        data = json.loads(f.read_text())
        recipe = data["lmms_quant"]["quantization"]["recipe"]
        key = f"vit{recipe['vit']['bits']}_llm{recipe['llm']['bits']}"
        out[key] = {"scores": data["results"], "sha": data["lmms_quant"]["quantization"]["weights_sha256"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="pretrained (default: toy-llava when bundled, else a tiny random LLaVA)")
    ap.add_argument("--tasks", default="lq_world_vqa")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--bits", default="2,4,16", help="bit widths of both axes")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    ns = ap.parse_args()

    work = Path(ns.work or tempfile.mkdtemp(prefix="bench_sweep_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    pretrained = model_path(ns.model, work)
    bits = [int(b) for b in ns.bits.split(",")]
    import yaml

    spec = {"name": "bench", "models": [{"pretrained": pretrained, "name": "model"}], "methods": ["rtn"],
            "bits": {"vit": bits, "llm": bits}, "tasks": ns.tasks.split(","), "limit": ns.limit, "batch_size": ns.batch_size}
    (work / "sweep.yaml").write_text(yaml.safe_dump(spec))
    n = len(bits) ** 2
    print(f"model {pretrained}; {n} configurations (bits_vit x bits_llm in {bits}); tasks {ns.tasks}; limit {ns.limit}; work {work}")

    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "lmms-quant"), "sweep", str(work / "sweep.yaml"), "--output", str(work / "sweep")],
                          env=env, capture_output=True, text=True)
    sweep_s = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        return 1
    print(f"one sweep:              {sweep_s:7.1f} s")

    cli_s = []
    for bv in bits:
        for bl in bits:
            args = f"pretrained={pretrained},bits_vit={bv},bits_connector=16,bits_llm={bl},seed=0"
            t0 = time.perf_counter()
            proc = subprocess.run([str(BIN / "lmms-eval"), "--model", "quant_vlm", "--model_args", args, "--tasks", ns.tasks,
                                   "--limit", str(ns.limit), "--batch_size", str(ns.batch_size), "--output_path",
                                   str(work / "cli" / f"vit{bv}_llm{bl}"), "--log_samples"], env=env, capture_output=True, text=True)
            cli_s.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                print(proc.stderr[-4000:])
                return 1
    total = sum(cli_s)
    print(f"{n} lmms-eval CLI runs:    {total:7.1f} s  (each {min(cli_s):.1f}-{max(cli_s):.1f} s)")
    ratio = sweep_s / total
    print(f"ratio sweep / separate: {ratio:7.2f}  (goal <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'})")

    a, b = results_by_config(work / "sweep"), results_by_config(work / "cli")
    same_scores = all(a[k]["scores"] == b[k]["scores"] for k in b) and a.keys() == b.keys()
    same_sha = all(a[k]["sha"] == b[k]["sha"] for k in b) and a.keys() == b.keys()
    print(f"same scores per configuration: {same_scores}; same quantized-weight hashes: {same_sha}")
    return 0 if same_scores and same_sha else 1


if __name__ == "__main__":
    sys.exit(main())
