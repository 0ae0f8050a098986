"""Calibration on real image-text data through the ``datasets`` library: every on-disk form, the
hub path, column inference and overrides, what the results record, and errors before the model loads."""

import pytest
import torch

from lmms_quant.calibration_data import build_calibration_set, load_calibration_rows, resolve_source
from lmms_quant.errors import DataError
from lmms_quant.model_wrappers.exits import BackendExit
from lmms_quant.model_wrappers.quant_vlm import QuantVLM
from lmms_quant.models import load_vlm
from lmms_quant.recipe import DEFAULT_HUB_CALIBRATION, CalibrationSpec, RecipeError
from tests.fixtures import calib_datasets as fx
from tests.fixtures.tiny_models import save_tiny_llava

CAPTIONS = {row["caption"][0] for row in fx.flickr_rows()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    return {
        "save_to_disk": fx.save_to_disk(root / "disk"),
        "parquet_file": fx.parquet_file(root / "pq" / "test-00000.parquet"),
        "parquet_folder": fx.parquet_file(root / "pqdir" / "data" / "test-00000-of-00001.parquet").parent.parent,
        "image_folder": fx.image_folder(root / "imgs"),
    }


@pytest.mark.parametrize("form", ["save_to_disk", "parquet_file", "parquet_folder", "image_folder"])
def test_every_on_disk_form_gives_images_and_their_captions(sources, form):
    drawn = load_calibration_rows(CalibrationSpec(source=str(sources[form]), samples=4, seed=1))
    assert len(drawn.rows) == 4 and drawn.available == len(fx.flickr_rows())
    assert {r["target"] for r in drawn.rows} <= CAPTIONS and all(r["kind"] == "caption" for r in drawn.rows)
    assert all(r["image"].size == (24, 24) for r in drawn.rows)
    d = drawn.dataset
    assert d["id"] == str(sources[form]) and d["rows"] == drawn.available and len(d["fingerprint"]) >= 16
    assert d["columns"] == {"image": "image", "text": "text" if form == "image_folder" else "caption", "question": None}
    assert len(d["samples_sha256"]) == 64 and d["samples_sha256"] == drawn.sha256


def test_draws_are_seeded_and_the_hash_follows_the_draw(sources):
    spec = CalibrationSpec(source=str(sources["parquet_file"]), samples=3, seed=1)
    a, b = load_calibration_rows(spec), load_calibration_rows(spec)
    c = load_calibration_rows(CalibrationSpec(source=str(sources["parquet_file"]), samples=3, seed=2))
    assert [r["id"] for r in a.rows] == [r["id"] for r in b.rows] and a.sha256 == b.sha256
    assert [r["id"] for r in a.rows] != [r["id"] for r in c.rows] and a.sha256 != c.sha256


def test_columns_can_be_named_and_bad_names_are_refused(sources):
    path = str(sources["save_to_disk"])
    drawn = load_calibration_rows(CalibrationSpec(source=path, samples=2, text_column="filename", split="test"))
    assert all(r["target"].endswith(".jpg") for r in drawn.rows)
    with pytest.raises(DataError, match=r"no text column 'captions'; columns: image, caption, sentids, img_id, filename"):
        load_calibration_rows(CalibrationSpec(source=path, samples=2, text_column="captions"))
    with pytest.raises(DataError, match=r"has no split 'train'; valid: test"):
        load_calibration_rows(CalibrationSpec(source=path, samples=2, split="train"))


def test_several_splits_without_train_need_calib_split(tmp_path):
    path = fx.save_to_disk(tmp_path / "two", splits=("validation", "test"))
    with pytest.raises(DataError, match=r"several splits \(validation, test\); choose one with calib_split"):
        load_calibration_rows(CalibrationSpec(source=str(path), samples=2))
    assert load_calibration_rows(CalibrationSpec(source=str(path), samples=2, split="validation")).dataset["split"] == "validation"


def test_a_hub_id_goes_to_datasets_load_dataset_with_split_and_revision(monkeypatch):
    import datasets

    seen = {}

    def fake_load_dataset(path, **kwargs):
        seen.update(path=path, **kwargs)
        return fx.flickr_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    drawn = load_calibration_rows(CalibrationSpec(source="lmms-lab/flickr30k", split="test", revision="abc123", samples=2))
    assert seen == {"path": "lmms-lab/flickr30k", "split": "test", "revision": "abc123"}
    assert (drawn.dataset["id"], drawn.dataset["split"], drawn.dataset["revision"]) == ("lmms-lab/flickr30k", "test", "abc123")


def test_auto_is_the_world_for_the_toys_and_a_real_set_for_other_models():
    spec = CalibrationSpec()
    assert spec.source == "auto"
    assert resolve_source(spec, "toy-llava", bundled=True).source == "world"
    real = resolve_source(spec, "llava-hf/llava-1.5-7b-hf", bundled=False)
    assert (real.source, real.split) == (DEFAULT_HUB_CALIBRATION["source"], DEFAULT_HUB_CALIBRATION["split"]) == ("lmms-lab/flickr30k", "test")
    with pytest.raises(RecipeError, match="is resolved by the backend"):
        load_calibration_rows(spec)


def test_vqa_datasets_get_the_vqa_prompt(tmp_path):
    import datasets

    rows = [{"image": str(fx.ROWS / "images" / f"hub_{i}.png"), "question": f"what colour is shape {i}?",
             "answers": [{"answer": "red", "answer_confidence": "yes"}] * 3} for i in range(3)]
    ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "vqa"))
    drawn = load_calibration_rows(CalibrationSpec(source=str(tmp_path / "vqa"), samples=3))
    assert {(r["kind"], r["target"]) for r in drawn.rows} == {("vqa", "red")}
    assert drawn.dataset["columns"] == {"image": "image", "text": "answers", "question": "question"}


