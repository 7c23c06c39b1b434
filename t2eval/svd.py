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
written as ``.<out>.partial`` with a progress manifest (``.<out>.partial.json``) updated after every
fsynced matrix, and renamed to `out` when complete: an interrupted run leaves no half cache and a
rerun resumes after the last finished matrix (bit-identical factors on the same device/threads).

The manifest (safetensors metadata key ``manifest``, mirrored to ``<out>.manifest.json`` for
reading) records the model identity (directory, registry key, sha256 of the normalised
config.json, per targeted tensor the sha256 of its stored bytes and a sampled fingerprint),
targets, layers, dtypes, per matrix the relative reconstruction error ‖U diag(S) Vᵀ − W‖_F / ‖W‖_F
and the sha256 of its stored U, S and V, timings and the provenance record. :func:`load_svd`
validates all of it (the factor checksums by streaming hashes) and returns a cache whose factors
are read from the file on access, so host memory stays O(one matrix);
:func:`check_svd_for_model` tells whether a cache belongs to a model; :func:`ensure_svd` reuses a
valid cache and rebuilds a stale or corrupted one with a warning.

Layer selections (``layers=``): ``"all"``; ``"half"`` = the *upper* half of the decoder layers,
indices ``L//2 … L-1`` (PROTOCOL §1: Llama3-70B trains SVF on half of the layers; neither the paper
nor the released code says which half, so this choice is ours and ``"half-lower"``, ``"even"``,
``"odd"`` or an explicit list/range string such as ``"0-39"`` are offered too).

Scope and names (vision-language models, issue 10): targets are searched inside a *scope*,
``"language"`` by default = the language model (for a VLM the decoder module, e.g.
``model.language_model`` in LLaVA-NeXT; for a text-only model the whole model), so no vision-tower
or projector matrix is ever decomposed or scaled; ``"all"`` or an explicit module prefix widen it.
Layer counts come from the text config. Cache keys (and hence expert files) are always the
*module names in memory* (what ``named_parameters()`` gives and what SVF patches); where a
checkpoint stores a tensor under another name (LLaVA-NeXT: ``language_model.model.layers.0…`` on
disk, ``model.language_model.layers.0…`` in memory) the two are mapped with transformers' own
checkpoint conversion mapping (``get_model_conversion_mapping`` + ``rename_source_key``, on a meta
model). For a text-only config (no ``vision_config``/``text_config``) that mapping is the identity
(tests/test_vlm.py checks it for Llama), so nothing is instantiated and the names are unchanged.

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

FORMAT = "t2eval-svd/2"  # /2: per-factor sha256 checksums and sampled weight fingerprints
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "attn": ("self_attn.q_proj", "self_attn.v_proj"),
}
TARGET_SETS["mlp+attn"] = TARGET_SETS["mlp"] + TARGET_SETS["attn"]
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8}


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


def _is_multimodal(cfg: Mapping) -> bool:
    return "vision_config" in cfg or "text_config" in cfg


def _text_num_layers(cfg: Mapping) -> int | None:
    return (cfg.get("text_config") or {}).get("num_hidden_layers") if _is_multimodal(cfg) else cfg.get("num_hidden_layers")


def _decoder_prefix(model) -> str:
    """Module path of a VLM's language model (its decoder), e.g. ``model.language_model``."""
    dec = model.get_decoder()
    for name, mod in model.named_modules():
        if mod is dec:
            return name
    raise T2EvalError(f"cannot locate the language model inside {type(model).__name__}")


_LAYOUTS: dict[tuple, dict] = {}


def model_layout(model_dir: str | os.PathLike) -> dict:
    """How a model directory's tensors are named and scoped:
    ``{"module_to_checkpoint": {module name: stored name}, "language_prefix": str, "num_layers": int}``.

    Text-only configs: identity names, language prefix "" (the whole model). Vision-language
    configs: names renamed with transformers' conversion mapping on a meta-device model, the
    language prefix is the path of its decoder module. Memoised per config/index file mtime.
    """
    d = Path(model_dir)
    cfg = _read_config(d)
    index = _weight_index(d)
    if not _is_multimodal(cfg):
        return {"module_to_checkpoint": {n: n for n in index}, "language_prefix": "",
                "num_layers": _text_num_layers(cfg)}
    stamp = tuple((f.name, f.stat().st_mtime_ns) for f in sorted({d / "config.json", *index.values()}))
    key = (str(d.resolve()), stamp)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _multimodal_layout(d, list(index), cfg)
    return _LAYOUTS[key]


