"""The real-data lq_ tasks, offline: real-format hub rows (tests/fixtures/hub_rows) pushed through the
functions of the real YAMLs (loaded with lmms-eval's own YAML loader), and the YAMLs' pins and groups."""

import json
import os
import shutil
import types
from pathlib import Path

import datasets
import pytest
import torch
from lmms_eval.utils import load_yaml_config
from PIL import Image

from lmms_quant import retrieval as RL
from lmms_quant.metrics import recall_at_k
from lmms_quant.model_wrappers import retrieval as R
from lmms_quant.models import format_prompt
from lmms_quant.tasks import _common
from lmms_quant.tasks._common import RETRIEVAL_METRICS, TaskDataError
from tests.fixtures.tiny_retrieval import tiny_clip

torch.set_num_threads(1)
TASKS = Path(_common.__file__).resolve().parent
ROWS = Path(__file__).resolve().parents[1] / "fixtures" / "hub_rows"

#: task -> (dataset_path, dataset_name, split) as lmms-eval 0.7.3's own tasks load them.
HUB = {
    "lq_coco2017_cap_val": ("lmms-lab-encoder/COCO-Caption2017", None, "val"),
    "lq_coco_karpathy_test": ("yerevann/coco-karpathy", None, "test"),
    "lq_flickr30k_cap_test": ("lmms-lab-encoder/flickr30k", None, "test"),
    "lq_nocaps_val": ("lmms-lab-encoder/NoCaps", None, "validation"),
    "lq_vqav2_val": ("lmms-lab-encoder/VQAv2", None, "validation"),
    "lq_vqav2_val_21k": ("lmms-lab-encoder/VQAv2", None, "validation"),
    "lq_gqa_testdev": ("lmms-lab-encoder/GQA", "testdev_balanced_instructions", "testdev"),
    "lq_textvqa_val": ("lmms-lab-encoder/textvqa", None, "validation"),
    "lq_okvqa_val": ("lmms-lab-encoder/OK-VQA", None, "val2014"),
    "lq_vizwiz_val": ("lmms-lab-encoder/VizWiz-VQA", None, "val"),
    "lq_flickr30k_retrieval": ("lmms-lab-encoder/flickr30k", None, "test"),
    "lq_coco_retrieval": ("yerevann/coco-karpathy", None, "test"),
}
GROUPS = {
    "caption/lq_caption.yaml": ["lq_coco2017_cap_val", "lq_coco_karpathy_test", "lq_flickr30k_cap_test", "lq_nocaps_val"],
    "vqa/lq_vqa.yaml": ["lq_vqav2_val", "lq_gqa_testdev", "lq_textvqa_val", "lq_okvqa_val", "lq_vizwiz_val"],
    "retrieval/lq_retrieval.yaml": ["lq_flickr30k_retrieval", "lq_coco_retrieval"],
    "world/lq_offline.yaml": ["lq_world_vqa", "lq_world_caption", "lq_world_retrieval"],
    "study/lq_study_blip2.yaml": ["lq_study_blip2_coco_cap", "lq_study_blip2_vqav2", "lq_study_blip2_gqa"],
    "study/lq_study_llava.yaml": ["lq_study_llava_vqav2", "lq_study_llava_gqa"],
    "study/lq_study_blip2_itm.yaml": ["lq_study_blip2_itm_flickr30k"],
}


def task_configs() -> dict[str, dict]:
    out = {}
    for path in sorted(TASKS.rglob("lq_*.yaml")):
        cfg = load_yaml_config(str(path), mode="full")
        if isinstance(cfg.get("task"), str):
            out[cfg["task"]] = cfg
    return out


CONFIGS = task_configs()


def rows(name: str) -> list[dict]:
    """Fixture rows as the hub gives them: ``image`` opened into a PIL image."""
    out = []
    for line in (ROWS / name).read_text().splitlines():
        row = json.loads(line)
        if "image" in row:
            row["image"] = Image.open(ROWS / row["image"]).convert("RGB")
        out.append(row)
    return out


def kwargs(cfg):
    return (cfg.get("lmms_eval_specific_kwargs") or {}).get("default")


