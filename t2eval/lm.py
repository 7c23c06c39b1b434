"""The lm-eval model `t2`: base / LoRA / SVF / Transformer² two-pass self-adaptation, with timing.

    lm_eval --model t2 --model_args pretrained=smollm2-135m,strategy=prompt,svd=svd/x.safetensors,\
        expert_math=experts/.../gsm8k,expert_code=...,expert_reasoning=... --tasks t2_math --apply_chat_template

(lm-eval 0.4.13 cannot discover plugin models by itself: see `t2eval.lm_eval_plugin`.)
A vision-language checkpoint (config.json with a vision_config) gets the multimodal flavour
`t2eval.vlm_lm.T2VLM` (base / svf / lora; tasks t2_textvqa, t2_okvqa, t2_synth_textvqa), with backend=vllm
`t2eval.backends.vllm_vlm_lm.T2VLLMVLM` (needs torchvision: GPU stacks).

model_args
  pretrained     registry key or HF directory (t2eval.models.resolve_model_dir)
  backend        hf (lm-eval HFLM) | vllm (t2eval.backends.vllm_lm.T2VLLM: lm-eval VLLM + scale swaps)
  adapter        none | svf:PATH | lora:PATH (peft on HF, LoRARequest on vLLM); strategy=none only
  strategy       none | prompt | cls | fewshot (the registered strategies, t2eval.adapt.strategies)
  experts        math:P;code:P;reasoning:P  (lm-eval splits model_args on ",", so use ";" there,
                 or expert_math=P,expert_code=P,expert_reasoning=P, or JSON model_args)
  cls_expert     PATH (strategy=cls)          alpha   PATH of alpha.json (strategy=fewshot)
  svd            PATH of the SVD cache         dispatch generate | logprob
  param          code | paper (default: the expert's own)    shuffle_sigma  seed (Table 5 σ shuffle) | none
  cross_model    true: allow experts trained on another base model (Table 5 transfer)
  protocol       release | corrected (default: $T2EVAL_PROTOCOL, else release; t2eval.protocol)
  protocol_overrides  JSON object of individual knob values, e.g. {"dispatch_other": "base"}
  dtype, batch_size, device, and any HFLM / VLLM argument.

Two passes (PROTOCOL §6), per task and per request type: the first pass dispatches every document
of the task in one batch (Prompt: base weights; Cls: cls expert loaded; dispatch=logprob scores the
category labels in one forward pass instead of generating); requests are then grouped by chosen
expert, each group answered with its expert's scales loaded ("other" → base weights), and results
returned in the original order. The protocol decides how the first pass is rendered
(`dispatch_template`: the task's own template and budget, or the chat template), what answers
questions classed "other" (`dispatch_other`: the release's last expert loaded in the order code,
math, reasoning, or the base weights) and the BOS rule of every prompt (`bos`, `t2eval.tokens`).
The SVD cache is checked against the model (`svd.check_svd_for_model`) and every expert against the
cache (`svf.check_compatible`, refused across models unless cross_model=true) before anything runs.
Few-shot loads the α-mixture once. `lm.t2_records[task]` holds
first_pass_s, second_pass_s, swap_s, tokens_first, tokens_second and per-document dispatch rows.
What differs between strategies (two passes or one, validation, the scales held for the run, the
first pass, backend kwargs) is the strategy object's (`lm.t2_strategy`); this module only runs
the passes. Weights change through `lm.t2_swapper` (`t2eval.backends.base.ScaleSwapper`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .adapt import dispatch as dsp
from .adapt import strategies
from .adapt.experts import ExpertBank, parse_experts
from . import protocol as proto
from .constants import EXPERT_NAMES, RELEASE_DISPATCH_ORDER, TASK_KEYS, VLM_TASKS
from .errors import T2EvalError
from .tokens import prompt_ids


def true_task(task_name: str | None) -> str:
    """Protocol task key of an lm-eval task name (`t2_math_fewshot_test` → `math`; stock names unchanged)."""
    t = task_name or "unknown"
    if not t.startswith("t2_"):
        return t
    key = t[3:]
    return next((k for k in sorted(TASK_KEYS + VLM_TASKS, key=len, reverse=True)
                 if key == k or key.startswith(k + "_")), key)


def family_of_task(task_name: str | None) -> str | None:
    """The model family of a family-specific t2 task YAML (`t2_arc_challenge_llama3` → llama3), else None."""
    t = task_name or ""
    if not t.startswith("t2_"):
        return None
    from .config import model_registry

    fams = {s.family for s in model_registry().values() if getattr(s, "family", None)}
    return next((f for f in sorted(fams) if t.endswith("_" + f)), None)


def answering_order(chosen: set[str], dispatch_other: str) -> list[str]:
    """The expert groups of the second pass in the order they are answered: the release's loop
    (`constants.RELEASE_DISPATCH_ORDER`, then "other"), anything else after it."""
    order = [*RELEASE_DISPATCH_ORDER, "other"]
    return [g for g in order if g in chosen] + sorted(g for g in chosen if g not in order)


def other_expert(experts: dict[str, str], dispatch_other: str) -> str | None:
    """The expert path that answers questions classed "other": dispatch_other=base → None (base
    weights); last_expert (the release) → the last expert its loop loaded. The release loops over
    code, math, reasoning, other, loading an expert whenever its path is set -- before it selects
    that category's questions, so also for an empty group -- and "other" has no path: it keeps the
    last one loaded, i.e. the last of RELEASE_DISPATCH_ORDER with a path (reasoning when all three are
    given), whatever the first pass chose."""
    if dispatch_other == "base":
        return None
    if dispatch_other != "last_expert":
        raise T2EvalError(f"dispatch_other={dispatch_other!r}: use last_expert (the release) or base (corrected)")
    paths = [experts[e] for e in RELEASE_DISPATCH_ORDER if experts.get(e)]
    return paths[-1] if paths else None


@dataclass
class T2Config:
    adapter: str = "none"
    strategy: str = "none"
    experts: dict[str, str] = field(default_factory=dict)
    cls_expert: str | None = None
    alpha: str | None = None
    svd: str | None = None
    dispatch: str = "generate"
    param: str | None = None
    shuffle_sigma: int | None = None
    cross_model: bool = False
    cls_max_new_tokens: int | None = None
    protocol: str = proto.DEFAULT
    protocol_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, kw: dict[str, Any]) -> "T2Config":
        experts = parse_experts(kw.pop("experts", None))
        for n in EXPERT_NAMES:
            v = kw.pop(f"expert_{n}", None)
            if v:
                experts[n] = str(v)
        none = lambda v: None if v in (None, "", "none", "None") else v  # noqa: E731
        c = cls(adapter=str(kw.pop("adapter", "none") or "none"), strategy=str(kw.pop("strategy", "none") or "none"),
                experts=experts, cls_expert=none(kw.pop("cls_expert", None)), alpha=none(kw.pop("alpha", None)),
                svd=none(kw.pop("svd", None)), dispatch=str(kw.pop("dispatch", "generate")),
                param=none(kw.pop("param", None)), shuffle_sigma=none(kw.pop("shuffle_sigma", None)),
                cross_model=str(kw.pop("cross_model", False)).lower() in ("1", "true", "yes"),
                cls_max_new_tokens=none(kw.pop("cls_max_new_tokens", None)),
                protocol=proto.check(none(kw.pop("protocol", None)) or proto.default_protocol()),
                protocol_overrides=(_overrides(kw.pop("protocol_overrides")) if "protocol_overrides" in kw
                                    else proto.env_overrides()))
        proto.settings(c.protocol, c.protocol_overrides)  # unknown knobs fail here
        c.validate()
        return c

    @property
    def knobs(self) -> dict[str, Any]:
        """Every protocol knob's value for this run."""
        return proto.settings(self.protocol, self.protocol_overrides)

    def validate(self) -> "strategies.Strategy":
        """Check the arguments (the strategy's own checks included); returns the strategy object."""
        return strategies.strategy_for(self)

    @property
    def adapter_kind(self) -> str:
        return self.adapter.split(":", 1)[0]

    @property
    def adapter_path(self) -> str | None:
        return self.adapter.split(":", 1)[1] if ":" in self.adapter else None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _overrides(value) -> dict[str, Any]:
    """protocol_overrides= as a dict (a JSON object, or a dict from JSON model_args)."""
    if value in (None, "", "none", "None"):
        return {}
    if isinstance(value, dict):
        return dict(value)
    import json

    try:
        d = json.loads(str(value))
    except json.JSONDecodeError as e:
        raise T2EvalError(f"protocol_overrides={value!r} is not a JSON object of knob values: {e}") from None
    if not isinstance(d, dict):
        raise T2EvalError(f"protocol_overrides={value!r}: give a JSON object, e.g. {{\"bos\": \"single\"}}")
    return d


