"""Thin SVD of the SVF target matrices, cached as one safetensors file with a manifest (PROTOCOL §2).

For every targeted weight W (HF layout, out×in = m×n) the cache holds, in fp32,
``<name>.U`` (m×r), ``<name>.S`` (r) and ``<name>.V`` (n×r) with r = min(m, n) and

    W ≈ U diag(S) Vᵀ          (V, *not* Vh: the authors' code stores torch.svd's V the same way)

computed with ``torch.linalg.svd(W.float(), full_matrices=False)`` (V = Vh.T; a wide W is
decomposed as Wᵀ, which LAPACK does ~2x faster, and the factors swapped).

Weights are read matrix by matrix straight from the model's safetensors files (no model load) and
the cache is written *streaming*: the safetensors header is reserved first, then every U/S/V is
appended as soon as it is computed, and the header (tensor table + manifest) is filled in at the
end, so peak memory is one weight matrix and its factors, whatever the model size. The file is
written under a temporary name and renamed, so an interrupted run leaves no half cache.

The manifest (safetensors metadata key ``manifest``, mirrored to ``<out>.manifest.json`` for
reading) records the model identity (directory, registry key, sha256 of the normalised
config.json, sha256 of every targeted tensor's stored bytes), targets, layers, dtypes, per-matrix
relative reconstruction error ‖U diag(S) Vᵀ − W‖_F / ‖W‖_F, timings and the provenance record.
:func:`load_svd` validates all of it; :func:`ensure_svd` reuses a valid cache and rebuilds a
stale or corrupted one with a warning.

Layer selections (``layers=``): ``"all"``; ``"half"`` = the *upper* half of the decoder layers,
indices ``L//2 … L-1`` (PROTOCOL §1: Llama3-70B trains SVF on half of the layers; neither the paper
nor the released code says which half, so this choice is ours and ``"half-lower"``, ``"even"``,
``"odd"`` or an explicit list/range string such as ``"0-39"`` are offered too).

Matrix order: everywhere a list of matrices is needed (per-matrix α, init, shuffling) the
*canonical order* of :func:`ordered_names` is used: names sorted with numbers compared as numbers
(``layers.2`` before ``layers.10``), i.e. layer by layer, and within a layer alphabetically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import CorruptArtifactError, MissingModelError, T2EvalError

log = logging.getLogger(__name__)

FORMAT = "t2eval-svd/1"
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "attn": ("self_attn.q_proj", "self_attn.v_proj"),
}
TARGET_SETS["mlp+attn"] = TARGET_SETS["mlp"] + TARGET_SETS["attn"]
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class StaleCacheError(T2EvalError):
    """A valid cache that belongs to another model, weights, target set or layer selection."""


# --------------------------------------------------------------------------- names and targets

def ordered_names(names: Iterable[str]) -> list[str]:
    """The canonical matrix order: numbers compared as numbers (layers.2 < layers.10)."""
    def key(n: str):
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", n)]
    return sorted(set(names), key=key)


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def normalise_targets(targets: str | Sequence[str]) -> tuple[str, list[str]]:
    """(canonical key, module-name suffixes). `targets` is mlp | attn | mlp+attn or suffixes
    (a list, or one comma-separated string), e.g. ["gate_proj", "self_attn.o_proj"]."""
    if isinstance(targets, str) and targets in TARGET_SETS:
        return targets, list(TARGET_SETS[targets])
    items = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if not items:
        raise T2EvalError(f"empty target list {targets!r}: use mlp, attn, mlp+attn or module-name suffixes")
    suffixes = sorted({t[:-len(".weight")] if t.endswith(".weight") else t for t in items})
    for k, v in TARGET_SETS.items():
        if sorted(v) == suffixes:
            return k, list(v)
    return "custom:" + ",".join(suffixes), suffixes


def select_layers(layers: str | Sequence[int] | None, num_layers: int) -> list[int]:
    """Layer indices for a selection (see the module docstring)."""
    if layers is None or layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str):
        if layers in ("half", "half-upper"):
            return list(range(num_layers // 2, num_layers))
        if layers == "half-lower":
            return list(range(num_layers // 2))
        if layers in ("even", "odd"):
            return list(range(0 if layers == "even" else 1, num_layers, 2))
        out: list[int] = []
        try:
            for part in layers.split(","):
                a, _, b = part.strip().partition("-")
                out.extend(range(int(a), int(b) + 1) if b else [int(a)])
        except ValueError:
            raise T2EvalError(f"bad layer selection {layers!r}: use all, half, half-lower, even, odd, "
                              "or indices/ranges like '0-15,20'") from None
        layers = out
    idx = sorted({int(i) for i in layers})
    bad = [i for i in idx if not 0 <= i < num_layers]
    if bad:
        raise T2EvalError(f"layer indices {bad} out of range: the model has {num_layers} layers")
    return idx


def _names_and_num_layers(source: Any) -> tuple[list[str], int | None]:
    if isinstance(source, (str, os.PathLike)):
        d = Path(source)
        names = list(_weight_index(d))
        cfg = _read_config(d)
        return names, cfg.get("num_hidden_layers")
    if hasattr(source, "named_parameters"):
        cfg = getattr(source, "config", None)
        return [n for n, _ in source.named_parameters()], getattr(cfg, "num_hidden_layers", None)
    if isinstance(source, Mapping):
        return list(source), None
    return list(source), None


def target_names(model_or_state_names: Any, targets: str | Sequence[str] = "mlp",
                 layers: str | Sequence[int] | None = "all", num_layers: int | None = None) -> list[str]:
    """Names of the targeted weight matrices, in canonical order.

    `model_or_state_names`: an HF model, a state dict, an iterable of parameter names or a model
    directory. `targets`: mlp (gate/up/down_proj; default) | attn (q_proj + v_proj) | mlp+attn |
    explicit module-name suffixes. `layers`: see :func:`select_layers`; the layer count comes from
    the model config, else from the largest layer index in the names.
    """
    names, n_cfg = _names_and_num_layers(model_or_state_names)
    key, suffixes = normalise_targets(targets)
    hits = [n for n in names if any(n == s + ".weight" or n.endswith("." + s + ".weight") for s in suffixes)]
    if not hits:
        raise T2EvalError(f"no weight matches targets {key!r} (suffixes {suffixes}); "
                          f"example parameter names: {names[:4]}")
    if layers not in (None, "all"):
        idx_all = [i for n in names if (i := layer_index(n)) is not None]
        n_layers = num_layers or n_cfg or (max(idx_all) + 1 if idx_all else 0)
        keep = set(select_layers(layers, n_layers))
        hits = [n for n in hits if layer_index(n) in keep]
        if not hits:
            raise T2EvalError(f"layer selection {layers!r} leaves no {key} matrix")
    return ordered_names(hits)


# --------------------------------------------------------------------------- model files

def _read_config(model_dir: Path) -> dict:
    f = Path(model_dir) / "config.json"
    if not f.exists():
        raise MissingModelError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    return json.loads(f.read_text())


def _weight_index(model_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it."""
    d = Path(model_dir)
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        return {k: d / v for k, v in wm.items()}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise MissingModelError(f"no *.safetensors weights in {d}: decompose reads safetensors only "
                                "(convert with `t2eval prepare-model`)")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(f, "pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def config_sha256(model_dir: str | os.PathLike) -> str:
    """sha256 of config.json, normalised (sorted keys, minus fields that don't change the model)."""
    cfg = {k: v for k, v in _read_config(Path(model_dir)).items()
           if k not in ("transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def _model_key(model_dir: Path) -> str:
    meta = model_dir / "t2eval_model.json"
    if meta.exists():
        try:
            m = json.loads(meta.read_text())
            return str(m.get("key", model_dir.name)) + (f"-s{m['seed']}" if "seed" in m else "")
        except ValueError:
            pass
    return model_dir.name


_HASH_MEMO: dict[tuple, str] = {}


def _tensor_sha256(t) -> str:
    import torch

    h = hashlib.sha256()
    h.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def tensor_hashes(model_dir: str | os.PathLike, names: Sequence[str]) -> dict[str, dict]:
    """{name: {shape, dtype, sha256 of the stored bytes}} (memoised per file mtime/size in-process)."""
    from safetensors import safe_open

    index = _weight_index(Path(model_dir))
    missing = [n for n in names if n not in index]
    if missing:
        raise T2EvalError(f"{model_dir} has no tensor(s) {missing[:3]}")
    out = {}
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(index[n], []).append(n)
    for f, ns in by_file.items():
        st = f.stat()
        with safe_open(f, "pt") as h:
            for n in ns:
                sl = h.get_slice(n)
                key = (str(f.resolve()), st.st_mtime_ns, st.st_size, n)
                if key not in _HASH_MEMO:
                    _HASH_MEMO[key] = _tensor_sha256(h.get_tensor(n))
                out[n] = {"shape": list(sl.get_shape()), "dtype": sl.get_dtype(), "sha256": _HASH_MEMO[key]}
    return out


def model_identity(model_dir: str | os.PathLike, names: Sequence[str], hashes: bool = True) -> dict:
    d = Path(model_dir)
    ident: dict[str, Any] = {"dir": str(d.resolve()), "key": _model_key(d), "config_sha256": config_sha256(d)}
    if hashes:
        th = tensor_hashes(d, names)
        ident["tensors"] = th
        ident["weights_sha256"] = hashlib.sha256(
            "".join(f"{n}:{th[n]['sha256']};" for n in ordered_names(names)).encode()).hexdigest()
    return ident


# --------------------------------------------------------------------------- decompose

def _thin_svd(w, device: str = "cpu"):
    import torch

    w32 = w.to(device=device, dtype=torch.float32)
    if w32.shape[0] >= w32.shape[1]:
        U, S, Vh = torch.linalg.svd(w32, full_matrices=False)
        V = Vh.T.contiguous()
    else:  # LAPACK is ~2x faster on tall inputs: Wᵀ = V diag(S) Uᵀ gives the same factorisation
        V, S, Uh = torch.linalg.svd(w32.T, full_matrices=False)
        U = Uh.T.contiguous()
    rec = (U * S) @ V.T
    err = (torch.linalg.norm(rec - w32) / torch.linalg.norm(w32).clamp_min(1e-30)).item()
    return U.cpu().contiguous(), S.cpu().contiguous(), V.cpu().contiguous(), err


def decompose(model_dir: str | os.PathLike, targets: str | Sequence[str] = "mlp",
              out: str | os.PathLike = "svd.safetensors", layers: str | Sequence[int] | None = "all",
              device: str = "cpu", threads: int | None = None) -> dict:
    """Decompose the targeted matrices of `model_dir` into `out`; returns the manifest.

    `threads`: torch CPU threads for the SVD (None: leave torch's setting; 1 is fastest on a
    shared/oversubscribed machine, where multi-threaded LAPACK can be 10x slower).
    """
    import torch

    if threads:
        prev = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return decompose(model_dir, targets, out, layers, device, None)
        finally:
            torch.set_num_threads(prev)
    from safetensors import safe_open

    from .provenance import record, write_json_atomic

    t_start = time.perf_counter()
    d = Path(model_dir)
    out = Path(out)
    cfg = _read_config(d)
    index = _weight_index(d)
    key, suffixes = normalise_targets(targets)
    names = target_names(list(index), targets, layers, num_layers=cfg.get("num_hidden_layers"))
    n_layers = cfg.get("num_hidden_layers") or (max((layer_index(n) or 0) for n in index) + 1)

    # tensor table, known before any SVD: U m×r, S r, V n×r (fp32)
    table: dict[str, dict] = {}
    offset = 0
    shapes: dict[str, tuple[int, int]] = {}
    src_dtypes: dict[str, str] = {}
    for n in names:
        with safe_open(index[n], "pt") as h:
            sl = h.get_slice(n)
            shape = tuple(sl.get_shape())
            src_dtypes[n] = sl.get_dtype()
        if len(shape) != 2:
            raise T2EvalError(f"target {n} has shape {list(shape)}; only 2-D weight matrices can be decomposed")
        m, k = shape
        r = min(m, k)
        shapes[n] = (m, k)
        for suf, shp in ((".U", [m, r]), (".S", [r]), (".V", [k, r])):
            nbytes = 4 * math.prod(shp)
            table[n + suf] = {"dtype": "F32", "shape": shp, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    reserve = len(json.dumps(table)) + 65536 + 1024 * len(names)
    reserve = (reserve + 7) // 8 * 8

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    matrices: dict[str, dict] = {}
    tensors_id: dict[str, dict] = {}
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", reserve))
            f.write(b" " * reserve)
            for n in names:
                t0 = time.perf_counter()
                with safe_open(index[n], "pt") as h:
                    w = h.get_tensor(n)
                tensors_id[n] = {"shape": list(shapes[n]), "dtype": src_dtypes[n], "sha256": _tensor_sha256(w)}
                if not torch.isfinite(w).all():
                    raise T2EvalError(f"{n} in {index[n]} contains NaN/inf: the model weights are broken")
                U, S, V, err = _thin_svd(w, device)
                for t in (U, S, V):
                    f.write(memoryview(t.numpy()))
                matrices[n] = {"shape": list(shapes[n]), "rank": int(S.numel()), "rel_err": err,
                               "seconds": round(time.perf_counter() - t0, 4)}
                log.debug("%s %s rel_err=%.2e %.2fs", n, list(shapes[n]), err, matrices[n]["seconds"])
                del w, U, S, V
            if f.tell() != 8 + reserve + offset:  # pragma: no cover - internal consistency
                raise RuntimeError("svd cache size mismatch")
            total = time.perf_counter() - t_start
            ident = {"dir": str(d.resolve()), "key": _model_key(d), "config_sha256": config_sha256(d),
                     "tensors": tensors_id,
                     "weights_sha256": hashlib.sha256("".join(
                         f"{n}:{tensors_id[n]['sha256']};" for n in names).encode()).hexdigest()}
            manifest = {
                "format": FORMAT,
                "model": ident,
                "targets": key, "target_suffixes": suffixes,
                "layers": layers if isinstance(layers, (str, type(None))) else list(layers),
                "layer_indices": sorted({i for n in names if (i := layer_index(n)) is not None}),
                "num_layers": n_layers,
                "names": names,
                "svd": {"function": "torch.linalg.svd(full_matrices=False)", "dtype": "float32",
                        "device": device, "threads": torch.get_num_threads(),
                        "stored": "U (m×r), S (r), V (n×r) with W = U diag(S) Vᵀ"},
                "source_dtypes": sorted(set(src_dtypes.values())),
                "matrices": matrices,
                "max_rel_err": max(m["rel_err"] for m in matrices.values()),
                "n_params_svf": sum(m["rank"] for m in matrices.values()),
                "seconds": round(total, 3),
                "provenance": record("decompose", {"model": str(d), "targets": key, "layers": manifest_layers(layers),
                                                   "device": device},
                                     inputs={"config_sha256": ident["config_sha256"],
                                             "weights_sha256": ident["weights_sha256"]},
                                     timings={"decompose_s": total}),
            }
            header = dict(table)
            header["__metadata__"] = {"format": FORMAT, "manifest": json.dumps(manifest)}
            hb = json.dumps(header).encode()
            if len(hb) > reserve:  # pragma: no cover - the reserve is generous
                raise RuntimeError(f"svd header ({len(hb)} B) exceeds the reserved {reserve} B")
            f.seek(8)
            f.write(hb + b" " * (reserve - len(hb)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    write_json_atomic(manifest_path(out), manifest)
    log.info("decomposed %d %s matrices of %s in %.1f s (max rel err %.2e) -> %s (%.1f MB)",
             len(names), key, d, manifest["seconds"], manifest["max_rel_err"], out, out.stat().st_size / 1e6)
    return manifest


def manifest_layers(layers) -> Any:
    return layers if isinstance(layers, (str, type(None))) else list(layers)


def manifest_path(out: str | os.PathLike) -> Path:
    p = Path(out)
    return p.with_name(p.name + ".manifest.json")


# --------------------------------------------------------------------------- load / validate

class SVDCache:
    """A loaded, validated cache: `names` (canonical order), `U`, `S`, `V` dicts and the `manifest`."""

    def __init__(self, path: Path | None, manifest: dict, U: dict, S: dict, V: dict):
        self.path, self.manifest, self.U, self.S, self.V = path, manifest, U, S, V
        self.names: list[str] = list(manifest["names"])

    def __contains__(self, name: str) -> bool:
        return name in self.S

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def usv(self, name: str):
        return self.U[name], self.S[name], self.V[name]

    def rank(self, name: str) -> int:
        return int(self.S[name].numel())

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def targets(self) -> str:
        return self.manifest["targets"]

    def to(self, device=None, dtype=None) -> "SVDCache":
        conv = lambda d: {k: v.to(device=device, dtype=dtype) for k, v in d.items()}  # noqa: E731
        return SVDCache(self.path, self.manifest, conv(self.U), conv(self.S), conv(self.V))


def _corrupt(path: Path, why: str) -> CorruptArtifactError:
    return CorruptArtifactError(f"SVD cache {path} is corrupted ({why}); delete it or rerun "
                                "`t2eval decompose ... --force` to rebuild it")


def load_svd(path: str | os.PathLike, expect_model: str | os.PathLike | None = None,
             expect_targets: str | Sequence[str] | None = None, expect_layers: Any = None,
             device: str = "cpu", verify_weights: bool = True) -> SVDCache:
    """Load and validate a cache.

    Raises CorruptArtifactError (unreadable/truncated file, bad header or manifest, missing or
    mis-shaped keys, NaN/inf) or StaleCacheError (built from another model — config, tensor shapes,
    or, with `verify_weights`, the sha256 of every targeted tensor of `expect_model` — or with other
    targets / layers than expected).
    """
    import torch
    from safetensors import safe_open

    p = Path(path)
    if not p.exists():
        raise T2EvalError(f"SVD cache {p} not found: run `t2eval decompose --model MODEL --out {p}`")
    try:
        with safe_open(p, "pt", device="cpu") as h:
            meta = h.metadata() or {}
            keys = set(h.keys())
            if meta.get("format") != FORMAT or "manifest" not in meta:
                raise _corrupt(p, f"not a {FORMAT} file (metadata format={meta.get('format')!r})")
            manifest = json.loads(meta["manifest"])
            names = manifest["names"]
            U, S, V = {}, {}, {}
            for n in names:
                for suf, d in ((".U", U), (".S", S), (".V", V)):
                    if n + suf not in keys:
                        raise _corrupt(p, f"missing tensor {n + suf}")
                    d[n] = h.get_tensor(n + suf)
    except CorruptArtifactError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise _corrupt(p, f"{type(e).__name__}: {e}") from None
    for n in names:
        m, k = manifest["model"]["tensors"][n]["shape"]
        r = min(m, k)
        if [*U[n].shape] != [m, r] or [*S[n].shape] != [r] or [*V[n].shape] != [k, r]:
            raise _corrupt(p, f"{n}: factor shapes {list(U[n].shape)}/{list(S[n].shape)}/{list(V[n].shape)} "
                              f"do not fit W {m}×{k}")
        for part, t in (("U", U[n]), ("S", S[n]), ("V", V[n])):
            if t.dtype != torch.float32 or not torch.isfinite(t).all():
                raise _corrupt(p, f"{n}.{part} is not finite fp32")
    if expect_targets is not None:
        key, _ = normalise_targets(expect_targets)
        if key != manifest["targets"]:
            raise StaleCacheError(f"SVD cache {p} holds targets {manifest['targets']!r}, expected {key!r}")
    if expect_layers is not None:
        want = select_layers(expect_layers, manifest["num_layers"])
        if want != manifest["layer_indices"]:
            raise StaleCacheError(f"SVD cache {p} covers layers {manifest['layers']!r}, expected {expect_layers!r}")
    if expect_model is not None:
        md = Path(expect_model)
        if not (md / "config.json").exists():  # a registry key: resolve it like every other stage
            from .models.loading import resolve_model_dir

            md = resolve_model_dir(str(expect_model))
        _check_model(p, manifest, md, verify_weights)
    cache = SVDCache(p, manifest, U, S, V)
    return cache.to(device) if device != "cpu" else cache


def _check_model(p: Path, manifest: dict, model_dir: Path, verify_weights: bool) -> None:
    have = manifest["model"]
    if config_sha256(model_dir) != have["config_sha256"]:
        raise StaleCacheError(f"SVD cache {p} was built from {have['dir']} (another config) than {model_dir}")
    names = manifest["names"]
    index = _weight_index(model_dir)
    missing = [n for n in names if n not in index]
    if missing:
        raise StaleCacheError(f"SVD cache {p}: {model_dir} lacks {missing[:3]}")
    if verify_weights:
        now = tensor_hashes(model_dir, names)
        diff = [n for n in names if now[n] != have["tensors"][n]]
        if diff:
            raise StaleCacheError(f"SVD cache {p} is stale: {len(diff)} target tensor(s) of {model_dir} "
                                  f"changed since it was built (e.g. {diff[0]})")


def ensure_svd(model_dir: str | os.PathLike, targets: str | Sequence[str] = "mlp",
               out: str | os.PathLike | None = None, layers: Any = "all", force: bool = False,
               device: str = "cpu", verify_weights: bool = True, threads: int | None = None) -> SVDCache:
    """A valid cache for (model, targets, layers) at `out`: reused when valid, else (re)built.

    A stale or corrupted cache is never used silently: it is rebuilt with a logged warning.
    `out` defaults to ``svd/<model dir name>-<targets>.safetensors``.
    """
    d = Path(model_dir)
    key, _ = normalise_targets(targets)
    if out is None:
        suffix = "" if layers in (None, "all") else f"-{layers if isinstance(layers, str) else 'custom'}"
        out = Path("svd") / f"{d.name}-{key.replace(':', '_').replace(',', '_')}{suffix}.safetensors"
    out = Path(out)
    if out.exists() and not force:
        try:
            return load_svd(out, expect_model=d, expect_targets=targets, expect_layers=layers,
                            device=device, verify_weights=verify_weights)
        except (CorruptArtifactError, StaleCacheError) as e:
            log.warning("rebuilding the SVD cache: %s", e)
    decompose(d, targets, out, layers=layers, device=device, threads=threads)
    return load_svd(out, expect_targets=targets, device=device)
