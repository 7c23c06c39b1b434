"""`t2eval prepare-model MODEL --out DIR`: build (embedded) or fetch (hub) a model directory."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import model_registry
from ..errors import T2EvalError
from ..stage_config import add_arguments as add_config_arguments, opt

log = logging.getLogger(__name__)


@dataclass
class PrepareModelConfig:
    """Options of `t2eval prepare-model` (the CLI is generated from these fields)."""

    model: str = opt(help="registry key (t2eval/resources/models.yaml) or a local HF directory", positional=True)
    out: str = opt(help="output directory (HF layout, safetensors)", required=True)
    dtype: str | None = opt(None, help="weight dtype to store (default: the registry's default_dtype)",
                            choices=("float32", "bfloat16", "float16"))
    seed: int = opt(0, help="seed of the random weights (tiny-llama, tiny-llava-next; smollm2-llava's vision tower)")
    force: bool = opt(False, help="rebuild even if --out already holds the model")


CONFIG = PrepareModelConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, PrepareModelConfig)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    reg = model_registry()
    t0 = time.perf_counter()
    meta_f = out / "t2eval_model.json"
    if meta_f.exists() and (out / "config.json").exists() and not args.force:
        meta = json.loads(meta_f.read_text())
        if meta.get("key") == args.model and (args.dtype is None or meta.get("dtype") == args.dtype):
            log.info("%s already prepared in %s (use --force to rebuild)", args.model, out)
            return 0
    from .llava import BUILDERS as LLAVA_BUILDERS

    if args.model in reg and reg[args.model].builder in LLAVA_BUILDERS:
        LLAVA_BUILDERS[reg[args.model].builder](out, seed=args.seed, dtype=args.dtype or reg[args.model].default_dtype)
    elif args.model in reg and reg[args.model].builder == "tiny_llama":
        from .tiny import build_tiny_llama

        build_tiny_llama(out, seed=args.seed, dtype=args.dtype or reg[args.model].default_dtype)
    elif args.model in reg and reg[args.model].source == "embedded":
        from .embedded import build_smollm2

        build_smollm2(out, dtype=args.dtype or reg[args.model].default_dtype)
    elif args.model in reg:
        from .hub import fetch

        spec = reg[args.model]
        fetch(spec.hub_id, args.model, out=out)
        meta_f.write_text(json.dumps({"key": args.model, "hub_id": spec.hub_id, "dtype": args.dtype or "as-published"}))
    else:
        src = Path(args.model)
        if not (src / "config.json").exists():
            raise T2EvalError(f"{args.model!r} is neither a registry key ({', '.join(sorted(reg))}) nor a local HF directory")
        if src.resolve() != out.resolve():
            shutil.copytree(src, out, dirs_exist_ok=True)
        if not meta_f.exists():
            meta_f.write_text(json.dumps({"key": src.name, "source": str(src.resolve())}))
    log.info("prepared %s in %s (%.1f s)", args.model, out, time.perf_counter() - t0)
    print(out)
    return 0
