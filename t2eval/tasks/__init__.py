"""Tasks: prompts + scorers shared by evaluation (lm-eval) and RL rewards; code sandbox; lm-eval YAMLs.

    from t2eval.tasks import get_task
    task = get_task("gsm8k")                      # code-release defaults
    task = get_task("gsm8k", extractor="signed")  # corrected variant
"""

from __future__ import annotations

from pathlib import Path

from .registry import TASK_KEYS, get_task

__all__ = ["TASK_KEYS", "get_task", "lm_eval_task_dir", "lm_eval_task_name"]

UNSEEN_TASKS = ("math", "humaneval", "arc_challenge")


def lm_eval_task_dir() -> Path:
    """The directory to pass to lm-eval's TaskManager(include_path=...)."""
    return Path(__file__).with_name("lm_eval")


def lm_eval_task_name(task: str, split: str = "test", fewshot_excluded: bool = False,
                      family: str | None = None) -> str:
    """Name of the lm-eval task for a t2eval task/split (see tasks/lm_eval/README.md).

    t2_<task> = the test split; t2_<task>_<split> for train/valid; t2_<task>_fewshot_test = the test
    split without the 10 prompts held out for few-shot CEM (unseen tasks only); a "_llama3" suffix
    selects the Llama-3 ARC pre-fill.
    """
    from ..errors import T2EvalError

    if task not in TASK_KEYS:
        raise T2EvalError(f"unknown task {task!r}; known tasks: {', '.join(TASK_KEYS)}")
    if fewshot_excluded:
        if task not in UNSEEN_TASKS:
            raise T2EvalError(f"few-shot exclusion applies to the unseen tasks {UNSEEN_TASKS}, not {task!r}")
        if split != "test":
            raise T2EvalError("fewshot_excluded=True only applies to the test split")
        name = f"t2_{task}_fewshot_test"
    elif split == "test":
        name = f"t2_{task}"
    elif split in ("train", "valid"):
        name = f"t2_{task}_{split}"
    else:
        raise T2EvalError(f"split {split!r}: use train, valid or test")
    if family == "llama3" and task.startswith("arc_"):
        name += "_llama3"
    return name
