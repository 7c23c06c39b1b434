"""Run untrusted (model-written) Python programs and score them in trusted code.

Opt-in only: pass `allow_code_execution=True` or set HF_ALLOW_CODE_EVAL=1 (lm-eval's variable);
otherwise `CodeExecutionNotAllowed` is raised before anything runs.

What is isolated and how (the same as root and as a normal user):
- Each program runs in its own process (`python -I -S _sandbox_child.py`), started by util-linux
  `unshare` in fresh PID, mount, network, IPC and UTS namespaces -- plus a user namespace when the
  caller is not root. It is PID 1 of its PID namespace (it sees and can signal only itself; when it
  ends the kernel kills anything it left), in its own session, with an empty environment.
- Its filesystem is a new root on a tmpfs (pivot_root; the old root is detached): read-only binds
  of /usr, /bin, /lib*, the interpreter's prefix and site-packages (so every stdlib import works),
  /dev/{null,zero,random,urandom}, a fresh /proc of its own PID namespace, and one writable scratch
  dir (/tmp, removed afterwards). The user's home, the data, the project and /proc of the harness
  are not there at all. The network namespace has no usable interface (not even 127.0.0.1 of the host).
- Privileges: as root the child switches to the real uid/gid `nobody` after building its root; as a
  normal user it is its user namespace's root with every capability dropped, securebits locked so
  exec cannot regain them, and no_new_privs. Limits: RLIMIT_AS (address space), RLIMIT_NPROC=1 (no
  fork, no threads -- so the address-space cap bounds the whole process tree), RLIMIT_CPU,
  RLIMIT_FSIZE, no core dumps; the parent kills it at a wall-clock deadline.
- Nothing trusted is in its address space: it receives the program and the inputs, never the
  expected outputs; it answers with one JSON line of *serialised* return values (tagged plain data,
  see `_sandbox_child.encode`), or exception type names / "timeout" per input. The parent decodes
  that to plain builtins (never calling the candidate's code or methods), computes the expected
  outputs by running the canonical solution in a sandbox of its own, and compares (`compare_outputs`,
  evalplus's rules). Any malformed, duplicated or forged report is scored as an error.
- Where the namespaces cannot be set up (no `unshare`, user namespaces disabled, /proc cannot be
  mounted...), `SandboxUnavailable` is raised before any program runs: there is no weaker fallback.
Mode "script" (e.g. HumanEval's original `check(...)` tests) passes if the program runs to
completion; that verdict comes from the candidate's own process, so only mode "evalplus" (the
default scoring) is proof against programs that forge their report.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import T2EvalError
from . import _sandbox_child as child

ENV_ALLOW = "HF_ALLOW_CODE_EVAL"
CHILD = Path(child.__file__)
MAX_REPORT_BYTES = 8 << 20
NL = b"\n"


class CodeExecutionNotAllowed(T2EvalError):
    pass


class SandboxUnavailable(T2EvalError):
    """The isolation could not be set up on this machine: code is not executed at all."""


@dataclass(frozen=True)
class Rules:
    """How outputs are compared and timed. "release": evalplus as pinned by the code release
    (commit 1895d2f6, MBPP+ v0.1.0 / HumanEval+ v0.1.9 era); "corrected": evalplus 0.3's rules."""

    name: str
    min_time_limit: float  # per-input limit = max(min_time_limit, time_factor * canonical time)
    time_factor: float
    main_name: bool  # program globals start with __name__ == "__main__" (evalplus: exec(code, {}))
    sticky_atol: bool  # evalplus mutates atol in its input loop: once 1e-6, it stays
    empty_list_is_floats: bool  # is_floats([]) is True before evalplus PR #196
    mbpp_v2_oracles: bool  # set-equality, surface_Area and digit_distance_nums oracles (MBPP+ v0.2.0)
    find_zero_abs: bool  # find_zero oracle uses abs(poly(...)) and skips the generic check


RULES = {
    "release": Rules("release", 0.2, 4.0, main_name=False, sticky_atol=True,
                     empty_list_is_floats=True, mbpp_v2_oracles=False, find_zero_abs=False),
    "corrected": Rules("corrected", 1.0, 4.0, main_name=True, sticky_atol=False,
                       empty_list_is_floats=False, mbpp_v2_oracles=True, find_zero_abs=True),
}


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
    rules: str = "corrected"  # key of RULES


