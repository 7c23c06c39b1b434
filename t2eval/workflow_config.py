"""Workflow configuration: defaults, merging, and validation.

`load(config_dict, source)` deep-merges the user's config over `DEFAULTS`, validates it against the
package's `t2eval/resources/config.schema.yaml` and returns the merged dict. Errors name the key path,
the bad value and what is allowed, e.g. `train_svf.iterations: -1 is less than the minimum of 1`.

Defaults live in one place each: `DEFAULTS` holds the workflow's own settings (which models, tasks,
methods and cells; per-model settings; resources). The options of a stage (`train_svf.lr`,
`fewshot.population`, ...) have no entry here: a config that leaves one out gets the stage's own
default (the option dataclass of `t2eval <stage>`; `t2eval.plan.stage_argv` passes only what is set).
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .constants import TRAIN_TASKS, UNSEEN_TASKS
from .errors import T2EvalError
from .adapt.strategies import methods_of
from .protocol import DEFAULT as DEFAULT_PROTOCOL
from .protocol import KNOB_NAMES

SCHEMA = Path(str(resources.files("t2eval").joinpath("resources/config.schema.yaml")))

DEFAULTS: dict[str, Any] = {
    "name": "unnamed",
    "model_paths": {},
    "dtype": "bfloat16",
    "backend": "hf",
    "tensor_parallel_size": 1,
    "device": "cpu",
    "seed": 42,
    "seeds": None,          # None: [seed]; see seeds() and the schema
    "protocol": DEFAULT_PROTOCOL,
    "svf_precision": "fp32",
    "protocol_overrides": {},
    "data": {"dir": "data", "mirror": None},
    "svd": {"targets": "mlp", "layers": "all"},
    "train_svf": {"tasks": list(TRAIN_TASKS), "cls_variant": "cls", "kl_sweep": []},
    "train_lora": {"tasks": list(TRAIN_TASKS)},
    "fewshot": {"tasks": list(UNSEEN_TASKS)},
    "evaluate": {"methods": ["base", "lora", "svf", "t2-prompt", "t2-cls", "t2-fewshot"],
                 "train_tasks": list(TRAIN_TASKS), "unseen_tasks": list(UNSEEN_TASKS),
                 "limit": None, "max_new_tokens": None, "dispatch": "generate", "batch_size": 8},
    "allow_code_execution": False,
    "ablations": {"models": [], "methods": methods_of("ablations"), "tasks": ["gsm8k", "math"]},
    "cross_model": [],
    # the VLM experiment (Figure 5): off unless vlm.models lists a model
    "vlm": {"models": [], "train_task": "textvqa", "eval_tasks": ["textvqa", "okvqa"], "methods": ["base", "svf"],
            "svd_layers": "half", "train_svf": {}, "train_lora": {}, "evaluate": {"limit": None, "max_new_tokens": None, "batch_size": 8}},
    "resources": {
        "prepare": {"gpus": 0, "mem_mb": 32000, "runtime": 60, "threads": 4},
        "decompose": {"gpus": 0, "mem_mb": 64000, "runtime": 120, "threads": 8},
        "train": {"gpus": 1, "mem_mb": 64000, "runtime": 1440, "threads": 8},
        "fewshot": {"gpus": 1, "mem_mb": 64000, "runtime": 720, "threads": 8},
        "evaluate": {"gpus": 1, "mem_mb": 64000, "runtime": 360, "threads": 8},
    },
    "models_overrides": {},
}


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _schema() -> dict[str, Any]:
    from .config import load_yaml

    return load_yaml(SCHEMA)


def validate(cfg: Mapping[str, Any], source: str = "config") -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    lines = []
    for e in errors[:10]:
        path = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        msg = e.message
        if e.validator == "additionalProperties":
            allowed = sorted(e.schema.get("properties", {}))
            msg += f" — allowed keys here: {', '.join(allowed)}" if allowed else ""
        elif e.validator == "enum":
            msg = f"{e.instance!r} is not one of {e.validator_value}"
        lines.append(f"  {path}: {msg}")
    raise T2EvalError(f"invalid workflow configuration ({source}):\n" + "\n".join(lines)
                      + f"\n(schema: {SCHEMA})")


def load(user_cfg: Mapping[str, Any] | None, source: str = "config") -> dict[str, Any]:
    if user_cfg is None or not isinstance(user_cfg, Mapping):
        raise T2EvalError(f"{source}: the workflow configuration must be a mapping (got {type(user_cfg).__name__})")
    validate(user_cfg, source)  # the user's own keys first: typos are reported against what they wrote
    cfg = deep_merge(DEFAULTS, user_cfg)
    validate(cfg, source)
    models = set(cfg["models"])
    if not models and not cfg["vlm"]["models"]:
        raise T2EvalError(f"invalid workflow configuration ({source}): models is empty and so is vlm.models; "
                          f"list at least one model")
    both = sorted(models & set(cfg["vlm"]["models"]))
    if both:
        raise T2EvalError(f"invalid workflow configuration ({source}): {', '.join(both)} listed in both models and "
                          f"vlm.models; a vision-language model belongs in vlm.models only")
    for name in [*cfg["ablations"]["models"], *(x[k] for x in cfg["cross_model"] for k in ("source", "target"))]:
        if name not in models:
            raise T2EvalError(f"invalid workflow configuration ({source}): {name!r} is used in ablations/cross_model "
                              f"but not listed in models ({', '.join(sorted(models))})")
    unknown = sorted(set(cfg["protocol_overrides"]) - set(KNOB_NAMES))
    if unknown:
        raise T2EvalError(f"invalid workflow configuration ({source}): protocol_overrides: unknown knob(s) "
                          f"{', '.join(unknown)}; known: {', '.join(KNOB_NAMES)} (`t2eval protocol` lists them)")
    if cfg["seeds"] is None:
        cfg["seeds"] = [cfg["seed"]]
    return cfg
