"""What the workflow builds: every result cell of a config, and what each cell needs.

Pure functions of the validated config (no I/O), used by the Snakefile and tested directly.
Paths follow ARCHITECTURE.md:
  models/<model>/                                  prepared model
  svd/<model>-<targets>.safetensors                decomposition
  experts/<model>/<variant>/<task>/z.safetensors   SVF experts (variant: svf, svf-attn, svf-mlp+attn, svf-ntp)
  experts/<model>/<variant>/<task>/               LoRA peft adapter dir (variant: lora, lora-pg, lora-mlp+attn)
  experts/<model>/fewshot[-from-<src>]/<task>/alpha.json
  results/raw/<model>/<method>/<task>.json         one cell

Seeds (`seeds: [..]`, default `[seed]`): every seeded artefact (SVF and LoRA experts, the classifier
expert, the KL-sweep runs, few-shot α) and every cell made from one is re-made per seed. The first
seed keeps the single-seed layout above, so a one-seed run (and its cells) is unchanged and adding
seeds later only runs the new ones; each further seed k nests its artefacts one level down and
suffixes its cells:
  experts/<model>/<variant>/<task>/seed<k>/...     (svf, lora, fewshot, svf-kl<λ>: same file names)
  results/raw/<model>/<method>/<task>.seed<k>.json
A cell is seeded when it reads anything under experts/ (base cells are one cell, shared by all seeds).
Every job runs under the config's protocol: `stage_shell` prefixes `T2EVAL_PROTOCOL=<protocol>` (and
`T2EVAL_PROTOCOL_OVERRIDES='<json>'` when `protocol_overrides` is set) — see t2eval.protocol.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from .adapt import strategies as S
from .constants import EXPERT_OF_TASK, TRAIN_TASKS


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    task: str
    seed: int | None = None   # None: the first (or only) seed, the single-seed layout

    @property
    def path(self) -> str:
        return cell_path(self.model, self.method, self.task, self.seed)


def cell_path(model: str, method: str, task: str, seed: int | str | None = None) -> str:
    sfx = "" if seed is None else f".seed{seed}"
    return f"results/raw/{model}/{method}/{task}{sfx}.json"


# The seed whose artefacts the path helpers name when no seed is passed (`seed_layout`): lets the
# strategies' `cell_spec` (which call the helpers without a seed) name one seed's experts.
_LAYOUT_SEED: contextvars.ContextVar[int | str | None] = contextvars.ContextVar("t2eval_layout_seed", default=None)


@contextlib.contextmanager
def seed_layout(seed: int | str | None) -> Iterator[None]:
    token = _LAYOUT_SEED.set(seed)
    try:
        yield
    finally:
        _LAYOUT_SEED.reset(token)


def _sd(seed: int | str | None) -> str:
    """The seed's directory level under an artefact's task dir ("" for the first seed)."""
    seed = _LAYOUT_SEED.get() if seed is None else seed
    return "" if seed is None else f"/seed{seed}"


def seeds(cfg: Mapping[str, Any]) -> list[int]:
    """The config's seed replicates (the first keeps the single-seed layout)."""
    return list(cfg.get("seeds") or [cfg["seed"]])


def seed_tag(cfg: Mapping[str, Any], seed: int) -> int | None:
    """The layout tag of `seed`: None for the first seed, else the seed itself."""
    return None if seed == seeds(cfg)[0] else seed


def seed_value(cfg: Mapping[str, Any], tag: int | str | None) -> int:
    """The seed a job runs with, from its layout tag (the `seed` wildcard; None = the first seed)."""
    return seeds(cfg)[0] if tag in (None, "") else int(tag)


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


def svf_expert(model: str, task: str, variant: str = "svf", seed: int | str | None = None) -> str:
    return f"experts/{model}/{variant}/{task}{_sd(seed)}/z.safetensors"


def svf_log(model: str, task: str, variant: str = "svf", seed: int | str | None = None) -> str:
    return f"experts/{model}/{variant}/{task}{_sd(seed)}/log.jsonl"


def lora_adapter(model: str, task: str, variant: str = "lora", seed: int | str | None = None) -> str:
    return f"experts/{model}/{variant}/{task}{_sd(seed)}"


