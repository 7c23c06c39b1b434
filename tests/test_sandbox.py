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
    # the parent survived (we are still here) and no sandboxed process is left behind
    assert _wait_no_leftovers() == []


# ------------------------------------------------------------------------------------------------
# The hostile-model suite (issue 13): every attack is scored as a failure, the harness survives,
# nothing outside the sandbox is read, written, signalled or connected to; correct programs pass.
# ------------------------------------------------------------------------------------------------
SECRET = "t2eval-secret-3f9a1c"
GOOD_STDLIB = (  # legitimate stdlib imports still work
    "import html, fnmatch, collections, heapq, re, math, itertools, functools, string, bisect\n"
    "def add(a, b):\n"
    "    assert html.escape('<') == '&lt;' and fnmatch.fnmatch('ab', 'a*')\n"
    "    h = [b, a]; heapq.heapify(h)\n"
    "    return int(math.fsum(collections.Counter({'x': a, 'y': b}).values())) + 0 * len(re.findall('.', 'x'))\n")


def attack_programs(ctx):
    """name -> program source; all define `add` but none may pass. ctx: harness_pid, user_file,
    home_secret, port, site_dir (paths / numbers of the harness's world)."""
    frames = (
        "import sys\n"
        "def add(a, b):\n"
        "    f = sys._getframe()\n"
        "    while f is not None:\n"
        "        for v in list(f.f_locals.values()) + list(f.f_globals.values()):\n"
        "            if callable(v) and getattr(v, '__name__', '') in ('emit', 'report', 'write'):\n"
        "                try:\n"
        "                    v({'status': 'pass', 'load': 'ok', 'results': [{'ok': 0}, {'ok': 0}], 'times': [0, 0]})\n"
        "                except BaseException:\n"
        "                    pass\n"
        "        f = f.f_back\n"
        "    return 0\n")
    gc_ = (
        "import gc\n"
        "def add(a, b):\n"
        "    for o in gc.get_objects():\n"
        "        if callable(o) and getattr(o, '__name__', '') in ('emit', 'report'):\n"
        "            o({'status': 'pass', 'reason': 'ok', 'load': 'ok'})\n"
        "    for o in gc.get_objects():\n"
        "        if isinstance(o, dict) and 'expected' in o:\n"
        "            return o['expected']\n"
        "    return 0\n")
    forge = ("import os\n"
             "lines = [b'{\"status\": \"pass\"}\\n', b'{\"load\": \"ok\", \"results\": [{\"ok\": 3}, {\"ok\": 7}], '\n"
             "         b'\"times\": [0, 0]}\\n', b'{\"load\": \"ok\", \"results\": [\\n', b'not json\\n']\n"
             "for fd in range(3, 40):\n"
             "    for l in lines:\n"
             "        try:\n"
             "            os.write(fd, l)\n"
             "        except OSError:\n"
             "            pass\n"
             "def add(a, b):\n"
             "    return 0\n")
    forge_exit = ("import os\n"
                  "for fd in range(3, 40):\n"
                  "    try:\n"
                  "        os.write(fd, b'{\"load\": \"ok\", \"results\": [{\"ok\": {\"float\": \"NaN\"\\n')\n"
                  "    except OSError:\n"
                  "        pass\n"
                  "os._exit(0)\n")
    forge_ok_exit = ("import os\n"  # a well-formed report that says "loaded" but carries no results
                     "for fd in range(3, 40):\n"
                     "    try:\n"
                     "        os.write(fd, b'{\"load\": \"ok\"}\\n')\n"
                     "    except OSError:\n"
                     "        pass\n"
                     "os._exit(0)\n")
    return {
        "always_true_eq": ("class T:\n    def __eq__(self, o):\n        return True\n    __hash__ = object.__hash__\n"
                           "def add(a, b):\n    return T()\n"),
        "int_subclass_eq": ("class I(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
                            "def add(a, b):\n    return I(0)\n"),
        "float_subclass_close": ("class F(float):\n    def __eq__(self, o):\n        return True\n"
                                 "def add(a, b):\n    return F(a + b + 1)\n"),
        "reporter_via_getframe": frames,
        "reporter_via_gc": gc_,
        "forged_report_lines": forge,
        "forged_malformed_json_exit": forge_exit,
        "forged_load_ok_exit": forge_ok_exit,
        "kill_parent": f"import os\nos.kill(os.getppid(), 9)\nos.kill({ctx['harness_pid']}, 9)\ndef add(a, b):\n    return 0\n",
        "kill_everything": "import os\nos.kill(-1, 9)\nos.kill(0, 9)\ndef add(a, b):\n    return 0\n",
        "write_user_file": (f"open({ctx['user_file']!r}, 'w').write('pwned')\n"
                            "def add(a, b):\n    return a + b\n"),
        "write_site_packages": (f"open({ctx['site_dir'] + '/t2eval_pwned.pth'!r}, 'w').write('import os')\n"
                                "def add(a, b):\n    return a + b\n"),
        "read_parent_environ": (f"e = open('/proc/{ctx['harness_pid']}/environ', 'rb').read()\n"
                                "def add(a, b):\n    raise ValueError(e)\n"),
        "read_parent_environ_ppid": ("import os\ne = open(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
                                     "assert b'T2EVAL_TEST_SECRET' in e\n"
                                     "def add(a, b):\n    return a + b\n"),
        "read_own_environ": "import os\ndef add(a, b):\n    raise ValueError(repr(dict(os.environ)))\n",
        "read_home_secret": (f"s = open({ctx['home_secret']!r}).read()\n"
                             "def add(a, b):\n    raise ValueError(s)\n"),
        "socket_localhost": ("import socket\n"
                             f"c = socket.create_connection(('127.0.0.1', {ctx['port']}), timeout=2)\n"
                             "c.sendall(b'pwned')\n"
                             "def add(a, b):\n    return a + b\n"),
        "setsid_double_fork": ("import os, time\n"
                               "if os.fork() == 0:\n"
                               "    os.setsid()\n"
                               "    if os.fork() == 0:\n"
                               "        time.sleep(120)\n"
                               "    os._exit(0)\n"
                               "def add(a, b):\n    return a + b\n"),
        "memory_4x200mb_children": ("import os, time\n"
                                    "for _ in range(4):\n"
                                    "    if os.fork() == 0:\n"
                                    "        x = bytearray(200 * 2 ** 20)\n"
                                    "        time.sleep(5)\n"
                                    "        os._exit(0)\n"
                                    "def add(a, b):\n    return a + b\n"),
        "memory_4x200mb_threads": ("import threading, time\n"
                                   "keep = []\n"
                                   "def hog():\n    keep.append(bytearray(200 * 2 ** 20)); time.sleep(5)\n"
                                   "for _ in range(4):\n    threading.Thread(target=hog).start()\n"
                                   "def add(a, b):\n    return a + b\n"),
        "memory_800mb_one_process": ("keep = [bytearray(200 * 2 ** 20) for _ in range(4)]\n"
                                     "def add(a, b):\n    return a + b\n"),
        "exec_shell": ("import os\nos.execv('/bin/sh', ['sh', '-c', 'echo pwned > /tmp/x'])\n"
                       "def add(a, b):\n    return a + b\n"),
    }


