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
    """The corrected (mask-space) mixture: a one-hot α gives exactly that expert's scales."""
    zs = [svf.init_z(cache, seed=k, std=0.5) for k in range(3)]
    single = [svf.scales(z, cache, param) for z in zs]
    for k in range(3):
        a = torch.zeros(3)
        a[k] = 1
        mixed = svf.mix_scales(zs, a, cache, param, mix_space="mask")
        am = torch.zeros(3, len(cache))
        am[k] = 1
        mixed_m = svf.mix_scales(zs, am, cache, param, per="matrix", mix_space="mask")
        for n in cache.names:
            assert torch.equal(mixed[n], single[k][n]) and torch.equal(mixed_m[n], single[k][n])
    # per matrix: a different expert for each matrix, in canonical order
    am = torch.zeros(3, len(cache))
    am[torch.arange(len(cache)) % 3, torch.arange(len(cache))] = 1
    mm = svf.mix_scales(zs, am, cache, param, per="matrix", mix_space="mask")
    for j, n in enumerate(cache.names):
        assert torch.equal(mm[n], single[j % 3][n])
    # normalise: α and 2α give the same mixture; the mixture is in mask space (code) / z space (paper)
    a = torch.tensor([0.2, 0.5, 0.3])
    m1 = svf.mix_scales(zs, a, cache, param, mix_space="mask")
    m2 = svf.mix_scales(zs, 2 * a, cache, param, normalise=True, mix_space="mask")
    n = cache.names[0]
    assert torch.allclose(m1[n], m2[n], atol=1e-6)
    if param == "paper":
        assert torch.allclose(m1[n], sum(a[k] * zs[k][n] for k in range(3)), atol=1e-6)
    else:
        mask = sum(a[k] * torch.sigmoid(zs[k][n]) for k in range(3))
        assert torch.allclose(m1[n], mask * cache.S[n].sum() / (cache.S[n] * mask).sum(), atol=1e-6)
        assert torch.equal(svf.mix_scales(zs, torch.zeros(3), cache, param, mix_space="mask")[n],
                           torch.ones(cache.rank(n)))
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


# --------------------------------------------------------------------------- release mixing (PROTOCOL §6.3, §8)

def _sig(x):
    import math

    return 1 / (1 + math.exp(-x))


def test_mix_space_hand_computed():
    """Two experts, one matrix with σ = (3, 1), α = (0.5, 0.25), computed by hand."""
    z1, z2, S = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 1.0]), torch.tensor([3.0, 1.0])
    # release: m = 0.5·z1 + 0.25·z2 = (0.75, -0.25); Σσ = 4, Σσm = 2.25 - 0.25 = 2 → s = 2m
    raw = svf.mix_vector([z1, z2], [0.5, 0.25], S, "code", "raw_z")
    assert raw.tolist() == [1.5, -0.5]
    # corrected: m = 0.5·sigmoid(z1) + 0.25·sigmoid(z2), then the same mass rescale
    m = [0.5 * _sig(0.5) + 0.25 * _sig(2.0), 0.5 * _sig(-1.0) + 0.25 * _sig(1.0)]
    c = 4 / (3 * m[0] + 1 * m[1])
    mask = svf.mix_vector([z1, z2], [0.5, 0.25], S, "code", "mask")
    assert mask.tolist() == pytest.approx([m[0] * c, m[1] * c], rel=1e-6)
    assert mask.tolist() == pytest.approx([1.1120539, 0.6638382], rel=1e-6)
    # paper experts: z space either way, no rescale
    for space in svf.MIX_SPACES:
        assert svf.mix_vector([z1, z2], [0.5, 0.25], S, "paper", space).tolist() == [0.75, -0.25]
    # all-zero α: the base weights (s = 1) instead of 0/0
    assert svf.mix_vector([z1, z2], [0.0, 0.0], S, "code", "raw_z").tolist() == [1.0, 1.0]
    with pytest.raises(T2EvalError, match="mix_space"):
        svf.mix_vector([z1, z2], [0.5, 0.25], S, "code", "sigmoid")