@dataclass
class ExecResult:
    passed: bool
    status: str  # "pass" | "fail" | "timeout" | "crash" | "error"
    reason: str
    seconds: float = 0.0


@dataclass
class Limits:
    timeout: float = 20.0  # wall-clock seconds to start and load the program (plus the per-input limits)
    memory_mb: int = 2048  # address space of the (single-process) program
    cpu_s: int = 20
    fsize_mb: int = 16
    min_time_limit: float | None = None  # None: the rules' value
    time_factor: float | None = None


def check_allowed(allow_code_execution: bool | None = None) -> None:
    """Raise unless code execution was explicitly allowed (argument or HF_ALLOW_CODE_EVAL=1)."""
    if allow_code_execution is None:
        allow_code_execution = os.environ.get(ENV_ALLOW, "") == "1"
    if not allow_code_execution:
        raise CodeExecutionNotAllowed(
            "scoring code tasks runs model-written programs; refusing without explicit opt-in. "
            f"Set {ENV_ALLOW}=1 (as for lm-eval's code tasks) or pass allow_code_execution=True.")


# ------------------------------------------------------------------------------------------------
# isolation
# ------------------------------------------------------------------------------------------------
def _ro_paths() -> list[str]:
    cands = ["/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", "/etc/ld.so.cache",
             "/etc/localtime", sys.base_prefix, sys.prefix, *_site_packages()]
    out: list[str] = []
    for p in cands:
        p = os.path.abspath(p)
        if os.path.lexists(p) and not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def _site_packages() -> list[str]:
    try:
        return [p for p in site.getsitepackages() if os.path.isdir(p)]
    except AttributeError:  # pragma: no cover
        return []


def _mode() -> str:
    return "root" if os.geteuid() == 0 else "userns"


def _command(hostdir: str) -> list[str]:
    exe = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
    if exe is None:
        raise SandboxUnavailable(_unavailable("the `unshare` command (util-linux) is not installed"))
    ns = ["--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child"]
    if _mode() == "userns":
        ns = ["--user", "--map-root-user", *ns]
    return [exe, *ns, sys.executable, "-I", "-S", str(CHILD), hostdir, _mode()]


def _unavailable(why: str) -> str:
    return (f"refusing to run generated code: the sandbox cannot be set up here ({why}). t2eval runs "
            "programs only inside fresh user/PID/mount/network namespaces; make "
            "`unshare --user --map-root-user --net --pid --mount --fork --mount-proc true` work "
            "(util-linux installed; unprivileged user namespaces enabled: sysctl "
            "kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0; no seccomp profile "
            "blocking unshare/mount), or run as root.")


_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
_PROBE: list = []
_PROBE_LOCK = threading.Lock()


def check_isolation() -> str:
    """Run a probe program once per process; return the mode ("root" | "userns") or raise
    SandboxUnavailable. The probe imports html and fnmatch (stdlib reachable) and checks that it
    is PID 1 with only loopback networking and no parent visible."""
    with _PROBE_LOCK:
        if not _PROBE:
            probe = ("import html, fnmatch, os, socket\n"
                     "assert os.getpid() == 1 and os.getppid() == 0\n"
                     "assert sorted(p for p in os.listdir('/proc') if p.isdigit()) == ['1']\n"
                     "assert {n for _, n in socket.if_nameindex()} <= {'lo', 'sit0', 'tunl0', 'ip6tnl0',"
                     " 'gre0', 'gretap0', 'erspan0', 'ip_vti0', 'ip6_vti0', 'ip6gre0'}\n")
            try:
                rep, _, _, why = _spawn({"mode": "script", "code": probe}, Limits(timeout=30), 0.0)
                ok = rep == {"load": "ok"}
                _PROBE.append(None if ok else _unavailable(why or f"probe answered {rep}"))
            except SandboxUnavailable as e:
                _PROBE.append(str(e))
        if _PROBE[0] is not None:
            raise SandboxUnavailable(_PROBE[0])
    return _mode()


