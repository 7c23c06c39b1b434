"""One SVF policy-gradient step on SmolLM2-135M (fp32, CPU): batched micro-batches vs the per-sample loop.

    python benchmarks/bench_svf_step.py [--model models/smollm2-135m] [--svd svd/smollm2-135m-mlp.safetensors]
                                        [--batch 16] [--micro-batch 2,8] [--threads 0] [--out benchmarks/out]

Both sides compute the same gradient ∂/∂z of −Σ_j r_j log π(ŷ_j|x_j) / B on the same 16 (prompt,
completion) pairs, with W′(z) composed once per step (t2eval.svf.SVFModule.accumulate):

- release loop (the original design, `optim_modules.Reinforce.step_optimization` of the code
  release): for each sample, a full-sequence forward (logits for every position), log-softmax over
  the completion slice, backward; one sample at a time. The release loads the model with
  `from_pretrained` and never freezes it, so every base parameter (attention, norms, the tied
  embedding / LM head) also receives a gradient that is then thrown away (`model.zero_grad()`).
- per-sample loop, frozen base: the same loop with only W′ requiring grad (isolates batching).
- batched (t2eval.train.losses): micro-batches of similar lengths (left padding, attention masks,
  position ids, padding capped at losses.MAX_PAD_FRAC), logits only for the completion positions,
  one backward per micro-batch, base frozen.

Several micro-batch sizes are timed (--micro-batch 1,2,4,8). On a CPU the matrix units are already
busy with one ~250-token sequence, so batching saves little and large micro-batches lose to cache
misses; the gain over the release comes from not differentiating the frozen base and from the LM
head on completion tokens only. (The gradient differences printed are mostly the loop's: against
an fp64 reference on 4 samples the loop is off by 2.6e-5, the batched path by 4.6e-6.)

Prints seconds for each, the ratios, and the relative difference of the gradients; writes JSON
to <out>/bench_svf_step.json. The SVD cache is built (t2eval.svd.ensure_svd) when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")
WORDS = ("the of and to a in is that for it as was with be by on not he this are or his from at which but have "
         "an had they you were their one all we can her has there been if more when will would who so no "
         "number clips sold half April May total answer step first then next so therefore equals").split()


def make_batch(tok, n: int, seed: int = 0):
    """n chat prompts (varied length) + completions of 64-256 tokens (deterministic)."""
    rng = random.Random(seed)
    prompts, comps = [], []
    for i in range(n):
        q = " ".join([QUESTION] * (1 + i % 3)) + f" (case {i})"
        msgs = [{"role": "system", "content": "Below is an instruction that describes a task. Write a response "
                 "that appropriately completes the request.\n\n"}, {"role": "user", "content": q}]
        prompts.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        comps.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(64, 256))))
    return prompts, comps


def per_sample_loop(policy, p_ids, c_ids, rewards):
    """The release's loop (same math): full-sequence logits per sample, backward per sample."""
    import torch

    B = len(p_ids)
    with policy.accumulate():
        for p, c, r in zip(p_ids, c_ids, rewards):
            ids = torch.tensor([p + c])
            logits = policy(input_ids=ids).logits[:, len(p) - 1:-1]
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor([c]).unsqueeze(-1)).squeeze(-1)
            (-lp.sum() * r / B).backward()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--svd", default="svd/smollm2-135m-mlp.safetensors")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro-batch", default="2,8", help="comma-separated micro-batch sizes to time")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from t2eval import svf
    from t2eval.models.loading import load_model, load_tokenizer
    from t2eval.svd import ensure_svd
    from t2eval.train import losses
    from t2eval.train.rollout import encode_completions

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    svd = ensure_svd(args.model, "mlp", out=args.svd)
    prompts, comps = make_batch(tok, args.batch)
    p_ids, c_ids = encode_completions(tok, prompts, comps)
    rewards = [1.0 if i % 3 == 0 else -1.0 for i in range(args.batch)]
    z0 = svf.init_z(svd, seed=0)

    def grad(policy):
        return torch.cat([p.grad.reshape(-1) for p in policy.z])

    res = {"model": args.model, "batch": args.batch, "micro_batch": args.micro_batch,
           "threads": torch.get_num_threads(), "prompt_tokens": sum(map(len, p_ids)),
           "completion_tokens": sum(map(len, c_ids))}
    # warm-up (allocator, kernels) on 2 samples, not timed
    losses.sequence_loss_backward(svf.SVFModule(model, svd, z0), p_ids[:2], c_ids[:2], [0.5, 0.5],
                                  pad_id=tok.pad_token_id, micro_batch=2, backward=False)

    pol_r = svf.SVFModule(model, svd, z0)
    model.requires_grad_(True)  # as the release leaves it (W′ itself is replaced by the step's leaves)
    t0 = time.perf_counter()
    per_sample_loop(pol_r, p_ids, c_ids, rewards)
    res["release_loop_s"] = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)

    pol_a = svf.SVFModule(model, svd, z0)
    t0 = time.perf_counter()
    per_sample_loop(pol_a, p_ids, c_ids, rewards)
    res["per_sample_s"] = time.perf_counter() - t0

    mbs = [int(x) for x in str(args.micro_batch).split(",") if x]
    res["batched"] = {}
    for mb in mbs:
        pol_b = svf.SVFModule(model, svd, z0)
        t0 = time.perf_counter()
        with pol_b.accumulate():
            losses.sequence_loss_backward(pol_b, p_ids, c_ids, losses.pg_weights(rewards), pad_id=tok.pad_token_id,
                                          micro_batch=mb)
        secs = time.perf_counter() - t0
        gb = grad(pol_b)
        res["batched"][mb] = {
            "seconds": secs,
            "micro_batches": [len(g) for g in losses._micro_batches(
                [len(p) + len(c) for p, c in zip(p_ids, c_ids)], mb, losses.MAX_PAD_FRAC)],
            "grad_rel_diff_vs_loop": float(torch.linalg.norm(grad(pol_a) - gb) / torch.linalg.norm(grad(pol_a))),
            "speedup_vs_release_loop": res["release_loop_s"] / secs,
            "speedup_vs_frozen_loop": res["per_sample_s"] / secs}
    best = min(res["batched"], key=lambda k: res["batched"][k]["seconds"])
    res["batched_s"], res["best_micro_batch"] = res["batched"][best]["seconds"], best
    res["speedup"] = res["release_loop_s"] / res["batched_s"]
    res["speedup_vs_frozen_loop"] = res["per_sample_s"] / res["batched_s"]
    print(f"SVF policy-gradient step, {args.model}, batch {args.batch}, fp32 CPU, {res['threads']} threads, "
          f"{res['prompt_tokens']} prompt + {res['completion_tokens']} completion tokens")
    print(f"  release loop (per sample, base not frozen): {res['release_loop_s']:.2f} s")
    print(f"  per-sample loop, frozen base:              {res['per_sample_s']:.2f} s")
    for mb, r in res["batched"].items():
        print(f"  batched, micro-batch <= {mb} (sizes {r['micro_batches']}): {r['seconds']:.2f} s  -> "
              f"{r['speedup_vs_release_loop']:.2f}x vs release loop, {r['speedup_vs_frozen_loop']:.2f}x vs frozen "
              f"loop; gradient rel. diff vs loop {r['grad_rel_diff_vs_loop']:.1e}")
    print(f"  best: micro-batch {best}, {res['speedup']:.2f}x vs the release loop, "
          f"{res['speedup_vs_frozen_loop']:.2f}x vs the frozen per-sample loop")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_svf_step.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
