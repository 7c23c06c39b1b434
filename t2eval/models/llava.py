"""Offline LLaVA-NeXT builders (issue 10): `tiny-llava-next` (tests) and `smollm2-llava` (embedded).

Both are ``LlavaNextForConditionalGeneration`` directories (safetensors, processor, tokenizer with
an added ``<image>`` token and SmolLM2's chat template), built deterministically from a seed:

* ``tiny-llava-next``: every weight random (2-layer Llama text model, 2-layer CLIP vision tower).
* ``smollm2-llava``: the language model is the embedded SmolLM2-135M-Instruct (real weights, read
  from the prepared ``smollm2-135m`` directory), the vision tower and projector are small, random
  and seeded. **The vision tower is random; the embedded VLM reads the OCR tokens, not the pixels.**

The ``<image>`` token is appended to SmolLM2's vocabulary (id 49152); its embedding row is seeded
random (it is replaced by image features in the forward pass). Images are small (32×32 crops,
patch 8: 16 patches per crop; LLaVA-NeXT's any-resolution grid up to 64×64) so CPU runs stay fast.
The processor uses the PIL image processor where torchvision is missing (transformers' fallback).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from pathlib import Path

IMAGE_TOKEN = "<image>"
TINY_KEY, EMBEDDED_KEY = "tiny-llava-next", "smollm2-llava"
NOTE_RANDOM_VISION = "the vision tower is random; the embedded VLM reads the OCR tokens, not the pixels"


@functools.lru_cache(maxsize=1)
def _gguf_tokenizer():
    from transformers import AutoTokenizer

    from .embedded import GGUF_FILE, gguf_dir

    return AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)  # ~20 s: parsed once per process


def _tokenizer():
    tok = copy.deepcopy(_gguf_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def _vision_config(hidden: int = 32, layers: int = 2, image_size: int = 32, patch: int = 8):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=2, image_size=image_size, patch_size=patch, projection_dim=hidden)


def _llava_config(text_config, tok, image_size: int = 32):
    from transformers import LlavaNextConfig

    pin = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size],
           [2 * image_size, 2 * image_size]]
    return LlavaNextConfig(text_config=text_config, vision_config=_vision_config(image_size=image_size),
                           image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), image_grid_pinpoints=pin,
                           vision_feature_layer=-1, vision_feature_select_strategy="default",
                           tie_word_embeddings=text_config.tie_word_embeddings)


def _processor(tok, cfg, image_size: int = 32):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    if importlib.util.find_spec("torchvision") is not None:
        from transformers import LlavaNextImageProcessor as proc_cls
    else:  # no torchvision (CPU installs): transformers' PIL image processor
        proc_cls = LlavaNextImageProcessorPil
    ip = proc_cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                  image_grid_pinpoints=cfg.image_grid_pinpoints)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=cfg.vision_config.patch_size,
                              vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                              chat_template=tok.chat_template, image_token=IMAGE_TOKEN,
                              num_additional_image_tokens=1)


def _seeded_(params, gen, std: float = 0.05) -> None:
    import torch

    with torch.no_grad():
        for name, p in sorted(params):
            if p.ndim == 1:  # norms 1, biases / class embedding / image newline 0
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _save(model, tok, proc, out: Path, meta: dict, data_files: dict | None = None) -> Path:
    """Written to ``<out>.partial`` with a provenance sidecar, then renamed: never half a model at `out`."""
    from .. import provenance
    from .embedded import _replace_dir, make_greedy

    make_greedy(model)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    proc.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "t2eval_model.json").write_text(json.dumps(meta, indent=2))
    provenance.write_sidecar(tmp, provenance.record("prepare-model", dict(meta, model=meta["key"]),
                                                    data_files=data_files or {}))
    _replace_dir(tmp, out)
    return out


def build_tiny_llava_next(out: str | Path, seed: int = 0, dtype: str = "float32") -> Path:
    """A random tiny LLaVA-NeXT (2-layer Llama, hidden 64; 2-layer CLIP, hidden 32), deterministic from `seed`."""
    import torch
    from transformers import LlamaConfig, LlavaNextForConditionalGeneration

    tok = _tokenizer()
    tc = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                     tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5)
    cfg = _llava_config(tc, tok)
    model = LlavaNextForConditionalGeneration(cfg)
    _seeded_(model.named_parameters(), torch.Generator().manual_seed(seed))
    model = model.to(getattr(torch, dtype)).eval()
    return _save(model, tok, _processor(tok, cfg), Path(out), {"key": TINY_KEY, "seed": seed, "dtype": dtype})


def build_smollm2_llava(out: str | Path, seed: int = 0, dtype: str = "float32", text_model: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct's real weights as the language model + a seeded random vision tower/projector.

    `text_model`: the SmolLM2 HF directory (default: the prepared ``smollm2-135m``)."""
    import torch
    from transformers import AutoModelForCausalLM, LlavaNextForConditionalGeneration

    from .loading import resolve_model_dir

    src = Path(text_model) if text_model else resolve_model_dir("smollm2-135m")
    lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = _tokenizer()
    tc = copy.deepcopy(lm.config)
    tc.vocab_size = len(tok)
    cfg = _llava_config(tc, tok)
    gen = torch.Generator().manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg)
    _seeded_([(n, p) for n, p in model.named_parameters() if not n.startswith("model.language_model.")
              and n != "lm_head.weight"], gen)
    with torch.no_grad():
        emb = torch.randn((len(tok), tc.hidden_size), generator=gen) * 0.02
        emb[: lm.config.vocab_size] = lm.get_input_embeddings().weight
        state = {k: v for k, v in lm.model.state_dict().items() if k != "embed_tokens.weight"}
        missing, unexpected = model.model.language_model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"embed_tokens.weight"}:
            raise RuntimeError(f"SmolLM2 -> LLaVA-NeXT weight copy mismatch: {missing} {unexpected}")
        model.model.language_model.embed_tokens.weight.copy_(emb)
        if not cfg.tie_word_embeddings:  # pragma: no cover - SmolLM2 ties its embeddings
            head = torch.randn((len(tok), tc.hidden_size), generator=gen) * 0.02
            head[: lm.config.vocab_size] = lm.lm_head.weight
            model.lm_head.weight.copy_(head)
    model = model.to(getattr(torch, dtype)).eval()
    meta = {"key": EMBEDDED_KEY, "seed": seed, "dtype": dtype, "text_model": str(src), "note": NOTE_RANDOM_VISION}
    return _save(model, tok, _processor(tok, cfg), Path(out), meta,
                 data_files={"text_model.safetensors": src / "model.safetensors"} if (src / "model.safetensors").exists() else None)


BUILDERS = {"tiny_llava_next": build_tiny_llava_next, "smollm2_llava": build_smollm2_llava}


def tiny_llava_next_dir(seed: int = 0) -> Path:
    """A cached tiny-llava-next (tests): built once under $T2EVAL_TEST_CACHE (default: the temp dir)."""
    import os
    import tempfile

    root = Path(os.environ.get("T2EVAL_TEST_CACHE", tempfile.gettempdir())) / "t2eval-test-models"
    d = root / f"{TINY_KEY}-s{seed}"
    if not (d / "model.safetensors").exists():
        tmp = root / f"{TINY_KEY}-s{seed}.tmp{os.getpid()}"
        build_tiny_llava_next(tmp, seed=seed)
        try:
            os.replace(tmp, d)
        except OSError:  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return d