def _spawn(job: dict, limits: Limits, extra_s: float):
    """Run one sandboxed job. Returns (report dict or None, seconds, killed_at_deadline, why)."""
    hostdir = tempfile.mkdtemp(prefix="t2eval-sandbox-")
    t0 = time.monotonic()
    try:
        work = os.path.join(hostdir, "work")
        os.mkdir(work, 0o700)
        if _mode() == "root":
            os.chown(work, child.NOBODY, child.NOBODY)
        job = {"load_timeout": limits.timeout, "memory_mb": limits.memory_mb, "cpu_s": limits.cpu_s,
               "fsize_mb": limits.fsize_mb, "ro_paths": _ro_paths(), "sys_path": _site_packages(),
               "time_limits": [], "main_name": True, **job}
        with open(os.path.join(hostdir, "job.json"), "w") as f:
            json.dump(job, f)
        with open(os.path.join(hostdir, "stderr"), "wb") as err:
            proc = subprocess.Popen(_command(hostdir), cwd="/", env=_ENV, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                                    close_fds=True)
        try:
            out, killed = _read_all(proc, t0 + limits.timeout + extra_s + 5)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # unshare; --kill-child takes the program with it
            except (ProcessLookupError, PermissionError):
                pass
            proc.stdout.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                proc.kill()
        secs = time.monotonic() - t0
        rep, why = _parse_report(out)
        if rep is not None and "setup_error" in rep:
            raise SandboxUnavailable(_unavailable(f"setup failed: {str(rep['setup_error'])[:300]}"))
        if rep is None and not killed:
            tail = Path(hostdir, "stderr").read_bytes()[-400:].decode("utf-8", "replace").strip()
            if tail and _looks_like_setup_failure(tail):
                raise SandboxUnavailable(_unavailable(tail))
        return rep, secs, killed, why
    finally:
        shutil.rmtree(hostdir, ignore_errors=True)


def _looks_like_setup_failure(stderr_tail: str) -> bool:
    return stderr_tail.startswith("unshare:") or "Operation not permitted" in stderr_tail


def _read_all(proc, deadline: float) -> tuple[bytes, bool]:
    """Read the child's stdout until EOF, the deadline or MAX_REPORT_BYTES. Returns (bytes, killed)."""
    import select

    fd, buf = proc.stdout.fileno(), bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(buf), True
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return bytes(buf), False
            buf += chunk
            if len(buf) > MAX_REPORT_BYTES:
                return bytes(buf), False


def _parse_report(out: bytes) -> tuple[dict | None, str]:
    """Exactly one line of strict JSON holding an object, or (None, why)."""
    if not out:
        return None, "no report"
    if len(out) > MAX_REPORT_BYTES:
        return None, "report too large"
    if not out.endswith(b"\n") or out.count(b"\n") != 1:
        return None, f"malformed report ({out.count(NL)} lines)"

    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    try:
        rep = json.loads(out.decode("utf-8"), parse_constant=no_constants)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        return None, f"malformed report ({type(e).__name__})"
    if type(rep) is not dict:
        return None, "malformed report (not an object)"
    return rep, ""


def _clean(s: Any, n: int = 200) -> str:
    return repr(str(s)[:n])[1:-1] if isinstance(s, str) else "?"


# ------------------------------------------------------------------------------------------------
# comparison (trusted; plain data only)
# ------------------------------------------------------------------------------------------------
def _is_floats(x, rules: Rules) -> bool:
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and (x or rules.empty_list_is_floats):
        return all(isinstance(i, float) for i in x)
    return False


