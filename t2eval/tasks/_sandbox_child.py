"""Child side of the code sandbox: run as `python -I _sandbox_child.py JOB.pkl` in a fresh temp dir.

Trusted part first (read the job, compute the reference outputs with the canonical solution),
then lock down (limits, no network, unprivileged user, evalplus reliability guard, write guard),
then run the untrusted program and report one line "<token> <json>" on a private file descriptor.
Not imported by the package; kept free of t2eval imports so it starts fast.
"""

import copy
import json
import os
import pickle
import resource
import signal
import sys
import time


class _Timeout(BaseException):
    pass


def _on_cpu_limit(signum, frame):
    # RLIMIT_CPU's soft limit sends SIGXCPU (whose default action kills without a report); the hard
    # limit, a few seconds later, still SIGKILLs a program that swallows this.
    raise _Timeout("cpu")


def _alarm(seconds):
    def handler(signum, frame):
        raise _Timeout()

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _disarm():
    signal.setitimer(signal.ITIMER_REAL, 0)


def _run_canonical(job):
    g = {}
    exec(job["canonical"], g)
    fn = g[job["entry_point"]]
    outs, times = [], []
    for inp in job["inputs"]:
        t = time.time()
        out = fn(*copy.deepcopy(inp))
        times.append(time.time() - t)
        outs.append(out)
    if job.get("output_not_none"):
        outs = [o is not None for o in outs]
    return outs, times


def _limits(job):
    mem = int(job["memory_mb"]) * 1024 * 1024
    for res, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem),
                     (resource.RLIMIT_FSIZE, int(job["fsize_mb"]) * 1024 * 1024),
                     (resource.RLIMIT_NPROC, int(job["nproc"])),
                     (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(res, (val, val))
        except (ValueError, OSError):
            pass
    # CPU seconds are counted from here (the interpreter's start-up and the trusted canonical run
    # are not charged to the candidate); soft limit -> SIGXCPU -> a "timeout" report.
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = int(used.ru_utime + used.ru_stime + 0.999)
    cpu = spent + int(job["cpu_s"])
    signal.signal(signal.SIGXCPU, _on_cpu_limit)
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 2))
    except (ValueError, OSError):
        pass


# Imported before the switch to `nobody`, who may not be able to read the interpreter's stdlib
# (e.g. a Python under /root): what candidate programs commonly import is then already loaded.
PRELOAD = ("abc argparse array ast base64 binascii bisect calendar cmath collections collections.abc "
           "contextlib copy csv ctypes dataclasses datetime decimal difflib enum fractions functools "
           "hashlib heapq io itertools json keyword locale math numbers operator pprint queue random "
           "re socket statistics string struct sys textwrap threading time types typing unicodedata "
           "uuid warnings zlib numpy evalplus.eval evalplus.eval.utils "
           "evalplus.eval._special_oracle pwd").split()


def _preload():
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001
            pass


def _isolate_network_and_user(workdir):
    if os.geteuid() != 0:
        return
    _preload()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        # a fresh network namespace has no usable interface: no network at the OS level
        libc.unshare(0x40000000)  # CLONE_NEWNET
        # a private mount namespace with fresh tmpfs over the world-writable dirs: files written
        # there vanish with the process (the work dir stays reachable as the current directory)
        if libc.unshare(0x00020000) == 0:  # CLONE_NEWNS
            libc.mount(None, b"/", None, 16384 | 262144, None)  # MS_REC | MS_PRIVATE
            for d in (b"/tmp", b"/var/tmp", b"/dev/shm", b"/run/lock"):
                if os.path.isdir(d):
                    libc.mount(b"tmpfs", d, b"tmpfs", 2 | 4 | 8, b"size=16m")  # nosuid,nodev,noexec
    except Exception:
        pass
    import pwd

    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)


def _disable_sockets():
    import socket

    def _blocked(*a, **k):
        raise PermissionError("network access is disabled in the t2eval sandbox")

    class _NoSocket:
        def __init__(self, *a, **k):
            _blocked()

    for name in ("socket", "SocketType"):
        setattr(socket, name, _NoSocket)
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                 "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(socket, name):
            setattr(socket, name, _blocked)
    try:
        import _socket

        _socket.socket = _NoSocket
    except ImportError:
        pass


def _guard_writes(workdir):
    """Refuse opening files for writing outside the work dir (Python level; the OS-level
    protection is the unprivileged user and RLIMIT_FSIZE)."""
    import builtins
    import io

    root = os.path.realpath(workdir) + os.sep
    real_open, real_os_open = builtins.open, os.open
    realpath = os.path.realpath

    def _check(path):
        if isinstance(path, int):
            return
        p = realpath(os.fspath(path))
        if not (p + os.sep).startswith(root):
            raise PermissionError(f"writing outside the sandbox directory is not allowed: {p}")

    def guarded_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            _check(file)
        return real_open(file, mode, *a, **k)

    def guarded_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
            _check(path)
        return real_os_open(path, flags, *a, **k)

    builtins.open = guarded_open
    io.open = guarded_open
    os.open = guarded_os_open


