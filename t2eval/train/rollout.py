"""Batched rollouts and split evaluation with any backend (HF or vLLM), scored by the task itself.

A rollout renders the task's prompts, generates with the backend (greedy unless a temperature is
given), scores the completions with `task.score_batch` (the evaluation's own scorer) and turns
correctness into rewards (+1 / -1); a split's accuracy is `rollout(...).accuracy`.
`encode_completions` turns (prompt, completion) texts into the token ids the policy-gradient forward scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Rollout:
    docs: list[dict]
    prompts: list[str]
    completions: list[str]
    n_tokens: list[int]
    correct: list[bool]
    seconds: float = 0.0
    rewards: list[float] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0


def render_prompts(task, tokenizer, docs: Sequence[dict], family: str | None = None) -> list[str]:
    return [task.prompt(tokenizer, d, family) for d in docs]


def rollout(backend, task, docs: Sequence[dict], *, family: str | None = None, max_new_tokens: int | None = None,
            temperature: float = 0.0, seed: int | None = None, reward_correct: float = 1.0,
            reward_wrong: float = -1.0) -> Rollout:
    """Generate one completion per doc with `backend`, score it, and attach ±1 rewards."""
    t0 = time.perf_counter()
    docs = list(docs)
    gk = dict(task.gen_kwargs)
    prompts = render_prompts(task, backend.tokenizer, docs, family)
    gens = backend.generate(prompts, max_new_tokens=max_new_tokens or gk.get("max_new_tokens", 512),
                            stop=gk.get("stop"), temperature=temperature, seed=seed)
    completions = [g.text for g in gens]
    correct = [bool(c) for c in task.score_batch(docs, completions)]
    return Rollout(docs=docs, prompts=prompts, completions=completions, n_tokens=[g.n_tokens for g in gens],
                   correct=correct, seconds=time.perf_counter() - t0,
                   rewards=[reward_correct if c else reward_wrong for c in correct])


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
