"""Child side of the code sandbox, and the value codec both sides share.

Run as `[unshare ...] python -I -S _sandbox_child.py HOSTDIR MODE` (see sandbox.py). It is PID 1 of a
fresh PID namespace, in fresh mount / network / IPC / UTS namespaces. In that order it
1. reads HOSTDIR/job.json (the program, the entry point, the inputs -- never expected outputs),
2. builds a new root on a tmpfs: read-only binds of the interpreter and its libraries only, a fresh
   /proc of its own PID namespace, /dev/{null,zero,random,urandom}, and HOSTDIR/work as the only
   writable directory (/tmp), then pivot_root()s into it and detaches the old root,
3. drops privileges for good (MODE "root": real uid/gid `nobody`; MODE "userns": the namespace's
   only mapped uid without any capability and with root's special treatment locked off), sets
   no_new_privs and the resource limits (address space, file size, no core, one process: no
   fork/thread -- so the address-space cap is the cap of the whole process tree),
4. runs the untrusted program and, per input, calls its entry point and writes the *serialised*
   return value (or the exception's type name, or "timeout") as one JSON line on its stdout.
Nothing in this process is trusted: the parent compares the decoded plain data with the expected
outputs it holds, and treats any malformed report as an error. Free of t2eval imports (the package
is not visible inside the sandbox).
"""

import copy
import json
import math
import os
import sys
import time

# ------------------------------------------------------------------------------------------------
# codec: plain Python data <-> strict JSON with tags for what JSON cannot say
# ------------------------------------------------------------------------------------------------
MAX_DEPTH = 100
_BASES = (int, float, complex, str, bytes, list, tuple, dict, set, frozenset)


def _type_name(t):
    return f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', '?')}"


def encode(x, depth=0):
    """Untrusted side: any object -> JSON-able tagged data. Exact builtin types keep their type;
    subclasses of builtins (and numpy-like scalars) become {"sub": name, "of": base value};
    anything else {"opaque": type name} (compares equal to nothing)."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return x if -(1 << 53) < x < (1 << 53) else {"int": hex(x)}
    if t is float:
        return x if math.isfinite(x) else {"float": repr(x)}
    if t is complex:
        return {"complex": [encode(x.real, depth + 1), encode(x.imag, depth + 1)]}
    if t is bytes:
        return {"bytes": x.hex()}
    if t in (list, tuple, set, frozenset):
        return {t.__name__: [encode(v, depth + 1) for v in x]}
    if t is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]}
    for base in _BASES:
        if isinstance(x, base):
            return {"sub": _type_name(t), "of": encode(base(x), depth + 1)}
    item = getattr(x, "item", None)
    if callable(item) and getattr(x, "shape", None) == ():  # numpy scalars
        v = item()
        if type(v) in (bool, int, float, complex):
            return {"sub": _type_name(t), "of": encode(v, depth + 1)}
    return {"opaque": _type_name(t)}


class Opaque:
    """A value the sandbox could not serialise (a generator, a regex match, a custom object...):
    not None, equal to nothing but itself, no behaviour of the candidate's."""

    __slots__ = ("type_name",)

    def __init__(self, type_name):
        self.type_name = str(type_name)

    def __repr__(self):
        return f"<opaque {self.type_name}>"


def _subclass(base):
    # a plain subclass: equality and hashing of the builtin base, but `type(x) is not base`
    # (evalplus's float comparison checks the exact type)
    return type(f"Sub_{base.__name__}", (base,), {"type_name": ""})


_SUB = {b.__name__: _subclass(b) for b in _BASES}


class ReportError(ValueError):
    """The sandbox's report is malformed (forged or corrupted): scored as an error."""


