"""The sweep's ``slurm`` executor against a real single-node SLURM (Debian's slurm-wlm and munge, started
by tests/slurm/cluster.sh with a generated slurm.conf): a 4-configuration sweep as one job array, one
array task cancelled with scancel while it runs, the sweep resumed: exactly 4 results, none duplicated
or half-written.  Skipped, with the reason, only where the daemons cannot start."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lmms_quant.analysis.results import load_runs
from lmms_quant.analysis.sweep import STAGING_PREFIX, parse_spec, run_sweep, sweep_status
from tests.fixtures.tiny_models import save_tiny_llava

pytestmark = pytest.mark.e2e
CLUSTER = Path(__file__).resolve().parents[1] / "slurm" / "cluster.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    pytest.importorskip("submitit")
    if shutil.which("sbatch") is None or os.geteuid() != 0:
        pytest.skip("SLURM is not installed here, or not as root (apt-get install slurmctld slurmd slurm-client munge)")
    folder = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        pytest.skip(f"the SLURM daemons could not start: {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    yield folder
    subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], capture_output=True, timeout=60)


def squeue():
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, timeout=30).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


def test_a_job_array_cancelled_midway_resumes_to_exactly_four_results(slurm, tmp_path):
    model = str(save_tiny_llava(tmp_path / "tiny-llava"))
    spec = parse_spec({"name": "slurm", "models": [{"pretrained": model, "name": "tiny", "max_new_tokens": 4, "serve": "quant_vlm"}],
                       "methods": ["rtn"], "bits": {"vit": [4, 16], "llm": [2, 16]}, "tasks": ["lq_world_vqa"], "limit": 96,
                       "batch_size": 1, "bootstrap_iters": 0})
    out = tmp_path / "out"
    assert len(sweep_status(spec, out)) == 4
    lines = []
    run_sweep(spec, out, executor="slurm", jobs=4, wait=False, emit=lines.append,
              executor_params={"timeout_min": 20, "cpus_per_task": 1, "mem_gb": 4})
    [submitted] = [line for line in lines if "submitted 4 slurm job(s)" in line]
    ids = submitted.split(": ", 1)[1].split(", ")
    assert len({i.split("_")[0] for i in ids}) == 1 and all("_" in i for i in ids)  # one array, four tasks
    victim, first_config = ids[0], sweep_status(spec, out)[0].config.id  # the first array task runs the first configuration
    deadline = time.time() + 300
    log = out / ".submitit" / victim / f"{victim}_0_log.err"
    while time.time() < deadline and not (log.is_file() and "quant_vlm generate:" in log.read_text(errors="replace")):
        time.sleep(0.2)  # midway: the task is answering its configuration's requests
    assert [victim, "RUNNING"] in squeue(), squeue()
    subprocess.run(["scancel", victim], check=True, timeout=30)
    while time.time() < deadline and any(i in {j for j, _ in squeue()} for i in ids):
        time.sleep(2)
    first = {s.config.id: s.status for s in sweep_status(spec, out)}
    assert first[first_config] != "done" and list(first.values()).count("done") == 3, first  # the cancelled one is not done

    lines.clear()
    run_sweep(spec, out, executor="slurm", jobs=4, emit=lines.append, executor_params={"timeout_min": 20, "cpus_per_task": 1})
    assert any("submitted 1 slurm job(s)" in line for line in lines), lines  # only what was left
    states = sweep_status(spec, out)
    assert [s.status for s in states] == ["done"] * 4
    for s in states:
        folder = out / s.config.id
        assert len(list(folder.glob("*_results.json"))) == 1 and not list(folder.glob(f"{STAGING_PREFIX}*"))
    runs = load_runs(out)
    assert sorted(r.config_id for r in runs) == sorted(s.config.id for s in states) and len(runs) == 4
