"""The one training loop shared by the SVF and LoRA trainers (nanoGPT-style: read it top to bottom).

What differs between the two methods lives in a small *learner* object (`reinforce.SVFLearner`,
`lora.LoRALearner`): its trainable tensors, how the policy's weights are put in place for
generation, the loss backward, extra log fields, and how the best state is written as the stage's
declared outputs (z.safetensors; the peft adapter files). Everything else is here, once:

    per iteration: sample a batch → rollouts (pg) or reference targets (ntp) → loss + backward →
    clip + optimiser/scheduler step → every k iterations evaluate (valid selects the best) →
    checkpoint → log row

The protocol (`--protocol`, t2eval.protocol): `apply_protocol` makes it and its training knobs
concrete in the config (so they are part of the resume identity) and the default of the process
while the run lasts, so the task (`get_task`: reward, data) and the backends follow it; the loss
inputs follow `bos` and `pg_code_prompt` (losses.loss_inputs), the classifier tasks generate
`cls_max_new_tokens` tokens (`generation_length`); provenance.json records the protocol.

Resume that cannot get stuck: `checkpoints/latest.pt` holds everything a run has produced — the
current state, optimiser/scheduler/RNG states, the *best* state with its scores, every log row and
the training time so far. Re-running the same command continues from it, and every invocation
ends by (re)writing the declared outputs (best state, log.jsonl; provenance.json when finished)
from that checkpoint. So outputs deleted after an interruption (Snakemake's `--rerun-incomplete`
deletes a job's outputs before re-running it) are always rewritten, bit-identical, even when the
run had already finished.

Vision-language models (issue 10): a learner on one has an `image_encoder`
(`backends.hf_vlm.ImageEncoder`) and its backend generates with images; an image task
(`rollout.ImageTask`: docs with an image, its own reward) then rolls out (prompt, image) pairs, and
`training_batch` expands each prompt's image token and hands the loss the images of its sequences
(`ImageSequences`), which the micro-batcher keeps aligned with the rows. Nothing else changes: the
same checkpoint, resume and outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..constants import CLS_TASKS
from ..errors import T2EvalError
from .configs import KNOB_FIELDS, TrainConfig
from .rollout import doc_image, is_image_task, rollout
from . import losses

log = logging.getLogger(__name__)

CHECKPOINT = Path("checkpoints") / "latest.pt"
LOG = "log.jsonl"


# ------------------------------------------------------------------------------------ helpers
def resolve_protocol(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with a concrete protocol name and knob fields (None → the protocol's value).

    The knob overrides in force are $T2EVAL_PROTOCOL_OVERRIDES (the workflow's protocol_overrides)
    plus the knob fields given explicitly; they are kept in `protocol_overrides`."""
    from .. import protocol as P

    name = P.check(cfg.protocol) if cfg.protocol else P.default_protocol()
    fields = {k: getattr(cfg, k) for k in KNOB_FIELDS
              if getattr(cfg, k) is not None and getattr(cfg, k) != P.value(k, name, {})}
    over = {**P.env_overrides(), **cfg.protocol_overrides, **fields}
    knobs = P.settings(name, over)  # validates the overrides
    return dataclasses.replace(cfg, protocol=name, protocol_overrides=over, **{k: knobs[k] for k in KNOB_FIELDS})


@contextlib.contextmanager
def apply_protocol(cfg: TrainConfig):
    """Yield the resolved config (`resolve_protocol`) with its protocol made the process default
    (`protocol.use`: what `get_task` and the backends read), restoring the environment after."""
    from .. import protocol as P

    cfg = resolve_protocol(cfg)
    with P.using(cfg.protocol, cfg.protocol_overrides or {}):
        yield cfg


def protocol_record(cfg: TrainConfig) -> dict:
    """What provenance.json and the expert's metadata say about the protocol (name, overrides, knobs)."""
    from .. import protocol as P

    return P.record(cfg.protocol, cfg.protocol_overrides)


def check_config(cfg: TrainConfig) -> None:
    """Refuse impossible settings before anything is loaded."""
    if cfg.objective not in ("pg", "ntp"):
        raise T2EvalError(f"unknown objective {cfg.objective!r}: use pg (REINFORCE) or ntp (next-token prediction)")
    if getattr(cfg, "kl_direction", "code") not in losses.KL_DIRECTIONS:
        raise T2EvalError(f"--kl-direction must be one of {losses.KL_DIRECTIONS}")
    if cfg.iterations < 1 or cfg.batch_size < 1 or cfg.micro_batch < 1 or cfg.eval_every < 1:
        raise T2EvalError("--iterations, --batch-size, --micro-batch and --eval-every must be ≥ 1")


