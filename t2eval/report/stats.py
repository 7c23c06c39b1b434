"""Paired statistics for "is the gain real?": two methods scored on the same documents.

- `mcnemar_exact(a, b)`: exact (binomial) McNemar test on per-document correctness. Only the
  discordant documents count: n01 (a wrong, b right) and n10 (a right, b wrong); under H0 each
  discordant document goes either way with probability 1/2, so the two-sided p-value is
  min(1, 2 · P[Bin(n01 + n10, 1/2) ≤ min(n01, n10)]).
- `paired_bootstrap_ci(a, b)`: percentile bootstrap interval of mean(b) − mean(a), resampling
  documents (pairs) with replacement, so the correlation between the two methods is kept. Outcomes
  may be fractions in [0, 1] (a document's correctness averaged over seed replicates).
- `paired(cell_a, cell_b)`: the two cells' per-document outcomes aligned by doc_id (refuses cells
  scored on different documents).
- `paired_permutation_p(a, b)`: two-sided paired sign-flip permutation test of mean(b) − mean(a), for
  outcomes that are not 0/1 (VQA accuracy takes 0, .3, .6, .9, 1 per question), where McNemar does not apply.
- `seed_mean_sd(scores)`: mean and sample standard deviation over seed replicates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

ALPHA = 0.05
TEST_NAME = "exact McNemar test on per-document correctness (two-sided), p < 0.05"


@dataclass(frozen=True)
class McNemar:
    n01: int          # a wrong, b right
    n10: int          # a right, b wrong
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def _as_bools(x: Sequence[Any]) -> list[bool]:
    return [bool(v) for v in x]


def mcnemar_exact(a: Sequence[Any], b: Sequence[Any]) -> McNemar:
    """Exact two-sided McNemar test of method a vs method b on the same documents (0/1 outcomes)."""
    a, b = _as_bools(a), _as_bools(b)
    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} vs {len(b)}")
    n01 = sum(1 for x, y in zip(a, b) if not x and y)
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    n = n01 + n10
    if n == 0:
        return McNemar(n01, n10, 1.0)
    k = min(n01, n10)
    # exact binomial tail with integer arithmetic (no underflow for large n)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    p = min(1.0, 2.0 * tail / (2 ** n))
    return McNemar(n01, n10, p)


def paired_bootstrap_ci(a: Sequence[Any], b: Sequence[Any], n_boot: int = 10000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float, float]:
    """(mean(b) − mean(a), lower, upper): percentile bootstrap over documents, pairs kept together
    (outcomes 0/1 or per-document fractions)."""
    import numpy as np

    xa = np.asarray([float(v) for v in a], dtype=float)
    xb = np.asarray([float(v) for v in b], dtype=float)
    if xa.shape != xb.shape:
        raise ValueError(f"paired outcomes differ in length: {xa.size} vs {xb.size}")
    if xa.size == 0:
        raise ValueError("no paired outcomes")
    d = xb - xa
    rng = np.random.default_rng(seed)
    n = d.size
    # resample in chunks to bound memory at n_boot × n
    means = np.empty(n_boot)
    chunk = max(1, min(n_boot, 2_000_000 // max(n, 1)))
    for s in range(0, n_boot, chunk):
        m = min(chunk, n_boot - s)
        idx = rng.integers(0, n, size=(m, n))
        means[s:s + m] = d[idx].mean(axis=1)
    lo_q = (1 - level) / 2
    return float(d.mean()), float(np.quantile(means, lo_q)), float(np.quantile(means, 1 - lo_q))


PERMUTATION_TEST_NAME = "paired sign-flip permutation test of the mean difference (two-sided), p < 0.05"


def paired_permutation_p(a: Sequence[Any], b: Sequence[Any], n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of mean(b − a) under H0 "the two methods are exchangeable on each document":
    every document's difference keeps or flips its sign with probability 1/2. Exact enumeration when at
    most 16 documents differ, else `n_perm` seeded random sign flips (p counts the observed one, so p > 0)."""
    import itertools

    import numpy as np

    xa = np.asarray([float(v) for v in a], dtype=float)
    xb = np.asarray([float(v) for v in b], dtype=float)
    if xa.shape != xb.shape:
        raise ValueError(f"paired outcomes differ in length: {xa.size} vs {xb.size}")
    d = (xb - xa)[xb != xa]
    if d.size == 0:
        return 1.0
    obs = abs(d.sum()) - 1e-12 * max(1.0, abs(d).sum())  # ties with the observed sum count as extreme
    if d.size <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        return float(np.mean(np.abs(signs @ d) >= obs))
    rng = np.random.default_rng(seed)
    hits = 0
    for s in range(0, n_perm, 1000):
        m = min(1000, n_perm - s)
        signs = rng.choice((1.0, -1.0), size=(m, d.size))
        hits += int(np.sum(np.abs(signs @ d) >= obs))
    return (hits + 1) / (n_perm + 1)


def paired(cell_a: Mapping[str, Any], cell_b: Mapping[str, Any]) -> tuple[list[int], list[int], list[Any]]:
    """Per-document correctness of two result cells aligned by doc_id (a's doc order)."""
    sa = {s["doc_id"]: int(s["correct"]) for s in cell_a["per_sample"]}
    sb = {s["doc_id"]: int(s["correct"]) for s in cell_b["per_sample"]}
    if set(sa) != set(sb):
        only_a, only_b = sorted(set(sa) - set(sb), key=str), sorted(set(sb) - set(sa), key=str)
        raise ValueError(f"cells {cell_a.get('method')}/{cell_a.get('task')} and {cell_b.get('method')}/"
                         f"{cell_b.get('task')} were scored on different documents "
                         f"({len(only_a)} only in the first, {len(only_b)} only in the second, e.g. "
                         f"{(only_a or only_b)[:3]}): a paired test needs the same documents")
    ids = [s["doc_id"] for s in cell_a["per_sample"]]
    return [sa[i] for i in ids], [sb[i] for i in ids], ids


def seed_mean_sd(scores: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single seed)."""
    xs = [float(s) for s in scores]
    if not xs:
        raise ValueError("no scores")
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
