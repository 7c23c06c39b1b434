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


# ----------------------------------------------------------------------------- stage command lines
# What each rule runs: the option values of one `t2eval <stage>` job, rendered by the stage's own
# option dataclass (`CONFIG` of the subcommand's module, see t2eval.stage_config), so that a rule
# can never pass a flag its subcommand lacks and a value equal to the stage's default is left to
# the stage (defaults live in the stage dataclasses; the workflow config holds only what differs).

# keys of a config section that steer the workflow (which jobs exist) rather than a stage's options
WORKFLOW_KEYS = {"train_svf": {"tasks", "cls", "cls_variant", "kl_sweep"}, "train_lora": {"tasks"},
                 "fewshot": {"tasks"}}
# trained variants -> (targets, objective); "svf" trains on the config's svd.targets
# (the Table 4 ablation artefacts are owned by the svf / lora strategies: `Strategy.ABLATION`)
SVF_VARIANTS = {"svf": (None, "pg"), **{v: (t, o) for v, t, o in S.get_strategy("svf").ABLATION.values()}}
LORA_VARIANTS = {"lora": ("attn", "ntp"), **{v: (t, o) for v, t, o in S.get_strategy("lora").ABLATION.values()}}


def svf_kl_dir(model: str, task: str, kl: Any) -> str:
    """One run of the paper's KL-coefficient sweep (train_svf.kl_sweep)."""
    return f"experts/{model}/svf-kl{kl}/{task}"


def stage_options(cfg: Mapping[str, Any], section: str) -> dict[str, Any]:
    """The stage options a config section sets (its workflow-steering keys left out)."""
    return {k: v for k, v in cfg.get(section, {}).items() if k not in WORKFLOW_KEYS.get(section, ())}


def stage_values(cfg: Mapping[str, Any], stage: str, **wc: str) -> dict[str, Any]:
    """Option values (field name -> value) of the `t2eval <stage>` job for these wildcards."""
    import os

    data = cfg["data"]["dir"]
    model = wc.get("model")
    if stage == "prepare-model":
        return {"model": cfg.get("model_paths", {}).get(model, model), "out": model_dir(model),
                "dtype": model_setting(cfg, model, "dtype")}
    if stage == "prepare-data":
        return {"mirror": cfg["data"]["mirror"], "out": data}
    if stage == "decompose":
        return {"model": model_dir(model), "targets": wc["targets"], "layers": model_setting(cfg, model, "svd_layers"),
                "out": svd_path(model, wc["targets"])}
    if stage == "train-svf":
        if "kl" in wc:  # one run of the KL sweep
            targets, objective, out = cfg["svd"]["targets"], "pg", svf_kl_dir(model, wc["task"], wc["kl"])
        else:
            variant = wc.get("svf_variant", "svf")
            targets, objective = SVF_VARIANTS[variant]
            out = os.path.dirname(svf_expert(model, wc["task"], variant))
        v = {"model": model_dir(model), "svd": svd_path(model, targets or cfg["svd"]["targets"]), "task": wc["task"],
             "out": out, "data_dir": data, "objective": objective, **stage_options(cfg, "train_svf"),
             "seed": cfg["seed"], "backend": model_setting(cfg, model, "backend"),
             "dtype": model_setting(cfg, model, "dtype"), "device": cfg["device"]}
        if "kl" in wc:
            v["kl_coef"] = float(wc["kl"])
        return v
    if stage == "train-lora":
        targets, objective = LORA_VARIANTS[wc.get("lora_variant", "lora")]
        return {"model": model_dir(model), "task": wc["task"], "out": lora_adapter(model, wc["task"],
                wc.get("lora_variant", "lora")), "data_dir": data, "targets": targets, "objective": objective,
                **stage_options(cfg, "train_lora"), "seed": cfg["seed"], "dtype": model_setting(cfg, model, "dtype"),
                "device": cfg["device"]}
    if stage == "select-expert":
        return {"candidates": [svf_kl_dir(model, wc["task"], k) for k in cfg["train_svf"]["kl_sweep"]],
                "out": os.path.dirname(svf_expert(model, wc["task"]))}
    if stage == "fit-fewshot":
        source = wc.get("source")
        return {"model": model_dir(model), "svd": svd_path(model, cfg["svd"]["targets"]),
                "experts": experts_arg(source or model), "task": wc["task"],
                "out": os.path.dirname(fewshot_alpha(model, wc["task"], source)), "data_dir": data,
                **stage_options(cfg, "fewshot"), "seed": cfg["seed"], "backend": model_setting(cfg, model, "backend"),
                "dtype": model_setting(cfg, model, "dtype"), "device": cfg["device"],
                "allow_code_execution": cfg["allow_code_execution"], "allow_cross_model": source is not None}
    if stage == "evaluate":
        return _evaluate_values(cfg, model, wc["method"], wc["task"])
    if stage in ("tables", "figures"):
        return {}
    raise ValueError(f"no workflow job runs the stage {stage!r}")


def _evaluate_values(cfg: Mapping[str, Any], model: str, method: str, task: str) -> dict[str, Any]:
    ev = cfg["evaluate"]
    spec = cell_spec(cfg, model, method, task)
    args: dict[str, Any] = {"backend": model_setting(cfg, model, "backend"), "dtype": model_setting(cfg, model, "dtype"),
                            "device": cfg["device"], "batch_size": ev["batch_size"], **spec.model_args}
    if ev["max_new_tokens"] is not None and "dispatch" in spec.model_args:
        args["cls_max_new_tokens"] = ev["max_new_tokens"]  # the first pass gets the same cap
    if model_setting(cfg, model, "tensor_parallel_size") > 1:
        args["tensor_parallel_size"] = model_setting(cfg, model, "tensor_parallel_size")
    return {"model": model_dir(model), "method": method, "task": task, "data_dir": cfg["data"]["dir"],
            "out": Cell(model, method, task).path, "split": spec.split, "model_args": format_model_args(args),
            "limit": ev["limit"],
            "gen_kwargs": None if ev["max_new_tokens"] is None else f"max_gen_toks={ev['max_new_tokens']}",
            "allow_code_execution": cfg["allow_code_execution"]}


def stage_argv(cfg: Mapping[str, Any], stage: str, **wildcards: str) -> list[str]:
    """The arguments after `t2eval <stage>` of the workflow's job for these wildcards."""
    from .stage_config import argv

    cls, module = _stage_config_class(stage)
    values = stage_values(cfg, stage, **wildcards)
    if cls is None:
        raise TypeError(f"t2eval {stage} has no option dataclass (module attribute CONFIG)")
    return argv(values, cls)


def stage_shell(cfg: Mapping[str, Any], stage: str, **wildcards: str) -> str:
    """`t2eval <stage> ...` as one shell-quoted command line."""
    import shlex

    return shlex.join(["t2eval", stage, *stage_argv(cfg, stage, **wildcards)])


def _stage_config_class(stage: str):
    import importlib

    from .cli import COMMANDS

    if stage not in COMMANDS:
        raise ValueError(f"unknown t2eval subcommand {stage!r}")
    module = importlib.import_module(COMMANDS[stage][0])
    return getattr(module, "CONFIG", None), module


