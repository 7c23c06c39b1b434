"""`t2eval plan --resources --configfile C`: per stage and model, the estimated peak GPU memory, host memory
and disk, from the model's shape (its config.json, else the known shapes of the registry's hub models) and
the stage's settings in the workflow config. The workflow uses `mem_mb()` for each rule's `resources:`
where the config does not set mem_mb (workflow/rules/common.smk `res()`).

The estimates are sums of what a stage holds at its peak (no fudge factor beyond the measured runtime
baselines below):
- weights: parameter count x bytes of the dtype;
- SVD cache: sum over the target matrices (m x n, r = min(m, n)) of (m*r + r + r*n) * 4 bytes (fp32 file);
- an expert: one fp32 value per singular value (sum of r over the targets);
- KV cache: 2 * layers * kv_heads * head_dim * (prompt + new tokens) * batch * dtype bytes;
- logits: generation keeps the last position's (batch * vocab * 4 bytes, and its softmax); the
  policy-gradient loss scores every position in fp32 (micro_batch * sequence * vocab * 4, twice with KL);
- training activations: micro_batch * sequence * layers * 34 * hidden * dtype bytes (the usual
  transformer-layer activation count without recomputation, Korthikanti et al. 2022);
- runtime baseline: the measured peak RSS of the process before the model matters (Python, torch,
  transformers; plus lm-eval and datasets for the stages that use them).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import T2EvalError

MB = 1024 * 1024
GB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# peak RSS (MiB) of the stage's process on the tiny model (torch 2.13 CPU, transformers 5): measured for
# decompose (238: torch + safetensors) and evaluate (693: + transformers, lm-eval, datasets); prepare, train
# and fewshot (not measured) are set above evaluate's
BASE_RSS_MB = {"prepare": 700, "decompose": 225, "train": 900, "fewshot": 900, "evaluate": 680}
# a CUDA context and the caching allocator's slack on a GPU
CUDA_OVERHEAD_MB = 1500
# prompt tokens assumed per document for the paper tasks (few-shot/chat prompts of GSM8K/MATH/ARC/MBPP)
PROMPT_TOKENS = 1024
STAGES = ("prepare", "decompose", "train", "fewshot", "evaluate")


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c: Mapping[str, Any]) -> "Shape":
        c = c.get("text_config", c)
        try:
            heads = c["num_attention_heads"]
            return cls(layers=c["num_hidden_layers"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
                       heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                       head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
                       tied=bool(c.get("tie_word_embeddings", False)))
        except KeyError as e:
            raise T2EvalError(f"model config.json lacks {e}: cannot size a Llama-style model from it") from None

    def params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    def matrices(self, targets: str) -> list[tuple[int, int]]:
        """(out, in) of the SVF target matrices of one layer."""
        out: list[tuple[int, int]] = []
        parts = targets.split("+")
        if not set(parts) <= {"mlp", "attn"}:
            raise T2EvalError(f"targets {targets!r}: expected mlp, attn or mlp+attn")
        if "mlp" in parts:
            out += [(self.intermediate, self.hidden)] * 2 + [(self.hidden, self.intermediate)]
        if "attn" in parts:
            out += [(self.heads * self.head_dim, self.hidden), (self.kv_heads * self.head_dim, self.hidden)]
        return out

    def svf_layers(self, layers: str) -> int:
        if layers == "all":
            return self.layers
        if layers in ("half", "half-lower"):
            return self.layers - self.layers // 2 if layers == "half" else self.layers // 2
        raise T2EvalError(f"svd layers {layers!r}: the plan sizes 'all' or 'half'")

    def svd_bytes(self, targets: str, layers: str) -> int:
        per_layer = sum((m * min(m, n) + min(m, n) + min(m, n) * n) * 4 for m, n in self.matrices(targets))
        return per_layer * self.svf_layers(layers)

    def expert_bytes(self, targets: str, layers: str) -> int:
        return sum(min(m, n) for m, n in self.matrices(targets)) * self.svf_layers(layers) * 4

    def kv_bytes(self, tokens: int, batch: int, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * tokens * batch * dtype_bytes


# Hub models not downloaded: PROTOCOL.md §1 (layers, MLP shapes) and the models' published config.json
# (attention heads, vocabulary). The embedded models are listed too so a plan works before prepare-model.
KNOWN_SHAPES: dict[str, Shape] = {
    "llama3-8b": Shape(32, 4096, 14336, 32, 8, 128, 128256, False),
    "mistral-7b": Shape(32, 4096, 14336, 32, 8, 128, 32768, False),
    "llama3-70b": Shape(80, 8192, 28672, 64, 8, 128, 128256, False),
    "smollm2-135m": Shape(30, 576, 1536, 9, 3, 64, 49152, True),
    "tiny-llama": Shape(2, 64, 128, 4, 2, 16, 49152, True),
    # vision-language models: their language model (the vision tower and projector are not sized: CLIP
    # ViT-L/14-336 is 0.3B parameters beside Llama-3-8B's 8B; the embedded ones' towers are tiny)
    "llava-next-8b": Shape(32, 4096, 14336, 32, 8, 128, 128320, False),
    "smollm2-llava": Shape(30, 576, 1536, 9, 3, 64, 49153, True),
    "tiny-llava-next": Shape(2, 64, 128, 4, 2, 16, 49153, True),
}
# bytes per weight of the files prepare-model writes (hub models keep their bf16 safetensors)
DISK_DTYPE = {"smollm2-135m": "float32", "tiny-llama": "float32", "smollm2-llava": "float32",
              "tiny-llava-next": "float32"}


def model_shape(model: str, path: str | Path | None = None) -> Shape:
    """The model's config.json (given directory, else models/<model>), else the known shapes."""
    for d in [p for p in (path, Path("models") / model, model) if p]:
        f = Path(d) / "config.json"
        if f.is_file():
            return Shape.from_config(json.loads(f.read_text()))
    if model in KNOWN_SHAPES:
        return KNOWN_SHAPES[model]
    raise T2EvalError(f"model {model!r}: no config.json under models/{model} and no known shape; run "
                      f"`t2eval prepare-model --model {model}` first or add it to resources_plan.KNOWN_SHAPES")