def test_every_task_and_group_is_named_lq_and_groups_list_their_tasks():
    for rel, tasks in GROUPS.items():
        cfg = load_yaml_config(str(TASKS / rel), mode="simple")
        assert cfg["group"].startswith("lq_") and cfg["task"] == tasks
        assert set(tasks) <= set(CONFIGS)
    assert all(name.startswith("lq_") for name in CONFIGS)
    assert len(CONFIGS) == 22  # 4 caption, 6 VQA, 2 retrieval, 4 world, 6 study
    full = CONFIGS["lq_world_retrieval_full"]  # the whole gallery: no process_docs cut to 20 images
    assert full.get("process_docs") is None and CONFIGS["lq_world_retrieval"]["process_docs"] is not None
    assert full["generation_kwargs"]["retrieval"] is True and full["generation_kwargs"]["retrieval_k_test"] == 16


@pytest.mark.parametrize("task", sorted(HUB))
def test_hub_tasks_pin_the_lmms_eval_dataset_and_a_revision(task):
    cfg = CONFIGS[task]
    assert (cfg["dataset_path"], cfg.get("dataset_name"), cfg["test_split"]) == HUB[task]
    assert cfg["dataset_kwargs"]["revision"] == "main"
    assert "token" not in cfg["dataset_kwargs"]  # public data sets; token=True would demand a login


def test_study_tasks_inherit_data_and_set_the_studys_prompts_and_decoding():
    blip2, llava = CONFIGS["lq_study_blip2_vqav2"], CONFIGS["lq_study_llava_vqav2"]
    doc = rows("vqav2_val.jsonl")[0]
    assert blip2["doc_to_text"](doc, kwargs(blip2)) == "Question: What color is the circle? Short answer:"
    assert format_prompt(None, "blip2", blip2["doc_to_text"](doc, kwargs(blip2)), 1) == "Question: What color is the circle? Short answer:"
    assert {k: blip2["generation_kwargs"][k] for k in ("num_beams", "max_new_tokens")} == {"num_beams": 5, "max_new_tokens": 10}
    assert format_prompt(None, "llava", llava["doc_to_text"](doc, kwargs(llava)), 1) == (
        "USER: <image>\nWhat color is the circle?\nAnswer the question using a single word or phrase. ASSISTANT:")
    assert llava["generation_kwargs"]["num_beams"] == 1 and not llava["generation_kwargs"]["do_sample"]
    assert CONFIGS["lq_study_blip2_gqa"]["dataset_name"] == "testdev_balanced_instructions"
    itm = CONFIGS["lq_study_blip2_itm_flickr30k"]["generation_kwargs"]
    settings = RL.RetrievalSettings.from_generation_kwargs(itm)
    assert (settings.k_test, settings.max_text_len, settings.text_preprocess, settings.captions_per_image) == (128, 35, "blip", 5)
    assert CONFIGS["lq_study_blip2_coco_cap"]["doc_to_text"](rows("coco2017_cap_val.jsonl")[0], kwargs(CONFIGS["lq_study_blip2_coco_cap"])) == ""


def test_vqav2_study_subset_is_the_first_21435_questions():
    cfg = CONFIGS["lq_vqav2_val_21k"]
    ds = datasets.Dataset.from_dict({"question_id": list(range(21_500))})
    kept = cfg["process_docs"](ds)
    assert len(kept) == 21_435 and kept[0]["question_id"] == 0 and kept[-1]["question_id"] == 21_434
    assert CONFIGS["lq_study_llava_vqav2"]["process_docs"](ds)["question_id"] == list(range(21_435))


