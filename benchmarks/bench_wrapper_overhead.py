"""Wrapper overhead: `t2` (adapter=none) vs lm-eval's stock `hf` on the same task/limit, same model.

    python benchmarks/bench_wrapper_overhead.py [--model models/smollm2-135m] [--task t2_arc_challenge]
        [--limit 8] [--max-gen-toks 64] [--repeats 2]

Runs hf, t2, hf, t2, ... (interleaved so machine load hits both alike), takes the fastest run of
each, prints both wall times, the ratio t2/hf (target <= 1.05) and whether the outputs are identical.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--task", default="t2_arc_challenge")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-gen-toks", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import t2eval.lm  # noqa: F401
    from t2eval.tasks import lm_eval_task_dir

    tm = TaskManager(include_path=str(lm_eval_task_dir()))
    times: dict[str, list[float]] = {"hf": [], "t2": []}
    outs = {}
    for _ in range(a.repeats):
        for m in ("hf", "t2"):
            t0 = time.perf_counter()
            r = lm_eval.simple_evaluate(model=m, model_args={"pretrained": a.model, "dtype": "float32"},
                                        tasks=[a.task], task_manager=tm, limit=a.limit, apply_chat_template=True,
                                        log_samples=True, device="cpu", batch_size=a.batch_size,
                                        gen_kwargs=f"max_gen_toks={a.max_gen_toks}")
            times[m].append(time.perf_counter() - t0)
            outs[m] = [s["resps"] for s in sorted(r["samples"][a.task], key=lambda s: s["doc_id"])]
            score = {k: v for k, v in r["results"][a.task].items() if k.startswith("acc")}
    hf, t2 = min(times["hf"]), min(times["t2"])
    print(f"task {a.task}, limit {a.limit}, max_gen_toks {a.max_gen_toks}, batch {a.batch_size}, "
          f"model {a.model}, {a.repeats} runs each (incl. model load)")
    print(f"hf  runs: {[round(x, 2) for x in times['hf']]}  best {hf:.2f}s")
    print(f"t2  runs: {[round(x, 2) for x in times['t2']]}  best {t2:.2f}s")
    print(f"overhead ratio t2/hf = {t2 / hf:.3f} (target <= 1.05); identical outputs: {outs['hf'] == outs['t2']}; "
          f"score {score}")


if __name__ == "__main__":
    main()
