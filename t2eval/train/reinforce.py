"""SVF expert training with REINFORCE (PROTOCOL §3), resumable, with best-validation selection.

Per iteration: sample a batch of train docs without replacement (numpy RandomState(seed), as the
release), roll out greedy completions of the current policy W′(z) with a backend (HF or vLLM,
via `set_scales`), reward ±1 with the task's own `score_batch`, and take one optimiser step on

    loss = −Σ_j r_j Σ_t log π_W′(ŷ_jt) / B  (+ λ Σ_j Σ_t KL_t / B when λ > 0)

computed in padded micro-batches (train/losses.py). The model keeps its base weights; the policy
forward is `torch.func.functional_call` with W′ as detached leaf tensors, whose accumulated
gradients are pushed through W′(z) once per step (the release's two-stage backward, batched).

Objective `ntp` (Table 4 row #4) replaces the rollouts by the task's reference solutions (+ EOS)
and minimises their mean token NLL.

Output dir: z.safetensors (best validation, written with t2eval.svf), log.jsonl (one row per
iteration), checkpoints/latest.pt (z, optimiser, scheduler, RNG states, iteration, log offset,
best so far), provenance.json. Re-running the same command resumes from latest.pt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import T2EvalError
from . import losses
from .rollout import encode_completions, rollout

log = logging.getLogger(__name__)

# config fields that may differ between an interrupted run and its resumption
RESUME_FREE = ("out", "backend", "micro_batch", "eval_limit", "eval_splits", "stop_after", "device",
               "data_dir", "progress")


@dataclass
class SVFTrainConfig:
    model: str
    svd: str
    task: str
    out: str
    iterations: int = 200
    batch_size: int = 256
    micro_batch: int = 8
    max_new_tokens: int | None = None      # None: the task's own (512 for the training tasks)
    eval_every: int = 10
    eval_limit: int | None = None          # first n docs of each evaluated split (None: all)
    eval_splits: tuple[str, ...] = ("train", "valid", "test")
    kl_coef: float = 0.0
    kl_direction: str = "code"
    optimizer: str = "adam"                # adam (code) | adamw-cosine (paper)
    lr: float = 2e-3
    weight_decay: float = 0.0              # AdamW only
    grad_clip: float = 1e-3
    param: str = "code"                    # code: sigmoid + mass rescale | paper: σ ⊙ z
    seed: int = 42
    backend: str = "hf"
    data_dir: str = "data"
    objective: str = "pg"                  # pg | ntp
    temperature: float = 0.0
    dtype: str = "float32"
    device: str = "cpu"
    task_options: dict = field(default_factory=dict)
    stop_after: int | None = None          # stop this invocation after n iterations (resume later)
    progress: bool = True

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        d["eval_splits"] = list(d["eval_splits"])
        return {k: v for k, v in d.items() if k not in RESUME_FREE}


# ------------------------------------------------------------------------------------ SVF glue
def _svf():
    try:
        from .. import svf
    except ImportError as e:  # pragma: no cover - only before t2eval.svf exists
        raise T2EvalError(f"t2eval.svf is not available: {e}") from None
    return svf


def svf_policy_gradient(policy, prompt_ids, completion_ids, weights, *, pad_id: int, micro_batch: int = 8,
                        kl_coef: float = 0.0, kl_direction: str = "code", device="cpu") -> dict[str, float]:
    """Accumulate ∂loss/∂z into `policy.z` grads (policy: a `t2eval.svf.SVFModule`); returns the loss terms.

    W′(z) is composed once per step (`SVFModule.accumulate`); the batched micro-batch
    forwards/backwards accumulate ∂loss/∂W′, then one backward through W′(z) reaches z. The KL
    reference is the wrapped model itself, which holds the base weights.
    """
    with policy.accumulate():
        return losses.sequence_loss_backward(
            policy, prompt_ids, completion_ids, weights, pad_id=pad_id, micro_batch=micro_batch,
            device=device, kl_coef=kl_coef, ref_forward=policy.model if kl_coef > 0 else None,
            kl_direction=kl_direction)


# ------------------------------------------------------------------------------------ helpers
def _z_stats(z: dict[str, torch.Tensor]) -> dict[str, float]:
    flat = torch.cat([v.detach().reshape(-1) for v in z.values()])
    return {"z_mean": float(flat.mean()), "z_std": float(flat.std()) if flat.numel() > 1 else 0.0,
            "z_min": float(flat.min()), "z_max": float(flat.max())}


def _finite(z: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in z.values())


def make_optimizer(params: Sequence[torch.Tensor], kind: str, lr: float, iterations: int,
                   weight_decay: float = 0.0):
    """(optimizer, scheduler or None): adam (code release) or adamw + cosine decay (paper)."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr), None
    if kind == "adamw-cosine":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations))
    raise T2EvalError(f"unknown optimizer {kind!r}: use adam (code) or adamw-cosine (paper)")


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def append_jsonl(path: Path, row: dict) -> int:
    """Append one row (flushed + fsynced); returns the file size after it."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def truncate_log(path: Path, offset: int) -> None:
    """Drop log rows written after the checkpoint (an interrupted iteration is redone)."""
    if path.exists() and path.stat().st_size > offset:
        with open(path, "r+") as f:
            f.truncate(offset)


def task_data(task, cfg) -> tuple[list, dict[str, list], int]:
    """Train docs (non-empty), the evaluated splits' docs (limited) and the generation length."""
    train_docs = task.docs("train", cfg.data_dir)
    if not train_docs:
        raise T2EvalError(f"task {cfg.task}: the train split is empty (data dir {cfg.data_dir})")
    eval_docs = {s: limit(task.docs(s, cfg.data_dir), cfg.eval_limit) for s in cfg.eval_splits}
    return train_docs, eval_docs, cfg.max_new_tokens or task.gen_kwargs.get("max_new_tokens", 512)


