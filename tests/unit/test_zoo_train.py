"""The zoo's training code: dense patch labels, recipe checks, bit-for-bit reproducible steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmms_quant.world import IMAGE_SIZE, make_item
from lmms_quant.world.scene import Obj, Scene, render
from lmms_quant.zoo.toy_llava import ToyLlavaSpec
from lmms_quant.zoo.train import DENSE_CLASSES, MIN_COVER, DenseProbe, Recipe, lr_at, patch_labels, train_toy_llava


def _brute_force_labels(scene: Scene, patch: int) -> np.ndarray:
    """From the rendered pixels: each object's RGB is unique, so count its pixels per patch."""
    img = render(scene).astype(int)
    g = IMAGE_SIZE // patch
    out = np.tile(np.array([n - 1 for n in DENSE_CLASSES]), (g * g, 1))
    colours, shapes, sizes = ["red", "green", "blue", "yellow", "purple", "white"], ["circle", "square", "triangle"], ["small", "large"]
    for r in range(g):
        for c in range(g):
            block = img[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch].reshape(-1, 3)
            counts = [int((block == np.array(o.rgb)).all(axis=1).sum()) for o in scene.objects]
            if counts and max(counts) >= MIN_COVER * patch * patch:
                o = scene.objects[int(np.argmax(counts))]
                out[r * g + c] = (colours.index(o.colour), shapes.index(o.shape), sizes.index(o.size))
    return out


@pytest.mark.parametrize("patch", [8, 16])
def test_patch_labels_match_the_rendered_pixels(patch: int) -> None:
    for i in range(12):
        scene = make_item("test", i).scene
        assert np.array_equal(patch_labels(scene, patch), _brute_force_labels(scene, patch)), i


def test_patch_labels_by_hand() -> None:
    # A large red square centred at (32, 32) covers pixels 19..44 in both directions.
    scene = Scene(objects=(Obj("square", "red", "large", 32.0, 32.0, (220, 40, 40)),), background=10)
    labels = patch_labels(scene, 8).reshape(8, 8, 3)
    assert labels[3, 3].tolist() == [0, 1, 1]  # fully covered: red, square, large
    assert labels[0, 0].tolist() == [6, 3, 2]  # background
    assert labels[2, 2].tolist() == [0, 1, 1]  # pixels 19..23 of 16..23: 5 x 5 = 25 of 64 >= 16
    assert labels[5, 5].tolist() == [0, 1, 1]  # pixels 40..44: 5 x 5 again
    empty = Scene(objects=(), background=0)
    assert (patch_labels(empty, 8) == np.array([6, 3, 2])).all()


def test_dense_probe_loss_and_accuracy() -> None:
    torch.manual_seed(0)
    probe = DenseProbe(8)
    tokens = torch.randn(2, 4, 8)
    labels = torch.tensor([[[0, 0, 0], [1, 1, 1], [6, 3, 2], [2, 2, 0]]] * 2)
    loss = probe.loss(tokens, labels).detach()
    assert loss.ndim == 0 and 0 < loss.item() < 10
    acc = probe.accuracy(tokens, labels)
    assert set(acc) == {"colour", "shape", "size"} and all(0 <= v <= 1 for v in acc.values())
    with torch.no_grad():  # all-zero logits pick class 0 everywhere
        probe.proj.weight.zero_()
        probe.proj.bias.zero_()
    # object patches have colours 0, 1, 2 (the background patch is not counted): 1 of 3 right
    assert probe.accuracy(tokens, labels)["colour"] == pytest.approx(1 / 3)
    assert probe.accuracy(tokens[:, :1], labels[:, :1])["colour"] == 1.0


def test_recipe_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="vision_steps"):
        Recipe(vision_steps=-1)
    with pytest.raises(ValueError, match="aux_weight"):
        Recipe(aux_weight=-0.5)
    with pytest.raises(ValueError, match="caption_fraction"):
        Recipe(caption_fraction=2.0)
    r = Recipe(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, r) == pytest.approx(0.1) and lr_at(9, r) == pytest.approx(1.0)
    assert lr_at(99, r) == pytest.approx(0.1, abs=1e-3)


def test_two_stages_are_bit_reproducible() -> None:
    torch.set_num_threads(1)
    spec = ToyLlavaSpec(
        vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64, text_hidden=32, text_layers=1, text_heads=2, text_mlp=64
    )
    recipe = Recipe(steps=2, batch_size=2, vision_steps=2, vision_batch_size=2, eval_every=100, eval_items=1, warmup=1, spec=spec)
    logs: list[str] = []
    states = []
    for _ in range(2):
        report = train_toy_llava(recipe, out=None, log=logs.append)
        states.append(report)
    a, b = states
    assert a["vision_curve"] == b["vision_curve"] and len(a["vision_curve"]) == 1
    assert [p["loss"] for p in a["curve"]] == [p["loss"] for p in b["curve"]]
    assert any(line.startswith("stage 1 ") for line in logs)
