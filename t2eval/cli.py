"""The `t2eval` command: one subcommand per pipeline stage.

Each subcommand lives in a module exposing `add_arguments(parser)` and `run(args) -> int | None`;
the module is imported only when its subcommand runs, so `t2eval --help` stays fast. Modules keep
heavy imports (torch, transformers) inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import T2EvalError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-model": ("t2eval.models.cli", "build/download a model as an HF safetensors directory"),
    "prepare-data": ("t2eval.data.cli", "materialise every dataset split as canonical JSONL + manifest"),
    "decompose": ("t2eval.decompose_cli", "thin fp32 SVD of the SVF target matrices into a validated cache"),
    "train-svf": ("t2eval.train.svf_cli", "train an SVF expert vector with REINFORCE (resumable, best-valid checkpoint)"),
    "select-expert": ("t2eval.train.select", "keep the best of several SVF runs by validation score (the paper's λ sweep)"),
    "train-lora": ("t2eval.train.lora_cli", "train the LoRA baseline (next-token prediction or policy gradient)"),
    "fit-fewshot": ("t2eval.adapt.fewshot_cli", "few-shot CEM search of the expert mixture alpha on held-out prompts"),
    "evaluate": ("t2eval.evaluate", "lm-eval run of the t2 model (base/LoRA/SVF/two-pass) -> one raw result cell"),
    "tables": ("t2eval.report.tables", "paper tables 1-5 (+9) from raw result cells, beside the published numbers"),
    "figures": ("t2eval.report.figures", "figures 4, 6, 7 (PNG + CSV) from training logs, dispatch fields and alpha files"),
    "vlm-report": ("t2eval.report.vlm", "Figure 5 + the VLM table (VQA accuracy, base vs SVF/LoRA, paired tests) from raw cells"),
    "plan": ("t2eval.resources_plan", "--resources: estimated GPUs, peak GPU/host memory and disk per stage and model"),
    "protocol": ("t2eval.protocol", "the release / corrected protocol knobs: release value, corrected value, paper text, where used"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="t2eval",
        description="Transformer² benchmark harness: prepare, decompose, train, adapt, evaluate, tabulate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n" + "\n".join(f"  {n:<16}{h}" for n, (_, h) in COMMANDS.items())
        + "\n\nRun `t2eval <subcommand> --help` for its options.")
    p.add_argument("command", nargs="?", choices=sorted(COMMANDS), metavar="subcommand")
    p.add_argument("-V", "--version", action="store_true", help="print the version and exit")
    return p


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of `t2eval <name>` (what `main` parses the subcommand's arguments with)."""
    module_name, help_text = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"t2eval {name}", description=help_text)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    importlib.import_module(module_name).add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        top = _top_parser()
        ns = top.parse_args(argv)
        if ns.version:
            from . import __version__

            print(f"t2eval {__version__}")
            return 0
        top.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        _top_parser().parse_args([name])  # prints the choices and exits 2
    module = importlib.import_module(COMMANDS[name][0])
    args = subcommand_parser(name).parse_args(rest)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rc = module.run(args)
    except T2EvalError as e:
        print(f"t2eval {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"t2eval {name}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
