"""`get_task(key, **options)`: the task objects shared by evaluation and RL rewards."""

from __future__ import annotations

from typing import Any

from ..errors import T2EvalError
from .base import Task

TASK_KEYS = ("gsm8k", "arc_easy", "arc_challenge", "math", "mbpp", "humaneval", "cls")


def get_task(key: str, **options: Any) -> Task:
    """A fresh task object; options select the paper/code variants (see each task module)."""
    if key == "gsm8k":
        from .gsm8k import GSM8K

        return GSM8K(**options)
    if key in ("arc_easy", "arc_challenge"):
        from .arc import ARC

        return ARC(key, **options)
    if key == "math":
        from .math import MATH

        return MATH(**options)
    if key == "mbpp":
        from .code import MBPP

        return MBPP(**options)
    if key == "humaneval":
        from .code import HumanEval

        return HumanEval(**options)
    if key == "cls":
        from .cls import Cls

        return Cls(**options)
    raise T2EvalError(f"unknown task {key!r}; known tasks: {', '.join(TASK_KEYS)}")
