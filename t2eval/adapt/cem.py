"""Few-shot adaptation (PROTOCOL §6.3): cross-entropy method over the expert mixture weights α.

α has shape (K,) (`per="vector"`: one weight per expert) or (K, M) (`per="matrix"`: one weight per
expert and targeted matrix, matrices in canonical order). Each iteration draws `population`
members from N(mean, std) (mean starts at 1/K, std at `init_std`), clamps them to [0, 1], scores
them with `evaluate(α) -> (score, tiebreak)` (score = fraction of the held-out prompts solved by
greedy generation under the mixture; tiebreak = mean token log-likelihood of the member's own
correct answers), and refits mean/std to the top `elite` fraction. The best member so far (the
incumbent) is re-evaluated every round alongside the population and competes with it; members are
ranked by (score, tiebreak). Deterministic from `seed` and resumable: the state (mean, std, best,
RNG state, iteration) is written atomically after every iteration and a rerun continues from it,
giving the same final α as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import CorruptArtifactError, T2EvalError
from ..provenance import write_json_atomic

Evaluate = Callable[[np.ndarray], tuple[float, float]]


@dataclass
class CEMConfig:
    iterations: int = 100
    population: int = 32
    elite: float = 0.2
    init_std: float = 0.5
    per: str = "vector"          # vector | matrix
    normalise: bool = False      # applied when mixing (svf.mix_scales), the searched α stays in [0, 1]
    seed: int = 0
    reevaluate_best: bool = True

    def check(self) -> None:
        if self.per not in ("vector", "matrix"):
            raise T2EvalError(f"--per {self.per!r}: use vector (one α per expert) or matrix (one per matrix)")
        if self.population < 2 or not 0 < self.elite <= 1 or self.iterations < 1 or self.init_std < 0:
            raise T2EvalError("CEM needs population >= 2, 0 < elite <= 1, iterations >= 1, init_std >= 0")

    @property
    def n_elite(self) -> int:
        return max(1, int(round(self.population * self.elite)))


def _key(score: float, tie: float) -> tuple[float, float]:
    return (float(score), float(tie) if tie is not None and math.isfinite(tie) else -math.inf)


class CEMState:
    """Everything needed to continue a search; JSON on disk."""

    def __init__(self, mean, std, rng_state, iteration=0, best_alpha=None, best_score=None, best_tie=None):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        self.rng_state = rng_state
        self.iteration = int(iteration)
        self.best_alpha = None if best_alpha is None else np.asarray(best_alpha, dtype=np.float64)
        self.best_score = best_score
        self.best_tie = best_tie

    def to_json(self, config: CEMConfig, shape) -> dict:
        return {"config": asdict(config), "shape": list(shape), "iteration": self.iteration,
                "mean": self.mean.tolist(), "std": self.std.tolist(), "rng_state": self.rng_state,
                "best_alpha": None if self.best_alpha is None else self.best_alpha.tolist(),
                "best_score": self.best_score, "best_tie": self.best_tie}

    @classmethod
    def from_json(cls, d: dict) -> "CEMState":
        return cls(d["mean"], d["std"], d["rng_state"], d["iteration"], d.get("best_alpha"), d.get("best_score"),
                   d.get("best_tie"))


def run_cem(evaluate: Evaluate, shape: Sequence[int], config: CEMConfig, state_path: str | Path | None = None,
            log_path: str | Path | None = None, on_iteration: Callable[[dict], None] | None = None,
            stop_after: int | None = None) -> tuple[np.ndarray, dict]:
    """Search α; returns (best α, summary). `stop_after` ends after that many iterations of THIS
    call (to test resuming); the state file lets a later call continue."""
    config.check()
    shape = tuple(int(s) for s in shape)
    K = shape[0]
    state = None
    if state_path is not None and Path(state_path).exists():
        try:
            d = json.loads(Path(state_path).read_text())
        except json.JSONDecodeError as e:
            raise CorruptArtifactError(f"CEM state {state_path} is not valid JSON ({e.msg}); delete it to restart") from None
        if d.get("config") != asdict(config) or tuple(d.get("shape", ())) != shape:
            raise T2EvalError(f"CEM state {state_path} was written with other settings "
                              f"({d.get('config')}, shape {d.get('shape')}); delete it or use the same options")
        state = CEMState.from_json(d)
    if state is None:
        rng = np.random.default_rng(config.seed)
        state = CEMState(np.full(shape, 1.0 / K), np.full(shape, config.init_std), rng.bit_generator.state)
        if log_path is not None and Path(log_path).exists():
            Path(log_path).unlink()
    elif log_path is not None and Path(log_path).exists():  # keep exactly the logged iterations of the state
        lines = Path(log_path).read_text().splitlines()[:state.iteration]
        Path(log_path).write_text("".join(line + "\n" for line in lines))
    rng = np.random.default_rng()
    rng.bit_generator.state = state.rng_state
    done = 0
    while state.iteration < config.iterations and (stop_after is None or done < stop_after):
        t0 = time.perf_counter()
        members = np.clip(rng.normal(state.mean, state.std, size=(config.population, *shape)), 0.0, 1.0)
        results = [evaluate(m) for m in members]
        cand = list(zip(members, results))
        if config.reevaluate_best and state.best_alpha is not None:
            cand.append((state.best_alpha, evaluate(state.best_alpha)))
        order = sorted(range(len(cand)), key=lambda i: _key(*cand[i][1]), reverse=True)
        elite_idx = [i for i in order if i < config.population][:config.n_elite]
        elite = np.stack([cand[i][0] for i in elite_idx])
        state.mean = elite.mean(0)
        state.std = elite.std(0)
        b = order[0]
        if (state.best_alpha is None or config.reevaluate_best
                or _key(*cand[b][1]) > _key(state.best_score, state.best_tie)):
            state.best_alpha, (state.best_score, state.best_tie) = np.array(cand[b][0]), cand[b][1]
        scores = np.array([r[0] for r in results])
        state.iteration += 1
        state.rng_state = rng.bit_generator.state
        row = {"iteration": state.iteration, "best_score": state.best_score, "best_tiebreak": state.best_tie,
               "pop_best": float(scores.max()), "pop_mean": float(scores.mean()),
               "elite_mean": float(np.mean([cand[i][1][0] for i in elite_idx])),
               "alpha_mean": state.mean.reshape(K, -1).mean(1).tolist(),
               "alpha_std": state.std.reshape(K, -1).mean(1).tolist(),
               "best_alpha": state.best_alpha.reshape(K, -1).mean(1).tolist(),
               "seconds": time.perf_counter() - t0}
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if state_path is not None:
            write_json_atomic(state_path, state.to_json(config, shape))
        if on_iteration:
            on_iteration(row)
        done += 1
    summary = {"iterations_done": state.iteration, "complete": state.iteration >= config.iterations,
               "best_score": state.best_score, "best_tiebreak": state.best_tie}
    return (state.best_alpha if state.best_alpha is not None else state.mean), summary


def member_evaluator(backend, task, docs: Sequence[dict], mix: Callable[[np.ndarray], dict], family: str | None = None,
                     max_new_tokens: int | None = None) -> Evaluate:
    """`evaluate(α)` over held-out docs through the backend interface: load the α-mixture's scales,
    greedy-generate every prompt, score with the task's scorer, tiebreak = mean over correct answers
    of the mean token log-likelihood of the generated answer."""
    prompts = [task.prompt(backend.tokenizer, d, family) for d in docs]
    gk = task.gen_kwargs

    def evaluate(alpha: np.ndarray) -> tuple[float, float]:
        backend.set_scales(mix(alpha))
        gens = backend.generate(prompts, max_new_tokens or gk["max_new_tokens"], stop=gk.get("stop"),
                                temperature=0.0)
        ok = task.score_batch(docs, [g.text for g in gens])
        right = [(p, g) for p, g, c in zip(prompts, gens, ok) if c and g.text]
        tie = -math.inf
        if right:
            lls = backend.loglikelihood([(p, g.text) for p, g in right])
            per_tok = [lp / max(1, len(backend.tokenizer(g.text, add_special_tokens=False)["input_ids"]))
                       for (lp, _), (_, g) in zip(lls, right)]
            tie = float(np.mean(per_tok))
        return float(np.mean(ok)) if ok else 0.0, tie

    return evaluate