# ------------------------------------------------------------------- VQA
@pytest.mark.parametrize("task,fixture,prediction,expected", [
    ("lq_vqav2_val", "vqav2_val.jsonl", "Red", 1.0),
    ("lq_vqav2_val", "vqav2_val.jsonl", "pink", 0.3),
    ("lq_textvqa_val", "textvqa_val.jsonl", "red", 1.0),
    ("lq_textvqa_val", "textvqa_val.jsonl", "maroon", 0.3),
    ("lq_okvqa_val", "okvqa_val2014.jsonl", "triangular", 0.6),
    ("lq_vizwiz_val", "vizwiz_val.jsonl", "unanswerable", 0.9),
])
def test_vqa_tasks_score_hub_rows_with_official_accuracy(task, fixture, prediction, expected):
    cfg = CONFIGS[task]
    doc = rows(fixture)[0]
    [image] = cfg["doc_to_visual"](doc)
    assert image.size == (24, 24)
    assert cfg["doc_to_text"](doc, kwargs(cfg)).startswith(doc["question"] + "\n")
    assert cfg["process_results"](doc, [prediction]) == {"vqa_accuracy": pytest.approx(expected)}
    assert [m["metric"] for m in cfg["metric_list"]] == ["vqa_accuracy"]


def test_gqa_reads_images_from_a_local_folder_or_parquet_and_scores_exact_match(monkeypatch, tmp_path):
    cfg = CONFIGS["lq_gqa_testdev"]
    doc = rows("gqa_testdev_balanced_instructions.jsonl")[0]
    monkeypatch.setenv(_common.GQA_IMAGES_ENV, str(ROWS / "images"))
    [image] = cfg["doc_to_visual"](doc)
    assert image.getpixel((12, 12)) == Image.open(ROWS / "images" / "n288870.png").convert("RGB").getpixel((12, 12))
    assert cfg["process_results"](doc, ["Yellow."]) == {"exact_match": 1.0}
    assert cfg["process_results"](doc, ["blue"]) == {"exact_match": 0.0}
    # the hub image set, saved as parquet (id, image)
    ids = ["n288870", "n288871"]
    datasets.Dataset.from_dict({"id": ids, "image": [str(ROWS / "images" / f"{i}.png") for i in ids]}).cast_column(
        "image", datasets.Image()).to_parquet(str(tmp_path / "testdev-00000-of-00001.parquet"))
    monkeypatch.setenv(_common.GQA_IMAGES_ENV, str(tmp_path))  # the image set is reloaded when the variable changes
    assert cfg["doc_to_visual"](doc)[0].size == (24, 24)
    with pytest.raises(TaskDataError, match=r"document id='1': image id 'n999' \(field 'imageId'\) is not in the image set"):
        cfg["doc_to_visual"]({**doc, "id": "1", "imageId": "n999"})


def test_vqa_bad_documents_name_the_document_and_field():
    cfg = CONFIGS["lq_vqav2_val"]
    doc = rows("vqav2_val.jsonl")[1]
    with pytest.raises(TaskDataError, match=r"document question_id=262149000: field 'answers' is an empty list"):
        cfg["process_results"]({**doc, "answers": []}, ["1"])
    no_image = {k: v for k, v in doc.items() if k != "image"}
    with pytest.raises(TaskDataError, match=r"document question_id=262149000: missing field 'image'"):
        cfg["doc_to_visual"](no_image)
    with pytest.raises(TaskDataError, match=r"document question_id=262149000: missing field 'question'"):
        cfg["doc_to_text"]({k: v for k, v in doc.items() if k != "question"}, kwargs(cfg))


# -------------------------------------------------------------- captions
@pytest.mark.parametrize("task,fixture,id_field,refs_field,n_refs", [
    ("lq_coco2017_cap_val", "coco2017_cap_val.jsonl", "question_id", "answer", 5),
    ("lq_nocaps_val", "nocaps_val.jsonl", "image_id", "annotations_captions", 10),
    ("lq_flickr30k_cap_test", "flickr30k_test.jsonl", "img_id", "caption", 5),
])
def test_caption_tasks_turn_hub_rows_into_caption_items(task, fixture, id_field, refs_field, n_refs):
    cfg = CONFIGS[task]
    doc = rows(fixture)[1]
    assert cfg["doc_to_visual"](doc)[0].size == (24, 24)
    assert cfg["doc_to_text"](doc, kwargs(cfg)) == "Provide a one-sentence caption for the provided image."
    out = cfg["process_results"](doc, ["a green square"])
    assert set(out) == {m["metric"] for m in cfg["metric_list"]} == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    item = out["CIDEr"]
    assert item["image_id"] == doc[id_field] and item["pred"] == "a green square" and len(item["refs"]) == n_refs