def _compare(dataset, entry_point, out, exp, atol, inp):
    """evalplus's base-test oracle (evalplus/eval/__init__.py: unsafe_execute)."""
    from evalplus.eval._special_oracle import (
        MBPP_OUTPUT_NOT_NONE_TASKS, MBPP_OUTPUT_SET_EQ_TASKS, _digit_distance_nums, _poly,
        _surface_Area)

    exact = out == exp
    if dataset == "mbpp":
        if entry_point == "are_equivalent":
            exact = True
        elif entry_point == "sum_div":
            exact = exact or out == 0
        elif entry_point == "surface_Area":
            exact = exact or abs(out - _surface_Area(*inp)) <= atol
        elif entry_point == "digit_distance_nums":
            exact = exact or out == _digit_distance_nums(*inp)
        elif entry_point in MBPP_OUTPUT_SET_EQ_TASKS:
            exact = set(out) == set(exp)
        elif entry_point in MBPP_OUTPUT_NOT_NONE_TASKS:
            exact = (out == exp) if isinstance(out, bool) else (exp == (out is not None))
    if dataset == "humaneval" and entry_point == "find_zero":
        assert abs(_poly(*inp, out)) <= atol
        return
    from evalplus.eval import is_floats

    if atol == 0 and is_floats(exp):
        atol = 1e-6
    if not exact and atol != 0:
        import numpy as np

        assert type(out) == type(exp)
        if isinstance(exp, (list, tuple)):
            assert len(out) == len(exp)
        assert np.allclose(out, exp, rtol=1e-07, atol=atol)
    else:
        assert exact


def main():
    job_path = sys.argv[1]
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    os.unlink(job_path)
    token, workdir = job["token"], os.getcwd()
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)

    write, killpg, exit_ = os.write, os.killpg, os._exit  # the guard removes os.killpg

    def report(status, reason, **extra):
        write(result_fd, (token + " " + json.dumps({"status": status, "reason": reason, **extra},
                                                    default=str) + "\n").encode())
        try:
            killpg(0, signal.SIGKILL)  # this process and whatever the program spawned
        finally:
            exit_(0)

    expected = times = None
    if job["mode"] == "evalplus":  # trusted: reference outputs from the canonical solution
        try:
            import evalplus.eval  # noqa: F401  (import before the guard removes things)
            import numpy  # noqa: F401

            expected, times = _run_canonical(job)
        except BaseException as e:  # noqa: BLE001
            report("error", f"canonical solution failed: {type(e).__name__}: {e}")

    _limits(job)
    _isolate_network_and_user(workdir)
    _disable_sockets()
    _guard_writes(workdir)
    try:
        from evalplus.eval.utils import reliability_guard

        reliability_guard(maximum_memory_bytes=int(job["memory_mb"]) * 1024 * 1024)
    except ImportError:
        pass
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)

    g = {"__name__": "__main__"}
    try:
        _alarm(job["timeout"])
        exec(compile(job["code"], "<candidate>", "exec"), g)
        _disarm()
    except _Timeout as e:
        what = "CPU-time limit" if e.args == ("cpu",) else "wall-clock limit"
        report("fail", f"timeout while loading the program ({what})")
    except BaseException as e:  # noqa: BLE001
        _disarm()
        report("fail", f"{type(e).__name__}: {str(e)[:200]}")
    if job["mode"] == "script":
        report("pass", "ok")

    fn = g.get(job["entry_point"])
    if not callable(fn):
        report("fail", f"function {job['entry_point']!r} is not defined")
    for i, inp in enumerate(job["inputs"]):
        limit = max(job["min_time_limit"], job["time_factor"] * times[i])
        try:
            _alarm(limit)
            out = fn(*inp)
            _disarm()
            _compare(job["dataset"], job["entry_point"], out, expected[i], job["atol"], inp)
        except _Timeout as e:
            what = "CPU-time limit" if e.args == ("cpu",) else f"limit {limit:.2f}s"
            report("fail", f"timeout on base input {i} ({what})", failed_input=i)
        except BaseException as e:  # noqa: BLE001
            _disarm()
            report("fail", f"base input {i}: {type(e).__name__}: {str(e)[:200]}", failed_input=i)
    report("pass", "ok", n_tests=len(job["inputs"]))


if __name__ == "__main__":
    main()
