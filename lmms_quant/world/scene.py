"""Scenes of the synthetic world: sampling and rendering.

A scene is a dark background with 1-3 flat-coloured shapes.  Everything here is a
pure function of ``(seed, split, index)``: :func:`item_rng` derives an independent
``numpy`` stream for each triple (``SeedSequence(seed, spawn_key=(split, index))``),
so the train, calibration and test splits can never share a stream.

Item ``2k + 1`` of every split is a *twin* of item ``2k``: the same scene with one
attribute of one object changed (its colour, its shape or its size), which gives
retrieval galleries near-duplicates that differ in exactly one attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "BACKGROUND_MAX",
    "COLOURS",
    "IMAGE_SIZE",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Obj",
    "Scene",
    "foil",
    "item_rng",
    "object_masks",
    "relation",
    "render",
    "sample_scene",
    "scene_for",
]

IMAGE_SIZE = 64
# Nominal RGB of each colour; every object jitters each channel by up to +-12.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 235),
    "yellow": (235, 215, 45),
    "purple": (150, 55, 200),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
# Half extent in pixels: a small shape spans 16 px, a large one 26 px.
SIZES: dict[str, int] = {"small": 8, "large": 13}
SPLITS: dict[str, int] = {"train": 0, "calibration": 1, "test": 2}
BACKGROUND_MAX = 40  # background grey level is uniform in [0, BACKGROUND_MAX]
_COLOUR_JITTER = 12
_MIN_GAP = 3  # pixels between the bounding boxes of two objects
_RELATION_MIN_DIST = 12.0  # centre distance along the dominant axis
_RELATION_DOMINANCE = 2.0  # |major offset| >= 2 |minor offset|
_MAX_TRIES = 1000


@dataclass(frozen=True)
class Obj:
    """One object: ``x``, ``y`` are the centre in pixels (y grows downwards)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    rgb: tuple[int, int, int]

    @property
    def half(self) -> int:
        return SIZES[self.size]

    @property
    def name(self) -> str:
        """``"red circle"``: unique inside a scene because colours are distinct."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: int
    twin_of: int | None = None  # index of the scene this one was derived from
    change: str | None = None  # "colour", "shape" or "size" for a twin; also "swap" or "move" for a foil


def item_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for one item; ``stream`` separates scene and text draws."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    ss = np.random.SeedSequence(entropy=seed, spawn_key=(SPLITS[split], index, stream))
    return np.random.default_rng(ss)


def relation(a: Obj, b: Obj) -> str | None:
    """Where ``a`` is relative to ``b``: "left", "right", "above", "below" or None.

    A relation is reported only when it is unambiguous: the centre offset along
    the dominant axis is at least 12 px and twice the offset along the other axis.
    """
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= _RELATION_MIN_DIST and abs(dx) >= _RELATION_DOMINANCE * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= _RELATION_MIN_DIST and abs(dy) >= _RELATION_DOMINANCE * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def _jitter_rgb(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    base = np.array(COLOURS[colour])
    rgb = np.clip(base + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3), 0, 255)
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def _separated(a: Obj, b: Obj) -> bool:
    reach = a.half + b.half + _MIN_GAP
    return abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


def _fits(new: Obj, placed: list[Obj]) -> bool:
    return all(_separated(new, o) and relation(new, o) is not None for o in placed)


def _place(rng: np.random.Generator, shapes: list[str], colours: list[str], sizes: list[str]) -> tuple[Obj, ...]:
    """Positions without overlap and with a clear relation for every pair.

    Objects are placed one at a time by rejection sampling; after too many
    failures the scene falls back to a fixed triangle layout (two objects side by
    side at the top, the third centred below), which always fits.
    """
    for _ in range(_MAX_TRIES // 10):
        placed: list[Obj] = []
        for shape, colour, size in zip(shapes, colours, sizes):
            h = SIZES[size]
            for _ in range(_MAX_TRIES // 10):
                x, y = rng.uniform(h + 1, IMAGE_SIZE - h - 1, size=2)
                obj = Obj(shape, colour, size, round(float(x), 2), round(float(y), 2), _jitter_rgb(rng, colour))
                if _fits(obj, placed):
                    placed.append(obj)
                    break
            else:
                break
        if len(placed) == len(shapes):
            return tuple(placed)
    layout = [(16.0, 14.0), (48.0, 14.0), (32.0, 50.0)]
    return tuple(
        Obj(shape, colour, size, x, y, _jitter_rgb(rng, colour))
        for (shape, colour, size), (x, y) in zip(zip(shapes, colours, sizes), layout)
    )


def sample_scene(rng: np.random.Generator) -> Scene:
    """1 (30 %), 2 (40 %) or 3 (30 %) objects with distinct colours."""
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    colours = [str(c) for c in rng.choice(list(COLOURS), size=n, replace=False)]
    shapes = [str(s) for s in rng.choice(SHAPES, size=n)]
    sizes = [str(s) for s in rng.choice(list(SIZES), size=n)]
    objects = _place(rng, shapes, colours, sizes)
    return Scene(objects=objects, background=int(rng.integers(0, BACKGROUND_MAX + 1)))


def _twin(scene: Scene, rng: np.random.Generator, parent: int) -> Scene:
    """``scene`` with one attribute of one object changed (placement re-checked)."""
    for _ in range(_MAX_TRIES):
        k = int(rng.integers(len(scene.objects)))
        obj = scene.objects[k]
        change = str(rng.choice(["colour", "shape", "size"]))
        if change == "colour":
            used = {o.colour for o in scene.objects}
            colour = str(rng.choice([c for c in COLOURS if c not in used]))
            new = replace(obj, colour=colour, rgb=_jitter_rgb(rng, colour))
        elif change == "shape":
            new = replace(obj, shape=str(rng.choice([s for s in SHAPES if s != obj.shape])))
        else:
            size = "small" if obj.size == "large" else "large"
            h = SIZES[size]
            x = min(max(obj.x, h + 1), IMAGE_SIZE - h - 1)
            y = min(max(obj.y, h + 1), IMAGE_SIZE - h - 1)
            new = replace(obj, size=size, x=x, y=y)
        objects = scene.objects[:k] + (new,) + scene.objects[k + 1 :]
        if _fits(new, list(scene.objects[:k] + scene.objects[k + 1 :])):
            return Scene(objects=objects, background=scene.background, twin_of=parent, change=change)
    raise RuntimeError("could not build a twin scene")


def _moved(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """``scene`` with one object put somewhere else (placement re-checked), or None when
    no try found room (a crowded scene of three); where it lands may or may not change
    what a description says of the scene."""
    for _ in range(_MAX_TRIES):
        k = int(rng.integers(len(scene.objects)))
        obj, others = scene.objects[k], list(scene.objects[:k] + scene.objects[k + 1 :])
        h = obj.half
        x, y = rng.uniform(h + 1, IMAGE_SIZE - h - 1, size=2)
        new = replace(obj, x=round(float(x), 2), y=round(float(y), 2))
        if _fits(new, others):
            return Scene(objects=scene.objects[:k] + (new,) + scene.objects[k + 1 :], background=scene.background, change="move")
    return None


def foil(scene: Scene, rng: np.random.Generator, move: float = 0.0) -> Scene:
    """A scene that differs from ``scene`` in what a full description says, for hard
    negative texts (FOIL-COCO's idea): one attribute of one object changed, as a twin,
    or (with two or more objects, one time in four) two objects' attributes swapped
    in place, which swaps them in every relation.  Only its texts are meant to be
    used: a swapped scene may not satisfy the placement rules, so it is not rendered.

    With probability ``move`` (in [0, 1]; drawn only when positive, so ``move=0``
    consumes ``rng`` as before) one object is moved instead, which changes a single
    object's region or the relations and order of several (where no place fits, the
    foil changes an attribute or swaps instead).  A move can leave every description
    as it was (the same region, or the only order a crowded scene allows): callers
    that need a false text check it.
    """
    if not 0.0 <= move <= 1.0:
        raise ValueError(f"move is a probability in [0, 1], got {move}")
    if move > 0 and rng.random() < move:
        moved = _moved(scene, rng)
        if moved is not None:
            return moved
    if len(scene.objects) >= 2 and rng.random() < 0.25:
        i, j = (int(k) for k in rng.choice(len(scene.objects), size=2, replace=False))
        a, b = scene.objects[i], scene.objects[j]
        objects = list(scene.objects)
        objects[i] = replace(b, x=a.x, y=a.y)
        objects[j] = replace(a, x=b.x, y=b.y)
        return Scene(objects=tuple(objects), background=scene.background, change="swap")
    twin = _twin(scene, rng, parent=-1)
    return replace(twin, twin_of=None)


def scene_for(seed: int, split: str, index: int) -> Scene:
    """The scene of item ``index`` of ``split``: odd items are twins of the even ones."""
    if index % 2 == 0:
        return sample_scene(item_rng(seed, split, index))
    parent = scene_for(seed, split, index - 1)
    return _twin(parent, item_rng(seed, split, index), index - 1)


def _mask(obj: Obj) -> np.ndarray:
    """Boolean ``(64, 64)`` mask of the pixels whose centres lie inside ``obj``."""
    c = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    dx, dy, h = xx - obj.x, yy - obj.y, obj.half
    if obj.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if obj.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if obj.shape == "triangle":
        # Apex up at (x, y - h); base from (x - h, y + h) to (x + h, y + h).
        return (dy <= h) & (2 * np.abs(dx) <= dy + h)
    raise ValueError(f"unknown shape {obj.shape!r}; allowed: {SHAPES}")


def object_masks(scene: Scene) -> np.ndarray:
    """Boolean ``(n_objects, 64, 64)``: the pixels :func:`render` paints with each object."""
    if not scene.objects:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    return np.stack([_mask(obj) for obj in scene.objects])


def render(scene: Scene) -> np.ndarray:
    """RGB image of ``scene`` as ``uint8`` of shape ``(64, 64, 3)``."""
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), scene.background, dtype=np.uint8)
    for obj in scene.objects:
        img[_mask(obj)] = obj.rgb
    return img
