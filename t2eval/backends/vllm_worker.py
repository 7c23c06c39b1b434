"""Worker-side half of the vLLM backend: SVF weight swaps inside vLLM's worker processes.

vLLM (0.32, CPU and CUDA) runs the model in a separate worker process. Tensors passed as
``collective_rpc`` arguments do not survive the trip (the generic msgpack decoder turns them into
lists), so everything here travels as **safetensors bytes** and is decoded in the worker.

Two ways to change the weights, both ending in ``worker.reload_weights(weights_iterator=...,
is_checkpoint_format=True)``, which re-runs vLLM's own loading + post-processing (on CPU the
linear weights are repacked, so copying into parameters in place is not possible):

* ``reload_file(worker, path)`` / ``reload_blob(worker, blob)`` — the driver composed W′ itself and
  hands the matrices over as a safetensors file (in /dev/shm) or as bytes through the RPC;
* ``set_scales(worker, blob | None)`` — the worker holds U, σ, V (``load_svd`` once) and the
  original weights of the touched matrices, and composes W′ = U diag(σ ⊙ s) Vᵀ itself with
  :func:`t2eval.svf.compose`; only the scale vectors s cross the process boundary. ``None``
  reloads the original checkpoint tensors, so the base outputs come back exactly.

Merged layers: vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``; a fused layer
is only re-processed once *all* its shards are loaded, so every reload also sends the untouched
sibling shards (their checkpoint tensors). Other layers are not sent at all: vLLM keeps the
weights of layers that received nothing (measured: reloading the 90 MLP matrices of SmolLM2-135M is
enough, see benchmarks/bench_swap.py).

Names: SVD caches and scale files are keyed by *module names in memory* (what
`t2eval.svd`/`t2eval.svf` use; LLaVA-NeXT in transformers 5: ``model.language_model.layers.N...``),
while the checkpoint stores ``language_model.model.layers.N...`` and ``reload_weights(
is_checkpoint_format=True)`` takes stored names (the names vLLM loaded at start). `checkpoint_names`
maps one to the other (`svd.model_layout`'s ``module_to_checkpoint``; identity for text models):
checkpoint tensors are read, siblings derived and reloads sent under stored names, while the
worker state (factors, scales, what is patched) stays keyed by module names.

Every function takes the vLLM worker as first argument, so it can be sent as a callable
(``llm.collective_rpc(fn, args=...)``, needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` in the
engine's environment) or used through :class:`SVFWorkerExtension`
(``LLM(worker_extension_cls=EXTENSION)``, then ``collective_rpc("t2_svf_set_scales", ...)``),
which needs no pickling at all.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Iterator, Mapping

EXTENSION = "t2eval.backends.vllm_worker.SVFWorkerExtension"
_STATE_ATTR = "_t2eval_svf_state"

# vLLM's fused modules in Llama/Mistral/Qwen-style models (used when the model does not say).
DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


# --------------------------------------------------------------------------- bytes <-> tensors

def pack_tensors(tensors: Mapping[str, "object"] | None) -> bytes | None:
    """{name: tensor} -> safetensors bytes (None stays None)."""
    if tensors is None:
        return None
    from safetensors.torch import save

    return save({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()})


def unpack_tensors(blob: bytes | None) -> dict | None:
    if blob is None:
        return None
    from safetensors.torch import load

    return load(bytes(blob))


# --------------------------------------------------------------------------- names

def sibling_names(names: Iterable[str], packed: Mapping[str, list[str]] | None = None) -> list[str]:
    """Checkpoint names of the other shards of the fused layers that `names` touch (not in `names`)."""
    packed = packed or DEFAULT_PACKED
    want = set(names)
    out: set[str] = set()
    for n in want:
        stem, _, leaf = n.rpartition(".")  # "...mlp.gate_proj", "weight"
        prefix, _, mod = stem.rpartition(".")
        for shards in packed.values():
            if mod in shards:
                out.update(f"{prefix}.{s}.{leaf}" for s in shards)
    return sorted(out - want)


def checkpoint_names(model_dir: str | Path, names: Iterable[str]) -> dict[str, str]:
    """{module name: stored (checkpoint) name} for the module names `names` of `model_dir`
    (`svd.model_layout`; identity for text models)."""
    from ..errors import T2EvalError
    from ..svd import model_layout

    to_ckpt = model_layout(model_dir)["module_to_checkpoint"]
    names = list(names)
    missing = [n for n in names if n not in to_ckpt]
    if missing:
        raise T2EvalError(f"{model_dir} has no tensor(s) {missing[:3]}: the SVD cache or scales were made "
                          "for another model")
    return {n: to_ckpt[n] for n in names}


def reload_names(touched: Iterable[str], to_ckpt: Mapping[str, str],
                 packed: Mapping[str, list[str]] | None = None) -> list[tuple[str, str | None]]:
    """What one reload sends, in reload order: (stored name, module name) for each touched module,
    (stored name, None) for each untouched fused sibling shard (stored form)."""
    stored = {to_ckpt[n]: n for n in touched}
    sib = sibling_names(stored, packed)
    return [(s, stored.get(s)) for s in reload_order(set(stored) | set(sib))]


def base_tensors(model_dir: str | Path, names: Iterable[str], packed: Mapping[str, list[str]] | None = None
                 ) -> tuple[dict[str, str], list[str], dict]:
    """What a swapper keeps to restore the base exactly: ({module name: stored name}, the stored names of
    the untouched fused sibling shards, the checkpoint tensors of both keyed by stored names)."""
    to_ckpt = checkpoint_names(model_dir, names)
    stored = list(to_ckpt.values())
    sib = sibling_names(stored, packed)
    return to_ckpt, sib, read_checkpoint(model_dir, stored + sib)


def reload_order(names: Iterable[str]) -> list[str]:
    """Layer by layer (numbers compared as numbers), so fused layers complete one after another."""
    from ..svd import ordered_names

    return ordered_names(names)


def read_checkpoint(model_dir: str | Path, names: Iterable[str]) -> dict:
    """The stored tensors `names` of an HF safetensors model directory (no model load)."""
    from safetensors import safe_open

    from ..errors import T2EvalError
    from ..svd import _weight_index

    index = _weight_index(Path(model_dir))
    names = list(names)
    missing = [n for n in names if n not in index]
    if missing:
        raise T2EvalError(f"{model_dir} has no tensor(s) {missing[:3]}: the SVD cache or scales were made "
                          "for another model")
    out = {}
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(index[n], []).append(n)
    for f, ns in by_file.items():
        with safe_open(f, "pt") as h:
            for n in ns:
                out[n] = h.get_tensor(n)
    return out


# --------------------------------------------------------------------------- worker helpers

def _model(worker):
    return worker.model_runner.get_model()


def packed_modules(worker) -> dict:
    """The fused-module mapping of the worker's model (e.g. {"gate_up_proj": ["gate_proj", "up_proj"]})."""
    m = _model(worker)
    return {k: list(v) for k, v in (getattr(m, "packed_modules_mapping", None) or DEFAULT_PACKED).items()}