def test_the_calibration_set_and_the_results_record_the_dataset(sources, tmp_path, one_thread):
    model_dir = str(save_tiny_llava(tmp_path / "llava", seed=1))
    v = load_vlm(model_dir)
    calib = build_calibration_set(v.processor, v.family, CalibrationSpec(source=str(sources["parquet_file"]), samples=3), "cpu",
                                  torch.float32)
    assert len(calib.batches) == 3 and all("pixel_values" in b for b in calib.batches)
    lm = QuantVLM(pretrained=model_dir, method="gptq", bits_llm=4, calib_source=str(sources["parquet_file"]), calib_samples=3,
                  cache=False)
    recorded = lm.report.calibration
    assert recorded["source"] == str(sources["parquet_file"]) and recorded["sha256"] == calib.sha256
    assert recorded["dataset"]["samples_sha256"] == load_calibration_rows(CalibrationSpec(source=str(sources["parquet_file"]),
                                                                                         samples=3)).sha256
    assert lm.report.to_dict()["recipe"]["calibration"]["source"] == str(sources["parquet_file"])


def test_a_hub_model_offline_fails_before_loading_naming_model_set_and_way_out(tmp_path, monkeypatch, capsys):
    import lmms_quant.model_wrappers.quant_vlm as qv

    model_dir = str(save_tiny_llava(tmp_path / "llava", seed=1))
    monkeypatch.setattr(qv, "load_vlm", lambda *a, **k: pytest.fail("the model loaded before the calibration data was checked"))
    with pytest.raises(BackendExit) as info:
        QuantVLM(pretrained=model_dir, method="gptq", bits_llm=4)
    msg = str(info.value)
    assert info.value.code == 3 and msg.startswith("lmms-quant: reading the calibration data failed: model 'llava'")
    assert "model 'llava'" in msg and "calibration set 'lmms-lab/flickr30k' (split test)" in msg
    assert "calib_source=/path/to/folder" in msg and "calib_source=world" in msg
    assert capsys.readouterr().err.strip().splitlines()[-1] == msg  # one line, printed once


def test_a_broken_calibration_file_fails_before_loading(tmp_path, monkeypatch):
    import lmms_quant.model_wrappers.quant_vlm as qv

    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"question": "q", "answers": ["a"]}\n{not json\n')
    monkeypatch.setattr(qv, "load_vlm", lambda *a, **k: pytest.fail("the model loaded before the calibration data was checked"))
    with pytest.raises(BackendExit, match=r"calib.jsonl line 2: not valid JSON"):
        QuantVLM(pretrained="tiny-random-llava", method="gptq", bits_llm=4, calib_source=str(bad))
