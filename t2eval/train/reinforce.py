"""SVF expert training with REINFORCE (PROTOCOL §3): the SVF learner of the training loop.

Per iteration (`t2eval.train.loop`): sample a batch of train docs without replacement (numpy
RandomState(seed), as the release), roll out greedy completions of the current policy W′(z) with a
backend (HF or vLLM, via `set_scales`), reward ±1 with the task's own `score_batch`, and take one
optimiser step on

    loss = −Σ_j r_j Σ_t log π_W′(ŷ_jt) / B  (+ λ Σ_j Σ_t KL_t / B when λ > 0)

computed in padded micro-batches (train/losses.py). The model keeps its base weights; the policy
forward is `torch.func.functional_call` with W′ as detached leaf tensors, whose accumulated
gradients are pushed through W′(z) once per step (the release's two-stage backward, batched).

Precision (`svf_precision`, PROTOCOL §8): "bf16" (the release) makes z a bf16 parameter (so Adam's
states are bf16) and composes W′ in bf16 from bf16 factors (`svf.SVFModule(precision=)`); the HF
rollouts compose at the same precision (`svf.SVFPatcher(precision=)` on the shared model). The
vLLM engine composes the scales itself (recorded as `rollout_precision`). "fp32" (default) is fp32
throughout.

Vision-language models (issue 10, LLaVA-NeXT): the learner loads the processor too, the rollouts
generate from (prompt, image) pairs and the loss gets each sequence's images (`loop`,
`backends.hf_vlm`). Only language-model matrices are scaled: the SVD cache must have the language
scope (its names all inside the language model, `svd.model_layout`), so the vision tower and the
projector are never composed, patched or given gradients.

Objective `ntp` (Table 4 row #4) replaces the rollouts by the task's reference solutions (+ EOS)
and minimises their mean token NLL.

Output dir: z.safetensors (best validation, written with t2eval.svf), log.jsonl (one row per
iteration), checkpoints/latest.pt (see `loop`), provenance.json. Re-running the same command
resumes from latest.pt and rewrites z.safetensors and log.jsonl from it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from ..errors import T2EvalError
from . import losses, loop
from .configs import SVFTrainConfig

log = logging.getLogger(__name__)

__all__ = ["SVFTrainConfig", "SVFLearner", "svf_policy_gradient", "train_svf"]


def _svf():
    try:
        from .. import svf
    except ImportError as e:  # pragma: no cover - only before t2eval.svf exists
        raise T2EvalError(f"t2eval.svf is not available: {e}") from None
    return svf


def svf_policy_gradient(policy, prompt_ids, completion_ids, weights, *, pad_id: int, micro_batch: int = 8,
                        kl_coef: float = 0.0, kl_direction: str = "code", device="cpu",
                        extra_inputs=None) -> dict[str, float]:
    """Accumulate ∂loss/∂z into `policy.z` grads (policy: a `t2eval.svf.SVFModule`); returns the loss terms.

    W′(z) is composed once per step (`SVFModule.accumulate`); the batched micro-batch
    forwards/backwards accumulate ∂loss/∂W′, then one backward through W′(z) reaches z. The KL
    reference is the wrapped model itself, which holds the base weights. `extra_inputs`: the
    sequences' further forward inputs (a VLM's images, `losses.sequence_loss_backward`).
    """
    with policy.accumulate():
        return losses.sequence_loss_backward(
            policy, prompt_ids, completion_ids, weights, pad_id=pad_id, micro_batch=micro_batch,
            device=device, kl_coef=kl_coef, ref_forward=policy.model if kl_coef > 0 else None,
            kl_direction=kl_direction, extra_inputs=extra_inputs)


def z_stats(z: dict[str, torch.Tensor]) -> dict[str, float]:
    flat = torch.cat([v.detach().reshape(-1) for v in z.values()])
    return {"z_mean": float(flat.mean()), "z_std": float(flat.std()) if flat.numel() > 1 else 0.0,
            "z_min": float(flat.min()), "z_max": float(flat.max())}


def vision_inputs(cfg: SVFTrainConfig, model, svd):
    """(processor, `hf_vlm.ImageEncoder`) of a vision-language model, (None, None) for a text model
    (`loop.vision_inputs`).

    Refuses an SVD cache with a matrix outside the language model (scope other than "language"):
    SVF on a vision-language model scales language-model matrices only."""
    from ..models.loading import is_vision_language

    if is_vision_language(cfg.model):
        from ..svd import model_layout

        prefix = model_layout(cfg.model)["language_prefix"]
        outside = [n for n in svd.names if not n.startswith(prefix + ".")]
        if outside:
            raise T2EvalError(f"SVD cache {cfg.svd} scales {outside[0]}, outside the language model ({prefix}): SVF on "
                              "a vision-language model scales language-model matrices only; decompose with scope language")
    return loop.vision_inputs(cfg, model)


class SVFLearner:
    """The trainable z of one SVF expert (an `SVFModule` over the frozen model) for `loop.train`."""

    stage, state_key, what = "train-svf", "z", "z"

    def __init__(self, cfg: SVFTrainConfig):
        from ..models.loading import load_model, load_tokenizer
        from ..svd import load_svd

        svf = _svf()
        self.cfg = cfg
        self.optimizer = cfg.optimizer
        model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
        for p in model.parameters():
            p.requires_grad_(False)
        self.svd = load_svd(cfg.svd, expect_model=cfg.model, device=cfg.device)
        params = dict(model.named_parameters())
        missing = [n for n in self.svd.names if n not in params]
        if missing:
            raise T2EvalError(f"SVD cache {cfg.svd} names {missing[0]} which {cfg.model} does not have: "
                              "decompose this model (t2eval decompose)")
        self.processor, self.image_encoder = vision_inputs(cfg, model, self.svd)
        self.tokenizer = self.processor.tokenizer if self.processor is not None else load_tokenizer(cfg.model)
        self.model = model
        self.policy = svf.SVFModule(model, self.svd, svf.init_z(self.svd, cfg.seed), param=cfg.param,
                                    precision=cfg.svf_precision)
        self.z = self.policy.z_dict()
        # HF rollouts share `model`: W′ is written into it at the training precision
        self.patcher = svf.SVFPatcher(model, self.svd, precision=cfg.svf_precision)
        self.rollout_precision = cfg.svf_precision if cfg.backend == "hf" else f"{cfg.backend} engine"

    def params(self) -> list[torch.Tensor]:
        return list(self.z.values())

    def state(self) -> dict[str, torch.Tensor]:
        return {n: v.detach().clone() for n, v in self.z.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n in self.z:
                self.z[n].copy_(state[n])

    def make_backend(self, cfg: SVFTrainConfig):
        return loop.build_backend(cfg.backend, self.model, self.tokenizer, cfg, self.svd, processor=self.processor)

    @contextlib.contextmanager
    def generating(self, backend):
        """The backend generates with W′(z) inside, with the base weights after (HF: the shared model
        patched at `svf_precision`; other engines: their own `set_scales`)."""
        shared = getattr(backend, "model", None) is self.model
        swap = self.patcher.apply if shared else backend.set_scales
        swap(self.policy.scales())
        try:
            yield
        finally:
            swap(None)

    def loss_backward(self, p_ids, c_ids, weights, extra_inputs=None) -> dict[str, float]:
        c = self.cfg
        return svf_policy_gradient(self.policy, p_ids, c_ids, weights, pad_id=self.tokenizer.pad_token_id,
                                   micro_batch=c.micro_batch, kl_coef=c.kl_coef, kl_direction=c.kl_direction,
                                   device=c.device, extra_inputs=extra_inputs)

    def log_stats(self) -> dict[str, float]:
        return z_stats(self.z)

    def write_outputs(self, out: Path, state: dict[str, torch.Tensor], best: dict) -> None:
        """z.safetensors: the best z in t2eval.svf's expert format (atomic), with the training settings."""
        svf, c = _svf(), self.cfg
        training = {"objective": c.objective, "optimizer": c.optimizer, "kl_coef": c.kl_coef, "seed": c.seed,
                    "model": str(c.model), "svd": str(c.svd), "iteration": best["iteration"],
                    "split_scores": best["split_scores"], "svf_precision": c.svf_precision,
                    "rollout_precision": self.rollout_precision, "protocol": loop.protocol_record(c)}
        svf.ExpertVector.from_svd(state, self.svd, self.policy.param, c.task, training=training,
                                  svf_precision=c.svf_precision).save(out / "z.safetensors")

    def summary_paths(self, out: Path) -> dict:
        return {"z": str(out / "z.safetensors")}

    def inputs(self) -> dict:
        return {"model": str(self.cfg.model), "svd": str(self.cfg.svd)}

    def provenance(self) -> dict:
        return {"svf_precision": self.cfg.svf_precision, "rollout_precision": self.rollout_precision}


def train_svf(cfg: SVFTrainConfig, task=None) -> dict:
    """Train (or resume) an SVF expert; returns a summary dict (best valid, iterations, paths).

    `task`: a task object (default: `get_task(cfg.task, **cfg.task_options)`).
    """
    return loop.run_training(cfg, SVFLearner, task)
