"""GSM8K: grade-school word problems (PROTOCOL §5). Score: last number of the output == gold answer.

extractor="code" (default) reproduces the code release exactly: the prediction is the last match of
`\\d*\\.?\\d+` in the output and the gold is the last such match in the worked answer, both as
numbers. The regex cannot see minus signs (so -3 and 3 agree) nor commas ("1,000" is read as 0; the
release's comma removal runs after matching and is a no-op). extractor="signed" is the corrected
reader: thousands separators removed first, an optional leading minus, gold = the number after "####".
"""

from __future__ import annotations

import re

from .base import Task, check_option
from .registry import register_task

SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n")

_CODE_NUM = re.compile(r"\d*\.?\d+")
_SIGNED_NUM = re.compile(r"-?\d*\.?\d+")


def extract_number_code(text: str) -> float | None:
    """The release's reader: last `\\d*\\.?\\d+` match as a float (no sign, commas split numbers)."""
    matches = _CODE_NUM.findall(text)
    return float(matches[-1]) if matches else None


def extract_number_signed(text: str) -> float | None:
    """Corrected reader: drops thousands separators, keeps a leading minus sign."""
    cleaned = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    matches = _SIGNED_NUM.findall(cleaned)
    return float(matches[-1]) if matches else None


def gold_answer(answer: str, extractor: str = "code") -> float | None:
    """The gold number of a GSM8K worked answer ("... #### 72")."""
    if extractor == "code":
        x = extract_number_code(answer)
        return None if x is None else float(int(x))
    return extract_number_signed(answer.split("####")[-1])


@register_task("gsm8k")
class GSM8K(Task):
    system = SYSTEM

    def __init__(self, extractor: str = "code") -> None:
        self.extractor = check_option(self.key, "extractor", extractor, ("code", "signed"))
        self.options = {"extractor": extractor}

    def user_message(self, doc: dict) -> str:
        return doc["question"]

    def reference(self, doc: dict) -> str:
        return doc["answer"]

    def extract(self, completion: str) -> float | None:
        return (extract_number_code if self.extractor == "code" else extract_number_signed)(completion)

    def score_one(self, doc: dict, completion: str) -> bool:
        gold = gold_answer(doc["answer"], self.extractor)
        pred = self.extract(completion)
        return gold is not None and pred is not None and gold == pred
