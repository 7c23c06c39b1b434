"""SVF expert vectors (PROTOCOL §2): parameterisations, W′ composition, in-place apply/restore,
mixtures, σ-order shuffling, the expert file format and the differentiable training path.

Every targeted matrix W = U diag(σ) Vᵀ (see :mod:`t2eval.svd`) gets one vector z (length r). The
backends only ever see per-matrix *scales* s with W′ = U diag(σ ⊙ s) Vᵀ, made here:

* ``code`` (default, the released code): m = sigmoid(z) (max_mult = 1),
  s = m · Σσ / Σ(σ ⊙ m) — the singular-value mass is kept, so a constant z gives W′ = W.
  (If Σ(σ ⊙ m) is exactly 0 — only possible for an all-zero mixture α — s = 1, the base weights.)
* ``paper``: s = z, i.e. W′ = U diag(σ ⊙ z) Vᵀ, so z = 1 gives W′ = W.

Few-shot mixtures (PROTOCOL §6.3, §8), option ``mix_space`` of :func:`mix_scales`:

* ``raw_z`` (default, the released code): m = Σ_k α_k z_k, the *raw* z vectors, used directly as the
  multiplier (no sigmoid), then the σ-mass rescale: s = m · Σσ / Σ(σ ⊙ m).
* ``mask`` (an alternative, what an earlier PROTOCOL.md described): m = Σ_k α_k sigmoid(z_k), then
  the same rescale, so a one-hot α gives exactly that expert's scales. Both named protocols mix
  ``raw_z`` (protocol knob ``fewshot_mix``); ``mask`` is there as an override.

For ``paper`` experts both are z′ = Σ_k α_k z_k (there is no sigmoid and no rescale).

Precision, option ``precision`` (``svf_precision`` in the workflow; PROTOCOL §8):

* ``fp32`` (default): all arithmetic in fp32 (fp64 if the inputs are fp64); W′ is cast to the
  model dtype once at the end.
* ``bf16`` (the released code): z, U, σ, V are cast to bf16 and every step is a bf16 op, as the
  release does on GPU: d = σ ⊙ m, A = U diag(d) (one rounding per entry), W′ = A Vᵀ (bf16 matmul),
  and for ``code`` the mass factor c = Σσ / Σ(σ ⊙ m) (bf16 sums and division) multiplies W′ after
  the product (release order: ``(U @ diag(S*m) @ V.T) * (S.sum() / (S*m).sum())``).
  :class:`SVFModule` (training) and :func:`functional_weights` follow that order exactly and hold z
  as a bf16 parameter (so Adam's states are bf16). The *scales* interface the backends take
  (W′ = U diag(σ ⊙ s) Vᵀ) folds c into s in bf16 (s = m·c rounded to bf16), so backend compositions
  in bf16 can differ from the release's by bf16 rounding (≤ 1 ulp per step), not more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from .errors import CorruptArtifactError, T2EvalError
from .svd import SVDCache, ordered_names

log = logging.getLogger(__name__)

FORMAT = "t2eval-svf-expert/1"
PARAMS = ("code", "paper")
MIX_SPACES = ("raw_z", "mask")       # few-shot mixing: raw z (the release, both protocols) | post-sigmoid masks
PRECISIONS = ("fp32", "bf16")        # W′ composition: fp32 | release (bf16 factors, bf16 ops)


def _check_param(param: str) -> str:
    if param not in PARAMS:
        raise T2EvalError(f"unknown SVF parameterisation {param!r}: use 'code' (default) or 'paper'")
    return param


def check_mix_space(mix_space: str) -> str:
    if mix_space not in MIX_SPACES:
        raise T2EvalError(f"mix_space={mix_space!r}: use 'raw_z' (the release: Σ α_k z_k as the multiplier) "
                          "or 'mask' (Σ α_k sigmoid(z_k), post-sigmoid masks)")
    return mix_space


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise T2EvalError(f"svf precision {precision!r}: use 'fp32' or 'bf16' (the release: bf16 z and factors)")
    return precision


def _cdtype(t: torch.Tensor, precision: str = "fp32") -> torch.dtype:
    if precision == "bf16":
        return torch.bfloat16
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- expert file

@dataclass
class ExpertVector:
    """One expert: z per matrix name + metadata (base_model, targets, layers, param, task, provenance)."""

    z: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def param(self) -> str:
        return self.meta.get("param", "code")

    @property
    def names(self) -> list[str]:
        return ordered_names(self.z)

    @classmethod
    def from_svd(cls, z: Mapping[str, torch.Tensor], svd: SVDCache, param: str = "code", task: str | None = None,
                 provenance: Mapping | None = None, **extra) -> "ExpertVector":
        """Wrap z with the metadata of the model `svd` was built from."""
        model = svd.model
        meta = {"base_model": {"key": model.get("key"), "dir": model.get("dir"),
                               "config_sha256": model.get("config_sha256"),
                               "tensor_sha256": {n: model["tensors"][n]["sha256"] for n in z
                                                 if n in model.get("tensors", {})}},
                "targets": svd.targets, "layers": svd.manifest.get("layers"), "param": _check_param(param),
                "task": task, "provenance": dict(provenance or {}), **extra}
        return cls({n: z[n].detach().to("cpu", torch.float32).contiguous() for n in ordered_names(z)}, meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic write of ``z.safetensors`` (1-D fp32 tensors; metadata JSON under key ``meta``)."""
        from safetensors.torch import save_file

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        tensors = {n: self.z[n].detach().to("cpu", torch.float32).reshape(-1).contiguous() for n in self.names}
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(self.meta, default=str)})
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertVector":
        from safetensors import safe_open

        p = Path(path)
        if not p.exists():
            raise T2EvalError(f"expert vector {p} not found: train it with `t2eval train-svf`")
        try:
            with safe_open(p, "pt") as h:
                md = h.metadata() or {}
                if md.get("format") != FORMAT:
                    raise CorruptArtifactError(f"{p} is not an SVF expert file (format={md.get('format')!r})")
                meta = json.loads(md["meta"])
                z = {k: h.get_tensor(k) for k in h.keys()}
        except CorruptArtifactError:
            raise
        except Exception as e:
            raise CorruptArtifactError(f"expert vector {p} is unreadable ({type(e).__name__}: {e}); "
                                       "retrain it or restore a checkpoint") from None
        for n, t in z.items():
            if t.ndim != 1 or t.dtype != torch.float32 or not torch.isfinite(t).all():
                raise CorruptArtifactError(f"expert vector {p}: {n} is not a finite 1-D fp32 tensor")
        return cls(z, meta)