@dataclass
class Estimate:
    stage: str
    model: str
    gpus: int
    gpu_mb: float
    host_mb: float
    disk_mb: float


def _gen(cfg: Mapping[str, Any], section: str, default_new: int) -> tuple[int, int]:
    s = cfg.get(section, {})
    new = s.get("max_new_tokens") or default_new
    batch = s.get("batch_size", 1)
    batch = batch if isinstance(batch, int) else 8  # 'auto': lm-eval's first try
    return PROMPT_TOKENS + new, batch


def estimate(cfg: Mapping[str, Any], stage: str, model: str, *, targets: str | None = None, method: str | None = None,
             shape: Shape | None = None, gpu_memory_gb: float = 80.0) -> Estimate:
    """Peak memory and disk of one job of `stage` for `model` under the workflow config `cfg`; for evaluate,
    `method` base/lora holds no SVD (default: the heaviest, a two-pass SVF method with three experts)."""
    if stage not in STAGES:
        raise T2EvalError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    over = cfg.get("models_overrides", {}).get(model, {})
    shape = shape or model_shape(model, cfg.get("model_paths", {}).get(model))
    dtype = over.get("dtype", cfg.get("dtype", "bfloat16"))
    db = DTYPE_BYTES[dtype]
    targets = targets or cfg.get("svd", {}).get("targets", "mlp")
    layers = over.get("svd_layers", cfg.get("svd", {}).get("layers", "all"))
    if layers == "all" and model == "llama3-70b":
        layers = "half"  # PROTOCOL §1 (the registry's svf_layers)
    weights = shape.params() * db
    disk_weights = shape.params() * DTYPE_BYTES[DISK_DTYPE.get(model, "bfloat16")]
    svd = shape.svd_bytes(targets, layers)
    svd_dtype = svd // 4 * db  # held in the run's dtype after loading
    expert = shape.expert_bytes(targets, layers)
    base = BASE_RSS_MB[stage] * MB
    on_gpu = cfg.get("device", "cpu") != "cpu"
    gpu = 0.0
    if stage == "prepare":
        host, disk = base + weights, disk_weights
    elif stage == "decompose":
        host, disk = base + svd, svd
    else:
        if stage == "train":
            s = cfg.get("train_svf", {})
            seq = PROMPT_TOKENS + (s.get("max_new_tokens") or 512)
            mb = s.get("micro_batch") or s.get("batch_size", 1)
            work = (shape.kv_bytes(seq, mb, db) + mb * seq * shape.layers * 34 * shape.hidden * db
                    + 2 * mb * seq * shape.vocab * 4 * (2 if s.get("kl_coef") else 1))
            held = weights + svd_dtype + 3 * expert  # z, its gradient, Adam's two moments
            disk = expert * max(1, (s.get("iterations", 1) // max(1, s.get("eval_every", 1))))
        elif stage == "fewshot":
            seq, batch = _gen(cfg, "fewshot", 512)
            work = shape.kv_bytes(seq, batch, db) + 2 * batch * shape.vocab * 4  # last-position logits + softmax
            held = weights + svd_dtype + 3 * expert
            disk = expert
        else:  # evaluate: the heaviest method (two-pass SVF with three experts) sets the request
            seq, batch = _gen(cfg, "evaluate", 512)
            work = shape.kv_bytes(seq, batch, db) + 2 * batch * shape.vocab * 4
            held = weights + (0 if method in ("base", "lora") else svd_dtype + 3 * expert)
            disk = 0
        if on_gpu:
            gpu = held + work + CUDA_OVERHEAD_MB * MB
            host = base + weights  # weights pass through host memory while loading
        else:
            host = base + held + work
    gpus = 0
    if on_gpu and stage not in ("prepare", "decompose"):
        gpus = max(1, math.ceil(gpu / (gpu_memory_gb * GB)))
    return Estimate(stage, model, gpus, gpu / MB, host / MB, disk / MB)


def mem_mb(cfg: Mapping[str, Any], stage: str, model: str | None, targets: str | None = None) -> int:
    """A rule's mem_mb request: the host estimate plus 25%, rounded up to 100 MB (at least 1000)."""
    if model is None:
        return 8000
    est = estimate(cfg, stage, model, targets=targets)
    return max(1000, int(math.ceil(est.host_mb * 1.25 / 100.0)) * 100)


def plan(cfg: Mapping[str, Any], gpu_memory_gb: float = 80.0) -> list[Estimate]:
    return [estimate(cfg, s, m, gpu_memory_gb=gpu_memory_gb) for m in cfg["models"] for s in STAGES]


def _fmt_gb(mb: float) -> str:
    if mb == 0:
        return "-"
    return f"{mb / 1024:.1f}" if mb >= 1024 else f"{mb / 1024:.2f}" if mb >= 10 else "<0.01"


def table(rows: list[Estimate]) -> str:
    lines = ["| model | stage | GPUs | GPU mem (GiB) | host mem (GiB) | disk (GiB) |", "|---|---|---|---|---|---|"]
    lines += [f"| {e.model} | {e.stage} | {e.gpus} | {_fmt_gb(e.gpu_mb)} | {_fmt_gb(e.host_mb)} | {_fmt_gb(e.disk_mb)} |"
              for e in rows]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resources", action="store_true", required=True,
                   help="print per stage and model the estimated GPU count, peak GPU/host memory and disk")
    p.add_argument("--configfile", required=True, help="workflow config (e.g. workflow/config/paper.yaml)")
    p.add_argument("--models", nargs="+", help="size these models instead of the config's `models`")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU (default: 80)")


def run(args: argparse.Namespace) -> int:
    import yaml

    from .workflow_config import load

    path = Path(args.configfile)
    if not path.is_file():
        raise T2EvalError(f"--configfile {path}: no such file")
    cfg = dict(load(yaml.safe_load(path.read_text()) or {}, source=str(path)))
    if args.models:
        cfg["models"] = list(args.models)
    print(table(plan(cfg, gpu_memory_gb=args.gpu_memory_gb)))
    return 0
