"""`t2eval train-lora`: the LoRA baseline (PROTOCOL §4); resumable, best-validation adapter.

The options are the fields of `t2eval.train.configs.LoRATrainConfig` (defaults and help there)."""

from __future__ import annotations

import argparse

from .. import stage_config
from .configs import LoRATrainConfig

CONFIG = LoRATrainConfig  # the options (plan.stage_argv renders the workflow's commands through it)


def add_arguments(p: argparse.ArgumentParser) -> None:
    stage_config.add_arguments(p, LoRATrainConfig)


def run(args: argparse.Namespace) -> int:
    from .lora import train_lora
    from .loop import run_cli

    return run_cli(args, LoRATrainConfig, train_lora)
