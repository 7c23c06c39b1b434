"""`t2eval fit-fewshot`: CEM search of the expert-mixture α on the task's held-out prompts (PROTOCOL §6.3, §8).

    t2eval fit-fewshot --model models/smollm2-135m --svd svd/smollm2-135m-mlp.safetensors \
        --experts math:experts/m/svf/gsm8k,code:experts/m/svf/mbpp,reasoning:experts/m/svf/arc_easy \
        --task arc_challenge --out experts/smollm2-135m/fewshot/arc_challenge/ \
        [--protocol release|corrected --iterations 100 --population 32 --elite 0.2 --init-std 0.5
         --per vector|matrix --normalise --seed 0 --svf-precision fp32|bf16 --reported-limit N]

The protocol (`--protocol`, default $T2EVAL_PROTOCOL, else release; `t2eval protocol`) decides how
the final α is chosen (knob `fewshot_select`): release — every 10 iterations the incumbent is scored
on the *reported set* (the task's `fewshot_test` split, the documents the t2-fewshot cell reports;
`--reported-limit` = the evaluation's limit) and the best so far is kept ("α selected on the reported
set"); corrected — the final incumbent, chosen on the 10 shots only. How experts mix (knob
`fewshot_mix`: raw z) and `--svf-precision` (bf16 = the release) apply to every member.

Before the model loads, the SVD cache and the experts are checked against the model
(`ExpertBank.check_model`; experts of another model need `--allow-cross-model`).

Writes `<out>/alpha.json` ({"alpha", "experts", "per", "normalised", "mix_space", "svf_precision",
"alpha_selection", "select", "selected_iteration", "reported_score", "protocol", "best_score", ...,
"provenance"}), `<out>/log.jsonl` (one line per iteration: best/mean/elite scores, α mean/std,
reported-set checks) and `<out>/state.json` (the resumable CEM state; a rerun continues from it and
ends with the same α — unless its inputs changed: other experts, model, SVD cache, task, shots,
reported set or protocol knobs restart the search, see `cem.search_identity`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..constants import UNSEEN_TASKS
from ..errors import T2EvalError
from ..protocol import PROTOCOLS
from ..stage_config import add_arguments as _add_arguments, from_args, opt

log = logging.getLogger(__name__)

SVF_PRECISIONS = ("fp32", "bf16")  # = t2eval.svf.PRECISIONS (a test checks it), not imported here: torch


@dataclass
class FitFewshotConfig:
    """Options of `t2eval fit-fewshot` (the CLI is generated from these fields)."""

    model: str = opt(help="registry key or HF directory", required=True)
    svd: str = opt(help="SVD cache of the model (t2eval decompose)", required=True)
    experts: str = opt(help="math:PATH,code:PATH,reasoning:PATH (order = α order)", required=True)
    task: str = opt(help="unseen task: " + ", ".join(UNSEEN_TASKS), required=True)
    out: str = opt(help="output directory (alpha.json, log.jsonl, state.json)", required=True)
    protocol: str | None = opt(None, help="release | corrected (default: $T2EVAL_PROTOCOL, else release): how the "
                               "final α is chosen (release: on the reported set), how experts mix, the task's "
                               "knobs; `t2eval protocol` lists them", choices=PROTOCOLS)
    iterations: int = opt(100, help="CEM iterations (paper: up to 100; code script: 50)")
    population: int = opt(32, help="CEM population size")
    elite: float = opt(0.2, help="elite ratio")
    init_std: float = opt(0.5, help="initial standard deviation of the α distribution")
    per: str = opt("vector", help="one α per expert (vector) or per expert and matrix (matrix, the release's "
                   "per-layer α)", choices=("vector", "matrix"))
    normalise: bool = opt(False, help="α normalised to sum to 1 when mixing")
    seed: int = opt(0, help="CEM seed")
    svf_precision: str = opt("fp32", help="SVF arithmetic of the mixture (bf16: the release's bf16 z, factors "
                             "and W′ composition)", choices=SVF_PRECISIONS)
    reported_limit: int | None = opt(None, help="score only the first N documents of the reported set "
                                     "(fewshot_test) when the protocol selects α on it: give the evaluation's "
                                     "limit, so the set is the one the t2-fewshot cell reports")
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
                stop_after: int | None = None, allow_cross_model: bool = False, protocol: str | None = None,
                svf_precision: str = "fp32", reported_limit: int | None = None,
                reported_docs: list | None = None) -> dict[str, Any]:
    """Run (or resume) the search; writes alpha.json when complete and returns its content (or the
    partial summary when `stop_after` ended this call early). `backend` may be a ready Backend.
    `allow_cross_model` accepts experts trained on another base model (Table 5); else they are refused.
    `protocol` (None: $T2EVAL_PROTOCOL, else release) is this process's protocol during the search
    (`t2eval.protocol.use`; the environment is put back after). `docs` / `reported_docs` replace the
    shots / the reported set (tests)."""
    from .experts import parse_experts

    if task not in UNSEEN_TASKS:
        raise T2EvalError(f"fit-fewshot adapts to the unseen tasks {', '.join(UNSEEN_TASKS)}, not {task!r}")
    if reported_limit is not None and reported_limit < 1:
        raise T2EvalError(f"--reported-limit {reported_limit}: give a positive number of documents (or none)")
    ex = parse_experts(experts)
    if not ex:
        raise T2EvalError("--experts is empty: give math:PATH,code:PATH,reasoning:PATH")
    with _protocol(protocol) as p_name:
        return _fit(model, svd, ex, task, Path(out), iterations=iterations, population=population, elite=elite,
                    init_std=init_std, per=per, normalise=normalise, seed=seed, backend=backend, data_dir=data_dir,
                    param=param, dtype=dtype, device=device, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    docs=docs, stop_after=stop_after, allow_cross_model=allow_cross_model, p_name=p_name,
                    svf_precision=svf_precision, reported_limit=reported_limit, reported_docs=reported_docs)


def _protocol(protocol: str | None):
    """`protocol.use(protocol)` for the duration of one search (every layer that reads the protocol from the
    environment — task knobs, tokenisation — sees it), then the caller's environment back."""
    from .. import protocol as proto

    return proto.using(protocol)


