"""Generation backends (HF transformers, vLLM) behind one small interface (see base.py).

`make_backend(kind, ...)` is the one factory (training rollouts, few-shot search); the lm-eval
model `t2` builds its own flavours (`t2eval.lm`) and shares the weight-swap interface
(`base.ScaleSwapper`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import T2EvalError

KINDS = ("hf", "vllm")


def make_backend(kind: str, model_dir: str | Path | None = None, *, svd=None, dtype: str = "float32",
                 device: str = "cpu", batch_size: int = 16, seed: int = 0, model=None, tokenizer=None,
                 bos: str | None = None, processor=None, **engine_kwargs):
    """A `base.Backend` of `kind`:

    * ``"hf"``: `hf.HFBackend` on `model_dir`, or on an already loaded `model` + `tokenizer` (the
      training model itself, so rollouts see its current weights); `svd` a loaded SVD cache; with a
      `processor` (a vision-language model) `hf_vlm.HFVLMBackend`, which generates from (prompt, image) pairs;
    * ``"vllm"``: `vllm.VLLMBackend` started on `model_dir` (`svd`: a cache path or a loaded cache;
      `engine_kwargs` go to it, e.g. max_model_len, kv_cache_gib, swap_mode). `model`/`tokenizer`
      are not used: the engine loads its own copy (SVF swaps keep it in step), so a trainer can
      make the same call for either kind. With a `processor` (or on a vision-language model directory)
      it generates from (prompt, image) pairs too (vLLM's LLaVA needs torchvision: GPU stacks).

    `bos` (double | single): how prompts get their BOS token (`t2eval.tokens.prompt_ids`); None: the
    protocol's `bos` knob (the process default protocol, `protocol.use`).
    """
    if kind == "hf":
        from .hf import HFBackend

        if engine_kwargs:
            raise T2EvalError(f"backend hf takes no engine arguments ({', '.join(engine_kwargs)})")
        if processor is not None:
            from .hf_vlm import HFVLMBackend

            return HFVLMBackend(model_dir, processor=processor, dtype=dtype, device=device, svd=svd, model=model,
                                batch_size=batch_size, bos=bos)
        return HFBackend(model_dir, dtype=dtype, device=device, svd=svd, model=model, tokenizer=tokenizer,
                         batch_size=batch_size, bos=bos)
    if kind == "vllm":
        from .vllm import VLLMBackend

        if model_dir is None:
            raise T2EvalError("backend vllm starts its own engine: give the model directory")
        return VLLMBackend(model_dir, dtype=dtype, svd=svd, seed=seed, bos=bos, processor=processor, **engine_kwargs)
    raise T2EvalError(f"unknown backend {kind!r}: use one of {', '.join(KINDS)}")
