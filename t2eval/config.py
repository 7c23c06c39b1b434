"""Model registry, default paths and YAML loading."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import T2EvalError

DATA_MIRROR_ENV = "T2EVAL_DATA_MIRROR"
DATA_DIR_ENV = "T2EVAL_DATA_DIR"
MODELS_DIR_ENV = "T2EVAL_MODELS_DIR"


@dataclass(frozen=True)
class ModelSpec:
    key: str
    source: str  # "embedded" | "hub" | "local"
    family: str = "unknown"
    hub_id: str | None = None
    builder: str | None = None
    default_dtype: str = "bfloat16"
    svf_layers: str = "all"
    extra: dict[str, Any] = field(default_factory=dict)


def json_object(text: str, what: str, example: str) -> dict[str, Any]:
    """`text` parsed as a JSON object, or a clear error naming `what` (a flag or variable) and an example."""
    import json

    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise T2EvalError(f"{what} {text!r} is not JSON: {e}; give a JSON object, e.g. {example}") from None
    if not isinstance(d, dict):
        raise T2EvalError(f"{what} {text!r}: give a JSON object, e.g. {example}")
    return d


def load_yaml(path: str | os.PathLike) -> Any:
    """Load a YAML file with a clear error naming the file and line on failure."""
    p = Path(path)
    if not p.exists():
        raise T2EvalError(f"config file not found: {p}")
    try:
        with open(p) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:  # pragma: no cover - message formatting only
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise T2EvalError(f"invalid YAML in {where}: {getattr(e, 'problem', e)}") from None


def model_registry() -> dict[str, ModelSpec]:
    raw = yaml.safe_load(resources.files("t2eval").joinpath("resources/models.yaml").read_text())
    out = {}
    for key, d in raw.items():
        known = {k: d[k] for k in ("source", "family", "hub_id", "builder", "default_dtype", "svf_layers") if k in d}
        extra = {k: v for k, v in d.items() if k not in known}
        out[key] = ModelSpec(key=key, extra=extra, **known)
    return out


def guess_family(name: str, registry: dict[str, ModelSpec] | None = None) -> str | None:
    """The registry family whose name appears in `name` ignoring case, '-', '_' and spaces
    ("Meta-Llama-3-8B" → llama3), the longest match first; None when none does."""
    reg = model_registry() if registry is None else registry
    flat = "".join(ch for ch in name.lower() if ch not in "-_ ")
    for family in sorted({s.family for s in reg.values()}, key=len, reverse=True):
        if family != "unknown" and family in flat:
            return family
    return None


def model_spec(key_or_path: str) -> ModelSpec:
    """Registry entry for a key, or a `local` spec for a directory (family guessed from its name)."""
    reg = model_registry()
    if key_or_path in reg:
        return reg[key_or_path]
    p = Path(key_or_path)
    if (p / "config.json").exists():
        import json

        # a directory prepared by `t2eval prepare-model` records its registry key
        meta = p / "t2eval_model.json"
        if meta.exists():
            key = json.loads(meta.read_text()).get("key")
            if key in reg:
                return reg[key]
        cfg = json.loads((p / "config.json").read_text())
        family = guess_family(f"{cfg.get('_name_or_path') or ''} {p.name}", reg) or cfg.get("model_type", "unknown")
        return ModelSpec(key=p.name, source="local", family=family)
    raise T2EvalError(
        f"unknown model {key_or_path!r}: not a registry key ({', '.join(sorted(reg))}) "
        "and not a local Hugging Face directory (no config.json there)")


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


def default_models_dir() -> Path:
    return Path(os.environ.get(MODELS_DIR_ENV, "models"))
