"""Dispatch classification (PROTOCOL §6.1/6.2): which expert (code / math / reasoning / other).

The system prompt is the code release's wording, reproduced verbatim from a public copy of the
release's `tasks/cls.py` (a fork of SakanaAI/self-adaptive-llms), including its leading newline,
its four-space indentation and the trailing space after the "Reasoning" line. The release reads
the category with `re.search(r"\\boxed{([^}]*)}")` (the FIRST \\boxed{}) and scores an exact,
case-sensitive match with the label; `parse_category` does the same by default (strict) and maps
anything else to "other" (`constants.OTHER`; the dispatcher then uses the base model). strict=False also accepts
case/whitespace variants.
"""

from __future__ import annotations

import re

from .. import constants
from ..constants import CATEGORY_OF_TASK, OTHER
from .base import Task, check_option
from .registry import get_task, register_task

__all__ = ["CATEGORIES", "CATEGORY_OF_TASK", "Cls", "SYSTEM", "dispatch_messages", "dispatch_prompt",
           "parse_category", "question_text"]

SYSTEM = """
    # Analyze the given question and classify it into one of four categories: 'code', 'math', 'reasoning' or 'other'. Follow these guidelines:

    1. Code: Questions asking for programming solutions, functions, algorithms. Often includes specific programming terms, language syntax, or data structures.
    2. Math: Questions involving mathematical calculations, formulas, statistics. Often includes numbers, equations, or mathematical operations.
    3. Reasoning: Questions requiring logical thinking, application of scientific knowledge, or critical analysis of information. Often presents statements that need evaluation based on general understanding. 
    4. Other: Questions not clearly fit into above categories.

    Instructions:
    - Consider the primary focus, skills, and knowledge required to answer the question.
    - If a question spans multiple categories, choose the most dominant one.
    - Provide your final classification within \\boxed{} notation. Example: \\boxed{reasoning}

    Format your response as follows:
    Classification: \\boxed{category}
    """

# the dispatcher's labels (`constants.CATEGORIES`) in the order the prompt lists them: 'code', 'math',
# 'reasoning' or 'other' -- the order label scores are reported in and ties are broken by (first wins)
CATEGORIES: tuple[str, ...] = tuple(sorted(constants.CATEGORIES, key=lambda c: SYSTEM.index(f"'{c}'")))

_BOXED = re.compile(r"\\boxed{([^}]*)}")


def parse_category(text: str, strict: bool = True) -> str:
    """The first \\boxed{...} content if it is a category, else "other"."""
    m = _BOXED.search(text)
    if not m:
        return OTHER
    c = m.group(1) if strict else m.group(1).strip().lower()
    return c if c in CATEGORIES else OTHER


def question_text(task_key: str, doc: dict) -> str:
    """The user-visible question of a doc of any task (what the dispatcher classifies)."""
    if task_key == "cls":
        return doc["question"]
    return get_task(task_key).user_message(doc)


def dispatch_messages(question: str) -> list[dict[str, str]]:
    """The first-pass chat for an arbitrary question."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def dispatch_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(dispatch_messages(question), tokenize=False,
                                         add_generation_prompt=True)


@register_task("cls")
class Cls(Task):
    system = SYSTEM
    max_new_tokens = 1024

    def __init__(self, leakfree: bool = False, strict: bool = True) -> None:
        self.leakfree = bool(leakfree)
        self.strict = check_option(self.key, "strict", strict, (True, False))
        self.data_task = "cls_leakfree" if self.leakfree else "cls"
        self.options = {"leakfree": self.leakfree, "strict": strict}

    def user_message(self, doc: dict) -> str:
        return doc["question"]

    def reference(self, doc: dict) -> str:
        return f"Classification: \\boxed{{{doc['label']}}}"

    def score_one(self, doc: dict, completion: str) -> bool:
        return parse_category(completion, self.strict) == doc["label"]
