"""The whole Snakemake DAG on the `micro` config (tiny random Llama, 4 docs per task, 1-2 iterations):
every stage runs, every table and figure is built, a second run does nothing, and deleting one raw
cell rebuilds only that cell and what is made from it."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import snakemake_job_counts

from t2eval import plan as P
from t2eval.workflow_config import load

REPO = Path(__file__).resolve().parent.parent
MICRO = REPO / "workflow" / "config" / "micro.yaml"


def _snakemake(workdir: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "--configfile", str(MICRO), "--cores", "2", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_micro_dag_end_to_end(tmp_path, data_mirror):
    work = tmp_path / "run"
    work.mkdir()
    os.environ["T2EVAL_DATA_MIRROR"] = str(data_mirror)
    r = _snakemake(work)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])

    cfg = load(yaml.safe_load(MICRO.read_text()))
    cells = P.cells(cfg)
    for c in cells:
        assert (work / c.path).exists(), c.path
    tables = work / "results" / "tables"
    for n in (1, 2, 3, 4, 5):
        for ext in ("md", "csv", "tex"):
            assert (tables / f"table{n}.{ext}").stat().st_size > 0
    t1 = list(csv.DictReader(open(tables / "table1.csv")))
    got = {(r["model"], r["method"], r["task"]) for r in t1 if r["status"] != "missing"}
    assert {("tiny-llama", m, t) for m in ("base", "lora", "svf") for t in ("gsm8k", "mbpp", "arc_easy")} <= got
    t2 = list(csv.DictReader(open(tables / "table2.csv")))
    rows = {r["row"] for r in t2 if r["model"] == "tiny-llama" and r["status"] != "missing"}
    assert {"Base", "T2-Prompt", "T2-Cls-expert", "T2-Few-shot"} <= rows and any(r.startswith("LoRA") for r in rows)
    t3 = list(csv.DictReader(open(tables / "table3.csv")))
    ours = [r for r in t3 if r["model"] == "tiny-llama"]
    assert {r["task"] for r in ours} == {"math", "humaneval", "arc_challenge"}
    assert all(float(r["first_pass_s"]) > 0 and float(r["second_pass_s"]) > 0 for r in ours)
    for fig in ("fig4_learning_curves", "fig6_dispatch_confusion", "fig7_alpha"):
        assert (work / "results" / "figures" / f"{fig}.png").stat().st_size > 1000
        assert (work / "results" / "figures" / f"{fig}.csv").exists()
    # the VLM experiment (tiny-llava-next on synthetic TextVQA): cells with VQA accuracy, Figure 5, its table,
    # and no VLM rows in the LLM tables
    vlm = {(r["method"], r["task"]): r for r in csv.DictReader(open(work / "results" / "figures" / "fig5_vlm.csv"))}
    assert set(vlm) == {(m, "synth_textvqa") for m in ("base", "svf", "lora")}
    for m in ("svf", "lora"):
        assert vlm[(m, "synth_textvqa")]["n_docs"] == "4" and vlm[(m, "synth_textvqa")]["diff_base_pp"] != ""
    assert "Synth-TextVQA" in (work / "results" / "tables" / "table_vlm.md").read_text()
    lora_vlm = json.loads((work / "experts/tiny-llava-next/lora/synth_textvqa/adapter_config.json").read_text())
    assert "language_model" in str(lora_vlm["target_modules"])  # the VLM's adapter never targets the vision tower
    assert "tiny-llava-next" not in (tables / "table1.csv").read_text()

    # a second run does nothing
    r = _snakemake(work, "-n")
    assert r.returncode == 0 and "Nothing to be done" in (r.stdout + r.stderr), r.stdout[-2000:]

    # deleting one cell rebuilds it and what is made from the cells (tables, figures), nothing upstream
    victim = work / "results/raw/tiny-llama/svf/gsm8k.json"
    victim.unlink()
    shutil.rmtree(work / "results/raw/tiny-llama/svf/gsm8k.lm_eval", ignore_errors=True)
    r = _snakemake(work, "-n")
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = snakemake_job_counts(r.stdout)
    assert jobs.get("evaluate") == 1 and jobs.get("tables") == 1
    assert not {"train_svf", "train_lora", "decompose", "prepare_model", "prepare_data", "fit_fewshot"} & set(jobs)
