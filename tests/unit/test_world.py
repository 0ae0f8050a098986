"""The synthetic world: determinism, split disjointness and the exported data's schemas."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmms_quant.metrics.vqa import normalize_answer, vqa_accuracy
from lmms_quant.world import COLOURS, KIND_OF_QUESTION_TYPE, SHAPES, SPLITS, make_item
from lmms_quant.world.export import DEFAULT_COUNTS, caption_row, export, retrieval_rows, vqa_rows
from lmms_quant.world.scene import relation

DATA = Path(__file__).resolve().parents[2] / "tasks" / "data" / "world"

CAPTION_KEYS = {
    "question_id": str,
    "image": str,
    "question": str,
    "answer": list,
    "id": int,
    "license": int,
    "file_name": str,
    "coco_url": str,
    "height": int,
    "width": int,
    "date_captured": str,
}
VQA_KEYS = {
    "question_id": int,
    "question": str,
    "question_type": str,
    "answers": list,
    "image_id": int,
    "answer_type": str,
    "multiple_choice_answer": str,
    "image": str,
}
RETRIEVAL_KEYS = {"image": str, "caption": list, "sentids": list, "img_id": str, "filename": str}


def _rows(name: str) -> list[dict]:
    with (DATA / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _check_keys(row: dict, keys: dict[str, type]) -> None:
    assert set(row) == set(keys)
    for key, typ in keys.items():
        assert isinstance(row[key], typ) and not isinstance(row[key], bool), (key, row[key])


def test_same_seed_same_item() -> None:
    for split in SPLITS:
        for index in (0, 1, 7):
            a, b = make_item(split, index), make_item(split, index)
            assert a.image.dtype == np.uint8 and a.image.shape == (64, 64, 3)
            assert np.array_equal(a.image, b.image)
            assert a.captions == b.captions and a.questions == b.questions


def test_other_seed_other_item() -> None:
    a, b = make_item("test", 0, seed=1), make_item("test", 0, seed=2)
    assert not np.array_equal(a.image, b.image)


def test_splits_are_disjoint() -> None:
    digests = {}
    for split in SPLITS:
        digests[split] = {hashlib.sha1(make_item(split, i).image.tobytes()).hexdigest() for i in range(64)}
        assert len(digests[split]) == 64
    assert not digests["train"] & digests["test"]
    assert not digests["train"] & digests["calibration"]
    assert not digests["test"] & digests["calibration"]


def test_scene_invariants_and_twins() -> None:
    for i in range(0, 40, 2):
        base, twin = make_item("train", i), make_item("train", i + 1)
        for item in (base, twin):
            objs = item.scene.objects
            assert 1 <= len(objs) <= 3
            assert len({o.colour for o in objs}) == len(objs)
            assert all(relation(a, b) is not None for k, a in enumerate(objs) for b in objs[k + 1 :])
        assert twin.scene.twin_of == i
        diffs = [
            (a.colour != b.colour) + (a.shape != b.shape) + (a.size != b.size)
            for a, b in zip(base.scene.objects, twin.scene.objects)
        ]
        assert sorted(diffs)[-1] == 1 and sum(diffs) == 1


def test_questions_and_answers() -> None:
    kinds = set()
    for i in range(60):
        item = make_item("test", i)
        assert len(item.captions) == 5 and len(set(item.captions)) == 5
        assert 1 <= len(item.questions) <= 3
        for q in item.questions:
            kinds.add(q.kind)
            assert len(q.answers) == 10
            assert len(set(q.answers)) >= 2  # raw forms differ: only normalisation makes them agree
            assert sum(normalize_answer(a) == q.answer for a in q.answers) >= 8
            assert vqa_accuracy(q.answer, list(q.answers)) == 1.0
    assert kinds == set(KIND_OF_QUESTION_TYPE.values())


def test_number_answers_need_normalisation() -> None:
    forms = {a for i in range(100) for q in make_item("test", i).questions if q.answer_type == "number" for a in q.answers}
    assert {"zero", "one", "two", "three"} & forms and {"0", "1", "2", "3"} & forms


@pytest.mark.parametrize("split", sorted(DEFAULT_COUNTS))
def test_exported_files(split: str) -> None:
    n = DEFAULT_COUNTS[split]
    captions = _rows(f"captions_{split}.jsonl")
    vqa = _rows(f"vqa_{split}.jsonl")
    retrieval = _rows(f"retrieval_{split}.jsonl")
    assert len(captions) == len(retrieval) == n
    assert len({r["question_id"] for r in vqa}) == len(vqa) >= 2 * n
    for row in captions:
        _check_keys(row, CAPTION_KEYS)
        assert len(row["answer"]) == 5 and all(isinstance(c, str) for c in row["answer"])
        assert row["image"] == f"images/{row['file_name']}" == f"images/{row['question_id']}"
        assert row["question"] == "Provide a one-sentence caption for the provided image."
        assert (DATA / row["image"]).is_file()
    for row in vqa:
        _check_keys(row, VQA_KEYS)
        assert [a["answer_id"] for a in row["answers"]] == list(range(1, 11))
        assert all(set(a) == {"answer", "answer_confidence", "answer_id"} for a in row["answers"])
        assert all(a["answer_confidence"] == "yes" for a in row["answers"])
        assert row["answer_type"] in {"yes/no", "number", "other"}
        assert row["question_type"] in KIND_OF_QUESTION_TYPE
        assert (DATA / row["image"]).is_file()
    for row in retrieval:
        _check_keys(row, RETRIEVAL_KEYS)
        assert len(row["caption"]) == 5 and len(row["sentids"]) == 5
        assert all(isinstance(s, int) for s in row["sentids"])
        assert row["image"] == f"images/{row['filename']}"
    with Image.open(DATA / captions[0]["image"]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"


def test_export_matches_generator(tmp_path: Path) -> None:
    """The shipped files are what the exporter writes now (first rows and pixels)."""
    item = make_item("test", 3)
    assert _rows("captions_test.jsonl")[3] == caption_row(item)
    assert _rows("retrieval_test.jsonl")[3] == next(retrieval_rows(item))
    first = [r for r in _rows("vqa_test.jsonl") if r["image_id"] == item.image_id]
    assert first == list(vqa_rows(item))
    with Image.open(DATA / f"images/{item.file_name}") as im:
        assert np.array_equal(np.asarray(im), item.image)
    written = export(tmp_path, counts={"test": 4})
    assert written == {"captions_test.jsonl": 4, "vqa_test.jsonl": written["vqa_test.jsonl"], "retrieval_test.jsonl": 4}
    shipped = (DATA / "captions_test.jsonl").read_text().splitlines()[:4]
    assert (tmp_path / "captions_test.jsonl").read_text().splitlines() == shipped


def test_data_folder_is_small() -> None:
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 4 * 1024 * 1024


def test_retrieval_captions_name_every_object_and_tell_twins_apart() -> None:
    """Flickr30k-style captions: each names every object in full, so twins differ in every caption."""
    for i in range(0, 60, 2):
        item, twin = make_item("calibration", i), make_item("calibration", i + 1)
        for it in (item, twin):
            assert len(it.retrieval_captions) == 5 == len(set(it.retrieval_captions))
            for caption in it.retrieval_captions:
                for o in it.scene.objects:
                    assert f"{o.size} {o.colour} {o.shape}" in caption, (caption, o)
        assert not set(item.retrieval_captions) & set(twin.retrieval_captions)
        if len(item.scene.objects) == 2:  # the relation is said, both ways round in captions 0 and 1
            a, b = item.scene.objects
            rel = relation(a, b)
            if rel in ("right", "below"):  # captions name the left or upper object first
                a, b, rel = b, a, {"right": "left", "below": "above"}[rel]
            phrase, back = {"left": ("to the left of", "to the right of"), "above": ("above", "below")}[rel]
            assert f"{a.size} {a.colour} {a.shape} {phrase} a {b.size} {b.colour} {b.shape}" in item.retrieval_captions[0]
            assert f"{b.size} {b.colour} {b.shape} {back} a {a.size} {a.colour} {a.shape}" in item.retrieval_captions[1]


def test_retrieval_gallery_is_retrievable_unlike_the_reference_captions() -> None:
    """The ceiling of R@1 on the 500 shipped test images: the reference captions repeat across images
    ("there are three shapes in the picture"), the retrieval captions almost never do."""
    from tools.zoo.train_itm import recall_ceiling

    rows = _rows("retrieval_test.jsonl")
    ceiling = recall_ceiling(rows)
    assert ceiling["t2i_R@1"] > 90 and ceiling["i2t_R@1"] > 90, ceiling
    reference = recall_ceiling([{"caption": r["answer"]} for r in _rows("captions_test.jsonl")])
    assert reference["t2i_R@1"] < 70, reference


def test_foil_captions_are_false_and_keep_the_wording() -> None:
    from lmms_quant.world import foil_captions
    from lmms_quant.world.scene import foil

    rng = np.random.default_rng(0)
    swaps = changes = 0
    for i in range(40):
        item = make_item("train", i)
        scene = foil(item.scene, rng)
        assert scene != item.scene and len(scene.objects) == len(item.scene.objects)
        if scene.change == "swap":
            swaps += 1  # the same objects, two of them in each other's place
            assert sorted((o.shape, o.colour, o.size) for o in scene.objects) == sorted((o.shape, o.colour, o.size) for o in item.scene.objects)
        else:
            changes += 1  # one attribute of one object
            diff = [(a, b) for a, b in zip(item.scene.objects, scene.objects) if a != b]
            assert len(diff) == 1
            a, b = diff[0]
            assert sum(getattr(a, f) != getattr(b, f) for f in ("shape", "colour", "size")) == 1
        foils = foil_captions(item, np.random.default_rng(i))
        assert not set(foils) & set(item.retrieval_captions)
        for mine, other in zip(item.retrieval_captions, foils):
            assert len(mine.split()) == len(other.split())  # the same template and free words
    assert swaps and changes


def test_moved_foils_move_one_object_and_mostly_change_the_description() -> None:
    from lmms_quant.world import foil_captions
    from lmms_quant.world.scene import _fits, foil

    words = {"small", "large", *COLOURS, *SHAPES}
    changed = 0
    for i in range(60):
        item = make_item("train", i)
        scene = foil(item.scene, np.random.default_rng(i), move=1.0)
        assert scene.change == "move" and len(scene.objects) == len(item.scene.objects)
        diff = [k for k, (a, b) in enumerate(zip(item.scene.objects, scene.objects)) if a != b]
        assert len(diff) == 1  # one object, and only where it is
        (k,) = diff
        old, new = item.scene.objects[k], scene.objects[k]
        assert (old.shape, old.colour, old.size, old.rgb) == (new.shape, new.colour, new.size, new.rgb)
        assert (old.x, old.y) != (new.x, new.y)
        assert _fits(new, [o for j, o in enumerate(scene.objects) if j != k])  # still a valid placement
        foils = foil_captions(item, np.random.default_rng(i), move=1.0)
        for mine, other in zip(item.retrieval_captions, foils):  # the same objects, said in the same words
            assert set(re.findall("[a-z]+", mine)) & words == set(re.findall("[a-z]+", other)) & words
        changed += foils != item.retrieval_captions
    # a move can keep an object in its region (then the "foil" is true and callers draw again), but mostly it does not
    assert 30 <= changed < 60, changed


def test_foil_move_must_be_a_probability() -> None:
    from lmms_quant.world.scene import foil

    with pytest.raises(ValueError, match=r"move is a probability in \[0, 1\], got 1.5"):
        foil(make_item("train", 0).scene, np.random.default_rng(0), move=1.5)


def test_a_foil_with_no_place_to_move_changes_an_attribute_instead(monkeypatch) -> None:
    from lmms_quant.world import scene as world_scene

    item = make_item("train", 0)
    with monkeypatch.context() as m:  # a layout with no room: every place collides or blurs a relation
        m.setattr(world_scene, "_fits", lambda new, placed: False)
        assert world_scene._moved(item.scene, np.random.default_rng(0)) is None
    monkeypatch.setattr(world_scene, "_moved", lambda scene, rng: None)
    out = world_scene.foil(item.scene, np.random.default_rng(1), move=1.0)
    rng = np.random.default_rng(1)
    rng.random()  # the draw that chose to move
    assert out == world_scene.foil(item.scene, rng) and out.change in ("colour", "shape", "size", "swap")
