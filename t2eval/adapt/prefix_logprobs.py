"""Next-token log-probabilities for many prompts that share a long prefix, prefilling it once.

The first pass of Transformer² (PROTOCOL §6) classifies every question with the same classification
system prompt (~220 tokens for SmolLM2's template) followed by the question (often far shorter). A
plain batched forward re-encodes that system prompt for every question; here the longest common
token prefix of the batch is encoded once, its key/value cache is copied to each micro-batch, and only
the per-question suffixes are run (left-padded behind the prefix, the padding masked out, and only the
last position's logits computed). Same numbers as the plain forward up to
float rounding (tested), a fraction of the compute when the prefix dominates.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from ..backends.hf import left_pad


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all sequences."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


@torch.no_grad()
def _plain(model, ids: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """Left-padded batched forward; log-softmax of the last position per row."""
    x, mask, pos = left_pad(ids, pad_id, device)
    logits = model(input_ids=x, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
    return torch.log_softmax(logits[:, -1, :].float(), dim=-1).cpu()


@torch.no_grad()
def _with_prefix(model, cache, plen: int, suffixes: list[list[int]], pad_id: int, device) -> torch.Tensor:
    # suffixes left-padded after the cached prefix (the padding is masked out and the positions keep
    # counting from the prefix), so every row ends at the last column: only that column's logits
    x, smask, _ = left_pad(suffixes, pad_id, device)
    n = x.shape[0]
    mask = torch.cat([torch.ones((n, plen), dtype=smask.dtype, device=smask.device), smask], dim=1)
    pos = (mask.cumsum(-1) - 1)[:, plen:].clamp(min=plen)
    kv = copy.deepcopy(cache)
    if n > 1:
        kv.batch_repeat_interleave(n)
    logits = model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=kv, use_cache=True,
                   logits_to_keep=1).logits
    return torch.log_softmax(logits[:, -1, :].float(), dim=-1).cpu()


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: Sequence[str], batch_size: int = 8, device="cpu",
                        min_prefix: int = 16, bos: str | None = None) -> list[torch.Tensor]:
    """log p(next token | prompt) for each prompt (a vocabulary-sized row each), in order.

    When the prompts share at least `min_prefix` leading tokens, that prefix is encoded once and its
    cache reused (each prompt keeps at least one token of its own, whose logits are the answer);
    otherwise a plain left-padded batched forward is used. Micro-batches are formed over prompts
    sorted by length to limit padding. `bos` (double | single): the protocol's BOS rule
    (`t2eval.tokens.prompt_ids`); None: the prompt's own tokens, no BOS added.
    """
    if not prompts:
        return []
    if bos is None:
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    else:
        from ..tokens import prompt_ids

        ids = [prompt_ids(tokenizer, p, bos) for p in prompts]
    if any(len(s) == 0 for s in ids):
        raise ValueError("next_token_logprobs: an empty prompt has no next-token distribution")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    plen = min(common_prefix_len(ids), min(len(s) for s in ids) - 1)
    bs = max(1, int(batch_size))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[torch.Tensor | None] = [None] * len(ids)
    cache = None
    if plen >= min_prefix:
        pre = model(input_ids=torch.tensor([ids[0][:plen]], device=device), use_cache=True)
        cache = pre.past_key_values
    for k in range(0, len(order), bs):
        chunk = order[k:k + bs]
        if cache is not None:
            rows = _with_prefix(model, cache, plen, [ids[i][plen:] for i in chunk], pad_id, device)
        else:
            rows = _plain(model, [ids[i] for i in chunk], pad_id, device)
        for i, row in zip(chunk, rows):
            out[i] = row
    return out  # type: ignore[return-value]