def _multimodal_layout(d: Path, stored: list[str], cfg: Mapping) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    config = AutoConfig.from_pretrained(d)
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    except ValueError as e:
        raise T2EvalError(f"{d}: a multimodal config that transformers cannot build as an image-text model ({e})") from None
    conv = get_model_conversion_mapping(model)
    renamings = [c for c in conv if isinstance(c, WeightRenaming)]
    converters = [c for c in conv if isinstance(c, WeightConverter)]
    meta = {n: True for n, _ in model.named_parameters()}
    out = {}
    for k in stored:
        new, via_converter = rename_source_key(k, renamings, converters, model.base_model_prefix, meta)
        if new not in meta and k in meta:
            new, via_converter = k, None
        if new in meta and via_converter is None:  # converted (merged/split) tensors cannot be SVF targets
            out[new] = k
    return {"module_to_checkpoint": out, "language_prefix": _decoder_prefix(model),
            "num_layers": config.get_text_config().num_hidden_layers}


def _names_prefix_layers(source: Any) -> tuple[list[str], str, int | None]:
    """(module names, language-model prefix, text layer count) of a directory, model or name list."""
    if isinstance(source, (str, os.PathLike)):
        lay = model_layout(source)
        return list(lay["module_to_checkpoint"]), lay["language_prefix"], lay["num_layers"]
    if hasattr(source, "named_parameters"):
        cfg = getattr(source, "config", None)
        names = [n for n, _ in source.named_parameters()]
        if cfg is not None and getattr(cfg, "vision_config", None) is not None:
            return names, _decoder_prefix(source), cfg.get_text_config().num_hidden_layers
        return names, "", getattr(cfg, "num_hidden_layers", None)
    names = list(source)
    lm = sorted({n[: n.index("language_model.") + len("language_model")] for n in names if "language_model." in n},
                key=len)
    return names, (lm[0] if lm else ""), None


def scope_prefix(scope: str, language_prefix: str) -> str:
    """The module prefix a scope keeps ("" = everything): language | all | an explicit prefix."""
    if scope in (None, "language"):
        return language_prefix
    if scope == "all":
        return ""
    if not isinstance(scope, str) or not scope.strip("."):
        raise T2EvalError(f"bad SVD scope {scope!r}: use language, all or a module prefix like model.language_model")
    return scope.strip(".")


def target_names(model_or_state_names: Any, targets: str | Sequence[str] = "mlp",
                 layers: str | Sequence[int] | None = "all", num_layers: int | None = None,
                 scope: str = "language") -> list[str]:
    """Names of the targeted weight matrices (module names), in canonical order.

    `model_or_state_names`: an HF model, a state dict, an iterable of parameter names or a model
    directory. `targets`: mlp (gate/up/down_proj; default) | attn (q_proj + v_proj) | mlp+attn |
    explicit module-name suffixes. `layers`: see :func:`select_layers`; the layer count comes from
    the (text) model config, else from the largest layer index in the names. `scope`: language
    (default: the language model only, so a VLM's vision tower is never targeted) | all | a prefix.
    """
    names, lm_prefix, n_cfg = _names_prefix_layers(model_or_state_names)
    key, suffixes = normalise_targets(targets)
    prefix = scope_prefix(scope, lm_prefix)
    in_scope = [n for n in names if not prefix or n.startswith(prefix + ".")]
    hits = [n for n in in_scope if any(n == s + ".weight" or n.endswith("." + s + ".weight") for s in suffixes)]
    if not hits:
        raise T2EvalError(f"no weight matches targets {key!r} (suffixes {suffixes})"
                          + (f" inside scope {prefix!r}" if prefix else "") + f"; example parameter names: {names[:4]}")
    names = in_scope
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


# --------------------------------------------------------------------------- raw safetensors access

