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
    p = _snakemake(slurm_work, cfg, "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm-local"))
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
    rules = re.findall(r"^rule (\w+):", out, flags=re.M) + re.findall(r"^localrule (\w+):", out, flags=re.M)
    remote = [r for r in rules if r not in LOCAL_RULES]
    assert {"prepare_data", "prepare_model", "decompose", "train_svf", "evaluate"} <= set(remote), rules
    # every non-local job went through sbatch (the cancelled one twice: its retry is a new submission)
    assert len(submitted) >= len(remote) >= 6, (submitted, rules)
    log_root = slurm_work / ".snakemake" / "slurm_logs"
    logs_of = {}
    for f in log_root.rglob("*.log"):
        rule = next(x for x in f.relative_to(log_root).parts if x.startswith("rule_"))[len("rule_"):]
        logs_of.setdefault(rule, []).append(f)
    assert set(logs_of) >= {"prepare_model", "decompose", "train_svf", "evaluate"}, logs_of
    assert not set(logs_of) & LOCAL_RULES, logs_of
    assert cancelled, "no train_svf job was seen RUNNING to cancel"
    assert cancelled[0] in {jid for _, jid in submitted}
    # the cancelled job was resubmitted (a second SLURM job, its own log) and the run completed
    assert len(logs_of["train_svf"]) >= 2, logs_of["train_svf"]
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
    print(f"SLURM run {slurm_s:.0f} s, {len(submitted)} SLURM submissions, cancelled job {cancelled[0]}")
