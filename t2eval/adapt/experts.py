"""Expert files → SVF scales, cached: the one place the adaptation code touches `t2eval.svf`.

`ExpertBank(svd, param, shuffle_sigma, cross_model, precision)` turns an expert file into the
per-matrix scales every backend's `set_scales` takes, and a few-shot α (alpha.json) plus the experts
into mixed scales (`mix`, `mix_fitted`). Before anything is patched, `check_model(model_dir, experts)`
checks the SVD cache and the experts against the model they patch (PROTOCOL §2; issue 13): the cache
must be the decomposition of that model's weights, and each expert must have been trained on it
unless cross-model transfer is allowed (Table 5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from ..constants import EXPERT_NAMES
from ..errors import T2EvalError


def parse_experts(value) -> dict[str, str]:
    """`{"math": P, ...}` from a dict or a string `math:P,code:P,reasoning:P` (`,` `;` `|` or space)."""
    if not value:
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    out: dict[str, str] = {}
    import re

    for item in re.split(r"[;,|\s]+", str(value).strip()):
        if not item:
            continue
        name, sep, path = item.partition(":")
        if not sep or not path:
            raise T2EvalError(f"bad expert spec {item!r} in experts={value!r}: write NAME:PATH, e.g. "
                              "experts=math:experts/m/svf/gsm8k;code:...;reasoning:... (names: "
                              f"{', '.join(EXPERT_NAMES)})")
        out[name] = path
    return out


def expert_file(path: str | Path) -> Path:
    """An expert's z file: the path itself or `<dir>/z.safetensors`."""
    p = Path(path)
    if p.is_dir():
        p = p / "z.safetensors"
    if not p.exists():
        raise T2EvalError(f"expert vector not found: {p}; train it with `t2eval train-svf` or fix the path")
    return p


