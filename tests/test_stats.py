"""Paired statistics against hand-computed cases and a coverage check with a known difference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from t2eval.report.stats import mcnemar_exact, paired, paired_bootstrap_ci, seed_mean_sd


def _pairs(n00: int, n01: int, n10: int, n11: int) -> tuple[list[int], list[int]]:
    a = [0] * n00 + [0] * n01 + [1] * n10 + [1] * n11
    b = [0] * n00 + [1] * n01 + [0] * n10 + [1] * n11
    return a, b


@pytest.mark.parametrize("n01,n10,expected", [
    (0, 5, 2 / 32),                  # 2 · (1/2)^5
    (1, 9, 2 * (1 + 10) / 1024),     # 2 · (C(10,0) + C(10,1)) / 2^10 = 0.021484375
    (9, 1, 2 * (1 + 10) / 1024),     # symmetric
    (2, 8, 2 * (1 + 10 + 45) / 1024),  # 0.109375
    (4, 4, 1.0),                     # 2 · P[X ≤ 4] > 1 → capped
    (0, 0, 1.0),                     # no discordant pairs
])
def test_mcnemar_exact_hand_computed(n01, n10, expected):
    a, b = _pairs(7, n01, n10, 3)    # concordant pairs never matter
    r = mcnemar_exact(a, b)
    assert (r.n01, r.n10) == (n01, n10)
    assert r.p_value == pytest.approx(expected, rel=1e-12)


def test_mcnemar_matches_scipy_binomtest_and_significance():
    scipy_stats = pytest.importorskip("scipy.stats")
    for n01, n10 in [(3, 17), (30, 52), (100, 131), (0, 1)]:
        r = mcnemar_exact(*_pairs(5, n01, n10, 5))
        ref = scipy_stats.binomtest(min(n01, n10), n01 + n10, 0.5).pvalue
        assert r.p_value == pytest.approx(ref, rel=1e-9)
    assert mcnemar_exact(*_pairs(0, 1, 9, 0)).significant
    assert not mcnemar_exact(*_pairs(0, 2, 8, 0)).significant


def test_mcnemar_large_n_does_not_underflow():
    r = mcnemar_exact(*_pairs(0, 600, 400, 0))
    assert 0 < r.p_value < 1e-9


def test_paired_bootstrap_point_estimate_and_degenerate_case():
    a, b = _pairs(10, 6, 2, 12)
    d, lo, hi = paired_bootstrap_ci(a, b, n_boot=4000, seed=1)
    assert d == pytest.approx((6 - 2) / 30)
    assert lo < d < hi
    same = [1, 0, 1, 1]
    assert paired_bootstrap_ci(same, same, n_boot=200) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_ci([1, 0], [1])


def test_paired_bootstrap_covers_a_known_difference():
    """Simulate many paired data sets with true difference 0.10; the 95% interval should cover it
    about 95% of the time (binomial slack for 300 replicates: 0.89-0.99)."""
    rng = np.random.default_rng(123)
    n, reps, true_diff = 200, 300, 0.10
    # per document: a right w.p. 0.5; discordant cells n01 (p=0.2), n10 (p=0.1) → E[b − a] = 0.10
    covered = 0
    for r in range(reps):
        u = rng.random(n)
        a = np.where(u < 0.2, 0, np.where(u < 0.3, 1, (u < 0.65).astype(int)))
        b = np.where(u < 0.2, 1, np.where(u < 0.3, 0, a))
        _, lo, hi = paired_bootstrap_ci(a, b, n_boot=800, seed=r)
        covered += lo <= true_diff <= hi
    assert 0.89 <= covered / reps <= 0.99


def test_paired_aligns_by_doc_id_and_refuses_different_documents():
    ca = {"method": "base", "task": "x", "per_sample": [{"doc_id": i, "correct": c} for i, c in enumerate([1, 0, 1])]}
    cb = {"method": "svf", "task": "x", "per_sample": [{"doc_id": i, "correct": c} for i, c in [(2, 0), (0, 1), (1, 1)]]}
    a, b, ids = paired(ca, cb)
    assert ids == [0, 1, 2] and a == [1, 0, 1] and b == [1, 1, 0]
    cb["per_sample"][0]["doc_id"] = 7
    with pytest.raises(ValueError, match="different documents"):
        paired(ca, cb)


def test_seed_mean_sd():
    assert seed_mean_sd([0.5]) == (0.5, None)
    m, sd = seed_mean_sd([0.1, 0.2, 0.3])
    assert m == pytest.approx(0.2) and sd == pytest.approx(0.1)
    assert math.isclose(seed_mean_sd([1, 1])[1], 0.0)
