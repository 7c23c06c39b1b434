"""The interface every generation backend implements (HF in hf.py, vLLM in vllm.py).

Weights are changed in place through SVF *scales*: for every targeted matrix name (HF parameter
name, e.g. "model.layers.0.mlp.gate_proj.weight") a fp32 vector s with W' = U diag(σ ⊙ s) Vᵀ.
`t2eval.svf` turns expert vectors z (one expert, a mixture with α, shuffled σ order, either
parameterisation) into scales, so backends never need to know how an expert was built; for vLLM
only s crosses the process boundary. `set_scales(None)` restores the base weights exactly.

One weight-swap interface, `ScaleSwapper.set_scales(scales) -> seconds`, with one implementation
per engine: `hf.HFScaleSwapper` (in-place patch of a transformers model) and
`vllm.VLLMScaleSwapper` (a running vLLM engine). The rollout/training backends (`HFBackend`,
`VLLMBackend`) and both flavours of the lm-eval model `t2` (`t2eval.lm.T2LM`,
`t2eval.backends.vllm_lm.T2VLLM`) swap through them; `t2eval.backends.make_backend` builds a backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch


@dataclass
class Generation:
    text: str
    n_tokens: int
    token_ids: list[int] = field(default_factory=list)


@runtime_checkable
class ScaleSwapper(Protocol):
    def set_scales(self, scales: Mapping[str, torch.Tensor] | None) -> float:
        """Load W' = U diag(σ ⊙ s) Vᵀ for each named matrix (None: base weights). Returns seconds spent."""

    def close(self) -> None:
        """Put the base weights back and drop any cached state."""


def svd_of(svd):
    """The SVD behind `svd`: the value itself, or the result of calling it (a lazy provider)."""
    return svd() if callable(svd) else svd


@runtime_checkable
class Backend(Protocol):
    name: str
    tokenizer: object

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] | None = None,
                 temperature: float = 0.0, seed: int | None = None) -> list[Generation]:
        """Greedy when temperature == 0. `prompts` are fully rendered (chat template + prefill)."""

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy continuation)."""

    def set_scales(self, scales: Mapping[str, torch.Tensor] | None) -> float:
        """Load W' = U diag(σ ⊙ s) Vᵀ for each named matrix (None: base weights). Returns seconds spent."""

    def close(self) -> None: ...
