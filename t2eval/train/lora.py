"""The LoRA baseline (PROTOCOL §4): peft LoRA, next-token prediction on reference solutions.

Defaults: rank 16, α 32, dropout 0.05 on q_proj + v_proj (`targets="mlp+attn"` adds gate/up/down
for Table 4 row #7); loss = mean token NLL of the reference solution (+ EOS) given the chat prompt,
prompt tokens masked (labels −100); AdamW lr 5e-5, global batch 256 by gradient accumulation over
micro-batches, gradient-norm clip 1.0, 200 iterations; every k iterations greedy generation on
the validation split scored by the task; the best-validation adapter is kept (peft
`save_pretrained` files in the output dir), `checkpoints/latest.pt` allows resuming, and
`log.jsonl` has one row per iteration like the SVF trainer.

`objective="pg"` (Table 4 row #5) trains the adapter with the SVF trainer's REINFORCE loss
(train/losses.py): greedy rollouts of the current adapter, rewards ±1 from the task scorer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import T2EvalError
from . import losses
from .reinforce import (append_jsonl, atomic_torch_save, load_task, model_family, nonfinite_error,
                        read_checkpoint, resume_counters, task_data, training_batch,
                        progress_bar, sample_batch, truncate_log)
from .rollout import rollout

log = logging.getLogger(__name__)

LORA_TARGETS = {"attn": ["q_proj", "v_proj"], "mlp+attn": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}
RESUME_FREE = ("out", "micro_batch", "eval_limit", "eval_splits", "stop_after", "device", "data_dir", "progress")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class LoRATrainConfig:
    model: str
    task: str
    out: str
    iterations: int = 200
    batch_size: int = 256
    micro_batch: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: str = "attn"
    objective: str = "ntp"                 # ntp | pg
    max_new_tokens: int | None = None
    eval_every: int = 10
    eval_limit: int | None = None
    eval_splits: tuple[str, ...] = ("valid",)
    temperature: float = 0.0
    seed: int = 42
    data_dir: str = "data"
    dtype: str = "float32"
    device: str = "cpu"
    task_options: dict = field(default_factory=dict)
    stop_after: int | None = None
    progress: bool = True

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        d["eval_splits"] = list(d["eval_splits"])
        return {k: v for k, v in d.items() if k not in RESUME_FREE}


def lora_model(model, rank: int = 16, alpha: int = 32, dropout: float = 0.05, targets: str = "attn",
               seed: int = 0):
    """Wrap `model` with a fresh, seeded peft LoRA adapter (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    if targets not in LORA_TARGETS:
        raise T2EvalError(f"unknown LoRA targets {targets!r}: use {' or '.join(LORA_TARGETS)}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS[targets],
                     bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)


def lm_labels(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int):
    """(input_ids, attention_mask, labels) of a left-padded batch: labels −100 on prompt and padding.

    The trainer's loss (`losses.sequence_loss_backward` with `ntp_weights`) equals transformers'
    causal-LM loss with these labels (tested); this is the explicit form of that masking.
    """
    from ..backends.hf import left_pad

    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    ids, mask, _ = left_pad(seqs, pad_id)
    labels = torch.full_like(ids, -100)
    for i, c in enumerate(completion_ids):
        if len(c):
            labels[i, ids.shape[1] - len(c):] = torch.as_tensor(list(c))
    return ids, mask, labels


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model, out: Path) -> None:
    """peft `save_pretrained` into `out`, file by file atomically (tmp dir + rename)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=out))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in sorted(tmp.iterdir()):
            if f.is_file():
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_adapter(model_dir: str, adapter_dir: str, dtype: str = "float32", device: str = "cpu"):
    """The base model with a saved adapter (for evaluation)."""
    from peft import PeftModel

    from ..models.loading import load_model

    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise T2EvalError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json): train it with `t2eval train-lora`")
    return PeftModel.from_pretrained(load_model(model_dir, dtype=dtype, device=device), adapter_dir).eval()


def train_lora(cfg: LoRATrainConfig, task=None) -> dict:
    """Train (or resume) a LoRA adapter; returns a summary dict."""
    from ..backends.hf import HFBackend
    from ..models.loading import load_model, load_tokenizer
    from ..provenance import record, write_sidecar

    if cfg.objective not in ("ntp", "pg"):
        raise T2EvalError(f"unknown objective {cfg.objective!r}: use ntp (next-token prediction) or pg (REINFORCE)")
    if cfg.iterations < 1 or cfg.batch_size < 1 or cfg.micro_batch < 1 or cfg.eval_every < 1:
        raise T2EvalError("--iterations, --batch-size, --micro-batch and --eval-every must be ≥ 1")
    t_start = time.perf_counter()
    out = Path(cfg.out)
    ckpt_path = out / "checkpoints" / "latest.pt"
    log_path = out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    if task is None:
        task = load_task(cfg.task, **cfg.task_options)
    family = model_family(cfg.model)
    tok = load_tokenizer(cfg.model)
    model = lora_model(load_model(cfg.model, dtype=cfg.dtype, device=cfg.device), cfg.rank, cfg.alpha,
                       cfg.dropout, cfg.targets, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_docs, eval_docs, max_new = task_data(task, cfg)
    rng = np.random.RandomState(cfg.seed)
    start, best = 0, {"valid": -math.inf, "iteration": None}

    ck = read_checkpoint(ckpt_path, cfg.identity())
    if ck is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in ck["adapter"]:
                    p.copy_(ck["adapter"][n])
        opt.load_state_dict(ck["optimizer"])
        start, best = resume_counters(ck, rng, log_path)
    else:
        truncate_log(log_path, 0)

    backend = HFBackend(model=model, tokenizer=tok, device=cfg.device, batch_size=max(cfg.micro_batch, 8))
    end = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, start + cfg.stop_after)
    bar = progress_bar(cfg.iterations, start, cfg.progress, f"train-lora {cfg.task}")
    try:
        for it in range(start, end):
            times = {"rollout_s": 0.0, "grad_s": 0.0, "eval_s": 0.0}
            t0 = time.perf_counter()
            docs = [train_docs[i] for i in sample_batch(rng, len(train_docs), cfg.batch_size)]
            model.eval()
            p_ids, c_ids, weights, rewards = training_batch(
                cfg.objective, tok, task, docs, family,
                lambda: rollout(backend, task, docs, family=family, max_new_tokens=max_new,
                                temperature=cfg.temperature))
            times["rollout_s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            model.train()
            opt.zero_grad(set_to_none=False)
            stats = losses.sequence_loss_backward(model, p_ids, c_ids, weights, pad_id=tok.pad_token_id,
                                                  micro_batch=cfg.micro_batch, device=cfg.device)
            model.eval()
            if not math.isfinite(stats["loss"]):
                raise nonfinite_error("the loss", it, ckpt_path)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            if not math.isfinite(grad_norm):
                raise nonfinite_error("the gradient", it, ckpt_path)
            opt.step()
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise nonfinite_error("the adapter weights", it, ckpt_path)
            times["grad_s"] = time.perf_counter() - t0

            row: dict[str, Any] = {
                "iteration": it,
                "reward_mean": float(np.mean(rewards)) if rewards else None,
                "reward_std": float(np.std(rewards)) if rewards else None,
                "pg_loss": stats["pg_loss"] if cfg.objective == "pg" else None,
                "ntp_loss": stats["pg_loss"] if cfg.objective == "ntp" else None,
                "kl": 0.0, "loss": stats["loss"], "grad_norm": grad_norm,
                "lr": opt.param_groups[0]["lr"], "completion_tokens": stats["n_tokens"],
            }
            if it % cfg.eval_every == 0 or it == cfg.iterations - 1:
                t0 = time.perf_counter()
                scores = {s: rollout(backend, task, d, family=family, max_new_tokens=max_new).accuracy
                          for s, d in eval_docs.items() if d}
                times["eval_s"] = time.perf_counter() - t0
                row["split_scores"] = scores
                v = scores.get("valid", scores.get("train", 0.0))
                row["best"] = v > best["valid"]
                if row["best"]:
                    best = {"valid": v, "iteration": it, "split_scores": scores}
                    save_adapter(model, out)
            row["time"] = times
            offset = append_jsonl(log_path, row)
            atomic_torch_save({
                "iteration": it, "adapter": trainable_state(model), "adapter_names": names,
                "optimizer": opt.state_dict(), "np_rng": rng.get_state(), "torch_rng": torch.get_rng_state(),
                "log_offset": offset, "best": best, "identity": cfg.identity(),
            }, ckpt_path)
            bar.update(1)
            bar.set_postfix(loss=row["loss"], valid=best["valid"])
    finally:
        bar.close()

    done = end >= cfg.iterations
    summary = {"task": cfg.task, "iterations_done": end, "finished": done, "best": best, "adapter": str(out),
               "trainable_params": int(sum(p.numel() for p in params)), "log": str(log_path)}
    if done:
        write_sidecar(out, record("train-lora", dataclasses.asdict(cfg), seeds={"seed": cfg.seed},
                                  inputs={"model": str(cfg.model)},
                                  timings={"train_s": time.perf_counter() - t_start}, extra={"summary": summary}))
    return summary
