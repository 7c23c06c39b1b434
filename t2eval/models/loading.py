"""Resolve a model key or path to a local HF directory, and load it."""

from __future__ import annotations

from pathlib import Path

from ..config import default_models_dir, model_registry
from ..errors import MissingModelError, T2EvalError


def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").exists()


def resolve_model_dir(key_or_path: str, models_dir: str | Path | None = None) -> Path:
    """A local HF directory for a registry key or a path.

    Keys look in `models_dir/<key>` (what `t2eval prepare-model` writes); hub keys then fall back to
    the HF cache / a download; the embedded key tells how to build it.
    """
    p = Path(key_or_path)
    if _is_hf_dir(p):
        return p
    reg = model_registry()
    if key_or_path not in reg:
        if p.exists():
            raise MissingModelError(f"{p} exists but is not a Hugging Face model directory (no config.json)")
        raise MissingModelError(f"unknown model {key_or_path!r}: use a registry key ({', '.join(sorted(reg))}) "
                                "or the path of a local Hugging Face directory")
    local = Path(models_dir or default_models_dir()) / key_or_path
    if _is_hf_dir(local):
        return local
    spec = reg[key_or_path]
    if spec.source == "embedded":
        raise MissingModelError(f"{key_or_path} is not built yet: run `t2eval prepare-model {key_or_path} --out {local}`")
    from .hub import fetch

    return fetch(spec.hub_id, key_or_path)


def torch_dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return "auto"
    try:
        dt = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name))
    except AttributeError:
        raise T2EvalError(f"unknown dtype {name!r}: use float32, bfloat16 or float16") from None
    return dt


def is_vision_language(key_or_path: str | Path) -> bool:
    """True when the model's config.json describes a vision-language model (it has a vision_config)."""
    import json

    d = resolve_model_dir(str(key_or_path))
    return "vision_config" in json.loads((Path(d) / "config.json").read_text())


def load_model(key_or_path: str, dtype: str | None = "float32", device: str = "cpu"):
    """The model in eval mode: the causal-LM class, or the image-text class
    (``AutoModelForImageTextToText``, e.g. LlavaNextForConditionalGeneration) for a vision-language config."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    d = resolve_model_dir(key_or_path)
    cls = AutoModelForImageTextToText if is_vision_language(d) else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(d, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as e:
        raise T2EvalError(f"could not load the model in {d}: {e}") from None
    return model.to(device).eval()


def load_tokenizer(key_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(key_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_processor(key_or_path: str):
    """The processor (image processor + tokenizer) of a vision-language model directory."""
    from transformers import AutoProcessor

    d = resolve_model_dir(key_or_path)
    if not is_vision_language(d):
        raise T2EvalError(f"{d} is not a vision-language model (no vision_config in config.json): it has no processor")
    try:
        proc = AutoProcessor.from_pretrained(d)
    except (OSError, ValueError) as e:
        raise T2EvalError(f"could not load the processor in {d}: {e}") from None
    if proc.tokenizer.pad_token is None:
        proc.tokenizer.pad_token = proc.tokenizer.eos_token
    return proc
