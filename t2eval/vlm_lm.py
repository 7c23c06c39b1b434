"""The `t2` lm-eval model in multimodal mode (issue 10): a vision-language checkpoint on the HF backend.

`T2LM` (t2eval.lm) builds a `T2VLM` when the checkpoint's config.json is a vision-language one
(`models.loading.is_vision_language`), so the same ``--model t2 --model_args pretrained=...`` runs
TextVQA/OK-VQA (``t2_textvqa``, ``t2_okvqa``, ``t2_synth_textvqa``, whose ``doc_to_image`` hands lm-eval
the images). lm-eval's ``hf-multimodal`` model (`HFMultimodalLM`: ``AutoModelForImageTextToText`` +
``AutoProcessor``, images from each request's aux arguments ``{"visual": [PIL images]}``) does the
generation; this class adds what `t2` adds to a text model:

* strategies: base (strategy=none), svf (adapter=svf:PATH, SVD cache svd=PATH) and lora
  (adapter=lora:PATH, peft) only -- the Transformer² strategies that need a dispatch first pass
  (prompt, cls) and the few-shot mixture are refused with a `T2EvalError` (no VLM dispatcher exists);
* SVF through the same `HFScaleSwapper` / `SVFPatcher` as the text model: W′ = U diag(σ ⊙ s) Vᵀ in
  place for the SVD cache's matrices, which the cache's scope (`svd.target_names(scope="language")`,
  the default) limits to the language model: no vision-tower or projector matrix is ever touched;
* the SVD cache and the expert checked against the model before anything runs, timing records;
* prompts rendered with the tokenizer's own chat template, string content (the ``<image>`` placeholder
  opens the user message, see `tasks.vqa_tasks`), so the rendered context equals
  ``get_task(key).prompt(tokenizer, doc)``; the processor expands the placeholder into image tokens;
* the protocol's BOS rule (`tokens`): ``double`` = the tokenizer's default, ``single`` = no second BOS
  where the rendered text already starts with it.

backend=vllm builds the vLLM flavour instead (`t2eval.backends.vllm_vlm_lm.T2VLLMVLM`, through `T2LM`),
which shares `check_vlm_strategy` and the chat rendering (`StringChatTemplate`).
"""

from __future__ import annotations

from lm_eval.models.hf_vlms import HFMultimodalLM

from .errors import T2EvalError
from .lm import TwoPassMixin, resolve_pretrained, split_t2_kwargs

VLM_STRATEGIES = ("none", "svf", "lora")


def check_vlm_strategy(strategy) -> None:
    """Refuse what the VLM path cannot run: any two-pass (dispatch) strategy and the few-shot mixture."""
    if strategy.name not in VLM_STRATEGIES:
        why = "a dispatch first pass" if strategy.two_pass else "an expert mixture"
        raise T2EvalError(
            f"strategy={strategy.name} needs {why}, which the t2 model does not run on a vision-language "
            f"checkpoint: use base (strategy=none), adapter=svf:PATH or adapter=lora:PATH (issue 10)")


def text_context_length(model_dir) -> int | None:
    """The language model's context length (text_config.max_position_embeddings): lm-eval's HFLM looks for
    it only at the top level of the config, where a LLaVA-NeXT config has none."""
    import json
    from pathlib import Path

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    n = (cfg.get("text_config") or {}).get("max_position_embeddings")
    return int(n) if n else None


class StringChatTemplate:
    """The chat rendering of the `t2` VLM flavours: the tokenizer's own chat template over string content
    (the ``<image>`` placeholder inside the user's text), so the rendered context equals `Task.prompt`
    (lm-eval's multimodal classes would turn the content into typed parts for the processor's template)."""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self.chat_applied = True
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None


class T2VLM(StringChatTemplate, TwoPassMixin, HFMultimodalLM):
    """`t2` on a vision-language checkpoint (HF backend); see the module docstring."""

    MULTIMODAL = True

    def __init__(self, pretrained, dtype: str = "float32", batch_size=1, device: str = "cpu", **kwargs):
        from .backends.hf import HFScaleSwapper

        cfg, backend, kw = split_t2_kwargs(kwargs)
        if backend != "hf":  # T2LM builds the vLLM flavour for backend=vllm
            raise T2EvalError(f"T2VLM is the HF flavour: for backend={backend} build the model through t2eval.lm.T2LM "
                              "(lm-eval's `--model t2`)")
        strategy = cfg.validate()
        check_vlm_strategy(strategy)
        strategy.hf_kwargs(kw)  # peft= for adapter=lora:PATH
        kw.setdefault("convert_img_format", True)  # RGB
        self.t2_pretrained_dir = resolve_pretrained(pretrained)
        if kw.get("max_length") is None:  # lm-eval would fall back to 2048: too short for any-res image tokens
            n = text_context_length(self.t2_pretrained_dir)
            if n:
                kw["max_length"] = n
        super().__init__(pretrained=self.t2_pretrained_dir, dtype=dtype, batch_size=batch_size, device=device, **kw)
        self.t2_swapper = HFScaleSwapper(self.model, lambda: self.t2_bank.svd)
        self._t2_setup(cfg)

    def tok_batch_multimodal_encode(self, strings, images, padding_side: str = "left", left_truncate_len=None,
                                    truncation: bool = False):
        """Processor encoding of a left-padded batch (text + one image list per string), BOS by the
        protocol's rule; left truncation is refused (it would cut image tokens)."""
        from lm_eval.models.hf_vlms import DEFAULT_IMAGE_PLACEHOLDER
        from lm_eval.models.utils import replace_placeholders

        if not self.chat_applied:
            strings = [replace_placeholders(s, DEFAULT_IMAGE_PLACEHOLDER, self.image_token, self.max_images)
                       for s in strings]
        images = [[img.convert("RGB") if self.rgb else img for img in imgs[: self.max_images]] for imgs in images]
        bos = self.tokenizer.bos_token
        add_special = not (self.t2_bos == "single" and bos and all(s.startswith(bos) for s in strings))
        old = self.tokenizer.padding_side
        self.tokenizer.padding_side = padding_side
        try:
            enc = self.processor(images=images, text=list(strings), padding="longest", return_tensors="pt",
                                 add_special_tokens=add_special)
        finally:
            self.tokenizer.padding_side = old
        if left_truncate_len and enc["input_ids"].shape[1] > left_truncate_len:
            raise T2EvalError(f"a multimodal prompt has {enc['input_ids'].shape[1]} tokens, more than the "
                              f"{left_truncate_len} the context allows; cutting it would drop image tokens")
        return enc.to(self.device, self.model.dtype)
