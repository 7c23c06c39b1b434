"""`t2eval train-svf`: train one SVF expert vector with REINFORCE (PROTOCOL §3); resumable.

The options are the fields of `t2eval.train.configs.SVFTrainConfig` (defaults and help there)."""

from __future__ import annotations

import argparse

from .. import stage_config
from .configs import SVFTrainConfig

CONFIG = SVFTrainConfig  # the options (plan.stage_argv renders the workflow's commands through it)


def add_arguments(p: argparse.ArgumentParser) -> None:
    stage_config.add_arguments(p, SVFTrainConfig)


def run(args: argparse.Namespace) -> int:
    from .reinforce import train_svf
    from .loop import run_cli

    return run_cli(args, SVFTrainConfig, train_svf)