def lora_marker(model: str, task: str, variant: str = "lora", seed: int | str | None = None) -> str:
    return f"{lora_adapter(model, task, variant, seed)}/adapter_config.json"


def fewshot_alpha(model: str, task: str, source: str | None = None, seed: int | str | None = None) -> str:
    sub = "fewshot" if source is None else f"fewshot-from-{source}"
    return f"experts/{model}/{sub}/{task}{_sd(seed)}/alpha.json"


def model_setting(cfg: Mapping[str, Any], model: str, key: str) -> Any:
    over = cfg.get("models_overrides", {}).get(model, {})
    if key == "svd_layers":
        default = cfg["vlm"]["svd_layers"] if is_vlm(cfg, model) else cfg["svd"]["layers"]
        return over.get("svd_layers", default)
    return over.get(key, cfg[key])


def is_vlm(cfg: Mapping[str, Any], model: str) -> bool:
    """Whether `model` is one of the config's vision-language models (`vlm.models`)."""
    return model in (cfg.get("vlm") or {}).get("models", ())


def model_requires(model: str) -> list[str]:
    """Markers of the prepared models `model`'s builder reads (the registry's `requires`: smollm2-llava is
    built from the prepared smollm2-135m)."""
    from .config import model_registry

    spec = model_registry().get(model)
    return [model_marker(m) for m in (spec.extra.get("requires", []) if spec else [])]


def vlm_cells(cfg: Mapping[str, Any]) -> list[Cell]:
    """The VLM experiment's cells (one seed): every vlm model x method x eval task."""
    v = cfg.get("vlm") or {}
    return [Cell(m, meth, t) for m in v.get("models", ()) for meth in v.get("methods", ()) for t in v.get("eval_tasks", ())]


def vlm_datasets(cfg: Mapping[str, Any]) -> list[str]:
    """The VQA datasets the config's VLM jobs read (its train task and eval tasks)."""
    v = cfg.get("vlm") or {}
    if not v.get("models"):
        return []
    return list(dict.fromkeys([v["train_task"], *v["eval_tasks"]]))


def cls_task(cfg: Mapping[str, Any]) -> str:
    return cfg["train_svf"]["cls_variant"]


def _source_of(cfg: Mapping[str, Any], target: str) -> str:
    for x in cfg["cross_model"]:
        if x["target"] == target:
            return x["source"]
    raise KeyError(f"no cross_model entry targets {target}")


def cells(cfg: Mapping[str, Any]) -> list[Cell]:
    """Every cell of the config: those of the first seed (`seed_cells`), then, per further seed,
    a copy of each cell that reads a seeded artefact (anything under experts/)."""
    first = seed_cells(cfg)
    out = list(first)
    seeded = [c for c in first if is_seeded(cfg, c)]
    for k in seeds(cfg)[1:]:
        out += [Cell(c.model, c.method, c.task, k) for c in seeded]
    return out


def is_seeded(cfg: Mapping[str, Any], cell: Cell) -> bool:
    """Whether the cell reads a seeded artefact (experts, adapters, α): then it is re-made per seed."""
    return any(str(p).startswith("experts/") for p in cell_spec(cfg, cell.model, cell.method, cell.task).inputs.values())


def seed_cells(cfg: Mapping[str, Any]) -> list[Cell]:
    """Every cell of one seed, in order: per model the evaluate methods, then the Table 4
    ablations, then the cross-model rows. Which tasks a method covers is its strategy's
    `cells()` (t2eval.adapt.strategies)."""
    ev = cfg["evaluate"]
    out: list[Cell] = []
    for model in cfg["models"]:
        allowed = cfg.get("models_overrides", {}).get(model, {}).get("methods")
        for m in ev["methods"]:
            if allowed is None or m in allowed:
                out += [Cell(model, mm, t) for mm, t in S.strategy_of_method(m).cells(cfg, m, ev)]
    out += vlm_cells(cfg)
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


def experts_arg(model: str, variant: str = "svf", seed: int | str | None = None) -> str:
    """The experts= model_arg naming `model`'s three SVF experts (of one seed)."""
    return ",".join(f"{EXPERT_OF_TASK[t]}:{svf_expert(model, t, variant, seed)}" for t in TRAIN_TASKS)




