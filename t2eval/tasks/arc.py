"""ARC-Easy / ARC-Challenge multiple choice with chain of thought (PROTOCOL §5).

Prompt: question + "\\nOptions:\\n" + "A. ...\\n" lines (always lettered A, B, C, ... whatever the
dataset's labels). Llama-3 models get the assistant pre-fill "Let's think step by step".
Answer extraction (release): first "answer is (X)"/"answer is X"; else "Answer: X" (first line
that has one, last occurrence on it); else the last standalone capital A-J.
Options: no_answer="random" (release: Python's `random.seed(42); randint(0, n-1)`, i.e. a fixed
letter per option count) or "wrong"; numeric_keys="release" (default; compare the letter with the
raw answerKey, so items keyed "1".."5" are never right: 97 of 2376 ARC-Easy test items, 102 of the
2251 train items the reward sees, 22 of 1172 ARC-Challenge test items -- PROTOCOL §5, §8) or
"corrected" (map the key to the letter at its position). The older names "code" and "position" are
accepted for "release" and "corrected".
"""

from __future__ import annotations

import random
import re

from .base import Task, check_option
from .registry import register_task

SYSTEM = ("The following are multiple choice questions (with answers). Think step by step and then "
          "finish your answer with \"the answer is (X)\" where X is the correct letter choice.")
LLAMA3_PREFILL = "Let's think step by step"
LETTERS = "ABCDEFGHIJ"

_ANSWER_IS = re.compile(r"answer is \(?([A-J])\)?")
_ANSWER_COLON = re.compile(r".*[aA]nswer:\s*([A-J])")
_LAST_LETTER = re.compile(r"\b[A-J]\b(?!.*\b[A-J]\b)", re.DOTALL)


def extract_letter(text: str) -> str | None:
    """The release's three-stage letter extraction; None if nothing matches."""
    for pat in (_ANSWER_IS, _ANSWER_COLON):
        m = pat.search(text)
        if m:
            return m.group(1)
    m = _LAST_LETTER.search(text)
    return m.group(0) if m else None


def format_question(doc: dict) -> str:
    """Question text + lettered options, exactly as the release builds it."""
    q = doc["question"] + "\nOptions:\n"
    for i, opt in enumerate(doc["choices"]["text"]):
        q += f"{LETTERS[i]}. {opt}\n"
    return q


NUMERIC_KEYS = ("release", "corrected")
_NUMERIC_KEY_ALIASES = {"code": "release", "position": "corrected"}


def gold_letter(doc: dict, numeric_keys: str = "release") -> str:
    """The answer the extracted letter must equal: the raw answerKey (release) or, corrected, the
    letter at the key's position among the labels (identical for letter-labelled items)."""
    key = doc["answerKey"]
    if _NUMERIC_KEY_ALIASES.get(numeric_keys, numeric_keys) == "corrected":
        labels = list(doc["choices"]["label"])
        if key in labels:
            return LETTERS[labels.index(key)]
    return key


def random_letter(n_options: int) -> str:
    """The release's fallback: random.seed(42); randint(0, n-1) (deterministic per n)."""
    return "ABCDE"[random.Random(42).randint(0, n_options - 1)]


@register_task("arc_easy", "arc_challenge")
class ARC(Task):
    metric = "acc"
    system = SYSTEM

    def __init__(self, key: str = "arc_easy", no_answer: str = "random",
                 numeric_keys: str = "release") -> None:
        self.key = check_option("arc", "key", key, ("arc_easy", "arc_challenge"))
        self.no_answer = check_option(key, "no_answer", no_answer, ("random", "wrong"))
        numeric_keys = _NUMERIC_KEY_ALIASES.get(numeric_keys, numeric_keys)
        self.numeric_keys = check_option(key, "numeric_keys", numeric_keys, NUMERIC_KEYS)
        self.options = {"no_answer": no_answer, "numeric_keys": self.numeric_keys}

    def user_message(self, doc: dict) -> str:
        return format_question(doc)

    def prefill(self, doc: dict, family: str | None = None) -> str:
        return LLAMA3_PREFILL if family == "llama3" else ""

    def reference(self, doc: dict) -> str:
        return f"the answer is ({gold_letter(doc, 'corrected')})"

    def score_one(self, doc: dict, completion: str) -> bool:
        gold = gold_letter(doc, self.numeric_keys)
        pred = extract_letter(completion)
        if pred is None:
            if self.no_answer == "wrong":
                return False
            pred = random_letter(len(doc["choices"]["text"]))
        return pred == gold
