"""VQA accuracy and the VLM reward (issue 10; the VQA metric of TextVQA / OKVQA).

Accuracy (the VQA challenge's metric): with 10 annotator answers, the prediction's score against
each of the 10 leave-one-out subsets of 9 answers is ``min(#matches / 3, 1)``; the accuracy is their
mean. With k of the 10 answers matching this gives 0, .3, .6, .9, 1 for k = 0, 1, 2, 3, ≥4.

Answer normalisation, re-implemented from the official VQA evaluation script (vqaEval.py) and
EvalAI's answer processor (the one the TextVQA leaderboard and lmms-eval use):
  * lower-case; ``,`` and ``?`` dropped and ``'s`` split off (EvalAI's ``word_tokenize``);
  * punctuation: each mark is deleted when it touches a space or the text has a "digit,digit"
    comma, else replaced by a space; a period not followed by a digit is dropped (the scripts'
    ``(?!<=\\d)(\\.)(?!\\d)`` pattern, whose intended look-behind is in fact a look-ahead, and its
    ``sub(..., re.UNICODE)`` call that caps the count at 32 — both kept);
  * number words zero…ten → digits ("none" → "0"), articles a/an/the removed, common
    apostrophe-less contractions restored ("dont" → "don't").

``normalise="evalai"`` (default) normalises the prediction and every reference answer, always.
``normalise="official"`` follows vqaEval.py exactly: no ``word_tokenize`` step, and the answers are
normalised only when the 10 references are not all identical (a quirk of that script).

Reward (paper text, no code: "−0.1 for wrong answers" for the VLM, PROTOCOL §1): ``binary`` =
+1 if the accuracy is > 0 else −0.1; ``soft`` = the accuracy itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import T2EvalError

NORMALISERS = ("evalai", "official")
REWARDS = ("binary", "soft")
WRONG_REWARD = -0.1

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# apostrophe-less spelling -> canonical contraction (the official script's table, common entries)
_CONTRACTIONS = {c.replace("'", ""): c for c in (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he'll", "he's", "how'd", "how'll",
    "how's", "i'd", "i'd've", "i'll", "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "let's",
    "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't", "not've",
    "o'clock", "oughtn't", "shan't", "she'd", "she'd've", "she'll", "should've", "shouldn't",
    "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd",
    "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll",
    "that's", "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll",
    "they're", "they've", "wasn't", "we'd", "we'd've", "we'll", "we're", "we've", "weren't", "what'll",
    "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've",
    "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't",
    "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've")}
# words whose apostrophe-less form is itself a word are not restored
for _w in ("hell", "id", "ill", "its", "shed", "shell", "were", "wed", "well", "whos", "lets", "cant", "wont"):
    _CONTRACTIONS.pop(_w, None)
_CONTRACTIONS.update({"cant": "can't", "wont": "won't", "lets": "let's", "whos": "who's", "im": "i'm",
                      "ive": "i've"})


def _check(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise T2EvalError(f"unknown VQA {what} {value!r}: use one of {', '.join(allowed)}")
    return value


def process_punctuation(text: str) -> str:
    out = text
    strip_all = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if p + " " in text or " " + p in text or strip_all:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # sic: count=re.UNICODE (32), as in the scripts


def process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalise_answer(text: str, normalise: str = "evalai") -> str:
    """One answer after the chosen normalisation (see the module docstring)."""
    _check(normalise, NORMALISERS, "normalisation")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    if normalise == "evalai":
        text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], normalise: str = "evalai") -> float:
    """Leave-one-out VQA accuracy of `prediction` against the 10 annotator `answers`."""
    _check(normalise, NORMALISERS, "normalisation")
    if isinstance(answers, str) or len(answers) != 10:
        raise T2EvalError(f"VQA accuracy needs the 10 annotator answers, got {answers!r}")
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if normalise == "evalai" or len(set(gts)) > 1:
        pred = normalise_answer(pred, normalise)
        gts = [normalise_answer(a, normalise) for a in gts]
    matches = [g == pred for g in gts]
    k = sum(matches)
    return sum(min(1.0, (k - m) / 3) for m in matches) / len(matches)


def reward(prediction: str, answers: Sequence[str], mode: str = "binary", normalise: str = "evalai") -> float:
    """RL reward of one answer: binary = +1 if the VQA accuracy is > 0 else −0.1; soft = the accuracy."""
    _check(mode, REWARDS, "reward")
    acc = vqa_accuracy(prediction, answers, normalise)
    if mode == "soft":
        return acc
    return 1.0 if acc > 0 else WRONG_REWARD
