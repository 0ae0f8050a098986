"""The regression gate: exit codes, messages, tolerances, and refusing files of the wrong shape."""

import shutil

import pytest

from lmms_quant.analysis import regress
from lmms_quant.analysis.regress import bootstrap_ci, parse_tolerance
from lmms_quant.cli import main as cli
from tests.fixtures.results import BROKEN, SMALL, vqa_samples, write_run


def gate(capsys, *args):
    code = cli(["regress", *map(str, args)])
    return code, capsys.readouterr()


def one(tmp_path, name, vqa=0.8, cider=1.2, per_sample=None, **kw):
    samples = {"lq_world_vqa": vqa_samples(["x"] * len(per_sample), per_sample)} if per_sample else None
    if per_sample:
        vqa = sum(per_sample) / len(per_sample)
    return write_run(tmp_path / name / "toy__rtn__vit16_conn16_llm4", bits={"llm": 4}, samples=samples,
                     scores={"lq_world_vqa": {"vqa_accuracy": vqa}, "lq_world_caption": {"CIDEr": cider}}, **kw).parent.parent


def test_identical_results_pass(capsys):
    code, out = gate(capsys, SMALL, SMALL)
    assert code == 0
    assert "10 metric(s) compared: 0 regressed, 0 missing, 0 improved, 10 within tolerance (no drop allowed)" in out.out
    assert out.out.rstrip().endswith("PASS")


def test_a_drop_beyond_the_absolute_tolerance_fails_and_is_shown(tmp_path, capsys):
    base, new = one(tmp_path, "base", vqa=0.80), one(tmp_path, "new", vqa=0.77)
    code, out = gate(capsys, new, base, "--tol", "0.02")
    assert code == 1
    line = next(x for x in out.out.splitlines() if x.startswith("REGRESSED"))
    assert "toy__rtn__vit16_conn16_llm4" in line and "lq_world_vqa" in line and "vqa_accuracy" in line and "-0.03" in line
    assert "CIDEr" not in out.out.split("metric(s) compared")[0]  # what did not move is not listed
    assert out.out.rstrip().endswith("REGRESSION")
    assert gate(capsys, new, base, "--tol", "0.05")[0] == 0
    assert gate(capsys, new, base, "--tol", "0.05", "--tol", "vqa_accuracy=0.01")[0] == 1  # the scoped tolerance wins
    assert gate(capsys, new, base, "--tol", "0.01", "--tol", "lq_world_vqa/vqa_accuracy=0.04")[0] == 0


def test_the_baseline_can_be_named_with_baseline_and_only_once(tmp_path, capsys):
    base, new = one(tmp_path, "base", vqa=0.80), one(tmp_path, "new", vqa=0.77)
    assert gate(capsys, new, "--baseline", base, "--tol", "0.02")[0] == 1  # the same verdict as `new base`
    assert gate(capsys, base, "--baseline", new, "--tol", "0.02")[0] == 0  # swapped: the new one improved
    code, out = gate(capsys, new, base, "--baseline", base)
    assert code == 2 and "give the baseline once: as the second argument or as --baseline FILE (got both)" in out.err
    code, out = gate(capsys, new)
    assert code == 2 and "(got neither)" in out.err


def test_relative_tolerance(tmp_path, capsys):
    base, new = one(tmp_path, "base", cider=1.20), one(tmp_path, "new", cider=1.10)  # -8.3%
    assert gate(capsys, new, base, "--tol", "10%")[0] == 0
    code, out = gate(capsys, new, base, "--tol", "5%")
    assert code == 1 and "REGRESSED" in out.out and "5%" in out.out


def test_improvements_pass_and_are_reported(tmp_path, capsys):
    base, new = one(tmp_path, "base", vqa=0.7), one(tmp_path, "new", vqa=0.9)
    code, out = gate(capsys, new, base)
    assert code == 0 and "improved" in out.out and "1 improved" in out.out


def test_lower_is_better_metrics_regress_upwards(tmp_path, capsys):
    write_run(tmp_path / "base" / "c", bits={}, scores={"t": {"perplexity": 10.0}})
    write_run(tmp_path / "new" / "c", bits={}, scores={"t": {"perplexity": 12.0}})
    write_run(tmp_path / "better" / "c", bits={}, scores={"t": {"perplexity": 9.0}})
    assert gate(capsys, tmp_path / "new", tmp_path / "base", "--tol", "1")[0] == 1
    assert gate(capsys, tmp_path / "better", tmp_path / "base")[0] == 0


