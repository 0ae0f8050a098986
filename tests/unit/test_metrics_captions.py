"""Caption metrics against pycocoevalcap 1.2 called the standard way.

The standard way is what ``pycocoevalcap.eval.COCOEvalCap.evaluate`` does:
PTBTokenizer on references and on predictions, then each scorer. The Java tests
are skipped where no ``java`` is on PATH.
"""

import logging
import shutil
import subprocess
import sys
import threading

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from lmms_quant.metrics import captions
from lmms_quant.metrics.captions import (
    ALL_CAPTION_METRICS,
    caption_scores,
    fallback_tokenize,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs java")

# Six images with distinct references (CIDEr's IDF comes from this set), raw text
# with the punctuation and capitals that PTB tokenisation has to handle.
REFERENCES = {
    391895: [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
        "A dirt path with a young person on a motor bike rests to the foreground.",
        "A man in a red shirt and a red hat is on a motorcycle on a hill side.",
    ],
    522418: [
        "A woman wearing a net on her head cutting a cake.",
        "A woman cutting a large white sheet cake.",
        "A woman wearing a hair net cutting a large sheet cake.",
        "there is a woman that is cutting a white cake",
        "A woman marking a cake with the back of a chef's knife.",
    ],
    "kitchen": [
        "A kitchen with a stove, a sink and a refrigerator.",
        "The kitchen has wooden cabinets (and a window).",
        "An empty kitchen with white appliances.",
    ],
    184613: [
        "A child holding a flowered umbrella and petting a yak.",
        "A young man holding an umbrella next to a herd of cattle.",
        "a young boy barefoot holding an umbrella touching the horn of a cow",
        "A boy holding an umbrella while standing next to livestock.",
    ],
    318219: [
        "A young boy standing in front of a computer keyboard.",
        "a little boy wearing headphones and looking at a computer monitor",
        "He is listening intently to the computer at school.",
    ],
    ("coco", 554625): [
        "A boy wearing headphones using one computer in a long row of computers.",
        "A little boy with earphones on listening to something.",
        "A group of people sitting at desk using computers.",
    ],
}
PREDICTIONS = {
    391895: "A man riding a motorcycle on a dirt road.",
    522418: "A woman cutting a cake with a knife.",
    "kitchen": "a kitchen with a stove and a sink",
    184613: "A boy holding an umbrella next to a cow!",
    318219: "A boy sitting in front of a computer.",
    ("coco", 554625): "",  # an empty caption must not shift the others
}


def _standard_way(references, predictions, meteor):
    """COCOEvalCap.evaluate without COCO objects: tokenise twice, then score."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    return _score_tokenised(gts, res, meteor)


def _score_tokenised(gts, res, meteor=None):
    out = {}
    bleu, bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out[f"Bleu_{n + 1}"] = (bleu[n], bleu_images[n])
    if meteor is not None:
        out["METEOR"] = meteor.compute_score(gts, res)
    out["ROUGE_L"] = Rouge().compute_score(gts, res)
    out["CIDEr"] = Cider().compute_score(gts, res)
    return out


@pytest.fixture(scope="module")
def ours_and_standard():
    started = []

    class CountingMeteor(Meteor):
        def __init__(self):
            started.append(1)
            super().__init__()

    # The reference METEOR's JVM loads its paraphrase table while ours runs.
    reference_meteor = Meteor()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(captions, "Meteor", CountingMeteor)
        ours = caption_scores(REFERENCES, PREDICTIONS)
    return ours, _standard_way(REFERENCES, PREDICTIONS, reference_meteor), len(started)


@needs_java
def test_equal_to_pycocoevalcap(ours_and_standard):
    ours, standard, _ = ours_and_standard
    assert ours.tokenizer == "ptb"
    assert ours.meteor_available is True
    assert ours.warnings == ()
    assert list(ours.scores) == list(ALL_CAPTION_METRICS)
    keys = list(REFERENCES)
    for metric, (corpus, per_image) in standard.items():
        assert ours[metric] == pytest.approx(float(corpus), abs=1e-9), metric
        for key, value in zip(keys, per_image, strict=True):
            assert ours.per_image[metric][key] == pytest.approx(float(value), abs=1e-9)
    # Sanity of the fixture itself: non-trivial, and the empty caption scores 0.
    assert 0.5 < ours["CIDEr"] < 3.0
    assert ours.per_image["CIDEr"][("coco", 554625)] == 0.0


@needs_java
def test_meteor_started_once_and_only_when_asked(ours_and_standard, monkeypatch):
    assert ours_and_standard[2] == 1

    def refuse():
        raise AssertionError("METEOR must not start")

    monkeypatch.setattr(captions, "Meteor", refuse)
    result = caption_scores(REFERENCES, PREDICTIONS, metrics=("CIDEr", "Bleu_4"))
    assert list(result.scores) == ["Bleu_4", "CIDEr"]
    assert result["CIDEr"] == pytest.approx(ours_and_standard[0]["CIDEr"], abs=1e-12)


@needs_java
def test_tokeniser_runs_once_and_survives_java_line_breaks(ours_and_standard, monkeypatch):
    calls = []
    run = captions.subprocess.run

    def counting_run(*args, **kwargs):
        calls.append(args)
        return run(*args, **kwargs)

    monkeypatch.setattr(captions.subprocess, "run", counting_run)
    # Java's tokenizer ends a line at CR and U+2028; unguarded, every later caption
    # would move to the wrong image.
    predictions = dict(PREDICTIONS)
    predictions[522418] = "A woman cutting\ra cake\u2028with a knife."
    result = caption_scores(REFERENCES, predictions, metrics=("CIDEr",))
    assert len(calls) == 1
    assert result["CIDEr"] == pytest.approx(ours_and_standard[0]["CIDEr"], abs=1e-12)


def test_fallback_without_java(monkeypatch, caplog):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    # Already lower-case and punctuation-free, so PTB would not change them.
    references = {
        "a": ["a dog runs on the grass", "the brown dog is running"],
        "b": ["a cat sits on a mat", "cat on the mat"],
        "c": ["two men play tennis", "two people playing tennis on a court"],
        "d": ["a red car parked on the street", "a car parked by the road"],
        "e": ["a plate of food", "food on a white plate"],
    }
    predictions = {
        "a": "a dog running on grass",
        "b": "a cat on a mat",
        "c": "two men playing tennis",
        "d": "a red car",
        "e": "a white plate",
    }
    with caplog.at_level(logging.WARNING, logger=captions.__name__):
        result = caption_scores(references, predictions)
    assert result.tokenizer == "fallback"
    assert result.meteor_available is False
    assert result["METEOR"] is None
    assert "METEOR" not in result.per_image
    assert len(result.warnings) == 2
    assert "java not found" in caplog.text

    gts = {k: list(v) for k, v in references.items()}
    res = {k: [predictions[k]] for k in references}
    expected = _score_tokenised(gts, res)
    for metric, (corpus, per_image) in expected.items():
        assert result[metric] == pytest.approx(float(corpus), abs=1e-9), metric
        assert [result.per_image[metric][k] for k in references] == pytest.approx([float(v) for v in per_image], abs=1e-9)
    assert result["CIDEr"] > 0.5


def test_single_image_cider_is_zero(monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    result = caption_scores({1: ["a dog"]}, {1: "a dog"}, metrics=("CIDEr",))
    assert result["CIDEr"] == 0.0
    assert any("one image scores 0" in w for w in result.warnings)


# Typical captions whose PTB tokens the fallback must reproduce exactly.
FALLBACK_SENTENCES = [
    "A man's dog can't run.",
    "Two (2) dogs, running -- fast!",
    'He said "hello" to the cat\'s owner.',
    "It's 3.5 ft tall; isn't it?",
    "A [red] {blue} car...",
    "U.S.A. e-mail 10,000 people",
    "The dog's ball & the cat's toy: fun",
    "Mr. Smith's cafe at 5 p.m.",
    "  multiple   spaces\there ",
    "don't they'll we're I'm you've she'd won't",
    "50% off $5 #1 @home",
    "it's 'quoted' `text'",
    "Café naïve résumé",
    "what? wow!! ok.",
    "gonna wanna cannot",
    "The dogs' bowls are empty.",
    "A bathroom with a toilet, sink, and shower.",
    "There is a clock at 10:30 on the tower.",
    "A woman - who is smiling - holds an umbrella",
    "A bird's-eye view of a city",
    "The dog\u2019s \u201cball\u201d",
    "",
]


@needs_java
def test_fallback_tokenizer_matches_ptb_on_typical_captions():
    ptb = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(FALLBACK_SENTENCES)})
    for i, sentence in enumerate(FALLBACK_SENTENCES):
        assert fallback_tokenize(sentence) == ptb[i][0], sentence


def test_fallback_tokenizer_examples():
    assert fallback_tokenize("A man's dog can't run.") == "a man 's dog ca n't run"
    assert fallback_tokenize("Two (2) dogs, fast!") == "two -lrb- 2 -rrb- dogs fast"


@pytest.mark.parametrize(
    ("references", "predictions", "message"),
    [
        ({1: ["a"], 2: ["b"]}, {1: "a"}, r"no prediction for \[2\]"),
        ({1: ["a"]}, {1: "a", "x": "b"}, r"no references for \['x'\]"),
        ({1: []}, {1: "a"}, r"references\[1\] is empty"),
        ({"k": "a dog"}, {"k": "a"}, r"references\['k'\] must be a list"),
        ({"k": ["a", None]}, {"k": "a"}, r"references\['k'\]\[1\]"),
        ({"k": ["a"]}, {"k": ["a"]}, r"predictions\['k'\]"),
        ({}, {}, "empty"),
        ([["a"]], {0: "a"}, "mappings"),
    ],
)
def test_rejects_bad_input(references, predictions, message):
    with pytest.raises(ValueError, match=message):
        caption_scores(references, predictions)


def test_rejects_unknown_metric():
    with pytest.raises(ValueError, match="SPICE"):
        caption_scores({1: ["a"]}, {1: "a"}, metrics=("CIDEr", "SPICE"))
    with pytest.raises(ValueError, match="non-empty"):
        caption_scores({1: ["a"]}, {1: "a"}, metrics=())


def test_to_dict(monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    result = caption_scores({1: ["a dog"], 2: ["a cat"]}, {1: "a dog", 2: "a cat"})
    summary = result.to_dict()
    assert summary["tokenizer"] == "fallback"
    assert summary["scores"]["METEOR"] is None
    assert set(summary["scores"]) == set(ALL_CAPTION_METRICS)


def _fake_java(monkeypatch, returncode, stdout):
    monkeypatch.setattr(captions.shutil, "which", lambda name: "/fake/java")

    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, returncode, stdout=stdout, stderr=b"boom")

    monkeypatch.setattr(captions.subprocess, "run", run)


def test_tokenizer_failure_raises(monkeypatch):
    _fake_java(monkeypatch, returncode=1, stdout=b"")
    with pytest.raises(RuntimeError, match="PTBTokenizer failed.*boom"):
        caption_scores({1: ["a dog"]}, {1: "a dog"}, metrics=("CIDEr",))


def test_tokenizer_line_mismatch_raises(monkeypatch):
    # Two references + two predictions = 4 captions, but only 3 lines come back.
    _fake_java(monkeypatch, returncode=0, stdout=b"a dog\na cat\na dog")
    with pytest.raises(RuntimeError, match="3 lines for 4 captions"):
        caption_scores({1: ["a dog"], 2: ["a cat"]}, {1: "a dog", 2: "a cat"}, metrics=("CIDEr",))


def test_meteor_failure_raises_and_stops_the_process(monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: "/fake/java")
    monkeypatch.setattr(captions, "_ptb_tokenize", lambda sentences, java: list(sentences))
    processes = []

    class DeadMeteor(Meteor):
        def __init__(self):  # a "JVM" that exits at once instead of scoring
            self.meteor_p = subprocess.Popen(
                [sys.executable, "-c", "import sys; sys.stderr.write('no jvm'); sys.exit(3)"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            self.lock = threading.Lock()
            processes.append(self.meteor_p)

    monkeypatch.setattr(captions, "Meteor", DeadMeteor)
    with pytest.raises(RuntimeError, match="METEOR \\(Java\\) failed"):
        caption_scores({1: ["a dog"], 2: ["a cat"]}, {1: "a dog", 2: "a cat"}, metrics=("METEOR",))
    assert len(processes) == 1
    assert processes[0].returncode is not None
