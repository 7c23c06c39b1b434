"""Run untrusted (model-written) Python programs, one process per program, and report pass/fail.

Opt-in only: pass `allow_code_execution=True` or set HF_ALLOW_CODE_EVAL=1 (lm-eval's variable);
otherwise `CodeExecutionNotAllowed` is raised before anything runs.

Each program runs in `python -I _sandbox_child.py` in a fresh temp dir, in a new session (its whole
process group is killed on timeout), with RLIMIT_AS/DATA (memory), RLIMIT_CPU, RLIMIT_FSIZE,
RLIMIT_NPROC, no core dumps, sockets disabled in Python and, when running as root, a fresh network
namespace and the uid/gid of `nobody` (the temp dir is chown-ed to it first, so files elsewhere that
nobody may not write stay safe and RLIMIT_NPROC counts nobody's processes), then evalplus's
`reliability_guard` and a Python-level refusal to open files for writing outside the temp dir.
This is defence in depth, not a VM: run untrusted code on machines you can afford to lose.

Test modes (see `Program`): "evalplus" = evalplus's base-test differential check (the canonical
solution's outputs on `base_input`, evalplus's special oracles and float tolerance), "script" =
the program must run to completion (e.g. HumanEval's `test` + `check(entry_point)`).
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import T2EvalError

ENV_ALLOW = "HF_ALLOW_CODE_EVAL"
CHILD = Path(__file__).with_name("_sandbox_child.py")


class CodeExecutionNotAllowed(T2EvalError):
    pass


@dataclass
class Program:
    """One program to run. mode "evalplus" needs entry_point, inputs, canonical (trusted source)."""

    code: str
    mode: str = "script"  # "script" | "evalplus"
    entry_point: str = ""
    inputs: list = field(default_factory=list)
    canonical: str = ""
    atol: float = 0.0
    dataset: str = ""  # "mbpp" | "humaneval": selects evalplus's special oracles
    output_not_none: bool = False


@dataclass
class ExecResult:
    passed: bool
    status: str  # "pass" | "fail" | "timeout" | "crash" | "error"
    reason: str
    seconds: float = 0.0


@dataclass
class Limits:
    timeout: float = 20.0  # wall-clock seconds per program (whole process group killed after it)
    memory_mb: int = 2048
    cpu_s: int = 20
    fsize_mb: int = 16
    nproc: int = 64
    min_time_limit: float = 1.0  # evalplus: per-input limit = max(min, factor * canonical time)
    time_factor: float = 4.0


def check_allowed(allow_code_execution: bool | None = None) -> None:
    """Raise unless code execution was explicitly allowed (argument or HF_ALLOW_CODE_EVAL=1)."""
    if allow_code_execution is None:
        allow_code_execution = os.environ.get(ENV_ALLOW, "") == "1"
    if not allow_code_execution:
        raise CodeExecutionNotAllowed(
            "scoring code tasks runs model-written programs; refusing without explicit opt-in. "
            f"Set {ENV_ALLOW}=1 (as for lm-eval's code tasks) or pass allow_code_execution=True, "
            "preferably on a disposable machine or container.")


def _prepare_dir(workdir: str) -> None:
    if os.geteuid() == 0:
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
        os.chmod(workdir, 0o700)


_PIDNS: list[str] | None = None


def _pid_namespace_prefix() -> list[str]:
    """`unshare --pid --fork --kill-child` when running as root and it works here: the program runs
    as PID 1 of a fresh PID namespace, so when it ends (or is killed) the kernel kills everything it
    spawned, including grandchildren that left the process group with setsid()."""
    global _PIDNS
    if _PIDNS is None:
        _PIDNS = []
        exe = shutil.which("unshare")
        if exe and os.geteuid() == 0:
            cmd = [exe, "--pid", "--fork", "--kill-child"]
            try:
                if subprocess.run([*cmd, "true"], capture_output=True, timeout=10).returncode == 0:
                    _PIDNS = cmd
            except (OSError, subprocess.SubprocessError):
                pass
    return _PIDNS


def run_program(program: Program, limits: Limits | None = None) -> ExecResult:
    """Run one program in the sandbox (no opt-in check: callers use `run_programs`)."""
    import time

    limits = limits or Limits()
    token = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="t2eval-sandbox-")
    t0 = time.monotonic()
    try:
        job = {"token": token, "mode": program.mode, "code": program.code,
               "entry_point": program.entry_point, "inputs": program.inputs,
               "canonical": program.canonical, "atol": program.atol, "dataset": program.dataset,
               "output_not_none": program.output_not_none, "timeout": limits.timeout,
               "memory_mb": limits.memory_mb, "cpu_s": limits.cpu_s, "fsize_mb": limits.fsize_mb,
               "nproc": limits.nproc, "min_time_limit": limits.min_time_limit,
               "time_factor": limits.time_factor}
        job_path = os.path.join(workdir, "job.pkl")
        with open(job_path, "wb") as f:
            pickle.dump(job, f)
        _prepare_dir(workdir)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
        proc = subprocess.Popen([*_pid_namespace_prefix(), sys.executable, "-I", str(CHILD), job_path],
                                cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            out, timed_out = _read_report(proc, token, time.monotonic() + limits.timeout + 5)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it spawned
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        secs = time.monotonic() - t0
        if timed_out:
            return ExecResult(False, "timeout", f"killed after {limits.timeout + 5:.0f}s", secs)
        for line in out.decode("utf-8", "replace").splitlines():
            if line.startswith(token + " "):
                rep = json.loads(line[len(token) + 1:])
                st = rep.get("status", "error")
                return ExecResult(st == "pass", st, rep.get("reason", ""), secs)
        if secs >= min(limits.timeout, limits.cpu_s):  # killed by the kernel at RLIMIT_CPU's hard limit
            return ExecResult(False, "timeout", f"killed at the time limit without a report "
                              f"(exit code {proc.returncode})", secs)
        return ExecResult(False, "crash", f"no report from the sandbox (exit code {proc.returncode})", secs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _read_report(proc, token: str, deadline: float) -> tuple[bytes, bool]:
    """Read the child's stdout until its report line, EOF or the deadline (not waiting for EOF:
    stray grandchildren may hold the pipe open). Returns (bytes read, timed_out)."""
    import select
    import time

    fd, buf, marker = proc.stdout.fileno(), b"", token.encode() + b" "
    while True:
        if marker in buf and buf.endswith(b"\n"):
            return buf, False
        left = deadline - time.monotonic()
        if left <= 0:
            return buf, True
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return buf, False
            buf += chunk
            if len(buf) > 1 << 20:
                return buf, False


def run_programs(programs: Sequence[Program], allow_code_execution: bool | None = None,
                 workers: int = 2, limits: Limits | None = None) -> list[ExecResult]:
    """Run many programs with a small thread pool (each in its own process); results in order."""
    check_allowed(allow_code_execution)
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(programs)))) as ex:
        return list(ex.map(lambda p: run_program(p, limits), programs))


def run_code(code: str, allow_code_execution: bool | None = None, **limit_kw: Any) -> ExecResult:
    """Convenience: run one script-mode program (passes if it runs to completion)."""
    check_allowed(allow_code_execution)
    return run_program(Program(code=code), Limits(**limit_kw))
