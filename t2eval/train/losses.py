"""The batched sequence losses shared by the SVF and LoRA trainers (REINFORCE and next-token prediction).

One function, `sequence_loss_backward`, computes for a batch of (prompt, completion) token lists

    loss = Σ_j [ −w_j · Σ_t log π(ŷ_jt | x_j, ŷ_j<t)  +  λ · k_j · Σ_t KL_t ]

over the completion tokens only, in padded micro-batches of similar lengths (left padding,
attention masks, explicit position ids; `_micro_batches` caps the padding), calling `backward()`
once per micro-batch so gradients accumulate in whatever leaves `forward` depends on (SVF: the
composed weights W′; LoRA: the adapter weights).

Inputs beyond the tokens (a vision-language model's images, issue 10): `extra_inputs(idx)` returns
the forward arguments of the sequences `idx` in that order (`backends.hf_vlm.ImageSequences`); the
micro-batcher calls it with each micro-batch's own (length-sorted) indices, so every row keeps its
image, and the KL reference forward gets the same arguments.

REINFORCE (PROTOCOL §3): w_j = r_j / B, k_j = 1 / B. Next-token prediction: w_j = 1 / (total
completion tokens), i.e. the mean token NLL of the batch. The KL is over the full vocabulary,
against `ref_forward` (the base model), per completion position:
  - "code"  (default, what the release computes with F.kl_div(policy_logp, ref_logp, log_target=True)):
    KL(π_W ‖ π_W′) = Σ_v π_W (log π_W − log π_W′)
  - "paper" (the paper's J(z)): KL(π_W′ ‖ π_W) = Σ_v π_W′ (log π_W′ − log π_W)

The loss inputs (`loss_inputs`): which prompt text each completion is scored after, and how it
becomes token ids (PROTOCOL §8):
  - `pg_code_prompt` (PG loss on the code tasks): "prefill_turn" (release) scores the completion
    after the pre-fill rendered as an assistant turn, "…@@ Response:\n```python" — one newline more
    than the sampling prompt "…@@ Response:```python" the rollout was generated from;
    "sampling_prompt" (corrected) scores it after the sampling prompt itself. Other tasks, and
    next-token prediction, always use the sampling prompt.
  - `bos`: prompts are tokenised with `t2eval.tokens.prompt_ids` ("double": the release's
    tokenizer default, a second BOS on chat prompts that start with one; "single": one BOS).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..backends.hf import completion_token_logits

KL_DIRECTIONS = ("code", "paper")
PG_CODE_PROMPTS = ("prefill_turn", "sampling_prompt")


def pg_prompt(task, tokenizer, doc: dict, sampling_prompt: str, family: str | None = None,
              pg_code_prompt: str = "prefill_turn") -> str:
    """The prompt text the PG loss scores a rollout's completion after (see the module doc)."""
    from ..constants import CODE_TASKS
    from ..errors import T2EvalError

    if pg_code_prompt not in PG_CODE_PROMPTS:
        raise T2EvalError(f"pg_code_prompt={pg_code_prompt!r}: use prefill_turn (the release) or sampling_prompt")
    if pg_code_prompt == "sampling_prompt" or getattr(task, "key", None) not in CODE_TASKS:
        return sampling_prompt
    from ..tasks.code import CODE_CHAT_TEMPLATE, CODE_CHAT_TEMPLATE_PROTOCOL

    if task.chat_template not in (CODE_CHAT_TEMPLATE, CODE_CHAT_TEMPLATE_PROTOCOL):
        raise T2EvalError(f"pg_code_prompt=prefill_turn needs the release's code template; task {task.key!r} "
                          f"renders with {task.options.get('template')!r}: use --pg-code-prompt sampling_prompt")
    msgs, prefill = task.messages(doc, family)
    # the release's training rendering: every assistant turn (the pre-fill too) is "@@ Response:\n" + text
    return tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": prefill}], tokenize=False,
                                         add_generation_prompt=False, chat_template=CODE_CHAT_TEMPLATE_PROTOCOL)