def training_batch(objective: str, tok, task, docs: list, family: str, policy_rollout):
    """(prompt ids, completion ids, per-sequence weights, rewards) of one iteration's batch.

    pg: the current policy's rollouts (`policy_rollout()`), weighted r/B; ntp: the task's reference
    solutions (+EOS), weighted for the mean token NLL. Shared by the SVF and LoRA trainers."""
    if objective == "pg":
        ro = policy_rollout()
        p_ids, c_ids = encode_completions(tok, ro.prompts, ro.completions)
        return p_ids, c_ids, losses.pg_weights(ro.rewards, len(docs)), ro.rewards
    prompts = [task.prompt(tok, d, family) for d in docs]
    p_ids, c_ids = encode_completions(tok, prompts, [task.reference(d) for d in docs], append_eos=True)
    return p_ids, c_ids, losses.ntp_weights(c_ids), []


def read_checkpoint(ckpt_path: Path, identity: dict) -> dict | None:
    """The resume checkpoint, or None; refuses one written with other settings (names the fields)."""
    if not ckpt_path.exists():
        return None
    ck = torch.load(ckpt_path, weights_only=False)
    if ck["identity"] != identity:
        diff = sorted(k for k in set(ck["identity"]) | set(identity) if ck["identity"].get(k) != identity.get(k))
        raise T2EvalError(f"{ckpt_path} was written with other settings ({', '.join(diff)}); "
                          f"use another --out, or delete {ckpt_path.parent} to start over")
    return ck


def resume_counters(ck: dict, rng: np.random.RandomState, log_path: Path) -> tuple[int, dict]:
    """Restore the RNG states, cut the log back to the checkpoint; (next iteration, best-so-far)."""
    rng.set_state(ck["np_rng"])
    torch.set_rng_state(ck["torch_rng"])
    truncate_log(log_path, ck["log_offset"])
    return ck["iteration"] + 1, ck["best"]


def nonfinite_error(what: str, iteration: int, ckpt: Path) -> T2EvalError:
    kept = f"the last good checkpoint is kept at {ckpt}" if ckpt.exists() else "no checkpoint was written yet"
    return T2EvalError(
        f"{what} is NaN/inf at iteration {iteration}; training stopped ({kept}). Lower --lr, check "
        "the model weights and the SVD cache (t2eval decompose), or use --param code / a smaller --kl-coef")


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


def limit(docs: list, n: int | None) -> list:
    return docs if n is None else docs[:n]


def sample_batch(rng: np.random.RandomState, n_train: int, batch_size: int) -> list[int]:
    """Batch indices without replacement (batch clipped to the train-split size)."""
    return [int(i) for i in rng.choice(n_train, size=min(batch_size, n_train), replace=False)]


