"""The `t2` lm-eval model's backend=vllm flavour: lm-eval's ``VLLM`` + t2eval's two passes.

`t2eval.lm.T2LM(backend="vllm", ...)` returns a `T2VLLM`; importing this module imports vLLM
and lm-eval's VLLM class (through `t2eval.backends.vllm.lm_eval_vllm_class`, which also works with
the CPU wheel), so `t2eval.lm` imports it only when backend=vllm is asked for. Weights are swapped
through `t2eval.backends.vllm.VLLMScaleSwapper` (inside the workers, see `vllm_worker`); the engine
kwargs a strategy needs (worker extension, max_logprobs=-1, LoRA) come from its
`Strategy.vllm_kwargs`.
"""

from __future__ import annotations

from ..errors import T2EvalError
from ..tokens import prompt_ids
from ..lm import TwoPassMixin, resolve_pretrained, split_t2_kwargs
from . import vllm as vb

VLLM = vb.lm_eval_vllm_class()


class T2VLLM(TwoPassMixin, VLLM):
    def __init__(self, pretrained, dtype="float32", batch_size="auto", **kwargs):
        cfg, _, kw = split_t2_kwargs(kwargs)
        kw.pop("device", None)
        cfg.validate().vllm_kwargs(kw)  # fails before the engine starts (tens of seconds), not after
        kw.update(vb.cpu_engine_defaults(kw))
        # lm-eval's VLLM passes its own chat_template= next to **chat_template_args: a
        # chat_template there (the code tasks' template, see evaluate.py) replaces that one
        cta = dict(kw.pop("chat_template_args", None) or {})
        template = cta.pop("chat_template", None)
        self.t2_pretrained_dir = resolve_pretrained(pretrained)
        super().__init__(pretrained=self.t2_pretrained_dir, dtype=dtype, batch_size=batch_size,
                         chat_template_args=cta, **kw)
        if template is not None:
            self.hf_chat_template = template
        self.t2_swapper = vb.VLLMScaleSwapper(self.model, lambda: self.t2.svd, self.t2_pretrained_dir, "worker")
        self._t2_setup(cfg)

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """lm-eval's VLLM tokenises every request here (generation and loglikelihood): the
        protocol's BOS rule (`t2eval.tokens.prompt_ids`) instead of lm-eval's "no BOS where the
        text starts with one"."""
        if add_special_tokens is not None or not hasattr(self, "t2") or not string:
            return super().tok_encode(string, add_special_tokens, **kwargs)
        if isinstance(string, str):
            return prompt_ids(self.tokenizer, string, self.t2_bos)
        return [prompt_ids(self.tokenizer, s, self.t2_bos) for s in string]

    def _t2_next_token_logprobs(self, prompts: list[str]):
        """Log-probabilities of the token after each prompt (dispatch=logprob's one-pass
        path): one greedy step per prompt returning the full vocabulary's logprobs, instead of
        lm-eval's loglikelihood (prompt logprobs over every position of every (prompt, label))."""
        import torch
        from vllm import SamplingParams, TokensPrompt

        mc = self.model.llm_engine.model_config
        vocab = mc.get_vocab_size()
        if mc.max_logprobs != -1 and mc.max_logprobs < vocab:
            raise T2EvalError(f"this vLLM engine returns at most {mc.max_logprobs} logprobs per token; "
                              "dispatch=logprob needs the full row: start it with max_logprobs=-1")
        ids = [prompt_ids(self.tokenizer, p, self.t2_bos) for p in prompts]
        sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, flat_logprobs=True, detokenize=False)
        outs = self.model.generate([TokensPrompt(prompt_token_ids=x) for x in ids], sp, use_tqdm=False,
                                   lora_request=self.lora_request)
        rows = []
        for o in outs:
            flat = o.outputs[0].logprobs
            s, e = flat.start_indices[0], flat.end_indices[0]
            row = torch.full((vocab,), float("-inf"))
            row[torch.tensor(flat.token_ids[s:e])] = torch.tensor(flat.logprobs[s:e], dtype=torch.float32)
            rows.append(row)
        return rows
