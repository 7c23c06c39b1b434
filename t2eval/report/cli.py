"""Shared pieces of the report subcommands (`t2eval tables`, `t2eval figures`): their option dataclasses,
model selection/order and atomic text writes. The subcommands themselves live in `tables.py` and
`figures.py` (each exposes `add_arguments(parser)` + `run(args)`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..results import MODELS
from ..stage_config import add_arguments as add_config_arguments, opt


@dataclass
class ReportConfig:
    """Options shared by `t2eval tables` and `t2eval figures`."""

    raw: str = opt("results/raw", help="raw result cells: <raw>/<model>/<method>/<task>.json")
    models: list[str] | None = opt(None, nargs="+", help="models to show, in this order (default: every model that "
                                   "has cells; a model with no cells gets rows of missing values beside the "
                                   "published numbers)")
    published: str | None = opt(None, help="published numbers CSV (default: the repository's "
                                "results/published/paper_numbers.csv)")


@dataclass
class TablesConfig(ReportConfig):
    """Options of `t2eval tables`."""

    out: str = opt("results/tables", help="output directory")
    ci: str = opt("wilson", help="95%% interval: Wilson score or percentile bootstrap over per-sample outcomes",
                  choices=("wilson", "bootstrap"))


@dataclass
class FiguresConfig(ReportConfig):
    """Options of `t2eval figures`."""

    experts: str = opt("experts", help="experts directory (svf logs, fewshot alpha.json)")
    out: str = opt("results/figures", help="output directory")


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