def compare_outputs(rules: Rules, dataset: str, entry_point: str, inputs: list, outputs: list,
                    expected: list, atol: float) -> tuple[bool, str]:
    """evalplus's base-test oracle over decoded plain data: (all passed, reason of the first failure).
    `outputs[i]` is ("ok", value) | ("exc", type name) | ("timeout", why)."""
    import numpy as np

    from evalplus.eval._special_oracle import (MBPP_OUTPUT_NOT_NONE_TASKS, _digit_distance_nums,
                                               _surface_Area)

    set_eq = ()
    if rules.mbpp_v2_oracles:
        from evalplus.eval._special_oracle import MBPP_OUTPUT_SET_EQ_TASKS as set_eq
    first_fail = ""
    cur_atol = atol
    for i, ((kind, out), exp, inp) in enumerate(zip(outputs, expected, inputs)):
        if kind == "timeout":
            first_fail = first_fail or f"timeout on base input {i} ({out})"
            continue
        if kind != "ok":
            first_fail = first_fail or f"base input {i}: {out}"
            continue
        a = cur_atol if rules.sticky_atol else atol
        try:
            exact = out == exp
            if dataset == "mbpp":
                if entry_point == "are_equivalent":
                    exact = True
                elif entry_point == "sum_div":
                    exact = exact or out == 0
                elif rules.mbpp_v2_oracles and entry_point == "surface_Area":
                    exact = exact or abs(out - _surface_Area(*inp)) <= a
                elif rules.mbpp_v2_oracles and entry_point == "digit_distance_nums":
                    exact = exact or out == _digit_distance_nums(*inp)
                elif entry_point in set_eq:
                    exact = set(out) == set(exp)
                elif entry_point in MBPP_OUTPUT_NOT_NONE_TASKS:
                    exact = (out == exp) if isinstance(out, bool) else (exp == (out is not None))
            if dataset == "humaneval" and entry_point == "find_zero":
                from evalplus.eval._special_oracle import _poly

                val = _poly(*inp, out)
                if rules.find_zero_abs:
                    assert abs(val) <= a
                    continue
                assert val <= a
            if a == 0 and _is_floats(exp, rules):
                a = 1e-6
                if rules.sticky_atol:
                    cur_atol = a
            if not exact and a != 0:
                assert type(out) == type(exp)  # noqa: E721  (evalplus checks the exact type)
                if isinstance(exp, (list, tuple)):
                    assert len(out) == len(exp)
                assert np.allclose(out, exp, rtol=1e-07, atol=a)
            else:
                assert exact
        except Exception as e:  # noqa: BLE001 - AssertionError, TypeError from numpy, ...
            first_fail = first_fail or f"base input {i}: wrong output ({type(e).__name__})"
    return not first_fail, first_fail or "ok"


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
def time_limits(rules: Rules, ref_times: Sequence[float], limits: Limits | None = None) -> list[float]:
    """Per-input limits: max(min_time_limit, time_factor * canonical seconds) (evalplus's formula;
    release 0.2 s / 4x, corrected 1 s / 4x unless `limits` overrides them)."""
    limits = limits or Limits()
    min_tl = rules.min_time_limit if limits.min_time_limit is None else limits.min_time_limit
    factor = rules.time_factor if limits.time_factor is None else limits.time_factor
    return [max(min_tl, factor * t) for t in ref_times]


_REF_CACHE: dict[str, tuple[list, list]] = {}
_REF_LOCK = threading.Lock()


def _decode_results(rep: dict, n: int) -> tuple[list, list]:
    """[(kind, value)], [seconds] from a "calls" report, or ReportError."""
    res, times = rep.get("results"), rep.get("times")
    if type(res) is not list or type(times) is not list or len(res) != n or len(times) != n:
        raise child.ReportError("results missing or of the wrong length")
    outs = []
    for r in res:
        if type(r) is not dict or len(r) != 1:
            raise child.ReportError("bad result entry")
        (k, v), = r.items()
        if k == "ok":
            outs.append(("ok", child.decode(v)))
        elif k == "exc" and type(v) is str:
            outs.append(("exc", _clean(v, 60)))
        elif k == "timeout" and v in ("wall", "cpu"):
            outs.append(("timeout", "CPU-time limit" if v == "cpu" else "time limit"))
        else:
            raise child.ReportError("bad result entry")
    if not all(type(t) in (int, float) and 0 <= t < 1e6 for t in times):
        raise child.ReportError("bad times")
    return outs, [float(t) for t in times]


def _load_failure(rep: dict) -> str | None:
    load = rep.get("load")
    if load == "ok":
        return None
    if load == "timeout":
        why = "CPU-time limit" if rep.get("why") == "cpu" else "wall-clock limit"
        return f"timeout while loading the program ({why})"
    if load == "error":
        return f"{_clean(rep.get('exc'), 60)}: {_clean(rep.get('msg'))}"
    raise child.ReportError("bad load status")


