"""HFBackend on the tiny model: batched greedy == one-by-one, stop strings, log-likelihoods, SVF scales."""

from __future__ import annotations

import pytest
import torch

from t2eval.testing import tiny_model_dir

QUESTIONS = ["hi", "What is 2 + 2? Explain at length, please.", "The quick brown fox jumps", "a",
             "Name three rivers in Europe and say why they matter."]


@pytest.fixture(scope="module")
def backend():
    from t2eval.backends.hf import HFBackend

    return HFBackend(tiny_model_dir(0), batch_size=8)


def _prompts(tok):
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in QUESTIONS]


def test_batched_greedy_equals_one_by_one(backend):
    ps = _prompts(backend.tokenizer)
    batched = backend.generate(ps, 12)
    single = [backend.generate([p], 12)[0] for p in ps]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.n_tokens for g in batched] == [g.n_tokens for g in single]
    assert all(g.n_tokens == 12 for g in batched)  # the random tiny model never emits EOS this early


def test_stop_strings_cut_text_and_count_tokens(backend):
    ps = _prompts(backend.tokenizer)
    free = backend.generate(ps, 20)
    # a stop string taken from what the model actually writes, so it must trigger
    word = next(t for g in free for t in g.text.split() if len(t) > 4)[:5]
    stopped = backend.generate(ps, 20, stop=["Response", word])
    single = [backend.generate([p], 20, stop=["Response", word])[0] for p in ps]
    assert [g.text for g in stopped] == [g.text for g in single]
    hit = 0
    for f, s in zip(free, stopped):
        assert word not in s.text and f.text.startswith(s.text)
        if word in f.text:
            hit += 1
            assert s.n_tokens < 20 and s.text == f.text[:f.text.index(word)]
    assert hit >= 1


def test_sampling_is_seeded(backend):
    ps = _prompts(backend.tokenizer)
    a = backend.generate(ps, 8, temperature=1.0, seed=3)
    b = backend.generate(ps, 8, temperature=1.0, seed=3)
    assert [g.text for g in a] == [g.text for g in b]


def test_loglikelihood_batched_matches_single_and_greedy_flag(backend):
    ps = _prompts(backend.tokenizer)
    first = backend.generate(ps[:1], 1)[0].token_ids[0]  # the greedy next token, as text
    reqs = [(ps[0], backend.tokenizer.decode([first])), (ps[1], " zebra crossing"), (ps[2], " fox")]
    assert backend.encode(reqs[0][1]) == [first]
    batched = backend.loglikelihood(reqs)
    single = [backend.loglikelihood([r])[0] for r in reqs]
    for (a, ga), (b, gb) in zip(batched, single):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and ga == gb
    assert batched[0][1] is True and batched[0][0] < 0


def test_set_scales_changes_and_restores_weights(backend, tmp_path):
    from t2eval import svf
    from t2eval.backends.hf import HFBackend
    from t2eval.svd import decompose, load_svd

    decompose(tiny_model_dir(0), "mlp", tmp_path / "svd.safetensors")
    svd = load_svd(tmp_path / "svd.safetensors")
    b = HFBackend(tiny_model_dir(0), svd=svd)
    name = svd.names[0]
    before = b.model.get_parameter(name).detach().clone()
    z = {n: torch.linspace(-3, 3, svd.rank(n)) for n in svd.names}
    b.set_scales(svf.scales(z, svd))
    assert not torch.allclose(b.model.get_parameter(name), before)
    b.set_scales(None)
    assert torch.equal(b.model.get_parameter(name), before)


def test_packed_completion_logits_equal_padded_ones_and_skip_padding(backend, monkeypatch):
    """completion_token_logits: the LM head only on real completion positions, same values as the
    padded path's masked logits; the padded path is only a fallback (not taken for Llama)."""
    from t2eval.backends import hf

    model, tok = backend.model, backend.tokenizer
    prompts = [tok("Question one is long enough to pad the others", add_special_tokens=False)["input_ids"],
               tok("Short", add_special_tokens=False)["input_ids"], [5, 6]]
    comps = [[11, 12, 13], [21], [31, 32, 33, 34, 35]]
    ref, tgt, cmask = hf.completion_logits(model, prompts, comps, tok.pad_token_id)
    calls = []
    monkeypatch.setattr(hf, "completion_logits", lambda *a, **k: calls.append(1))
    logits, targets, rows = hf.completion_token_logits(model, prompts, comps, tok.pad_token_id)
    assert not calls and logits.shape == (9, ref.shape[-1])
    assert rows.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]
    assert targets.tolist() == [11, 12, 13, 21, 31, 32, 33, 34, 35] == tgt[cmask].tolist()
    assert torch.allclose(logits, ref[cmask], atol=1e-5)


def test_one_factory_and_one_swap_interface(tmp_path):
    """`make_backend` builds the rollout backend; it and the lm-eval model `t2` swap weights through
    the same `ScaleSwapper`, and load identical weights for the same scales."""
    from t2eval import svf
    from t2eval.backends import make_backend
    from t2eval.backends.base import Backend, ScaleSwapper
    from t2eval.backends.hf import HFBackend, HFScaleSwapper
    from t2eval.errors import T2EvalError
    from t2eval.lm import T2LM
    from t2eval.svd import decompose, load_svd

    decompose(tiny_model_dir(0), "mlp", tmp_path / "svd.safetensors")
    svd = load_svd(tmp_path / "svd.safetensors")
    be = make_backend("hf", tiny_model_dir(0), svd=svd, batch_size=4)
    assert type(be) is HFBackend and be.batch_size == 4 and isinstance(be, Backend)
    lm = T2LM(pretrained=str(tiny_model_dir(0)), svd=str(tmp_path / "svd.safetensors"))
    assert type(be.swapper) is type(lm.t2_swapper) is HFScaleSwapper and isinstance(lm.t2_swapper, ScaleSwapper)
    scales = svf.scales({n: torch.linspace(-2, 2, svd.rank(n)) for n in svd.names}, svd)
    assert be.set_scales(scales) >= 0 and lm._t2_set_scales(scales) >= 0
    for n in svd.names:
        assert torch.equal(be.model.get_parameter(n), lm.model.get_parameter(n))
    lm._t2_set_scales(None)
    be.close()
    with pytest.raises(T2EvalError, match="unknown backend 'tpu'"):
        make_backend("tpu", tiny_model_dir(0))
    with pytest.raises(T2EvalError, match="engine arguments"):
        make_backend("hf", tiny_model_dir(0), max_model_len=8)
    with pytest.raises(T2EvalError, match="svd=<cache path>"):
        HFBackend(tiny_model_dir(0)).set_scales(scales)