def _reload(worker, weights: Iterator) -> float:
    t0 = time.perf_counter()
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    return time.perf_counter() - t0


def reload_blob(worker, blob: bytes) -> float:
    """Driver-composed mode: load the (name, tensor) pairs of a safetensors blob in place."""
    t0 = time.perf_counter()
    tensors = unpack_tensors(blob)
    _reload(worker, ((n, tensors[n]) for n in reload_order(tensors)))
    return time.perf_counter() - t0


def reload_file(worker, path: str) -> float:
    """Driver-composed mode through a shared file (a safetensors file the driver wrote, normally in
    /dev/shm): much faster than pushing hundreds of MB through the RPC socket."""
    from safetensors import safe_open

    t0 = time.perf_counter()
    with safe_open(path, "pt") as h:
        _reload(worker, ((n, h.get_tensor(n)) for n in reload_order(h.keys())))
    return time.perf_counter() - t0


def load_svd(worker, svd_path: str, model_dir: str | None = None) -> dict:
    """Load U, σ, V of `svd_path` into the worker (on its device) plus the original checkpoint
    tensors of the targets and their fused siblings (kept on CPU, to restore the base exactly).
    Idempotent for the same path. Returns a summary."""
    import torch

    from ..svd import load_svd as _load_svd

    st = getattr(worker, _STATE_ATTR, None)
    if st is not None and st["svd_path"] == str(svd_path):
        return st["summary"]
    t0 = time.perf_counter()
    mdir = model_dir or worker.vllm_config.model_config.model
    device = getattr(worker.model_runner, "device", torch.device("cpu"))
    cache = _load_svd(svd_path, device="cpu", verify_weights=False)
    names = list(cache.names)  # module names
    to_ckpt, sib, base = base_tensors(mdir, names, packed_modules(worker))
    factors = {n: tuple(t.to(device) for t in cache.usv(n)) for n in names}
    dtype = worker.vllm_config.model_config.dtype
    summary = {"svd_path": str(svd_path), "model_dir": str(mdir), "n_matrices": len(names),
               "n_siblings": len(sib), "device": str(device), "dtype": str(dtype),
               "factor_bytes": sum(t.numel() * t.element_size() for f in factors.values() for t in f),
               "load_s": time.perf_counter() - t0}
    setattr(worker, _STATE_ATTR, {"svd_path": str(svd_path), "names": names, "siblings": sib,
                                  "to_ckpt": to_ckpt, "factors": factors, "base": base, "dtype": dtype,
                                  "patched": set(), "summary": summary})
    return summary


