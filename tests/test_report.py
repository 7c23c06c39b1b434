"""Raw result cells, published numbers, tables and figures — from hand-made cells in a tmp dir."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from t2eval.errors import CorruptArtifactError, T2EvalError
from t2eval.results import cell_path, collect, make_cell, read_cell, validate_cell, write_cell
from t2eval.report.published import load_published, make_published, published_value
from t2eval.report.tables import (best_of, render_score_md, render_score_tex, score_entries, timing_entries, wilson_ci, write_tables,
                                  bootstrap_ci)
from t2eval.report import figures

REFERENCE = Path("/work/shared/reference/paper_numbers.csv")


def put(raw: Path, model, method, task, k, n, **kw) -> dict:
    ps = [{"doc_id": i, "correct": int(i < k)} for i in range(n)]
    cell = make_cell(model, method, task, ps, **kw)
    write_cell(cell_path(raw, model, method, task), cell)
    return cell


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- cells
def test_cell_roundtrip_and_collect(tmp_path):
    raw = tmp_path / "raw"
    put(raw, "llama3-8b", "base", "gsm8k", 1001, 1319, timing={"first_pass_s": None, "second_pass_s": 3.5,
                                                              "hardware": "cpu"})
    put(raw, "llama3-8b", "t2-prompt", "math", 3, 5,
        dispatch=[{"doc_id": i, "true_task": "math", "chosen": "math"} for i in range(5)])
    (raw / "llama3-8b" / "base" / "gsm8k.json.provenance.json").write_text("{}")  # sidecars are skipped
    c = read_cell(raw / "llama3-8b" / "base" / "gsm8k.json")
    assert (c["correct"], c["total"], c["metric"]) == (1001, 1319, "acc")
    assert math.isclose(c["score"], 1001 / 1319)
    cells = collect(raw)
    assert [(x["method"], x["task"]) for x in cells] == [("base", "gsm8k"), ("t2-prompt", "math")]
    assert not list(raw.rglob(".*tmp*"))  # atomic write left no temp file


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.update(score=0.5), "score"),
    (lambda c: c.update(correct=1002, score=1002 / 1319), "per_sample has 1001 correct"),
    (lambda c: c.update(metric="pass@1"), "acc"),
    (lambda c: c.update(split="train"), "split"),
    (lambda c: c.pop("provenance"), "provenance"),
    (lambda c: c["per_sample"].pop(), "per_sample has 1318"),
    (lambda c: c.update(schema="t2eval.cell/0"), "schema"),
    (lambda c: c["per_sample"][0].update(correct=2), "per_sample/0/correct"),
])
def test_schema_validation_errors(tmp_path, mutate, needle):
    cell = make_cell("llama3-8b", "base", "gsm8k", [{"doc_id": i, "correct": i < 1001} for i in range(1319)])
    mutate(cell)
    p = tmp_path / "llama3-8b" / "base" / "gsm8k.json"
    with pytest.raises(CorruptArtifactError) as ei:
        write_cell(p, cell)
    assert needle in str(ei.value) and str(p) in str(ei.value)
    assert not p.exists()
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps(cell))
    with pytest.raises(CorruptArtifactError, match="gsm8k.json"):
        read_cell(p)


def test_read_cell_bad_json_and_path_mismatch(tmp_path):
    p = tmp_path / "m" / "base" / "gsm8k.json"
    p.parent.mkdir(parents=True)
    p.write_text("{not json")
    with pytest.raises(CorruptArtifactError, match=r"line 1"):
        read_cell(p)
    cell = make_cell("other", "base", "gsm8k", [{"doc_id": 0, "correct": 1}])
    p.write_text(json.dumps(cell))
    with pytest.raises(CorruptArtifactError, match="path says m/base/gsm8k"):
        collect(tmp_path)
    with pytest.raises(T2EvalError, match="does not exist"):
        collect(tmp_path / "nope")
    with pytest.raises(CorruptArtifactError, match="expected a JSON object"):
        validate_cell([1, 2], "x.json")


# ----------------------------------------------------------------------------- statistics
def test_wilson_ci_known_values():
    lo, hi = wilson_ci(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson_ci(0, 10)
    assert lo == 0 and round(hi, 4) == 0.2775
    lo, hi = wilson_ci(10, 10)
    assert round(lo, 4) == 0.7225 and hi == 1
    lo, hi = wilson_ci(1001, 1319)
    assert (round(lo, 4), round(hi, 4)) == (0.7351, 0.7812)
    blo, bhi = bootstrap_ci([1] * 1001 + [0] * 318, n_boot=4000)
    assert abs(blo - lo) < 0.004 and abs(bhi - hi) < 0.004


# ----------------------------------------------------------------------------- published
def test_published_csv_matches_reference(tmp_path):
    committed = load_published()
    assert len(committed) == 214
    if REFERENCE.exists():  # the committed CSV is what make_published produces
        out = make_published(REFERENCE, tmp_path / "p.csv")
        assert out.read_text() == (Path(__file__).parents[1] / "results/published/paper_numbers.csv").read_text()
    assert published_value("T1", "llama3-8b", "base", "gsm8k") == 75.89
    assert published_value(2, "mistral-7b", "lora", "arc_challenge") == 75.77
    assert published_value("table4", "llama3-8b", "svf-ntp", "math") == 18.52
    assert published_value("T5", "mistral-7b", "xfer-svf-shuffled", "humaneval") == 40.24
    assert published_value("T3", "llama3-8b", "t2-prompt", "math", metric="first_pass_s") == 42.64
    assert published_value("T3", "llama3-8b", "t2-prompt", "math", metric="first_second_ratio_pct") == 13
    assert published_value("F6", "llama3-8b", "t2-prompt", "arc_challenge", category="math") == 0.17
    assert published_value("F7", "mistral-7b", "t2-fewshot", "humaneval", category="code") == 64.1
    assert published_value("T1", "smollm2-135m", "base", "gsm8k") is None
    with pytest.raises(T2EvalError, match="metric="):
        published_value("T3", "llama3-8b", "t2-prompt", "math")
    text = committed[committed["value_text"] != ""]
    assert {"~11 minutes", ">39%", "0.0|0.1|0.2|0.3"} <= set(text["value_text"])
    assert committed.loc[committed["value_text"] == ">39%", "value"].isna().all()


# ----------------------------------------------------------------------------- tables
def _by(entries, **kw):
    return [e for e in entries if all(e[k] == v for k, v in kw.items())]


def test_table1_published_join_ci_flag_and_missing(tmp_path):
    raw = tmp_path / "raw"
    put(raw, "llama3-8b", "base", "gsm8k", 1001, 1319)
    put(raw, "llama3-8b", "lora-gsm8k", "gsm8k", 1018, 1319)  # "lora" on a training task = its own LoRA
    put(raw, "llama3-8b", "svf", "gsm8k", 900, 1319)  # far below the published 79.15 -> flagged
    put(raw, "smollm2-135m", "base", "gsm8k", 20, 1319)
    cells = collect(raw)
    ents = score_entries("1", cells, ["llama3-8b", "smollm2-135m"], load_published())
    base = _by(ents, model="llama3-8b", method="base", task="gsm8k")[0]
    assert base["published_pct"] == 75.89 and abs(base["diff_pp"]) < 0.005 and base["outside_ci"] is False
    assert base["published_implied_correct"] == 1001 and base["norm"] == 1.0
    lora = _by(ents, model="llama3-8b", method="lora", task="gsm8k")[0]
    assert lora["source_method"] == "lora-gsm8k" and lora["correct"] == 1018
    svf = _by(ents, model="llama3-8b", method="svf", task="gsm8k")[0]
    assert svf["outside_ci"] is True and svf["diff_pp"] < -10
    assert math.isclose(svf["norm"], 900 / 1001)
    miss = _by(ents, model="llama3-8b", method="svf", task="mbpp")[0]
    assert miss["status"] == "missing" and miss["score_pct"] is None and miss["published_pct"] == 66.67
    own = _by(ents, model="smollm2-135m", method="base", task="gsm8k")[0]
    assert own["status"] == "ok" and own["published_pct"] is None

    out = tmp_path / "tables"
    written = write_tables(cells, out)
    assert {p.name for p in written} >= {f"table{i}.{s}" for i in range(1, 6) for s in ("md", "csv", "tex")}
    assert not (out / "table9.md").exists()
    md = (out / "table1.md").read_text()
    assert "75.89 (1001/1319) [73.5, 78.1]" in md and "75.89 Δ+0.00" in md
    assert "⚑" in md and "SmolLM2" in md
    svf_line = next(line for line in md.splitlines() if line.startswith("| SVF") and "79.15" in line)
    assert "— | 66.67" in svf_line  # a cell not run shows as missing, not 0
    tidy = rows(out / "table1.csv")
    r = next(r for r in tidy if r["model"] == "llama3-8b" and r["method"] == "svf" and r["task"] == "mbpp")
    assert r["status"] == "missing" and r["score_pct"] == "" and r["correct"] == ""
    tex = (out / "table1.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and "75.89 {\\scriptsize[73.5, 78.1]} (75.89)" in tex


def test_table2_optional_oracle_row_only_where_its_cells_exist(tmp_path):
    raw = tmp_path / "raw"
    put(raw, "llama3-8b", "base", "arc_challenge", 50, 100)
    put(raw, "smollm2-135m", "base", "arc_challenge", 20, 100)
    put(raw, "smollm2-135m", "svf-domain", "arc_challenge", 30, 100)
    cells = collect(raw)
    ents = score_entries("2", cells, ["llama3-8b", "smollm2-135m"], load_published())
    assert not _by(ents, model="llama3-8b", method="svf-domain")
    row = _by(ents, model="smollm2-135m", method="svf-domain", task="arc_challenge")[0]
    assert row["correct"] == 30 and math.isclose(row["norm"], 1.5)
    md = render_score_md("2", ents, ["llama3-8b", "smollm2-135m"])
    assert md.count("oracle dispatch") == 1
    tex = render_score_tex("2", ents, ["llama3-8b", "smollm2-135m"])
    assert tex.count("oracle dispatch") == 1


def test_table2_best_of_three_loras_and_normalised(tmp_path):
    raw = tmp_path / "raw"
    put(raw, "llama3-8b", "base", "humaneval", 100, 164)
    put(raw, "llama3-8b", "lora-gsm8k", "humaneval", 80, 164)
    put(raw, "llama3-8b", "lora-mbpp", "humaneval", 86, 164)
    put(raw, "llama3-8b", "lora-arc_easy", "humaneval", 70, 164)
    put(raw, "llama3-8b", "t2-fewshot", "humaneval", 98, 154, split="fewshot_test")
    cells = collect(raw)
    ents = score_entries("2", cells, ["llama3-8b"], load_published())
    lora = _by(ents, method="lora", task="humaneval")[0]
    assert lora["source_method"] == "lora-mbpp" and lora["correct"] == 86
    assert lora["published_pct"] == 52.44 and lora["published_implied_correct"] == 86
    assert math.isclose(lora["norm"], (86 / 164) / (100 / 164))
    assert math.isclose(lora["published_norm"], 52.44 / 60.98)
    few = _by(ents, method="t2-fewshot", task="humaneval")[0]
    assert few["split"] == "fewshot_test" and math.isclose(few["norm"], (98 / 154) / (100 / 164))
    assert _by(ents, method="lora", task="math")[0]["status"] == "missing"
    # best_of ties keep the first listed method
    put(raw, "llama3-8b", "lora-gsm8k", "math", 5, 10)
    put(raw, "llama3-8b", "lora-mbpp", "math", 5, 10)
    from t2eval.results import index
    assert best_of("lora-gsm8k", "lora-mbpp")(index(collect(raw)), "llama3-8b", "math")[1] == "lora-gsm8k"


def test_table3_timing_ratio_and_tables_4_5_9(tmp_path):
    raw = tmp_path / "raw"
    put(raw, "llama3-8b", "t2-prompt", "math", 1261, 5000,
        timing={"first_pass_s": 40.0, "second_pass_s": 320.0, "swap_s": 1.5, "tokens_first": 10,
                "tokens_second": 100, "total_s": 361.5, "hardware": "1x NVIDIA H200"})
    put(raw, "llama3-8b", "svf-ntp", "gsm8k", 798, 1319)
    put(raw, "llama3-8b", "lora-gsm8k", "math", 1206, 5000)
    put(raw, "mistral-7b", "xfer-svf", "arc_challenge", 844, 1172, expert_model="llama3-8b")
    put(raw, "mistral-7b", "xfer-svf", "gsm8k", 562, 1319, expert_model="llama3-8b")
    cells = collect(raw)
    pub = load_published()
    t3 = timing_entries(cells, ["llama3-8b"], pub)
    m = _by(t3, task="math")[0]
    assert m["ratio_pct"] == 12.5 and m["hardware"] == "1x NVIDIA H200"
    assert math.isclose(m["published_ratio_pct"], 100 * 42.64 / 321.19) and m["published_ratio_printed_pct"] == 13
    assert _by(t3, task="humaneval")[0]["status"] == "missing"
    t4 = score_entries("4", cells, ["llama3-8b"], pub)
    assert _by(t4, method="svf-ntp", task="gsm8k")[0]["published_pct"] == 60.50
    six = _by(t4, method="lora", task="math")[0]
    assert six["source_method"] == "lora-gsm8k" and six["published_pct"] == 24.12
    out = tmp_path / "t"
    write_tables(cells, out)
    md3 = (out / "table3.md").read_text()
    assert "12.5" in md3 and "1x NVIDIA H200" in md3 and "42.64" in md3 and "printed 13" in md3
    assert "mistral-7b" not in (out / "table4.csv").read_text()  # ablation rows only for models with such cells
    t5 = rows(out / "table5.csv")
    assert {r["model"] for r in t5} == {"mistral-7b"}
    r = next(r for r in t5 if r["method"] == "xfer-svf" and r["task"] == "arc_challenge")
    assert float(r["published_pct"]) == 72.01 and r["correct"] == "844"
    t9 = rows(out / "table9.csv")
    r = next(r for r in t9 if r["method"] == "xfer-svf" and r["task"] == "gsm8k")
    assert float(r["published_pct"]) == 42.61 and math.isclose(float(r["published_norm"]), 42.61 / 42.83, rel_tol=1e-5)


def test_tables_cli(tmp_path, capsys):
    from t2eval.cli import main

    raw = tmp_path / "raw"
    put(raw, "llama3-8b", "base", "gsm8k", 1001, 1319)
    assert main(["tables", "--raw", str(raw), "--out", str(tmp_path / "t"), "--models", "llama3-8b",
                 "mistral-7b"]) == 0
    assert "Mistral" in (tmp_path / "t" / "table2.md").read_text()
    assert (tmp_path / "t" / "provenance.json").exists()
    assert main(["tables", "--raw", str(raw), "--out", str(tmp_path / "b"), "--ci", "bootstrap"]) == 0
    r = next(r for r in rows(tmp_path / "b" / "table1.csv") if r["method"] == "base" and r["task"] == "gsm8k")
    assert r["ci"] == "bootstrap" and 73.0 < float(r["ci_low_pct"]) < 74.0
    assert main(["tables", "--raw", str(tmp_path / "none"), "--out", str(tmp_path / "t")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- figures
def test_figures_png_and_csv(tmp_path):
    raw, experts, out = tmp_path / "raw", tmp_path / "experts", tmp_path / "fig"
    put(raw, "llama3-8b", "base", "gsm8k", 1001, 1319)
    disp = ([{"doc_id": i, "true_task": "math", "chosen": "math" if i < 9 else "reasoning"} for i in range(10)])
    put(raw, "llama3-8b", "t2-prompt", "math", 3, 10, dispatch=disp)
    put(raw, "llama3-8b", "t2-cls", "humaneval", 2, 4,
        dispatch=[{"doc_id": i, "true_task": "humaneval", "chosen": "code"} for i in range(4)])
    log = experts / "llama3-8b" / "svf" / "gsm8k" / "log.jsonl"
    log.parent.mkdir(parents=True)
    lines = [{"iteration": i, "loss": 0.1} if i % 10 else
             {"iteration": i, "split_scores": {"train": 0.7, "valid": v, "test": 0.77}}
             for i, v in zip(range(0, 50), [0.70, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.74] + [0.75] * 39)]
    log.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    alpha = experts / "llama3-8b" / "fewshot" / "math" / "alpha.json"
    alpha.parent.mkdir(parents=True)
    alpha.write_text(json.dumps({"alpha": [[0.2, 0.2, 0.4]], "experts": ["math", "code", "reasoning"],
                                 "normalised": False}))
    alpha2 = experts / "llama3-8b" / "fewshot" / "humaneval" / "alpha.json"
    alpha2.parent.mkdir(parents=True)
    alpha2.write_text(json.dumps({"alpha": [[1, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 1]],  # K x n_matrices
                                  "experts": ["math", "code", "reasoning"], "normalised": False}))
    put(raw, "mistral-7b", "t2-prompt", "arc_challenge", 1, 2,
        dispatch=[{"doc_id": 0, "true_task": "arc_challenge", "chosen": "reasoning"},
                  {"doc_id": 1, "true_task": "arc_challenge", "chosen": "other"}])
    written = figures.write_figures(collect(raw), experts, out)
    names = {p.name for p in written}
    for stem in ("fig4_learning_curves", "fig6_dispatch_confusion", "fig7_alpha"):
        assert {f"{stem}.png", f"{stem}.csv"} <= names
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    f4 = rows(out / "fig4_learning_curves.csv")
    assert [int(r["iteration"]) for r in f4] == [0, 10, 20, 30, 40]
    assert [r["is_best"] for r in f4].count("True") == 1 and next(r for r in f4 if r["is_best"] == "True")["iteration"] == "20"
    assert math.isclose(float(f4[0]["base_test"]), 1001 / 1319)
    f6 = rows(out / "fig6_dispatch_confusion.csv")
    r = next(r for r in f6 if r["method"] == "t2-prompt" and r["true_task"] == "math" and r["chosen"] == "math")
    assert r["count"] == "9" and float(r["fraction"]) == 0.9 and float(r["published_fraction"]) == 1.0
    r = next(r for r in f6 if r["model"] == "mistral-7b" and r["chosen"] == "other")
    assert float(r["fraction"]) == 0.5 and r["published_fraction"] == ""
    f7 = rows(out / "fig7_alpha.csv")
    m = {(r["task"], r["expert"]): float(r["alpha_norm_pct"]) for r in f7}
    assert math.isclose(m[("math", "reasoning")], 50.0) and math.isclose(m[("math", "math")], 25.0)
    assert math.isclose(m[("humaneval", "math")], 25.0) and math.isclose(m[("humaneval", "code")], 62.5)
    assert float(next(r for r in f7 if r["task"] == "math" and r["expert"] == "reasoning")["published_pct"]) == 48.0
    readme = (out / "README.md").read_text()
    assert "fig6_dispatch_confusion.png" in readme and figures.caption("6") in readme


def test_figures_placeholders_when_no_inputs(tmp_path):
    from t2eval.cli import main

    raw = tmp_path / "raw"
    put(raw, "smollm2-135m", "base", "gsm8k", 3, 10)
    assert main(["figures", "--raw", str(raw), "--experts", str(tmp_path / "experts"),
                 "--out", str(tmp_path / "fig")]) == 0
    for stem in ("fig4_learning_curves", "fig6_dispatch_confusion", "fig7_alpha"):
        assert (tmp_path / "fig" / f"{stem}.png").stat().st_size > 0
        assert rows(tmp_path / "fig" / f"{stem}.csv") == []


def test_alpha_and_log_errors(tmp_path):
    with pytest.raises(CorruptArtifactError, match="shape"):
        figures.normalised_alpha([[1, 2], [3, 4]], ["math", "code", "reasoning"])
    assert figures.normalised_alpha([0, 0, 0], ["a", "b", "c"]) == pytest.approx([1 / 3] * 3)
    p = tmp_path / "log.jsonl"
    p.write_text('{"iteration": 0, "split_scores": {"valid": 50}}\nnot json\n')
    with pytest.raises(CorruptArtifactError, match="log.jsonl:2"):
        figures.read_log(p)
    p.write_text('{"iteration": 0, "split_scores": {"valid": 50}}\n{"iteration": 1, "valid": 60}\n')
    assert [r["valid"] for r in figures.read_log(p)] == [0.5, 0.6]


def test_tables_name_the_protocol_and_refuse_to_mix(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "tables"
    rel = {"protocol": {"name": "release", "overrides": {}, "knobs": {}}}
    put(raw, "llama3-8b", "base", "gsm8k", 1001, 1319, provenance=rel)
    put(raw, "llama3-8b", "svf", "gsm8k", 1044, 1319, provenance=rel)
    write_tables(collect(raw), out)
    md = (out / "table1.md").read_text()
    assert "Protocol: `release`" in md and "(protocol: release)" in (out / "table1.tex").read_text()
    assert {r["protocol"] for r in rows(out / "table1.csv") if r["status"] == "ok"} == {"release"}
    # a corrected cell beside release cells: a clear error naming the cells, no table written
    put(raw, "llama3-8b", "lora", "gsm8k", 1018, 1319,
        provenance={"protocol": {"name": "corrected", "overrides": {}, "knobs": {}}})
    (out / "table1.md").unlink()
    with pytest.raises(T2EvalError, match=r"table 1 would mix cells of different protocols \(corrected: .*lora/gsm8k"):
        write_tables(collect(raw), out)
    assert not (out / "table1.md").exists()


# ----------------------------------------------------------------------------- seeds and paired statistics
def put_outcomes(raw: Path, model, method, task, outcomes, seed=None, **kw) -> dict:
    cell = make_cell(model, method, task, [{"doc_id": i, "correct": c} for i, c in enumerate(outcomes)], **kw)
    write_cell(cell_path(raw, model, method, task, seed), cell)
    return cell


def test_paired_columns_and_seed_statistics_on_hand_made_cells(tmp_path):
    from t2eval.report.stats import TEST_NAME

    raw, out = tmp_path / "raw", tmp_path / "tables"
    base = [1] * 10 + [0] * 10
    put_outcomes(raw, "llama3-8b", "base", "gsm8k", base)
    # first seed: 9 of the base's wrong documents right, 1 of its right ones wrong -> n01 = 9, n10 = 1,
    # exact McNemar p = 2 · (C(10,0) + C(10,1)) / 2^10 = 0.021484375; Δ = (18 − 10) / 20 = +40 points
    put_outcomes(raw, "llama3-8b", "svf", "gsm8k", [1] * 9 + [0] + [1] * 9 + [0])
    write_tables(collect(raw), out)
    t1 = {(r["row"], r["task"]): r for r in rows(out / "table1.csv")}
    svf, b = t1[("SVF", "gsm8k")], t1[("Base", "gsm8k")]
    assert (svf["base_n01"], svf["base_n10"]) == ("9", "1")
    assert math.isclose(float(svf["mcnemar_p"]), 0.021484375) and svf["significant"] == "True"
    assert math.isclose(float(svf["diff_base_pp"]), 40.0)
    assert 0 < float(svf["diff_base_ci_low_pp"]) < 40.0 < float(svf["diff_base_ci_high_pp"]) <= 100.0
    assert (svf["n_seeds"], svf["seed_sd_pct"], b["mcnemar_p"]) == ("1", "", "")
    md = (out / "table1.md").read_text()
    assert "p=0.021 *" in md and TEST_NAME in md and "Δbase +40.00" in md
    assert "$^*$" in (out / "table1.tex").read_text()

    # a second seed that equals the base model: pooled counts, mean ± sd, the largest p, not significant
    put_outcomes(raw, "llama3-8b", "svf", "gsm8k", base, seed=7)
    cells = collect(raw)
    assert [(c["method"], c["_seed"]) for c in cells] == [("base", None), ("svf", None), ("svf", 7)]
    write_tables(cells, out)
    svf = next(r for r in rows(out / "table1.csv") if r["row"] == "SVF" and r["task"] == "gsm8k")
    assert (svf["correct"], svf["total"], svf["n_seeds"], svf["seeds"]) == ("28", "40", "2", "first;7")
    assert math.isclose(float(svf["seed_mean_pct"]), 70.0) and math.isclose(float(svf["seed_sd_pct"]), 800 ** 0.5)
    assert math.isclose(float(svf["mcnemar_p"]), 1.0) and svf["significant"] == "False"
    assert svf["mcnemar_p_seeds"] == "0.0214844;1"
    assert math.isclose(float(svf["diff_base_pp"]), 20.0)  # per document: mean over seeds − base
    md = (out / "table1.md").read_text()
    assert "70.00±28.28 (2 seeds)" in md and "p=1.000" in md and "p=1.000 *" not in md


def test_fewshot_rows_say_alpha_selected_on_the_reported_set(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "tables"
    put_outcomes(raw, "llama3-8b", "base", "math", [1, 0, 0, 1])
    put_outcomes(raw, "llama3-8b", "t2-fewshot", "math", [1, 1, 0], split="fewshot_test",
                 provenance={"alpha_selection": "α selected on the reported set"})
    put_outcomes(raw, "llama3-8b", "t2-prompt", "math", [1, 1, 0, 0])
    write_tables(collect(raw), out)
    t2 = {(r["row"], r["task"]): r for r in rows(out / "table2.csv")}
    few = t2[("T2-Few-shot", "math")]
    assert few["alpha_selection"] == "α selected on the reported set"
    assert few["mcnemar_p"] == "" and "fewshot_test" in few["paired_note"]  # other documents: no paired test
    assert (t2[("T2-Prompt", "math")]["base_n01"], t2[("T2-Prompt", "math")]["base_n10"]) == ("1", "1")
    md = (out / "table2.md").read_text()
    assert "| T2-Few-shot ‡ (α selected on the reported set) |" in md and "‡ α selected on the reported set" in md
    assert "T2-Prompt ‡" not in md
    assert r"T2-Few-shot$^\ddagger$" in (out / "table2.tex").read_text()


def test_figure4_one_curve_per_seed_plus_the_mean(tmp_path):
    experts, out = tmp_path / "experts", tmp_path / "fig"
    for sub, vals in (("", [0.1, 0.3, 0.2]), ("seed7/", [0.3, 0.1, 0.4])):
        log = experts / "llama3-8b" / "svf" / "gsm8k" / sub / "log.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(json.dumps({"iteration": i, "split_scores": {"valid": v}}) + "\n"
                               for i, v in enumerate(vals)))
    figures.write_figures([], experts, out, models=["llama3-8b"])
    f4 = rows(out / "fig4_learning_curves.csv")
    by = {}
    for r in f4:
        by.setdefault(r["seed"], []).append(float(r["valid"]))
    assert by == {"first": [0.1, 0.3, 0.2], "7": [0.3, 0.1, 0.4], "mean": pytest.approx([0.2, 0.2, 0.3])}
    # each seed's best-validation iteration (the checkpoint its trainer keeps) and the mean's
    assert [(r["seed"], r["iteration"]) for r in f4 if r["is_best"] == "True"] == [("first", "1"), ("7", "2"),
                                                                                  ("mean", "2")]
