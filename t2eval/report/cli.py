"""Shared pieces of the report subcommands (`t2eval tables`, `t2eval figures`): common arguments,
model selection/order and atomic text writes. The subcommands themselves live in `tables.py` and
`figures.py` (each exposes `add_arguments(parser)` + `run(args)`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..results import MODELS


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw", default="results/raw", help="raw result cells: <raw>/<model>/<method>/<task>.json")
    p.add_argument("--models", nargs="+", default=None,
                   help="models to show, in this order (default: every model that has cells; a model with no "
                        "cells gets rows of missing values beside the published numbers)")
    p.add_argument("--published", default=None,
                   help="published numbers CSV (default: results/published/paper_numbers.csv)")


def select_models(cells: Iterable[Mapping[str, Any]], models: Sequence[str] | None = None) -> list[str]:
    """The explicit list if given, else the models with cells: the paper's models first, then the rest sorted."""
    if models:
        return list(dict.fromkeys(models))
    have = {c["model"] for c in cells}
    return [m for m in MODELS if m in have] + sorted(have - set(MODELS))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, p)
    return p
