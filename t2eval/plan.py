"""What the workflow builds: every result cell of a config, and what each cell needs.

Pure functions of the validated config (no I/O), used by the Snakefile and tested directly.
Paths follow ARCHITECTURE.md:
  models/<model>/                                  prepared model
  svd/<model>-<targets>.safetensors                decomposition
  experts/<model>/<variant>/<task>/z.safetensors   SVF experts (variant: svf, svf-attn, svf-mlp+attn, svf-ntp)
  experts/<model>/<variant>/<task>/               LoRA peft adapter dir (variant: lora, lora-pg, lora-mlp+attn)
  experts/<model>/fewshot[-from-<src>]/<task>/alpha.json
  results/raw/<model>/<method>/<task>.json         one cell
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .adapt import strategies as S
from .constants import EXPERT_OF_TASK, TRAIN_TASKS


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    task: str

    @property
    def path(self) -> str:
        return f"results/raw/{self.model}/{self.method}/{self.task}.json"


@dataclass
class CellSpec:
    """Inputs (files) and `t2eval evaluate` options of one cell."""

    inputs: dict[str, str] = field(default_factory=dict)
    model_args: dict[str, str] = field(default_factory=dict)
    split: str = "test"


def model_dir(model: str) -> str:
    return f"models/{model}"


def model_marker(model: str) -> str:
    """The file that marks a prepared model directory (what rules depend on)."""
    return f"models/{model}/config.json"


def svd_path(model: str, targets: str = "mlp") -> str:
    return f"svd/{model}-{targets}.safetensors"


def svf_expert(model: str, task: str, variant: str = "svf") -> str:
    return f"experts/{model}/{variant}/{task}/z.safetensors"


def svf_log(model: str, task: str, variant: str = "svf") -> str:
    return f"experts/{model}/{variant}/{task}/log.jsonl"


def lora_adapter(model: str, task: str, variant: str = "lora") -> str:
    return f"experts/{model}/{variant}/{task}"


def lora_marker(model: str, task: str, variant: str = "lora") -> str:
    return f"{lora_adapter(model, task, variant)}/adapter_config.json"


def fewshot_alpha(model: str, task: str, source: str | None = None) -> str:
    sub = "fewshot" if source is None else f"fewshot-from-{source}"
    return f"experts/{model}/{sub}/{task}/alpha.json"


def model_setting(cfg: Mapping[str, Any], model: str, key: str) -> Any:
    over = cfg.get("models_overrides", {}).get(model, {})
    if key == "svd_layers":
        return over.get("svd_layers", cfg["svd"]["layers"])
    return over.get(key, cfg[key])


def cls_task(cfg: Mapping[str, Any]) -> str:
    return cfg["train_svf"]["cls_variant"]


def _source_of(cfg: Mapping[str, Any], target: str) -> str:
    for x in cfg["cross_model"]:
        if x["target"] == target:
            return x["source"]
    raise KeyError(f"no cross_model entry targets {target}")


def cells(cfg: Mapping[str, Any]) -> list[Cell]:
    """Every cell of the config, in order: per model the evaluate methods, then the Table 4
    ablations, then the cross-model rows. Which tasks a method covers is its strategy's
    `cells()` (t2eval.adapt.strategies)."""
    ev = cfg["evaluate"]
    out: list[Cell] = []
    for model in cfg["models"]:
        allowed = cfg.get("models_overrides", {}).get(model, {}).get("methods")
        for m in ev["methods"]:
            if allowed is None or m in allowed:
                out += [Cell(model, mm, t) for mm, t in S.strategy_of_method(m).cells(cfg, m, ev)]
    ab = cfg["ablations"]
    for model in ab["models"]:
        for m in ab["methods"]:
            out += [Cell(model, mm, t) for mm, t in S.strategy_of_method(m).cells(cfg, m, ab)]
        if "math" in ab["tasks"]:  # rows #1 and #6 on MATH: the GSM8K SVF expert / GSM8K LoRA
            out += [Cell(model, "svf", "math"), Cell(model, "lora-gsm8k", "math")]
    for x in cfg["cross_model"]:
        for m in x.get("methods", S.methods_of("cross_model")):
            out += [Cell(x["target"], mm, t) for mm, t in S.strategy_of_method(m).cells(cfg, m, x)]
    return list(dict.fromkeys(out))


def experts_arg(model: str, variant: str = "svf") -> str:
    """The experts= model_arg naming `model`'s three SVF experts."""
    return ",".join(f"{EXPERT_OF_TASK[t]}:{svf_expert(model, t, variant)}" for t in TRAIN_TASKS)


_experts_arg = experts_arg  # workflow/rules/adapt.smk's name


def cell_spec(cfg: Mapping[str, Any], model: str, method: str, task: str) -> CellSpec:
    """Files a cell depends on and the `t2` model_args that evaluate it (the method's strategy
    fills in its own: `Strategy.cell_spec`)."""
    spec = CellSpec(inputs={"model": model_marker(model), "data": f"{cfg['data']['dir']}/manifest.json"})
    S.strategy_of_method(method).cell_spec(cfg, model, method, task, spec)
    return spec


def format_model_args(args: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in args.items())


def summary(cfg: Mapping[str, Any]) -> dict[str, int]:
    """Cell counts per method (used in notes and tests)."""
    counts: dict[str, int] = {}
    for c in cells(cfg):
        counts[c.method] = counts.get(c.method, 0) + 1
    return counts
