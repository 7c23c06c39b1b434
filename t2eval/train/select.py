"""`t2eval select-expert`: pick the best of several trained SVF experts by validation score.

The paper sweeps the KL coefficient λ ∈ {0, 0.1, 0.2, 0.3} and keeps, per task, the run whose best
validation score is highest (PROTOCOL §3). Each candidate is a train-svf output directory
(`z.safetensors` = its best-validation checkpoint, `log.jsonl` with `split_scores.valid`). The winner's
files are copied to `--out`, with `selection.json` recording every candidate's score.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .. import stage_config
from ..errors import T2EvalError
from .configs import SelectConfig

CONFIG = SelectConfig  # the options (plan.stage_argv renders the workflow's commands through it)


def best_valid(run_dir: Path) -> float:
    log = run_dir / "log.jsonl"
    if not log.exists():
        raise T2EvalError(f"{log} is missing: is {run_dir} a finished `t2eval train-svf` output?")
    from ..data.datasets import read_jsonl_rows

    scores = [float(v) for _, row in read_jsonl_rows(log)
              if (v := (row.get("split_scores") or {}).get("valid")) is not None]
    if not scores:
        raise T2EvalError(f"{log} has no validation score (split_scores.valid): train with valid in --eval-splits")
    return max(scores)


def select(candidates: list[Path], out: Path) -> dict:
    scored = [(best_valid(c), i, c) for i, c in enumerate(candidates)]
    best = max(scored, key=lambda t: (t[0], -t[1]))  # ties: the first candidate (smallest λ as listed)
    out.mkdir(parents=True, exist_ok=True)
    for f in best[2].iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    record = {"selected": str(best[2]), "valid": best[0],
              "candidates": [{"dir": str(c), "valid": v} for v, _, c in scored]}
    (out / "selection.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def add_arguments(p: argparse.ArgumentParser) -> None:
    stage_config.add_arguments(p, SelectConfig)


def run(args: argparse.Namespace) -> int:
    cfg = stage_config.from_args(SelectConfig, args, candidates=tuple(args.candidates))
    rec = select([Path(c) for c in cfg.candidates], Path(cfg.out))
    print(json.dumps(rec))
    return 0
