"""`t2eval decompose --model DIR --targets mlp --out svd/x.safetensors [--layers all|half] [--force]`.

Thin fp32 SVD of the SVF target matrices into a validated cache (see t2eval/svd.py). A valid
cache at --out is reused; a stale or corrupted one is rebuilt with a warning.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from .stage_config import add_arguments as add_config_arguments, opt

log = logging.getLogger(__name__)


@dataclass
class DecomposeConfig:
    """Options of `t2eval decompose` (the CLI is generated from these fields)."""

    model: str = opt(help="registry key or local HF directory (safetensors weights)", required=True)
    targets: str = opt("mlp", help="mlp (gate/up/down_proj), attn (q_proj+v_proj), mlp+attn, "
                       "or comma-separated module-name suffixes")
    out: str | None = opt(None, help="cache file (default: svd/<model>-<targets>.safetensors)")
    layers: str | None = opt(None, help="all | half (upper half: layers L//2..L-1) | half-lower | even | odd | "
                             "'0-15,20' (default: the model registry's svf_layers, else all)")
    scope: str = opt("language", help="which part of a vision-language model is decomposed: language (its language "
                     "model; never a vision-tower matrix) | all | a module-name prefix")
    device: str = opt("cpu", help="device for the SVD (cpu, cuda); results are stored in fp32")
    threads: int | None = opt(None, help="torch CPU threads for the SVD (default: torch's; 1 is fastest on a "
                              "busy machine)")
    force: bool = opt(False, help="rebuild even if a valid cache exists")
    verify_weights: bool = opt(True, help="--no-verify-weights: when reusing a cache, skip re-hashing the "
                               "target tensors (config and shapes are still checked)")


CONFIG = DecomposeConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, DecomposeConfig)


def run(args: argparse.Namespace) -> int:
    from .config import model_spec
    from .models.loading import resolve_model_dir
    from .svd import ensure_svd, normalise_targets

    model_dir = resolve_model_dir(args.model)
    layers = args.layers
    if layers is None:
        try:
            layers = model_spec(args.model).svf_layers or "all"
        except Exception:  # a bare directory without registry entry
            layers = "all"
    key, _ = normalise_targets(args.targets)
    out = args.out
    if out is None:
        name = args.model if not Path(args.model).exists() else Path(model_dir).name
        tag = key.replace(":", "_").replace(",", "_") + ("" if layers == "all" else f"-{layers}")
        out = Path("svd") / f"{name}-{tag}.safetensors"
    cache = ensure_svd(model_dir, args.targets, out, layers=layers, scope=args.scope, force=args.force, device=args.device,
                       verify_weights=args.verify_weights, threads=args.threads)
    m = cache.manifest
    print(f"{out}: {len(cache)} matrices ({m['targets']}, layers {m['layers']}), "
          f"{m['n_params_svf']} SVF values, max rel err {m['max_rel_err']:.2e}, built in {m['seconds']:.1f} s")
    return 0