def make_optimizer(params: Sequence[torch.Tensor], kind: str, lr: float, iterations: int,
                   weight_decay: float = 0.0):
    """(optimizer, scheduler or None): adam (SVF code release), adamw (LoRA), adamw-cosine (SVF paper)."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr), None
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), None
    if kind == "adamw-cosine":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations))
    raise T2EvalError(f"unknown optimizer {kind!r}: use adam (code) or adamw-cosine (paper)")


def build_backend(kind: str, model, tokenizer, cfg, svd=None, processor=None):
    """The rollout/evaluation backend (`backends.make_backend`): HF shares the training model (rollouts see
    its current weights); vLLM starts its own engine on the model directory. With a `processor` (a
    vision-language model) either backend generates from (prompt, image) pairs (vLLM's LLaVA needs torchvision:
    where it is missing, `--backend vllm` stops with an error saying so)."""
    from ..backends import make_backend

    return make_backend(kind, cfg.model, svd=svd if kind == "hf" else getattr(cfg, "svd", None), dtype=cfg.dtype,
                        device=cfg.device, batch_size=max(cfg.micro_batch, 8), seed=cfg.seed,
                        model=model, tokenizer=tokenizer, processor=processor)


def vision_inputs(cfg, model):
    """(processor, `hf_vlm.ImageEncoder`) of a vision-language model (`cfg.model`), (None, None) for a text
    model: what a learner needs to roll out and score (prompt, image) pairs."""
    from ..models.loading import is_vision_language, load_processor

    if not is_vision_language(cfg.model):
        return None, None
    from ..backends.hf_vlm import ImageEncoder

    processor = load_processor(cfg.model)
    return processor, ImageEncoder(processor, dtype=model.dtype, device=cfg.device)


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


def limit(docs: list, n: int | None) -> list:
    return docs if n is None else docs[:n]


def generation_length(cfg, task) -> int:
    """Rollout/eval length: the classifier tasks `cls_max_new_tokens` (the protocol's: 1024, the release's
    classifier-expert training, whatever --max-new-tokens says); others --max-new-tokens, else the task's."""
    if cfg.task in CLS_TASKS:
        if cfg.cls_max_new_tokens is not None:
            return int(cfg.cls_max_new_tokens)
        from ..protocol import value

        return int(value("cls_max_new_tokens", cfg.protocol))
    return cfg.max_new_tokens or task.gen_kwargs.get("max_new_tokens", 512)


def task_data(task, cfg) -> tuple[list, dict[str, list], int]:
    """Train docs (non-empty), the evaluated splits' docs (limited) and the generation length."""
    train_docs = task.docs("train", cfg.data_dir)
    if not train_docs:
        raise T2EvalError(f"task {cfg.task}: the train split is empty (data dir {cfg.data_dir})")
    eval_docs = {s: limit(task.docs(s, cfg.data_dir), cfg.eval_limit) for s in cfg.eval_splits}
    return train_docs, eval_docs, generation_length(cfg, task)


def sample_batch(rng: np.random.RandomState, n_train: int, batch_size: int) -> list[int]:
    """Batch indices without replacement (batch clipped to the train-split size)."""
    return [int(i) for i in rng.choice(n_train, size=min(batch_size, n_train), replace=False)]


