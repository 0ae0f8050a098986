"""The plugin wiring: entry point, task discovery, package list."""

from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_entry_point_gives_a_simple_model_manifest():
    eps = [ep for ep in metadata.entry_points(group="lmms_eval.models") if ep.name == "quant_vlm"]
    assert len(eps) == 1
    manifests = eps[0].load()()
    assert [m.model_id for m in manifests] == ["quant_vlm"]
    assert manifests[0].simple_class_path == "lmms_quant.model_wrappers.quant_vlm.QuantVLM"
    assert manifests[0].chat_class_path is None  # simple, so likelihood tasks work


def test_lmms_eval_resolves_our_model_and_tasks_without_include_path():
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    from lmms_quant.model_wrappers.quant_vlm import QuantVLM

    assert get_model("quant_vlm") is QuantVLM
    tm = TaskManager("ERROR")
    assert {"lq_world_vqa", "lq_world_caption", "lq_offline"} <= set(tm.all_tasks)


def test_every_folder_with_shipped_files_is_a_listed_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    for pkg, folder in mapping.items():
        base = ROOT / folder
        for d in [base, *(p for p in base.rglob("*") if p.is_dir() and "__pycache__" not in p.parts)]:
            if any(f.is_file() and f.suffix != ".pyc" for f in d.iterdir()):
                name = ".".join([pkg, *d.relative_to(base).parts])
                in_data_glob = any(d.is_relative_to(ROOT / "lmms_quant" / g.split("/**")[0])
                                   for g in cfg["package-data"]["lmms_quant"] if "/**" in g)
                assert name in listed or in_data_glob, f"{d} ships files but {name} is not in pyproject's packages"
