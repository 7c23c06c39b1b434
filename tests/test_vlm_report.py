"""Figure 5 / the VLM table from hand-made VQA cells: mean VQA accuracy, bootstrap CI, paired tests against
base, relative gain, seeds pooled, the paper's ">39%" claim beside TextVQA; the permutation test's p-values."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest

from t2eval.report import stats
from t2eval.report.vlm import outcomes, vlm_entries
from t2eval.results import cell_path, collect, make_cell, write_cell


def put_vqa(raw, model, method, task, accs, seed=None):
    ps = [{"doc_id": i, "correct": int(a > 0), "accuracy": a} for i, a in enumerate(accs)]
    cell = make_cell(model, method, task, ps)
    write_cell(cell_path(raw, model, method, task, seed), cell)
    return cell


def test_permutation_p_exact_and_sampled():
    # 5 documents all improve by 1: of the 2^5 sign patterns only all-plus and all-minus reach |sum| = 5
    assert math.isclose(stats.paired_permutation_p([0] * 5, [1] * 5), 2 / 32)
    assert stats.paired_permutation_p([0.3, 0.6], [0.3, 0.6]) == 1.0
    # one document +1, one −1: every pattern reaches |sum| >= 0 -> p = 1
    assert stats.paired_permutation_p([0, 1], [1, 0]) == 1.0
    # fractional differences: +.3 +.3 +.3 −.3 -> sums of ±.3: |sum| = 1.2 only for 2 of 16 patterns... and
    # |sum| >= .6 for the 2·4 patterns with three or four equal signs; observed |sum| = .6 -> p = 10/16
    assert math.isclose(stats.paired_permutation_p([0, 0, 0, 0.3], [0.3, 0.3, 0.3, 0]), 10 / 16)
    # many documents (sampled): a clear shift is significant, no shift is not
    a = [0.0] * 40 + [0.6] * 40
    assert stats.paired_permutation_p(a, [min(1.0, x + 0.3) for x in a]) < 0.001
    noisy = [0.3 if i % 2 else -0.3 for i in range(80)]
    assert stats.paired_permutation_p([0.5] * 80, [0.5 + d for d in noisy]) > 0.5


def test_vlm_entries_accuracy_gain_paired_and_seeds(tmp_path):
    raw = tmp_path / "raw"
    base = [0.0] * 10 + [0.3] * 5 + [1.0] * 5              # mean .325
    svf1 = [1.0] * 10 + [0.3] * 5 + [1.0] * 5              # mean .825
    svf2 = [0.6] * 10 + [0.3] * 5 + [1.0] * 5              # mean .625
    put_vqa(raw, "smollm2-llava", "base", "synth_textvqa", base)
    put_vqa(raw, "smollm2-llava", "svf", "synth_textvqa", svf1)
    put_vqa(raw, "smollm2-llava", "svf", "synth_textvqa", svf2, seed=43)
    put_vqa(raw, "llama3-8b", "base", "gsm8k", [1, 0])  # not a VQA cell: ignored
    from t2eval.report.published import load_published
    ents = vlm_entries(collect(raw), pub=load_published())
    assert [(e["method"], e["task"]) for e in ents] == [("base", "synth_textvqa"), ("svf", "synth_textvqa")]
    b, s = ents
    assert math.isclose(b["score_pct"], 32.5) and b["n_docs"] == 20 and b["n_seeds"] == 1
    assert math.isclose(s["score_pct"], 72.5)  # pooled over the two seeds
    assert math.isclose(s["seed_mean_pct"], 72.5) and math.isclose(s["seed_sd_pct"], math.sqrt(200))
    assert math.isclose(s["diff_base_pp"], 40.0) and s["diff_base_ci_low_pp"] > 20
    assert math.isclose(s["rel_gain_pct"], 100 * (72.5 / 32.5 - 1))
    # 10 documents improve in each seed, none gets worse: exact p = 2 / 2^10 in both
    assert math.isclose(s["perm_p"], 2 / 1024) and s["significant"] is True
    assert b["ci_low_pct"] < 32.5 < b["ci_high_pct"]


def test_vlm_report_cli_writes_table_and_figure5_with_the_published_claim(tmp_path):
    raw = tmp_path / "raw"
    put_vqa(raw, "llava-next-8b", "base", "textvqa", [0.0, 0.3, 0.6, 1.0] * 5)
    put_vqa(raw, "llava-next-8b", "svf", "textvqa", [0.3, 0.6, 0.9, 1.0] * 5)
    r = subprocess.run([sys.executable, "-m", "t2eval.cli", "vlm-report", "--raw", str(raw), "--tables",
                        str(tmp_path / "t"), "--figures", str(tmp_path / "f")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "t" / "table_vlm.md").read_text()
    assert ">39%" in md and "TextVQA" in md and "relative +" in md
    with open(tmp_path / "f" / "fig5_vlm.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert rows["svf"]["published_rel_gain"] == ">39%" and rows["base"]["published_rel_gain"] == ""
    assert float(rows["svf"]["diff_base_pp"]) == pytest.approx(22.5)
    assert (tmp_path / "f" / "fig5_vlm.png").stat().st_size > 1000
    assert "\\begin{tabular}" in (tmp_path / "t" / "table_vlm.tex").read_text()


def test_outcomes_prefer_the_vqa_accuracy():
    cell = make_cell("m", "base", "synth_textvqa", [{"doc_id": 0, "correct": 1, "accuracy": 0.3},
                                                    {"doc_id": 1, "correct": 0, "accuracy": 0.0}])
    assert outcomes(cell) == {0: 0.3, 1: 0.0}
    assert outcomes(make_cell("m", "base", "gsm8k", [{"doc_id": 0, "correct": 1}])) == {0: 1.0}
