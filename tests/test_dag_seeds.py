"""Seed replicates and the protocol switch in the Snakemake DAG (the `micro` config plus `seeds: [42, 7]`):
the dry run plans each seeded job once per seed (base cells once) and every command runs under the
config's protocol; a real run builds the per-seed cells and tables with the seed and paired-test columns."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import snakemake_job_counts, snakemake_shell_commands

from t2eval import plan as P
from t2eval.results import collect
from t2eval.workflow_config import load

REPO = Path(__file__).resolve().parent.parent
MICRO = REPO / "workflow" / "config" / "micro.yaml"


def _snakemake(workdir: Path, extra: dict, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    over = workdir / "seeds.yaml"
    over.write_text(yaml.safe_dump(extra))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "--configfile", str(MICRO), str(over), "--cores", "2", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_two_seeds_plan_each_seeded_job_twice_under_the_protocol(tmp_path):
    extra = {"seeds": [42, 7], "protocol": "corrected", "protocol_overrides": {"arc_no_answer": "random"}}
    r = _snakemake(tmp_path, extra, "-n", "-p", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = snakemake_job_counts(r.stdout)
    cfg = load({**yaml.safe_load(MICRO.read_text()), **extra})
    cells = P.cells(cfg)
    first = [c for c in cells if c.seed is None]
    n_base = sum(c.method == "base" for c in first)
    # SVF experts of the 3 training tasks + the classifier expert, 3 task-LoRAs, 3 few-shot α: once per seed
    # (+ the VLM's SVF expert and LoRA adapter on synth_textvqa, micro's vlm: block: also once per seed)
    assert (jobs["train_svf"], jobs["train_svf_seed"]) == (5, 5)
    assert (jobs["train_lora"], jobs["train_lora_seed"]) == (4, 4)
    assert (jobs["fit_fewshot"], jobs["fit_fewshot_seed"]) == (3, 3)
    assert (jobs["evaluate"], jobs["evaluate_seed"]) == (len(first), len(first) - n_base)
    assert (jobs["decompose"], jobs["prepare_model"]) == (2, 2)  # tiny-llama and tiny-llava-next
    assert (jobs["prepare_data"], jobs["tables"], jobs["figures"], jobs["vlm_report"]) == (1,) * 4
    cmds = snakemake_shell_commands(r.stdout)
    assert len(cmds) == sum(v for k, v in jobs.items() if k not in ("all", "total"))
    for rule, cmd in cmds:
        tokens = shlex.split(cmd)
        env = dict(t.split("=", 1) for t in tokens[:tokens.index("t2eval")])
        assert env["T2EVAL_PROTOCOL"] == "corrected", (rule, cmd)
        assert json.loads(env["T2EVAL_PROTOCOL_OVERRIDES"]) == {"arc_no_answer": "random"}, (rule, cmd)
    seeded = [shlex.split(c) for rule, c in cmds if rule == "train_svf_seed"]
    assert all(t[t.index("--seed") + 1] == "7" and "/seed7" in t[t.index("--out") + 1] for t in seeded)


@pytest.mark.slow
def test_two_seeds_build_per_seed_cells_and_paired_tables(tmp_path, data_mirror):
    """One real run, kept small: SVF on two training tasks, base + SVF cells, two seeds."""
    os.environ["T2EVAL_DATA_MIRROR"] = str(data_mirror)
    extra = {"seeds": [42, 7], "train_svf": {"tasks": ["gsm8k", "arc_easy"]}, "vlm": {"models": []},
             "evaluate": {"methods": ["base", "svf"], "train_tasks": ["gsm8k", "arc_easy"],
                          "unseen_tasks": ["arc_challenge"]}}
    r = _snakemake(tmp_path, extra)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    for name in ("svf/gsm8k.json", "svf/gsm8k.seed7.json", "svf/arc_easy.seed7.json", "base/gsm8k.json"):
        assert (tmp_path / "results/raw/tiny-llama" / name).exists(), name
    assert not (tmp_path / "results/raw/tiny-llama/base/gsm8k.seed7.json").exists()
    assert (tmp_path / "experts/tiny-llama/svf/gsm8k/seed7/z.safetensors").exists()
    seeds = {(c["method"], c["task"], c["_seed"]) for c in collect(tmp_path / "results/raw")}
    assert {("svf", "gsm8k", None), ("svf", "gsm8k", 7)} <= seeds
    t1 = {(r["row"], r["task"]): r for r in csv.DictReader(open(tmp_path / "results/tables/table1.csv"))}
    svf, base = t1[("SVF", "gsm8k")], t1[("Base", "gsm8k")]
    assert (svf["n_seeds"], svf["seeds"], base["n_seeds"]) == ("2", "first;7", "1")
    one = [json.loads((tmp_path / "results/raw/tiny-llama/svf" / f).read_text()) for f in ("gsm8k.json", "gsm8k.seed7.json")]
    assert int(svf["correct"]) == sum(c["correct"] for c in one) and int(svf["total"]) == 2 * one[0]["total"]
    assert 0 < float(svf["mcnemar_p"]) <= 1 and svf["significant"] in ("True", "False")
    assert float(svf["diff_base_ci_low_pp"]) <= float(svf["diff_base_pp"]) <= float(svf["diff_base_ci_high_pp"])
    assert not base["mcnemar_p"]  # the base row is the reference
    md = (tmp_path / "results/tables/table1.md").read_text()
    assert "(2 seeds)" in md and "Δbase" in md and "exact McNemar" in md
    fig4 = list(csv.DictReader(open(tmp_path / "results/figures/fig4_learning_curves.csv")))
    assert {r["seed"] for r in fig4 if r["task"] == "gsm8k"} >= {"first", "7", "mean"}