class TwoPassMixin:
    """Shared by the HF and vLLM flavours; the flavour supplies `t2_swapper` (a
    `t2eval.backends.base.ScaleSwapper`) and generation. What differs between strategies is the
    strategy object's (`self.t2_strategy`, from `t2eval.adapt.strategies`)."""

    t2: T2Config
    t2_records: dict[str, dict[str, Any]]
    t2_swapper: Any

    # -- set-up --------------------------------------------------------------------------------
    def _t2_setup(self, cfg: T2Config) -> None:
        self.t2 = cfg
        self.t2_strategy = cfg.validate()
        self.t2_records = {}
        self.t2_knobs = cfg.knobs
        self.t2_first_pass_render = None
        self.t2_bank = ExpertBank(cfg.svd, cfg.param, cfg.shuffle_sigma, cfg.cross_model)
        self._t2_check_files()
        self.t2_setup_s = 0.0
        # scales held for the whole run (svf adapter / few-shot mixture)
        self.t2_fixed = self.t2_strategy.setup(self.t2_bank)
        if self.t2_fixed is not None:
            self.t2_setup_s = self._t2_set_scales(self.t2_fixed)

    def _t2_check_files(self) -> None:
        """Fail before any evaluation: the SVD cache must come from this model (StaleCacheError),
        and every expert must fit the cache and, unless cross_model=true, come from this model."""
        cfg = self.t2
        if cfg.svd:
            from .svd import check_svd_for_model

            check_svd_for_model(cfg.svd if isinstance(cfg.svd, str) else self.t2_bank.svd, self.t2_pretrained_dir)
        if cfg.svd or self.t2_strategy.uses_svf:
            paths = list(cfg.experts.values()) + [cfg.cls_expert] if self.t2_strategy.uses_svf else []
            for p in paths:
                if p:
                    self.t2_bank.scales(p)  # svf.check_compatible: shapes, names, base model

    def _t2_set_scales(self, scales) -> float:
        """W' = U diag(σ ⊙ s) Vᵀ for the named matrices (None: base weights); seconds spent."""
        return self.t2_swapper.set_scales(scales)

    @property
    def _t2_base(self):
        return super(TwoPassMixin, self)

    # -- backend-neutral helpers ----------------------------------------------------------------
    def _t2_generate(self, prompts: list[str], gen_kwargs: dict) -> list[str]:
        reqs = [Instance("generate_until", {}, (p, dict(gen_kwargs)), i) for i, p in enumerate(prompts)]
        return self._t2_base.generate_until(reqs, disable_tqdm=True)

    def _t2_score(self, pairs: list[tuple[str, str]]) -> list[float]:
        reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
        return [lp for lp, _ in self._t2_base.loglikelihood(reqs, disable_tqdm=True)]

    @property
    def t2_bos(self) -> str:
        """The BOS rule of this run (protocol knob `bos`; `t2eval.tokens.prompt_ids`)."""
        return self.t2_knobs["bos"] if hasattr(self, "t2_knobs") else proto.value("bos")

    def _t2_ntokens(self, texts) -> int:
        return sum(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts if t)

    # -- lm-eval entry points --------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._t2_run("generate_until", requests, disable_tqdm)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._t2_run("loglikelihood", requests, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._t2_run("loglikelihood_rolling", requests, disable_tqdm)

    def _t2_run(self, kind: str, requests, disable_tqdm: bool):
        by_task: OrderedDict[str, list[int]] = OrderedDict()
        for i, r in enumerate(requests):
            by_task.setdefault(r.task_name or "unknown", []).append(i)
        out: list[Any] = [None] * len(requests)
        for task, idxs in by_task.items():
            res = self._t2_task(kind, task, [requests[i] for i in idxs], disable_tqdm)
            for i, r in zip(idxs, res):
                out[i] = r
        return out

    def _t2_record(self, task: str) -> dict[str, Any]:
        two = self.t2_strategy.two_pass
        return self.t2_records.setdefault(task, {
            "true_task": true_task(task), "strategy": self.t2.strategy,
            "dispatch_mode": self.t2_strategy.dispatch_mode,
            "first_pass_s": 0.0 if two else None,
            "second_pass_s": 0.0, "swap_s": 0.0, "setup_swap_s": self.t2_setup_s,
            "tokens_first": 0 if two else None,
            "tokens_second": 0, "prompt_tokens_first": 0, "requests": 0, "groups": {}, "dispatch": []})

    def _t2_answer(self, kind: str, reqs, disable_tqdm: bool, rec: dict) -> list:
        t0 = time.perf_counter()
        res = getattr(self._t2_base, kind)(reqs, disable_tqdm=disable_tqdm)
        rec["second_pass_s"] += time.perf_counter() - t0
        if kind == "generate_until":
            rec["tokens_second"] += self._t2_ntokens(res)
        elif kind == "loglikelihood":
            rec["tokens_second"] += self._t2_ntokens([r.args[1] for r in reqs])
        return res

    def _t2_task(self, kind: str, task: str, reqs: list, disable_tqdm: bool) -> list:
        rec = self._t2_record(task)
        rec["requests"] += len(reqs)
        if not self.t2_strategy.two_pass:
            chosen = self.t2_strategy.label
            seen = {d["doc_id"] for d in rec["dispatch"]}
            for r in reqs:
                if r.doc_id not in seen:
                    seen.add(r.doc_id)
                    rec["dispatch"].append({"doc_id": r.doc_id, "true_task": rec["true_task"], "chosen": chosen})
            return self._t2_answer(kind, reqs, disable_tqdm, rec)

        known = self._t2_first_pass(reqs, rec)
        return self._t2_second_pass(kind, reqs, known, disable_tqdm, rec)

    def _t2_first_pass(self, reqs: list, rec: dict) -> dict[Any, str]:
        """doc_id -> chosen expert ("other" = base), dispatching every new document in one batch
        (the strategy's `choose`, with its first-pass scales loaded)."""
        docs: OrderedDict[Any, str] = OrderedDict()
        for r in reqs:
            if r.doc_id not in docs:
                docs[r.doc_id] = dsp.question_of(self.tokenizer, r.task_name, r.doc, r.args[0])
        known = {d["doc_id"]: d["chosen"] for d in rec["dispatch"]}
        todo = [d for d in docs if d not in known]
        if not todo:
            return known
        task_name = reqs[0].task_name if reqs else None
        self.t2_first_pass_render = dsp.first_pass_render(
            rec["true_task"] if (task_name or "").startswith("t2_") else None,
            self.t2_knobs["dispatch_template"], family_of_task(task_name))
        result = strategies.timed_first_pass(self.t2_strategy, self, [docs[d] for d in todo], rec["true_task"], rec)
        rec["tokens_first"] += result.tokens
        rec["prompt_tokens_first"] += result.prompt_tokens
        for d, cat, exp, raw in zip(todo, result.categories, result.experts, result.raw):
            known[d] = exp or "other"
            rec["dispatch"].append({"doc_id": d, "true_task": rec["true_task"], "chosen": known[d],
                                    "category": cat, "raw": raw[:200]})
        return known

    def _t2_second_pass(self, kind: str, reqs: list, chosen: dict[Any, str], disable_tqdm: bool,
                        rec: dict) -> list:
        """Group requests by their document's expert, answer each group with that expert's scales
        loaded, in the release's order (code, math, reasoning, other); "other" (and unknown names)
        → `other_expert` (protocol knob dispatch_other: the last expert loaded, or the base weights);
        results in the original order."""
        idx_of: dict[str, list[int]] = {}
        for i, r in enumerate(reqs):
            idx_of.setdefault(chosen[r.doc_id], []).append(i)
        groups = OrderedDict((g, idx_of[g]) for g in answering_order(set(idx_of), self.t2_knobs["dispatch_other"]))
        other = other_expert(self.t2.experts, self.t2_knobs["dispatch_other"])
        rec["other_answered_by"] = next((e for e in RELEASE_DISPATCH_ORDER if other and self.t2.experts.get(e) == other),
                                        "base")
        out: list[Any] = [None] * len(reqs)
        for expert, idxs in groups.items():
            path = self.t2.experts.get(expert) if expert in EXPERT_NAMES else other
            rec["swap_s"] += self._t2_set_scales(self.t2_bank.scales(path) if path else None)
            res = self._t2_answer(kind, [reqs[i] for i in idxs], disable_tqdm, rec)
            rec["groups"][expert] = rec["groups"].get(expert, 0) + len(idxs)
            for i, x in zip(idxs, res):
                out[i] = x
        rec["swap_s"] += self._t2_set_scales(None)
        return out

    def get_model_info(self) -> dict:
        info = dict(self._t2_base.get_model_info()) if hasattr(self._t2_base, "get_model_info") else {}
        info["t2"] = self.t2.as_dict()
        return info


