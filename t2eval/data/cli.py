"""`t2eval prepare-data`: materialise every dataset split as canonical JSONL + data/manifest.json."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from ..stage_config import add_arguments as add_config_arguments, opt


@dataclass
class PrepareDataConfig:
    """Options of `t2eval prepare-data` (the CLI is generated from these fields)."""

    mirror: str | None = opt(None, help="local dataset mirror directory (default: $T2EVAL_DATA_MIRROR, then the "
                             "config's `mirror:`, then the Hugging Face hub / evalplus downloads)")
    out: str | None = opt(None, help="output data directory (default: $T2EVAL_DATA_DIR or data/)")
    datasets: str | None = opt(None, help="comma-separated subset (default: all the LLM datasets): gsm8k,arc_easy,"
                               "arc_challenge,math,humaneval,humanevalplus,mbppplus,mbpp; the VQA datasets only when "
                               "named: textvqa,okvqa (hub parquet layout in the mirror),synth_textvqa (generated)")
    force: bool = opt(False, help="rewrite files even when they match the manifest")
    config: str | None = opt(None, help="YAML config; its `mirror:` (or `data: {mirror:}`) is used when neither "
                             "--mirror nor $T2EVAL_DATA_MIRROR is set")
    mbppplus_version: str | None = opt(None, help="MBPP+ release to use when several are available, e.g. v0.1.0 "
                                       "(399) or v0.2.0 (378)")
    humanevalplus_version: str | None = opt(None, help="HumanEval+ release, e.g. v0.1.10")
    synth_textvqa_sizes: str | None = opt(None, help="rows of the generated synth_textvqa splits "
                                          "(default train=2000,valid=200,test=500)")
    synth_textvqa_seed: int = opt(0, help="seed of the synth_textvqa generator")


CONFIG = PrepareDataConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, PrepareDataConfig)


def _config_mirror(path: str | None) -> str | None:
    if not path:
        return None
    from ..config import load_yaml

    cfg = load_yaml(path) or {}
    if not isinstance(cfg, dict):
        return None
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    return cfg.get("mirror") or data.get("mirror")


def run(args: argparse.Namespace) -> int:
    from ..config import default_data_dir
    from .datasets import SPECS, prepare_data

    out = args.out or default_data_dir()
    names = [n.strip() for n in args.datasets.split(",") if n.strip()] if args.datasets else None
    t0 = time.perf_counter()
    man = prepare_data(out, mirror=args.mirror, datasets=names, force=args.force,
                       config_mirror=_config_mirror(args.config), mbppplus_version=args.mbppplus_version,
                       humanevalplus_version=args.humanevalplus_version,
                       synth_textvqa_sizes=args.synth_textvqa_sizes, synth_textvqa_seed=args.synth_textvqa_seed)
    dt = time.perf_counter() - t0
    for name in names or SPECS:  # the default run: the LLM datasets
        for split, e in man["datasets"].get(name, {}).items():
            ver = f" {e['version']}" if e.get("version") and not str(e["version"]).startswith("sha256:") else ""
            print(f"{name:>14}/{split:<10} {e['rows']:>6} rows  {e['path']}{ver}")
    print(f"prepare-data: {out}/manifest.json ({dt:.1f}s)")
    return 0
