"""t2eval.svf on the tiny random Llama (fp32): parameterisations, mixing, shuffling, patching,
gradients and the expert file format."""

from __future__ import annotations

import pytest
import torch

from t2eval import svf
from t2eval.errors import CorruptArtifactError, T2EvalError
from t2eval.svd import ensure_svd
from t2eval.testing import tiny_model_dir


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir(0)


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    return ensure_svd(tiny, "mlp", tmp_path_factory.mktemp("svd") / "tiny-mlp.safetensors")


@pytest.fixture()
def model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


def _rel(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def _ids(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    return tok("Natalia sold clips to 48 of her friends in April", return_tensors="pt").input_ids


def test_identity_parameterisations(cache, model):
    params = dict(model.named_parameters())
    z_const = {n: torch.full((cache.rank(n),), 0.37) for n in cache.names}
    s_code = svf.scales(z_const, cache, "code")
    s_paper = svf.scales({n: torch.ones(cache.rank(n)) for n in cache.names}, cache, "paper")
    for n in cache.names:
        for s in (s_code[n], s_paper[n]):
            assert s.dtype == torch.float32 and torch.allclose(s, torch.ones_like(s), atol=1e-6)
            assert _rel(svf.compose(*cache.usv(n), s), params[n].detach()) <= 1e-5
    # non-constant z changes W and keeps the singular-value mass (code param)
    z = svf.init_z(cache, seed=3)
    s = svf.scales(z, cache)
    n0 = cache.names[0]
    assert torch.allclose((cache.S[n0] * s[n0]).sum(), cache.S[n0].sum(), rtol=1e-5)
    assert _rel(svf.compose(*cache.usv(n0), s[n0]), params[n0].detach()) > 1e-4
    fw = svf.functional_weights(z_const, cache, "code", dtype=torch.bfloat16)
    assert fw[n0].dtype == torch.bfloat16


def test_constant_z_generates_like_base_and_restore_is_bitwise(tiny, cache, model):
    ids = _ids(tiny)
    orig = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = model.generate(ids, max_new_tokens=20, do_sample=False)
    patcher = svf.SVFPatcher(model, cache)
    with patcher.patched(svf.scales({n: torch.zeros(cache.rank(n)) for n in cache.names}, cache)):
        assert not torch.equal(model.state_dict()[cache.names[0]], orig[cache.names[0]])  # really recomposed
        assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False), base)
    for k, v in model.state_dict().items():
        assert torch.equal(v, orig[k]), k
    # a real expert changes the output; applying a subset restores the rest; apply(None) restores
    s = svf.scales({n: torch.randn(cache.rank(n), generator=torch.Generator().manual_seed(0)) * 3
                    for n in cache.names}, cache)
    with torch.no_grad():
        base_logits = model(ids).logits
    with svf.SVFPatcher(model, cache) as p:
        p.apply(s)
        with torch.no_grad():
            assert (model(ids).logits - base_logits).abs().max() > 1e-3
        p.apply({cache.names[0]: s[cache.names[0]]})
        assert torch.equal(model.state_dict()[cache.names[1]], orig[cache.names[1]])
        assert not torch.equal(model.state_dict()[cache.names[0]], orig[cache.names[0]])
        assert p.apply(None) >= 0
        assert torch.equal(model.state_dict()[cache.names[0]], orig[cache.names[0]])
        p.apply(s)
    for k, v in model.state_dict().items():
        assert torch.equal(v, orig[k]), k
    with pytest.raises(T2EvalError, match="no SVD factors"):
        svf.SVFPatcher(model, cache).apply({"model.layers.0.self_attn.q_proj.weight": torch.ones(64)})


def _loss(module_or_model, ids, target):
    logits = module_or_model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[0, :-1], target)


@pytest.mark.parametrize("param", ["code", "paper"])
def test_gradient_matches_finite_differences(tiny, cache, param):
    from transformers import AutoModelForCausalLM

    model64 = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float64).eval()
    c64 = cache.to(dtype=torch.float64)
    ids = _ids(tiny)[:, :8]
    target = torch.randint(0, 1000, (7,), generator=torch.Generator().manual_seed(1))
    z0 = svf.init_z(cache, seed=5) if param == "code" else {
        n: 1 + 0.1 * torch.randn(cache.rank(n), generator=torch.Generator().manual_seed(2)) for n in cache.names}
    z0 = {n: v.double() for n, v in z0.items()}
    mod = svf.SVFModule(model64, c64, z0, param)
    loss = _loss(mod, ids, target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in zip(mod.names, mod.z)}
    # HF's LlamaRMSNorm computes in fp32 even for fp64 models, so the loss carries ~1e-7 relative
    # noise: a central difference with eps=1e-3 (truncation error O(eps²)) is the accurate choice.
    eps = 1e-3
    checked = 0
    for n in (cache.names[0], cache.names[-1]):
        for i in (0, 7, cache.rank(n) - 1):
            zp = {k: v.clone() for k, v in z0.items()}
            zm = {k: v.clone() for k, v in z0.items()}
            zp[n][i] += eps
            zm[n][i] -= eps
            with torch.no_grad():
                fp = _loss(svf.SVFModule(model64, c64, zp, param), ids, target)
                fm = _loss(svf.SVFModule(model64, c64, zm, param), ids, target)
            fd = ((fp - fm) / (2 * eps)).item()
            assert grads[n][i].item() == pytest.approx(fd, rel=5e-3, abs=2e-5), (n, i)
            checked += 1
    assert checked == 6 and any(g.abs().max() > 0 for g in grads.values())


