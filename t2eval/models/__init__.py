"""Models: the embedded SmolLM2 build, hub downloads, the tiny test model, loading helpers."""

from .loading import load_model, load_tokenizer, resolve_model_dir

__all__ = ["load_model", "load_tokenizer", "resolve_model_dir"]
