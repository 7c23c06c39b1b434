"""The DAG on a real SLURM cluster: the one-node cluster of scripts/slurm-local.sh (slurmctld + slurmd on this
host), Snakemake's SLURM executor with workflow/profiles/slurm-local, a cut-down `micro` config (one train
task, base + svf cells: 6 SLURM jobs, tables/figures local). Checks that every non-local job ran under a
SLURM job id, that a job cancelled by SLURM mid-run (`scancel`) is resubmitted (profile `retries`) and the
run completes, that a re-run has nothing to do, and that the tables equal a local run's (scores, not
timings). Needs root and apt (or an installed slurm-wlm/munge) and the executor plugin (scripts/setup.sh)."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
MICRO = REPO / "workflow" / "config" / "micro.yaml"
SLURM_SH = REPO / "scripts" / "slurm-local.sh"
LOCAL_RULES = {"tables", "figures", "all"}
TIMING = re.compile(r"(_s|seconds|time|duration|date|when)$")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root: scripts/slurm-local.sh installs slurm-wlm/munge and starts the daemons"
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is unavailable to install it"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (scripts/setup.sh installs it)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]


def _slurm(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM_SH), cmd], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def cluster():
    was_running = _slurm("status").returncode == 0
    r = _slurm("start")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    yield
    if not was_running:  # leave a cluster someone else started as it was
        _slurm("stop")


def _small_config(path: Path) -> Path:
    c = yaml.safe_load(MICRO.read_text())
    c["train_svf"]["tasks"] = ["gsm8k"]
    c["train_lora"]["tasks"] = ["gsm8k"]
    c["fewshot"]["tasks"] = []
    c["evaluate"].update(methods=["base", "svf"], train_tasks=["gsm8k"], unseen_tasks=[])
    c["ablations"] = {"models": []}
    c["cross_model"] = []
    c["vlm"] = {"models": []}  # the cluster path is the same for the VLM's jobs (tests/test_dag_micro.py runs them)
    path.write_text(yaml.safe_dump(c))
    return path


def _snakemake(workdir: Path, configfile: Path, *args: str, timeout: int = 1200) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    return subprocess.Popen([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                             "--configfile", str(configfile), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(p: subprocess.Popen, timeout: int = 1200) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-6000:]
    return out


def _scores(work: Path) -> dict[str, list[dict[str, str]]]:
    out = {}
    for f in sorted((work / "results" / "tables").glob("table*.csv")):
        rows = list(csv.DictReader(open(f)))
        out[f.name] = [{k: v for k, v in r.items() if not TIMING.search(k)} for r in rows]
    return out


def _cancel_one_running(rule: str, stop: threading.Event, cancelled: list[str]) -> None:
    """scancel the first job of `rule` seen RUNNING (the plugin puts the rule name in the job comment)."""
    while not stop.is_set() and not cancelled:
        q = subprocess.run(["squeue", "-h", "-o", "%i|%T|%k"], capture_output=True, text=True)
        for line in q.stdout.splitlines():
            jid, state, comment = (line.split("|") + ["", ""])[:3]
            if state == "RUNNING" and rule in comment:
                time.sleep(2)  # mid-run, not at its first instruction
                subprocess.run(["scancel", jid], check=False)
                cancelled.append(jid)
                return
        time.sleep(0.5)


def test_micro_dag_through_slurm(cluster, tmp_path, data_mirror):
    os.environ["T2EVAL_DATA_MIRROR"] = str(data_mirror)
    cfg = _small_config(tmp_path / "small.yaml")
    t0 = time.time()
    # SLURM run, with one train_svf job cancelled by SLURM while it runs
    slurm_work = tmp_path / "slurm"
    slurm_work.mkdir()
    p = _snakemake(slurm_work, cfg, "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm-local"),
                   "--slurm-keep-successful-logs")
    stop, cancelled = threading.Event(), []
    killer = threading.Thread(target=_cancel_one_running, args=("train_svf", stop, cancelled), daemon=True)
    killer.start()
    try:
        out = _finish(p)
    finally:
        stop.set()
        if p.poll() is None:
            p.kill()
    slurm_s = time.time() - t0

    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out)
    rule_of, rule = {}, None  # Snakemake job id -> rule, from the "rule X:" / "jobid: N" blocks
    for line in out.splitlines():
        m = re.match(r"(?:local)?rule (\w+):", line)
        if m:
            rule = m.group(1)
        m = re.match(r"\s+jobid: (\d+)", line)
        if m and rule:
            rule_of[m.group(1)] = rule
    remote = {j for j, r in rule_of.items() if r not in LOCAL_RULES}
    assert {rule_of[j] for j in remote} >= {"prepare_data", "prepare_model", "decompose", "train_svf", "evaluate"}
    # every non-local job went through sbatch; the local ones (tables, figures) did not
    assert {j for j, _ in submitted} == remote, (submitted, rule_of)
    assert len(remote) == 6
    # the cancelled job: killed by SLURM (its log says so), resubmitted under a new SLURM job id
    assert cancelled, "no train_svf job was seen RUNNING to cancel"
    train = [jid for j, jid in submitted if rule_of[j] == "train_svf"]
    assert cancelled[0] in train and len(train) >= 2, (cancelled, train)
    logs = {f.stem: f for f in (slurm_work / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert "CANCELLED" in logs[cancelled[0]].read_text()
    assert set(logs) >= {jid for _, jid in submitted}  # one SLURM log per submission (kept: see below)
    assert (slurm_work / "results" / "tables" / "table1.csv").exists()
    # a re-run has nothing to do
    p = _snakemake(slurm_work, cfg, "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm-local"), "-n")
    assert "Nothing to be done" in _finish(p, timeout=300)

    # the same DAG locally: the same tables (scores; timing columns aside)
    local_work = tmp_path / "local"
    local_work.mkdir()
    _finish(_snakemake(local_work, cfg, "--cores", "2"))
    got, want = _scores(slurm_work), _scores(local_work)
    assert want and got == want
    print(f"SLURM run {slurm_s:.0f} s: {len(remote)} jobs, {len(submitted)} SLURM submissions, cancelled {cancelled[0]}")
