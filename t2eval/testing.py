"""Helpers for tests and benchmarks: the tiny random Llama, built once per process and cached."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_CACHE: dict[tuple, Path] = {}


def tiny_model_dir(seed: int = 0, **kw) -> Path:
    """Path to a tiny random Llama (2 layers, hidden 64, SmolLM2 tokenizer); built on first use."""
    key = (seed, tuple(sorted(kw.items())))
    if key not in _CACHE:
        from .models.tiny import build_tiny_llama

        root = Path(os.environ.get("T2EVAL_TEST_CACHE", tempfile.gettempdir())) / "t2eval-test-models"
        name = f"tiny-llama-s{seed}" + "".join(f"-{k}{v}" for k, v in sorted(kw.items()))
        d = root / name
        if not (d / "model.safetensors").exists():
            tmp = root / (name + f".tmp{os.getpid()}")
            build_tiny_llama(tmp, seed=seed, **kw)
            try:
                os.replace(tmp, d)
            except OSError:  # another process won the race
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        _CACHE[key] = d
    return _CACHE[key]
