"""Reports on hand-made results folders whose answers are worked out by hand."""

import argparse
import csv
import itertools

import numpy as np
import pytest

from lmms_quant.analysis import importance as imp_mod
from lmms_quant.analysis import report
from lmms_quant.analysis.fidelity import fidelity, is_degenerate
from lmms_quant.analysis.importance import component_importance, non_additivity
from lmms_quant.analysis.results import ResultsFormatError, load_run, load_runs
from tests.fixtures.results import BROKEN, SMALL, write_run

A, B, C, D, FP = ("toy__rtn__vit16_conn16_llm4", "toy__rtn__vit4_conn16_llm4", "toy__rtn__vit4_conn16_llm16",
                  "toy__rtn__vit2_conn16_llm2", "toy__fp16")


@pytest.fixture(scope="module")
def small_rows():
    runs = load_runs(SMALL)
    primary = report.primary_metrics(runs)
    return {(r["config_id"], r["task"]): r for r in report.build_rows(runs, primary)}, primary


def test_primary_metric_prefers_the_studys_metrics_and_can_be_chosen():
    runs = load_runs(SMALL)
    assert report.primary_metrics(runs) == {"lq_world_vqa": "vqa_accuracy", "lq_world_caption": "CIDEr"}
    with pytest.raises(ResultsFormatError, match="the task reports CIDEr"):
        report.primary_metrics(runs, {"lq_world_caption": "METEOR"})


def test_recovery_is_the_share_of_the_full_precision_score(small_rows):
    rows, _ = small_rows
    # vqa 0.8 (fp) -> 0.78 / 0.70 / 0.76 / 0.20; CIDEr 1.2 -> 1.10 / 1.14 / 1.05 / 0.30
    expected = {A: (97.5, 1.10 / 1.2 * 100), B: (87.5, 95.0), C: (95.0, 87.5), D: (25.0, 25.0), FP: (100.0, 100.0)}
    for cid, (vqa, cider) in expected.items():
        assert rows[(cid, "lq_world_vqa")]["recovery_pct"] == pytest.approx(vqa)
        assert rows[(cid, "lq_world_caption")]["recovery_pct"] == pytest.approx(cider)
        assert rows[(cid, "lq_world_caption")]["CIDEr_recovery_pct"] == pytest.approx(cider)
    assert rows[(A, "lq_world_vqa")]["reference"] == FP
    assert rows[(B, "lq_world_vqa")]["bpw_study"] == pytest.approx(5.2)


def test_pareto_fronts_by_hand(small_rows):
    rows, _ = small_rows
    # bpw (study): fp 16, A 10, B 5.2, C 11.2, D 3.4
    # vqa: C (11.2, .76) is dominated by A (10, .78); the rest is the front
    assert {cid for (cid, t), r in rows.items() if t == "lq_world_vqa" and r["pareto_all"]} == {FP, A, B, D}
    # CIDEr: B (5.2, 1.14) dominates A (10, 1.10) and C (11.2, 1.05)
    assert {cid for (cid, t), r in rows.items() if t == "lq_world_caption" and r["pareto_all"]} == {FP, B, D}
    assert rows[(C, "lq_world_vqa")]["pareto_method"] is False and rows[(A, "lq_world_vqa")]["pareto_method"] is True


def test_pareto_mask_handles_ties_and_lower_is_better():
    assert report.pareto_mask([1, 1, 2], [0.5, 0.5, 0.4]) == [True, True, False]  # equal points do not dominate each other
    assert report.pareto_mask([1, 2, 3], [1.0, 2.0, 3.0], higher_is_better=False) == [True, False, False]
    assert report.pareto_mask([1, 2, 3], [1.0, 2.0, 3.0]) == [True, True, True]
    assert report.pareto_mask([1, 2, 3], [3.0, 2.0, 1.0]) == [True, False, False]


def test_fidelity_against_the_full_precision_outputs(small_rows):
    rows, _ = small_rows
    vqa = {cid: rows[(cid, "lq_world_vqa")] for cid in (FP, A, B, C, D)}
    assert vqa[FP]["fp_agree"] == 1.0
    assert (vqa[A]["fp_agree"], vqa[B]["fp_agree"], vqa[C]["fp_agree"], vqa[D]["fp_agree"]) == (0.75, 0.75, 1.0, 0.5)
    assert (vqa[D]["n_empty"], vqa[D]["n_degenerate"], vqa[A]["n_empty"], vqa[A]["n_degenerate"]) == (1, 1, 0, 0)
    assert rows[(A, "lq_world_caption")]["fp_agree"] is None  # no per-sample log for that task


def test_degenerate_generations():
    assert is_degenerate("user user user")
    assert is_degenerate("the cat is a b a b a b")
    assert not is_degenerate("a red circle and a red square")
    assert not is_degenerate("yes yes")
    res = fidelity([{"doc_id": 0, "filtered_resps": ["  "]}, {"doc_id": 1, "filtered_resps": "x"}], None)
    assert (res["n_empty"], res["agree"]) == (1, None)


def test_nonadditivity_by_hand():
    rows = report.build_nonadditivity(load_runs(SMALL), {"lq_world_vqa": "vqa_accuracy", "lq_world_caption": "CIDEr"})
    vqa = [r for r in rows if r["task"] == "lq_world_vqa"]
    # only (vit 4, llm 4) has both single-component runs: drops .04 + .02 alone, .10 together
    assert [(r["a"], r["bits_a"], r["b"], r["bits_b"]) for r in vqa] == [("vit", 4, "llm", 4)]
    assert vqa[0]["drop_sum"] == pytest.approx(0.06) and vqa[0]["drop_both"] == pytest.approx(0.10)
    assert vqa[0]["excess"] == pytest.approx(0.04)
    cider = [r for r in rows if r["task"] == "lq_world_caption"]
    assert cider[0]["excess"] == pytest.approx(0.06 - (0.15 + 0.10))  # sub-additive here
    lower = non_additivity({(16, 16): 10.0, (4, 16): 12.0, (16, 4): 11.0, (4, 4): 15.0}, ["vit", "llm"], higher_is_better=False)
    assert lower[0]["excess"] == pytest.approx(5.0 - 3.0)


