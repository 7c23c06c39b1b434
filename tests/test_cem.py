"""Few-shot CEM (PROTOCOL §6.3): the search itself on synthetic objectives, resuming, and
`fit_fewshot` end-to-end on the tiny model through the HF backend."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from t2eval.adapt.cem import FORCED_LABEL, CEMConfig, run_cem, search_identity
from t2eval.errors import T2EvalError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _objective(target):
    """score: how many of 10 thresholds each α coordinate gets right; tiebreak: closeness to target."""
    target = np.asarray(target)

    def ev(a):
        a = np.asarray(a)
        score = float(np.mean(np.abs(a - target) < 0.15))
        return score, -float(np.abs(a - target).sum())

    return ev


def test_cem_converges_and_respects_protocol():
    seen = []
    target = [0.9, 0.1, 0.5]
    ev = _objective(target)

    def spy(a):
        seen.append(np.array(a))
        return ev(a)

    cfg = CEMConfig(iterations=15, population=32, elite=0.2, init_std=0.5, seed=1, incumbent="extra",
                    select="final_incumbent")
    alpha, summary = run_cem(spy, (3,), cfg)
    assert summary["complete"] and summary["iterations_done"] == 15
    first = np.stack(seen[:32])
    assert first.min() >= 0 and first.max() <= 1  # clamped to [0, 1]
    assert abs(np.mean(np.clip(np.random.default_rng(0).normal(1 / 3, 0.5, 100000), 0, 1))
               - first.mean()) < 0.12  # drawn around the init mean 1/K
    assert len(seen) == 32 + 14 * 33  # the incumbent best is re-evaluated from round 2 on
    assert np.abs(alpha - target).max() < 0.15


def test_cem_per_matrix_shape_and_elite_count():
    cfg = CEMConfig(iterations=2, population=10, elite=0.2, per="matrix", seed=0, select="final_incumbent")
    assert cfg.n_elite == 2
    alpha, _ = run_cem(lambda a: (float(a.mean()), 0.0), (3, 4), cfg)
    assert alpha.shape == (3, 4)


def test_cem_ties_broken_by_loglikelihood():
    # every member scores the same; the tiebreak prefers small α[0]
    alpha, s = run_cem(lambda a: (0.5, -float(a[0])), (2,), CEMConfig(iterations=3, population=16, seed=3,
                                                                        select="final_incumbent"))
    assert s["best_score"] == 0.5 and s["best_tiebreak"] == -alpha[0]
    assert alpha[0] < 0.1


def test_cem_resume_gives_same_alpha(tmp_path):
    ev = _objective([0.2, 0.8, 0.6])
    cfg = CEMConfig(iterations=6, population=12, seed=5, select="final_incumbent")
    full, _ = run_cem(ev, (3,), cfg, tmp_path / "a" / "state.json", tmp_path / "a" / "log.jsonl")
    (tmp_path / "b").mkdir()
    part, s = run_cem(ev, (3,), cfg, tmp_path / "b" / "state.json", tmp_path / "b" / "log.jsonl", stop_after=2)
    assert not s["complete"] and s["iterations_done"] == 2
    again, s = run_cem(ev, (3,), cfg, tmp_path / "b" / "state.json", tmp_path / "b" / "log.jsonl", stop_after=1)
    assert s["iterations_done"] == 3
    resumed, s = run_cem(ev, (3,), cfg, tmp_path / "b" / "state.json", tmp_path / "b" / "log.jsonl")
    assert s["complete"]
    np.testing.assert_array_equal(full, resumed)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                       for x in p.read_text().splitlines()]
    assert strip(tmp_path / "a" / "log.jsonl") == strip(tmp_path / "b" / "log.jsonl")
    with pytest.raises(Exception, match="other settings"):
        run_cem(ev, (3,), CEMConfig(iterations=6, population=12, seed=6, select="final_incumbent"),
                tmp_path / "b" / "state.json")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    import torch

    from t2eval.svd import decompose, load_svd
    from t2eval.svf import ExpertVector
    from t2eval.testing import tiny_model_dir

    tiny = str(tiny_model_dir(0))
    root = tmp_path_factory.mktemp("fewshot")
    svd_path = root / "svd.safetensors"
    decompose(tiny, "mlp", out=svd_path)
    svd = load_svd(svd_path)
    experts = {}
    for i, name in enumerate(["math", "code", "reasoning"]):
        g = torch.Generator().manual_seed(7 + i)
        z = {n: 2.0 * torch.randn(svd.rank(n), generator=g) for n in svd.names}
        ExpertVector.from_svd(z, svd, param="code", task=name).save(root / name / "z.safetensors")
        experts[name] = str(root / name)
    return tiny, str(svd_path), experts, root


def test_fit_fewshot_tiny_resumable(tiny_setup, data_mirror):
    from t2eval.adapt.fewshot_cli import fit_fewshot
    from t2eval.backends.hf import HFBackend
    from t2eval.tasks import get_task

    tiny, svd, experts, root = tiny_setup
    docs = get_task("arc_challenge").docs("fewshot_heldout", data_mirror)
    assert len(docs) == 10
    from t2eval.svd import load_svd

    be = HFBackend(tiny, svd=load_svd(svd), batch_size=10)
    kw = dict(iterations=2, population=4, seed=11, backend=be, max_new_tokens=3, docs=docs)
    spec = ",".join(f"{n}:{p}" for n, p in experts.items())
    full = fit_fewshot(tiny, svd, spec, "arc_challenge", root / "full", **kw)
    part = fit_fewshot(tiny, svd, spec, "arc_challenge", root / "resumed", stop_after=1, **kw)
    assert part["iterations_done"] == 1 and not (root / "resumed" / "alpha.json").exists()
    resumed = fit_fewshot(tiny, svd, spec, "arc_challenge", root / "resumed", **kw)
    assert resumed["alpha"] == full["alpha"] and resumed["best_score"] == full["best_score"]
    saved = json.loads((root / "full" / "alpha.json").read_text())
    assert saved["experts"] == ["math", "code", "reasoning"] and len(saved["alpha"]) == 3
    assert all(0 <= a <= 1 for a in saved["alpha"]) and saved["per"] == "vector"
    assert saved["provenance"]["stage"] == "fit-fewshot" and len(saved["provenance"]["heldout_doc_ids"]) == 10
    log = [json.loads(x) for x in (root / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2] and {"pop_mean", "elite_mean", "alpha_std"} <= set(log[0])

    # the fitted α loads in the `t2` wrapper (strategy=fewshot) and equals mixing by hand
    from t2eval.lm import T2LM

    lm = T2LM(pretrained=tiny, strategy="fewshot", svd=svd, alpha=str(root / "full"), batch_size=4,
              experts=";".join(f"{n}:{p}" for n, p in experts.items()))
    from t2eval.adapt.experts import ExpertBank

    bank = ExpertBank(svd)
    want = bank.mix([experts[n] for n in saved["experts"]], saved["alpha"])
    got = lm.t2_fixed
    assert set(got) == set(want) and all(torch_equal(got[n], want[n]) for n in want)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


# --------------------------------------------------------------------------- release CEM rules (PROTOCOL §8)

def _smooth(target):
    """A continuous toy objective: score = -L1 distance to target (no ties), tiebreak 0."""
    target = np.asarray(target)
    return lambda a: (-float(np.abs(np.asarray(a) - target).sum()), 0.0)


def _ranked(block, results):
    """Indices of a population block ranked as run_cem does: by (score, tiebreak), lowest index on ties."""
    return sorted(range(len(block)), key=lambda i: (results[i][0], results[i][1]), reverse=True)


def test_release_defaults():
    cfg = CEMConfig()
    assert (cfg.population, cfg.n_elite, cfg.std_ddof, cfg.incumbent, cfg.select, cfg.select_every,
            cfg.per, cfg.normalise) == (32, 6, 1, "member0", "reported_set", 10, "matrix", False)
    assert CEMConfig(population=10, elite=0.25).n_elite == 2  # int(2.5): floor, as the release
    assert CEMConfig(population=10, elite=0.25, elite_rounding="round").n_elite == 2
    assert CEMConfig(population=10, elite=0.29).n_elite == 2 and CEMConfig(population=10, elite=0.29,
                                                                            elite_rounding="round").n_elite == 3
    with pytest.raises(T2EvalError, match="at least 2"):  # int(5 · 0.2) = 1 elite: no unbiased std
        run_cem(_smooth([0.5]), (1,), CEMConfig(population=5, elite=0.2, select="final_incumbent"))
    assert CEMConfig(population=4, elite=0.2).n_elite == 4  # int(0.8) = 0: every member, as the release
    with pytest.raises(T2EvalError, match="score_reported"):  # 11 iterations: checks after 1 and 11
        run_cem(_smooth([0.5]), (1,), CEMConfig(iterations=11, population=4))
    # a single check (iterations <= 10) forces the choice: the incumbent after iteration 1
    rows = []
    a, s = run_cem(_smooth([0.5]), (1,), CEMConfig(iterations=3, population=4), on_iteration=rows.append)
    np.testing.assert_array_equal(a, rows[0]["best_alpha"])
    assert s["selected_iteration"] == 1 and s["reported_score"] is None and s["select"] == "reported_set"
    # ... which the reported set could not influence: the label says so (tables mark only real selections)
    assert s["alpha_selection"] == FORCED_LABEL and "shots only" in FORCED_LABEL
    for bad in (dict(incumbent="x"), dict(select="valid"), dict(std_ddof=2), dict(elite_rounding="ceil")):
        with pytest.raises(T2EvalError):
            CEMConfig(**bad).check()


def test_member0_is_the_incumbent_and_can_be_elite():
    P, K, T = 8, 3, 6
    seen, results, rows = [], [], []
    ev = _smooth([0.9, 0.1, 0.5])

    def spy(a):
        seen.append(np.array(a))
        results.append(ev(a))
        return results[-1]

    cfg = CEMConfig(iterations=T, population=P, elite=0.25, seed=2, per="vector", select="final_incumbent")
    alpha, s = run_cem(spy, (K,), cfg, on_iteration=rows.append)
    assert len(seen) == T * P  # no extra evaluations: the incumbent is one of the P members
    np.testing.assert_array_equal(seen[0], np.full(K, 1 / K))  # iteration 1: member 0 = the initial α
    member0_elite = 0
    for t in range(T):
        block, res = seen[t * P:(t + 1) * P], results[t * P:(t + 1) * P]
        order = _ranked(block, res)
        # the new incumbent is the best member, and it is member 0 of the next population
        np.testing.assert_array_equal(rows[t]["best_alpha"], block[order[0]])
        if t + 1 < T:
            np.testing.assert_array_equal(seen[(t + 1) * P], block[order[0]])
        elite = np.stack([block[i] for i in order[:2]])
        member0_elite += 0 in order[:2]
        np.testing.assert_allclose(rows[t]["alpha_mean"], elite.mean(0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(rows[t]["alpha_std"], elite.std(0, ddof=1), rtol=0, atol=1e-12)
    assert member0_elite >= 1  # the incumbent competed as an elite in at least one round
    np.testing.assert_array_equal(alpha, rows[-1]["best_alpha"])
    assert s["alpha_selection"] == "α selected on the shots only (final incumbent)"


def test_elite_std_is_torchs_unbiased_std(tmp_path):
    import torch

    seen, results = [], []
    ev = _smooth([0.2, 0.7, 0.4, 0.9])

    def spy(a):
        seen.append(np.array(a))
        results.append(ev(a))
        return results[-1]

    cfg = CEMConfig(iterations=1, population=32, seed=4, per="vector", select="final_incumbent")
    run_cem(spy, (4,), cfg, tmp_path / "state.json")
    st = json.loads((tmp_path / "state.json").read_text())
    order = _ranked(seen, results)
    assert len(order) == 32
    elite = torch.tensor(np.stack([seen[i] for i in order[:6]]), dtype=torch.float64)  # int(0.2 · 32) = 6
    np.testing.assert_allclose(st["mean"], elite.mean(0).numpy(), rtol=0, atol=1e-15)
    np.testing.assert_allclose(st["std"], torch.std(elite, dim=0).numpy(), rtol=0, atol=1e-15)
    biased = torch.std(elite, dim=0, unbiased=False).numpy()
    assert np.all(np.abs(np.asarray(st["std"]) - biased) > 1e-6)  # really n - 1, not n


def _reported_schedule(values, calls):
    it = iter(values)

    def score_reported(a):
        calls.append(np.array(a))
        return next(it)

    return score_reported


def test_select_on_reported_set_every_10_iterations(tmp_path):
    ev = _smooth([0.9, 0.1, 0.5])
    calls, rows = [], []
    cfg = CEMConfig(iterations=25, population=8, elite=0.25, seed=7, per="vector")
    alpha, s = run_cem(ev, (3,), cfg, tmp_path / "state.json", tmp_path / "log.jsonl", on_iteration=rows.append,
                       score_reported=_reported_schedule([0.3, 0.7, 0.5], calls))
    # checked after iterations 1, 11, 21 (the release's 0-based i % 10 == 0), always on the incumbent
    assert [r["iteration"] for r in rows if r["reported_score"] is not None] == [1, 11, 21]
    assert len(calls) == 3
    for c, it in zip(calls, (1, 11, 21)):
        np.testing.assert_array_equal(c, rows[it - 1]["best_alpha"])
    # the best on the reported set (0.7, iteration 11) is kept, not the final incumbent
    np.testing.assert_array_equal(alpha, calls[1])
    assert not np.array_equal(alpha, rows[-1]["best_alpha"])
    assert s["selected_iteration"] == 11 and s["reported_score"] == 0.7 and s["select"] == "reported_set"
    assert s["alpha_selection"] == "α selected on the reported set"
    assert s["best_score"] == rows[10]["best_score"]  # the shots score of the returned α
    assert [c["reported_score"] for c in s["reported_checks"]] == [0.3, 0.7, 0.5]
    # ties keep the earlier α (strictly better only, as the release)
    calls2 = []
    alpha2, s2 = run_cem(ev, (3,), cfg, score_reported=_reported_schedule([0.5, 0.5, 0.2], calls2))
    np.testing.assert_array_equal(alpha2, calls2[0])
    assert s2["selected_iteration"] == 1
    # tuples from a member-style scorer: the first item is the score
    _, s3 = run_cem(ev, (3,), CEMConfig(iterations=2, population=8, elite=0.25, seed=7, per="vector"),
                    score_reported=lambda a: (0.25, -1.0))
    assert s3["reported_score"] == 0.25


def test_select_shots_returns_final_incumbent():
    ev = _smooth([0.9, 0.1, 0.5])
    calls, rows = [], []
    cfg = CEMConfig(iterations=25, population=8, elite=0.25, seed=7, per="vector", select="final_incumbent")
    alpha, s = run_cem(ev, (3,), cfg, on_iteration=rows.append,
                       score_reported=_reported_schedule([0.3, 0.7, 0.5], calls))
    assert calls == []  # the reported set is never looked at
    np.testing.assert_array_equal(alpha, rows[-1]["best_alpha"])
    assert s["best_score"] == rows[-1]["best_score"] and s["selected_iteration"] == 25
    assert s["alpha_selection"] == "α selected on the shots only (final incumbent)"
    # same search, same incumbents: only the final choice differs between the two rules
    rows_r = []
    alpha_r, _ = run_cem(ev, (3,), CEMConfig(iterations=25, population=8, elite=0.25, seed=7, per="vector"),
                         on_iteration=rows_r.append, score_reported=_reported_schedule([0.3, 0.7, 0.5], []))
    assert [r["best_alpha"] for r in rows_r] == [r["best_alpha"] for r in rows]
    assert not np.array_equal(alpha, alpha_r)


def test_reported_selection_resumes_identically(tmp_path):
    ev = _smooth([0.3, 0.6, 0.2])
    cfg = CEMConfig(iterations=23, population=8, elite=0.25, seed=9, per="vector")
    rep = lambda a: float(np.round(1 - np.abs(a - 0.4).sum(), 6))  # noqa: E731
    full, sf = run_cem(ev, (3,), cfg, tmp_path / "a" / "state.json", tmp_path / "a" / "log.jsonl", score_reported=rep)
    _, part = run_cem(ev, (3,), cfg, tmp_path / "b" / "state.json", tmp_path / "b" / "log.jsonl", score_reported=rep,
                      stop_after=12)
    assert part["iterations_done"] == 12 and not part["complete"]
    resumed, sr = run_cem(ev, (3,), cfg, tmp_path / "b" / "state.json", tmp_path / "b" / "log.jsonl",
                          score_reported=rep)
    np.testing.assert_array_equal(full, resumed)
    assert sf["selected_iteration"] == sr["selected_iteration"] and sf["reported_checks"] == sr["reported_checks"]
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                       for x in p.read_text().splitlines()]
    assert strip(tmp_path / "a" / "log.jsonl") == strip(tmp_path / "b" / "log.jsonl")


def test_changed_identity_restarts_the_search(tmp_path):
    n = [0]
    ev = _smooth([0.3, 0.6, 0.2])

    def counting(a):
        n[0] += 1
        return ev(a)

    cfg = CEMConfig(iterations=3, population=8, elite=0.25, seed=1, per="vector", select="final_incumbent")
    ident = {"experts": [["math", "aa"], ["code", "bb"]], "model_sha256": "m", "task": "math"}
    a1, s1 = run_cem(counting, (3,), cfg, tmp_path / "state.json", tmp_path / "log.jsonl", identity=ident)
    assert n[0] == 24 and s1["restarted"] is None
    a2, s2 = run_cem(counting, (3,), cfg, tmp_path / "state.json", tmp_path / "log.jsonl", identity=dict(ident))
    assert n[0] == 24 and s2["restarted"] is None  # same inputs: the finished state is reused
    np.testing.assert_array_equal(a1, a2)
    other = {**ident, "experts": [["math", "aa"], ["code", "cc"]]}
    a3, s3 = run_cem(counting, (3,), cfg, tmp_path / "state.json", tmp_path / "log.jsonl", identity=other)
    assert n[0] == 48 and s3["complete"] and "experts" in s3["restarted"]  # a fresh search
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "state.json").read_text())["identity"] == other
    _, s4 = run_cem(counting, (3,), cfg, tmp_path / "state.json", identity=None)
    assert "experts" in s4["restarted"]  # a state with an identity is not reused without one


def test_search_identity_hashes_inputs_and_expert_change_restarts(tiny_setup, tmp_path):
    import shutil

    from t2eval.svd import load_svd
    from t2eval.svf import ExpertVector
    from t2eval.testing import tiny_model_dir

    tiny, svd, experts, _ = tiny_setup
    ex = {n: str(tmp_path / n) for n in experts}
    for n, p in experts.items():
        shutil.copytree(p, ex[n])
    shots = [{"doc_id": i, "question": f"q{i}"} for i in range(3)]
    base = dict(experts=ex, model_dir=tiny, svd=svd, task="arc_challenge", shots=shots, reported=shots[:1])
    ident = search_identity(**base)
    assert [e[0] for e in ident["experts"]] == ["math", "code", "reasoning"]
    assert all(len(v) == 64 for v in (ident["model_sha256"], ident["svd_sha256"], ident["shots_sha256"]))
    assert search_identity(**base) == ident
    changed = {"model_sha256": dict(base, model_dir=str(tiny_model_dir(1))), "task": dict(base, task="math"),
               "shots_sha256": dict(base, shots=shots[:2]), "reported_sha256": dict(base, reported=shots[1:2])}
    for key, kw in changed.items():
        assert [k for k in ident if search_identity(**kw)[k] != ident[k]] == [key]
    assert search_identity(**base, mix_space="raw_z")["mix_space"] == "raw_z"

    calls = [0]

    def ev(a):
        calls[0] += 1
        return -float(np.abs(a - 0.5).sum()), 0.0

    cfg = CEMConfig(iterations=2, population=4, elite=0.5, seed=3, per="vector", select="final_incumbent")
    a1, _ = run_cem(ev, (3,), cfg, tmp_path / "st.json", identity=ident)
    assert calls[0] == 8
    # retrain (re-save) the code expert with other values: the saved state must not be reused
    e = ExpertVector.load(Path(ex["code"]) / "z.safetensors")
    s = load_svd(svd)
    ExpertVector.from_svd({n: v + 1.0 for n, v in e.z.items()}, s, task="code").save(Path(ex["code"]) / "z.safetensors")
    ident2 = search_identity(**base)
    assert [k for k in ident if ident2[k] != ident[k]] == ["experts"]
    assert ident2["experts"][0] == ident["experts"][0] and ident2["experts"][1] != ident["experts"][1]
    a2, s2 = run_cem(ev, (3,), cfg, tmp_path / "st.json", identity=ident2)
    assert calls[0] == 16 and "experts" in s2["restarted"]