def _fit(model, svd, ex, task, out, *, iterations, population, elite, init_std, per, normalise, seed, backend,
         data_dir, param, dtype, device, batch_size, max_new_tokens, docs, stop_after, allow_cross_model, p_name,
         svf_precision, reported_limit, reported_docs) -> dict[str, Any]:
    from .. import protocol as proto
    from .. import provenance as prov
    from ..config import model_spec
    from ..models.loading import resolve_model_dir
    from ..svd import ordered_names
    from ..tasks import get_task
    from .cem import CEMConfig, member_evaluator, reported_evaluator, run_cem, search_identity
    from .experts import ExpertBank, expert_file

    knobs = proto.record()  # the protocol name, its overrides and every knob's value
    select, mix_space = proto.value("fewshot_select"), proto.value("fewshot_mix")
    out.mkdir(parents=True, exist_ok=True)
    cfg = CEMConfig(iterations=iterations, population=population, elite=elite, init_std=init_std, per=per,
                    normalise=normalise, seed=seed, select=select)
    cfg.check()
    model_dir = str(resolve_model_dir(model))
    bank = ExpertBank(svd, param, cross_model=allow_cross_model, precision=svf_precision)
    # refuse a cache or experts of another model (unless allowed) before the model loads
    bank.check_model(model_dir, ex, hint=" (t2eval fit-fewshot --allow-cross-model)")
    names = list(ex)
    loaded = [bank.load(ex[n]) for n in names]
    n_mat = len(ordered_names(loaded[0].z))
    shape = (len(names),) if per == "vector" else (len(names), n_mat)
    t = get_task(task)
    docs = docs if docs is not None else t.docs("fewshot_heldout", data_dir)
    # the reported set is scored only where the protocol's rule looks at it more than once (a single
    # check, iterations <= 10, forces the choice: the incumbent after iteration 1)
    reported = None
    if cfg.n_checks > 1:
        reported = reported_docs if reported_docs is not None else t.docs("fewshot_test", data_dir)
        reported = list(reported)[:reported_limit] if reported_limit is not None else list(reported)
        if not reported:
            raise T2EvalError(f"the reported set of {task} (split fewshot_test) is empty: prepare the data "
                              "(`t2eval prepare-data`) or use --protocol corrected (α chosen on the shots only)")
    family = model_spec(model).family
    from ..backends import make_backend

    be_kw = {} if svf_precision == "fp32" else {"svf_precision": svf_precision}
    be = (make_backend(backend, model_dir, svd=bank.svd, dtype=dtype, device=device, batch_size=batch_size, **be_kw)
          if isinstance(backend, str) else backend)

    def mix(a):
        return bank.mix_loaded(loaded, a, per, normalise, mix_space)

    evaluate = member_evaluator(be, t, docs, mix, family, max_new_tokens)
    score_reported = None if reported is None else reported_evaluator(be, t, reported, mix, family, max_new_tokens)
    identity = search_identity(experts=ex, model_dir=model_dir, svd=bank.svd, task=task, shots=docs,
                               reported=reported, mix_space=mix_space, svf_precision=svf_precision,
                               protocol=knobs, param=param, max_new_tokens=max_new_tokens, dtype=dtype)
    t0 = time.perf_counter()
    alpha, summary = run_cem(evaluate, shape, cfg, out / "state.json", out / "log.jsonl",
                             on_iteration=lambda r: log.info("iteration %d: best %.3f, pop mean %.3f, alpha %s",
                                                             r["iteration"], r["best_score"], r["pop_mean"],
                                                             [round(x, 3) for x in r["alpha_mean"]]),
                             stop_after=stop_after, score_reported=score_reported, identity=identity)
    if not summary["complete"]:
        return summary
    be.set_scales(None)
    record = prov.record("fit-fewshot", {"model": model, "svd": str(svd), "experts": ex, "task": task,
                                         "cem": asdict(cfg), "family": family, "max_new_tokens": max_new_tokens,
                                         "backend": getattr(be, "name", str(backend)), "param": param,
                                         "allow_cross_model": allow_cross_model, "protocol": p_name,
                                         "svf_precision": svf_precision, "mix_space": mix_space,
                                         "reported_limit": reported_limit},
                         seeds={"cem": seed}, inputs={"model_dir": model_dir},
                         timings={"search_s_this_run": time.perf_counter() - t0},
                         extra={"files": {n: {str(expert_file(p)): prov.sha256_file(expert_file(p))}
                                          for n, p in ex.items()},
                                "heldout_doc_ids": [d.get("doc_id") for d in docs],
                                "reported_doc_ids": None if reported is None else [d.get("doc_id") for d in reported],
                                "search_identity": identity, "restarted": summary["restarted"]})
    result = {"alpha": alpha.tolist(), "experts": names, "per": per, "normalised": normalise,
              "mix_space": mix_space, "svf_precision": svf_precision,
              "alpha_selection": summary["alpha_selection"], "select": summary["select"],
              "selected_iteration": summary["selected_iteration"], "reported_score": summary["reported_score"],
              "reported_checks": summary["reported_checks"], "n_reported": None if reported is None else len(reported),
              "protocol": knobs,
              "best_score": summary["best_score"], "best_tiebreak": summary["best_tiebreak"],
              "final_incumbent_score": summary["final_incumbent_score"],
              "iterations": cfg.iterations, "population": cfg.population, "elite": cfg.elite,
              "init_std": cfg.init_std, "seed": seed, "task": task, "n_heldout": len(docs),
              "matrices": ordered_names(loaded[0].z) if per == "matrix" else None, "provenance": record}
    prov.write_json_atomic(out / "alpha.json", result)
    return result


def run(args) -> int:
    import os

    c = from_args(FitFewshotConfig, args)
    if c.allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    kw = {k: v for k, v in asdict(c).items() if k not in ("model", "svd", "experts", "task", "out",
                                                         "allow_code_execution")}
    res = fit_fewshot(c.model, c.svd, c.experts, c.task, c.out, **kw)
    a = res["alpha"]
    shown = a if c.per == "vector" else [round(sum(r) / len(r), 4) for r in a]
    rep = "" if res["reported_score"] is None else \
        f", reported-set score {res['reported_score']:.3f} (iteration {res['selected_iteration']})"
    print(f"alpha ({', '.join(res['experts'])}) = {shown}, best held-out score {res['best_score']:.3f}{rep}; "
          f"{res['alpha_selection']} [protocol {res['protocol']['name']}] -> {Path(c.out) / 'alpha.json'}")
    return 0