def cell_spec(cfg: Mapping[str, Any], model: str, method: str, task: str, seed: int | str | None = None) -> CellSpec:
    """Files a cell depends on and the `t2` model_args that evaluate it (the method's strategy
    fills in its own: `Strategy.cell_spec`), for the seed tagged `seed` (None: the first seed):
    the strategy sees `cfg["seed"]` = that seed and the path helpers name that seed's artefacts."""
    spec = CellSpec(inputs={"model": model_marker(model), "data": f"{cfg['data']['dir']}/manifest.json"})
    seeded_cfg = {**cfg, "seed": seed_value(cfg, seed)}
    with seed_layout(None if seed in (None, "") else seed):
        S.strategy_of_method(method).cell_spec(seeded_cfg, model, method, task, spec)
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


def svf_kl_dir(model: str, task: str, kl: Any, seed: int | str | None = None) -> str:
    """One run of the paper's KL-coefficient sweep (train_svf.kl_sweep)."""
    return f"experts/{model}/svf-kl{kl}/{task}{_sd(seed)}"


def stage_options(cfg: Mapping[str, Any], section: str) -> dict[str, Any]:
    """The stage options a config section sets (its workflow-steering keys left out)."""
    return {k: v for k, v in cfg.get(section, {}).items() if k not in WORKFLOW_KEYS.get(section, ())}


def stage_values(cfg: Mapping[str, Any], stage: str, **wc: str) -> dict[str, Any]:
    """Option values (field name -> value) of the `t2eval <stage>` job for these wildcards."""
    import os

    data = cfg["data"]["dir"]
    model = wc.get("model")
    tag = wc.get("seed") or None     # the `seed` wildcard: a further seed's jobs (None: the first seed)
    seed = seed_value(cfg, tag)
    if stage == "prepare-model":
        return {"model": cfg.get("model_paths", {}).get(model, model), "out": model_dir(model),
                "dtype": model_setting(cfg, model, "dtype")}
    if stage == "prepare-data":
        v = {"mirror": cfg["data"]["mirror"], "out": data}
        if vlm_datasets(cfg):  # the LLM datasets (if any model needs them) + the VQA ones
            from .data.datasets import SPECS

            v["datasets"] = ",".join([*(SPECS if cfg["models"] else ()), *vlm_datasets(cfg)])
            if "synth_textvqa" in vlm_datasets(cfg):
                v["synth_textvqa_sizes"] = cfg["vlm"].get("synth_textvqa_sizes")
        return v
    if stage == "decompose":
        return {"model": model_dir(model), "targets": wc["targets"], "layers": model_setting(cfg, model, "svd_layers"),
                "out": svd_path(model, wc["targets"])}
    if stage == "train-svf":
        if "kl" in wc:  # one run of the KL sweep
            targets, objective, out = cfg["svd"]["targets"], "pg", svf_kl_dir(model, wc["task"], wc["kl"], tag)
        else:
            variant = wc.get("svf_variant", "svf")
            targets, objective = SVF_VARIANTS[variant]
            out = os.path.dirname(svf_expert(model, wc["task"], variant, tag))
        options = cfg["vlm"]["train_svf"] if is_vlm(cfg, model) else stage_options(cfg, "train_svf")
        v = {"model": model_dir(model), "svd": svd_path(model, targets or cfg["svd"]["targets"]), "task": wc["task"],
             "out": out, "data_dir": data, "objective": objective, **options,
             "seed": seed, "backend": model_setting(cfg, model, "backend"),
             "dtype": model_setting(cfg, model, "dtype"), "device": cfg["device"],
             "svf_precision": cfg["svf_precision"]}
        if "kl" in wc:
            v["kl_coef"] = float(wc["kl"])
        return v
    if stage == "train-lora":
        targets, objective = LORA_VARIANTS[wc.get("lora_variant", "lora")]
        return {"model": model_dir(model), "task": wc["task"], "out": lora_adapter(model, wc["task"],
                wc.get("lora_variant", "lora"), tag), "data_dir": data, "targets": targets, "objective": objective,
                **(cfg["vlm"]["train_lora"] if is_vlm(cfg, model) else stage_options(cfg, "train_lora")), "seed": seed, "dtype": model_setting(cfg, model, "dtype"),
                "device": cfg["device"]}
    if stage == "select-expert":
        return {"candidates": [svf_kl_dir(model, wc["task"], k, tag) for k in cfg["train_svf"]["kl_sweep"]],
                "out": os.path.dirname(svf_expert(model, wc["task"], "svf", tag))}
    if stage == "fit-fewshot":
        source = wc.get("source")
        return {"model": model_dir(model), "svd": svd_path(model, cfg["svd"]["targets"]),
                "experts": experts_arg(source or model, "svf", tag), "task": wc["task"],
                "out": os.path.dirname(fewshot_alpha(model, wc["task"], source, tag)), "data_dir": data,
                **stage_options(cfg, "fewshot"), "seed": seed, "backend": model_setting(cfg, model, "backend"),
                "dtype": model_setting(cfg, model, "dtype"), "device": cfg["device"],
                "allow_code_execution": cfg["allow_code_execution"], "allow_cross_model": source is not None,
                "svf_precision": cfg["svf_precision"], "reported_limit": cfg["evaluate"]["limit"]}
    if stage == "evaluate":
        return _evaluate_values(cfg, model, wc["method"], wc["task"], tag)
    if stage in ("tables", "figures", "vlm-report"):
        return {}
    raise ValueError(f"no workflow job runs the stage {stage!r}")


