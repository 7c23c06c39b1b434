"""Expert files → SVF scales, cached: the one place the adaptation code touches `t2eval.svf`.

`ExpertBank(svd, param, shuffle_sigma)` turns an expert file into the per-matrix scales every
backend's `set_scales` takes, and a few-shot α (alpha.json) plus the experts into mixed scales.
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
    allows experts trained on another base model (Table 5 transfer)."""

    def __init__(self, svd, param: str | None = None, shuffle_sigma: int | None = None,
                 cross_model: bool = False):
        if param not in (None, "code", "paper"):
            raise T2EvalError(f"param={param!r}: use param=code (sigmoid + mass rescaling, the default) "
                              "or param=paper (W' = U diag(σ ⊙ z) Vᵀ)")
        self.svd_arg = svd
        self.param = param
        self.shuffle_sigma = None if shuffle_sigma in (None, "", "none") else int(shuffle_sigma)
        self.cross_model = bool(cross_model)
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
                                          allow_cross_model=self.cross_model)
        return self._cache[key]

    def mix(self, paths: Sequence[str | Path], alpha, per: str = "vector", normalise: bool = False):
        """Scales of the α-mixture of experts (PROTOCOL §6.3; the code mixes post-sigmoid masks)."""
        from .. import svf

        return self.mix_loaded([self.load(p) for p in paths], alpha, per, normalise)

    def mix_loaded(self, experts, alpha, per: str = "vector", normalise: bool = False):
        from .. import svf

        return svf.mix_scales(experts, alpha, self.svd, param=self.param, per=per, normalise=normalise,
                              allow_cross_model=self.cross_model)


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
