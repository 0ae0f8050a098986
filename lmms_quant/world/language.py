"""Captions, VQA questions and annotator answers for scenes of the world.

Every function takes a :class:`~lmms_quant.world.scene.Scene` and, where it draws,
a ``numpy`` generator, so texts are as deterministic as the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmms_quant.world.scene import COLOURS, IMAGE_SIZE, SHAPES, Obj, Scene, relation

__all__ = [
    "KIND_OF_QUESTION_TYPE",
    "QUESTIONS_PER_IMAGE",
    "Question",
    "annotate",
    "captions",
    "questions",
    "retrieval_captions",
]

QUESTIONS_PER_IMAGE = 3
N_ANSWERS = 10
N_CAPTIONS = 5

# VQAv2-style question_type (the question's opening words) -> kind of question.
KIND_OF_QUESTION_TYPE = {
    "what color is the": "colour",
    "what shape is the": "shape",
    "how many": "count",
    "is there a": "existence",
    "are there any": "existence",
    "is the": "position",
    "where is the": "position",
    "what size is the": "size",
}
_KIND_WEIGHTS = {"colour": 1.0, "shape": 1.2, "count": 1.0, "existence": 1.0, "position": 1.5, "size": 0.8}

_NUMBER_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three"}
_REL_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# One annotator in ~3 questions gives an answer that normalisation does not rescue.
_DISSENT = {
    "purple": "violet",
    "white": "gray",
    "yellow": "orange",
    "green": "teal",
    "blue": "navy",
    "red": "pink",
    "square": "rectangle",
    "circle": "ball",
    "triangle": "pyramid",
    "large": "big",
    "small": "tiny",
    "left": "to the left",
    "right": "on the right",
    "above": "on top",
    "below": "under",
}
_DISSENT_PROB = 0.3


@dataclass(frozen=True)
class Question:
    """One VQA question with its ten human answers (VQAv2 style)."""

    question: str
    question_type: str
    answer_type: str  # "yes/no", "number" or "other"
    answer: str  # the canonical (normalised) answer: multiple_choice_answer
    answers: tuple[str, ...]  # ten raw annotator answers

    @property
    def kind(self) -> str:
        return KIND_OF_QUESTION_TYPE[self.question_type]


def _region(obj: Obj) -> str:
    third = IMAGE_SIZE / 3
    col = "left" if obj.x < third else ("right" if obj.x > 2 * third else "")
    row = "top" if obj.y < third else ("bottom" if obj.y > 2 * third else "")
    if row and col:
        return f"in the {row} {col} corner"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the middle"


def _ordered_pair(a: Obj, b: Obj) -> tuple[Obj, Obj, str]:
    """``(first, second, rel)`` with ``first`` left of or above ``second``."""
    rel = relation(a, b)
    if rel in ("right", "below"):
        return b, a, _OPPOSITE[rel]
    return a, b, rel


def _full(o: Obj) -> str:
    return f"{o.size} {o.colour} {o.shape}"


def _caption_words(scene: Scene, rng: np.random.Generator) -> tuple[list[Obj], str, str]:
    """A caption set's objects from left to right and its free words, drawn in this order:
    ``image``/``picture``, then ``dark``/``black`` (background)."""
    objs = sorted(scene.objects, key=lambda o: (o.x, o.y))
    pic = str(rng.choice(["image", "picture"]))
    bg = str(rng.choice(["dark", "black"]))
    return objs, pic, bg


def captions(scene: Scene, rng: np.random.Generator) -> tuple[str, ...]:
    """Five COCO-style captions in varied wording, all true of ``scene``."""
    objs, pic, bg = _caption_words(scene, rng)
    if len(objs) == 1:
        (o,) = objs
        caps = [
            f"a {_full(o)} on a {bg} background",
            f"a single {o.name}",
            f"there is one {_full(o)} in the {pic}",
            f"an {pic} of a {o.name}" if pic == "image" else f"a {pic} of a {o.name}",
            f"a {o.name} {_region(o)}",
        ]
    elif len(objs) == 2:
        a, b, rel = _ordered_pair(*objs)
        caps = [
            f"a {a.name} {_REL_PHRASE[rel]} a {b.name}",
            f"a {b.name} {_REL_PHRASE[_OPPOSITE[rel]]} a {a.name}",
            f"two shapes, a {_full(a)} and a {_full(b)}",
            f"a {a.name} and a {b.name} on a {bg} background",
            f"a {_full(a)} next to a {_full(b)}",
        ]
    else:
        a, b, c = objs
        first, second, rel = _ordered_pair(a, b)
        caps = [
            f"three shapes, a {a.name}, a {b.name} and a {c.name}",
            f"a {_full(a)}, a {_full(b)} and a {_full(c)}",
            f"a {first.name} {_REL_PHRASE[rel]} a {second.name} and a {c.name}",
            f"there are three shapes in the {pic}",
            f"a {a.name}, a {b.name} and a {c.name} on a {bg} background",
        ]
    return tuple(caps)


def retrieval_captions(scene: Scene, rng: np.random.Generator) -> tuple[str, ...]:
    """Five Flickr30k-style captions: each names every object's size, colour and shape,
    and where the objects are (a region for one object, a relation for two, the order
    from left to right for three), so a caption picks its image out of a gallery, as
    Flickr30k's do, and the twin that differs in one attribute is told apart by every one.
    Words are the reference captions' own (the zoo's tokenizer covers them).
    """
    objs, pic, bg = _caption_words(scene, rng)
    article = "an" if pic == "image" else "a"
    if len(objs) == 1:
        (o,) = objs
        where = _region(o)
        caps = [
            f"a {_full(o)} {where}",
            f"one {_full(o)} {where}",
            f"a {_full(o)} {where}, on a {bg} background",
            f"there is a {_full(o)} {where} of the {pic}",
            f"{article} {pic} with a {_full(o)} {where}",
        ]
    elif len(objs) == 2:
        a, b, rel = _ordered_pair(*objs)
        caps = [
            f"a {_full(a)} {_REL_PHRASE[rel]} a {_full(b)}",
            f"a {_full(b)} {_REL_PHRASE[_OPPOSITE[rel]]} a {_full(a)}",
            f"two shapes, a {_full(a)} {_REL_PHRASE[rel]} a {_full(b)}",
            f"a {_full(a)} and a {_full(b)}, the {a.name} is {_REL_PHRASE[rel]} the {b.name}",
            f"a {_full(a)} {_REL_PHRASE[rel]} a {_full(b)} on a {bg} background",
        ]
    else:
        a, b, c = objs
        first, second, rel = _ordered_pair(a, b)
        caps = [
            f"a {_full(a)}, a {_full(b)} and a {_full(c)}",
            f"three shapes, a {_full(a)}, a {_full(b)} and a {_full(c)}",
            f"a {_full(first)} {_REL_PHRASE[rel]} a {_full(second)} and a {_full(c)}",
            f"a {_full(a)}, a {_full(b)} and a {_full(c)} on a {bg} background",
            f"{article} {pic} of a {_full(a)}, a {_full(b)} and a {_full(c)}",
        ]
    return tuple(caps)


def annotate(answer: str, answer_type: str, rng: np.random.Generator) -> tuple[str, ...]:
    """Ten annotator answers for the canonical ``answer``.

    At least two raw forms always occur ("2" and "two", "yes" and "Yes."), so the
    official VQA evaluation normalises them; at least eight of the ten normalise
    to ``answer`` and at most one is a genuine disagreement.
    """
    if answer_type == "yes/no":
        forms = [answer, answer.capitalize(), f"{answer}.", f"{answer.capitalize()}.", answer.upper()]
    elif answer_type == "number":
        word = _NUMBER_WORDS[answer]
        forms = [answer, word, f"{answer}.", word.capitalize()]
    else:
        forms = [answer, answer.capitalize(), f"{answer}.", f"the {answer}"]
        if answer in SHAPES:
            forms.append(f"a {answer}")
    weights = np.array([6.0] + [1.0] * (len(forms) - 1))
    picks = [forms[i] for i in rng.choice(len(forms), size=N_ANSWERS, p=weights / weights.sum())]
    if len(set(picks)) == 1:
        picks[int(rng.integers(N_ANSWERS))] = forms[1 + int(rng.integers(len(forms) - 1))]
    if rng.random() < _DISSENT_PROB:
        if answer_type == "yes/no":
            wrong = "no" if answer == "yes" else "yes"
        elif answer_type == "number":
            wrong = str(int(answer) + 1)
        else:
            wrong = _DISSENT[answer]
        picks[int(rng.integers(N_ANSWERS))] = wrong
    return tuple(picks)


def _ask(question: str, question_type: str, answer_type: str, answer: str, rng: np.random.Generator) -> Question:
    return Question(question, question_type, answer_type, answer, annotate(answer, answer_type, rng))


def _colour_question(scene: Scene, rng: np.random.Generator) -> Question | None:
    objs = scene.objects
    shapes = [o.shape for o in objs]
    unique = [o for o in objs if shapes.count(o.shape) == 1]
    if unique:
        o = unique[int(rng.integers(len(unique)))]
        return _ask(f"what color is the {o.shape}?", "what color is the", "other", o.colour, rng)
    keys = [(o.size, o.shape) for o in objs]
    unique = [o for o in objs if keys.count((o.size, o.shape)) == 1]
    if unique:
        o = unique[int(rng.integers(len(unique)))]
        return _ask(f"what color is the {o.size} {o.shape}?", "what color is the", "other", o.colour, rng)
    return None


def _shape_question(scene: Scene, rng: np.random.Generator) -> Question:
    o = scene.objects[int(rng.integers(len(scene.objects)))]
    noun = str(rng.choice(["object", "shape", "thing"]))
    return _ask(f"what shape is the {o.colour} {noun}?", "what shape is the", "other", o.shape, rng)


def _count_question(scene: Scene, rng: np.random.Generator) -> Question:
    form = int(rng.integers(3))
    if form == 0:
        q, n = "how many shapes are there?", len(scene.objects)
    elif form == 1:
        q, n = f"how many objects are in the {rng.choice(['image', 'picture'])}?", len(scene.objects)
    else:
        shape = str(rng.choice(SHAPES))
        q, n = f"how many {shape}s are there?", sum(o.shape == shape for o in scene.objects)
    return _ask(q, "how many", "number", str(n), rng)


def _existence_question(scene: Scene, rng: np.random.Generator) -> Question:
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.75:
        if rng.random() < 0.5:
            colour, shape = sorted(present)[int(rng.integers(len(present)))]
        else:
            # A near miss: an object of the scene with its colour or its shape changed.
            o = scene.objects[int(rng.integers(len(scene.objects)))]
            misses = [(c, o.shape) for c in COLOURS if (c, o.shape) not in present]
            misses += [(o.colour, s) for s in SHAPES if (o.colour, s) not in present]
            colour, shape = misses[int(rng.integers(len(misses)))]
        answer = "yes" if (colour, shape) in present else "no"
        return _ask(f"is there a {colour} {shape}?", "is there a", "yes/no", answer, rng)
    shape = str(rng.choice(SHAPES))
    answer = "yes" if any(o.shape == shape for o in scene.objects) else "no"
    return _ask(f"are there any {shape}s?", "are there any", "yes/no", answer, rng)


def _position_question(scene: Scene, rng: np.random.Generator) -> Question | None:
    if len(scene.objects) < 2:
        return None
    i, j = (int(k) for k in rng.choice(len(scene.objects), size=2, replace=False))
    a, b = scene.objects[i], scene.objects[j]
    rel = relation(a, b)
    if rng.random() < 0.4:
        return _ask(f"where is the {a.name} relative to the {b.name}?", "where is the", "other", rel, rng)
    if rng.random() < 0.5:
        asked, answer = rel, "yes"
    else:
        asked, answer = str(rng.choice([r for r in _REL_PHRASE if r != rel])), "no"
    return _ask(f"is the {a.name} {_REL_PHRASE[asked]} the {b.name}?", "is the", "yes/no", answer, rng)


def _size_question(scene: Scene, rng: np.random.Generator) -> Question:
    o = scene.objects[int(rng.integers(len(scene.objects)))]
    return _ask(f"what size is the {o.name}?", "what size is the", "other", o.size, rng)


_MAKERS = {
    "colour": _colour_question,
    "shape": _shape_question,
    "count": _count_question,
    "existence": _existence_question,
    "position": _position_question,
    "size": _size_question,
}


def questions(scene: Scene, rng: np.random.Generator, n: int = QUESTIONS_PER_IMAGE) -> tuple[Question, ...]:
    """``n`` questions of distinct kinds (fewer if fewer kinds apply to ``scene``)."""
    candidates = {}
    for kind, make in _MAKERS.items():
        q = make(scene, rng)
        if q is not None:
            candidates[kind] = q
    kinds = list(candidates)
    w = np.array([_KIND_WEIGHTS[k] for k in kinds])
    chosen = rng.choice(len(kinds), size=min(n, len(kinds)), replace=False, p=w / w.sum())
    return tuple(candidates[kinds[int(k)]] for k in sorted(chosen))