def split_t2_kwargs(kwargs: dict) -> tuple[T2Config, str, dict]:
    """(t2 configuration, backend, the remaining kwargs for lm-eval's HFLM / VLLM)."""
    kw = dict(kwargs)
    backend = str(kw.pop("backend", "hf") or "hf")
    if backend not in ("hf", "vllm"):
        raise T2EvalError(f"backend={backend!r}: use hf or vllm")
    cfg = T2Config.from_kwargs(kw)
    # the process default, so the task layer (lm-eval's t2_* tasks, get_task) agrees with the model
    proto.use(cfg.protocol, cfg.protocol_overrides or None)
    if not cfg.protocol_overrides:
        import os

        os.environ.pop(proto.OVERRIDES_ENV_VAR, None)
    return cfg, backend, kw


def _is_vlm(pretrained) -> bool:
    """Whether `pretrained` (a key or directory) is a vision-language checkpoint (its config.json has a
    vision_config); False when it cannot be resolved here (the text path reports that)."""
    if pretrained is None or not isinstance(pretrained, (str, bytes)) and not hasattr(pretrained, "__fspath__"):
        return False
    from .errors import T2EvalError
    from .models.loading import is_vision_language

    try:
        return is_vision_language(str(pretrained))
    except (T2EvalError, OSError, ValueError):
        return False


