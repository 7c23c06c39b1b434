"""Stage option dataclasses -> argparse and back (t2eval.stage_config), and every converted
subcommand: its parser is generated from its dataclass and `argv` renders tokens it accepts."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from dataclasses import dataclass

import pytest

from t2eval.cli import COMMANDS, subcommand_parser
from t2eval.stage_config import add_arguments, argv, from_args, opt


@dataclass
class Toy:
    model: str = opt(help="model dir", required=True)
    name: str = opt(help="positional name", positional=True)
    targets: str = opt("mlp", help="which matrices", choices=("mlp", "attn"))
    iterations: int = opt(200, help="steps")
    lr: float = opt(2e-3, help="learning rate")
    limit: int | None = opt(None, help="first n docs")
    cap: int | None = opt(8, help="a cap that can be lifted with none")
    splits: tuple[str, ...] = opt(("train", "valid"), help="splits")
    models: list[str] | None = opt(None, nargs="+", help="models, space separated")
    force: bool = opt(False, help="rebuild")
    verify: bool = opt(True, help="check hashes")
    hidden: int = opt(3, help="not on the command line", cli=False)


def _parser(cls=Toy) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(p, cls)
    return p


def test_parser_from_dataclass():
    p = _parser()
    ns = p.parse_args(["n1", "--model", "m"])
    cfg = from_args(Toy, ns)
    assert cfg == Toy(model="m", name="n1")
    ns = p.parse_args(["n1", "--model", "m", "--targets", "attn", "--iterations", "5", "--lr", "0.1", "--limit", "4",
                       "--cap", "none", "--splits", "valid,test", "--models", "a", "b", "--force", "--no-verify"])
    cfg = from_args(Toy, ns)
    assert (cfg.targets, cfg.iterations, cfg.lr, cfg.limit, cfg.cap) == ("attn", 5, 0.1, 4, None)
    assert cfg.splits == ("valid", "test") and cfg.models == ["a", "b"] and cfg.force and not cfg.verify
    assert cfg.hidden == 3 and "hidden" not in vars(ns)
    with pytest.raises(SystemExit):  # required option missing
        _parser().parse_args(["n1"])
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        p.parse_args(["n1", "--model", "m", "--targets", "mlpp"])
    helps = {a.dest: a.help for a in p._actions}
    assert helps["iterations"] == "steps (default: 200)" and helps["splits"].endswith("(default: train,valid)")


def test_argv_renders_only_what_differs_and_round_trips():
    assert argv({"model": "m", "name": "n"}, Toy) == ["n", "--model", "m"]
    assert argv(Toy(model="m", name="n"), Toy) == ["n", "--model", "m"]  # defaults are left to the stage
    values = dict(model="m", name="n", targets="attn", iterations=5, lr=0.5, limit=3, cap=None,
                  splits=("test",), models=["x", "y"], force=True, verify=False)
    tokens = argv(values, Toy)
    assert tokens[0] == "n" and "--no-verify" in tokens and "--force" in tokens and "none" in tokens
    back = from_args(Toy, _parser().parse_args(tokens))
    assert dataclasses.asdict(back) == {**dataclasses.asdict(Toy(model="m", name="n")), **values, "models": ["x", "y"]}


def test_argv_refuses_unknown_and_missing_options():
    with pytest.raises(KeyError, match="no option.*iterationz"):
        argv({"model": "m", "name": "n", "iterationz": 3}, Toy)
    with pytest.raises(KeyError, match="required option 'model'"):
        argv({"name": "n"}, Toy)


def _configs():
    out = []
    for sub, (module, _) in COMMANDS.items():
        cls = getattr(importlib.import_module(module), "CONFIG", None)
        if cls is not None:
            out.append((sub, cls))
    return out


@pytest.mark.parametrize("sub,cls", _configs(), ids=[s for s, _ in _configs()])
def test_each_subcommand_parser_is_its_dataclass(sub, cls):
    """The real `t2eval <sub>` parser has one option per field with the field's default, and the
    tokens `argv` renders for non-default values parse back to those values."""
    parser = subcommand_parser(sub)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "verbose")}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}
    assert set(actions) == set(fields)
    for name, f in fields.items():
        assert f.metadata["help"], f"{sub} --{name} has no help text"
        if not f.metadata.get("required"):
            assert actions[name].default == f.default, name
    values = {n: (f.metadata["choices"] or ["x"])[0] for n, f in fields.items() if f.metadata.get("required")}
    values = {n: [v] if fields[n].metadata.get("nargs") else v for n, v in values.items()}
    ns = parser.parse_args(argv(values, cls))
    assert {n: getattr(ns, n) for n in values} == values


def test_fit_fewshot_has_allow_cross_model():
    ns = subcommand_parser("fit-fewshot").parse_args(
        ["--model", "m", "--svd", "s", "--experts", "e", "--task", "math", "--out", "o", "--allow-cross-model"])
    assert ns.allow_cross_model is True
