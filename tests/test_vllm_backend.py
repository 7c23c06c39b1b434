"""vLLM backend: greedy outputs match HF before/after an SVF swap, swaps back exactly, both swap modes.

One vLLM engine (SmolLM2-135M-Instruct, fp32) for the whole module: starting it costs ~30-60 s on
2 CPU cores. The tiny test Llama cannot be used: its head size (16) is below what vLLM's CPU
attention kernels support (32, 64, 80, ...).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

from t2eval.errors import T2EvalError

pytest.importorskip("vllm", reason="vllm is not importable")  # skip only when vLLM can't import

QUESTIONS = [
    "What is 12 + 7?", "Name three primary colors.", "Write a Python function that reverses a string.",
    "What is the capital of France?", "Explain photosynthesis in one sentence.", "How many legs does a spider have?",
    "Give me a synonym for 'happy'.", "Translate 'good morning' into Spanish.", "Why is the sky blue?",
    "Sort these numbers: 5, 2, 9, 1.",
]
MAX_NEW = 32


def _cache_dir() -> Path:
    d = Path(os.environ.get("T2EVAL_TEST_CACHE", tempfile.gettempdir())) / "t2eval-test-models"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def svd_cache(smollm2_dir):
    from t2eval.svd import ensure_svd

    tag = hashlib.sha256(str(smollm2_dir.resolve()).encode()).hexdigest()[:8]
    out = _cache_dir() / f"smollm2-135m-mlp-{tag}.safetensors"
    return ensure_svd(smollm2_dir, "mlp", out=out)


def _hf_generate(model, tok, prompts, max_new=MAX_NEW) -> list[str]:
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
    return [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True) for o in out]


def _agree(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def _expert_scales(cache, seed=0, spread=0.3):
    """A random non-constant code-parameterised expert on all MLP matrices (mild: text stays coherent)."""
    from t2eval import svf

    g = torch.Generator().manual_seed(seed)
    z = {n: 0.1 + spread * torch.randn(cache.rank(n), generator=g) for n in cache.names}
    return svf.scales(z, cache, param="code")


LL_REQUESTS = [(0, "12 + 7 = 19"), (0, " banana bread"), (3, "The capital of France is Paris."),
               (None, "The quick brown fox jumps over the", " lazy dog")]


def _ll_requests(prompts):
    return [(prompts[r[0]], r[1]) if r[0] is not None else (r[1], r[2]) for r in LL_REQUESTS]


@pytest.fixture(scope="module")
def hf_ref(smollm2_dir, svd_cache):
    """Everything the HF side has to say, computed before the vLLM engine starts; the HF model is
    dropped afterwards so the two models never sit in memory (and compete for 2 cores) together."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t2eval.svf import SVFPatcher

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    ref = {"prompts": prompts, "base": _hf_generate(model, tok, prompts)}
    with SVFPatcher(model, svd_cache) as patcher:
        patcher.apply(_expert_scales(svd_cache))
        ref["expert"] = _hf_generate(model, tok, prompts)
    ll = []
    for ctx, cont in _ll_requests(prompts):
        c = tok(ctx, add_special_tokens=False)["input_ids"]
        whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        assert whole[:len(c)] == c
        x = torch.tensor(whole[len(c):])
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits[0, len(c) - 1:-1].log_softmax(-1)
        ll.append((logp[torch.arange(len(x)), x].sum().item(), bool((logp.argmax(-1) == x).all())))
    ref["loglikelihood"] = ll
    del model
    return ref


@pytest.fixture(scope="module")
def prompts(hf_ref):
    return hf_ref["prompts"]


@pytest.fixture(scope="module")
def backend(smollm2_dir, svd_cache, hf_ref):
    from t2eval.backends.vllm import VLLMBackend

    be = VLLMBackend(smollm2_dir, svd=svd_cache.path, max_model_len=1024, kv_cache_gib=1)
    yield be
    be.close()


@pytest.fixture(scope="module")
def base_outputs(backend, prompts):
    return backend.generate(prompts, MAX_NEW)


# --------------------------------------------------------------------------- engine tests

@pytest.mark.vllm
@pytest.mark.slow
def test_generate_matches_hf_before_and_after_swap(backend, hf_ref, prompts, svd_cache, base_outputs):
    base = [g.text for g in base_outputs]
    assert all(0 < g.n_tokens <= MAX_NEW and len(g.token_ids) == g.n_tokens for g in base_outputs)
    assert _agree(base, hf_ref["base"]) >= 0.95, list(zip(base, hf_ref["base"]))

    dt = backend.set_scales(_expert_scales(svd_cache))
    assert dt > 0
    try:
        expert = [g.text for g in backend.generate(prompts, MAX_NEW)]
    finally:
        backend.set_scales(None)
    assert _agree(expert, base) < 0.8, "the expert should change most outputs"
    assert _agree(expert, hf_ref["expert"]) >= 0.95, list(zip(expert, hf_ref["expert"]))


@pytest.mark.vllm
@pytest.mark.slow
def test_swap_back_restores_base_exactly(backend, prompts, svd_cache, base_outputs):
    backend.set_scales(_expert_scales(svd_cache, seed=1))
    changed = backend.generate(prompts[:4], MAX_NEW)
    backend.set_scales(None)
    again = backend.generate(prompts, MAX_NEW)
    assert [g.token_ids for g in again] == [g.token_ids for g in base_outputs]
    assert [g.token_ids for g in changed] != [g.token_ids for g in base_outputs[:4]]


