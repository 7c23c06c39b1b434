"""A Snakemake run killed during `train_svf` and re-run the way the README says finishes with the
same tables and the same expert z as an uninterrupted run.

The DAG is the `micro` config (tiny random Llama) cut to one SVF expert (GSM8K, 4 iterations) and
the cells that use it, so both runs stay small. The workflow is copied into each work dir and
Snakemake is started there exactly as a user would (`snakemake --cores all ...`), so the default
workflow profile (`profiles/default`: `rerun-incomplete`) is found the way a user's run finds it.
The kill is SIGKILL to Snakemake's whole process group (trainer included): nothing gets to clean
up, the lock and the incomplete-job markers stay behind."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
EXPERT = Path("experts/tiny-llama/svf/gsm8k")
ITERATIONS = 4
# the micro config with one SVF expert and the cells that use it
OVERLAY = {"train_svf": {"tasks": ["gsm8k"], "iterations": ITERATIONS, "eval_every": 1},
           "train_lora": {"tasks": ["gsm8k"]},
           "fewshot": {"tasks": []},
           "evaluate": {"methods": ["base", "svf"], "train_tasks": ["gsm8k"], "unseen_tasks": ["math"]}}
CONFIG = ["--configfile", "workflow/config/micro.yaml", "resume.yaml"]


def _workdir(path: Path) -> Path:
    """A fresh copy of the workflow (Snakefile, rules, configs, profiles), as a user's checkout has it."""
    path.mkdir()
    shutil.copy2(REPO / "Snakefile", path / "Snakefile")
    for d in ("workflow", "profiles"):
        shutil.copytree(REPO / d, path / d, ignore=shutil.ignore_patterns("__pycache__"))
    (path / "resume.yaml").write_text(yaml.safe_dump(OVERLAY))
    return path


def _env(data_mirror: Path) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return dict(os.environ, HF_HUB_OFFLINE="1", T2EVAL_DATA_MIRROR=str(data_mirror),
                PATH=f"{bindir}:{os.environ.get('PATH', '')}",
                PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


def _snakemake(cwd: Path, env: dict, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _table_rows(work: Path) -> dict[str, list[dict]]:
    """Every table CSV, without its timing columns (wall-clock seconds differ between runs)."""
    out = {}
    for f in sorted((work / "results" / "tables").glob("*.csv")):
        out[f.name] = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in csv.DictReader(open(f))]
    return out


def _cells(work: Path) -> dict[str, tuple]:
    out = {}
    for f in sorted((work / "results" / "raw").glob("*/*/*.json")):  # results/raw/<model>/<method>/<task>.json
        c = json.loads(f.read_text())
        out[str(f.relative_to(work))] = (c["score"], c["correct"], c["total"], c["per_sample"])
    return out


def _expert(work: Path) -> tuple:
    """z (exact values) and metadata of the expert (safetensors orders metadata keys at random, so
    the file bytes of equal experts may differ)."""
    from t2eval.svf import ExpertVector

    ev = ExpertVector.load(work / EXPERT / "z.safetensors")
    return {k: v.tolist() for k, v in ev.z.items()}, json.dumps(ev.meta, sort_keys=True).replace(str(work), "<work>")


def _log_rows(work: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (work / EXPERT / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_dag_resumes_to_identical_results(tmp_path, data_mirror):
    import torch

    env = _env(data_mirror)
    timings = {}

    # uninterrupted
    ref = _workdir(tmp_path / "uninterrupted")
    t0 = time.perf_counter()
    r = _snakemake(ref, env, "--cores", "all", *CONFIG)
    timings["uninterrupted_s"] = time.perf_counter() - t0
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    assert "Using workflow specific profile profiles/default" in r.stderr

    # killed while train_svf runs: after its first checkpoint, before its last iteration
    work = _workdir(tmp_path / "killed")
    ckpt = work / EXPERT / "checkpoints" / "latest.pt"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "all", *CONFIG], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not ckpt.exists():
            assert proc.poll() is None, "snakemake ended before train_svf wrote a checkpoint"
            assert time.perf_counter() - t0 < 1800, "train_svf did not start"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.5)
    killed_at = torch.load(ckpt, weights_only=False)["iteration"]
    assert killed_at < ITERATIONS - 1, "train_svf finished before the kill; nothing was resumed"
    assert not (work / EXPERT / "z.safetensors").exists()
    assert (work / ".snakemake" / "incomplete").is_dir() and any((work / ".snakemake" / "locks").iterdir())

    # re-run as the README says: unlock (a hard kill leaves the lock), then the same command
    r = _snakemake(work, env, "--unlock", *CONFIG)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _snakemake(work, env, "--cores", "all", *CONFIG)
    timings["killed_and_resumed_s"] = time.perf_counter() - t0
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    train_log = (work / "logs" / "train_svf" / "tiny-llama" / "svf" / "gsm8k.log").read_text()
    assert f"from iteration {killed_at + 1}" in train_log  # resumed, not restarted

    # identical results
    assert _expert(work) == _expert(ref)
    assert _log_rows(work) == _log_rows(ref)
    assert _cells(work) == _cells(ref)
    assert _table_rows(work) == _table_rows(ref) and _table_rows(ref)

    # and a further run has nothing to do
    r = _snakemake(work, env, "--cores", "all", "-n", *CONFIG)
    assert r.returncode == 0 and "Nothing to be done" in (r.stdout + r.stderr), r.stdout[-2000:]
    print(json.dumps({"killed_after_iteration": killed_at, **{k: round(v, 1) for k, v in timings.items()}}))