def loss_inputs(tokenizer, prompts: Sequence[str], completions: Sequence[str], *, bos: str,
                append_eos: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids) of the loss: `rollout.encode_completions` with the BOS rule `bos`."""
    from .rollout import encode_completions

    return encode_completions(tokenizer, prompts, completions, append_eos=append_eos, bos=bos)


def pg_weights(rewards: Sequence[float], batch_size: int | None = None) -> list[float]:
    """REINFORCE per-sequence weights r_j / B."""
    b = batch_size or len(rewards)
    return [float(r) / b for r in rewards]


def ntp_weights(completion_ids: Sequence[Sequence[int]]) -> list[float]:
    """Next-token-prediction weights: 1 / total completion tokens (mean token NLL)."""
    n = max(1, sum(len(c) for c in completion_ids))
    return [1.0 / n] * len(completion_ids)


MAX_PAD_FRAC = 0.25


def _micro_batches(lengths: Sequence[int], micro_batch: int, max_pad_frac: float = MAX_PAD_FRAC) -> list[list[int]]:
    """Indices grouped into micro-batches of at most `micro_batch` sequences, longest first.

    A micro-batch is also closed early when adding the next (shorter) sequence would make padding
    more than `max_pad_frac` of its padded tokens: with left padding every row costs as much as the
    longest, so mixing a 400-token and a 150-token sequence wastes more compute than batching saves
    (on CPUs, where a single sequence already fills the matrix units). The gradient does not depend
    on the grouping; only the cost does.
    """
    mb = max(1, int(micro_batch))
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        if cur:
            width = lengths[cur[0]]  # the longest of the group (sorted)
            padded = width * (len(cur) + 1)
            if len(cur) >= mb or (padded - real - lengths[i]) > max_pad_frac * padded:
                groups.append(cur)
                cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    if cur:
        groups.append(cur)
    return groups


def token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, direction: str = "code") -> torch.Tensor:
    """Full-vocabulary KL per position ([..., V] log-probs → [...])."""
    if direction == "code":
        return (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    if direction == "paper":
        return (logp.exp() * (logp - ref_logp)).sum(-1)
    raise ValueError(f"kl direction must be one of {KL_DIRECTIONS}, not {direction!r}")


def sequence_loss_backward(forward: Callable, prompt_ids: Sequence[Sequence[int]],
                           completion_ids: Sequence[Sequence[int]], weights: Sequence[float], *,
                           pad_id: int, micro_batch: int = 8, device="cpu", kl_coef: float = 0.0,
                           kl_weights: Sequence[float] | None = None, ref_forward: Callable | None = None,
                           kl_direction: str = "code", backward: bool = True,
                           max_pad_frac: float | None = None,
                           extra_inputs: Callable[[list[int]], dict] | None = None) -> dict[str, float]:
    """Accumulate the gradient of the loss above; returns {loss, pg_loss, kl, n_tokens}.

    `pg_loss` = −Σ_j w_j Σ_t log π; `kl` = Σ_j k_j Σ_t KL (before λ); `loss` = pg_loss + λ·kl.
    With `backward=False` nothing is differentiated (evaluation of the loss only). `extra_inputs`:
    sequence indices → further forward arguments of those rows (see the module doc).
    """
    if len(prompt_ids) != len(completion_ids) or len(prompt_ids) != len(weights):
        raise ValueError("prompt_ids, completion_ids and weights must have the same length")
    use_kl = kl_coef > 0
    if use_kl and ref_forward is None:
        raise ValueError("kl_coef > 0 needs ref_forward (the base model)")
    kw = list(kl_weights) if kl_weights is not None else [1.0 / max(1, len(prompt_ids))] * len(prompt_ids)
    total = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "n_tokens": 0}
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    pad_frac = MAX_PAD_FRAC if max_pad_frac is None else max_pad_frac
    for idx in _micro_batches(lengths, micro_batch, pad_frac):
        comps = [completion_ids[i] for i in idx]
        if not any(comps):
            continue
        prompts = [prompt_ids[i] for i in idx]
        extra = extra_inputs(idx) if extra_inputs is not None else {}
        ctx = torch.enable_grad() if backward else torch.no_grad()
        with ctx:
            # logits of the real completion tokens only, packed [N, V]; rows[n] = sequence of token n
            logits, targets, rows = completion_token_logits(forward, prompts, comps, pad_id, device, **extra)
            logits = logits.float()
            w = torch.tensor([weights[i] for i in idx], dtype=logits.dtype, device=logits.device)[rows]
            if use_kl:
                logp = torch.log_softmax(logits, dim=-1)
                tok = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            else:  # log π(y) = logit_y − logsumexp: no [N, V] log-softmax tensor kept for backward
                tok = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            pg = -(tok * w).sum()
            loss = pg
            kl = torch.zeros((), dtype=logits.dtype, device=logits.device)
            if use_kl:
                with torch.no_grad():
                    ref_logits, _, _ = completion_token_logits(ref_forward, prompts, comps, pad_id, device, **extra)
                    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
                kwt = torch.tensor([kw[i] for i in idx], dtype=logits.dtype, device=logits.device)[rows]
                kl = (token_kl(logp, ref_logp, kl_direction) * kwt).sum()
                loss = loss + kl_coef * kl
            if backward and loss.requires_grad:
                loss.backward()
        total["loss"] += float(loss.detach())
        total["pg_loss"] += float(pg.detach())
        total["kl"] += float(kl.detach())
        total["n_tokens"] += int(targets.numel())
    return total