def grid(tmp_path, score_fn, bits=(2, 3, 4, 8, 16)):
    for v, c, m in itertools.product(bits, (4, 16), bits):
        write_run(tmp_path / f"toy__rtn__vit{v}_conn{c}_llm{m}", bits={"vit": v, "connector": c, "llm": m},
                  scores={"t": {"acc": score_fn(v, c, m)}})
    return load_runs(tmp_path)


def llm_driven(vit, conn, llm):
    return 0.9 - {2: 0.5, 3: 0.2, 4: 0.05}.get(llm, 0) - {2: 0.04, 3: 0.01}.get(vit, 0) - (0.005 if conn == 4 else 0)


@pytest.mark.parametrize("driver", ["llm", "vit"])
def test_the_component_that_drives_the_score_gets_the_largest_share(tmp_path, driver):
    fn = llm_driven if driver == "llm" else (lambda vit, conn, llm: llm_driven(llm, conn, vit))
    runs = grid(tmp_path, fn)
    [imp] = report.build_importance(runs, {"t": "acc"})
    assert imp["features"] == ["vit", "connector", "llm"] and imp["n"] == 50
    other = "vit" if driver == "llm" else "llm"
    for kind in ("rf", "permutation", "consensus") + (("shap",) if imp_mod.shap_available() else ()):
        shares = imp[kind]
        assert sum(shares.values()) == pytest.approx(1.0)
        assert shares[driver] > 0.6 and shares[driver] > shares[other] > shares["connector"], (kind, shares)
    assert imp["r2_linear"] < 0.95  # thresholds, not a line


def test_a_linear_additive_score_has_r2_one_and_shares_follow_the_slopes():
    X = np.array(list(itertools.product((2, 4, 8, 16), (2, 4, 8, 16))), dtype=float)
    y = 0.03 * X[:, 0] + 0.01 * X[:, 1]
    imp = component_importance(X, y, ["vit", "llm"])
    assert imp.r2_linear == pytest.approx(1.0)
    assert imp.consensus["vit"] > 0.7


def test_without_shap_the_consensus_is_the_mean_of_the_other_two(monkeypatch):
    monkeypatch.setattr(imp_mod, "shap_available", lambda: False)
    X = np.array(list(itertools.product((2, 4, 16), (2, 4, 16))), dtype=float)
    imp = component_importance(X, X[:, 1] ** 2, ["vit", "llm"])
    assert imp.shap is None and "shap is not installed" in imp.notes[0]
    assert imp.consensus["llm"] == pytest.approx((imp.rf["llm"] + imp.permutation["llm"]) / 2)


def test_a_constant_score_says_so_instead_of_inventing_shares():
    imp = component_importance(np.array([[2.0], [4.0], [16.0]]), np.array([0.5, 0.5, 0.5]), ["llm"])
    assert imp.consensus is None and "the same in every configuration" in imp.notes[0]


def test_report_files_and_a_self_contained_page(tmp_path):
    rep = report.make_report(SMALL)
    page = report.write_report(rep, tmp_path, source="small")
    with open(tmp_path / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 10 and {r["task"] for r in table} == {"lq_world_vqa", "lq_world_caption"}
    assert "| config_id | method | task |" in (tmp_path / "table.md").read_text()
    names = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert "pareto_toy-model_lq_world_vqa.png" in names and "sensitivity_toy-model_rtn_lq_world_caption.svg" in names
    assert (tmp_path / "figures" / "pareto_toy-model_lq_world_vqa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "figures" / "pareto_toy-model_lq_world_vqa.svg").read_text()[:2000]
    html = page.read_text()
    assert html.count("data:image/png;base64,") == len(rep.figures) >= 4
    assert "http://" not in html.replace("http://www.w3.org", "") and "<script" not in html and "src='http" not in html
    assert len(list((tmp_path / "leaderboard").glob("*.json"))) == 5
    assert "component" in (tmp_path / "importance.csv").read_text()


def test_report_refuses_a_results_file_of_the_wrong_shape(tmp_path, capsys):
    ns = argparse.Namespace(dir=str(BROKEN / "string_metric"), out=str(tmp_path), metric=[], bpw="study", no_plots=True)
    assert report.main(ns) == 2
    assert "results['lq_world_vqa']['vqa_accuracy,none'] is '0.5' (str), not a number" in capsys.readouterr().err
    assert not (tmp_path / "table.csv").exists()


@pytest.mark.parametrize("folder, message", [
    ("truncated", "not valid JSON"), ("no_results", "missing or empty 'results'"), ("null_metric", "is None (NoneType), not a number"),
    ("bad_metadata", "'lmms_quant.quantization.bpw.model' is missing"), ("empty", "no lmms-eval results files"),
])
def test_wrong_shapes_are_refused_never_read_as_zero(folder, message):
    with pytest.raises(ResultsFormatError) as err:
        load_runs(BROKEN / folder)
    assert message in str(err.value)


def test_a_plain_lmms_eval_result_without_our_metadata_still_loads(tmp_path):
    path = write_run(tmp_path / "plain", bits={}, scores={"t": {"acc": 0.5}}, metadata=False)
    run = load_run(path)
    assert run.scores == {"t": {"acc": 0.5}} and run.recipe is None and run.bits["llm"] is None and not run.is_fp
