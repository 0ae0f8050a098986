"""Layer-level GPTQ diagnostic on SmolLM2-135M: does a Hessian from the calibration text generalize to the evaluation text?

    python benchmarks/diag_gptq_layer_errors.py                                          # ours only
    PYTHONPATH=$PWD /tmp/llmc-venv/bin/python benchmarks/diag_gptq_layer_errors.py      # plus llm-compressor quantize_weight
    python benchmarks/diag_gptq_layer_errors.py --calib-file austen --calib-samples 128  # the larger calibration text
    python benchmarks/diag_gptq_layer_errors.py --calib-file austen --layers all --bits 4 --group-sizes 64  # all 210 Linears

For five Linears of the full-precision model, Hessians H = 2 X^T X / n are built from
their inputs on the calibration text (benchmarks/data; by default the Constitution, 10 x 512 tokens;
``--calib-file austen`` / ``--calib-samples N``: N of the 173 Austen windows, see
``bench_smollm2_ppl.py``) and on the
evaluation text (lm_tasks/data).  Each weight is quantized (symmetric) by RTN, by
our GPTQ with dynamic groups (the default) and static groups, by llm-compressor's
GPTQ core (static groups), and by our GPTQ given the evaluation Hessian (an oracle).
Printed: error / RTN error, measured with the calibration H | with the evaluation H,
where error = trace((W - Q) H (W - Q)^T).

``--layers all`` takes every Linear of the 30 decoder layers and only our dynamic-group GPTQ
(no llm-compressor, no oracle), then prints the distribution of the ratios over the layers,
per projection kind, and the layers where GPTQ does worst on the evaluation text.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import smollm2_common as c  # noqa: E402

from lmms_quant.quantizers.gptq import accumulate_hessian, gptq_quantize, make_empty_hessian, reconstruction_error  # noqa: E402
from lmms_quant.quantizers.rtn import fake_quantize  # noqa: E402

NAMES = [
    "model.layers.5.self_attn.q_proj",
    "model.layers.5.mlp.down_proj",
    "model.layers.20.self_attn.o_proj",
    "model.layers.20.mlp.gate_proj",
    "model.layers.20.mlp.down_proj",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-file", default="constitution", help="constitution (default), austen, or a path to a UTF-8 text")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--layers", choices=("five", "all"), default="five", help="the five sample Linears, or all 210")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group-sizes", default="64,-1")
    ap.add_argument("--asym", action="store_true", help="asymmetric grids (default symmetric)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    calib_file = c.calib_path(args.calib_file)
    m, tok = c.load_model()
    ev = c.windows(c.token_ids(tok, c.eval_text()), 512, keep_last=True)
    ca = c.calibration_windows(tok, args.calib_samples, 512, calib_file)
    print(f"calibration: {len(ca)} x 512 tokens of {calib_file.name}; evaluation: {len(ev)} windows", flush=True)
    mods = dict(m.named_modules())
    names = NAMES if args.layers == "five" else [n for n, mod in mods.items() if ".layers." in n and isinstance(mod, torch.nn.Linear)]
    sym = not args.asym
    H = {}

    def run(ws, tag):
        hs = {}

        def mk(n):
            def hook(mod, args, out):
                x = args[0]
                if n not in hs:
                    hs[n] = [make_empty_hessian(x.shape[-1]), 0]
                hs[n] = list(accumulate_hessian(hs[n][0], hs[n][1], x.detach()))

            return hook

        hh = [mods[n].register_forward_hook(mk(n)) for n in names]
        with torch.no_grad():
            for w in ws:
                m.model(input_ids=w, use_cache=False)  # body only
        for h in hh:
            h.remove()
        for n in names:
            H[(n, tag)] = hs[n][0]

    run(ca, "cal")
    run(ev, "eval")
    try:
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.utils import calculate_qparams
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

        def llmc(W, Hc, bits, g):
            args = QuantizationArgs(
                num_bits=bits, symmetric=True, strategy="group" if g > 0 else "channel", group_size=g if g > 0 else None, actorder=None
            )
            Wg = W.reshape(W.shape[0], -1, g) if g > 0 else W.unsqueeze(1)
            s, z = calculate_qparams(Wg.amin(-1), Wg.amax(-1), args)
            q, _, fb = quantize_weight(
                W.unsqueeze(0).clone(), Hc.unsqueeze(0).clone(), s.unsqueeze(0), z.unsqueeze(0), None, args, 128, 0.01
            )
            return q[0]
    except ImportError:
        llmc = None
    if args.layers == "all" or not sym:
        llmc = None  # its wrapper above is symmetric; the full scan is ours only
    for bits in (int(b) for b in args.bits.split(",")):
        for g in (int(x) for x in args.group_sizes.split(",")):
            print(f"--- {bits} bit, group {g}, {'sym' if sym else 'asym'}: error / RTN error, on calibration H | on eval H")
            ratios = []
            for n in names:
                W = mods[n].weight.data.float()
                Hc, He = H[(n, "cal")], H[(n, "eval")]
                R = fake_quantize(W, bits, g, sym)
                res = {"gptq dyn": gptq_quantize(W, Hc, bits, g, sym).weight}
                if args.layers == "five":
                    if g > 0:
                        res["gptq static"] = gptq_quantize(W, Hc, bits, g, sym, static_groups=True).weight
                    if llmc:
                        res["llmc"] = llmc(W, Hc, bits, g)
                    # oracle: GPTQ calibrated on the eval activations themselves
                    res["gptq dyn (H=eval)"] = gptq_quantize(W, He, bits, g, sym).weight
                rc, re_ = reconstruction_error(W, R, Hc), reconstruction_error(W, R, He)
                q = res["gptq dyn"]
                ratios.append((reconstruction_error(W, q, He) / re_, reconstruction_error(W, q, Hc) / rc, n))
                print(
                    f"{n:34s} "
                    + "  ".join(
                        f"{k}: {reconstruction_error(W, Q, Hc) / rc:.3f}|{reconstruction_error(W, Q, He) / re_:.3f}" for k, Q in res.items()
                    ),
                    flush=True,
                )
            if args.layers == "all":
                _summary(ratios)


def _summary(ratios: list[tuple[float, float, str]]) -> None:
    """Distribution of GPTQ / RTN error ratios over the layers, per projection kind, and the worst layers."""
    import statistics

    def line(tag: str, rs: list[tuple[float, float, str]]) -> str:
        ev_, ca = sorted(r[0] for r in rs), sorted(r[1] for r in rs)
        worse = sum(r > 1 for r in ev_)
        return (f"{tag:10s} n={len(rs):3d}  eval H: min {ev_[0]:.3f} median {statistics.median(ev_):.3f} max {ev_[-1]:.3f}"
                f" (> 1: {worse})  calibration H: median {statistics.median(ca):.3f} max {ca[-1]:.3f}")

    print(line("all", ratios))
    for kind in sorted({r[2].rsplit(".", 1)[1] for r in ratios}):
        print(line(kind, [r for r in ratios if r[2].endswith("." + kind)]))
    print("worst on the evaluation text:", ", ".join(f"{n} {e:.3f}" for e, _, n in sorted(ratios, reverse=True)[:8]))


if __name__ == "__main__":
    main()