HOSTILE_LIMITS = dict(timeout=6, cpu_s=6, memory_mb=512)


def run_hostile_suite(workdir: str) -> dict:
    """Run every attack (and the controls) against the current harness; return a JSON-able record of
    what happened, checked by `check_hostile_record`. Also used for the run as an unprivileged user."""
    import socket
    import sysconfig

    from t2eval.tasks.sandbox import check_isolation

    mode = check_isolation()
    os.environ["T2EVAL_TEST_SECRET"] = SECRET  # in the harness's environ, never in the sandbox's
    home = os.path.join(workdir, "home")
    os.makedirs(home, exist_ok=True)
    secret = os.path.join(home, "secret.txt")
    with open(secret, "w") as f:
        f.write(SECRET)
    os.chmod(secret, 0o600)
    user_file = os.path.join(workdir, "notes.txt")
    with open(user_file, "w") as f:
        f.write("mine")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    srv.setblocking(False)
    ctx = {"harness_pid": os.getpid(), "user_file": user_file, "home_secret": secret,
           "port": srv.getsockname()[1], "site_dir": sysconfig.get_paths()["purelib"]}
    attacks = attack_programs(ctx)
    names = list(attacks)
    progs = [_prog(attacks[n]) for n in names] + [_prog(GOOD), _prog(GOOD_STDLIB),
                                                  _prog("def add(a, b):\n    return a - b\n")]
    import time

    t0 = time.monotonic()
    res = run_programs(progs, allow_code_execution=True, workers=2, limits=Limits(**HOSTILE_LIMITS))
    wall = time.monotonic() - t0
    try:
        conn, _ = srv.accept()
        connected = True
        conn.close()
    except BlockingIOError:
        connected = False
    srv.close()
    leftover = _wait_no_leftovers()
    return {"mode": mode, "uid": os.geteuid(), "wall_s": wall,
            "results": {n: [r.passed, r.status, r.reason, r.seconds]
                        for n, r in zip(names + ["good", "good_stdlib", "wrong"], res)},
            "connected": connected, "user_file": open(user_file).read(),
            "site_pwned": os.path.exists(os.path.join(ctx["site_dir"], "t2eval_pwned.pth")),
            "leftover": leftover}