def decode(v, depth=0):
    """Trusted side: tagged JSON (already parsed by json.loads) -> plain builtin data. Only builds
    builtins, `Opaque` and the plain subclasses in _SUB; anything unexpected -> ReportError."""
    if depth > MAX_DEPTH + 2:
        raise ReportError("value nested too deeply")
    t = type(v)
    if v is None or t in (bool, str, int, float):
        return v
    if t is not dict or len(v) not in (1, 2):
        raise ReportError(f"untagged {t.__name__} in report")
    if len(v) == 2:
        if set(v) != {"sub", "of"} or type(v["sub"]) is not str:
            raise ReportError("bad subclass tag")
        base = decode(v["of"], depth + 1)
        if type(base) is bool or type(base).__name__ not in _SUB:
            raise ReportError("bad subclass base")
        out = _SUB[type(base).__name__](base)
        out.type_name = v["sub"][:200]
        return out
    (tag, p), = v.items()
    try:
        if tag == "int" and type(p) is str:
            return int(p, 16)
        if tag == "float" and p in ("inf", "-inf", "nan"):
            return float(p)
        if tag == "complex" and type(p) is list and len(p) == 2:
            re_, im = (decode(x, depth + 1) for x in p)
            if type(re_) is not float or type(im) is not float:
                raise ReportError("bad complex")
            return complex(re_, im)
        if tag == "bytes" and type(p) is str:
            return bytes.fromhex(p)
        if tag in ("list", "tuple", "set", "frozenset") and type(p) is list:
            items = [decode(x, depth + 1) for x in p]
            return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
        if tag == "dict" and type(p) is list:
            out = {}
            for kv in p:
                if type(kv) is not list or len(kv) != 2:
                    raise ReportError("bad dict item")
                out[decode(kv[0], depth + 1)] = decode(kv[1], depth + 1)
            return out
        if tag == "opaque" and type(p) is str:
            return Opaque(p[:200])
    except ReportError:
        raise
    except (TypeError, ValueError) as e:  # unhashable keys, bad hex, ...
        raise ReportError(f"bad {tag!r} value: {type(e).__name__}") from None
    raise ReportError(f"unknown tag {tag!r}")


# ------------------------------------------------------------------------------------------------
# isolation (runs before the program is loaded; trusted code inside the namespaces)
# ------------------------------------------------------------------------------------------------
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
NOBODY = 65534


class _Sys:
    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)

    def _check(self, rc, what):
        if rc != 0:
            e = self.ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")

    def mount(self, src, target, fstype, flags, data=None):
        enc = (lambda s: None if s is None else os.fsencode(s))
        self._check(self.libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)),
                    f"mount {target}")

    def umount(self, target, flags=0):
        self._check(self.libc.umount2(os.fsencode(target), flags), f"umount {target}")

    def pivot_root(self, new, old):
        import platform

        nr = PIVOT_ROOT.get(platform.machine())
        if nr is None:
            raise OSError(0, f"pivot_root: unknown syscall number on {platform.machine()}")
        self._check(self.libc.syscall(nr, os.fsencode(new), os.fsencode(old)), "pivot_root")

    def prctl(self, *args):
        self._check(self.libc.prctl(*[self.ctypes.c_ulong(a) for a in args]), f"prctl{args[:1]}")

    def drop_all_caps(self):
        for cap in range(64):  # bounding set
            if self.libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                break
        c = self.ctypes

        class Header(c.Structure):
            _fields_ = [("version", c.c_uint32), ("pid", c.c_int)]

        class Data(c.Structure):
            _fields_ = [("effective", c.c_uint32), ("permitted", c.c_uint32), ("inheritable", c.c_uint32)]

        hdr, data = Header(0x20080522, 0), (Data * 2)()
        self._check(self.libc.capset(c.byref(hdr), data), "capset")


def _locked_flags(path):
    """Mount flags of `path`'s mount that a remount must keep (they are locked in a user namespace)."""
    f = os.statvfs(path).f_flag
    out = 0
    for st, ms in ((2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC), (1024, MS_NOATIME),
                   (2048, MS_NODIRATIME), (4096, MS_RELATIME)):
        if f & st:
            out |= ms
    return out


