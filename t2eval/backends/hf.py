"""Hugging Face transformers backend: batched generation, log-likelihoods and in-place SVF scales.

Batches are LEFT-padded with explicit position ids, so a prompt generates the same greedy text
alone or in a batch. Texts are cut at the first stop string. The same packing helpers
(`left_pad`, `completion_logits`, `completion_token_logits`) serve the trainers' batched
policy-gradient forward.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..errors import T2EvalError
from .base import Generation, svd_of


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: str | torch.device = "cpu"):
    """(input_ids, attention_mask, position_ids) for a left-padded batch of token id lists."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, n - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, n - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def completion_logits(forward: Callable, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                      pad_id: int, device="cpu", **inputs):
    """Logits predicting each completion token, for a batch of (prompt, completion) id lists.

    `forward(input_ids=, attention_mask=, position_ids=, logits_to_keep=)` is a causal LM call
    (a model, a peft model, or `torch.func.functional_call` around one). Returns
    (logits [B, C, V], targets [B, C], mask [B, C]) with C = the longest completion; completions
    are right-aligned (left padding), so only the last C+1 positions need logits. `inputs`: further
    forward arguments of the batch's rows, in row order (a vision-language model's pixel_values and
    image_sizes, `hf_vlm.image_batch`).
    """
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    ids, mask, pos = left_pad(seqs, pad_id, device)
    c_max = max(len(c) for c in completions)
    if c_max == 0:
        b = len(seqs)
        return (torch.zeros(b, 0, 1, device=device), torch.zeros(b, 0, dtype=torch.long, device=device),
                torch.zeros(b, 0, dtype=torch.bool, device=device))
    out = forward(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=c_max + 1, **inputs)
    logits = out.logits[:, -(c_max + 1):-1]  # position t predicts token t+1
    targets = ids[:, -c_max:]
    cmask = torch.zeros_like(targets, dtype=torch.bool)
    for i, c in enumerate(completions):
        if len(c):
            cmask[i, c_max - len(c):] = True
    return logits, targets, cmask


def output_head(forward):
    """The LM head (`get_output_embeddings()`) of a model, a peft model or a wrapper holding `.model`."""
    for obj in (forward, getattr(forward, "model", None)):
        get = getattr(obj, "get_output_embeddings", None) if obj is not None else None
        if callable(get):
            head = get()
            if head is not None:
                return head
    return None


def completion_token_logits(forward: Callable, prompts: Sequence[Sequence[int]],
                            completions: Sequence[Sequence[int]], pad_id: int, device="cpu", **inputs):
    """Logits of the real completion tokens only, packed: (logits [N, V], targets [N], rows [N]).

    One left-padded forward for the body; the LM head then runs on the N = Σ_j |completion_j|
    positions that predict a completion token, not on the C_max per row that `completion_logits`
    needs (bench_svf_step's batch, completions of 64–256 tokens: 2164 instead of 2904 head
    positions with micro-batches of 4, 3344 with 8). The head is applied to the final (normed) hidden state; if that does not
    reproduce the model's own logits (a model that post-processes them, e.g. soft-capping), this
    falls back to `completion_logits`. `inputs`: further forward arguments, as in `completion_logits`.
    """
    head = output_head(forward)
    lens = [len(c) for c in completions]
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    ids, mask, pos = left_pad(seqs, pad_id, device)
    width = ids.shape[1]
    rows = torch.tensor([i for i, n in enumerate(lens) for _ in range(n)], dtype=torch.long, device=ids.device)
    cols = torch.tensor([width - n - 1 + t for n in lens for t in range(n)], dtype=torch.long, device=ids.device)
    targets = ids[rows, cols + 1]
    if head is not None and rows.numel():
        out = forward(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1,
                      output_hidden_states=True, **inputs)
        hs = getattr(out, "hidden_states", None)
        if hs:
            h = hs[-1]
            with torch.no_grad():
                same = torch.allclose(head(h[:, -1:]).float(), out.logits[:, -1:].float(), rtol=1e-4, atol=1e-4)
            if same:
                return head(h[rows, cols]), targets, rows
    logits, tgt, cmask = completion_logits(forward, prompts, completions, pad_id, device, **inputs)
    return logits[cmask], tgt[cmask], rows


def cut_at_stop(text: str, stop: Sequence[str] | None) -> tuple[str, bool]:
    """Text before the earliest occurrence of any stop string, and whether one was found."""
    cut = len(text)
    for s in stop or ():
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut], cut < len(text)


def stop_criteria(tokenizer, prompt_len: int, stop: Sequence[str]):
    """A StoppingCriteria flagging each sequence whose generated text contains a stop string.

    (transformers' own `stop_strings` pre-processes the whole vocabulary on every call, seconds
    each time; this one decodes only the tail of the generated tokens at each step.)
    """
    from transformers import StoppingCriteria

    stops = [s for s in stop if s]
    tail = max(len(s) for s in stops) + 4  # a token decodes to ≥ 1 character

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            gen = input_ids[:, prompt_len:]
            done = [any(s in tokenizer.decode(row[-tail:], skip_special_tokens=True) for s in stops)
                    for row in gen.tolist()]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return _Stop()


