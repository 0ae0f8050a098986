"""The zoo's training code: dense patch labels, recipe checks, bit-for-bit reproducible steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmms_quant.world import IMAGE_SIZE, make_item
from lmms_quant.world.scene import Obj, Scene, render
from lmms_quant.zoo.toy_llava import CAPTION_PROMPT, FOLLOWUP_VQA_PROMPT, VQA_PROMPT, ToyLlavaSpec, encode_examples
from tools.zoo.schedule import lr_at
from tools.zoo.tokenizer import build_tokenizer
from tools.zoo.train import MENTION_CLASSES, Recipe, mention_labels, train_generative, training_batch
from tools.zoo.vision import DENSE_CLASSES, MIN_COVER, DenseProbe, patch_labels


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


def test_patch_labels_with_position_bins() -> None:
    scene = Scene(objects=(Obj("square", "red", "large", 32.0, 32.0, (220, 40, 40)),), background=10)
    labels = patch_labels(scene, 8, position_bins=8).reshape(8, 8, 5)
    assert labels[3, 3].tolist() == [0, 1, 1, 4, 4]  # centre (32, 32): bin 32 * 8 // 64 = 4 both ways
    assert labels[0, 0].tolist() == [6, 3, 2, 8, 8]  # background: the last class of every column
    for i in range(6):  # the attribute columns are unchanged; every patch of an object shares its centre
        scene = make_item("test", i).scene
        binned, plain = patch_labels(scene, 8, position_bins=3), patch_labels(scene, 8)
        assert np.array_equal(binned[:, :3], plain)
        for o in scene.objects:
            rows = binned[(binned[:, 0] == ["red", "green", "blue", "yellow", "purple", "white"].index(o.colour))]
            assert (rows[:, 3] == min(2, int(o.x * 3 / IMAGE_SIZE))).all() and (rows[:, 4] == min(2, int(o.y * 3 / IMAGE_SIZE))).all()


def test_mention_labels_by_hand() -> None:
    tok = build_tokenizer()
    scene = Scene(
        objects=(
            Obj("circle", "red", "large", 10.0, 50.0, (220, 40, 40)),
            Obj("square", "blue", "small", 40.0, 20.0, (45, 85, 235)),
            Obj("square", "white", "small", 60.0, 5.0, (235, 235, 235)),
        ),
        background=0,
    )
    text = "is the red circle left of the blue square ? what color is the circle ? is there a green square ? squares square"
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    words = text.split()
    labels = mention_labels(ids, [scene], tok)[0]
    assert labels.shape == (len(words), len(MENTION_CLASSES))
    got = {i: labels[i].tolist() for i in range(len(words)) if labels[i, 0] != -100}
    red, blue = [0, 0, 1, 0, 3], [2, 1, 0, 2, 1]  # colour, shape, size, column and row of the centre in 4 bins
    assert got == {
        words.index("red"): red,
        words.index("blue"): blue,
        14: red,  # "what color is the circle": the scene's only circle
        19: [6, 3, 2, 4, 4],  # "green": no such object
        # "circle"/"square" right after a colour word, "squares" and an ambiguous "square" (two squares): no label
    }


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
    with pytest.raises(ValueError, match="vqa_turns must be >= 1, got 0"):
        Recipe(vqa_turns=0)
    with pytest.raises(ValueError, match=r"dense_position_bins must be >= 0 \(0: no position labels\), got -1"):
        Recipe(dense_position_bins=-1)
    with pytest.raises(ValueError, match=r"mention_layer must be in 1..2 \(the LM's layers\), got 3"):
        Recipe(mention_weight=0.5, mention_layer=3)
    with pytest.raises(ValueError, match="mention_weight must be >= 0"):
        Recipe(mention_weight=-1.0)
    r = Recipe(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, r) == pytest.approx(0.1) and lr_at(9, r) == pytest.approx(1.0)
    assert lr_at(99, r) == pytest.approx(0.1, abs=1e-3)


def test_two_stages_are_bit_reproducible(monkeypatch) -> None:
    torch.set_num_threads(1)
    spec = ToyLlavaSpec(
        vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64, text_hidden=32, text_layers=1, text_heads=2, text_mlp=64
    )
    recipe = Recipe(steps=2, batch_size=2, vision_steps=2, vision_batch_size=2, eval_every=100, eval_items=1, warmup=1, spec=spec)
    logs: list[str] = []
    states = []
    for _ in range(2):
        report = train_generative(recipe, out=None, log=logs.append)
        states.append(report)
    a, b = states
    def measured(curve):  # everything but the wall time, which no seed fixes
        return [{k: v for k, v in point.items() if k != "seconds"} for point in curve]

    assert measured(a["vision_curve"]) == measured(b["vision_curve"]) and len(a["vision_curve"]) == 1
    assert set(a["vision_curve"][0]) == {"step", "seconds", "loss", "colour", "shape", "size"}
    assert [p["loss"] for p in a["curve"]] == [p["loss"] for p in b["curve"]]
    assert any(line.startswith("stage 1 ") for line in logs)
    # with the position labels and the mention loss: still reproducible, and both really train
    from tools.zoo import train

    mention_losses = []
    original = train.MentionProbe.loss
    monkeypatch.setattr(train.MentionProbe, "loss", lambda self, *a: mention_losses.append(original(self, *a)) or mention_losses[-1])
    grounded = Recipe(**{**recipe.__dict__, "dense_position_bins": 4, "mention_weight": 0.5, "mention_layer": 1})
    c, d = (train_generative(grounded, out=None, log=logs.append) for _ in range(2))
    assert measured(c["vision_curve"]) == measured(d["vision_curve"]) and {"column", "row"} <= set(c["vision_curve"][0])
    assert [p["loss"] for p in c["curve"]] == [p["loss"] for p in d["curve"]] != [p["loss"] for p in a["curve"]]
    assert len(mention_losses) == 4 and all(x.requires_grad and x.item() > 0 for x in mention_losses)


def test_multi_turn_encoding_labels_only_the_answers() -> None:
    tok = build_tokenizer()
    turns = [
        (VQA_PROMPT.format(question="what shape is the red thing?"), "circle"),
        (FOLLOWUP_VQA_PROMPT.format(question="how many shapes are there?"), "2"),
    ]
    batch = encode_examples(tok, [turns, turns[:1]], image_tokens=4)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[0] == 2 and int(mask[1].sum()) < int(mask[0].sum())
    assert (ids[0] == tok.convert_tokens_to_ids("<image>")).sum() == 4 and ids[0, 0] == tok.bos_token_id
    assert int((ids[0] == tok.bos_token_id).sum()) == 1  # later turns add no <s>
    eos = tok.eos_token_id
    assert tok.decode([t for t in labels[0].tolist() if t != -100]) == f"circle {tok.eos_token} 2 {tok.eos_token}"
    # every labelled position holds the token it labels, and everything else is -100
    lab = labels[0]
    assert torch.equal(lab[lab != -100], ids[0][lab != -100]) and int((lab == eos).sum()) == 2
    text = tok.decode(ids[0][mask[0] == 1].tolist())
    assert text.count("user :") == 2 and text.index("circle") < text.index("how many")
    with pytest.raises(ValueError, match="at least one"):
        encode_examples(tok, [[]], image_tokens=4)


@pytest.mark.parametrize("caption_fraction", [0.0, 1.0])
def test_training_batch_turns(caption_fraction: float) -> None:
    recipe = Recipe(batch_size=4, vqa_turns=3, caption_fraction=caption_fraction)
    images, conversations, dense, _ = training_batch(5, recipe)
    assert len(images) == len(conversations) == dense.shape[0] == 4
    for j, turns in enumerate(conversations):
        item = make_item("train", 5 * 4 + j, recipe.world_seed)
        assert len(turns) == min(3, len(item.questions) + int(caption_fraction == 1.0))
        first, *rest = turns
        assert first[0] == (CAPTION_PROMPT if caption_fraction else VQA_PROMPT.format(question=first[0].split("\n")[1]))
        assert "<image>" in first[0] and all("<image>" not in p and p.startswith(" USER: ") for p, _ in rest)
        answers = {q.question: q.answer for q in item.questions}
        asked = [p.split("USER: ")[1].split("\n")[0] if "<image>" not in p else p.split("\n")[1] for p, _ in turns]
        vqa = [(a, t) for (p, t), a in zip(turns, asked) if p != CAPTION_PROMPT]
        assert len({a for a, _ in vqa}) == len(vqa) and all(answers[a] == t for a, t in vqa)
        if caption_fraction:
            assert first[1] in item.captions
    assert training_batch(5, recipe)[1] == conversations  # a pure function of (step, recipe)


def test_quantize_component_schemes() -> None:
    from lmms_quant.quantizers.rtn import fake_quantize
    from lmms_quant.zoo.toy_llava import build_model
    from tools.zoo import scoring as ev

    torch.manual_seed(0)
    spec = ToyLlavaSpec(
        vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64, text_hidden=32, text_layers=1, text_heads=2, text_mlp=64
    )
    model = build_model(spec, build_tokenizer())
    lin = model.model.vision_tower.encoder.layers[0].mlp.fc1  # CLIP linears carry biases
    with torch.no_grad():
        lin.bias.normal_()  # initialised to zeros
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    untouched = model.model.language_model.layers[0].mlp.up_proj.weight.detach().clone()
    n = ev.quantize_component(model, "llava", "vision", 2, scheme="uniform")
    assert n == sum(m.weight.numel() for m in model.model.vision_tower.encoder.layers.modules() if isinstance(m, torch.nn.Linear))
    assert torch.equal(lin.weight, fake_quantize(w, 2, group_size=0, sym=False))
    assert lin.weight.unique().numel() <= 4 and lin.bias.unique().numel() <= 4 and not torch.equal(lin.bias, b)
    assert torch.equal(model.model.language_model.layers[0].mlp.up_proj.weight, untouched)
    ev.quantize_component(model, "llava", "llm", 3, scheme="rtn")
    up = model.model.language_model.layers[0].mlp.up_proj.weight
    assert torch.equal(up, fake_quantize(untouched, 3, group_size=-1, sym=True))
    with pytest.raises(ValueError, match=r"scheme must be one of \['rtn', 'uniform'\], got 'gptq'"):
        ev.quantize_component(model, "llava", "llm", 3, scheme="gptq")


def test_training_md_goals_use_vision_and_llm_only() -> None:
    from tools.zoo.train import training_md

    report = {
        "model": "toy",
        "parameters": 10,
        "recipe": {**__import__("dataclasses").asdict(Recipe()), "spec": {}},
        "train_seconds": 60.0,
        "threads": 1,
        "torch": "x",
        "python": "y",
        "curve": [],
    }
    fp = {"vqa": 0.92, "bleu4": 0.5, "cider": 1.0, "caption_exact": 0.5, "examples": ["a red circle"]}
    evaluation = {
        "n_vqa": 3,
        "n_captions": 1,
        "fp": fp,
        # read back from JSON: string keys; the projector's large drop must not count
        "rtn": {"vision": {"2": 0.90, "8": 0.92}, "projector": {"2": 0.10, "8": 0.92}, "llm": {"2": 0.85, "8": 0.92}},
        "uniform": {"vision": {"2": 0.60, "8": 0.92}, "llm": {"2": 0.80, "8": 0.92}},
    }
    md = training_md(report, evaluation)
    assert "full-precision VQA 0.920 (goal >= 0.9): met" in md
    assert "2-bit rtn on the vision encoder or the LLM 7.0 points (goal >= 20): NOT met" in md
    assert "2-bit uniform on the vision encoder or the LLM 32.0 points (goal >= 20): met" in md
    assert "| projector | 0.1000 | 0.9200 |" in md and "group_size=0, sym=False; biases too" in md