def test_caption_aggregation_over_hub_rows(monkeypatch):
    from lmms_quant.metrics import captions

    monkeypatch.setattr(captions.shutil, "which", lambda name: None)  # pure-Python tokenizer: no JVM start in a unit test
    cfg = CONFIGS["lq_coco2017_cap_val"]
    docs = rows("coco2017_cap_val.jsonl")
    items = [cfg["process_results"](d, [d["answer"][0]])["Bleu_1"] for d in docs]
    agg = {m["metric"]: m["aggregation"] for m in cfg["metric_list"]}
    assert agg["Bleu_1"](items) == pytest.approx(1.0)
    assert agg["CIDEr"](items) > 1.0


def test_coco_karpathy_images_come_from_a_local_root(monkeypatch, tmp_path):
    cfg = CONFIGS["lq_coco_karpathy_test"]
    docs = rows("coco_karpathy_test.jsonl")
    (tmp_path / "val2014").mkdir()
    for i, d in enumerate(docs):
        shutil.copy(ROWS / "images" / f"hub_{i}.png", tmp_path / "val2014" / d["filename"])
    monkeypatch.setenv(_common.COCO_ROOT_ENV, str(tmp_path))
    assert cfg["doc_to_visual"](docs[2])[0].getpixel((12, 14)) == Image.open(ROWS / "images" / "hub_2.png").getpixel((12, 14))
    item = cfg["process_results"](docs[0], ["a red circle"])["CIDEr"]
    assert item["image_id"] == 391895 and item["refs"] == docs[0]["sentences"]
    os.remove(tmp_path / "val2014" / docs[1]["filename"])
    with pytest.raises(TaskDataError, match=r"document filename='COCO_val2014_000000391896.jpg': image .* is not under \$LMMS_QUANT_COCO_ROOT"):
        cfg["doc_to_visual"](docs[1])


def test_flickr30k_karpathy_test_split_is_required_before_download_and_filters_rows(monkeypatch):
    for task in ("lq_flickr30k_cap_test", "lq_flickr30k_retrieval"):
        cfg = CONFIGS[task]
        split_check = cfg["preflight"][-1]
        monkeypatch.delenv(_common.FLICKR30K_SPLIT_ENV, raising=False)
        with pytest.raises(TaskDataError, match=f"task {task}: the Flickr30k 1K test needs the Karpathy split"):
            split_check(task, cfg)
        monkeypatch.setenv(_common.FLICKR30K_SPLIT_ENV, str(ROWS / "flickr30k_karpathy_test.txt"))
        split_check(task, cfg)
        ds = datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "image"} for r in rows("flickr30k_test.jsonl")])
        assert cfg["process_docs"](ds)["img_id"] == ["0", "2", "3", "5"]
    with pytest.raises(TaskDataError, match=r"document img_id='1': field 'caption' has 4 entries, expected 5"):
        doc = rows("flickr30k_test.jsonl")[1]
        CONFIGS["lq_flickr30k_cap_test"]["process_results"]({**doc, "caption": doc["caption"][:4]}, ["x"])


