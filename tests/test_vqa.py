"""t2eval.tasks.vqa: answer normalisation, leave-one-out VQA accuracy (hand-computed) and the reward."""

from __future__ import annotations

import pytest

from t2eval.errors import T2EvalError
from t2eval.tasks.vqa import normalise_answer, reward, vqa_accuracy


@pytest.mark.parametrize("raw, want", [
    ("Two", "2"), ("the Stop sign.", "stop sign"), ("a dog", "dog"), ("An apple", "apple"),
    ("dont", "don't"), ("yes!", "yes"), ("3.5", "3.5"), ("$12.99", "$12.99"), ("1,000", "1000"),
    ("coca-cola", "coca cola"), ("coca - cola", "coca cola"), ("what?", "what"), ("none", "0"),
    ("  Hello\tWorld\n", "hello world"), ("e.g", "eg"), ("(left)", "left"), ("john's", "john 's"),
])
def test_evalai_normalisation(raw, want):
    assert normalise_answer(raw) == want


def test_official_normalisation_differs_only_in_tokenising():
    assert normalise_answer("john's", "official") == "john's"
    assert normalise_answer("The TWO Cats.", "official") == "2 cats"
    with pytest.raises(T2EvalError, match="normalisation"):
        normalise_answer("x", "bogus")


def _answers(k: int, right: str = "stop", other: str = "go") -> list[str]:
    return [right] * k + [other] * (10 - k)


@pytest.mark.parametrize("k, want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_values(k, want):
    # k of 10 match: k subsets see k-1 matches, 10-k see k -> (k·min(1,(k-1)/3) + (10-k)·min(1,k/3)) / 10
    assert vqa_accuracy("stop", _answers(k)) == pytest.approx(want, abs=1e-12)
    assert vqa_accuracy("stop", _answers(k), "official") == pytest.approx(want, abs=1e-12)


def test_matches_after_normalisation():
    answers = ["the stop sign", "Stop sign", "stop sign.", "STOP SIGN", "stop"] + ["go"] * 5
    assert vqa_accuracy("A stop sign!", answers) == 1.0
    assert vqa_accuracy("stop-sign", answers) == 1.0  # the hyphen becomes a space
    assert vqa_accuracy("stopsign", answers) == 0.0
    assert vqa_accuracy("the stop", answers) == pytest.approx(0.3)  # one annotator said "stop"
    # official mode: identical references -> no normalisation at all
    same = ["Two"] * 10
    assert vqa_accuracy("2", same, "official") == 0.0 and vqa_accuracy("Two", same, "official") == 1.0
    assert vqa_accuracy("2", same, "evalai") == 1.0


def test_reward_binary_and_soft():
    assert reward("stop", _answers(1)) == 1.0
    assert reward("nope", _answers(4)) == -0.1
    assert reward("stop", _answers(2), mode="soft") == pytest.approx(0.6)
    assert reward("nope", _answers(4), mode="soft") == 0.0
    with pytest.raises(T2EvalError, match="reward"):
        reward("stop", _answers(1), mode="bogus")
    with pytest.raises(T2EvalError, match="10 annotator"):
        vqa_accuracy("stop", ["stop"] * 9)