def set_scales(worker, blob: bytes | None) -> float:
    """Worker-composed mode: W′ = U diag(σ ⊙ s) Vᵀ for every matrix in the scales blob (keyed by
    module names), the original tensor for every matrix patched before but absent now (and for all
    of them when `blob` is None), plus fused siblings; then reload in place under the stored names.
    Returns seconds spent."""
    from ..errors import T2EvalError
    from ..svf import compose

    t0 = time.perf_counter()
    st = getattr(worker, _STATE_ATTR, None)
    if st is None:
        raise T2EvalError("set_scales before load_svd: load the SVD cache into the vLLM workers first")
    scales = unpack_tensors(blob) or {}
    unknown = [n for n in scales if n not in st["factors"]]
    if unknown:
        raise T2EvalError(f"no SVD factors for {unknown[:3]} in {st['svd_path']}: the scales were made "
                          "with another SVD cache (targets/layers)")
    touched = set(scales) | st["patched"]
    if blob is None:
        touched = set(st["patched"])
    if not touched:
        return time.perf_counter() - t0
    plan = reload_names(touched, st["to_ckpt"], packed_modules(worker))
    dtype = st["dtype"]

    def weights():
        for stored, n in plan:
            if n in scales:
                U, S, V = st["factors"][n]
                yield stored, compose(U, S, V, scales[n].to(S.device), dtype)
            else:
                yield stored, st["base"][stored]

    _reload(worker, weights())
    st["patched"] = set(scales)
    return time.perf_counter() - t0


def state_summary(worker) -> dict | None:
    st = getattr(worker, _STATE_ATTR, None)
    return None if st is None else {**st["summary"], "patched": len(st["patched"])}


class SVFWorkerExtension:
    """Mixed into vLLM's worker class (``LLM(worker_extension_cls=EXTENSION)``): the functions
    above as worker methods, callable by name through ``collective_rpc`` without pickling."""

    def t2_svf_load(self, svd_path: str, model_dir: str | None = None) -> dict:
        return load_svd(self, svd_path, model_dir)

    def t2_svf_set_scales(self, blob: bytes | None) -> float:
        return set_scales(self, blob)

    def t2_reload_blob(self, blob: bytes) -> float:
        return reload_blob(self, blob)

    def t2_reload_file(self, path: str) -> float:
        return reload_file(self, path)

    def t2_packed_modules(self) -> dict:
        return packed_modules(self)

    def t2_svf_state(self) -> dict | None:
        return state_summary(self)