def test_karpathy_split_files_in_every_documented_format(tmp_path):
    karpathy = {"images": [{"filename": "1.jpg", "split": "test"}, {"filename": "2.jpg", "split": "train"}]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    (tmp_path / "flickr30k_test.json").write_text(json.dumps([{"image": "flickr30k-images/3.jpg", "caption": ["x"]}]))
    assert _common.karpathy_test_filenames(tmp_path / "dataset_flickr30k.json") == {"1.jpg"}
    assert _common.karpathy_test_filenames(tmp_path / "flickr30k_test.json") == {"3.jpg"}


# ------------------------------------------------------------- retrieval
def _serve(cfg, docs, model, processor):
    """The real YAML's functions around the backend: requests -> answers -> process_results -> aggregations."""
    from lmms_eval.api.instance import Instance

    task = cfg["task"]
    lm = types.SimpleNamespace(model=model, processor=processor, family="clip", task_dict={task: {"test": docs}}, world_size=1)
    reqs = [Instance("generate_until", (cfg["doc_to_text"](d), dict(cfg["generation_kwargs"]), cfg["doc_to_visual"], i, task, "test"),
                     idx=0, metadata={"task": task, "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]
    answers = R.serve_with_retrieval(lm, reqs, lambda r: [])
    items = [cfg["process_results"](d, [a]) for d, a in zip(docs, answers)]
    return answers, {m["metric"]: m["aggregation"]([it[m["metric"]] for it in items]) for m in cfg["metric_list"]}


@pytest.mark.parametrize("task,fixture,field", [("lq_flickr30k_retrieval", "flickr30k_test.jsonl", "caption"),
                                                ("lq_world_retrieval", None, "caption")])
def test_retrieval_tasks_end_to_end_through_their_yaml_functions(task, fixture, field):
    cfg = CONFIGS[task]
    docs = rows(fixture) if fixture else datasets.load_dataset("json", data_files=str(TASKS / "data/world/retrieval_test.jsonl"),
                                                                split="train").select(range(8)).to_list()
    assert cfg["doc_to_text"](docs[0]) == docs[0][field][0]  # a caption: quant_vlm's calib_source=task calibration sample
    model, processor = tiny_clip()
    answers, metrics = _serve(cfg, docs, model, processor)
    assert all(len(a) < 90 for a in answers)
    captions = [c for d in docs for c in d[field]]
    owner = [j for j, d in enumerate(docs) for _ in d[field]]
    with torch.inference_mode():
        sim = RL.dual_encoder_similarity(model, processor, [cfg["doc_to_visual"](d)[0] for d in docs], captions)
    ref = recall_at_k(sim, owner)
    assert metrics == pytest.approx({m: ref[m] for m in RETRIEVAL_METRICS})


def test_coco_retrieval_accepts_images_with_more_than_five_captions(monkeypatch, tmp_path):
    cfg = CONFIGS["lq_coco_retrieval"]
    docs = rows("coco_karpathy_test.jsonl")
    docs[0]["sentences"] = docs[0]["sentences"] + ["a sixth caption"]
    (tmp_path / "val2014").mkdir()
    for i, d in enumerate(docs):
        shutil.copy(ROWS / "images" / f"hub_{i}.png", tmp_path / "val2014" / d["filename"])
    monkeypatch.setenv(_common.COCO_ROOT_ENV, str(tmp_path))
    model, processor = tiny_clip()
    answers, metrics = _serve(cfg, docs, model, processor)
    assert [json.loads(a)["gallery"] for a in answers] == [[3, 16]] * 3 and len(json.loads(answers[0])["i2t"]) == 6
    assert 0 <= metrics["mean_recall"] <= 100


class _Backend:
    def __init__(self, metadata):
        self.metadata = metadata


def test_retrieval_task_build_refuses_a_family_without_scorer_before_the_data_loads(monkeypatch):
    import weakref

    from lmms_eval.api.task import ConfigurableTask

    from lmms_quant.model_wrappers import registry
    from lmms_quant.tasks._task import CheckedTask

    loads = []
    original = ConfigurableTask.download
    monkeypatch.setattr(ConfigurableTask, "download", lambda self, kw=None: loads.append(kw) or original(self, kw))
    cfg = CONFIGS["lq_world_retrieval"]
    assert cfg["class"] is CheckedTask
    backend = _Backend({"model": {"family": "idefics2"}})
    monkeypatch.setattr(registry, "LIVE_BACKENDS", weakref.WeakSet([backend]))
    with pytest.raises(R.RetrievalRefused, match="task lq_world_retrieval: model family 'idefics2' cannot do image-text retrieval"):
        CheckedTask(config=dict(cfg))
    assert loads == []
    backend.metadata = {"model": {"family": "clip"}}
    task = CheckedTask(config=dict(cfg))
    assert len(loads) == 1 and len(task.test_docs()) == 20
    assert task.config.generation_kwargs["retrieval"] is True and "preflight" not in task.dump_config()
