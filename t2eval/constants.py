"""The protocol's names, in one place (PROTOCOL §3, §5, §6).

Which tasks exist, which are training tasks and which are unseen, which expert each training task
trains, the dispatch labels, each task's metric and display label. Everything else (plan, tasks,
splits, lm wrapper, tables, figures, schema checks) imports these; adding a task or an expert means
editing this module (plus the task's own module under `t2eval/tasks/`).
"""

from __future__ import annotations

from .errors import T2EvalError

# training tasks -> the expert each one trains (PROTOCOL §6: math = GSM8K, code = MBPP, reasoning = ARC-Easy)
EXPERT_OF_TASK: dict[str, str] = {"gsm8k": "math", "mbpp": "code", "arc_easy": "reasoning"}
TRAIN_TASKS: tuple[str, ...] = tuple(EXPERT_OF_TASK)
TASK_OF_EXPERT: dict[str, str] = {v: k for k, v in EXPERT_OF_TASK.items()}
# the expert names (the order of α in few-shot mixtures and of experts= arguments)
EXPERT_NAMES: tuple[str, ...] = tuple(EXPERT_OF_TASK.values())
# the order the release loads experts at dispatch (PROTOCOL §8: "other" keeps the last one loaded)
RELEASE_DISPATCH_ORDER: tuple[str, ...] = ("code", "math", "reasoning")
UNSEEN_TASKS: tuple[str, ...] = ("math", "humaneval", "arc_challenge")
# dispatch-classifier tasks (cls = the release's data; cls_leakfree = no unseen-task test questions)
CLS_TASKS: tuple[str, ...] = ("cls", "cls_leakfree")
EVAL_TASKS: tuple[str, ...] = TRAIN_TASKS + UNSEEN_TASKS
TASK_KEYS: tuple[str, ...] = EVAL_TASKS + ("cls",)
# the dispatcher's categories; "other" has no expert
OTHER = "other"
CATEGORIES: tuple[str, ...] = EXPERT_NAMES + (OTHER,)
# task key -> the category (expert) that should answer it (Figure 6's "true task" rows)
CATEGORY_OF_TASK: dict[str, str] = {"gsm8k": "math", "math": "math", "mbpp": "code", "humaneval": "code",
                                    "arc_easy": "reasoning", "arc_challenge": "reasoning"}
METRIC_OF_TASK: dict[str, str] = {"gsm8k": "acc", "math": "acc", "arc_easy": "acc", "arc_challenge": "acc",
                                  "mbpp": "pass@1", "humaneval": "pass@1", "cls": "acc", "cls_leakfree": "acc"}
TASK_LABELS: dict[str, str] = {"gsm8k": "GSM8K", "mbpp": "MBPP-Pro", "arc_easy": "ARC-Easy", "math": "MATH",
                               "humaneval": "HumanEval", "arc_challenge": "ARC-Challenge"}
CODE_TASKS: tuple[str, ...] = ("mbpp", "humaneval")
# vision-language tasks (issue 10): their own tuple, so the LLM task lists and tables above stay as they are.
# VQA accuracy (t2eval.tasks.vqa) is their metric: a cell's score is the mean accuracy, its per-sample
# `correct` is accuracy > 0 (t2eval.results).
VQA_METRIC = "vqa_acc"
VLM_TASKS: tuple[str, ...] = ("textvqa", "okvqa", "synth_textvqa")
VLM_TRAIN_TASKS: tuple[str, ...] = ("textvqa", "synth_textvqa")  # tasks with train/valid splits
METRIC_OF_TASK.update({t: VQA_METRIC for t in VLM_TASKS})
VLM_TASK_LABELS: dict[str, str] = {"textvqa": "TextVQA", "okvqa": "OKVQA", "synth_textvqa": "Synth-TextVQA"}


def check_task(key: str, allowed: tuple[str, ...] = TASK_KEYS + CLS_TASKS[1:] + VLM_TASKS, what: str = "task") -> str:
    """`key` if it is one of `allowed`, else a clear error listing them."""
    if key not in allowed:
        raise T2EvalError(f"unknown {what} {key!r}; known: {', '.join(allowed)}")
    return key


def task_key_of(name: str | None) -> str:
    """Protocol task key of an lm-eval task name: `t2_math_fewshot_test` → `math`,
    `t2_arc_challenge_llama3` → `arc_challenge`; stock lm-eval names are returned unchanged."""
    t = name or "unknown"
    if not t.startswith("t2_"):
        return t
    key = t[3:]
    known = TASK_KEYS + CLS_TASKS + VLM_TASKS
    for k in sorted(known, key=len, reverse=True):
        if key == k or key.startswith(k + "_"):
            return k
    raise T2EvalError(f"lm-eval task {name!r} names no t2eval task; known: {', '.join(known)}")