@pytest.mark.vllm
@pytest.mark.slow
def test_reload_and_worker_modes_load_the_same_weights(backend, prompts, svd_cache, base_outputs):
    """Driver-side (reload) and worker-side composition both use svf.compose: identical tokens; the
    reload mode restores the base exactly too; a second expert replaces the first completely (no
    leftovers); switching modes undoes the other mode's patches first."""
    s1 = _expert_scales(svd_cache, seed=2)
    half = {n: s for i, (n, s) in enumerate(_expert_scales(svd_cache, seed=3).items()) if i % 2 == 0}
    try:
        backend.set_scales(half, mode="reload")
        ref = [g.token_ids for g in backend.generate(prompts[:4], MAX_NEW)]
        backend.set_scales(None, mode="reload")
        assert [g.token_ids for g in backend.generate(prompts, MAX_NEW)] == [g.token_ids for g in base_outputs]
        backend.set_scales(s1, mode="worker")
        backend.set_scales(half, mode="worker")  # the other half of the matrices must go back to base
        via_worker = [g.token_ids for g in backend.generate(prompts[:4], MAX_NEW)]
        backend.set_scales(s1, mode="reload")  # worker-mode patches are undone first
        backend.set_scales(half, mode="worker")  # and reload-mode ones here
        switched = [g.token_ids for g in backend.generate(prompts[:4], MAX_NEW)]
    finally:
        backend.set_scales(None)
    assert ref != [g.token_ids for g in base_outputs[:4]]
    assert via_worker == ref
    assert switched == ref


@pytest.mark.vllm
@pytest.mark.slow
def test_constant_code_expert_gives_base_outputs(backend, prompts, svd_cache, base_outputs):
    from t2eval import svf

    z = {n: torch.full((svd_cache.rank(n),), 0.7) for n in svd_cache.names}
    scales = svf.scales(z, svd_cache, param="code")
    backend.set_scales(scales)
    try:
        out = [g.text for g in backend.generate(prompts, MAX_NEW)]
    finally:
        backend.set_scales(None)
    assert _agree(out, [g.text for g in base_outputs]) >= 0.95


@pytest.mark.vllm
@pytest.mark.slow
def test_loglikelihood_matches_hf(backend, hf_ref, prompts):
    got = backend.loglikelihood(_ll_requests(prompts))
    for (lp, greedy), (want, want_greedy) in zip(got, hf_ref["loglikelihood"]):
        assert lp == pytest.approx(want, abs=2e-3)
        assert greedy == want_greedy
    assert got[0][0] > got[1][0]
    assert any(g for _, g in got) and not all(g for _, g in got)


@pytest.mark.vllm
@pytest.mark.slow
def test_swap_errors_are_actionable(backend, svd_cache):
    with pytest.raises(T2EvalError, match="no SVD factors"):
        backend.set_scales({"model.layers.0.self_attn.q_proj.weight": torch.ones(576)})
    with pytest.raises(T2EvalError, match="rank"):
        backend.set_scales({"model.layers.0.mlp.up_proj.weight": torch.ones(7)})
    with pytest.raises(T2EvalError, match="swap mode"):
        backend.set_scales(_expert_scales(svd_cache), mode="nope")
    with pytest.raises(T2EvalError, match="max_model_len"):
        backend.generate(["word " * 1100], 8)


# --------------------------------------------------------------------------- no engine needed

@pytest.mark.vllm
def test_sibling_names_cover_fused_shards():
    from t2eval.backends.vllm_worker import DEFAULT_PACKED, sibling_names

    names = ["model.layers.3.mlp.gate_proj.weight", "model.layers.3.self_attn.q_proj.weight",
             "model.layers.3.self_attn.v_proj.weight", "model.layers.4.mlp.down_proj.weight"]
    assert sibling_names(names, DEFAULT_PACKED) == ["model.layers.3.mlp.up_proj.weight",
                                                    "model.layers.3.self_attn.k_proj.weight"]
    mlp = [f"model.layers.0.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
    assert sibling_names(mlp) == []


@pytest.mark.vllm
def test_tensor_blob_roundtrip():
    from t2eval.backends.vllm_worker import pack_tensors, unpack_tensors

    t = {"a.weight": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.float32)}
    back = unpack_tensors(pack_tensors(t))
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) for k in t)
    assert pack_tensors(None) is None and unpack_tensors(None) is None


@pytest.mark.vllm
def test_lora_request(tmp_path):
    from t2eval.backends.vllm import lora_request

    with pytest.raises(T2EvalError, match="adapter_config.json"):
        lora_request(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    r1, r2 = lora_request(tmp_path), lora_request(tmp_path)
    assert r1.lora_int_id == r2.lora_int_id >= 1 and r1.lora_path == str(tmp_path.resolve())
    other = tmp_path / "b"
    other.mkdir()
    (other / "adapter_config.json").write_text("{}")
    assert lora_request(other).lora_int_id != r1.lora_int_id


@pytest.mark.vllm
def test_backend_rejects_bad_arguments(tmp_path):
    from t2eval.backends.vllm import VLLMBackend, swap_scales

    with pytest.raises(T2EvalError, match="swap mode"):
        VLLMBackend(tmp_path, swap_mode="fast")
    with pytest.raises(T2EvalError, match="swap mode"):
        swap_scales(object(), None, "x.safetensors", mode="fast")