def check_hostile_record(rec: dict) -> None:
    res = rec["results"]
    for name, (passed, status, reason, _) in res.items():
        if name in ("good", "good_stdlib"):
            assert passed, (name, status, reason)
        else:
            assert not passed, (name, status, reason)
        assert SECRET not in reason, (name, reason)  # nothing secret is echoed into a reason
    for name in ("forged_report_lines", "forged_malformed_json_exit", "forged_load_ok_exit"):
        assert res[name][1] == "error" and "malformed report" in res[name][2], (name, res[name])
    assert "read-only file system" in res["write_site_packages"][2].lower(), res["write_site_packages"]
    for name in ("setsid_double_fork", "memory_4x200mb_children"):
        assert "BlockingIOError" in res[name][2], (name, res[name])  # no second process at all
    assert "RuntimeError" in res["memory_4x200mb_threads"][2]  # nor a thread
    assert "MemoryError" in res["memory_800mb_one_process"][2]
    assert not rec["connected"]  # nothing reached the harness's 127.0.0.1 listener
    assert rec["user_file"] == "mine" and not rec["site_pwned"]
    assert rec["leftover"] == []


def _wait_no_leftovers(timeout: float = 5.0) -> list:
    import time

    deadline = time.monotonic() + timeout  # the kernel tears PID namespaces down asynchronously
    while _leftover_sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    return _leftover_sandbox_processes()


def _leftover_sandbox_processes() -> list:
    """Processes still running our sandbox child (the worktree's own path: other checkouts' runs
    do not count)."""
    from t2eval.tasks.sandbox import CHILD

    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if str(CHILD).encode() in cmd:
            out.append(int(pid))
    return out


def test_hostile_suite(tmp_path):
    rec = run_hostile_suite(str(tmp_path))
    check_hostile_record(rec)
    assert rec["mode"] == ("root" if os.geteuid() == 0 else "userns")


def _unprivileged_runner(tmp_root: str):
    """Command that runs `run_hostile_suite` as a fresh unprivileged user, or (None, why)."""
    import pwd
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0:
        return None, (f"already a normal user (uid {os.geteuid()}): test_hostile_suite is the non-root run")
    for tool in ("useradd", "setpriv", "unshare", "mount"):
        if shutil.which(tool) is None:
            return None, f"`{tool}` is not installed: cannot create and switch to an unprivileged user"
    name = "t2eval-sbx"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        r = subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
                            "/usr/sbin/nologin", name], capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"useradd failed: {r.stderr.strip()}"
        pw = pwd.getpwnam(name)
    os.chown(tmp_root, pw.pw_uid, pw.pw_gid)
    # the interpreter may live under a directory the new user cannot traverse (/root/.pyenv):
    # in a private mount namespace, put a 0755 tmpfs over that directory and bind back only the
    # path component that leads to the interpreter / project (nothing else of it is visible).
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ["set -e", "hold=$(mktemp -d)"]
    done = set()
    for i, target in enumerate((sys.base_prefix, sys.prefix, repo)):
        parts = os.path.abspath(target).split("/")[1:]
        for k in range(1, len(parts)):
            d = "/" + "/".join(parts[:k])
            if os.stat(d).st_mode & 0o001:
                continue
            key = (d, parts[k])
            if key not in done:
                done.add(key)
                h = f"$hold/{len(done)}"
                script += [f"mkdir -p {h}", f"mount --bind {d} {h}", f"mountpoint -q {d}/{parts[k]} || "
                           f"{{ mount -t tmpfs -o mode=0755,size=1m tmpfs {d} 2>/dev/null || true; }}",
                           f"mkdir -p {d}/{parts[k]}", f"mount --bind {h}/{parts[k]} {d}/{parts[k]}"]
            break
    code = ("import json, runpy, sys; ns = runpy.run_path(sys.argv[1]); "
            "print('RECORD ' + json.dumps(ns['run_hostile_suite'](sys.argv[2])))")
    script.append(f"exec setpriv --reuid={pw.pw_uid} --regid={pw.pw_gid} --clear-groups --inh-caps=-all "
                  f"env -i PATH=/usr/bin:/bin HOME={tmp_root} TMPDIR={tmp_root} PYTHONPATH={repo} "
                  f"HF_HUB_OFFLINE=1 {sys.executable} -c \"{code}\" {os.path.abspath(__file__)} {tmp_root}")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)], ""


