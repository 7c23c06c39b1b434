"""What every task shares: the chat rendering, generation settings, data access and scoring loop.

A task turns a data row ("doc") into a chat (system + user message) plus an assistant pre-fill, and
scores a completion (the generated text *after* the pre-fill). The same object serves the
evaluation (lm-eval YAMLs in `tasks/lm_eval/`, the `t2` model) and the RL reward (`score_batch`).
"""

from __future__ import annotations

from typing import Any, Sequence

from ..constants import METRIC_OF_TASK
from ..errors import T2EvalError

# PROTOCOL §5: stop strings of the code release (vLLM SamplingParams.stop)
STOP = ["Instruction:", "Instruction", "Response:", "Response"]


class Task:
    """Base class; subclasses set `system`, implement `user_message`/`score_one` and are registered with
    `@register_task("key")` (which sets `key`); the metric is `constants.METRIC_OF_TASK[key]`."""

    key: str = ""
    system: str = ""
    max_new_tokens: int = 512
    extra_stop: tuple[str, ...] = ()
    # a jinja chat template that replaces the model's own (code tasks of the release), else None
    chat_template: str | None = None
    data_task: str | None = None  # key passed to task_split (defaults to `key`)
    # set by get_task from the protocol (t2eval.protocol): task_split options and the protocol's name
    data_options: dict[str, Any] = {}
    protocol: str = "release"

    def __init__(self, **options: Any) -> None:
        if options:
            raise T2EvalError(f"task {self.key!r} takes no options {sorted(options)}")
        self.options: dict[str, Any] = {}

    # ------------------------------------------------------------------ data
    def docs(self, split: str, data_dir=None) -> list[dict]:
        """The protocol's rows for `split` (train/valid/test/fewshot_heldout/fewshot_test), with doc_id."""
        try:
            from ..data.splits import task_split
        except ImportError as e:  # pragma: no cover - only before the data layer exists
            raise T2EvalError(f"the data layer (t2eval.data.splits) is not available: {e}") from None
        return list(task_split(self.data_task or self.key, split, data_dir, **self.data_options))

    @property
    def metric(self) -> str:
        """The protocol's metric of this task, "acc" or "pass@1" (`constants.METRIC_OF_TASK`)."""
        try:
            return METRIC_OF_TASK[self.key]
        except KeyError:
            raise T2EvalError(f"task {self.key!r} has no metric: add it to t2eval.constants.METRIC_OF_TASK") from None

    # --------------------------------------------------------------- prompts
    @property
    def gen_kwargs(self) -> dict[str, Any]:
        """Greedy decoding settings: max_new_tokens and stop strings."""
        return {"max_new_tokens": self.max_new_tokens, "stop": STOP + list(self.extra_stop)}

    def user_message(self, doc: dict) -> str:
        raise NotImplementedError

    def prefill(self, doc: dict, family: str | None = None) -> str:
        return ""

    def messages(self, doc: dict, family: str | None = None) -> tuple[list[dict[str, str]], str]:
        """(system + user chat, assistant pre-fill text)."""
        msgs = []
        if self.system:
            msgs.append({"role": "system", "content": self.system})
        msgs.append({"role": "user", "content": self.user_message(doc)})
        return msgs, self.prefill(doc, family)

    def prompt(self, tokenizer, doc: dict, family: str | None = None) -> str:
        """The full generation prompt: chat template (generation prompt added) + pre-fill."""
        msgs, prefill = self.messages(doc, family)
        kw = {"chat_template": self.chat_template} if self.chat_template else {}
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
        return text + prefill

    def reference(self, doc: dict) -> str:
        """Gold response text (after the pre-fill) used as the LoRA next-token-prediction target."""
        raise NotImplementedError

    # --------------------------------------------------------------- scoring
    def postprocess(self, doc: dict, completion: str) -> str:
        """The text that is scored (the completion itself unless a task says otherwise)."""
        return completion

    def score_one(self, doc: dict, completion: str) -> bool:
        raise NotImplementedError

    def score_batch(self, docs: Sequence[dict], completions: Sequence[str]) -> list[bool]:
        """One bool per (doc, completion); the evaluation metric and the RL reward (+1/-1) use it."""
        if len(docs) != len(completions):
            raise ValueError(f"{len(docs)} docs but {len(completions)} completions")
        return [bool(self.score_one(d, c)) for d, c in zip(docs, completions)]

    def describe(self) -> dict[str, Any]:
        """Key + options, for provenance."""
        return {"task": self.key, "options": dict(self.options)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r}, {self.options})"


def check_option(task: str, name: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        raise T2EvalError(f"task {task!r}: option {name}={value!r} is not one of {list(allowed)}")
    return value
