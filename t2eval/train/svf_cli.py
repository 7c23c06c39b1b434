"""`t2eval train-svf`: train one SVF expert vector with REINFORCE (PROTOCOL §3); resumable."""

from __future__ import annotations

import argparse
import json

TASKS = ("gsm8k", "mbpp", "arc_easy", "cls", "cls_leakfree")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory (or registry key prepared under models/)")
    p.add_argument("--svd", required=True, help="SVD cache of the model (t2eval decompose)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", required=True, help="output dir, e.g. experts/<model>/svf/<task>; rerun to resume")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=256, help="clipped to the train-split size")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per padded forward/backward")
    p.add_argument("--max-new-tokens", type=int, default=None, help="rollout/eval length (default: the task's, 512)")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate train/valid/test every k iterations (and at the last)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first n docs of each split")
    p.add_argument("--eval-splits", default="train,valid,test", help="comma-separated splits to evaluate")
    p.add_argument("--kl-coef", type=float, default=0.0, help="λ of the KL penalty against the base model")
    p.add_argument("--kl-direction", choices=("code", "paper"), default="code",
                   help="code: KL(π_W‖π_W′) as the release computes it; paper: KL(π_W′‖π_W)")
    p.add_argument("--optimizer", choices=("adam", "adamw-cosine"), default="adam",
                   help="adam (code release) or adamw with cosine decay (paper)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1e-3, help="gradient-norm clip")
    p.add_argument("--param", choices=("code", "paper"), default="code", help="SVF parameterisation")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="rollout/evaluation backend")
    p.add_argument("--data-dir", default="data", help="canonical data (t2eval prepare-data)")
    p.add_argument("--objective", choices=("pg", "ntp"), default="pg",
                   help="pg: REINFORCE; ntp: next-token prediction on the reference solutions (Table 4 #4)")
    p.add_argument("--temperature", type=float, default=0.0, help="rollout temperature (0: greedy, the release)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop this invocation after n iterations (the next run resumes)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 is much faster on a shared, loaded machine)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def config_from_args(args: argparse.Namespace):
    from .reinforce import SVFTrainConfig

    return SVFTrainConfig(
        model=args.model, svd=args.svd, task=args.task, out=args.out, iterations=args.iterations,
        batch_size=args.batch_size, micro_batch=args.micro_batch, max_new_tokens=args.max_new_tokens,
        eval_every=args.eval_every, eval_limit=args.eval_limit,
        eval_splits=tuple(s for s in args.eval_splits.split(",") if s), kl_coef=args.kl_coef,
        kl_direction=args.kl_direction, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, param=args.param, seed=args.seed, backend=args.backend,
        data_dir=args.data_dir, objective=args.objective, temperature=args.temperature, dtype=args.dtype,
        device=args.device, stop_after=args.stop_after, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from ..models.loading import resolve_model_dir

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .reinforce import train_svf

    args.model = str(resolve_model_dir(args.model))
    summary = train_svf(config_from_args(args))
    print(json.dumps(summary, default=str))
    return 0