def training_batch(objective: str, tok, task, docs: list, family: str, policy_rollout, *, bos: str = "double",
                   pg_code_prompt: str = "prefill_turn", image_encoder=None):
    """(prompt ids, completion ids, per-sequence weights, rewards, extra inputs) of one iteration's batch.

    pg: the current policy's rollouts (`policy_rollout()`), scored after `losses.pg_prompt` (the
    release: code completions after the pre-fill as an assistant turn), weighted r/B; ntp: the
    task's reference solutions (+EOS) after the sampling prompt, weighted for the mean token NLL.
    Prompts are tokenised with the BOS rule `bos` (`losses.loss_inputs`). Extra inputs: None, or
    for an image task the sequences' images (`image_encoder.encode`: image tokens expanded in the
    prompt ids, an `ImageSequences` for `losses.sequence_loss_backward(extra_inputs=)`)."""
    if objective == "pg":
        ro = policy_rollout()
        prompts = [losses.pg_prompt(task, tok, d, p, family, pg_code_prompt) for d, p in zip(ro.docs, ro.prompts)]
        completions, images = ro.completions, ro.images
        weights, rewards = losses.pg_weights(ro.rewards, len(docs)), ro.rewards
    else:
        prompts = [task.prompt(tok, d, family) for d in docs]
        completions = [task.reference(d) for d in docs]
        images = [doc_image(task, d) for d in docs] if is_image_task(task) else None
        weights, rewards = None, []
    p_ids, c_ids = losses.loss_inputs(tok, prompts, completions, bos=bos, append_eos=objective == "ntp")
    extra = None
    if images is not None:
        p_ids, extra = image_encoder.encode(p_ids, images)
        c_ids = image_encoder.plain_completions(completions, c_ids)
    return p_ids, c_ids, weights if weights is not None else losses.ntp_weights(c_ids), rewards, extra


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row (flushed + fsynced)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """The whole log (atomic): the checkpoint's rows, the same bytes `append_jsonl` wrote."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def read_checkpoint(ckpt_path: Path, identity: dict) -> dict | None:
    """The resume checkpoint, or None; refuses one written with other settings (names the fields)."""
    if not ckpt_path.exists():
        return None
    ck = torch.load(ckpt_path, weights_only=False)
    if ck["identity"] != identity:
        diff = sorted(k for k in set(ck["identity"]) | set(identity) if ck["identity"].get(k) != identity.get(k))
        raise T2EvalError(f"{ckpt_path} was written with other settings ({', '.join(diff)}); "
                          f"use another --out, or delete {ckpt_path.parent} to start over")
    if "rows" not in ck:
        raise T2EvalError(f"{ckpt_path} was written by an older t2eval (no log rows / best state in it); "
                          f"delete {ckpt_path.parent} to start over")
    return ck


def nonfinite_error(what: str, iteration: int, ckpt: Path) -> T2EvalError:
    kept = f"the last good checkpoint is kept at {ckpt}" if ckpt.exists() else "no checkpoint was written yet"
    return T2EvalError(
        f"{what} is NaN/inf at iteration {iteration}; training stopped ({kept}). Lower --lr, check "
        "the model weights and the SVD cache (t2eval decompose), or use --param code / a smaller --kl-coef")


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


def _finite(params: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


# ------------------------------------------------------------------------------------ the loop
def run_training(cfg, learner_cls, task=None) -> dict:
    """Train (or resume) with `learner_cls` under cfg's protocol; `task` defaults to `load_task(cfg.task,
    **cfg.task_options)`. The entry point of both trainers (`train_svf`, `train_lora`)."""
    with apply_protocol(cfg) as cfg:  # the task, the loss inputs and the backends follow --protocol
        check_config(cfg)
        torch.manual_seed(cfg.seed)
        if task is None:
            task = load_task(cfg.task, **cfg.task_options)
        return train(cfg, learner_cls(cfg), task)


def train(cfg: TrainConfig, learner, task) -> dict:
    """Train (or resume, or just re-emit the outputs of) one run of `learner`; returns a summary.

    `learner` (SVFLearner / LoRALearner) is built by the caller, after `torch.manual_seed(cfg.seed)`;
    `cfg` as `apply_protocol` yields it (an unresolved one is resolved here, without touching the environment).
    """
    cfg = resolve_protocol(cfg)
    t_start = time.perf_counter()
    out = Path(cfg.out)
    ckpt_path, log_path = out / CHECKPOINT, out / LOG
    out.mkdir(parents=True, exist_ok=True)
    family = model_family(cfg.model)
    image_encoder = getattr(learner, "image_encoder", None)
    if is_image_task(task) and image_encoder is None:
        raise T2EvalError(f"task {cfg.task} has images: {learner.stage} on {cfg.model} has no image inputs "
                          "(train-svf on a vision-language model has)")
    train_docs, eval_docs, max_new = task_data(task, cfg)
    params = learner.params()
    opt, sched = make_optimizer(params, learner.optimizer, cfg.lr, cfg.iterations, cfg.weight_decay)
    rng = np.random.RandomState(cfg.seed)
    start, best, best_state, rows, train_s = 0, {"valid": -math.inf, "iteration": None}, None, [], 0.0

    # --- resume: every product of the run so far comes from the checkpoint
    ck = read_checkpoint(ckpt_path, cfg.identity())
    if ck is not None:
        learner.load_state(ck[learner.state_key])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None and ck.get("scheduler") is not None:
            sched.load_state_dict(ck["scheduler"])
        rng.set_state(ck["np_rng"])
        torch.set_rng_state(ck["torch_rng"])
        start, best, best_state, rows, train_s = (ck["iteration"] + 1, ck["best"], ck["best_state"],
                                                  ck["rows"], ck["train_s"])
        log.info("resuming %s from iteration %d", out, start)
    write_jsonl(log_path, rows)  # drops rows of an iteration killed before its checkpoint

    end = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, start + cfg.stop_after)
    backend = learner.make_backend(cfg) if start < end else None
    bar = progress_bar(cfg.iterations, start, cfg.progress, f"{learner.stage} {cfg.task}")
    try:
        for it in range(start, end):
            times = {"rollout_s": 0.0, "grad_s": 0.0, "eval_s": 0.0}

            # --- sample batch
            t0 = time.perf_counter()
            docs = [train_docs[i] for i in sample_batch(rng, len(train_docs), cfg.batch_size)]

            # --- rollouts (pg: the current policy, greedy unless --temperature) / targets (ntp: references)
            def policy_rollout():
                with learner.generating(backend):
                    return rollout(backend, task, docs, family=family, max_new_tokens=max_new,
                                   temperature=cfg.temperature)

            p_ids, c_ids, weights, rewards, extra = training_batch(
                cfg.objective, learner.tokenizer, task, docs, family, policy_rollout, bos=cfg.bos,
                pg_code_prompt=cfg.pg_code_prompt, image_encoder=image_encoder)
            times["rollout_s"] = time.perf_counter() - t0

            # --- loss + backward (micro-batched; gradients accumulate in the learner's tensors)
            t0 = time.perf_counter()
            for p in params:
                p.grad = None
            stats = learner.loss_backward(p_ids, c_ids, weights, extra_inputs=extra)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if not math.isfinite(stats["loss"]):
                raise nonfinite_error("the loss", it, ckpt_path)

            # --- clip + step
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            if not math.isfinite(grad_norm):
                raise nonfinite_error("the gradient", it, ckpt_path)
            lr_now = opt.param_groups[0]["lr"]
            opt.step()
            if sched is not None:
                sched.step()
            if not _finite(params):
                raise nonfinite_error(learner.what, it, ckpt_path)
            times["grad_s"] = time.perf_counter() - t0

            row: dict[str, Any] = {
                "iteration": it,
                "reward_mean": float(np.mean(rewards)) if rewards else None,
                "reward_std": float(np.std(rewards)) if rewards else None,
                "pg_loss": stats["pg_loss"] if cfg.objective == "pg" else None,
                "ntp_loss": stats["pg_loss"] if cfg.objective == "ntp" else None,
                "kl": stats["kl"], "loss": stats["loss"], "grad_norm": grad_norm, **learner.log_stats(),
                "lr": lr_now, "completion_tokens": stats["n_tokens"],
            }

            # --- evaluate (greedy; valid — else train — selects the best state)
            if it % cfg.eval_every == 0 or it == cfg.iterations - 1:
                t0 = time.perf_counter()
                with learner.generating(backend):
                    scores = {s: rollout(backend, task, d, family=family, max_new_tokens=max_new).accuracy
                              for s, d in eval_docs.items() if d}
                times["eval_s"] = time.perf_counter() - t0
                row["split_scores"] = scores
                v = scores.get("valid", scores.get("train", 0.0))

                # --- best
                row["best"] = v > best["valid"]
                if row["best"]:
                    best = {"valid": v, "iteration": it, "split_scores": scores}
                    best_state = learner.state()
            row["time"] = times

            # --- checkpoint (everything the outputs are made from), then log
            rows.append(row)
            train_s += time.perf_counter() - t_start
            t_start = time.perf_counter()
            atomic_torch_save({
                "iteration": it, learner.state_key: learner.state(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None,
                "np_rng": rng.get_state(), "torch_rng": torch.get_rng_state(),
                "best": best, "best_state": best_state, "rows": rows, "train_s": train_s,
                "identity": cfg.identity(),
            }, ckpt_path)
            append_jsonl(log_path, row)
            bar.update(1)
            bar.set_postfix(loss=row["loss"], valid=best["valid"])
    finally:
        bar.close()
        if backend is not None:
            backend.close()

    # --- declared outputs, always (re)written from the checkpoint's contents
    done = end >= cfg.iterations
    if best_state is not None:
        learner.write_outputs(out, best_state, best)
    write_jsonl(log_path, rows)
    summary = {"task": cfg.task, "iterations_done": end, "finished": done, "best": best,
               **learner.summary_paths(out), "log": str(log_path)}
    if done:
        from ..provenance import record, write_sidecar

        write_sidecar(out, record(learner.stage, dataclasses.asdict(cfg), seeds={"seed": cfg.seed},
                                  inputs=learner.inputs(), timings={"train_s": train_s},
                                  extra={"summary": summary, "protocol": protocol_record(cfg),
                                         **learner.provenance()}))
    return summary


def run_cli(args, cfg_cls: type, train_fn) -> int:
    """The body of `t2eval train-svf|train-lora`: threads, model dir, config from the parsed options, run."""
    from .. import stage_config
    from ..models.loading import resolve_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = str(resolve_model_dir(args.model))
    print(json.dumps(train_fn(stage_config.from_args(cfg_cls, args)), default=str))
    return 0
