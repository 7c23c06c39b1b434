"""Stage configs as dataclasses: one definition gives the defaults, the help text and the CLI.

A stage's options are the fields of one dataclass; each field carries its help (and, where it has
a fixed set of values, its choices) in `field(metadata=...)`, built with `opt(...)`:

    @dataclass
    class DecomposeConfig:
        model: str = opt(help="HF model directory", required=True)
        targets: str = opt("mlp", help="which matrices", choices=("mlp", "attn", "mlp+attn"))
        device: str = opt("cpu", help="torch device")

    add_arguments(parser, DecomposeConfig)          # --model (required), --targets, --device
    cfg = from_args(DecomposeConfig, parser.parse_args(argv))

Rules of the generated CLI: the flag is `--` + the field name with "_" → "-"; a bool field
defaulting to False is a `--flag`, one defaulting to True is `--no-flag` (unless `flag=` names it);
tuple/list fields take a comma-separated string (or, with `nargs="+"`, space-separated values);
`int | None` / `float | None` fields accept "none"; `positional=True` makes a positional argument.
`argv(cfg_or_dict, cls)` renders the command-line tokens for given values (what the workflow passes
to rules), so the workflow and the parser cannot disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Iterable, Mapping

_MISSING = dataclasses.MISSING


def opt(default: Any = _MISSING, *, help: str, choices: Iterable[Any] | None = None, required: bool = False,
        flag: str | None = None, cli: bool = True, default_factory: Any = _MISSING, positional: bool = False,
        nargs: str | None = None) -> Any:
    """A dataclass field with CLI metadata. `required=True` fields have no default (a value must be
    given); `cli=False` keeps a field out of the command line (set programmatically);
    `positional=True` is a required positional argument; `nargs="+"` (tuple/list fields) takes
    space-separated values instead of one comma-separated string."""
    if nargs not in (None, "+", "*"):
        raise ValueError(f"nargs={nargs!r}: only '+' or '*' are supported")
    if positional:
        required = True
    md = {"help": help, "choices": tuple(choices) if choices is not None else None, "required": required,
          "flag": flag, "cli": cli, "positional": positional, "nargs": nargs}
    if required:
        default = None
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), len(args) < len(typing.get_args(tp))
    return tp, False


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def flag_of(f: dataclasses.Field, tp: Any) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    if tp is bool and f.default is True:
        return f"--no-{name}"
    return f"--{name}"


def _item_converter(tp: Any):
    inner = (typing.get_args(tp) or (str,))[0]
    inner = inner if inner is not Ellipsis else str
    return inner if inner in (int, float, str) else str


def _converter(tp: Any, optional: bool):
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        conv = _item_converter(tp)

        def parse_seq(s: str):
            vals = [conv(x) for x in str(s).split(",") if x.strip()]
            return tuple(vals) if origin is tuple else vals

        return parse_seq
    base = tp if tp in (int, float, str) else str

    def parse(s: str):
        if optional and str(s).lower() in ("none", ""):
            return None
        return base(s)

    return parse


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one option per CLI field of the dataclass `cls`."""
    hints = _hints(cls)
    for f in cli_fields(cls):
        tp, optional = _base_type(hints[f.name])
        md = f.metadata
        flag = flag_of(f, tp)
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
        help_text = md.get("help", "")
        if tp is bool:
            action = "store_false" if default is True else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, default=default, help=help_text)
            continue
        kw: dict[str, Any] = {"dest": f.name, "help": help_text, "type": _converter(tp, optional)}
        if md.get("nargs"):
            kw.update(nargs=md["nargs"], type=_item_converter(tp))
        if md.get("positional"):
            kw.pop("dest")
            kw["help"] = help_text
            if md.get("choices"):
                kw["choices"] = md["choices"]
            parser.add_argument(f.name, **kw)
            continue
        if md.get("required"):
            kw["required"] = True
        else:
            kw["default"] = default
            if default not in (None, (), []):
                shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
                kw["help"] = f"{help_text} (default: {shown})"
        if md.get("choices"):
            kw["choices"] = md["choices"]
        parser.add_argument(flag, **kw)


def from_args(cls: type, args: argparse.Namespace | Mapping[str, Any], **overrides: Any) -> Any:
    """Build `cls` from parsed args (non-CLI fields keep their defaults unless in `overrides`)."""
    src = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    kw = {f.name: src[f.name] for f in cli_fields(cls) if f.name in src}
    kw.update(overrides)
    return cls(**kw)


def argv(values: Any, cls: type) -> list[str]:
    """Command-line tokens for `values` (a `cls` instance or a mapping of field name → value):
    required fields always, other fields only where they differ from the default."""
    src = dataclasses.asdict(values) if dataclasses.is_dataclass(values) else dict(values)
    unknown = set(src) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise KeyError(f"{cls.__name__} has no option(s) {', '.join(sorted(unknown))}")
    hints = _hints(cls)
    out: list[str] = []
    positionals: list[str] = []
    for f in cli_fields(cls):
        if f.name not in src:
            if f.metadata.get("required"):
                raise KeyError(f"{cls.__name__}: required option {f.name!r} missing")
            continue
        v = src[f.name]
        tp, _ = _base_type(hints[f.name])
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
        if isinstance(v, list) and isinstance(default, tuple):
            v = tuple(v)
        if not f.metadata.get("required") and v == default:
            continue
        if f.metadata.get("positional"):
            positionals.append(str(v))
            continue
        flag = flag_of(f, tp)
        if tp is bool:
            if bool(v) != bool(default):
                out.append(flag)
            continue
        if f.metadata.get("nargs") and isinstance(v, (tuple, list)):
            out += [flag, *map(str, v)]
        elif v is None:
            out += [flag, "none"]
        elif isinstance(v, (tuple, list)):
            out += [flag, ",".join(map(str, v))]
        else:
            out += [flag, str(v)]
    return positionals + out