def _reference(p: Program, limits: Limits, rules: Rules) -> tuple[list, list]:
    """Expected outputs and canonical times (the canonical solution runs in a sandbox too)."""
    enc_inputs = json.dumps(child.encode(list(p.inputs)))
    key = hashlib.sha256(json.dumps([p.canonical, p.entry_point, enc_inputs, p.output_not_none,
                                     rules.main_name]).encode()).hexdigest()
    with _REF_LOCK:
        hit = _REF_CACHE.get(key)
    if hit is not None:
        return hit
    n = len(p.inputs)
    job = {"mode": "calls", "code": p.canonical, "entry_point": p.entry_point, "inputs": enc_inputs,
           "time_limits": [max(limits.timeout, 10.0)] * n, "main_name": rules.main_name}
    rep, _, _, why = _spawn(job, limits, max(limits.timeout, 10.0) * n)
    if rep is None:
        raise T2EvalError(f"the canonical solution of {p.entry_point!r} gave no report ({why})")
    fail = _load_failure(rep)
    outs, times = _decode_results(rep, n) if fail is None else ([], [])
    bad = fail or next((f"input {i}: {v}" for i, (k, v) in enumerate(outs) if k != "ok"), None)
    if bad:
        raise T2EvalError(f"the canonical solution of {p.entry_point!r} failed: {bad}")
    expected = [v for _, v in outs]
    if p.output_not_none:
        expected = [v is not None for v in expected]
    with _REF_LOCK:
        _REF_CACHE[key] = (expected, times)
    return expected, times


def run_program(program: Program, limits: Limits | None = None) -> ExecResult:
    """Run one program in the sandbox (no opt-in check: callers use `run_programs`)."""
    limits = limits or Limits()
    rules = RULES[program.rules]
    check_isolation()
    t0 = time.monotonic()
    if program.mode == "script":
        job = {"mode": "script", "code": program.code, "main_name": True}
        extra = 0.0
    elif program.mode == "evalplus":
        try:
            expected, ref_times = _reference(program, limits, rules)
        except T2EvalError as e:
            return ExecResult(False, "error", str(e), time.monotonic() - t0)
        tls = time_limits(rules, ref_times, limits)
        job = {"mode": "calls", "code": program.code, "entry_point": program.entry_point,
               "inputs": json.dumps(child.encode(list(program.inputs))), "time_limits": tls,
               "main_name": rules.main_name}
        extra = sum(tls) + 1.0
    else:
        raise T2EvalError(f"unknown program mode {program.mode!r} (script | evalplus)")
    rep, _, killed, why = _spawn(job, limits, extra)
    secs = time.monotonic() - t0
    if rep is None:
        if killed:
            return ExecResult(False, "timeout", f"killed at the wall-clock deadline ({why})", secs)
        if secs >= min(limits.timeout, limits.cpu_s):  # RLIMIT_CPU's hard limit (SIGKILL)
            return ExecResult(False, "timeout", f"killed at the time limit without a report ({why})", secs)
        return ExecResult(False, "error" if why != "no report" else "crash", why, secs)
    try:
        fail = _load_failure(rep)
        if fail is not None:
            return ExecResult(False, "fail", fail, secs)
        if program.mode == "script":
            if set(rep) != {"load"}:
                raise child.ReportError("unexpected fields")
            return ExecResult(True, "pass", "ok", secs)
        outs, _ = _decode_results(rep, len(program.inputs))
        ok, reason = compare_outputs(rules, program.dataset, program.entry_point, list(program.inputs),
                                     outs, expected, program.atol)
    except child.ReportError as e:
        return ExecResult(False, "error", f"malformed report: {e}", secs)
    return ExecResult(ok, "pass" if ok else "fail", reason, secs)


def run_programs(programs: Sequence[Program], allow_code_execution: bool | None = None,
                 workers: int = 2, limits: Limits | None = None) -> list[ExecResult]:
    """Run many programs with a small thread pool (each in its own sandbox); results in order."""
    check_allowed(allow_code_execution)
    if not programs:
        return []
    check_isolation()
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(programs)))) as ex:
        return list(ex.map(lambda p: run_program(p, limits), programs))


def run_code(code: str, allow_code_execution: bool | None = None, **limit_kw: Any) -> ExecResult:
    """Convenience: run one script-mode program (passes if it runs to completion)."""
    check_allowed(allow_code_execution)
    return run_program(Program(code=code), Limits(**limit_kw))
