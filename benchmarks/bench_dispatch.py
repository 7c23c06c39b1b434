"""First pass vs second pass (PROTOCOL §6, Table 3) and dispatch=generate vs logprob, per unseen task.

    python benchmarks/bench_dispatch.py [--model models/smollm2-135m] [--limit 4] [--max-gen-toks 64]
        [--cls-max-new-tokens 32] [--tasks math,arc_challenge,humaneval]

Prompt strategy on the embedded model. The three "experts" are constant-z SVF vectors (they leave the
weights unchanged, but every swap really happens), so timing is realistic and scores are the base
model's; pass --experts math:P;code:P;reasoning:P with real experts to measure trained ones.
Prints per task and mode: first_pass_s, second_pass_s, ratio first/second (paper's Table 3 style),
swap_s, tokens, the score, and generate-vs-logprob agreement of the chosen expert.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def constant_experts(model: str, root: Path) -> tuple[str, dict[str, str]]:
    import torch

    from t2eval.svd import decompose, load_svd
    from t2eval.svf import ExpertVector

    svd_path = root / "svd-mlp.safetensors"
    if not svd_path.exists():
        decompose(model, "mlp", out=svd_path)
    svd = load_svd(svd_path)
    out = {}
    for name in ("math", "code", "reasoning"):
        z = {n: torch.full((svd.rank(n),), 0.5) for n in svd.names}
        ExpertVector.from_svd(z, svd, param="code", task=name).save(root / name / "z.safetensors")
        out[name] = str(root / name)
    return str(svd_path), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--tasks", default="math,arc_challenge,humaneval")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--max-gen-toks", type=int, default=64, help="cap on answer tokens; 0 = the protocol's")
    ap.add_argument("--backend", default="hf", choices=("hf", "vllm"))
    ap.add_argument("--cls-max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--experts", default=None)
    ap.add_argument("--svd", default=None)
    ap.add_argument("--work-dir", default=None, help="reuse this dir for the SVD + constant experts")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")
    from t2eval.adapt.experts import parse_experts
    from t2eval.evaluate import build_lm, code_chat_template, evaluate

    tmp = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="bench-dispatch-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.experts:
        svd, experts = a.svd, parse_experts(a.experts)
    else:
        svd, experts = constant_experts(a.model, tmp)
    print(f"experts ready in {time.perf_counter() - t0:.1f}s ({'given' if a.experts else 'constant-z'})", flush=True)
    rows = {}
    for task in a.tasks.split(","):
        for mode in ("generate", "logprob"):
            margs = {"strategy": "prompt", "svd": svd, "dispatch": mode, "cls_max_new_tokens": a.cls_max_new_tokens,
                     **({"backend": "vllm"} if a.backend == "vllm" else {}),
                     **{f"expert_{n}": p for n, p in experts.items()}}
            tpl = code_chat_template(task)
            if tpl:
                margs["chat_template_args"] = {"chat_template": tpl}
            lm = build_lm(a.model, margs, batch_size=a.batch_size, device="cpu")
            cell = evaluate(a.model, "t2-prompt", task, tmp / "raw" / mode / f"{task}.json", margs, lm=lm,
                            limit=a.limit, gen_kwargs=f"max_gen_toks={a.max_gen_toks}" if a.max_gen_toks else None)
            rows[(task, mode)] = cell
            t = cell["timing"]
            print(f"{task:14s} {mode:8s} first {t['first_pass_s']:7.2f}s  second {t['second_pass_s']:7.2f}s  "
                  f"ratio {t['first_pass_s'] / t['second_pass_s']:.1%}  swap {t['swap_s']:.2f}s  "
                  f"tok1 {t['tokens_first']} tok2 {t['tokens_second']}  score {cell['correct']}/{cell['total']}  "
                  f"chosen {[d['chosen'] for d in cell['dispatch']]}", flush=True)
            del lm
    print(f"\nlimit {a.limit} docs/task, answers capped at {a.max_gen_toks or 'the protocol'} tokens, "
          f"classification at {a.cls_max_new_tokens}; model {a.model}, backend {a.backend}")
    for task in a.tasks.split(","):
        g, lp = rows.get((task, "generate")), rows.get((task, "logprob"))
        if g and lp:
            cg = {d["doc_id"]: d["chosen"] for d in g["dispatch"]}
            cl = {d["doc_id"]: d["chosen"] for d in lp["dispatch"]}
            agree = sum(cg[k] == cl.get(k) for k in cg) / len(cg)
            # where the generated answer holds a \boxed{label} the model followed the requested format;
            # only there do the two modes answer the same question
            fmt = [d["doc_id"] for d in g["dispatch"] if "\\boxed{" in (d.get("raw") or "")]
            agree_fmt = (f"{sum(cg[k] == cl.get(k) for k in fmt) / len(fmt):.0%} of {len(fmt)}" if fmt else "n/a")
            tg, tl = g["timing"], lp["timing"]
            print(f"{task:14s} first/second: generate {tg['first_pass_s'] / tg['second_pass_s']:.1%}, "
                  f"logprob {tl['first_pass_s'] / tl['second_pass_s']:.1%}; same expert {agree:.0%} "
                  f"(where generate followed the format: {agree_fmt}); "
                  f"score {g['score']:.3f} (generate) / {lp['score']:.3f} (logprob)")


if __name__ == "__main__":
    main()