def test_bootstrap_tolerance_uses_the_per_sample_logs(tmp_path, capsys):
    base_scores = [1.0] * 160 + [0.0] * 40                    # 0.80
    noise = [1.0] * 157 + [0.0] * 3 + [0.0] * 37 + [1.0] * 3  # 0.80 too, different documents wrong
    drop = [1.0] * 120 + [0.0] * 80                           # 0.60
    base = one(tmp_path, "base", per_sample=base_scores)
    code, out = gate(capsys, one(tmp_path, "noise", per_sample=noise), base, "--tol", "vqa_accuracy=ci", "--all")
    assert code == 0 and "paired CI of the change" in out.out
    code, out = gate(capsys, one(tmp_path, "drop", per_sample=drop), base, "--tol", "vqa_accuracy=ci")
    assert code == 1 and "REGRESSED" in out.out and "paired CI of the change [-" in out.out
    # CIDEr has no per-sample scores: it is compared exactly, and the table says so
    code, out = gate(capsys, one(tmp_path, "cider", per_sample=base_scores, cider=1.1), base, "--tol", "ci")
    assert code == 1 and "no per-sample scores: compared exactly" in out.out


def test_bootstrap_interval_brackets_the_true_difference():
    lo, hi = bootstrap_ci([1, 0] * 100, [1, 0] * 100, paired=True)
    assert lo == hi == 0.0
    lo, hi = bootstrap_ci([1.0] * 50 + [0.0] * 50, [1.0] * 80 + [0.0] * 20, paired=False)
    assert lo < -0.3 < hi < 0


def test_a_missing_configuration_or_metric_fails(tmp_path, capsys):
    shutil.copytree(SMALL, tmp_path / "new")
    shutil.rmtree(tmp_path / "new" / "toy__rtn__vit2_conn16_llm2")
    code, out = gate(capsys, tmp_path / "new", SMALL)
    assert code == 1 and "MISSING" in out.out and "configuration not in NEW" in out.out
    write_run(tmp_path / "a" / "c", bits={}, scores={"t": {"acc": 0.5, "f1": 0.4}})
    write_run(tmp_path / "b" / "c", bits={}, scores={"t": {"acc": 0.5}})
    code, out = gate(capsys, tmp_path / "b", tmp_path / "a")
    assert code == 1 and "metric not in NEW" in out.out and "f1" in out.out


def test_changed_weights_are_noted(tmp_path, capsys):
    base = one(tmp_path, "base", weights="a" * 64)
    code, out = gate(capsys, one(tmp_path, "new", weights="b" * 64), base)
    assert code == 0 and "the quantized weights differ from the baseline's" in out.out


@pytest.mark.parametrize("broken, message", [
    ("truncated", "not valid JSON"), ("string_metric", "is '0.5' (str), not a number"),
    ("null_metric", "is None (NoneType), not a number"), ("no_results", "missing or empty 'results'"),
    ("empty", "no lmms-eval results files"),
])
def test_a_baseline_of_the_wrong_shape_is_refused(capsys, broken, message):
    code, out = gate(capsys, SMALL, BROKEN / broken)
    assert code == 2
    assert "refusing BASELINE" in out.err and message in out.err
    code, out = gate(capsys, BROKEN / broken, SMALL)
    assert code == 2 and "refusing NEW" in out.err


def test_bad_tolerances_are_refused(capsys):
    for bad in ("abc", "-1", "ci:1.5", "5%%"):
        code, out = gate(capsys, SMALL, SMALL, "--tol", bad)
        assert code == 2 and "--tol" in out.err
    assert parse_tolerance("CIDEr=5%") == regress.Tolerance("rel", 0.05, "CIDEr")
    assert parse_tolerance("t/m=ci:0.9") == regress.Tolerance("ci", 0.9, "t/m")


def test_json_output(tmp_path, capsys):
    import json

    code, _ = gate(capsys, SMALL, SMALL, "--json", tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and data["passed"] is True and len(data["comparisons"]) == 10