def _bind(s, src, dst, writable=False, extra=0):
    if os.path.isdir(src):
        os.makedirs(dst, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
        open(dst, "a").close()
    s.mount(src, dst, None, MS_BIND | MS_REC)
    flags = MS_BIND | MS_REMOUNT | _locked_flags(src) | extra | (0 if writable else MS_RDONLY)
    s.mount(None, dst, None, flags)


def enter_sandbox(hostdir, mode, ro_paths):
    """Build the new root, pivot into it, drop privileges. Raises OSError when anything fails."""
    s = _Sys()
    os.umask(0o022)
    s.mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = os.path.join(hostdir, "root")
    os.makedirs(root, exist_ok=True)
    s.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
    for p in ro_paths:
        if not p.startswith("/") or not os.path.lexists(p):
            continue
        dst = root + p
        if os.path.islink(p) and p.count("/") == 1:  # /bin -> usr/bin (merged /usr)
            os.symlink(os.readlink(p), dst)
            continue
        _bind(s, p, dst)
    for dev in ("null", "zero", "random", "urandom"):
        _bind(s, "/dev/" + dev, f"{root}/dev/{dev}", writable=dev == "null", extra=MS_NOSUID | MS_NOEXEC)
    os.makedirs(root + "/proc", mode=0o555)
    s.mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _bind(s, os.path.join(hostdir, "work"), root + "/tmp", writable=True, extra=MS_NOSUID | MS_NODEV)
    os.chdir(root)
    s.pivot_root(".", ".")
    s.umount(".", MNT_DETACH)  # the old root: nothing outside the new root stays reachable
    os.chdir("/")
    s.mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    if mode == "root":  # real root in fresh namespaces: become nobody for good
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    else:  # the user namespace's root (= the calling user outside): no capabilities, ever again
        s.prctl(28, 0xEF, 0, 0, 0)  # PR_SET_SECUREBITS: NOROOT, NO_SETUID_FIXUP, KEEP_CAPS, AMBIENT (+locks)
        s.drop_all_caps()
    s.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    os.chdir("/tmp")


def set_limits(job):
    import resource

    mem = int(job["memory_mb"]) * 1024 * 1024
    for res, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem),
                     (resource.RLIMIT_FSIZE, int(job["fsize_mb"]) * 1024 * 1024),
                     (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 64),
                     (resource.RLIMIT_NPROC, 1)):  # no fork, no thread: one process holds all memory
        resource.setrlimit(res, (val, val))
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(used.ru_utime + used.ru_stime + 0.999) + int(job["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 2))


# ------------------------------------------------------------------------------------------------
# running the program (untrusted from here on)
# ------------------------------------------------------------------------------------------------
class _Timeout(BaseException):
    pass


def _arm(seconds):
    import signal

    def handler(signum, frame):
        raise _Timeout("cpu" if signum == signal.SIGXCPU else "wall")

    signal.signal(signal.SIGALRM, handler)
    signal.signal(signal.SIGXCPU, handler)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 1e-3))


def _disarm():
    import signal

    signal.setitimer(signal.ITIMER_REAL, 0)


def run_job(job, emit):
    """Load the program, then (mode "calls") call the entry point on each input. `emit(dict)`
    writes one report line."""
    g = {"__name__": "__main__"} if job.get("main_name", True) else {}
    try:
        _arm(job["load_timeout"])
        exec(compile(job["code"], "<program>", "exec"), g)
        _disarm()
    except _Timeout as e:
        emit({"load": "timeout", "why": e.args[0]})
        return
    except BaseException as e:  # noqa: BLE001
        _disarm()
        emit({"load": "error", "exc": type(e).__name__, "msg": str(e)[:200]})
        return
    if job["mode"] == "script":
        emit({"load": "ok"})
        return
    fn = g.get(job["entry_point"])
    if not callable(fn):
        emit({"load": "error", "exc": "NameError", "msg": f"{job['entry_point']!r} is not defined"})
    inputs = decode(json.loads(job["inputs"]))
    results, times = [], []
    for inp, limit in zip(inputs, job["time_limits"]):
        args = copy.deepcopy(inp)
        t0 = time.perf_counter()
        try:
            _arm(limit)
            out = fn(*args)
            _disarm()
            dt = time.perf_counter() - t0
            try:
                results.append({"ok": encode(out)})
            except BaseException as e:  # noqa: BLE001
                results.append({"exc": "Unserialisable" + type(e).__name__})
        except _Timeout as e:
            dt = time.perf_counter() - t0
            results.append({"timeout": e.args[0]})
        except BaseException as e:  # noqa: BLE001
            _disarm()
            dt = time.perf_counter() - t0
            results.append({"exc": type(e).__name__})
        times.append(dt)
    emit({"load": "ok", "results": results, "times": times})


def main():
    hostdir, mode = sys.argv[1], sys.argv[2]
    os.setsid()  # its own session and process group: kill(0, ...) reaches nothing but itself
    with open(os.path.join(hostdir, "job.json")) as f:
        job = json.load(f)
    out = os.dup(1)
    try:
        enter_sandbox(hostdir, mode, job["ro_paths"])
        set_limits(job)
    except BaseException as e:  # noqa: BLE001
        os.write(out, (json.dumps({"setup_error": f"{type(e).__name__}: {e}"}) + "\n").encode())
        os._exit(3)
    for p in job.get("sys_path", []):
        sys.path.append(p)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    write, exit_ = os.write, os._exit

    def emit(rep):
        write(out, (json.dumps(rep) + "\n").encode())
        exit_(0)

    run_job(job, emit)


if __name__ == "__main__":
    main()
