"""A tiny random-initialised Llama with SmolLM2's tokenizer and chat template, for fast unit tests.

Deterministic from a seed: the same seed gives bit-identical weights.
"""

from __future__ import annotations

import json
from pathlib import Path


def build_tiny_llama(out: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                     intermediate_size: int = 128, num_heads: int = 4, num_kv_heads: int = 2,
                     dtype: str = "float32") -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .embedded import GGUF_FILE, gguf_dir
    from transformers import AutoTokenizer

    out = Path(out)
    tok = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5)
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model = model.to(getattr(torch, dtype))
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "t2eval_model.json").write_text(json.dumps({"key": "tiny-llama", "seed": seed, "dtype": dtype}))
    return out
