"""``lmms-quant``: small command-line helpers around lmms-eval.

``lmms-quant eval ARGS...``  runs lmms-eval's own CLI with ARGS, but exits
non-zero when an evaluation failed (lmms-eval 0.7.3 prints the traceback and
exits 0) and prints where the results JSON went.

``lmms-quant lm-eval ARGS...``  runs lm-eval's (lm-evaluation-harness) CLI with ARGS after
registering the ``quant_llm`` backend and the ``lq_text_ppl`` task (lm-eval reads no
plugins from installed packages): text benchmarks for the quantized VLM's language model.

``lmms-quant demo``  the main job on the embedded default model, offline:
``lmms-eval --model quant_vlm --model_args bits_llm=3,bits_vit=4 --tasks lq_offline``.

``lmms-quant models``  lists the bundled toy models.

``lmms-quant sweep FILE.yaml``  runs a grid of recipes (resumable; see ``lmms_quant.analysis.sweep``).
``lmms-quant report DIR``  tables, plots, component importance and fidelity of a results folder.
``lmms-quant regress NEW BASELINE --tol ...``  fails when a metric dropped beyond the tolerance.
``lmms-quant validate PATH``  checks leaderboard records against their schema.
"""

from __future__ import annotations

import argparse
import sys

DEMO_ARGS = ["--model", "quant_vlm", "--model_args", "bits_llm=3,bits_vit=4", "--tasks", "lq_offline",
             "--batch_size", "16", "--output_path", "results/demo", "--log_samples"]


def _output_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--output_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--output_path="):
            return arg.split("=", 1)[1]
    return None


def run_lmms_eval(argv: list[str]) -> int:
    """Run ``lmms-eval argv`` in this process; return 0 only if every evaluation succeeded."""
    out = _output_path(argv)
    if out is not None and "," in out:
        # lmms-eval 0.7.3 reads "output_path=<path>" as comma-separated key=value pairs for its
        # EvaluationTracker, so a comma fails only after the model has loaded, with a TypeError.
        print(
            f"lmms-quant: --output_path {out!r} has a comma, which lmms-eval 0.7.3 splits into key=value arguments"
            " (the run would fail after loading the model); choose a folder name without commas,"
            f" e.g. {out.replace(',', '_')!r}",
            file=sys.stderr,
        )
        return 2
    import lmms_eval.__main__ as lm_main

    from lmms_quant.model_wrappers import plugin

    failures: list[BaseException] = []
    original = lm_main.cli_evaluate_single

    def recording(args):
        try:
            return original(args)
        except Exception as exc:  # lmms-eval swallows this; remember it
            failures.append(exc)
            raise

    lm_main.cli_evaluate_single = recording
    old_argv = sys.argv
    sys.argv = ["lmms-eval", *argv]
    before = len(plugin.WRITTEN_RESULTS)
    try:
        lm_main.cli_evaluate()
    finally:
        sys.argv = old_argv
        lm_main.cli_evaluate_single = original
    if failures:
        print(f"lmms-quant: the evaluation failed: {type(failures[0]).__name__}: {failures[0]}", file=sys.stderr)
        return 1
    written = plugin.WRITTEN_RESULTS[before:]
    if "--output_path" in argv and not written:
        print("lmms-quant: lmms-eval wrote no results file", file=sys.stderr)
        return 1
    for path in written:
        print(f"results JSON: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # everything after `eval` belongs to lmms-eval, flags included
        return run_lmms_eval([a for a in argv[1:] if a != "--"])
    if argv[:1] == ["lm-eval"]:  # everything after `lm-eval` belongs to lm-eval
        from lmms_quant.model_wrappers.lm_eval_plugin import run_lm_eval

        return run_lm_eval([a for a in argv[1:] if a != "--"])
    parser = argparse.ArgumentParser(prog="lmms-quant", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("eval", help="run lmms-eval with the arguments that follow; non-zero exit on failure")
    sub.add_parser("lm-eval", help="run lm-eval (lm-evaluation-harness) with quant_llm and lq_text_ppl registered; "
                                   "the arguments that follow are lm-eval's")
    sub.add_parser("demo", help="the offline demo: quant_vlm with bits_llm=3,bits_vit=4 on lq_offline")
    sub.add_parser("models", help="list the bundled toy models")
    from lmms_quant.analysis import leaderboard, regress, report, sweep

    for module in (sweep, report, regress, leaderboard):
        module.add_parser(sub)
    ns = parser.parse_args(argv)
    if getattr(ns, "func", None) is not None:
        return ns.func(ns)
    if ns.command == "demo":
        print("lmms-quant demo: lmms-eval " + " ".join(DEMO_ARGS), flush=True)
        return run_lmms_eval(DEMO_ARGS)
    if ns.command == "models":
        from lmms_quant.models import DEFAULT_MODEL, zoo_models

        for name in zoo_models():
            print(f"{name}{'  (default)' if name == DEFAULT_MODEL else ''}")
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