def test_mix_scales_release_default_is_raw_z_per_matrix(cache):
    """mix_scales defaults to the release rule: raw z, per-matrix α, not normalised."""
    zs = [svf.init_z(cache, seed=k, std=0.5) for k in range(3)]
    names = cache.names
    a = torch.rand(3, len(names), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = svf.mix_scales(zs, a, cache, "code", per="matrix")
    for j, n in enumerate(names):
        m = sum(a[k, j] * zs[k][n].double() for k in range(3))
        S = cache.S[n].double()
        want = m * S.sum() / (S * m).sum()
        assert torch.allclose(got[n].double(), want, rtol=1e-5, atol=1e-6), n
    # a one-hot raw-z mixture is NOT the expert itself (the release's quirk): it uses z, not sigmoid(z)
    one = svf.mix_scales(zs, torch.tensor([1.0, 0.0, 0.0]), cache, "code")
    single = svf.scales(zs[0], cache, "code")
    n = names[0]
    assert not torch.allclose(one[n], single[n], atol=1e-3)
    z0 = zs[0][n]
    assert torch.allclose(one[n], z0 * cache.S[n].sum() / (cache.S[n] * z0).sum(), rtol=1e-5)


# --------------------------------------------------------------------------- bf16 precision (PROTOCOL §8)

def _rbf16(x: float) -> float:
    """Round a float (exact in fp64) to the nearest bf16 (8 significant bits, ties to even), by hand."""
    import math

    if x == 0:
        return 0.0
    _, e = math.frexp(x)             # x = f·2^e, 0.5 <= |f| < 1
    q = 2.0 ** (e - 8)               # spacing of 8-bit significands in this binade
    return round(x / q) * q          # Python round(): half to even


def test_bf16_compose_equals_hand_bf16_and_differs_from_fp32():
    U = [[1.0, 0.5], [0.25, 1.0]]
    S = [3.0, 1.0]
    V = [[1.0, 0.5], [0.5, 1.0]]
    s = [0.7, 0.3]
    c = 1.1  # a post-product mass factor, as the release applies it
    # by hand: cast every input to bf16, round after every op (matmul: exact fp32 accumulation, one rounding)
    sb = [_rbf16(x) for x in s]
    assert sb == [0.69921875, 0.30078125]
    d = [_rbf16(S[j] * sb[j]) for j in range(2)]
    A = [[_rbf16(U[i][j] * d[j]) for j in range(2)] for i in range(2)]
    W = [[_rbf16(sum(A[i][j] * V[k][j] for j in range(2))) for k in range(2)] for i in range(2)]
    cb = _rbf16(c)
    Wc = [[_rbf16(W[i][k] * cb) for k in range(2)] for i in range(2)]
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    got = svf.compose(t(U), t(S), t(V), t(s), precision="bf16")
    assert got.dtype == torch.bfloat16 and got.float().tolist() == W
    got_c = svf.compose(t(U), t(S), t(V), t(s), precision="bf16", post_scale=torch.tensor(c))
    assert got_c.float().tolist() == Wc
    fp32 = svf.compose(t(U), t(S), t(V), t(s))
    assert fp32.dtype == torch.float32 and fp32.tolist() != W
    exact = [[sum(U[i][j] * S[j] * s[j] * V[k][j] for j in range(2)) for k in range(2)] for i in range(2)]
    assert fp32.reshape(-1).tolist() == pytest.approx(sum(exact, []), rel=1e-6)
    assert torch.allclose(got.float(), fp32, rtol=2 ** -6)  # same matrix up to bf16 rounding
    with pytest.raises(T2EvalError, match="precision"):
        svf.compose(t(U), t(S), t(V), t(s), precision="fp16")


def test_bf16_training_path_is_the_release_expression(cache, model):
    """SVFModule(precision="bf16"): bf16 z (and so bf16 Adam state), W′ = the release's
    (U @ diag_embed(S*m) @ V.T) * (S.sum() / (S*m).sum()) in bf16; differs from fp32."""
    z0 = svf.init_z(cache, seed=2, std=0.3)
    mod = svf.SVFModule(model, cache, z0, precision="bf16")
    assert all(p.dtype == torch.bfloat16 for p in mod.z)
    W = svf.functional_weights(mod.z_dict(), cache, "code", precision="bf16")
    W32 = svf.functional_weights(z0, cache, "code")
    for n in cache.names:
        U, S, V = (x.to(torch.bfloat16) for x in cache.usv(n))
        mm = torch.sigmoid(z0[n].to(torch.bfloat16))
        want = (U @ torch.diag_embed(S * mm) @ V.T) * (S.sum() / (S * mm).sum())
        assert W[n].dtype == torch.bfloat16 and torch.equal(W[n], want), n
        assert not torch.equal(W[n].float(), W32[n])
        assert _rel(W[n].float(), W32[n]) < 2e-2
    # paper parameterisation: U diag(σ ⊙ z) Vᵀ in bf16, no rescale
    n = cache.names[0]
    zp = {k: torch.ones(cache.rank(k)) * 0.9 for k in cache.names}
    U, S, V = (x.to(torch.bfloat16) for x in cache.usv(n))
    wp = svf.functional_weights(zp, cache, "paper", precision="bf16")[n]
    assert torch.equal(wp, U @ torch.diag_embed(S * zp[n].to(torch.bfloat16)) @ V.T)
    # gradients flow into the bf16 z and Adam keeps bf16 moments
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    opt = torch.optim.Adam(mod.parameters(), lr=1e-2)
    _loss(mod, ids, torch.tensor([5, 9, 13, 17, 21])).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in mod.z)
    opt.step()
    st = opt.state[mod.z[0]]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
    # the compose-once accumulation works in bf16 too and gives the same gradient as end to end
    for p in mod.z:
        p.grad = None
    _loss(mod, ids, torch.tensor([5, 9, 13, 17, 21])).backward()
    ref = [p.grad.clone() for p in mod.z]
    for p in mod.z:
        p.grad = None
    with mod.accumulate():
        _loss(mod, ids, torch.tensor([5, 9, 13, 17, 21])).backward()
    for r, p in zip(ref, mod.z):
        assert p.grad.dtype == torch.bfloat16 and torch.allclose(p.grad.float(), r.float(), rtol=2e-2, atol=1e-4)
    # saved experts stay fp32 files (bf16 values are exact in fp32)
    ev = mod.expert(task="gsm8k")
    assert ev.z[n].dtype == torch.float32 and torch.equal(ev.z[n].to(torch.bfloat16).float(), ev.z[n])


def test_bf16_scales_and_patcher(cache, model):
    z = svf.init_z(cache, seed=6, std=0.5)
    s16 = svf.scales(z, cache, precision="bf16")
    s32 = svf.scales(z, cache)
    n = cache.names[0]
    assert s16[n].dtype == torch.float32 and torch.equal(s16[n].to(torch.bfloat16).float(), s16[n])
    assert not torch.equal(s16[n], s32[n]) and torch.allclose(s16[n], s32[n], rtol=2 ** -5)
    mixed = svf.mix_scales([z, z], [0.5, 0.5], cache, precision="bf16")
    assert torch.equal(mixed[n].to(torch.bfloat16).float(), mixed[n])
    orig = model.state_dict()[n].clone()
    with svf.SVFPatcher(model, cache, precision="bf16") as p:
        p.apply(s16)
        assert torch.equal(model.state_dict()[n], svf.compose(*cache.usv(n), s16[n], precision="bf16").float())
    assert torch.equal(model.state_dict()[n], orig)
    with pytest.raises(T2EvalError, match="precision"):
        svf.SVFPatcher(model, cache, precision="half")