ZLike = Union[ExpertVector, Mapping[str, torch.Tensor]]


def init_z(svd: SVDCache, seed: int, mean: float = 0.1, std: float = 0.01,
           names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """z ~ mean + N(0, std²) per matrix (PROTOCOL §2 code init), one generator, canonical order."""
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for n in ordered_names(names or svd.names):
        out[n] = mean + std * torch.randn(svd.rank(n), generator=g, dtype=torch.float32)
    return out


# --------------------------------------------------------------------------- compatibility

def check_compatible(expert: ZLike, svd: SVDCache, allow_cross_model: bool = False) -> dict[str, torch.Tensor]:
    """The z dict of `expert` if it can be applied with `svd`; else a T2EvalError saying why.

    Names and vector lengths must match (never overridable). An expert trained on another base
    model (config or any targeted tensor's sha256 differs) is refused unless `allow_cross_model`
    (PROTOCOL §6, Table 5: Llama3 experts on Mistral).
    """
    z = dict(expert.z if isinstance(expert, ExpertVector) else expert)
    where = f" ({expert.meta.get('task')} expert of {expert.meta.get('base_model', {}).get('key')})" \
        if isinstance(expert, ExpertVector) else ""
    missing = [n for n in z if n not in svd]
    if missing:
        raise T2EvalError(f"expert vector{where} targets {len(missing)} matrix(es) the SVD cache "
                          f"{svd.path} lacks (e.g. {missing[0]}); the cache holds {svd.targets!r} on layers "
                          f"{svd.manifest.get('layers')!r}: decompose with the expert's targets/layers")
    bad = [(n, z[n].numel(), svd.rank(n)) for n in z if z[n].ndim != 1 or z[n].numel() != svd.rank(n)]
    if bad:
        n, a, b = bad[0]
        raise T2EvalError(f"expert vector{where} does not fit this model: {n} has {a} values but rank {b} "
                          f"({len(bad)} mismatching matrices); experts transfer only between equal shapes")
    if isinstance(expert, ExpertVector) and not allow_cross_model:
        base = expert.meta.get("base_model") or {}
        model = svd.model
        diff = []
        if base.get("config_sha256") and base["config_sha256"] != model.get("config_sha256"):
            diff.append("config")
        shas = base.get("tensor_sha256") or {}
        if any(model.get("tensors", {}).get(n, {}).get("sha256") not in (None, s) for n, s in shas.items()):
            diff.append("weights")
        if diff:
            raise T2EvalError(f"expert vector{where} was trained on {base.get('key')} ({base.get('dir')}), "
                              f"not on {model.get('key')} ({' and '.join(diff)} differ); pass "
                              "allow_cross_model=True (cross-model transfer) if that is intended")
    return z


def _param_of(expert: ZLike, param: str | None) -> str:
    if isinstance(expert, ExpertVector):
        if param is not None and param != expert.param:
            raise T2EvalError(f"expert was trained with the {expert.param!r} parameterisation, "
                              f"not {param!r}: its z values mean something else")
        return expert.param
    return _check_param(param or "code")


# --------------------------------------------------------------------------- scales

def _mass_factor(m: torch.Tensor, S: torch.Tensor) -> torch.Tensor | None:
    """c = Σσ / Σ(σ ⊙ m) in m's dtype (None when Σ(σ ⊙ m) is exactly 0: use the base weights)."""
    S = S.to(device=m.device, dtype=m.dtype)
    mass = (S * m).sum()
    if not mass.requires_grad and mass.item() == 0.0:
        return None
    return S.sum() / mass


def _code_rescale(m: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    c = _mass_factor(m, S)
    return torch.ones_like(m) if c is None else m * c


def scale_vector(z: torch.Tensor, S: torch.Tensor, param: str = "code", precision: str = "fp32") -> torch.Tensor:
    """s for one matrix (differentiable in z); computed in bf16 for precision="bf16"."""
    z = z.to(_cdtype(z, check_precision(precision)))
    if param == "paper":
        return z
    if param == "code":
        return _code_rescale(torch.sigmoid(z), S)
    _check_param(param)


def _out(s: torch.Tensor) -> torch.Tensor:
    """Scales leave this module as fp32 (bf16 values are exact in fp32)."""
    return s.float()


def scales(expert: ZLike, svd: SVDCache, param: str | None = None, allow_cross_model: bool = False,
           precision: str = "fp32") -> dict[str, torch.Tensor]:
    """name -> fp32 scale vector s for one expert (ExpertVector or z dict)."""
    param = _param_of(expert, param)
    z = check_compatible(expert, svd, allow_cross_model)
    with torch.no_grad():
        return {n: _out(scale_vector(z[n].detach(), svd.S[n], param, precision)) for n in ordered_names(z)}


def mix_alpha(alpha, K: int, n_matrices: int, per: str = "vector", normalise: bool = False) -> torch.Tensor:
    """α as a (K, n_matrices) fp64 tensor: per="vector" (K,) is broadcast to every matrix, per="matrix"
    must already be (K, n_matrices); `normalise` divides each column by its sum (zero columns stay 0)."""
    a = torch.as_tensor(alpha, dtype=torch.float64).detach().cpu()
    if per == "vector":
        if a.shape != (K,):
            raise T2EvalError(f"per-vector alpha must have shape ({K},), got {tuple(a.shape)}")
        a = a[:, None].expand(K, n_matrices)
    elif per == "matrix":
        if a.shape != (K, n_matrices):
            raise T2EvalError(f"per-matrix alpha must have shape ({K}, {n_matrices}) (experts × matrices "
                              f"in canonical order), got {tuple(a.shape)}")
    else:
        raise T2EvalError(f"per must be 'vector' or 'matrix', not {per!r}")
    if normalise:
        tot = a.sum(0, keepdim=True)
        a = torch.where(tot != 0, a / torch.where(tot != 0, tot, torch.ones_like(tot)), a)
    return a


def mix_vector(vecs: Sequence[torch.Tensor], alpha: Sequence[float], S: torch.Tensor | None, param: str = "code",
               mix_space: str = "raw_z", precision: str = "fp32") -> torch.Tensor:
    """The mixed scale vector of ONE matrix from the experts' z vectors `vecs` and weights `alpha`.

    code + raw_z: m = Σ_k α_k z_k; code + mask: m = Σ_k α_k sigmoid(z_k); both then s = m·Σσ/Σ(σ ⊙ m)
    (s = 1 if Σ(σ ⊙ m) = 0, i.e. α = 0). paper: s = Σ_k α_k z_k. The sum runs k = 0, 1, … in that
    order; for precision="bf16" the z are bf16 and each product and partial sum is rounded to bf16
    (α itself enters as fp32, as the release's fp32 α times its bf16 z)."""
    check_mix_space(mix_space)
    check_precision(precision)
    parts = [v.to(_cdtype(v, precision)) for v in vecs]
    if param == "code" and mix_space == "mask":
        parts = [torch.sigmoid(v) for v in parts]
    coef = [float(torch.tensor(float(a), dtype=torch.float32)) if precision == "bf16" else float(a) for a in alpha]
    acc = parts[0] * coef[0]
    for k in range(1, len(parts)):
        acc = acc + parts[k] * coef[k]
    if param == "code":
        return _code_rescale(acc, S)
    _check_param(param)
    return acc


def mix_scales(experts: Sequence[ZLike], alpha, svd: SVDCache, param: str | None = None,
               per: str = "vector", normalise: bool = False, allow_cross_model: bool = False,
               mix_space: str = "raw_z", precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Scales of the mixture Σ_k α_k · expert_k (PROTOCOL §6.3, §8 few-shot); see :func:`mix_vector`.

    `mix_space`: ``raw_z`` (default, the release: raw z used directly as the multiplier, then the
    σ-mass rescale) or ``mask`` (post-sigmoid masks). `alpha`: shape (K,) for
    per="vector", (K, n_matrices) for per="matrix" (one α per expert and matrix, the release's
    per-layer α) with the matrices in canonical order (:func:`t2eval.svd.ordered_names` of the
    experts' names). `normalise` divides each column by its sum (all-zero columns stay zero; the
    release does not normalise).
    """
    if not experts:
        raise T2EvalError("mix_scales needs at least one expert")
    check_mix_space(mix_space)
    check_precision(precision)
    params = {_param_of(e, param) for e in experts}
    if len(params) != 1:
        raise T2EvalError(f"cannot mix experts trained with different parameterisations {sorted(params)}")
    param = params.pop()
    zs = [check_compatible(e, svd, allow_cross_model) for e in experts]
    names = ordered_names(zs[0])
    for k, z in enumerate(zs[1:], 1):
        if set(z) != set(names):
            raise T2EvalError(f"expert {k} targets other matrices than expert 0; mix experts of one target set")
    a = mix_alpha(alpha, len(experts), len(names), per, normalise)
    with torch.no_grad():
        return {n: _out(mix_vector([z[n] for z in zs], a[:, j].tolist(), svd.S[n], param, mix_space, precision))
                for j, n in enumerate(names)}


def shuffle_sigma(z: ZLike, seed: int) -> ZLike:
    """Table 5 ablation: permute the entries of every z vector at random.

    Each matrix's vector gets its own permutation (torch.randperm from ONE generator seeded with
    `seed`, matrices visited in canonical order), so the value learned for singular direction i is
    applied to another direction of the same matrix; U, σ and V are untouched. Same seed, same
    result. Returns the same type it got (an ExpertVector gets meta["shuffled_sigma"] = seed).
    """
    zd = z.z if isinstance(z, ExpertVector) else z
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for n in ordered_names(zd):
        perm = torch.randperm(zd[n].numel(), generator=g)
        out[n] = zd[n].reshape(-1)[perm.to(zd[n].device)].clone()
    if isinstance(z, ExpertVector):
        return ExpertVector(out, {**z.meta, "shuffled_sigma": int(seed)})
    return out


# --------------------------------------------------------------------------- composition

def compose(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, s: torch.Tensor | None,
            dtype: torch.dtype | None = None, precision: str = "fp32",
            post_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W′ = U diag(σ ⊙ s) Vᵀ (· post_scale), then cast to `dtype`.

    precision="fp32": computed in fp32 (fp64 for fp64 inputs). precision="bf16" (the release): U, σ,
    V, s and post_scale are cast to bf16 and each step is a bf16 op: d = σ ⊙ s, A = U ⊙ d (= U diag(d)),
    W′ = A Vᵀ (bf16 matmul), W′ · post_scale. `post_scale` (a scalar) is how the release applies the
    σ-mass factor, after the product; with post_scale=None the factor is expected inside `s`.
    """
    ct = _cdtype(U, check_precision(precision))
    sig = S.to(ct)
    if s is not None:
        sig = sig * s.to(device=S.device, dtype=ct)
    W = (U.to(ct) * sig) @ V.to(ct).T
    if post_scale is not None:
        W = W * post_scale.to(device=W.device, dtype=ct)
    return W if dtype is None else W.to(dtype)


def compose_z(z: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, param: str = "code",
              precision: str = "fp32", dtype: torch.dtype | None = None) -> torch.Tensor:
    """W′(z) for one matrix, differentiable in z. fp32: compose(U, S, V, scale_vector(z)). bf16: the
    release's order — m = sigmoid(z) in bf16, W′ = (U diag(σ ⊙ m) Vᵀ) · (Σσ / Σ(σ ⊙ m)) ('code'),
    W′ = U diag(σ ⊙ z) Vᵀ ('paper'), every op in bf16."""
    _check_param(param)
    if check_precision(precision) == "fp32":
        return compose(U, S, V, scale_vector(z, S, param), dtype)
    zb = z.to(torch.bfloat16)
    if param == "paper":
        return compose(U, S, V, zb, dtype, "bf16")
    m = torch.sigmoid(zb)
    c = _mass_factor(m, S.to(m.device))
    if c is None:
        return compose(U, S, V, torch.ones_like(m), dtype, "bf16")
    return compose(U, S, V, m, dtype, "bf16", post_scale=c)


def functional_weights(z: Mapping[str, torch.Tensor], svd: SVDCache, param: str = "code",
                       dtype: torch.dtype | None = None, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """name -> W′(z), differentiable in z (for torch.func.functional_call); see :func:`compose_z`."""
    _check_param(param)
    return {n: compose_z(z[n], *svd.usv(n), param=param, precision=precision, dtype=dtype) for n in ordered_names(z)}


class SVFPatcher:
    """Writes W′ into an HF model's parameters in place and puts the originals back exactly.

    ``apply(scales)`` sets every named matrix to U diag(σ ⊙ s) Vᵀ (cast to the parameter's dtype)
    and restores any matrix patched before but absent now; ``apply(None)`` / ``restore()`` copy the
    saved original tensors back (bitwise identical). Originals are cloned on first patch to
    `backup_device` (default: the parameter's own device). Usable as a context manager
    (restores on exit). Returns seconds spent, for the backends' swap timing. `precision`: how W′
    is composed (:func:`compose`; "bf16" = the release's bf16 factors and ops).
    """

    def __init__(self, model: torch.nn.Module, svd: SVDCache, backup_device: str | torch.device | None = None,
                 precision: str = "fp32"):
        self.model, self.svd, self.backup_device = model, svd, backup_device
        self.precision = check_precision(precision)
        self._params = dict(model.named_parameters())
        self._orig: dict[str, torch.Tensor] = {}
        self._patched: set[str] = set()

    def _param(self, name: str) -> torch.nn.Parameter:
        if name not in self._params:
            raise T2EvalError(f"the model has no parameter {name}: the scales were made for another architecture")
        return self._params[name]

    @torch.no_grad()
    def apply(self, scales: Mapping[str, torch.Tensor] | None) -> float:
        t0 = time.perf_counter()
        if scales is None:
            self.restore()
            return time.perf_counter() - t0
        for n in scales:
            if n not in self.svd:
                raise T2EvalError(f"no SVD factors for {n} in {self.svd.path}")
        for n in list(self._patched - set(scales)):
            self._param(n).copy_(self._orig.pop(n))
            self._patched.discard(n)
        for n, s in scales.items():
            p = self._param(n)
            U, S, V = self.svd.usv(n)
            if (U.shape[0], V.shape[0]) != tuple(p.shape):
                raise T2EvalError(f"SVD factors of {n} give {U.shape[0]}×{V.shape[0]}, the model has {tuple(p.shape)}")
            if n not in self._orig:
                self._orig[n] = p.detach().to(self.backup_device or p.device, copy=True)
            p.copy_(compose(U, S, V, s, p.dtype, self.precision))
            self._patched.add(n)
        return time.perf_counter() - t0

    @torch.no_grad()
    def restore(self) -> float:
        t0 = time.perf_counter()
        for n in list(self._orig):
            self._param(n).copy_(self._orig.pop(n))
        self._patched.clear()
        return time.perf_counter() - t0

    @contextlib.contextmanager
    def patched(self, scales: Mapping[str, torch.Tensor] | None):
        self.apply(scales)
        try:
            yield self
        finally:
            self.restore()

    def __enter__(self) -> "SVFPatcher":
        return self

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False


# --------------------------------------------------------------------------- training path

class SVFModule(torch.nn.Module):
    """Trainable z for an HF model whose targeted weights become W′(z) (base weights frozen).

    ``forward(...)`` runs the model through ``torch.func.functional_call`` with W′(z), so the loss
    backpropagates into ``z`` (an ``nn.ParameterList`` in canonical order; ``z_dict()`` by name).

    Compose-once trick for gradient accumulation (``with svf.accumulate(): ...``): at the start of
    an optimizer step W′(z) is computed once without a graph and installed as leaf tensors that
    require grad; every micro-batch's forward/backward then only accumulates G = dL/dW′ in those
    leaves (no per-micro-batch composition, no U·diag·Vᵀ graph kept alive); on exit W′(z) is
    recomposed once *with* a graph and ``torch.autograd.backward(W′, G)`` pushes G into z.grad. By
    the chain rule dL/dz = Σ_batches (∂W′/∂z)ᵀ G_b = (∂W′/∂z)ᵀ Σ_b G_b, this equals end-to-end
    autograd (tested), at the cost of 2 compositions + 1 backward per step instead of per micro-batch.
    For generation (rollouts) use :class:`SVFPatcher` with :meth:`scales`.

    ``precision="bf16"`` (the release, PROTOCOL §8): z is a bf16 parameter (so an optimizer's state,
    e.g. Adam's moments, is bf16 too) and W′ is composed in bf16 from bf16 factors in the release's
    order (:func:`compose_z`); rollouts then need ``SVFPatcher(..., precision="bf16")`` /
    the backend's bf16 composition with :meth:`scales`. :meth:`expert` saves z as fp32 (exact).
    """

    def __init__(self, model: torch.nn.Module, svd: SVDCache, z_init: ZLike, param: str = "code",
                 allow_cross_model: bool = False, precision: str = "fp32"):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: its parameters are not ours to train
        self.svd = svd
        self.precision = check_precision(precision)
        self.param = _param_of(z_init, param) if isinstance(z_init, ExpertVector) else _check_param(param)
        z = check_compatible(z_init, svd, allow_cross_model)
        self.names = ordered_names(z)
        model.requires_grad_(False)
        params = dict(model.named_parameters())
        self._dtypes = {n: params[n].dtype for n in self.names}
        self._devices = {n: params[n].device for n in self.names}
        self.z = torch.nn.ParameterList([torch.nn.Parameter(z[n].detach().clone().to(_cdtype(z[n], precision)))
                                         for n in self.names])
        self._leaves: dict[str, torch.Tensor] | None = None

    def z_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.z))

    def weights(self) -> dict[str, torch.Tensor]:
        W = functional_weights(self.z_dict(), self.svd, self.param, precision=self.precision)
        return {n: w.to(device=self._devices[n], dtype=self._dtypes[n]) for n, w in W.items()}

    def scales(self) -> dict[str, torch.Tensor]:
        return scales(self.z_dict(), self.svd, self.param, precision=self.precision)

    def forward(self, *args, **kwargs):
        W = self._leaves if self._leaves is not None else self.weights()
        return torch.func.functional_call(self.model, W, args, kwargs, strict=False)

    def begin_step(self) -> None:
        with torch.no_grad():
            self._leaves = {n: w.detach().requires_grad_(True) for n, w in self.weights().items()}

    def end_step(self) -> None:
        leaves, self._leaves = self._leaves, None
        if leaves is None:
            raise RuntimeError("end_step() without begin_step()")
        names = [n for n, w in leaves.items() if w.grad is not None]
        if not names:
            return
        W = self.weights()
        torch.autograd.backward([W[n] for n in names], [leaves[n].grad for n in names])

    @contextlib.contextmanager
    def accumulate(self):
        self.begin_step()
        ok = False
        try:
            yield self
            ok = True
        finally:
            if ok:
                self.end_step()
            else:
                self._leaves = None

    def expert(self, task: str | None = None, provenance: Mapping | None = None, **extra) -> ExpertVector:
        return ExpertVector.from_svd(self.z_dict(), self.svd, self.param, task, provenance, **extra)
