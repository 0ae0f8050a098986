"""A deterministic synthetic world of shapes, for tests, demos and toy VLMs.

Images
    64 x 64 RGB.  A uniform dark-grey background (level 0-40) holds 1 (30 %),
    2 (40 %) or 3 (30 %) flat-coloured objects.  Each object has

    * a shape: circle, square or triangle (apex up);
    * a colour: red, green, blue, yellow, purple or white; the colours of one
      image are distinct, so "the red circle" always names one object; every
      object jitters each RGB channel by up to +-12;
    * a size: small (16 px across) or large (26 px across);
    * a position: objects never overlap and every pair stands in an unambiguous
      relation (left/right/above/below: the centre offset along one axis is at
      least 12 px and twice the offset along the other axis).

    Item ``2k + 1`` of every split is a near-duplicate of item ``2k``: one object
    differs in exactly one attribute (colour, shape or size).

Captions
    Five COCO-style captions per image in varied wording, e.g.
    "a red circle to the left of a blue square", "a blue square to the right of a
    red circle", "two shapes, a small red circle and a large blue square",
    "three shapes, a red circle, a green triangle and a blue square",
    "a white triangle in the top left corner".  No final period.

VQA
    Three questions per image, of distinct kinds, VQAv2 style (lower case,
    question_type = the opening words, answer_type yes/no | number | other):

    =========  ===============================================  ===============
    kind       example                                          answers
    =========  ===============================================  ===============
    colour     what color is the circle?                        red
    shape      what shape is the red object?                    circle
    count      how many shapes are there? / how many squares..  0-3
    existence  is there a blue square? / are there any circles? yes / no
    position   is the red circle to the left of the blue square? yes / no
               where is the red circle relative to the blue ..  left/right/above/below
    size       what size is the red circle?                     small / large
    =========  ===============================================  ===============

    Each question has ten annotator answers whose raw forms differ ("2", "two",
    "Two", "2."; "yes", "Yes."; "circle", "a circle") so that only the official
    VQA normalisation makes them agree; in about 30 % of questions one annotator
    also gives a genuinely different answer ("violet" for purple, a miscount).
    ``multiple_choice_answer`` is the canonical normalised answer.

Retrieval
    Image-caption pairs in Flickr30k's style: five captions per image, each naming
    every object's size, colour and shape and where the objects are
    ("a large red circle to the left of a small blue square", "one small white
    triangle in the top left corner"), so that a caption picks out its image; the
    twins (items ``2k`` and ``2k + 1``) make every gallery hold near-duplicates
    that differ in one word.  They are drawn from their own seed stream, so the
    captioning and VQA texts do not depend on them.

Determinism and splits
    Every item is a pure function of ``(seed, split, index)``:
    ``numpy.random.SeedSequence(seed, spawn_key=(split_id, index, stream))``
    with split ids train = 0, calibration = 1, test = 2, so the splits draw from
    disjoint seed streams.  The default seed is :data:`DEFAULT_SEED`.

Usage::

    from lmms_quant.world import make_item
    item = make_item("test", 0)
    item.image        # uint8 array (64, 64, 3)
    item.captions     # five strings
    item.questions    # Question(question, question_type, answer_type, answer, answers)
    item.retrieval_captions  # five strings, each naming every object

``python -m lmms_quant.world.export`` writes the test and calibration splits to
``tasks/data/world/`` (PNG images and JSONL files in the schemas of the
lmms-lab COCO-Caption2017, VQAv2 and flickr30k datasets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmms_quant.world.language import KIND_OF_QUESTION_TYPE, QUESTIONS_PER_IMAGE, Question, captions, questions, retrieval_captions
from lmms_quant.world.scene import COLOURS, IMAGE_SIZE, SHAPES, SIZES, SPLITS, Obj, Scene, foil, item_rng, render, scene_for

__all__ = [
    "COLOURS",
    "DEFAULT_SEED",
    "IMAGE_SIZE",
    "KIND_OF_QUESTION_TYPE",
    "QUESTIONS_PER_IMAGE",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Item",
    "Obj",
    "Question",
    "Scene",
    "foil_captions",
    "make_item",
]

DEFAULT_SEED = 20260126
_TEXT_STREAM = 1
_RETRIEVAL_STREAM = 2


@dataclass(frozen=True)
class Item:
    """One image of the world with its texts."""

    split: str
    index: int
    seed: int
    scene: Scene
    image: np.ndarray  # uint8 (64, 64, 3)
    captions: tuple[str, ...]  # 5
    questions: tuple[Question, ...]  # up to QUESTIONS_PER_IMAGE
    retrieval_captions: tuple[str, ...]  # 5, Flickr30k style (each identifies the image)

    @property
    def file_name(self) -> str:
        return f"world_{self.split}_{self.index:06d}.png"

    @property
    def image_id(self) -> int:
        """Unique across splits: ``1_000_000 * (split_id + 1) + index``."""
        return 1_000_000 * (SPLITS[self.split] + 1) + self.index


def make_item(split: str, index: int, seed: int = DEFAULT_SEED) -> Item:
    """The item ``index`` of ``split``; a pure function of its arguments."""
    scene = scene_for(seed, split, index)
    rng = item_rng(seed, split, index, stream=_TEXT_STREAM)
    caps = captions(scene, rng)
    qs = questions(scene, rng)
    retrieval = retrieval_captions(scene, item_rng(seed, split, index, stream=_RETRIEVAL_STREAM))
    return Item(split, index, seed, scene, render(scene), caps, qs, retrieval)


def foil_captions(item: Item, rng: np.random.Generator, move: float = 0.0) -> tuple[str, ...]:
    """Hard negative texts for ``item``: the retrieval captions of a
    :func:`~lmms_quant.world.scene.foil` of its scene (drawn with ``rng``; ``move``:
    the chance that the foil moves one object instead), in the item's own wording,
    so caption ``k`` of the result differs from the item's caption ``k`` only where
    the foil changed the scene.  A moved object can stay in its region: such a
    "foil" is true of the item, and callers that need a false text check."""
    wording = item_rng(item.seed, item.split, item.index, stream=_RETRIEVAL_STREAM)
    return retrieval_captions(foil(item.scene, rng, move), wording)
