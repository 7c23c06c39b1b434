"""Batched rollouts and split evaluation with any backend (HF or vLLM), scored by the task itself.

A rollout renders the task's prompts, generates with the backend (greedy unless a temperature is
given), scores the completions with `task.score_batch` (the evaluation's own scorer) and turns
correctness into rewards (+1 / -1); a split's accuracy is `rollout(...).accuracy`.
`encode_completions` turns (prompt, completion) texts into the token ids the policy-gradient forward scores.

Image tasks (`ImageTask`, issue 10: the VQA tasks on a vision-language model) plug into the same
rollout: each doc's image (`doc_image`) goes to the backend with its prompt
(`backends.hf_vlm.HFVLMBackend`, or `backends.vllm.VLLMBackend` where vLLM can load the model), the metric is the task's graded score (VQA accuracy, 0..1, its mean
the split's accuracy), and the reward is the task's own `reward(doc, completion)` (binary: +1 if the
accuracy is > 0 else −0.1). The rollout keeps the images for the loss (`Rollout.images`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from ..errors import T2EvalError


@runtime_checkable
class ImageTask(Protocol):
    """What the training loop needs of a vision-language task (besides `key` and `gen_kwargs`).

    `modality = "image"` marks it. `docs` rows carry ``"image"``: a PIL image or a path (a task whose
    paths are relative defines `image(doc)` → PIL image, which `doc_image` prefers). `prompt` holds the
    processor's image token exactly once. `accuracy_batch` returns the graded metric per doc (VQA
    accuracy, 0..1; `t2eval.tasks.vqa_tasks`); `reward` the RL reward of one completion."""

    modality: str

    def docs(self, split: str, data_dir=None) -> list[dict]: ...

    def prompt(self, tokenizer, doc: dict, family: str | None = None) -> str: ...

    def accuracy_batch(self, docs: Sequence[dict], completions: Sequence[str]) -> list[float]: ...

    def reward(self, doc: dict, completion: str) -> float: ...


def is_image_task(task) -> bool:
    return getattr(task, "modality", "text") == "image"


def doc_image(task, doc: dict) -> Any:
    """The image of `doc`: `task.image(doc)` where the task defines it, else ``doc["image"]``."""
    get = getattr(task, "image", None)
    if callable(get):
        return get(doc)
    if doc.get("image") is None:
        raise T2EvalError(f"task {getattr(task, 'key', task)!r}: doc {doc.get('doc_id', doc.get('question_id'))!r} "
                          "has no image")
    return doc["image"]


@dataclass
class Rollout:
    docs: list[dict]
    prompts: list[str]
    completions: list[str]
    n_tokens: list[int]
    correct: list[bool]
    seconds: float = 0.0
    rewards: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # the metric per doc (text tasks: 0/1; VQA: accuracy)
    images: list | None = None  # image tasks: each doc's image, in doc order

    @property
    def accuracy(self) -> float:
        if self.scores:
            return sum(self.scores) / len(self.scores)
        return sum(self.correct) / len(self.correct) if self.correct else 0.0


def render_prompts(task, tokenizer, docs: Sequence[dict], family: str | None = None) -> list[str]:
    return [task.prompt(tokenizer, d, family) for d in docs]


def rollout(backend, task, docs: Sequence[dict], *, family: str | None = None, max_new_tokens: int | None = None,
            temperature: float = 0.0, seed: int | None = None, reward_correct: float = 1.0,
            reward_wrong: float = -1.0) -> Rollout:
    """Generate one completion per doc with `backend`, score it, and attach rewards: ±1 (`reward_correct`,
    `reward_wrong`) from the task's scorer, or an image task's own `reward` (with its image per prompt)."""
    t0 = time.perf_counter()
    docs = list(docs)
    gk = dict(task.gen_kwargs)
    prompts = render_prompts(task, backend.tokenizer, docs, family)
    images = [doc_image(task, d) for d in docs] if is_image_task(task) else None
    gens = backend.generate(prompts, max_new_tokens=max_new_tokens or gk.get("max_new_tokens", 512),
                            stop=gk.get("stop"), temperature=temperature, seed=seed,
                            **({"images": images} if images is not None else {}))
    completions = [g.text for g in gens]
    if images is not None:  # the graded metric (VQA accuracy)
        scores = [float(s) for s in task.accuracy_batch(docs, completions)]
    else:  # text tasks: 0/1
        scores = [float(bool(s)) for s in task.score_batch(docs, completions)]
    correct = [s > 0 for s in scores]
    rewards = ([float(task.reward(d, c)) for d, c in zip(docs, completions)] if images is not None
               else [reward_correct if c else reward_wrong for c in correct])
    return Rollout(docs=docs, prompts=prompts, completions=completions, n_tokens=[g.n_tokens for g in gens],
                   correct=correct, seconds=time.perf_counter() - t0, rewards=rewards, scores=scores,
                   images=images)


def encode_completions(tokenizer, prompts: Sequence[str], completions: Sequence[str],
                       append_eos: bool = False, bos: str | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids) per pair.

    The prompt is tokenised alone with the BOS rule `bos` (`t2eval.tokens.prompt_ids`; None: the
    protocol's, `tokens.bos_mode()`) and the completion is the remainder of tokenising prompt +
    completion the same way, as in the code release; when that tokenisation does not extend the
    prompt's (a merge across the boundary), the completion is tokenised on its own.
    """
    from ..tokens import bos_mode, prompt_ids

    bos = bos or bos_mode()
    p_ids, c_ids = [], []
    for p, c in zip(prompts, completions):
        pi = prompt_ids(tokenizer, p, bos)
        full = prompt_ids(tokenizer, p + c, bos)
        ci = full[len(pi):] if full[:len(pi)] == pi else tokenizer(c, add_special_tokens=False)["input_ids"]
        if append_eos and tokenizer.eos_token_id is not None:
            ci = ci + [tokenizer.eos_token_id]
        p_ids.append(pi)
        c_ids.append(ci)
    return p_ids, c_ids
