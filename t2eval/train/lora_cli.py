"""`t2eval train-lora`: the LoRA baseline (PROTOCOL §4); resumable, best-validation adapter."""

from __future__ import annotations

import argparse
import json

TASKS = ("gsm8k", "mbpp", "arc_easy", "cls", "cls_leakfree")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory (or registry key prepared under models/)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", required=True, help="output dir, e.g. experts/<model>/lora/<task>; rerun to resume")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=256, help="global batch (gradient accumulation)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per padded forward/backward")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (1.0; the paper also names 1e-3)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", choices=("attn", "mlp+attn"), default="attn",
                   help="attn: q_proj+v_proj (default); mlp+attn: + gate/up/down_proj (Table 4 #7)")
    p.add_argument("--objective", choices=("ntp", "pg"), default="ntp",
                   help="ntp: next-token prediction on the reference solutions; pg: REINFORCE (Table 4 #5)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="eval/rollout length (default: the task's)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first n docs of each split")
    p.add_argument("--eval-splits", default="valid", help="comma-separated splits to evaluate (valid selects)")
    p.add_argument("--temperature", type=float, default=0.0, help="pg rollout temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--stop-after", type=int, default=None, help="stop this invocation after n iterations")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 is much faster on a shared, loaded machine)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..models.loading import resolve_model_dir

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .lora import LoRATrainConfig, train_lora

    cfg = LoRATrainConfig(
        model=str(resolve_model_dir(args.model)), task=args.task, out=args.out, iterations=args.iterations,
        batch_size=args.batch_size, micro_batch=args.micro_batch, lr=args.lr, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=args.targets,
        objective=args.objective, max_new_tokens=args.max_new_tokens, eval_every=args.eval_every,
        eval_limit=args.eval_limit, eval_splits=tuple(s for s in args.eval_splits.split(",") if s),
        temperature=args.temperature, seed=args.seed, data_dir=args.data_dir, dtype=args.dtype,
        device=args.device, stop_after=args.stop_after, progress=not args.no_progress)
    print(json.dumps(train_lora(cfg), default=str))
    return 0