def test_compose_once_accumulation_equals_end_to_end(tiny, cache, model):
    ids = _ids(tiny)
    batches = [(ids[:, :6], torch.tensor([5, 6, 7, 8, 9])), (ids[:, 2:9], torch.tensor([1, 2, 3, 4, 5, 6]))]
    z0 = svf.init_z(cache, seed=9)
    ref = svf.SVFModule(model, cache, z0)
    for x, t in batches:
        _loss(ref, x, t).backward()
    acc = svf.SVFModule(model, cache, z0)
    with acc.accumulate():
        for x, t in batches:
            _loss(acc, x, t).backward()
    for a, b in zip(ref.z, acc.z):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    assert all(not p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in acc.parameters()) == sum(cache.rank(n) for n in cache.names)


@pytest.mark.parametrize("param", ["code", "paper"])
def test_mixture_one_hot_and_linearity(cache, param):
    zs = [svf.init_z(cache, seed=k, std=0.5) for k in range(3)]
    single = [svf.scales(z, cache, param) for z in zs]
    for k in range(3):
        a = torch.zeros(3)
        a[k] = 1
        mixed = svf.mix_scales(zs, a, cache, param)
        am = torch.zeros(3, len(cache))
        am[k] = 1
        mixed_m = svf.mix_scales(zs, am, cache, param, per="matrix")
        for n in cache.names:
            assert torch.equal(mixed[n], single[k][n]) and torch.equal(mixed_m[n], single[k][n])
    # per matrix: a different expert for each matrix, in canonical order
    am = torch.zeros(3, len(cache))
    am[torch.arange(len(cache)) % 3, torch.arange(len(cache))] = 1
    mm = svf.mix_scales(zs, am, cache, param, per="matrix")
    for j, n in enumerate(cache.names):
        assert torch.equal(mm[n], single[j % 3][n])
    # normalise: α and 2α give the same mixture; the mixture is in mask space (code) / z space (paper)
    a = torch.tensor([0.2, 0.5, 0.3])
    m1 = svf.mix_scales(zs, a, cache, param)
    m2 = svf.mix_scales(zs, 2 * a, cache, param, normalise=True)
    n = cache.names[0]
    assert torch.allclose(m1[n], m2[n], atol=1e-6)
    if param == "paper":
        assert torch.allclose(m1[n], sum(a[k] * zs[k][n] for k in range(3)), atol=1e-6)
    else:
        mask = sum(a[k] * torch.sigmoid(zs[k][n]) for k in range(3))
        assert torch.allclose(m1[n], mask * cache.S[n].sum() / (cache.S[n] * mask).sum(), atol=1e-6)
        assert torch.equal(svf.mix_scales(zs, torch.zeros(3), cache, param)[n], torch.ones(cache.rank(n)))
    with pytest.raises(T2EvalError, match="shape"):
        svf.mix_scales(zs, torch.ones(3, 2), cache, param, per="matrix")


def test_shuffle_sigma_deterministic_permutation(cache):
    z = svf.init_z(cache, seed=0, std=1.0)
    a, b, c = svf.shuffle_sigma(z, 7), svf.shuffle_sigma(z, 7), svf.shuffle_sigma(z, 8)
    for n in cache.names:
        assert torch.equal(a[n], b[n])
        assert torch.equal(torch.sort(a[n]).values, torch.sort(z[n]).values)
        assert not torch.equal(a[n], z[n]) and not torch.equal(a[n], c[n])
    ev = svf.ExpertVector.from_svd(z, cache, task="gsm8k")
    sh = svf.shuffle_sigma(ev, 7)
    assert sh.meta["shuffled_sigma"] == 7 and torch.equal(sh.z[cache.names[0]], a[cache.names[0]])


def test_expert_file_roundtrip_and_corruption(cache, tmp_path):
    z = svf.init_z(cache, seed=1)
    ev = svf.ExpertVector.from_svd(z, cache, param="code", task="gsm8k", provenance={"stage": "test"})
    p = ev.save(tmp_path / "e" / "z.safetensors")
    back = svf.ExpertVector.load(p)
    assert back.meta == ev.meta and back.param == "code" and back.names == cache.names
    assert all(torch.equal(back.z[n], z[n]) for n in cache.names)
    assert back.meta["base_model"]["config_sha256"] == cache.model["config_sha256"]
    assert back.meta["targets"] == "mlp"
    s1, s2 = svf.scales(back, cache), svf.scales(z, cache)
    assert all(torch.equal(s1[n], s2[n]) for n in cache.names)
    with pytest.raises(T2EvalError, match="parameterisation"):
        svf.scales(back, cache, param="paper")
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(CorruptArtifactError):
        svf.ExpertVector.load(p)
    with pytest.raises(T2EvalError, match="not found"):
        svf.ExpertVector.load(tmp_path / "nope.safetensors")


def test_cross_model_refusal(cache, tmp_path):
    other = ensure_svd(tiny_model_dir(1), "mlp", tmp_path / "s1.safetensors")  # same shapes, other weights
    ev = svf.ExpertVector.from_svd(svf.init_z(cache, seed=0), cache, task="gsm8k")
    with pytest.raises(T2EvalError, match="allow_cross_model"):
        svf.scales(ev, other)
    with pytest.raises(T2EvalError, match="allow_cross_model"):
        svf.mix_scales([ev, ev], [0.5, 0.5], other)
    s = svf.scales(ev, other, allow_cross_model=True)  # Table 5: transfer to an equal-shape model
    assert set(s) == set(other.names)
    # names of another target set / other shapes are refused even when cross-model is allowed
    attn = ensure_svd(tiny_model_dir(0), "attn", tmp_path / "attn.safetensors")
    with pytest.raises(T2EvalError, match="lacks"):
        svf.scales(ev, attn, allow_cross_model=True)
    bad = {n: torch.zeros(v.numel() + 1) for n, v in ev.z.items()}
    with pytest.raises(T2EvalError, match="does not fit"):
        svf.scales(bad, cache)
