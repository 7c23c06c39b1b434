"""Tasks: prompts + scorers shared by evaluation (lm-eval) and RL rewards; code sandbox; lm-eval YAMLs.

    from t2eval.tasks import get_task
    task = get_task("gsm8k")                      # code-release defaults
    task = get_task("gsm8k", extractor="signed")  # corrected variant

A task module registers its class with `@register_task("key")` (see registry.py).
"""

from __future__ import annotations

from pathlib import Path

from ..constants import TASK_KEYS, UNSEEN_TASKS, VLM_TASKS, check_task
from ..errors import T2EvalError
from .registry import get_task, known_tasks, register_task

__all__ = ["TASK_KEYS", "UNSEEN_TASKS", "get_task", "known_tasks", "lm_eval_task_dir", "lm_eval_task_name",
           "register_task"]


def lm_eval_task_dir() -> Path:
    """The directory to pass to lm-eval's TaskManager(include_path=...)."""
    return Path(__file__).with_name("lm_eval")


def lm_eval_task_name(task: str, split: str = "test", fewshot_excluded: bool = False,
                      family: str | None = None) -> str:
    """Name of the lm-eval task for a t2eval task/split (see tasks/lm_eval/README.md).

    t2_<task> = the test split; t2_<task>_<split> for train/valid; t2_<task>_fewshot_test = the test
    split without the 10 prompts held out for few-shot CEM (unseen tasks only); a "_<family>" suffix
    where a YAML of that name exists (the Llama-3 ARC pre-fill: t2_arc_*_llama3). The VQA tasks
    (`constants.VLM_TASKS`: t2_textvqa, t2_okvqa, t2_synth_textvqa) have test-split YAMLs only.
    """
    check_task(task, TASK_KEYS + VLM_TASKS)
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
    if family and (lm_eval_task_dir() / f"{name}_{family}.yaml").is_file():
        name += f"_{family}"
    return name