class ExpertBank:
    """Scales for expert files, cached. `param` None = each expert's own parameterisation (a given
    param must match it); `shuffle_sigma` = seed of the Table 5 σ-order shuffle; `cross_model`
    allows experts trained on another base model (Table 5 transfer); `precision` = how scales and
    mixtures are computed (``fp32``, or ``bf16`` as the release: `svf_precision`, see :mod:`t2eval.svf`)."""

    def __init__(self, svd, param: str | None = None, shuffle_sigma: int | None = None,
                 cross_model: bool = False, precision: str = "fp32"):
        from ..svf import check_precision

        if param not in (None, "code", "paper"):
            raise T2EvalError(f"param={param!r}: use param=code (sigmoid + mass rescaling, the default) "
                              "or param=paper (W' = U diag(σ ⊙ z) Vᵀ)")
        self.svd_arg = svd
        self.param = param
        self.shuffle_sigma = None if shuffle_sigma in (None, "", "none") else int(shuffle_sigma)
        self.cross_model = bool(cross_model)
        self.precision = check_precision(precision or "fp32")
        self._svd = None
        self._cache: dict = {}

    @property
    def svd(self):
        if self._svd is None:
            if self.svd_arg is None:
                raise T2EvalError("SVF experts need the SVD of the model's weights: add svd=<cache path> "
                                  "(written by `t2eval decompose`) to the model arguments")
            from .. import svd as svd_mod

            self._svd = svd_mod.load_svd(self.svd_arg) if isinstance(self.svd_arg, (str, Path)) else self.svd_arg
        return self._svd

    def check_model(self, model_dir: str | Path, experts: Mapping[str, str | Path] | Sequence[str | Path] = (),
                    full: bool = False, hint: str = "") -> None:
        """Refuse to patch `model_dir` (a directory or registry key) with a cache or experts made for
        another model: the SVD cache must be the decomposition of its weights
        (:func:`t2eval.svd.check_svd_for_model`: config hash, shapes, sampled content hashes — every
        byte with `full`), and every expert (name → path, or paths) must fit the cache and have been
        trained on this model (:func:`t2eval.svf.check_compatible`), unless the bank allows cross-model
        experts. The cache is always checked: cross-model transfer applies another model's *experts*
        to this model's own decomposition. Raises StaleCacheError / T2EvalError naming the file;
        `hint` is appended to an expert-of-another-model error (e.g. the CLI flag that allows it)."""
        from .. import svf
        from ..svd import check_svd_for_model

        check_svd_for_model(self.svd, model_dir, full=full)
        items = experts.items() if isinstance(experts, Mapping) else ((None, p) for p in experts)
        for name, path in items:
            if path is None:
                continue
            who = f"expert {name!r} ({path})" if name is not None else f"expert {path}"
            e = self.load(path)
            try:
                svf.check_compatible(e, self.svd, allow_cross_model=True)  # names and shapes: never overridable
            except T2EvalError as err:
                raise T2EvalError(f"{who}: {err}") from None
            try:
                svf.check_compatible(e, self.svd, self.cross_model)  # trained on this model?
            except T2EvalError as err:
                raise T2EvalError(f"{who}: {err}{hint}") from None

    def load(self, path: str | Path):
        from .. import svf

        e = svf.ExpertVector.load(expert_file(path))
        return svf.shuffle_sigma(e, self.shuffle_sigma) if self.shuffle_sigma is not None else e

    def scales(self, path: str | Path | None):
        """Scales for one expert file (None → None, the base weights)."""
        if path is None:
            return None
        key = str(path)
        if key not in self._cache:
            from .. import svf

            self._cache[key] = svf.scales(self.load(path), self.svd, param=self.param,
                                          allow_cross_model=self.cross_model, precision=self.precision)
        return self._cache[key]

    def mix(self, paths: Sequence[str | Path], alpha, per: str = "vector", normalise: bool = False,
            mix_space: str = "raw_z"):
        """Scales of the α-mixture of the experts at `paths` (PROTOCOL §6.3, §8): `mix_space` ``raw_z``
        (the release: m = Σ α_k z_k, the raw z vectors used directly as the multiplier, then the σ-mass
        rescale) or ``mask`` (m = Σ α_k sigmoid(z_k)); see :func:`t2eval.svf.mix_scales`."""
        return self.mix_loaded([self.load(p) for p in paths], alpha, per, normalise, mix_space)

    def mix_loaded(self, experts, alpha, per: str = "vector", normalise: bool = False, mix_space: str = "raw_z"):
        from .. import svf

        return svf.mix_scales(experts, alpha, self.svd, param=self.param, per=per, normalise=normalise,
                              allow_cross_model=self.cross_model, mix_space=mix_space, precision=self.precision)

    def mix_fitted(self, fitted: Mapping, experts: Mapping[str, str | Path]):
        """Scales of a fitted few-shot mixture: `fitted` is alpha.json's content (:func:`load_alpha`),
        `experts` name → path (every name alpha.json mixes must be given). Mixes as the search did:
        its `per`, `normalised` and `mix_space` (raw_z when absent: files from before it was recorded)."""
        try:
            paths = [experts[n] for n in fitted["experts"]]
        except KeyError as e:
            raise T2EvalError(f"the few-shot α mixes expert {e.args[0]!r} but no path was given for it "
                              f"(given: {', '.join(experts) or 'none'})") from None
        return self.mix(paths, fitted["alpha"], per=fitted.get("per", "vector"),
                        normalise=bool(fitted.get("normalised", False)), mix_space=fitted.get("mix_space", "raw_z"))


def load_alpha(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "alpha.json"
    if not p.exists():
        raise T2EvalError(f"few-shot weights not found: {p}; run `t2eval fit-fewshot` first")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise T2EvalError(f"{p} is not valid JSON (line {e.lineno}): delete it and re-run `t2eval fit-fewshot`") from None
    if "alpha" not in d or "experts" not in d:
        raise T2EvalError(f"{p} lacks 'alpha' or 'experts'; re-run `t2eval fit-fewshot`")
    return d