# ------------------------------------------------------------------------------------ trainer
def build_backend(kind: str, model, tokenizer, cfg, svd):
    """The rollout backend: HF shares the training model; vLLM is imported lazily."""
    if kind == "hf":
        from ..backends.hf import HFBackend

        return HFBackend(model=model, tokenizer=tokenizer, svd=svd, device=cfg.device,
                         batch_size=max(cfg.micro_batch, 8))
    if kind == "vllm":
        try:
            from ..backends.vllm import VLLMBackend
        except ImportError as e:
            raise T2EvalError(f"--backend vllm is not available here ({e}); use --backend hf") from None
        return VLLMBackend(cfg.model, dtype=cfg.dtype, svd=cfg.svd, seed=cfg.seed)
    raise T2EvalError(f"unknown backend {kind!r}: use hf or vllm")


def load_task(key: str, **options):
    """`get_task`, plus the training key cls_leakfree (= cls with leakfree=True)."""
    from ..tasks import get_task

    if key == "cls_leakfree":
        return get_task("cls", **{"leakfree": True, **options})
    return get_task(key, **options)


def model_family(model_dir: str) -> str:
    from ..config import model_spec

    try:
        return model_spec(model_dir).family
    except T2EvalError:
        return "unknown"


def train_svf(cfg: SVFTrainConfig, task=None) -> dict:
    """Train (or resume) an SVF expert; returns a summary dict (best valid, iterations, paths).

    `task`: a task object (default: `get_task(cfg.task, **cfg.task_options)`).
    """
    from ..models.loading import load_model, load_tokenizer
    from ..provenance import record, write_sidecar
    from ..svd import load_svd

    if cfg.objective not in ("pg", "ntp"):
        raise T2EvalError(f"unknown objective {cfg.objective!r}: use pg (REINFORCE) or ntp (next-token prediction)")
    if cfg.kl_direction not in losses.KL_DIRECTIONS:
        raise T2EvalError(f"--kl-direction must be one of {losses.KL_DIRECTIONS}")
    if cfg.iterations < 1 or cfg.batch_size < 1 or cfg.micro_batch < 1 or cfg.eval_every < 1:
        raise T2EvalError("--iterations, --batch-size, --micro-batch and --eval-every must be ≥ 1")
    t_start = time.perf_counter()
    out = Path(cfg.out)
    ckpt_path = out / "checkpoints" / "latest.pt"
    log_path = out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    svf = _svf()
    if task is None:
        task = load_task(cfg.task, **cfg.task_options)
    family = model_family(cfg.model)
    model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    for p in model.parameters():
        p.requires_grad_(False)
    tok = load_tokenizer(cfg.model)
    svd = load_svd(cfg.svd, expect_model=cfg.model, device=cfg.device)
    missing = [n for n in svd.names if n not in dict(model.named_parameters())]
    if missing:
        raise T2EvalError(f"SVD cache {cfg.svd} names {missing[0]} which {cfg.model} does not have: "
                          "decompose this model (t2eval decompose)")
    train_docs, eval_docs, max_new = task_data(task, cfg)

    policy = svf.SVFModule(model, svd, svf.init_z(svd, cfg.seed), param=cfg.param)
    z = policy.z_dict()
    opt, sched = make_optimizer(list(z.values()), cfg.optimizer, cfg.lr, cfg.iterations, cfg.weight_decay)
    rng = np.random.RandomState(cfg.seed)
    start, best = 0, {"valid": -math.inf, "iteration": None}

    ck = read_checkpoint(ckpt_path, cfg.identity())
    if ck is not None:
        with torch.no_grad():
            for n in z:
                z[n].copy_(ck["z"][n])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None and ck.get("scheduler") is not None:
            sched.load_state_dict(ck["scheduler"])
        start, best = resume_counters(ck, rng, log_path)
        log.info("resuming %s from iteration %d", out, start)
    else:
        truncate_log(log_path, 0)

    backend = build_backend(cfg.backend, model, tok, cfg, svd)

    def set_policy():
        return backend.set_scales(policy.scales())

    def split_scores() -> dict[str, float]:
        set_policy()
        try:
            return {s: rollout(backend, task, d, family=family, max_new_tokens=max_new).accuracy
                    for s, d in eval_docs.items() if d}
        finally:
            backend.set_scales(None)

    end = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, start + cfg.stop_after)
    bar = progress_bar(cfg.iterations, start, cfg.progress, f"train-svf {cfg.task}")
    try:
        for it in range(start, end):
            times = {"rollout_s": 0.0, "grad_s": 0.0, "eval_s": 0.0}
            t0 = time.perf_counter()
            docs = [train_docs[i] for i in sample_batch(rng, len(train_docs), cfg.batch_size)]
            def policy_rollout():
                set_policy()
                try:
                    return rollout(backend, task, docs, family=family, max_new_tokens=max_new,
                                   temperature=cfg.temperature)
                finally:
                    backend.set_scales(None)

            p_ids, c_ids, weights, rewards = training_batch(cfg.objective, tok, task, docs, family, policy_rollout)
            times["rollout_s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            for v in z.values():
                v.grad = None
            stats = svf_policy_gradient(policy, p_ids, c_ids, weights,
                                        pad_id=tok.pad_token_id, micro_batch=cfg.micro_batch,
                                        kl_coef=cfg.kl_coef, kl_direction=cfg.kl_direction, device=cfg.device)
            for v in z.values():
                if v.grad is None:
                    v.grad = torch.zeros_like(v)
            if not math.isfinite(stats["loss"]):
                raise nonfinite_error("the loss", it, ckpt_path)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(z.values()), cfg.grad_clip))
            if not math.isfinite(grad_norm):
                raise nonfinite_error("the gradient", it, ckpt_path)
            lr_now = opt.param_groups[0]["lr"]
            opt.step()
            if sched is not None:
                sched.step()
            if not _finite(z):
                raise nonfinite_error("z", it, ckpt_path)
            times["grad_s"] = time.perf_counter() - t0

            row: dict[str, Any] = {
                "iteration": it,
                "reward_mean": float(np.mean(rewards)) if rewards else None,
                "reward_std": float(np.std(rewards)) if rewards else None,
                "pg_loss": stats["pg_loss"], "kl": stats["kl"], "loss": stats["loss"],
                "grad_norm": grad_norm, **_z_stats(z), "lr": lr_now,
                "completion_tokens": stats["n_tokens"],
            }
            if it % cfg.eval_every == 0 or it == cfg.iterations - 1:
                t0 = time.perf_counter()
                scores = split_scores()
                times["eval_s"] = time.perf_counter() - t0
                row["split_scores"] = scores
                v = scores.get("valid", scores.get("train", 0.0))
                row["best"] = v > best["valid"]
                if row["best"]:
                    best = {"valid": v, "iteration": it, "split_scores": scores}
                    save_expert(out / "z.safetensors", policy, cfg, extra={"iteration": it, "split_scores": scores})
            row["time"] = times
            offset = append_jsonl(log_path, row)
            atomic_torch_save({
                "iteration": it, "z": {n: v.detach().clone() for n, v in z.items()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None,
                "np_rng": rng.get_state(), "torch_rng": torch.get_rng_state(), "log_offset": offset,
                "best": best, "identity": cfg.identity(),
            }, ckpt_path)
            bar.update(1)
            bar.set_postfix(reward=row["reward_mean"], valid=best["valid"])
    finally:
        bar.close()
        backend.set_scales(None)
        backend.close()

    done = end >= cfg.iterations
    summary = {"task": cfg.task, "iterations_done": end, "finished": done, "best": best,
               "z": str(out / "z.safetensors"), "log": str(log_path)}
    if done:
        write_sidecar(out, record("train-svf", dataclasses.asdict(cfg), seeds={"seed": cfg.seed},
                                  inputs={"model": str(cfg.model), "svd": str(cfg.svd)},
                                  timings={"train_s": time.perf_counter() - t_start},
                                  extra={"summary": summary}))
    return summary


def save_expert(path: Path, policy, cfg: SVFTrainConfig, extra: dict) -> None:
    """Write the current z in t2eval.svf's expert format (atomic), with the training settings."""
    policy.expert(task=cfg.task, training={"objective": cfg.objective, "optimizer": cfg.optimizer,
                                           "kl_coef": cfg.kl_coef, "seed": cfg.seed, "model": str(cfg.model),
                                           "svd": str(cfg.svd), **extra}).save(path)