def resolve_pretrained(pretrained) -> str:
    from .models.loading import resolve_model_dir

    return str(resolve_model_dir(str(pretrained)))


@register_model("t2")
class T2LM(TwoPassMixin, HFLM):
    """backend=hf flavour (also the registered class; backend=vllm returns a
    `t2eval.backends.vllm_lm.T2VLLM`, a vision-language checkpoint a `t2eval.vlm_lm.T2VLM` or, with
    backend=vllm, a `t2eval.backends.vllm_vlm_lm.T2VLLMVLM`)."""

    def __new__(cls, *args, **kwargs):
        if cls is T2LM and _is_vlm(kwargs.get("pretrained", args[0] if args else None)):
            # multimodal mode (issue 10): base / svf / lora
            if str(kwargs.get("backend", "hf")) == "vllm":
                from .backends.vllm_vlm_lm import T2VLLMVLM

                return T2VLLMVLM(*args, **kwargs)
            from .vlm_lm import T2VLM

            return T2VLM(*args, **kwargs)
        if cls is T2LM and str(kwargs.get("backend", "hf")) == "vllm":
            from .backends.vllm_lm import T2VLLM

            return T2VLLM(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, pretrained, dtype: str = "float32", batch_size=1, device: str = "cpu", **kwargs):
        from .backends.hf import HFScaleSwapper

        cfg, _, kw = split_t2_kwargs(kwargs)
        cfg.validate().hf_kwargs(kw)  # e.g. peft= for adapter=lora:PATH
        self.t2_pretrained_dir = resolve_pretrained(pretrained)
        super().__init__(pretrained=self.t2_pretrained_dir, backend="causal", dtype=dtype,
                         batch_size=batch_size, device=device, **kw)
        self.t2_swapper = HFScaleSwapper(self.model, lambda: self.t2_bank.svd)
        self._t2_setup(cfg)

    # -- tokenisation: the protocol's BOS rule (t2eval.tokens.prompt_ids) instead of lm-eval's --------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if add_special_tokens is not None or not hasattr(self, "t2"):
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        ids = prompt_ids(self.tokenizer, string, self.t2_bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_batch_encode(self, strings: list[str], padding_side: str = "left", left_truncate_len: int | None = None,
                         truncation: bool = False):
        if not hasattr(self, "t2"):
            return super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)
        import torch

        ids = [prompt_ids(self.tokenizer, s, self.t2_bos) for s in strings]
        if left_truncate_len:
            ids = [x[-left_truncate_len:] for x in ids]
        n = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rows, masks = [], []
        for x in ids:
            fill = [pad] * (n - len(x))
            rows.append(fill + x if padding_side == "left" else x + fill)
            m = [0] * (n - len(x))
            masks.append(m + [1] * len(x) if padding_side == "left" else [1] * len(x) + m)
        return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)

    def _t2_next_token_logprobs(self, prompts: list[str]):
        """Log-probabilities of the token after each prompt: batched forward passes, the prompts'
        shared prefix (the classification system prompt) encoded once (`adapt.prefix_logprobs`)."""
        from .adapt.prefix_logprobs import next_token_logprobs

        bs = self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else 8
        return next_token_logprobs(self.model, self.tokenizer, prompts, batch_size=bs, device=self.device,
                                   bos=self.t2_bos)
