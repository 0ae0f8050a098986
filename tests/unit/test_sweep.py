"""Sweeps: the grid, the spec's errors, and resuming after kill -9 on a real tiny model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmms_quant.analysis.results import load_runs
from lmms_quant.analysis.sweep import (
    FAILED_FILE,
    SweepSpecError,
    atomic_write_text,
    expand,
    parse_spec,
    run_sweep,
    sweep_status,
)
from tests.fixtures.tiny_models import save_tiny_llava

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def spec_dict(model="toy", **changes):
    base = {"name": "t", "models": [{"pretrained": model, "name": "tiny", "max_new_tokens": 4}], "methods": ["rtn"],
            "bits": {"vit": [4, 16], "llm": [2, 16]}, "tasks": ["lq_world_vqa"], "limit": 2, "batch_size": 2,
            "bootstrap_iters": 0}
    base.update(changes)
    return base


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return str(save_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava"))


# ------------------------------------------------------------------ the grid

def test_factorial_grid_has_one_reference_per_model_and_it_runs_first():
    spec = parse_spec(spec_dict(methods=["rtn", {"method": "rtn", "label": "g16", "group_size": 16}],
                                bits={"vit": [2, 4, 16], "connector": [16], "llm": [2, 4, 16]}))
    configs = expand(spec)
    assert len(configs) == 1 + 2 * 8  # the all-16 point once, 8 quantized points per method
    assert configs[0].id == "tiny__fp16" and configs[0].method is None
    ids = [c.id for c in configs]
    assert len(set(ids)) == len(ids)
    assert "tiny__g16__vit2_conn16_llm4" in ids and "tiny__rtn__vit4_conn16_llm16" in ids
    g16 = next(c for c in configs if c.id == "tiny__g16__vit2_conn16_llm4")
    assert g16.model_args(spec) == "pretrained=toy,max_new_tokens=4,method=rtn,group_size=16,bits_vit=2,bits_connector=16,bits_llm=4,seed=0"
    assert configs[0].model_args(spec) == "pretrained=toy,max_new_tokens=4,bits_vit=16,bits_connector=16,bits_llm=16,seed=0"


def test_one_at_a_time_design_gives_the_sensitivity_curves_only():
    spec = parse_spec(spec_dict(design="one_at_a_time", bits={"vit": [2, 3, 4, 16], "connector": [2, 4], "llm": [2, 3, 4, 5, 6, 8, 16]}))
    configs = expand(spec)
    assert len(configs) == 1 + 3 + 2 + 6
    assert all(sum(b != 16 for b in c.bits.values()) <= 1 for c in configs)


def test_digest_changes_with_what_determines_the_result():
    a = expand(parse_spec(spec_dict()))[1]
    assert a.digest(parse_spec(spec_dict())) == a.digest(parse_spec(spec_dict()))
    assert a.digest(parse_spec(spec_dict())) != a.digest(parse_spec(spec_dict(limit=3)))
    assert a.digest(parse_spec(spec_dict())) != a.digest(parse_spec(spec_dict(tasks=["lq_world_caption"])))


@pytest.mark.parametrize("change, message", [
    ({"bits": {"vit": [9]}}, "bits.vit: 9 is not a valid bit width; valid: 2, 3, 4, 5, 6, 7, 8, 16"),
    ({"bits": {"vision": [4]}}, "bits: unknown key(s) ['vision']; valid: vit, connector, llm"),
    ({"methods": ["qat"]}, "methods[0]: unknown method 'qat'; valid: uniform, rtn, gptq, awq"),
    ({"methods": [{"method": "rtn", "bits_llm": 4}]}, "methods[0]: unknown or grid-owned key(s) ['bits_llm']"),
    ({"recipe": {"group_size": "x"}}, "group_size: expected an integer, got 'x'"),
    ({"methods": [{"method": "uniform", "group_size": 64}]}, "method 'uniform' is the study's per-tensor"),
    ({"limits": 3}, "unknown key(s) ['limits']"),
    ({"tasks": []}, "'tasks' is required"),
    ({"design": "random"}, "design 'random' is unknown; valid: factorial, one_at_a_time"),
    ({"limit": 0}, "limit must be a positive number"),
])
def test_bad_spec_is_refused_with_a_message(change, message):
    with pytest.raises(SweepSpecError) as err:
        parse_spec(spec_dict(**change))
    assert message in str(err.value)


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    atomic_write_text(tmp_path / "a.json", "1")
    atomic_write_text(tmp_path / "a.json", "2")
    assert (tmp_path / "a.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# ------------------------------------------------------------------ running

def test_resume_after_kill_9_loses_and_duplicates_nothing(tiny_llava, tmp_path):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict(tiny_llava)))
    out = tmp_path / "out"
    cmd = [str(BIN / "lmms-quant"), "sweep", str(spec_file), "--output", str(out)]
    ids = [c.id for c in expand(parse_spec(spec_dict(tiny_llava)))]
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=log1, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not list(out.glob("*/*_results.json")):
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        assert time.time() < deadline, "no result appeared"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log1.close()
    first = {p.parent.name: (p.name, p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*/*_results.json")}
    assert 1 <= len(first) < len(ids), "the sweep should have been killed part-way"
    for data in first.values():
        json.loads(data[2])  # a complete file, never a half-written one

    proc2 = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    log2 = "\n".join(line for line in proc2.stderr.splitlines() if "[sweep" in line or "Error" in line)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert f"{len(first)} done, {len(ids) - len(first)} to run" in proc2.stderr, log2
    assert f"{len(ids)}/{len(ids)} done, 0 failed, 0 remaining" in proc2.stderr, log2
    for cid in ids:
        results = list((out / cid).glob("*_results.json"))
        assert len(results) == 1, (cid, results)
        dates = {p.name.split("_samples_")[0] for p in (out / cid).glob("*_samples_*.jsonl")}
        assert dates == {results[0].name[: -len("_results.json")]}, "one sample log, of the kept result"
        assert not list((out / cid).glob(".staging-*")) and not list((out / cid).glob(".*.tmp"))
    for cid, (name, mtime, data) in first.items():  # finished before the kill: not run again
        p = out / cid / name
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data
    runs = load_runs(out)
    assert sorted(r.config_id for r in runs) == sorted(ids)
    assert {r.config_id: r.bits["llm"] for r in runs}["tiny__rtn__vit4_conn16_llm2"] == 2
    assert all(r.metadata["sweep"]["name"] == "t" for r in runs)
    progress = json.loads((out / "progress.json").read_text())
    assert (progress["done"], progress["failed"], progress["remaining"]) == (len(ids), 0, 0)
    manifest = json.loads((out / "sweep.json").read_text())
    assert [c["id"] for c in manifest["configs"]] == ids

    # a third run finds everything done and runs nothing (in this process: nothing to run, nothing imported)
    spec = parse_spec(spec_dict(tiny_llava))
    lines = []
    assert [s.status for s in run_sweep(spec, out, emit=lines.append)] == ["done"] * len(ids)
    assert lines == [f"[sweep t] {len(ids)} configurations: {len(ids)} done, 0 to run; output {out}"]
    # changing what determines the results is refused instead of mixing results
    with pytest.raises(SweepSpecError, match="were run with other settings"):
        run_sweep(parse_spec(spec_dict(tiny_llava, limit=3)), out, emit=lines.append)


def test_a_failed_config_is_recorded_and_retried_only_when_asked(tmp_path):
    spec = parse_spec(spec_dict("/no/such/model", bits={"llm": [2]}, include_fp=False))
    out = tmp_path / "out"
    lines = []
    states = run_sweep(spec, out, emit=lines.append)
    assert [s.status for s in states] == ["failed"]
    failed = json.loads((out / "tiny__rtn__vit16_conn16_llm2" / FAILED_FILE).read_text())
    assert failed["error_type"] == "ModelNotFoundError" and "/no/such/model" in failed["message"] and failed["attempts"] == 1
    assert any("0/1 done, 1 failed, 0 remaining" in line for line in lines)
    run_sweep(spec, out, emit=lines.append)  # not retried
    assert json.loads((out / "tiny__rtn__vit16_conn16_llm2" / FAILED_FILE).read_text())["attempts"] == 1
    assert "1 failed (rerun with --retry-failed)" in lines[-1]
    run_sweep(spec, out, retry_failed=True, emit=lines.append)
    assert json.loads((out / "tiny__rtn__vit16_conn16_llm2" / FAILED_FILE).read_text())["attempts"] == 2


def test_submitit_debug_executor_runs_the_sweep(tiny_llava, tmp_path):
    pytest.importorskip("submitit")
    spec = parse_spec(spec_dict(tiny_llava, bits={"llm": [2, 16]}, log_samples=False))
    out = tmp_path / "out"
    states = run_sweep(spec, out, executor="debug", jobs=2, emit=lambda line: None)
    assert [s.status for s in states] == ["done", "done"]
    assert sorted(s.config.id for s in sweep_status(spec, out)) == ["tiny__fp16", "tiny__rtn__vit16_conn16_llm2"]
    runs = {r.config_id: r for r in load_runs(out)}
    assert runs["tiny__fp16"].is_fp and runs["tiny__rtn__vit16_conn16_llm2"].bits["llm"] == 2
    assert runs["tiny__fp16"].weights_sha256 != runs["tiny__rtn__vit16_conn16_llm2"].weights_sha256


def test_the_full_precision_weights_are_restored_between_configs(tiny_llava):
    import torch

    from lmms_quant import quantize_, recipe_from_args
    from lmms_quant.analysis.sweep import ModelEntry
    from lmms_quant.analysis.sweep.run import _LoadedModel

    m = _LoadedModel(ModelEntry(name="tiny", pretrained=tiny_llava))
    model = m.loaded.model
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    m.restore()  # the first configuration uses the fresh model
    quantize_(model, recipe_from_args({"bits_llm": 2, "bits_vit": 2}))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, fp[k])]
    assert changed, "quantization should have changed some weights"
    m.restore()
    assert all(torch.equal(v, fp[k]) for k, v in model.state_dict().items())
    model.state_dict()[changed[0]].add_(1.0)  # corrupt the live weights behind the snapshot's back
    m.snapshot[changed[0]].add_(1.0)
    with pytest.raises(RuntimeError, match="fingerprint differs"):
        m.restore()


def test_the_executor_takes_the_model_loader_as_a_parameter(tiny_llava, tmp_path):
    from lmms_quant.analysis.sweep.run import load_model_entry

    seen = []

    def loader(entry):
        seen.append(entry.name)
        return load_model_entry(entry)

    spec = parse_spec(spec_dict(tiny_llava, bits={"llm": [2, 16]}, log_samples=False))
    states = run_sweep(spec, tmp_path / "out", emit=lambda line: None, loader=loader)
    assert [s.status for s in states] == ["done", "done"]
    assert seen == ["tiny"]  # loaded once, for both configurations


def test_sigterm_stops_a_submitit_job_and_leaves_its_configuration_pending(tiny_llava, tmp_path):
    """submitit ignores SIGTERM (scancel's first signal); a sweep job stops at once instead, and the
    configuration it was running stays pending with no staging folder left."""
    from lmms_quant.analysis.sweep import STAGING_PREFIX
    from lmms_quant.analysis.sweep.executors import Cancelled, _job
    from lmms_quant.analysis.sweep.run import load_model_entry

    spec = parse_spec(spec_dict(tiny_llava, bits={"llm": [2]}, include_fp=False, log_samples=False))
    [cfg] = expand(spec)
    out = tmp_path / "out"

    def loader(entry):  # SIGTERM arrives while the job loads its model
        os.kill(os.getpid(), signal.SIGTERM)
        return load_model_entry(entry)

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as submitit leaves it
    try:
        with pytest.raises(Cancelled):
            _job(spec, str(out), [cfg.id], False, loader)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [s.status for s in sweep_status(spec, out)] == ["pending"]
    assert not list((out / cfg.id).glob(f"{STAGING_PREFIX}*")) and not (out / cfg.id / FAILED_FILE).exists()


@pytest.mark.parametrize("mode", ["sequential", "fp_inputs"])
def test_a_gptq_grid_calibrates_its_shared_stage_once(tiny_llava, tmp_path, mode):
    """Configurations that share the ViT's recipe restore its calibrated stage (sequential), or solve every
    point from the full-precision statistics computed once (fp_inputs); the results record which."""
    model = {"pretrained": tiny_llava, "name": "tiny", "max_new_tokens": 4, "cache_dir": str(tmp_path / "cache")}
    spec = parse_spec(spec_dict(models=[model], methods=[{"method": "gptq", "group_size": 16}], bits={"vit": [4], "llm": [2, 3]},
                                include_fp=False, log_samples=False, calibration={"source": "world", "samples": 4, "mode": mode}))
    states = run_sweep(spec, tmp_path / "out", emit=lambda line: None)
    assert [s.status for s in states] == ["done", "done"]
    runs = {r.config_id: r.calibration for r in load_runs(tmp_path / "out")}
    first, second = runs["tiny__gptq__vit4_conn16_llm2"], runs["tiny__gptq__vit4_conn16_llm3"]
    if mode == "sequential":
        assert "stage" not in first and second["stage"]["restored"] == ["vit"]
    else:
        assert first["mode"] == second["mode"] == "fp_inputs" and "stage" not in second
