"""The shipped toy-llava: loads offline, speaks the world, and answers it well."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_quant.world import make_item
from lmms_quant.zoo import model_dir
from lmms_quant.zoo.toy_llava import CAPTION_PROMPT, VQA_PROMPT, pixel_values
from tools.zoo.scoring import VQA_PROMPTS, generate, load, load_rows, vqa_metrics

DATA = Path(__file__).resolve().parents[2] / "tasks" / "data" / "world"
# Measured 0.869 on the first 64 test rows with the shipped model (2026-11-27; 0.930 on all
# 1,500, above the project's 0.90 goal, see lmms_quant/zoo/models/toy-llava/TRAINING.md; these
# 64 rows hold more colour and position questions, its weakest kinds).  A regression guard:
# the most common calibration answer per question opening scores 0.353 on these rows, and
# the previous shipped model (0.752 overall) scored 0.7656.
MIN_VQA_FIRST_64 = 0.83


@pytest.fixture(scope="module")
def toy_llava():
    torch.set_num_threads(1)
    return load(model_dir("toy-llava"))


def test_shipped_files() -> None:
    d = model_dir("toy-llava")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "TRAINING.md", "generation_config.json"):
        assert (d / name).is_file(), name
    assert (d / "processor_config.json").is_file() or (d / "preprocessor_config.json").is_file()
    size = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    assert size < 10 * 1024 * 1024
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_feature_layer"] == -1


def test_tokenizer_and_processor(toy_llava) -> None:
    _, processor, _ = toy_llava
    tok = processor.tokenizer
    assert [tok.convert_ids_to_tokens(i) for i in range(5)] == ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    ids = tok(VQA_PROMPT.format(question="what color is the circle?"))["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok("a zebra", add_special_tokens=False)["input_ids"][-1] == tok.unk_token_id
    for item in (make_item("test", i) for i in range(8)):
        for text in item.captions + tuple(q.question for q in item.questions):
            assert tok.unk_token_id not in tok(text)["input_ids"], text
    images = [make_item("test", i).image for i in range(2)]
    inputs = processor(
        text=[CAPTION_PROMPT] * 2, images=[Image.fromarray(a) for a in images], return_tensors="pt", padding=True
    )
    assert torch.allclose(inputs["pixel_values"], pixel_values(images), atol=1e-5)
    n_image_tokens = int((inputs["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum(1)[0])
    assert n_image_tokens == toy_llava[0].config.image_seq_length


def test_vqa_accuracy_first_rows(toy_llava) -> None:
    model, processor, model_type = toy_llava
    rows = load_rows(DATA / "vqa_test.jsonl", limit=64)
    t0 = time.time()
    prompts = [VQA_PROMPTS[model_type].format(question=r["question"]) for r in rows]
    preds = generate(model, processor, [r["image"] for r in rows], prompts, max_new_tokens=4)
    metrics = vqa_metrics(rows, preds)
    assert metrics["vqa"] >= MIN_VQA_FIRST_64, (metrics, preds[:16])
    assert time.time() - t0 < 30


def test_caption_names_the_scene(toy_llava) -> None:
    model, processor, model_type = toy_llava
    items = [make_item("test", i) for i in range(4)]
    caps = generate(model, processor, [Image.fromarray(it.image) for it in items], [CAPTION_PROMPT] * 4, 24)
    for item, cap in zip(items, caps):
        assert cap and "<" not in cap
        # at least one object's colour appears in the caption
        assert any(o.colour in cap for o in item.scene.objects), (cap, item.captions)


def test_generate_from_raw_processor_call(toy_llava) -> None:
    """The documented usage: processor(...) + model.generate(...) + batch_decode."""
    model, processor, _ = toy_llava
    item = make_item("test", 0)
    q = item.questions[0]
    inputs = processor(
        text=[VQA_PROMPT.format(question=q.question)], images=[Image.fromarray(item.image)], return_tensors="pt", padding=True
    )
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    assert isinstance(answer, str) and answer
    assert np.isfinite(model(**inputs).logits.detach().numpy()).all()