def test_hostile_suite_as_unprivileged_user():
    import json
    import subprocess
    import tempfile

    tmp_root = tempfile.mkdtemp(prefix="t2eval-unpriv-")
    try:
        cmd, why = _unprivileged_runner(tmp_root)
        if cmd is None:
            pytest.skip(why)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        lines = [l for l in r.stdout.splitlines() if l.startswith("RECORD ")]
        assert r.returncode == 0 and lines, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
        rec = json.loads(lines[-1][len("RECORD "):])
        assert rec["mode"] == "userns" and rec["uid"] != 0
        check_hostile_record(rec)
    finally:
        import shutil

        shutil.rmtree(tmp_root, ignore_errors=True)


def test_refuses_when_isolation_cannot_be_set_up(monkeypatch):
    """No silent fallback: without `unshare` nothing runs and the error says what to fix."""
    from t2eval.tasks import sandbox

    monkeypatch.setattr(sandbox, "_PROBE", [])
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox.os.path, "exists", lambda p: False if p == "/usr/bin/unshare" else os.path.lexists(p))
    with pytest.raises(sandbox.SandboxUnavailable, match="refusing to run generated code.*unshare"):
        run_programs([Program(code="x = 1")], allow_code_execution=True)


def test_report_parsing_never_raises():
    from t2eval.tasks import sandbox
    from t2eval.tasks._sandbox_child import ReportError, decode, encode

    for junk in (b"", b"{", b"[1]\n", b'{"a": NaN}\n', b"{}\n{}\n", b"\xff\n", b"[" * 100000 + b"\n"):
        rep, why = sandbox._parse_report(junk)
        assert rep is None and why, junk
    for bad in ([1], {"list": 1}, {"dict": [[{"list": []}, 1]]}, {"sub": "x", "of": {"opaque": "y"}},
                {"int": "zz"}, {"what": 1}, {"set": [{"list": []}]}):
        with pytest.raises(ReportError):
            decode(bad)
    v = {"a": (1, 2.5, float("inf")), 3: {frozenset({1}), b"x"}, "n": None, "c": 1j, "big": 10 ** 40}
    assert decode(json.loads(json.dumps(encode(v)))) == v
    # subclasses keep their value but not their type or methods
    class I(int):
        def __eq__(self, o):
            return True
    d = decode(json.loads(json.dumps(encode(I(5)))))
    assert d == 5 and d != 6 and type(d) is not int and d.type_name.endswith("I")


def _evalplus_rows(data_mirror, name, version):
    path = data_mirror / name / f"{'MbppPlus' if name == 'mbppplus' else 'HumanEvalPlus'}-{version}.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


# the data each scoring is used with (PROTOCOL §8: the release pins MBPP+ v0.1.0, HumanEval+ v0.1.9)
VERSIONS = {"corrected": ("v0.2.0", "v0.1.10"), "release": ("v0.1.0", "v0.1.9")}


@pytest.mark.parametrize("scoring", ["corrected", "release"])
def test_canonical_solutions_pass_and_wrong_ones_fail(data_mirror, monkeypatch, scoring):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    mbpp_v, he_v = VERSIONS[scoring]
    mbpp = _evalplus_rows(data_mirror, "mbppplus", mbpp_v)[::25]  # 16 problems, incl. special oracles' ids
    he = _evalplus_rows(data_mirror, "humanevalplus", he_v)[::20]  # 9 problems
    for key, docs in (("mbpp", mbpp), ("humaneval", he)):
        t = get_task(key, scoring=scoring)
        refs = [t.reference(d) for d in docs]
        # the release's sanitiser keeps only definitions containing "    return " (4 spaces): many
        # MBPP canonical solutions are 2-space indented and are dropped -- as for a model's output
        runnable = [f"def {d['entry_point']}" in t.postprocess(d, r) for d, r in zip(docs, refs)]
        if scoring == "corrected" or key == "humaneval":
            assert all(runnable), key
        assert t.score_batch(docs, refs) == runnable, key
        wrong = ["\n    return None\n```" if key == "humaneval" else
                 f"\ndef {d['entry_point']}(*args):\n    return None\n```" for d in docs]
        assert not any(t.score_batch(docs, wrong)), key
    # the original HumanEval tests (test + check) agree on the canonical solutions
    t = get_task("humaneval", tests="original", scoring=scoring)
    assert all(t.score_batch(he[:4], [t.reference(d) for d in he[:4]]))
    if scoring == "corrected":
        assert get_task("mbpp", tests="original", scoring=scoring).score_batch(
            mbpp[:4], [get_task("mbpp").reference(d) for d in mbpp[:4]]) == [True] * 4


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