def _evaluate_values(cfg: Mapping[str, Any], model: str, method: str, task: str,
                     tag: int | str | None = None) -> dict[str, Any]:
    ev = cfg["vlm"]["evaluate"] if is_vlm(cfg, model) else cfg["evaluate"]
    ev = {"limit": None, "max_new_tokens": None, "batch_size": 8, **ev}
    spec = cell_spec(cfg, model, method, task, tag)
    args: dict[str, Any] = {"backend": model_setting(cfg, model, "backend"), "dtype": model_setting(cfg, model, "dtype"),
                            "device": cfg["device"], "batch_size": ev["batch_size"], **spec.model_args}
    if ev["max_new_tokens"] is not None and "dispatch" in spec.model_args:
        args["cls_max_new_tokens"] = ev["max_new_tokens"]  # the first pass gets the same cap
    if model_setting(cfg, model, "tensor_parallel_size") > 1:
        args["tensor_parallel_size"] = model_setting(cfg, model, "tensor_parallel_size")
    return {"model": model_dir(model), "method": method, "task": task, "data_dir": cfg["data"]["dir"],
            "out": cell_path(model, method, task, tag), "split": spec.split, "model_args": format_model_args(args),
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


def protocol_env(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The environment every job runs under: the config's protocol (and knob overrides), read by
    every layer that is not given the protocol explicitly (t2eval.protocol.default_protocol/env_overrides)."""
    import json

    from . import protocol

    env = {protocol.ENV_VAR: protocol.check(cfg.get("protocol"))}
    over = cfg.get("protocol_overrides") or {}
    if over:
        protocol.settings(env[protocol.ENV_VAR], over)  # unknown knobs fail here, naming them
        env[protocol.OVERRIDES_ENV_VAR] = json.dumps(dict(over), sort_keys=True)
    return env


def stage_shell(cfg: Mapping[str, Any], stage: str, **wildcards: str) -> str:
    """`T2EVAL_PROTOCOL=<p> [T2EVAL_PROTOCOL_OVERRIDES=<json>] t2eval <stage> ...` as one shell-quoted
    command line (the protocol prefix is the one place the workflow passes the protocol on)."""
    import shlex

    env = [f"{k}={shlex.quote(v)}" for k, v in protocol_env(cfg).items()]
    return " ".join([*env, shlex.join(["t2eval", stage, *stage_argv(cfg, stage, **wildcards)])])


def _stage_config_class(stage: str):
    import importlib

    from .cli import COMMANDS

    if stage not in COMMANDS:
        raise ValueError(f"unknown t2eval subcommand {stage!r}")
    module = importlib.import_module(COMMANDS[stage][0])
    return getattr(module, "CONFIG", None), module


