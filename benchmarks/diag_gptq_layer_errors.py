"""Layer-level GPTQ diagnostic on SmolLM2-135M: does a Hessian from the calibration text generalize to the evaluation text?

    python benchmarks/diag_gptq_layer_errors.py                                          # ours only
    PYTHONPATH=$PWD /tmp/llmc-venv/bin/python benchmarks/diag_gptq_layer_errors.py      # plus llm-compressor quantize_weight
    python benchmarks/diag_gptq_layer_errors.py --calib-file austen --calib-samples 128  # the larger calibration text

For five Linears of the full-precision model, Hessians H = 2 X^T X / n are built from
their inputs on the calibration text (benchmarks/data; by default the Constitution, 10 x 512 tokens;
``--calib-file austen`` / ``--calib-samples N``: N of the 173 Austen windows, see
``bench_smollm2_ppl.py``) and on the
evaluation text (lm_tasks/data).  Each weight is quantized (symmetric) by RTN, by
our GPTQ with dynamic groups (the default) and static groups, by llm-compressor's
GPTQ core (static groups), and by our GPTQ given the evaluation Hessian (an oracle).
Printed: error / RTN error, measured with the calibration H | with the evaluation H,
where error = trace((W - Q) H (W - Q)^T).
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
    args = ap.parse_args()
    torch.set_num_threads(1)
    calib_file = {"constitution": c.CALIB_FILE, "austen": c.AUSTEN_CALIB_FILE}.get(args.calib_file, Path(args.calib_file))
    m, tok = c.load_model()
    ev = c.windows(c.token_ids(tok, c.eval_text()), 512, keep_last=True)
    ca = c.calibration_windows(tok, args.calib_samples, 512, calib_file)
    print(f"calibration: {len(ca)} x 512 tokens of {calib_file.name}; evaluation: {len(ev)} windows", flush=True)
    names = NAMES
    mods = dict(m.named_modules())
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
    for bits in (4, 3):
        for g in (64, -1):
            print(f"--- {bits} bit, group {g}: error / RTN error, on calibration H | on eval H")
            for n in names:
                W = mods[n].weight.data.float()
                Hc, He = H[(n, "cal")], H[(n, "eval")]
                R = fake_quantize(W, bits, g, True)
                res = {"gptq dyn": gptq_quantize(W, Hc, bits, g, True).weight}
                if g > 0:
                    res["gptq static"] = gptq_quantize(W, Hc, bits, g, True, static_groups=True).weight
                if llmc:
                    res["llmc"] = llmc(W, Hc, bits, g)
                # oracle: GPTQ calibrated on the eval activations themselves
                res["gptq dyn (H=eval)"] = gptq_quantize(W, He, bits, g, True).weight
                rc, re_ = reconstruction_error(W, R, Hc), reconstruction_error(W, R, He)
                print(
                    f"{n:34s} "
                    + "  ".join(
                        f"{k}: {reconstruction_error(W, Q, Hc) / rc:.3f}|{reconstruction_error(W, Q, He) / re_:.3f}" for k, Q in res.items()
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