_CHUNK = 8 << 20  # bytes per read when hashing (memory stays O(chunk), not O(tensor))
_ST_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _st_table(path: Path) -> tuple[int, dict[str, dict], dict]:
    """(byte offset of the data section, {tensor: {dtype, shape, data_offsets}}, metadata) of a
    safetensors file, with the offsets checked against the header and the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 1 << 30):
            raise ValueError(f"header length {n} exceeds the file size {size}")
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    ends = []
    for k, e in header.items():
        a, b = e["data_offsets"]
        want = _ST_DTYPES.get(e["dtype"], 0) * math.prod(e["shape"])
        if e["dtype"] in _ST_DTYPES and b - a != want:  # (sub-byte dtypes: offsets checked below only)
            raise ValueError(f"tensor {k}: {b - a} bytes for shape {e['shape']} {e['dtype']} ({want} expected)")
        ends.append((a, b))
    pos = 0
    for a, b in sorted(ends):
        if a != pos:
            raise ValueError(f"tensor data not contiguous at byte {a}")
        pos = b
    if 8 + n + pos != size:
        raise ValueError(f"file is {size} bytes, the header describes {8 + n + pos} (truncated or padded)")
    return 8 + n, header, meta


def _range_sha256(fd: int, start: int, end: int) -> str:
    h = hashlib.sha256()
    pos = start
    while pos < end:
        b = os.pread(fd, min(_CHUNK, end - pos), pos)
        if not b:
            raise ValueError(f"unexpected end of file at byte {pos}")
        h.update(b)
        pos += len(b)
    return h.hexdigest()


def _read_tensor(fd: int, offset: int, shape: Sequence[int], dtype: str = "F32"):
    """One tensor read with positional reads into a fresh tensor (no mmap kept: resident host
    memory is this tensor only)."""
    import torch

    t = torch.empty(list(shape), dtype=getattr(torch, _ST_TORCH[dtype]))
    buf = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
    done = 0
    while done < len(buf):
        k = os.preadv(fd, [buf[done:]], offset + done)
        if k <= 0:
            raise ValueError(f"unexpected end of file at byte {offset + done}")
        done += k
    return t


_HASH_MEMO: dict[tuple, str] = {}


def _tensor_sha256(t) -> str:
    import torch

    h = hashlib.sha256()
    h.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _by_file(model_dir: Path, names: Sequence[str]) -> dict[Path, list[tuple[str, str]]]:
    """{safetensors file: [(module name, stored name)]} for module names `names`."""
    index = _weight_index(model_dir)
    to_ckpt = model_layout(model_dir)["module_to_checkpoint"]
    missing = [n for n in names if n not in to_ckpt]
    if missing:
        raise StaleCacheError(f"{model_dir} has no tensor(s) {missing[:3]}")
    out: dict[Path, list[tuple[str, str]]] = {}
    for n in names:
        out.setdefault(index[to_ckpt[n]], []).append((n, to_ckpt[n]))
    return out


def tensor_hashes(model_dir: str | os.PathLike, names: Sequence[str], full: bool = True) -> dict[str, dict]:
    """{name: {shape, dtype, sample_sha256[, sha256]}} of a model's stored tensors.

    ``sha256`` hashes every stored byte (read in chunks; memoised per file mtime/size in-process);
    ``sample_sha256`` hashes the shape, dtype and 16 evenly spaced 4 KiB windows (first and last
    included) of the tensor's bytes: a cheap fingerprint that tells two models with the same
    shapes apart (any two trained or random models differ in every window).
    """
    out = {}
    for f, ns in _by_file(Path(model_dir), names).items():
        st = f.stat()
        start, table, _ = _st_table(f)
        fd = os.open(f, os.O_RDONLY)
        try:
            for n, stored in ns:
                e = table[stored]
                a, b = start + e["data_offsets"][0], start + e["data_offsets"][1]
                rec = {"shape": list(e["shape"]), "dtype": e["dtype"], "sample_sha256": _sample_sha256(fd, a, b, e)}
                if full:
                    key = (str(f.resolve()), st.st_mtime_ns, st.st_size, n)
                    if key not in _HASH_MEMO:
                        _HASH_MEMO[key] = _range_sha256(fd, a, b)
                    rec["sha256"] = _HASH_MEMO[key]
                out[n] = rec
        finally:
            os.close(fd)
    return out


def _sample_sha256(fd: int, a: int, b: int, entry: dict, windows: int = 16, width: int = 4096) -> str:
    h = hashlib.sha256(json.dumps([entry["dtype"], list(entry["shape"])]).encode())
    n = b - a
    if n <= windows * width:
        starts = [0] if n else []
        width = n
    else:
        starts = [round(i * (n - width) / (windows - 1)) for i in range(windows)]
    for s in starts:
        h.update(os.pread(fd, width, a + s))
    return h.hexdigest()


def _weights_sha256(names: Sequence[str], tensors: Mapping[str, dict]) -> str:
    return hashlib.sha256("".join(f"{n}:{tensors[n]['sha256']};" for n in ordered_names(names)).encode()).hexdigest()


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


def partial_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """(partial cache, progress manifest) of an unfinished decomposition into `out`."""
    p = Path(out)
    return p.with_name(f".{p.name}.partial"), p.with_name(f".{p.name}.partial.json")


class _Lock:
    """Exclusive advisory lock (fcntl) on ``.<out>.lock``: one decomposition per cache at a time."""

    def __init__(self, out: Path):
        self.path = out.with_name(f".{out.name}.lock")

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock
        return False


def decompose(model_dir: str | os.PathLike, targets: str | Sequence[str] = "mlp",
              out: str | os.PathLike = "svd.safetensors", layers: str | Sequence[int] | None = "all",
              device: str = "cpu", threads: int | None = None, resume: bool = True,
              scope: str = "language") -> dict:
    """Decompose the targeted matrices of `model_dir` into `out`; returns the manifest.

    `scope`: where targets are searched (see the module docstring; default the language model).

    Resumable per matrix: factors are appended to ``.<out>.partial`` and, once fsynced, recorded
    with their sha256 in ``.<out>.partial.json``; a killed run restarts after the last recorded
    matrix when the plan (model config, weight files' size/mtime, targets, layers, device) is
    unchanged and the recorded factors still hash the same (`resume=False` starts from zero).
    The finished file is renamed to `out` atomically, so `out` is never half written.

    `threads`: torch CPU threads for the SVD (None: leave torch's setting; 1 is fastest on a
    shared/oversubscribed machine, where multi-threaded LAPACK can be 10x slower).
    """
    import torch

    if threads:
        prev = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return decompose(model_dir, targets, out, layers, device, None, resume, scope)
        finally:
            torch.set_num_threads(prev)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        return _decompose_locked(Path(model_dir), targets, out, layers, device, resume, scope)


def _decompose_locked(d: Path, targets, out: Path, layers, device: str, resume: bool, scope: str = "language") -> dict:
    import torch

    from .provenance import record, write_json_atomic

    t_start = time.perf_counter()
    index = _weight_index(d)
    lay = model_layout(d)
    to_ckpt = lay["module_to_checkpoint"]
    prefix = scope_prefix(scope, lay["language_prefix"])
    key, suffixes = normalise_targets(targets)
    names = target_names(d, targets, layers, scope=scope)
    n_layers = lay["num_layers"] or (max((layer_index(n) or 0) for n in to_ckpt) + 1)
    src_file = {n: index[to_ckpt[n]] for n in names}

    # tensor table, known before any SVD: U m×r, S r, V n×r (fp32)
    tables = {f: _st_table(f) for f in set(src_file.values())}
    table: dict[str, dict] = {}
    offset = 0
    shapes: dict[str, tuple[int, int]] = {}
    src_dtypes: dict[str, str] = {}
    for n in names:
        e = tables[src_file[n]][1][to_ckpt[n]]
        shape = tuple(e["shape"])
        src_dtypes[n] = e["dtype"]
        if len(shape) != 2:
            raise T2EvalError(f"target {n} has shape {list(shape)}; only 2-D weight matrices can be decomposed")
        m, k = shape
        r = min(m, k)
        shapes[n] = (m, k)
        for suf, shp in ((".U", [m, r]), (".S", [r]), (".V", [k, r])):
            nbytes = 4 * math.prod(shp)
            table[n + suf] = {"dtype": "F32", "shape": shp, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    reserve = len(json.dumps(table)) + 65536 + 1536 * len(names)
    reserve = (reserve + 7) // 8 * 8
    files = {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(tables)}
    plan = {"format": FORMAT, "model": str(d.resolve()), "config_sha256": config_sha256(d), "weight_files": files,
            "targets": key, "names": names, "layers": manifest_layers(layers), "device": str(device),
            "scope": prefix,
            "reserve": reserve, "size": 8 + reserve + offset}

    partial, progress = partial_paths(out)
    done: list[dict] = []
    elapsed_before = 0.0
    if resume and partial.exists() and progress.exists():
        done, elapsed_before = _resumable(partial, progress, plan, table, reserve)
    if done:
        f = open(partial, "r+b")
        end = 8 + reserve + table[done[-1]["name"] + ".V"]["data_offsets"][1]
        f.truncate(end)
        f.seek(end)
        log.info("resuming the decomposition into %s after %d of %d matrices", out, len(done), len(names))
    else:
        f = open(partial, "wb")
        f.write(struct.pack("<Q", reserve))
        f.write(b" " * reserve)
        f.flush()
        write_json_atomic(progress, {"plan": plan, "done": [], "elapsed_s": 0.0})
    n_reused = len(done)
    try:
        for n in names[len(done):]:
            t0 = time.perf_counter()
            w = _read_tensor_from(src_file[n], tables[src_file[n]], to_ckpt[n])
            src = {"shape": list(shapes[n]), "dtype": src_dtypes[n], "sha256": _tensor_sha256(w)}
            if not torch.isfinite(w).all():
                raise T2EvalError(f"{n} in {src_file[n]} contains NaN/inf: the model weights are broken")
            U, S, V, err = _thin_svd(w, device)
            sha = {}
            for part, t in (("U", U), ("S", S), ("V", V)):
                if not torch.isfinite(t).all():
                    raise T2EvalError(f"the SVD of {n} produced NaN/inf ({part}); try --device cpu")
                mv = memoryview(t.numpy()).cast("B")
                sha[part] = hashlib.sha256(mv).hexdigest()
                f.write(mv)
            f.flush()
            os.fsync(f.fileno())
            done.append({"name": n, "shape": list(shapes[n]), "rank": int(S.numel()), "rel_err": err,
                         "seconds": round(time.perf_counter() - t0, 4), "sha256": sha, "source": src})
            write_json_atomic(progress, {"plan": plan, "done": done,
                                         "elapsed_s": elapsed_before + time.perf_counter() - t_start})
            log.debug("%s %s rel_err=%.2e %.2fs", n, list(shapes[n]), err, done[-1]["seconds"])
            del w, U, S, V
        if f.tell() != plan["size"]:  # pragma: no cover - internal consistency
            raise RuntimeError("svd cache size mismatch")
        matrices = {e["name"]: {k: v for k, v in e.items() if k not in ("name", "source")} for e in done}
        tensors_id = {e["name"]: e["source"] for e in done}
        for fpath, ns in _by_file(d, names).items():  # cheap fingerprints for check_svd_for_model
            start, ftable, _ = tables[fpath]
            fd = os.open(fpath, os.O_RDONLY)
            try:
                for n, stored in ns:
                    a, b = (start + x for x in ftable[stored]["data_offsets"])
                    tensors_id[n]["sample_sha256"] = _sample_sha256(fd, a, b, ftable[stored])
            finally:
                os.close(fd)
        total = elapsed_before + time.perf_counter() - t_start
        ident = {"dir": str(d.resolve()), "key": _model_key(d), "config_sha256": plan["config_sha256"],
                 "tensors": tensors_id, "weights_sha256": _weights_sha256(names, tensors_id)}
        manifest = {
            "format": FORMAT,
            "model": ident,
            "targets": key, "target_suffixes": suffixes,
            "scope": scope if scope in ("language", "all") else prefix, "scope_prefix": prefix,
            "checkpoint_names": {n: to_ckpt[n] for n in names if to_ckpt[n] != n},
            "layers": manifest_layers(layers),
            "layer_indices": sorted({i for n in names if (i := layer_index(n)) is not None}),
            "num_layers": n_layers,
            "names": names,
            "svd": {"function": "torch.linalg.svd(full_matrices=False)", "dtype": "float32",
                    "device": device, "threads": torch.get_num_threads(),
                    "stored": "U (m×r), S (r), V (n×r) with W = U diag(S) Vᵀ",
                    "checksums": "matrices[name].sha256[U|S|V]: sha256 of the stored fp32 bytes"},
            "source_dtypes": sorted(set(src_dtypes.values())),
            "matrices": matrices,
            "max_rel_err": max(m["rel_err"] for m in matrices.values()),
            "n_params_svf": sum(m["rank"] for m in matrices.values()),
            "seconds": round(total, 3),
            "resumed_matrices": n_reused,
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
    finally:
        f.close()
    os.replace(partial, out)
    write_json_atomic(manifest_path(out), manifest)
    progress.unlink(missing_ok=True)
    log.info("decomposed %d %s matrices of %s in %.1f s (max rel err %.2e%s) -> %s (%.1f MB)",
             len(names), key, d, manifest["seconds"], manifest["max_rel_err"],
             f"; {n_reused} resumed" if n_reused else "", out, out.stat().st_size / 1e6)
    return manifest


def _read_tensor_from(path: Path, parsed: tuple[int, dict, dict], name: str):
    start, table, _ = parsed
    e = table[name]
    if e["dtype"] not in _ST_TORCH:
        from safetensors import safe_open  # FP8 and other exotic dtypes: let safetensors convert

        with safe_open(path, "pt") as h:
            return h.get_tensor(name)
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read_tensor(fd, start + e["data_offsets"][0], e["shape"], e["dtype"])
    finally:
        os.close(fd)


def _resumable(partial: Path, progress: Path, plan: dict, table: dict, reserve: int) -> tuple[list[dict], float]:
    """The matrices of an interrupted run that can be kept ([] when the plan changed or the
    recorded factors no longer hash the same)."""
    try:
        prog = json.loads(progress.read_text())
        if prog.get("plan") != plan:
            log.warning("not resuming %s: the model, targets, layers or device changed since it was started", partial)
            return [], 0.0
        done = prog["done"]
        if [e["name"] for e in done] != plan["names"][:len(done)]:
            return [], 0.0
        fd = os.open(partial, os.O_RDONLY)
        try:
            for e in done:
                for part in ("U", "S", "V"):
                    a, b = table[e["name"] + "." + part]["data_offsets"]
                    if _range_sha256(fd, 8 + reserve + a, 8 + reserve + b) != e["sha256"][part]:
                        log.warning("not resuming %s: the factors of %s do not match their checksum", partial, e["name"])
                        return [], 0.0
        finally:
            os.close(fd)
        return done, float(prog.get("elapsed_s", 0.0))
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("not resuming %s: unreadable progress (%s)", partial, e)
        return [], 0.0


def manifest_layers(layers) -> Any:
    return layers if isinstance(layers, (str, type(None))) else list(layers)


def manifest_path(out: str | os.PathLike) -> Path:
    p = Path(out)
    return p.with_name(p.name + ".manifest.json")


# --------------------------------------------------------------------------- load / validate

class _FactorStore:
    """Reads factors of a cache file on demand, through a descriptor kept open (so a cache
    rebuilt under the same name while this one is in use cannot mix two files)."""

    def __init__(self, path: Path, data_start: int, table: dict, device=None, dtype=None):
        self.path, self.data_start, self.table = path, data_start, table
        self.device, self.dtype = device, dtype
        self._file = open(path, "rb")

    def view(self, device=None, dtype=None) -> "_FactorStore":
        v = object.__new__(_FactorStore)
        v.path, v.data_start, v.table, v._file = self.path, self.data_start, self.table, self._file
        v.device, v.dtype = device if device is not None else self.device, dtype if dtype is not None else self.dtype
        return v

    def shape(self, key: str) -> list[int]:
        return self.table[key]["shape"]

    def read(self, key: str):
        e = self.table[key]
        t = _read_tensor(self._file.fileno(), self.data_start + e["data_offsets"][0], e["shape"], e["dtype"])
        return t if self.device is None and self.dtype is None else t.to(device=self.device, dtype=self.dtype)


class _LazyFactors(Mapping):
    """name -> factor tensor, read from the cache file on every access (nothing kept)."""

    def __init__(self, store: _FactorStore, names: Sequence[str], part: str):
        self._store, self._names, self._part = store, names, part
        self._set = frozenset(names)

    def __getitem__(self, name: str):
        if name not in self._set:
            raise KeyError(name)
        return self._store.read(name + self._part)

    def __contains__(self, name) -> bool:
        return name in self._set

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class SVDCache:
    """A validated cache: `names` (canonical order), `U`, `S`, `V` mappings and the `manifest`.

    A *streamed* cache (``load_svd(..., resident=False)``, the default on the CPU for caches over
    1 GiB) reads each `U`/`V` factor from the file on access (to the cache's device/dtype) and
    keeps nothing, so host memory stays O(one matrix) whatever the model size; `S` (r values per
    matrix) is always kept. A resident cache (the default on a GPU and for small caches) holds
    every factor on its device, read one at a time. Callers use ``usv(name)``, ``S[name]``, ``rank(name)``.
    """

    def __init__(self, path: Path | None, manifest: dict, U: Mapping, S: Mapping, V: Mapping):
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

    @property
    def streamed(self) -> bool:
        return isinstance(self.U, _LazyFactors)

    def to(self, device=None, dtype=None) -> "SVDCache":
        S = {k: v.to(device=device, dtype=dtype) for k, v in self.S.items()}
        if self.streamed:
            store = self.U._store.view(device, dtype)
            return SVDCache(self.path, self.manifest, _LazyFactors(store, self.names, ".U"), S,
                            _LazyFactors(store, self.names, ".V"))
        conv = lambda d: {k: v.to(device=device, dtype=dtype) for k, v in d.items()}  # noqa: E731
        return SVDCache(self.path, self.manifest, conv(self.U), S, conv(self.V))

    def resident(self) -> "SVDCache":
        """A copy holding every factor in memory (on this cache's device), read one at a time."""
        if not self.streamed:
            return self
        return SVDCache(self.path, self.manifest, {n: self.U[n] for n in self.names}, dict(self.S),
                        {n: self.V[n] for n in self.names})


def _corrupt(path: Path, why: str) -> CorruptArtifactError:
    return CorruptArtifactError(f"SVD cache {path} is corrupted ({why}); delete it or rerun "
                                "`t2eval decompose ... --force` to rebuild it")


_VERIFIED: set[tuple] = set()


def _verify_checksums(p: Path, fd: int, data_start: int, table: dict, manifest: dict) -> None:
    st = os.fstat(fd)
    key = (str(p.resolve()), st.st_ino, st.st_mtime_ns, st.st_size)
    if key in _VERIFIED:
        return
    for n in manifest["names"]:
        sha = manifest["matrices"][n].get("sha256") or {}
        for part in ("U", "S", "V"):
            if part not in sha:
                raise _corrupt(p, f"no checksum for {n}.{part} in the manifest (made by an older t2eval)")
            a, b = table[n + "." + part]["data_offsets"]
            if _range_sha256(fd, data_start + a, data_start + b) != sha[part]:
                raise _corrupt(p, f"{n}.{part} does not match its sha256 checksum")
    _VERIFIED.add(key)


def load_svd(path: str | os.PathLike, expect_model: str | os.PathLike | None = None,
             expect_targets: str | Sequence[str] | None = None, expect_layers: Any = None,
             device: str = "cpu", verify_weights: bool = True, dtype=None,
             resident: bool | None = None, expect_scope: str | None = None) -> SVDCache:
    """Open and validate a cache; factors are read on demand (see :class:`SVDCache`).

    `device`/`dtype`: where and as what the factors are returned (default fp32 on the CPU).
    `resident`: keep every factor in memory on `device` (read one matrix at a time, so host memory
    still peaks at one matrix when `device` is a GPU) instead of reading it from the file on every
    access. Default (None): resident on a non-CPU device, and on the CPU when the cache file is at
    most :func:`resident_max_bytes` (1 GiB; SmolLM2-135M's MLP cache is 0.4 GB), where re-reading
    every factor on each composition would cost time for no memory worth saving; streamed otherwise.

    Raises CorruptArtifactError (unreadable/truncated file, bad header or manifest, missing or
    mis-shaped keys, a factor whose sha256 differs from the manifest's checksum; every factor is
    hashed once per process, streaming) or StaleCacheError (built from another model — config,
    tensor shapes, or the content hash of the targeted tensors of `expect_model`: every byte with
    `verify_weights`, sampled windows without — or with other targets / layers / scope than expected;
    caches made before scopes existed count as scope "language").
    """
    import torch
    from safetensors import safe_open

    p = Path(path)
    if not p.exists():
        raise T2EvalError(f"SVD cache {p} not found: run `t2eval decompose --model MODEL --out {p}`")
    try:
        with safe_open(p, "pt", device="cpu") as h:  # the reference parser validates the file
            meta = h.metadata() or {}
            keys = set(h.keys())
        if meta.get("format") != FORMAT or "manifest" not in meta:
            raise _corrupt(p, f"not a {FORMAT} file (metadata format={meta.get('format')!r})")
        data_start, table, _ = _st_table(p)
        manifest = json.loads(meta["manifest"])
        names = manifest["names"]
        for n in names:
            for suf in (".U", ".S", ".V"):
                if n + suf not in keys:
                    raise _corrupt(p, f"missing tensor {n + suf}")
                if table[n + suf]["dtype"] != "F32":
                    raise _corrupt(p, f"{n + suf} is {table[n + suf]['dtype']}, not fp32")
            m, k = manifest["model"]["tensors"][n]["shape"]
            r = min(m, k)
            got = [table[n + s]["shape"] for s in (".U", ".S", ".V")]
            if got != [[m, r], [r], [k, r]]:
                raise _corrupt(p, f"{n}: factor shapes {got[0]}/{got[1]}/{got[2]} do not fit W {m}×{k}")
        store = _FactorStore(p, data_start, table)
        _verify_checksums(p, store._file.fileno(), data_start, table, manifest)
        S = {n: store.read(n + ".S") for n in names}
    except CorruptArtifactError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise _corrupt(p, f"{type(e).__name__}: {e}") from None
    for n in names:
        if not torch.isfinite(S[n]).all():  # pragma: no cover - the checksums were made from finite factors
            raise _corrupt(p, f"{n}.S is not finite")
    if expect_targets is not None:
        key, _ = normalise_targets(expect_targets)
        if key != manifest["targets"]:
            raise StaleCacheError(f"SVD cache {p} holds targets {manifest['targets']!r}, expected {key!r}")
    if expect_scope is not None and manifest.get("scope", "language") != expect_scope:
        raise StaleCacheError(f"SVD cache {p} was decomposed with scope {manifest.get('scope', 'language')!r}, "
                              f"expected {expect_scope!r}")
    if expect_layers is not None:
        want = select_layers(expect_layers, manifest["num_layers"])
        if want != manifest["layer_indices"]:
            raise StaleCacheError(f"SVD cache {p} covers layers {manifest['layers']!r}, expected {expect_layers!r}")
    cache = SVDCache(p, manifest, _LazyFactors(store, names, ".U"), S, _LazyFactors(store, names, ".V"))
    if expect_model is not None:
        check_svd_for_model(cache, expect_model, full=verify_weights)
    if device != "cpu" or dtype is not None:
        cache = cache.to(device, dtype)
    if resident is None:
        resident = str(device) != "cpu" or p.stat().st_size <= resident_max_bytes()
    if resident:
        cache = cache.resident()
    return cache


def resident_max_bytes() -> int:
    """Largest cache kept in host memory by default (env ``T2EVAL_SVD_RESIDENT_MAX_MB``, default 1024)."""
    v = os.environ.get("T2EVAL_SVD_RESIDENT_MAX_MB", "1024")
    try:
        return int(float(v) * 2**20)
    except ValueError:
        raise T2EvalError(f"T2EVAL_SVD_RESIDENT_MAX_MB={v!r} is not a number of megabytes") from None


def check_svd_for_model(svd_cache: "SVDCache | str | os.PathLike", model_dir: str | os.PathLike,
                        full: bool = False) -> None:
    """Raise StaleCacheError unless `svd_cache` (an SVDCache or a cache path) was decomposed from
    the weights of `model_dir` (a directory or a registry key).

    Checks the normalised config.json hash, that every decomposed tensor exists with the same
    shape and dtype, and its content hash recorded at decompose time: sampled 4 KiB windows
    (cheap, milliseconds even for 70B; tells apart any two models with the same shapes) or, with
    `full`, the sha256 of every byte (memoised per file in-process).
    """
    manifest = svd_cache.manifest if isinstance(svd_cache, SVDCache) else load_svd(svd_cache).manifest
    where = svd_cache.path if isinstance(svd_cache, SVDCache) else Path(svd_cache)
    md = Path(model_dir)
    if not (md / "config.json").exists():  # a registry key: resolve it like every other stage
        from .models.loading import resolve_model_dir

        md = Path(resolve_model_dir(str(model_dir)))
    have = manifest["model"]
    other = f"SVD cache {where} was decomposed from {have['dir']}, not from the model {md}"
    if config_sha256(md) != have["config_sha256"]:
        raise StaleCacheError(f"{other} (another config.json): decompose {md} or pass its own cache")
    names = manifest["names"]
    index = model_layout(md)["module_to_checkpoint"]
    missing = [n for n in names if n not in index]
    if missing:
        raise StaleCacheError(f"{other}: {md} lacks {missing[:3]}")
    now = tensor_hashes(md, names, full=full)
    field = "sha256" if full else "sample_sha256"
    diff = [n for n in names if [now[n]["shape"], now[n]["dtype"], now[n][field]]
            != [have["tensors"][n]["shape"], have["tensors"][n]["dtype"], have["tensors"][n].get(field)]]
    if diff:
        raise StaleCacheError(f"{other}: {len(diff)} target tensor(s) have other weights — changed since it was "
                              f"built or another model with the same shapes (e.g. {diff[0]}); decompose {md}")


def ensure_svd(model_dir: str | os.PathLike, targets: str | Sequence[str] = "mlp",
               out: str | os.PathLike | None = None, layers: Any = "all", force: bool = False,
               device: str = "cpu", verify_weights: bool = True, threads: int | None = None,
               scope: str = "language") -> SVDCache:
    """A valid cache for (model, targets, layers) at `out`: reused when valid, else (re)built.

    A stale or corrupted cache is never used silently: it is rebuilt with a logged warning. An
    interrupted decomposition into `out` is resumed (see :func:`decompose`).
    `out` defaults to ``svd/<model dir name>-<targets>.safetensors``.
    """
    d = Path(model_dir)
    key, _ = normalise_targets(targets)
    if out is None:
        suffix = "" if layers in (None, "all") else f"-{layers if isinstance(layers, str) else 'custom'}"
        if scope != "language":
            suffix += "-scope_" + ("all" if scope == "all" else scope.strip(".").replace(".", "_"))
        out = Path("svd") / f"{d.name}-{key.replace(':', '_').replace(',', '_')}{suffix}.safetensors"
    out = Path(out)
    if out.exists() and not force:
        try:
            return load_svd(out, expect_model=d, expect_targets=targets, expect_layers=layers,
                            device=device, verify_weights=verify_weights, expect_scope=scope)
        except (CorruptArtifactError, StaleCacheError) as e:
            log.warning("rebuilding the SVD cache: %s", e)
    decompose(d, targets, out, layers=layers, device=device, threads=threads, scope=scope)
    return load_svd(out, expect_targets=targets, device=device)
