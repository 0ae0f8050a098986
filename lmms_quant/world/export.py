"""Write the world's test and calibration splits as offline lmms-eval data.

``python -m lmms_quant.world.export [--out DIR] [--seed S] [--test N] [--calibration N]``

Writes, under ``DIR`` (default ``tasks/data/world`` of the repository):

* ``images/world_{split}_{index:06d}.png``
* ``captions_{split}.jsonl``: lmms-lab/COCO-Caption2017 rows;
* ``vqa_{split}.jsonl``: lmms-lab/VQAv2 rows (ten answers each);
* ``retrieval_{split}.jsonl``: lmms-lab/flickr30k rows (five captions each, the
  item's ``retrieval_captions``).

``image`` fields are paths relative to the JSONL file.  The output is a pure
function of the arguments: running the exporter twice gives identical bytes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from lmms_quant.world import DEFAULT_SEED, IMAGE_SIZE, Item, make_item

__all__ = ["CAPTION_QUESTION", "DEFAULT_COUNTS", "caption_row", "export", "retrieval_rows", "vqa_rows"]

CAPTION_QUESTION = "Provide a one-sentence caption for the provided image."
DEFAULT_COUNTS = {"test": 500, "calibration": 128}
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "tasks" / "data" / "world"


def _image_path(item: Item) -> str:
    return f"images/{item.file_name}"


def caption_row(item: Item) -> dict:
    """One lmms-lab/COCO-Caption2017 row."""
    return {
        "question_id": item.file_name,
        "image": _image_path(item),
        "question": CAPTION_QUESTION,
        "answer": list(item.captions),
        "id": item.image_id,
        "license": 0,
        "file_name": item.file_name,
        "coco_url": "",
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "date_captured": "",
    }


def vqa_rows(item: Item) -> Iterator[dict]:
    """lmms-lab/VQAv2 rows, one per question; ``question_id = 10 * image_id + k``."""
    for k, q in enumerate(item.questions):
        yield {
            "question_id": 10 * item.image_id + k,
            "question": q.question,
            "question_type": q.question_type,
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(q.answers)
            ],
            "image_id": item.image_id,
            "answer_type": q.answer_type,
            "multiple_choice_answer": q.answer,
            "image": _image_path(item),
        }


def retrieval_rows(item: Item) -> Iterator[dict]:
    """One lmms-lab/flickr30k row with the item's ``retrieval_captions``; ``sentids`` are ``5 * image_id + k``."""
    yield {
        "image": _image_path(item),
        "caption": list(item.retrieval_captions),
        "sentids": [5 * item.image_id + k for k in range(len(item.retrieval_captions))],
        "img_id": str(item.image_id),
        "filename": item.file_name,
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def export(out: Path = DEFAULT_OUT, seed: int = DEFAULT_SEED, counts: dict[str, int] | None = None) -> dict[str, int]:
    """Write the splits in ``counts`` (default :data:`DEFAULT_COUNTS`) to ``out``.

    Returns the number of rows written per file name.
    """
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}
    for split, n in counts.items():
        items = [make_item(split, i, seed) for i in range(n)]
        for item in items:
            Image.fromarray(item.image).save(images / item.file_name, optimize=True)
        files = {
            f"captions_{split}.jsonl": [caption_row(it) for it in items],
            f"vqa_{split}.jsonl": [row for it in items for row in vqa_rows(it)],
            f"retrieval_{split}.jsonl": [row for it in items for row in retrieval_rows(it)],
        }
        for name, rows in files.items():
            _write_jsonl(out / name, rows)
            written[name] = len(rows)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--test", type=int, default=DEFAULT_COUNTS["test"])
    parser.add_argument("--calibration", type=int, default=DEFAULT_COUNTS["calibration"])
    args = parser.parse_args(argv)
    written = export(args.out, args.seed, {"test": args.test, "calibration": args.calibration})
    for name, n in written.items():
        print(f"{args.out / name}: {n} rows")


if __name__ == "__main__":
    main()
