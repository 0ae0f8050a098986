"""VQA accuracy and normalisation against hand-computed values of the official rule.

The expected numbers follow GT-Vision-Lab/VQA vqaEval.py (master, a013f00):
acc = 1/10 * sum over the 10 leave-one-out subsets of min(1, matches among the
other 9 / 3).
"""

import pytest

from lmms_quant.metrics import gqa_exact_match, normalize_answer, vqa_accuracy


def _answers(matching: str, k: int, other: str = "3", n: int = 10) -> list[str]:
    return [matching] * k + [other] * (n - k)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        # 0 humans agree: every subset has 0 matches.
        (0, 0.0),
        # 1 of 10: leaving it out (1 subset) gives 0; the 9 other subsets hold 1
        # match -> 1/3 each: (0 + 9 * 1/3) / 10 = 0.3.
        (1, 0.3),
        # 2 of 10: 2 subsets lose one -> 1/3, 8 keep both -> 2/3:
        # (2 * 1/3 + 8 * 2/3) / 10 = 18/30 = 0.6.
        (2, 0.6),
        # 3 of 10: 3 subsets keep 2 -> 2/3, 7 keep 3 -> 1: (3 * 2/3 + 7) / 10 = 0.9.
        # (Not 1.0: full credit needs 3 matches in *every* subset, i.e. 4 humans.)
        (3, 0.9),
        # 4 (or 9) of 10: each subset keeps at least 3 matches -> 1.
        (4, 1.0),
        (9, 1.0),
    ],
)
def test_leave_one_out_average(k, expected):
    # The answers disagree, so both sides are normalised: "two" -> "2".
    assert vqa_accuracy("2", _answers("two", k)) == pytest.approx(expected, abs=1e-12)


def test_prediction_is_normalised_when_answers_disagree():
    answers = _answers("two", 3)
    for prediction in ("2", "Two", "two.", " the two\n", "TWO!"):
        assert vqa_accuracy(prediction, answers) == pytest.approx(0.9, abs=1e-12)


def test_no_normalisation_when_all_answers_agree():
    # Official quirk: with ten identical answers neither side is normalised,
    # only newlines/tabs become spaces and the ends are stripped.
    answers = ["two"] * 10
    assert vqa_accuracy("two", answers) == 1.0
    assert vqa_accuracy("\ttwo \n", answers) == 1.0
    assert vqa_accuracy("2", answers) == 0.0
    assert vqa_accuracy("Two", answers) == 0.0
    assert vqa_accuracy("two.", answers) == 0.0


def test_other_answer_counts():
    # 3 answers ["yes", "yes", "no"], prediction "yes": leaving out a "yes" leaves
    # 1 match (1/3, twice), leaving out "no" leaves 2 (2/3): (1/3+1/3+2/3)/3 = 4/9.
    assert vqa_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx(4 / 9, abs=1e-12)
    # A single answer can never match the (empty) other subset.
    assert vqa_accuracy("yes", ["yes"]) == 0.0


def test_lmms_lab_dicts_with_and_without_answer_id():
    plain = ["yes"] * 3 + ["no"] * 7
    with_id = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(plain)]
    without_id = [{"answer": a, "answer_confidence": "yes"} for a in plain]
    bare = [{"answer": a} for a in plain]
    # 3 of 10 -> 0.9 in every format. lmms-eval's dict comparison would drop all
    # three equal "yes" dicts at once without answer_id and return 0.7.
    for answers in (plain, with_id, without_id, bare):
        assert vqa_accuracy("yes", answers) == pytest.approx(0.9, abs=1e-12)


def test_inputs_are_not_mutated():
    answers = [{"answer": "Two.", "answer_id": 1}, {"answer": "three", "answer_id": 2}]
    vqa_accuracy("2", answers)
    assert answers == [{"answer": "Two.", "answer_id": 1}, {"answer": "three", "answer_id": 2}]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("dont", "don't"),  # contraction map
        ("isnt", "isn't"),
        ("a dog.", "dog"),  # article and period removed
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("Ten", "10"),  # number words
        ("none", "0"),
        ("three dogs", "3 dogs"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # digit,digit: every punctuation mark is deleted
        ("red, white", "red white"),  # mark next to a space: deleted
        ("red,white", "red white"),  # mark between letters: becomes a space
        ("t-shirt", "t shirt"),
        ("black/white", "black white"),
        ("(left)", "left"),
        ("Yes!", "yes"),
        ("e.g.", "eg"),
        ("it's", "it's"),  # apostrophes are not punctuation for the official code
        ("yes\nno\tmaybe", "yes no maybe"),
        ("  many   spaces ", "many spaces"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_period_strip_quirks():
    # The official call passes re.UNICODE (32) as sub()'s count: 40 periods keep 8.
    assert normalize_answer("." * 40) == "." * 8
    # \d is ASCII-only, as in the Python 2 original: an Arabic-Indic digit does not
    # protect the period in front of it.
    assert normalize_answer("\u0663.\u0665") == "\u0663\u0665"


def test_gqa_exact_match():
    assert gqa_exact_match("The dog.", "dog") == 1.0
    assert gqa_exact_match("Two", "2") == 1.0
    assert gqa_exact_match("left", "Left ") == 1.0
    assert gqa_exact_match("cat", "dog") == 0.0
    assert gqa_exact_match("black and white", "black white") == 0.0


@pytest.mark.parametrize(
    ("prediction", "answers", "message"),
    [
        ("yes", [], "empty"),
        ("yes", "yes", "list of str"),
        ("yes", None, "list of str"),
        (None, ["yes"], "prediction"),
        (3, ["yes"], "prediction"),
        ("yes", ["yes", 3], r"answers\[1\]"),
        ("yes", [{"answer_id": 1}], r"answers\[0\].*'answer'"),
        ("yes", [{"answer": None}], r"answers\[0\]"),
    ],
)
def test_vqa_accuracy_rejects_bad_input(prediction, answers, message):
    with pytest.raises(ValueError, match=message):
        vqa_accuracy(prediction, answers)


def test_normalizers_reject_non_strings():
    with pytest.raises(ValueError, match="answer"):
        normalize_answer(None)
    with pytest.raises(ValueError, match="prediction"):
        gqa_exact_match(1, "one")
    with pytest.raises(ValueError, match="answer"):
        gqa_exact_match("one", ["one"])
