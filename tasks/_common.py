"""Helpers shared by our task YAMLs' utils: loading images, checking documents,
and scoring captions once per aggregation.

Errors name the document and the field, so a malformed data set fails with a
message a user can act on instead of a KeyError deep inside lmms-eval.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from lmms_quant.errors import DataError
from lmms_quant.metrics import caption_scores

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent
DATA_DIR = TASKS_DIR / "data"


class TaskDataError(DataError):
    """A task document is missing a field or holds a value of the wrong shape."""


def doc_label(doc: Mapping[str, Any]) -> str:
    for key in ("question_id", "id", "img_id", "image_id", "filename", "file_name"):
        if key in doc:
            return f"{key}={doc[key]!r}"
    return "a document without an id"


def require(doc: Mapping[str, Any], field: str, kind: type | tuple[type, ...]) -> Any:
    if field not in doc:
        raise TaskDataError(f"document {doc_label(doc)}: missing field {field!r}; it has {sorted(doc)}")
    value = doc[field]
    if not isinstance(value, kind):
        raise TaskDataError(f"document {doc_label(doc)}: field {field!r} should be {kind}, got {type(value).__name__}")
    return value


def load_image(doc: Mapping[str, Any], field: str = "image", root: Path | None = None) -> Image.Image:
    """The document's image as RGB: a PIL image (hub data sets), an encoded
    ``{"bytes": ...}`` record (parquet), or a path relative to ``root``."""
    if field not in doc or doc[field] is None:
        raise TaskDataError(f"document {doc_label(doc)}: missing field {field!r}")
    value = doc[field]
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, Mapping) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    if isinstance(value, Mapping) and value.get("path"):
        value = value["path"]
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and root is not None:
            path = root / path
        if not path.is_file():
            raise TaskDataError(f"document {doc_label(doc)}: image file {str(path)!r} (field {field!r}) does not exist")
        with Image.open(path) as im:
            return im.convert("RGB")
    raise TaskDataError(f"document {doc_label(doc)}: field {field!r} holds a {type(value).__name__}, not an image or a path")


def references(doc: Mapping[str, Any], field: str, expected: int | None = None) -> list[str]:
    refs = require(doc, field, list)
    if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise TaskDataError(f"document {doc_label(doc)}: field {field!r} must be a non-empty list of non-empty strings")
    if expected is not None and len(refs) != expected:
        raise TaskDataError(f"document {doc_label(doc)}: field {field!r} has {len(refs)} entries, expected {expected}")
    return refs


# ----------------------------------------------------------------- captions
_CAPTION_CACHE: dict[str, Any] = {}


def caption_item(doc_id: Any, prediction: str, refs: list[str]) -> dict[str, Any]:
    return {"image_id": doc_id, "pred": prediction, "refs": refs}


def caption_aggregate(metric: str) -> Callable[[list[dict[str, Any]]], float]:
    """An lmms-eval aggregation for one caption metric.

    lmms-eval calls one aggregation per metric over identical item lists; the
    first call scores every metric at once (one PTB tokenisation, one METEOR
    process) and the rest read the cached result.
    """

    def aggregate(items: list[dict[str, Any]]) -> float:
        key = hashlib.sha256(json.dumps([[str(i["image_id"]), i["pred"], i["refs"]] for i in items]).encode()).hexdigest()
        if key not in _CAPTION_CACHE:
            refs = {str(i["image_id"]): i["refs"] for i in items}
            preds = {str(i["image_id"]): i["pred"] for i in items}
            result = caption_scores(refs, preds)
            for note in result.warnings:
                log.warning("caption metrics: %s", note)
            _CAPTION_CACHE.clear()
            _CAPTION_CACHE[key] = result
        value = _CAPTION_CACHE[key].scores[metric]
        return float("nan") if value is None else float(value)

    aggregate.__name__ = f"caption_{metric}"
    return aggregate


# ---------------------------------------------------------------------- VQA
def vqa_answers(doc: Mapping[str, Any], field: str = "answers") -> list:
    """The human answers of a VQA document: a non-empty list of strings (TextVQA,
    OK-VQA, VizWiz) or of ``{"answer": str, ...}`` records (VQAv2)."""
    answers = require(doc, field, list)
    if not answers:
        raise TaskDataError(f"document {doc_label(doc)}: field {field!r} is an empty list; VQA accuracy needs the human answers")
    for i, item in enumerate(answers):
        text = item.get("answer") if isinstance(item, Mapping) else item
        if not isinstance(text, str):
            raise TaskDataError(f"document {doc_label(doc)}: field {field!r}[{i}] should be a string or a record with an "
                                f"'answer' string, got {item!r}")
    return answers


def prompt_text(doc: Mapping[str, Any], field: str, kwargs: Mapping[str, Any] | None) -> str:
    """``pre_prompt + doc[field] + post_prompt`` (the lmms-eval convention)."""
    kw = kwargs or {}
    return f"{kw.get('pre_prompt', '')}{require(doc, field, str)}{kw.get('post_prompt', '')}"


# ---------------------------------------------------------------- retrieval
#: The metrics every retrieval task reports (percent, 0-100), as lmms_quant.metrics.recall_at_k names them.
RETRIEVAL_KS = (1, 5, 10)
RETRIEVAL_METRICS = tuple(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in RETRIEVAL_KS) + ("mean_recall",)


def retrieval_captions(doc: Mapping[str, Any], field: str = "caption", expected: int | None = None) -> list[str]:
    """The ground-truth captions of one retrieval image document (``expected``: exact count, or any when None)."""
    return references(doc, field, expected)


def retrieval_process_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, dict[str, Any]]:
    """Parse the backend's compact JSON answer for one image (see model_wrappers/retrieval.py).

    The answer holds ranks, never embeddings: ``i2t`` (rank of each of the
    image's captions among all captions), ``t2i`` (rank of this image among all
    images, for each of its captions) and ``gallery`` ([n_images, n_texts]).
    """
    raw = results[0] if results else ""
    try:
        answer = json.loads(raw)
        i2t, t2i, gallery = answer["i2t"], answer["t2i"], answer["gallery"]
        ok = (isinstance(i2t, list) and isinstance(t2i, list) and len(i2t) == len(t2i) > 0 and isinstance(gallery, list)
              and len(gallery) == 2 and all(isinstance(r, int) and r >= 0 for r in [*i2t, *t2i, *gallery]))
    except (ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise TaskDataError(
            f"document {doc_label(doc)}: the model's answer is not a retrieval result ({str(raw)[:120]!r}); "
            "retrieval tasks are answered by --model quant_vlm (model_wrappers/retrieval.py), not by text generation"
        )
    item = {"i2t": min(i2t), "t2i": t2i, "gallery": gallery}
    return {metric: item for metric in RETRIEVAL_METRICS}


def retrieval_aggregate(metric: str) -> Callable[[list[dict[str, Any]]], float]:
    """An lmms-eval aggregation computing one recall (percent) from the per-image ranks.

    i2t R@K: share of images whose best ground-truth caption ranks below K;
    t2i R@K: share of captions whose image ranks below K; ``mean_recall``: the
    mean of the six (LAVIS's ``r_mean``).  Equal to
    :func:`lmms_quant.metrics.recall_at_k` on the backend's score matrices.
    """
    if metric not in RETRIEVAL_METRICS:
        raise ValueError(f"unknown retrieval metric {metric!r}; valid: {', '.join(RETRIEVAL_METRICS)}")

    def recall(items: list[dict[str, Any]], name: str) -> float:
        direction, k = name.split("_R@")
        ranks = [i["i2t"] for i in items] if direction == "i2t" else [r for i in items for r in i["t2i"]]
        return 100.0 * sum(r < int(k) for r in ranks) / len(ranks)

    def aggregate(items: list[dict[str, Any]]) -> float:
        if not items:
            raise TaskDataError("retrieval: no scored images to aggregate")
        galleries = {tuple(i["gallery"]) for i in items}
        n_texts = sum(len(i["t2i"]) for i in items)
        if len(galleries) != 1 or galleries != {(len(items), n_texts)}:
            raise TaskDataError(
                f"retrieval: the {len(items)} scored images with {n_texts} captions do not form one gallery "
                f"(the backend reported {sorted(galleries)}); every image of the gallery must be scored together"
            )
        if metric == "mean_recall":
            names = RETRIEVAL_METRICS[:-1]
            return sum(recall(items, n) for n in names) / len(names)
        return recall(items, metric)

    aggregate.__name__ = f"retrieval_{metric.replace('@', '_at_')}"
    return aggregate


# ------------------------------------------------------ real data sets: images
#: Environment variables that point our real-data tasks at local copies (README "Tasks").
COCO_ROOT_ENV = "LMMS_QUANT_COCO_ROOT"
GQA_IMAGES_ENV = "LMMS_QUANT_GQA_IMAGES"
FLICKR30K_SPLIT_ENV = "LMMS_QUANT_FLICKR30K_SPLIT"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def coco_karpathy_image(doc: Mapping[str, Any]) -> Image.Image:
    """The image of a yerevann/coco-karpathy row (``filepath``, ``filename``, ``url``; no image bytes).

    With ``$LMMS_QUANT_COCO_ROOT`` set, read ``<root>/<filepath>/<filename>`` (or
    ``<root>/<filename>``); otherwise fetch ``url`` as lmms-eval's own
    coco_karpathy task does.
    """
    filename = require(doc, "filename", str)
    root = os.environ.get(COCO_ROOT_ENV)
    if root:
        for path in (Path(root) / str(doc.get("filepath", "")) / filename, Path(root) / filename):
            if path.is_file():
                with Image.open(path) as im:
                    return im.convert("RGB")
        raise TaskDataError(f"document {doc_label(doc)}: image {filename!r} (field 'filename') is not under ${COCO_ROOT_ENV}={root!r} "
                            f"(looked in {str(doc.get('filepath', ''))!r} and the root)")
    url = require(doc, "url", str)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (the data set's own http(s) URL)
            return Image.open(io.BytesIO(response.read())).convert("RGB")
    except OSError as exc:
        raise TaskDataError(f"document {doc_label(doc)}: could not fetch field 'url' ({url}): {exc}; "
                            f"set ${COCO_ROOT_ENV} to a folder holding val2014/") from exc


class ImagesById:
    """Images looked up by id, loaded lazily once per process.

    The source is ``$<env>`` when set: a folder of ``<id>.jpg``/``.png`` files, or
    local parquet files (a folder or one file) with ``id`` and ``image`` columns;
    otherwise the hub data set ``hub`` = (path, config, split, revision).
    """

    def __init__(self, env: str, hub: tuple[str, str | None, str, str]) -> None:
        self.env, self.hub = env, hub
        self._source: str | None = None
        self._folder: Path | None = None
        self._rows = None
        self._index: dict[str, int] | None = None

    def _load(self, source: str | None) -> None:
        import datasets

        self._source, self._folder, self._rows, self._index = source, None, None, None
        if source and Path(source).is_dir() and not any(Path(source).glob("*.parquet")):
            self._folder = Path(source)
            return
        if source:
            if not Path(source).exists():
                raise TaskDataError(f"${self.env}={source!r} does not exist")
            files = sorted(str(p) for p in Path(source).glob("*.parquet")) if Path(source).is_dir() else [source]
            rows = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            path, name, split, revision = self.hub
            try:
                rows = datasets.load_dataset(path, name, split=split, revision=revision)
            except Exception as exc:  # offline, missing token, ...: say how to use a local copy
                raise TaskDataError(f"could not load the images from {path} ({name}, {split}): {exc}; set ${self.env} to a "
                                    "folder of <id>.jpg files or to local parquet files with 'id' and 'image' columns") from exc
        self._rows = rows
        self._index = {str(i): n for n, i in enumerate(rows["id"])}

    def __call__(self, image_id: str, doc: Mapping[str, Any], field: str) -> Image.Image:
        source = os.environ.get(self.env)
        if (self._folder is None and self._index is None) or source != self._source:
            self._load(source)
        if self._folder is not None:
            for suffix in IMAGE_SUFFIXES:
                path = self._folder / f"{image_id}{suffix}"
                if path.is_file():
                    with Image.open(path) as im:
                        return im.convert("RGB")
            raise TaskDataError(f"document {doc_label(doc)}: no image file {image_id}.jpg (field {field!r}) in {str(self._folder)!r}")
        if str(image_id) not in self._index:
            raise TaskDataError(f"document {doc_label(doc)}: image id {image_id!r} (field {field!r}) is not in the image set")
        return load_image(self._rows[self._index[str(image_id)]], "image")


#: GQA testdev-balanced images (lmms-eval's gqa task loads the same set from the hub, with no local option).
GQA_IMAGES = ImagesById(GQA_IMAGES_ENV, ("lmms-lab-encoder/GQA", "testdev_balanced_images", "testdev", "main"))


# -------------------------------------------------- Flickr30k Karpathy split
def karpathy_test_filenames(path: str | os.PathLike) -> set[str]:
    """File names of the Karpathy test split, from Karpathy's ``dataset_flickr30k.json``,
    LAVIS/ALBEF's ``flickr30k_test.json`` (``[{"image": "flickr30k-images/x.jpg", ...}]``),
    or a text file with one file name per line."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"${FLICKR30K_SPLIT_ENV}={str(path)!r} is not a file")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and "images" in data:
            names = {Path(im["filename"]).name for im in data["images"] if im.get("split") == "test"}
        elif isinstance(data, list):
            names = {Path(row["image"]).name for row in data}
        else:
            raise TaskDataError(f"{str(path)!r}: expected Karpathy's dataset_flickr30k.json or LAVIS's flickr30k_test.json")
    else:
        names = {Path(line.strip()).name for line in text.splitlines() if line.strip()}
    if not names:
        raise TaskDataError(f"{str(path)!r} lists no test images")
    return names


def require_flickr30k_split(task: str, config: Mapping[str, Any] | None = None) -> None:
    """Preflight: lmms-lab-encoder/flickr30k holds all 31,783 images with no split column, so the
    Karpathy 1K test needs its file list (checked before the 4 GB download)."""
    if not os.environ.get(FLICKR30K_SPLIT_ENV):
        raise TaskDataError(
            f"task {task}: the Flickr30k 1K test needs the Karpathy split: set ${FLICKR30K_SPLIT_ENV} to Karpathy's "
            "dataset_flickr30k.json, LAVIS's flickr30k_test.json, or a text file of the 1,000 test file names"
        )
    karpathy_test_filenames(os.environ[FLICKR30K_SPLIT_ENV])


def flickr30k_karpathy_test(dataset):
    """process_docs: keep the Karpathy test rows of the 31,783-image Flickr30k set (by ``filename``)."""
    if "split" in dataset.column_names:
        return dataset.filter(lambda s: s == "test", input_columns=["split"])
    names = karpathy_test_filenames(os.environ.get(FLICKR30K_SPLIT_ENV, ""))
    kept = dataset.filter(lambda f: Path(f).name in names, input_columns=["filename"])
    if len(kept) != len(names):
        log.warning("Flickr30k Karpathy test: %d of the %d listed images found in the data set", len(kept), len(names))
    return kept


#: The COCO caption metrics every captioning task reports, and their aggregations (one per metric, as lmms-eval wants).
CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

caption_bleu1 = caption_aggregate("Bleu_1")
caption_bleu2 = caption_aggregate("Bleu_2")
caption_bleu3 = caption_aggregate("Bleu_3")
caption_bleu4 = caption_aggregate("Bleu_4")
caption_meteor = caption_aggregate("METEOR")
caption_rougel = caption_aggregate("ROUGE_L")
caption_cider = caption_aggregate("CIDEr")
