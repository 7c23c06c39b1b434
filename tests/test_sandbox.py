"""The code sandbox: opt-in, hostile programs contained, canonical solutions pass, wrong ones fail."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from t2eval.tasks import get_task
from t2eval.tasks.sandbox import CodeExecutionNotAllowed, Limits, Program, run_programs

PWNED = "/tmp/t2eval_pwned"

GOOD = "def add(a, b):\n    return a + b\n"
HOSTILE = {
    "infinite_loop": "def add(a, b):\n    while True:\n        pass\nadd(1, 2)\n",
    "fork_bomb": ("import posix\nwhile True:\n    try:\n        posix.fork()\n    except Exception:\n"
                  "        pass\n"),
    "memory_hog": "x = bytearray(50 * 1024 ** 3)\n",
    "socket": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n",
    "raw_socket": "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', 22))\n",
    "write_outside": f"import io\nio.open({PWNED!r}, 'w').write('pwned')\n",
    "write_outside_posix": (f"import posix\nfd = posix.open({PWNED!r}, posix.O_WRONLY | posix.O_CREAT)\n"
                            "posix.write(fd, b'pwned')\nraise SystemExit('wrote it')\n"),
    "kill_parent": "import os\nos.kill(os.getppid(), 9)\n",
    "kill_parent_posix": "import posix\nposix.kill(posix.getppid(), 9)\n",
}


def _prog(code):
    return Program(code=code, mode="evalplus", entry_point="add", inputs=[[1, 2], [3, 4]],
                   canonical=GOOD, dataset="humaneval")


def test_refuses_without_opt_in(monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(CodeExecutionNotAllowed, match="HF_ALLOW_CODE_EVAL=1"):
        run_programs([Program(code="x = 1")])
    with pytest.raises(CodeExecutionNotAllowed):
        get_task("mbpp").score_batch([{}], ["x"])


def test_hostile_programs_are_contained():
    if os.path.exists(PWNED):
        os.unlink(PWNED)
    names = list(HOSTILE)
    progs = [_prog(HOSTILE[n]) for n in names] + [_prog(GOOD), _prog("def add(a, b):\n    return a - b\n")]
    res = run_programs(progs, allow_code_execution=True, workers=2, limits=Limits(timeout=4, cpu_s=4))
    by_name = dict(zip(names + ["good", "wrong"], res))
    for n in names:
        assert not by_name[n].passed, (n, by_name[n])
    assert by_name["good"].passed, by_name["good"]
    assert not by_name["wrong"].passed
    assert "timeout" in by_name["infinite_loop"].reason or by_name["infinite_loop"].status == "timeout"
    assert not os.path.exists(PWNED)
    # the parent survived (we are still here) and no process of the sandbox user is left behind
    import subprocess

    import time

    from t2eval.tasks.sandbox import _pid_namespace_prefix

    deadline = time.monotonic() + 5  # the kernel tears a PID namespace down asynchronously
    while True:
        left = subprocess.run(["ps", "-u", "nobody", "-o", "pid="], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left or os.geteuid() != 0 or not _pid_namespace_prefix(), left


def _evalplus_rows(data_mirror, name):
    path = next((data_mirror / name).glob("*.jsonl.gz"))
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_canonical_solutions_pass_and_wrong_ones_fail(data_mirror, monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    mbpp = _evalplus_rows(data_mirror, "mbppplus")[::25]  # 16 problems, incl. special oracles' ids
    he = _evalplus_rows(data_mirror, "humanevalplus")[::20]  # 9 problems
    for key, docs in (("mbpp", mbpp), ("humaneval", he)):
        t = get_task(key)
        refs = [t.reference(d) for d in docs]
        assert all(t.score_batch(docs, refs)), key
        wrong = ["\n    return None\n```" if key == "humaneval" else
                 f"\ndef {d['entry_point']}(*args):\n    return None\n```" for d in docs]
        assert not any(t.score_batch(docs, wrong)), key
    # the original HumanEval tests (test + check) agree on the canonical solutions
    t = get_task("humaneval", tests="original")
    assert all(t.score_batch(he[:4], [t.reference(d) for d in he[:4]]))
    assert get_task("mbpp", tests="original").score_batch(mbpp[:4], [get_task("mbpp").reference(d) for d in mbpp[:4]]) == [True] * 4


@pytest.mark.parametrize("limits, which", [(Limits(timeout=30, cpu_s=2), "CPU-time limit"),
                                           (Limits(timeout=2, cpu_s=30), "wall-clock limit")])
def test_busy_loop_is_a_timeout_whichever_limit_hits_first(limits, which):
    # module-level loop (while loading) and a loop inside the entry point (on a base input)
    loaders = "def add(a, b):\n    return a + b\nwhile True:\n    pass\n"
    caller = "def add(a, b):\n    while True:\n        pass\n"
    res = run_programs([_prog(loaders), Program(code=caller.replace("add", "f") + "f(1, 2)\n")],
                       allow_code_execution=True, workers=2, limits=limits)
    for r in res:
        assert r.status == "fail" and "timeout" in r.reason and which in r.reason, r
        assert r.seconds < 20, r