class HFScaleSwapper:
    """`base.ScaleSwapper` for a transformers model: W′ written into the parameters in place
    (`t2eval.svf.SVFPatcher`, created on the first swap), originals restored bit-exactly.

    `svd`: an SVD cache (path or loaded), or a callable returning one (read at the first swap);
    `missing_svd`: the error message when there is none."""

    def __init__(self, model, svd, missing_svd: str = "SVF scales need the SVD of the model's weights: "
                 "pass svd=<cache path> (written by `t2eval decompose`)"):
        self.model, self.svd, self.missing_svd = model, svd, missing_svd
        self._patcher = None

    def set_scales(self, scales: Mapping[str, torch.Tensor] | None) -> float:
        t0 = time.perf_counter()
        if scales is None:
            if self._patcher is not None:
                self._patcher.restore()
            return time.perf_counter() - t0
        if self._patcher is None:
            svd = svd_of(self.svd)
            if svd is None:
                raise T2EvalError(self.missing_svd)
            from ..svf import SVFPatcher

            self._patcher = SVFPatcher(self.model, svd)
        self._patcher.apply(scales)
        return time.perf_counter() - t0

    def close(self) -> None:
        if self._patcher is not None:
            self._patcher.restore()
        self._patcher = None


class HFBackend:
    """`Backend` over a transformers causal LM (see backends/base.py)."""

    name = "hf"

    def __init__(self, model_dir: str | Path | None = None, dtype: str = "float32", device: str = "cpu",
                 svd=None, *, model=None, tokenizer=None, batch_size: int = 16, bos: str | None = None):
        """Load `model_dir` (or wrap an already loaded `model` + `tokenizer`).

        `svd`: an SVD cache (path or loaded object, see t2eval.svd) for `set_scales`.
        `bos`: the BOS rule of prompts (double | single, `t2eval.tokens`; None: the protocol's knob).
        """
        from ..tokens import bos_mode

        from transformers import AutoTokenizer

        from ..models.loading import load_model

        if model is None:
            if model_dir is None:
                raise T2EvalError("HFBackend needs a model directory (or a loaded model)")
            model = load_model(str(model_dir), dtype=dtype, device=device)
        if tokenizer is None:
            if model_dir is None:
                raise T2EvalError("HFBackend needs a tokenizer when given a loaded model without model_dir")
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.bos = bos or bos_mode()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.svd = svd
        self.swapper = HFScaleSwapper(model, svd, "set_scales needs the SVD of the model's weights: pass "
                                      "svd=<cache path> (written by `t2eval decompose`) to HFBackend")
        gc = getattr(model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])

    # -- tokenisation ---------------------------------------------------------------------------
    def encode(self, text: str, prompt: bool = True) -> list[int]:
        """Token ids of a fully rendered prompt, BOS by the protocol's rule (`t2eval.tokens.prompt_ids`);
        prompt=False: a continuation (no special tokens)."""
        if not prompt:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        from ..tokens import prompt_ids

        return prompt_ids(self.tokenizer, text, self.bos)

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] | None = None,
                 temperature: float = 0.0, seed: int | None = None, **inputs) -> list[Generation]:
        """`inputs`: per-prompt inputs beyond the text (`hf_vlm.HFVLMBackend`: images=); none here."""
        encoded, extra = self._prepare(prompts, **inputs)
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths together
        results: list[Generation | None] = [None] * len(prompts)
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng, torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                outs = self._generate_batch([encoded[i] for i in idx], max_new_tokens, stop, temperature,
                                            **(extra(idx) if extra is not None else {}))
                for i, g in zip(idx, outs):
                    results[i] = g
        return results  # type: ignore[return-value]

    def _prepare(self, prompts: Sequence[str], **inputs):
        """(token ids per prompt, None | a function of a batch's prompt indices → its further forward arguments)."""
        if inputs:
            raise T2EvalError(f"the text backend takes no {', '.join(sorted(inputs))}: a vision-language model "
                              "generates with hf_vlm.HFVLMBackend")
        return [self.encode(p) for p in prompts], None

    def _generate_batch(self, encoded, max_new_tokens, stop, temperature, **inputs) -> list[Generation]:
        from transformers import GenerationConfig

        pad = self.tokenizer.pad_token_id
        ids, mask, _ = left_pad(encoded, pad, self.device)
        sample = temperature > 0
        from transformers import StoppingCriteriaList

        cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=pad,
                               eos_token_id=sorted(self.eos_ids),
                               temperature=temperature if sample else None, top_p=None, top_k=None)
        crit = StoppingCriteriaList([stop_criteria(self.tokenizer, ids.shape[1], stop)] if stop and any(stop) else [])
        out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                                  stopping_criteria=crit, **inputs)
        gens = []
        for row in out[:, ids.shape[1]:].tolist():
            end = next((k for k, t in enumerate(row) if t in self.eos_ids), None)
            toks = row if end is None else row[:end]
            full = self.tokenizer.decode(toks, skip_special_tokens=True)
            text, stopped = cut_at_stop(full, stop)
            # a sequence stopped by a stop string is padded (pad == eos here) but generated no eos
            n = len(toks) + (1 if end is not None and not stopped else 0)
            gens.append(Generation(text=text, n_tokens=n, token_ids=row[:n]))
        return gens

    # -- scoring --------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        res: list[tuple[float, bool]] = []
        with torch.no_grad():
            for start in range(0, len(requests), self.batch_size):
                chunk = requests[start:start + self.batch_size]
                ctx = [self.encode(c) for c, _ in chunk]
                cont = [self.encode(x, prompt=False) for _, x in chunk]
                logits, targets, cmask = completion_logits(self.model, ctx, cont, self.tokenizer.pad_token_id,
                                                           self.device)
                if logits.shape[1] == 0:
                    res.extend((0.0, True) for _ in chunk)
                    continue
                lp = torch.log_softmax(logits.float(), -1)
                tok_lp = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                greedy = (lp.argmax(-1) == targets) | ~cmask
                for i in range(len(chunk)):
                    res.append((float(tok_lp[i][cmask[i]].sum()), bool(greedy[i].all())))
        return res

    # -- SVF ------------------------------------------------------------------------------------
    def set_scales(self, scales: Mapping[str, torch.Tensor] | None) -> float:
        return self.swapper.set_scales(scales)

    def close(self) -> None:
        self.swapper.close()
