"""lmms-eval's own benchmarks through quant_vlm: the built-in task YAMLs (prompts, generation settings,
scoring and aggregation unchanged) on local rows shaped like their hub data sets
(tests/fixtures/lmms_eval_rows), through lmms-eval's evaluator with quant_vlm as the model."""

import importlib.util
import os

import pytest
from lmms_eval.api.instance import Instance, unwrap_generation_output
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager

from lmms_quant.model_wrappers.exits import BackendExit
from lmms_quant.model_wrappers.lmms_eval_tasks import JUDGE_TASKS, LoglikelihoodResult, check_judge_tasks
from lmms_quant.model_wrappers.plugin import manifests
from lmms_quant.model_wrappers.quant_vlm import QuantVLM
from tests.fixtures.lmms_eval_rows import FIXTURES, local_name, write_tasks

#: fixtures of judge-scored tasks: refused without their key, so not run here
JUDGED = [f for f in FIXTURES if f.task in JUDGE_TASKS]
RUNNABLE = [f for f in FIXTURES if f.task not in JUDGE_TASKS]
FAST = ("chartqa", "ai2d", "mmmu_val", "worldvqa_mc_ppl")  # VQA, letters, several images per document, log-likelihood


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    os.environ["LMMS_QUANT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    manifests()
    return QuantVLM(pretrained="tiny-random-llava", bits_llm=4, bits_vit=4)


def evaluate(lm, fixtures, tmp_path):
    task_dir = write_tasks(tmp_path / "tasks", fixtures)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # several built-in aggregations write ./submissions/
    try:
        return simple_evaluate(model=lm, tasks=[local_name(f.task) for f in fixtures], task_manager=TaskManager(include_path=str(task_dir)),
                               log_samples=True, batch_size=1, gen_kwargs="max_new_tokens=4")
    finally:
        os.chdir(cwd)


def check_results(out, fixtures):
    for f in fixtures:
        res = out["results"][local_name(f.task)]
        for metric in f.metrics:
            keys = [k for k in res if k.split(",")[0] == metric and "stderr" not in k]
            assert keys, (f.task, metric, sorted(res))
            value = res[keys[0]]
            # a number; None or an empty list for metrics a task fills only for submissions (textvqa's 'submission')
            assert isinstance(value, (int, float)) or value is None or len(value) == 0, (f.task, metric, value)
        samples = out["samples"][local_name(f.task)]
        assert len(samples) == len(f.rows()), f.task  # every document was answered


def test_fast_subset_runs_end_to_end_with_every_metric(lm, tmp_path, one_thread):
    fixtures = [f for f in RUNNABLE if f.task in FAST]
    assert {f.task for f in fixtures} == set(FAST)
    out = evaluate(lm, fixtures, tmp_path)
    check_results(out, fixtures)
    mc = out["samples"][local_name("worldvqa_mc_ppl")]
    # multiple_choice: one (mean NLL, is_greedy) pair per option reaches the task, not the string "(4.3, False)"
    for sample in mc:
        assert all(isinstance(r[0], tuple) and isinstance(r[0][0], float) and isinstance(r[0][1], bool) for r in sample["resps"])
    assert 0.0 <= out["results"][local_name("worldvqa_mc_ppl")]["acc,none"] <= 1.0


@pytest.mark.slow
def test_every_verified_lmms_eval_task_runs_end_to_end(lm, tmp_path, one_thread):
    out = evaluate(lm, RUNNABLE, tmp_path)
    check_results(out, RUNNABLE)
    assert len({f.task for f in RUNNABLE}) == 20  # 18 of the list, mmbench_en_dev_static, worldvqa_mc_ppl


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OPENAI_API_KEY") or importlib.util.find_spec("Levenshtein") is None,
                    reason="mathvista needs its judge's OPENAI_API_KEY and the Levenshtein package (lmms_eval[metrics])")
def test_judge_scored_tasks_run_when_their_judge_is_available(lm, tmp_path, one_thread):
    out = evaluate(lm, JUDGED, tmp_path)
    check_results(out, JUDGED)


def test_loglikelihood_results_survive_lmms_evals_unwrap():
    raw = (4.25, False)
    assert unwrap_generation_output(raw)[0] == "(4.25, False)"  # the upstream bug this works around
    result = LoglikelihoodResult(*raw)
    assert unwrap_generation_output(result)[0] == raw
    nll, greedy = result
    assert (nll, greedy) == raw and result == raw and result[0] == 4.25


def test_judge_scored_tasks_are_refused_without_their_key_before_any_work(lm, monkeypatch):
    assert {"mmbench_en_dev", "mathvista_testmini"} <= set(JUDGE_TASKS) and JUDGED
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    request = Instance("generate_until", ("q", {"max_new_tokens": 2}, lambda d: [], 0, "mmbench_en_dev", "dev"), 0,
                       {"task": "mmbench_en_dev", "doc_id": 0, "repeats": 1})
    monkeypatch.setattr(lm, "_generate_until", lambda reqs: pytest.fail("generated for a refused task"))
    with pytest.raises(BackendExit, match=r"task mmbench_en_dev is scored by an external judge \(OpenAI gpt-4o-2024-11-20 "
                                          r"\(answer extraction\)\) and OPENAI_API_KEY is not set: .* random letter.*"
                                          r"run the same rows scored offline: mmbench_en_dev_static") as info:
        lm.generate_until([request])
    assert info.value.code == 2
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    check_judge_tasks({"mmbench_en_dev", "mathvista_testmini"})  # with the key, the judge is the user's choice
