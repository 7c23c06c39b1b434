"""`t2eval fit-fewshot`: CEM search of the expert-mixture α on the task's held-out prompts (PROTOCOL §6.3).

    t2eval fit-fewshot --model models/smollm2-135m --svd svd/smollm2-135m-mlp.safetensors \
        --experts math:experts/m/svf/gsm8k,code:experts/m/svf/mbpp,reasoning:experts/m/svf/arc_easy \
        --task arc_challenge --out experts/smollm2-135m/fewshot/arc_challenge/ \
        [--iterations 100 --population 32 --elite 0.2 --init-std 0.5 --per vector|matrix --normalise --seed 0]

Writes `<out>/alpha.json` ({"alpha", "experts", "per", "normalised", "best_score", ... , "provenance"}),
`<out>/log.jsonl` (one line per iteration: best/mean/elite scores, α mean/std) and `<out>/state.json`
(the resumable CEM state; a rerun continues from it and ends with the same α).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constants import UNSEEN_TASKS
from ..errors import T2EvalError
from ..stage_config import add_arguments as _add_arguments, opt

log = logging.getLogger(__name__)


@dataclass
class FitFewshotConfig:
    """Options of `t2eval fit-fewshot` (the CLI is generated from these fields)."""

    model: str = opt(help="registry key or HF directory", required=True)
    svd: str = opt(help="SVD cache of the model (t2eval decompose)", required=True)
    experts: str = opt(help="math:PATH,code:PATH,reasoning:PATH (order = α order)", required=True)
    task: str = opt(help="unseen task: " + ", ".join(UNSEEN_TASKS), required=True)
    out: str = opt(help="output directory (alpha.json, log.jsonl, state.json)", required=True)
    iterations: int = opt(100, help="CEM iterations (paper: up to 100; code script: 50)")
    population: int = opt(32, help="CEM population size")
    elite: float = opt(0.2, help="elite ratio")
    init_std: float = opt(0.5, help="initial standard deviation of the α distribution")
    per: str = opt("vector", help="one α per expert (vector) or per expert and matrix (matrix)",
                   choices=("vector", "matrix"))
    normalise: bool = opt(False, help="α normalised to sum to 1 when mixing")
    seed: int = opt(0, help="CEM seed")
    backend: str = opt("hf", help="generation backend", choices=("hf", "vllm"))
    data_dir: str | None = opt(None, help="canonical data dir (default: $T2EVAL_DATA_DIR or data)")
    param: str | None = opt(None, help="SVF parameterisation (default: the experts' own)", choices=("code", "paper"))
    dtype: str = opt("float32", help="model dtype")
    device: str = opt("cpu", help="torch device (backend hf)")
    batch_size: int = opt(16, help="generation batch size (backend hf)")
    max_new_tokens: int | None = opt(None, help="override the task's (testing only)")
    allow_code_execution: bool = opt(False, help="needed for humaneval (sandboxed)")
    allow_cross_model: bool = opt(False, help="the experts were trained on another base model of the same "
                                  "shapes (Table 5 cross-model transfer); without it they are refused")


CONFIG = FitFewshotConfig


def add_arguments(p) -> None:
    _add_arguments(p, FitFewshotConfig)


def fit_fewshot(model: str, svd: str, experts: str | dict, task: str, out: str | Path, *, iterations: int = 100,
                population: int = 32, elite: float = 0.2, init_std: float = 0.5, per: str = "vector",
                normalise: bool = False, seed: int = 0, backend: str | Any = "hf", data_dir: str | None = None,
                param: str | None = None, dtype: str = "float32", device: str = "cpu", batch_size: int = 16,
                max_new_tokens: int | None = None, docs: list | None = None,
                stop_after: int | None = None, allow_cross_model: bool = False) -> dict[str, Any]:
    """Run (or resume) the search; writes alpha.json when complete and returns its content (or the
    partial summary when `stop_after` ended this call early). `backend` may be a ready Backend.
    `allow_cross_model` accepts experts trained on another base model (Table 5); else they are refused."""
    from .. import provenance as prov
    from ..config import model_spec
    from ..models.loading import resolve_model_dir
    from ..svd import ordered_names
    from ..svf import check_compatible
    from ..tasks import get_task
    from .cem import CEMConfig, member_evaluator, run_cem
    from .experts import ExpertBank, expert_file, parse_experts

    if task not in UNSEEN_TASKS:
        raise T2EvalError(f"fit-fewshot adapts to the unseen tasks {', '.join(UNSEEN_TASKS)}, not {task!r}")
    ex = parse_experts(experts)
    if not ex:
        raise T2EvalError("--experts is empty: give math:PATH,code:PATH,reasoning:PATH")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = CEMConfig(iterations=iterations, population=population, elite=elite, init_std=init_std, per=per,
                    normalise=normalise, seed=seed)
    cfg.check()
    bank = ExpertBank(svd, param, cross_model=allow_cross_model)
    names = list(ex)
    loaded = [bank.load(ex[n]) for n in names]
    for n, e in zip(names, loaded):  # refuse experts of another model (unless allowed) before the model loads
        try:
            check_compatible(e, bank.svd, allow_cross_model)
        except T2EvalError as err:
            hint = "" if allow_cross_model else " (t2eval fit-fewshot --allow-cross-model)"
            raise T2EvalError(f"expert {n!r} ({ex[n]}): {err}{hint}") from None
    n_mat = len(ordered_names(loaded[0].z))
    shape = (len(names),) if per == "vector" else (len(names), n_mat)
    t = get_task(task)
    docs = docs if docs is not None else t.docs("fewshot_heldout", data_dir)
    family = model_spec(model).family
    model_dir = str(resolve_model_dir(model))
    from ..backends import make_backend

    be = (make_backend(backend, model_dir, svd=bank.svd, dtype=dtype, device=device, batch_size=batch_size)
          if isinstance(backend, str) else backend)
    evaluate = member_evaluator(be, t, docs, lambda a: bank.mix_loaded(loaded, a, per, normalise), family,
                                max_new_tokens)
    t0 = time.perf_counter()
    alpha, summary = run_cem(evaluate, shape, cfg, out / "state.json", out / "log.jsonl",
                             on_iteration=lambda r: log.info("iteration %d: best %.3f, pop mean %.3f, alpha %s",
                                                             r["iteration"], r["best_score"], r["pop_mean"],
                                                             [round(x, 3) for x in r["alpha_mean"]]),
                             stop_after=stop_after)
    if not summary["complete"]:
        return summary
    be.set_scales(None)
    record = prov.record("fit-fewshot", {"model": model, "svd": str(svd), "experts": ex, "task": task,
                                         "cem": cfg.__dict__, "family": family, "max_new_tokens": max_new_tokens,
                                         "backend": getattr(be, "name", str(backend)), "param": param,
                                         "allow_cross_model": allow_cross_model},
                         seeds={"cem": seed}, inputs={"model_dir": model_dir},
                         timings={"search_s_this_run": time.perf_counter() - t0},
                         extra={"files": {n: {str(expert_file(p)): prov.sha256_file(expert_file(p))}
                                          for n, p in ex.items()},
                                "heldout_doc_ids": [d.get("doc_id") for d in docs]})
    result = {"alpha": alpha.tolist(), "experts": names, "per": per, "normalised": normalise,
              "best_score": summary["best_score"], "best_tiebreak": summary["best_tiebreak"],
              "iterations": cfg.iterations, "population": cfg.population, "elite": cfg.elite,
              "init_std": cfg.init_std, "seed": seed, "task": task, "n_heldout": len(docs),
              "matrices": ordered_names(loaded[0].z) if per == "matrix" else None, "provenance": record}
    prov.write_json_atomic(out / "alpha.json", result)
    return result


def run(args) -> int:
    import os

    if args.allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    res = fit_fewshot(args.model, args.svd, args.experts, args.task, args.out, iterations=args.iterations,
                      population=args.population, elite=args.elite, init_std=args.init_std, per=args.per,
                      normalise=args.normalise, seed=args.seed, backend=args.backend, data_dir=args.data_dir,
                      param=args.param, dtype=args.dtype, device=args.device, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, allow_cross_model=args.allow_cross_model)
    a = res["alpha"]
    shown = a if args.per == "vector" else [round(sum(r) / len(r), 4) for r in a]
    print(f"alpha ({', '.join(res['experts'])}) = {shown}, best held-out score {res['best_score']:.3f} "
          f"-> {Path(args.out) / 'alpha.json'}")
    return 0
