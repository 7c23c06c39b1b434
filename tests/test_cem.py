"""Few-shot CEM (PROTOCOL §6.3): the search itself on synthetic objectives, resuming, and
`fit_fewshot` end-to-end on the tiny model through the HF backend."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from t2eval.adapt.cem import CEMConfig, run_cem

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

    alpha, summary = run_cem(spy, (3,), CEMConfig(iterations=15, population=32, elite=0.2, init_std=0.5, seed=1))
    assert summary["complete"] and summary["iterations_done"] == 15
    first = np.stack(seen[:32])
    assert first.min() >= 0 and first.max() <= 1  # clamped to [0, 1]
    assert abs(np.mean(np.clip(np.random.default_rng(0).normal(1 / 3, 0.5, 100000), 0, 1))
               - first.mean()) < 0.12  # drawn around the init mean 1/K
    assert len(seen) == 32 + 14 * 33  # the incumbent best is re-evaluated from round 2 on
    assert np.abs(alpha - target).max() < 0.15


def test_cem_per_matrix_shape_and_elite_count():
    cfg = CEMConfig(iterations=2, population=10, elite=0.2, per="matrix", seed=0)
    assert cfg.n_elite == 2
    alpha, _ = run_cem(lambda a: (float(a.mean()), 0.0), (3, 4), cfg)
    assert alpha.shape == (3, 4)


def test_cem_ties_broken_by_loglikelihood():
    # every member scores the same; the tiebreak prefers small α[0]
    alpha, s = run_cem(lambda a: (0.5, -float(a[0])), (2,), CEMConfig(iterations=3, population=16, seed=3))
    assert s["best_score"] == 0.5 and s["best_tiebreak"] == -alpha[0]
    assert alpha[0] < 0.1


def test_cem_resume_gives_same_alpha(tmp_path):
    ev = _objective([0.2, 0.8, 0.6])
    cfg = CEMConfig(iterations=6, population=12, seed=5)
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
        run_cem(ev, (3,), CEMConfig(iterations=6, population=12, seed=6), tmp_path / "b" / "state.json")


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
