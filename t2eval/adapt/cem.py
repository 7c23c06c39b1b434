"""Few-shot adaptation (PROTOCOL §6.3, §8): cross-entropy method over the expert mixture weights α.

α has shape (K,) (`per="vector"`: one weight per expert) or (K, M) (`per="matrix"`: one weight per
expert and targeted matrix, matrices in canonical order — the release's per-layer α). Each iteration
draws `population` members from N(mean, std) (mean starts at 1/K, std at `init_std`), clamps them to
[0, 1], scores them with `evaluate(α) -> (score, tiebreak)` (score = fraction of the shots solved by
greedy generation under the mixture; tiebreak = mean token log-likelihood of the member's own
correct answers), ranks them by (score, tiebreak) — equal keys keep member order, so the lowest
index wins — and refits mean/std to the elites. Options (release default first):

* ``incumbent``: ``member0`` — member 0 of every population is replaced by the incumbent (the best
  member of the previous population; the initial α 1/K in the first), so it is re-evaluated, competes
  and may be an elite; the new incumbent is the best member. ``extra`` — the incumbent is
  re-evaluated *alongside* the population, competes for best but is never an elite (t2eval ≤ 2026-11).
* ``elite_rounding``: ``floor`` — int(population · elite) elites (32 · 0.2 → 6; 0 means every member,
  as the release's ``argpartition(perf, -0)[-0:]`` does); ``round`` — max(1, round(·)).
* ``std_ddof``: 1 — the unbiased std (torch.std's default, n − 1); 0 — the population std.
* ``select`` (how the final α is chosen): ``reported_set`` — after iterations 1, 1 + every, 1 + 2·every, …
  (the release's 0-based ``i % test_interval == 0``, every = 10) the incumbent is scored by
  ``score_reported(α)`` on the *reported* set and the α with the highest such score so far is kept
  (first one on ties; the release never revisits iterations after the last check) — labelled
  "α selected on the reported set". When the run has a single check (iterations ≤ every) the
  choice is forced (the incumbent after iteration 1), `score_reported` may be omitted, and the
  label says the α was chosen on the shots only (`FORCED_LABEL`): the reported set could not matter.
  ``final_incumbent`` — the final incumbent, chosen on the shots only.

Deterministic from `seed` and resumable: the state (mean, std, incumbent, selection, RNG state,
iteration, and the search's `identity`) is written atomically after every iteration and a rerun
continues from it, giving the same final α as an uninterrupted run. `identity` (see
:func:`search_identity`: sha256 of the experts, model, SVD cache, task, shots and reported set) must
match the saved one, otherwise the saved state is discarded with a warning and the search starts
afresh — a state made with other experts/model/data is never reused. Other CEM settings than the
saved ones are an error (they are the user's to reconcile).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import CorruptArtifactError, T2EvalError
from ..provenance import write_json_atomic

log = logging.getLogger(__name__)

Evaluate = Callable[[np.ndarray], tuple[float, float]]
ScoreReported = Callable[[np.ndarray], Any]  # α -> score (a float, or a tuple whose first item is the score)

INCUMBENT_MODES = ("member0", "extra")
ELITE_ROUNDING = ("floor", "round")
SELECT_RULES = ("reported_set", "final_incumbent")
SELECTION_LABELS = {"reported_set": "α selected on the reported set",
                    "final_incumbent": "α selected on the shots only (final incumbent)"}
# select="reported_set" with a single check (iterations <= select_every): the reported set cannot
# change the choice, which is the incumbent after iteration 1 — chosen on the shots only
FORCED_LABEL = "α selected on the shots only (one reported-set check: the incumbent after iteration 1)"


def selection_label(select: str) -> str:
    """The label result cells and tables carry for the α-selection rule `select`."""
    if select not in SELECTION_LABELS:
        raise T2EvalError(f"select={select!r}: use 'reported_set' (the release) or 'final_incumbent' (corrected)")
    return SELECTION_LABELS[select]


@dataclass
class CEMConfig:
    iterations: int = 100
    population: int = 32
    elite: float = 0.2
    init_std: float = 0.5
    per: str = "matrix"          # matrix (release: per-layer α) | vector
    normalise: bool = False      # applied when mixing (svf.mix_scales), the searched α stays in [0, 1]
    seed: int = 0
    reevaluate_best: bool = True
    incumbent: str = "member0"   # member0 (release) | extra
    elite_rounding: str = "floor"  # floor (release: int(population*elite)) | round
    std_ddof: int = 1            # 1 (release: torch.std, unbiased) | 0
    select: str = "reported_set"  # reported_set (release) | final_incumbent (corrected: chosen on the shots)
    select_every: int = 10       # release: test_interval = 10

    def check(self) -> None:
        if self.per not in ("vector", "matrix"):
            raise T2EvalError(f"--per {self.per!r}: use vector (one α per expert) or matrix (one per matrix)")
        if self.population < 2 or not 0 < self.elite <= 1 or self.iterations < 1 or self.init_std < 0:
            raise T2EvalError("CEM needs population >= 2, 0 < elite <= 1, iterations >= 1, init_std >= 0")
        if self.incumbent not in INCUMBENT_MODES:
            raise T2EvalError(f"incumbent={self.incumbent!r}: use 'member0' (the release: the incumbent is member 0 "
                              "of every population) or 'extra' (re-evaluated alongside, never an elite)")
        if self.elite_rounding not in ELITE_ROUNDING:
            raise T2EvalError(f"elite_rounding={self.elite_rounding!r}: use 'floor' (int(population·elite), the "
                              "release) or 'round'")
        if self.std_ddof not in (0, 1):
            raise T2EvalError(f"std_ddof={self.std_ddof!r}: use 1 (unbiased, torch.std's default) or 0")
        selection_label(self.select)
        if self.select_every < 1:
            raise T2EvalError(f"select_every={self.select_every}: must be >= 1")
        need = 1 + self.std_ddof
        if self.n_elite < need:
            raise T2EvalError(f"population {self.population} × elite {self.elite} gives {self.n_elite} elite(s) "
                              f"({self.elite_rounding}); the {'unbiased ' if self.std_ddof else ''}std needs at "
                              f"least {need}: raise --population or --elite")

    @property
    def n_elite(self) -> int:
        if self.elite_rounding == "floor":
            return int(self.population * self.elite) or self.population  # release: argpartition(x, -0)[-0:] = all
        return max(1, int(round(self.population * self.elite)))

    @property
    def n_checks(self) -> int:
        """How many times select="reported_set" scores the incumbent on the reported set."""
        return (self.iterations - 1) // self.select_every + 1 if self.select == "reported_set" else 0


def _key(score: float, tie: float) -> tuple[float, float]:
    return (float(score), float(tie) if tie is not None and math.isfinite(tie) else -math.inf)


def _reported_score(r) -> float:
    return float(r[0] if isinstance(r, (tuple, list)) else r)


def _canon(obj):
    return None if obj is None else json.loads(json.dumps(obj, sort_keys=True, default=str))


class CEMState:
    """Everything needed to continue a search; JSON on disk."""

    def __init__(self, mean, std, rng_state, iteration=0, best_alpha=None, best_score=None, best_tie=None,
                 selected_alpha=None, selected_score=None, selected_iteration=None, selected_shots_score=None,
                 selected_shots_tie=None, checks=None):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        self.rng_state = rng_state
        self.iteration = int(iteration)
        self.best_alpha = None if best_alpha is None else np.asarray(best_alpha, dtype=np.float64)
        self.best_score = best_score
        self.best_tie = best_tie
        self.selected_alpha = None if selected_alpha is None else np.asarray(selected_alpha, dtype=np.float64)
        self.selected_score = selected_score
        self.selected_iteration = selected_iteration
        self.selected_shots_score = selected_shots_score
        self.selected_shots_tie = selected_shots_tie
        self.checks = list(checks or [])

    def to_json(self, config: CEMConfig, shape, identity=None) -> dict:
        arr = lambda a: None if a is None else a.tolist()  # noqa: E731
        return {"config": asdict(config), "shape": list(shape), "identity": _canon(identity),
                "iteration": self.iteration, "mean": self.mean.tolist(), "std": self.std.tolist(),
                "rng_state": self.rng_state, "best_alpha": arr(self.best_alpha), "best_score": self.best_score,
                "best_tie": self.best_tie, "selected_alpha": arr(self.selected_alpha),
                "selected_score": self.selected_score, "selected_iteration": self.selected_iteration,
                "selected_shots_score": self.selected_shots_score, "selected_shots_tie": self.selected_shots_tie,
                "checks": self.checks}

    @classmethod
    def from_json(cls, d: dict) -> "CEMState":
        return cls(d["mean"], d["std"], d["rng_state"], d["iteration"], d.get("best_alpha"), d.get("best_score"),
                   d.get("best_tie"), d.get("selected_alpha"), d.get("selected_score"), d.get("selected_iteration"),
                   d.get("selected_shots_score"), d.get("selected_shots_tie"), d.get("checks"))


def _identity_diff(old, new) -> list[str]:
    old, new = old or {}, new or {}
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ["identity"]
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _load_state(state_path, config: CEMConfig, shape, identity) -> tuple[CEMState | None, str | None]:
    if state_path is None or not Path(state_path).exists():
        return None, None
    try:
        d = json.loads(Path(state_path).read_text())
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"CEM state {state_path} is not valid JSON ({e.msg}); delete it to restart") from None
    if d.get("config") != asdict(config) or tuple(d.get("shape", ())) != shape:
        raise T2EvalError(f"CEM state {state_path} was written with other settings "
                          f"({d.get('config')}, shape {d.get('shape')}); delete it or use the same options")
    diff = _identity_diff(d.get("identity"), _canon(identity))
    if diff:
        why = f"the search inputs changed since {state_path} was written ({', '.join(diff)})"
        log.warning("%s: discarding it and starting the search afresh", why)
        return None, why
    return CEMState.from_json(d), None


def run_cem(evaluate: Evaluate, shape: Sequence[int], config: CEMConfig, state_path: str | Path | None = None,
            log_path: str | Path | None = None, on_iteration: Callable[[dict], None] | None = None,
            stop_after: int | None = None, score_reported: ScoreReported | None = None,
            identity: Mapping | None = None) -> tuple[np.ndarray, dict]:
    """Search α; returns (α, summary). `score_reported(α)` scores an α on the reported set (needed for
    ``select="reported_set"``); `identity` identifies the search inputs (:func:`search_identity`).
    `stop_after` ends after that many iterations of THIS call (to test resuming); the state file lets
    a later call continue."""
    config.check()
    if config.n_checks > 1 and score_reported is None:
        raise T2EvalError("CEM select='reported_set' (the release: the final α is the incumbent that scores best on "
                          "the reported set, checked every 10 iterations) needs score_reported(α); pass it, or "
                          "use select='final_incumbent' (the final incumbent, chosen on the shots only)")
    shape = tuple(int(s) for s in shape)
    K = shape[0]
    init_alpha = np.full(shape, 1.0 / K)
    state, restarted = _load_state(state_path, config, shape, identity)
    if state is None:
        rng = np.random.default_rng(config.seed)
        state = CEMState(init_alpha, np.full(shape, config.init_std), rng.bit_generator.state)
        if log_path is not None and Path(log_path).exists():
            Path(log_path).unlink()
    elif log_path is not None and Path(log_path).exists():  # keep exactly the logged iterations of the state
        lines = Path(log_path).read_text().splitlines()[:state.iteration]
        Path(log_path).write_text("".join(line + "\n" for line in lines))
    rng = np.random.default_rng()
    rng.bit_generator.state = state.rng_state
    P = config.population
    member0 = config.reevaluate_best and config.incumbent == "member0"
    done = 0
    while state.iteration < config.iterations and (stop_after is None or done < stop_after):
        t0 = time.perf_counter()
        members = np.clip(rng.normal(state.mean, state.std, size=(P, *shape)), 0.0, 1.0)
        if member0:
            members[0] = state.best_alpha if state.best_alpha is not None else init_alpha
        results = [evaluate(m) for m in members]
        cand = list(zip(members, results))
        if config.reevaluate_best and not member0 and state.best_alpha is not None:
            cand.append((state.best_alpha, evaluate(state.best_alpha)))
        order = sorted(range(len(cand)), key=lambda i: _key(*cand[i][1]), reverse=True)
        elite_idx = [i for i in order if i < P][:config.n_elite]
        elite = np.stack([cand[i][0] for i in elite_idx])
        state.mean = elite.mean(0)
        state.std = elite.std(0, ddof=config.std_ddof)
        b = order[0]
        if (state.best_alpha is None or config.reevaluate_best
                or _key(*cand[b][1]) > _key(state.best_score, state.best_tie)):
            state.best_alpha, (state.best_score, state.best_tie) = np.array(cand[b][0]), cand[b][1]
        scores = np.array([r[0] for r in results])
        state.iteration += 1
        reported = None
        if config.select == "reported_set" and (state.iteration - 1) % config.select_every == 0:
            reported = None if score_reported is None else _reported_score(score_reported(state.best_alpha))
            state.checks.append({"iteration": state.iteration, "reported_score": reported,
                                 "shots_score": state.best_score})
            if state.selected_alpha is None or (reported is not None and reported > state.selected_score):
                state.selected_alpha, state.selected_score = np.array(state.best_alpha), reported
                state.selected_iteration = state.iteration
                state.selected_shots_score, state.selected_shots_tie = state.best_score, state.best_tie
        state.rng_state = rng.bit_generator.state
        row = {"iteration": state.iteration, "best_score": state.best_score, "best_tiebreak": state.best_tie,
               "pop_best": float(scores.max()), "pop_mean": float(scores.mean()),
               "elite_mean": float(np.mean([cand[i][1][0] for i in elite_idx])),
               "alpha_mean": state.mean.reshape(K, -1).mean(1).tolist(),
               "alpha_std": state.std.reshape(K, -1).mean(1).tolist(),
               "best_alpha": state.best_alpha.reshape(K, -1).mean(1).tolist(),
               "reported_score": reported, "selected_iteration": state.selected_iteration,
               "seconds": time.perf_counter() - t0}
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if state_path is not None:
            write_json_atomic(state_path, state.to_json(config, shape, identity))
        if on_iteration:
            on_iteration(row)
        done += 1
    return _result(state, config, restarted)


def _result(state: CEMState, config: CEMConfig, restarted: str | None) -> tuple[np.ndarray, dict]:
    label = FORCED_LABEL if config.select == "reported_set" and config.n_checks <= 1 else selection_label(config.select)
    summary = {"iterations_done": state.iteration, "complete": state.iteration >= config.iterations,
               "alpha_selection": label, "select": config.select,
               "final_incumbent_score": state.best_score, "final_incumbent_tiebreak": state.best_tie,
               "restarted": restarted}
    if config.select == "reported_set" and state.selected_alpha is not None:
        alpha = state.selected_alpha
        summary.update(best_score=state.selected_shots_score, best_tiebreak=state.selected_shots_tie,
                       selected_iteration=state.selected_iteration, reported_score=state.selected_score,
                       reported_checks=list(state.checks))
    else:
        alpha = state.best_alpha if state.best_alpha is not None else state.mean
        summary.update(best_score=state.best_score, best_tiebreak=state.best_tie,
                       selected_iteration=state.iteration if config.select == "final_incumbent" else None,
                       reported_score=None, reported_checks=list(state.checks))
    return alpha, summary


def _dir_sha256(d: str | Path) -> str:
    """sha256 over the (relative path, sha256) of every regular file under `d` (hidden entries skipped)."""
    import hashlib

    from ..provenance import sha256_file

    root = Path(d)
    if root.is_file():
        return sha256_file(root)
    if not root.is_dir():
        raise T2EvalError(f"cannot hash {root}: not a file or directory")
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            h.update(f"{p.relative_to(root).as_posix()}:{sha256_file(p)};".encode())
    return h.hexdigest()


def search_identity(*, experts: Mapping[str, str | Path], model_dir: str | Path, svd: Any, task: str,
                    shots: Sequence[Mapping], reported: Sequence[Mapping] | None = None, **extra) -> dict:
    """What a saved CEM state is valid for: content hashes (sha256) of the expert files (in α order,
    with their names), the model directory (every file), the SVD cache, the task name, the shots
    and the reported set (the docs as JSON), plus any `extra` (e.g. protocol knobs that change a
    member's score: mix space, precision, prompt options).

    `svd`: a cache path (the file is hashed) or a loaded :class:`t2eval.svd.SVDCache`, whose manifest
    factor checksums are hashed instead — `load_svd` verified them against the bytes, so they identify
    the content without reading the (up to tens of GB) file a second time."""
    from ..provenance import sha256_file, sha256_json
    from .experts import expert_file

    manifest = getattr(svd, "manifest", None)
    if isinstance(manifest, Mapping):  # the factors' checksums only (not timings, paths or provenance)
        svd_sha = sha256_json([[n, manifest["matrices"][n]["sha256"]] for n in manifest["names"]])
    else:
        svd_sha = sha256_file(svd)
    return {"experts": [[str(name), sha256_file(expert_file(p))] for name, p in experts.items()],
            "model_sha256": _dir_sha256(model_dir), "svd_sha256": svd_sha, "task": str(task),
            "shots_sha256": sha256_json(list(shots)),
            "reported_sha256": None if reported is None else sha256_json(list(reported)),
            **{k: _canon(v) for k, v in extra.items()}}


def member_evaluator(backend, task, docs: Sequence[dict], mix: Callable[[np.ndarray], dict], family: str | None = None,
                     max_new_tokens: int | None = None, tiebreak: bool = True) -> Evaluate:
    """`evaluate(α)` over held-out docs through the backend interface: load the α-mixture's scales,
    greedy-generate every prompt, score with the task's scorer, tiebreak = mean over correct answers
    of the mean token log-likelihood of the generated answer (-inf without `tiebreak`)."""
    prompts = [task.prompt(backend.tokenizer, d, family) for d in docs]
    gk = task.gen_kwargs

    def evaluate(alpha: np.ndarray) -> tuple[float, float]:
        backend.set_scales(mix(alpha))
        gens = backend.generate(prompts, max_new_tokens or gk["max_new_tokens"], stop=gk.get("stop"),
                                temperature=0.0)
        ok = task.score_batch(docs, [g.text for g in gens])
        right = [(p, g) for p, g, c in zip(prompts, gens, ok) if c and g.text]
        tie = -math.inf
        if right and tiebreak:
            lls = backend.loglikelihood([(p, g.text) for p, g in right])
            per_tok = [lp / max(1, len(backend.tokenizer(g.text, add_special_tokens=False)["input_ids"]))
                       for (lp, _), (_, g) in zip(lls, right)]
            tie = float(np.mean(per_tok))
        return float(np.mean(ok)) if ok else 0.0, tie

    return evaluate


def reported_evaluator(backend, task, docs: Sequence[dict], mix: Callable[[np.ndarray], dict],
                       family: str | None = None, max_new_tokens: int | None = None) -> ScoreReported:
    """`score_reported(α)` for ``select="reported_set"``: the fraction of the reported-set `docs` solved
    under the α-mixture (greedy, the task's scorer; no tiebreak — the release compares accuracy only)."""
    ev = member_evaluator(backend, task, docs, mix, family, max_new_tokens, tiebreak=False)
    return lambda alpha: ev(alpha)[0]
