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

EXPERT_OF_TASK = {"gsm8k": "math", "mbpp": "code", "arc_easy": "reasoning"}
TASK_OF_EXPERT = {v: k for k, v in EXPERT_OF_TASK.items()}
TRAIN_TASKS = ("gsm8k", "mbpp", "arc_easy")
UNSEEN_TASKS = ("math", "humaneval", "arc_challenge")
# Table 4: which trained artefact each ablation row evaluates (all trained on GSM8K)
ABLATION = {
    "svf-attn": ("svf-attn", "attn", "pg"),
    "svf-mlp+attn": ("svf-mlp+attn", "mlp+attn", "pg"),
    "svf-ntp": ("svf-ntp", "attn", "ntp"),
    "lora-pg": ("lora-pg", "attn", "pg"),
    "lora-mlp+attn": ("lora-mlp+attn", "mlp+attn", "ntp"),
}


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
    ev = cfg["evaluate"]
    out: list[Cell] = []
    for model in cfg["models"]:
        allowed = cfg.get("models_overrides", {}).get(model, {}).get("methods")
        methods = [m for m in ev["methods"] if allowed is None or m in allowed]
        for m in methods:
            if m in ("base", "lora", "svf"):
                out += [Cell(model, m, t) for t in ev["train_tasks"]]
            if m == "base":
                out += [Cell(model, m, t) for t in ev["unseen_tasks"]]
            if m == "lora":  # Table 2: best of the task-LoRAs per unseen task
                out += [Cell(model, f"lora-{src}", t) for src in cfg["train_lora"]["tasks"] for t in ev["unseen_tasks"]]
            if m in ("t2-prompt", "t2-cls", "t2-fewshot"):
                tasks = [t for t in ev["unseen_tasks"] if m != "t2-fewshot" or t in cfg["fewshot"]["tasks"]]
                out += [Cell(model, m, t) for t in tasks]
    ab = cfg["ablations"]
    for model in ab["models"]:
        for m in ab["methods"]:
            out += [Cell(model, m, t) for t in ab["tasks"]]
        if "math" in ab["tasks"]:  # rows #1 and #6 on MATH: the GSM8K SVF expert / GSM8K LoRA
            out += [Cell(model, "svf", "math"), Cell(model, "lora-gsm8k", "math")]
    for x in cfg["cross_model"]:
        for m in x.get("methods", ["xfer-svf", "xfer-svf-shuffled", "xfer-fewshot"]):
            tasks = x.get("tasks", [*TRAIN_TASKS, *UNSEEN_TASKS])
            if m == "xfer-fewshot":
                tasks = [t for t in tasks if t in UNSEEN_TASKS]
            out += [Cell(x["target"], m, t) for t in tasks]
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def _experts_arg(model: str, variant: str = "svf") -> str:
    return ",".join(f"{EXPERT_OF_TASK[t]}:{svf_expert(model, t, variant)}" for t in TRAIN_TASKS)


def cell_spec(cfg: Mapping[str, Any], model: str, method: str, task: str) -> CellSpec:
    """Files a cell depends on and the `t2` model_args that evaluate it."""
    spec = CellSpec(inputs={"model": model_marker(model), "data": f"{cfg['data']['dir']}/manifest.json"})
    targets = cfg["svd"]["targets"]
    svd = svd_path(model, targets)
    args = spec.model_args

    def use_experts(expert_model: str, variant: str = "svf") -> None:
        spec.inputs.update({f"expert_{t}": svf_expert(expert_model, t, variant) for t in TRAIN_TASKS})
        args["experts"] = _experts_arg(expert_model, variant)

    if method == "base":
        pass
    elif method == "svf":
        src = task if task in TRAIN_TASKS else "gsm8k"  # Table 4 row #1 on MATH: the GSM8K expert
        spec.inputs.update(svd=svd, expert=svf_expert(model, src))
        args.update(adapter=f"svf:{svf_expert(model, src)}", svd=svd)
    elif method == "lora":
        spec.inputs["adapter"] = lora_marker(model, task)
        args["adapter"] = f"lora:{lora_adapter(model, task)}"
    elif method.startswith("lora-") and method[5:] in TRAIN_TASKS:
        spec.inputs["adapter"] = lora_marker(model, method[5:])
        args["adapter"] = f"lora:{lora_adapter(model, method[5:])}"
    elif method in ("t2-prompt", "t2-cls", "t2-fewshot"):
        spec.inputs["svd"] = svd
        args["svd"] = svd
        use_experts(model)
        args["strategy"] = method[3:]
        if method == "t2-cls":
            spec.inputs["cls_expert"] = svf_expert(model, cls_task(cfg))
            args["cls_expert"] = spec.inputs["cls_expert"]
        if method == "t2-fewshot":
            spec.inputs["alpha"] = fewshot_alpha(model, task)
            args["alpha"] = spec.inputs["alpha"]
            spec.split = "fewshot_test"
        if method != "t2-fewshot":
            args["dispatch"] = cfg["evaluate"]["dispatch"]
    elif method in ABLATION:
        variant, tgt, _ = ABLATION[method]
        if variant.startswith("svf"):
            spec.inputs.update(svd=svd_path(model, tgt), expert=svf_expert(model, "gsm8k", variant))
            args.update(adapter=f"svf:{spec.inputs['expert']}", svd=spec.inputs["svd"])
        else:
            spec.inputs["adapter"] = lora_marker(model, "gsm8k", variant)
            args["adapter"] = f"lora:{lora_adapter(model, 'gsm8k', variant)}"
    elif method in ("xfer-svf", "xfer-svf-shuffled", "xfer-fewshot"):
        source = _source_of(cfg, model)
        spec.inputs["svd"] = svd
        args.update(svd=svd, cross_model="true")
        if method == "xfer-svf-shuffled":
            args["shuffle_sigma"] = str(cfg["seed"])
        if method == "xfer-fewshot":
            use_experts(source)
            spec.inputs["alpha"] = fewshot_alpha(model, task, source)
            args.update(strategy="fewshot", alpha=spec.inputs["alpha"])
            spec.split = "fewshot_test"
        elif task in TRAIN_TASKS:  # Table 9: the source model's expert of this task
            spec.inputs["expert"] = svf_expert(source, task)
            args["adapter"] = f"svf:{spec.inputs['expert']}"
        else:  # Table 5: the Prompt strategy over the source model's experts
            use_experts(source)
            args.update(strategy="prompt", dispatch=cfg["evaluate"]["dispatch"])
    else:
        raise ValueError(f"unknown method {method!r}")
    return spec


def format_model_args(args: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in args.items())


def summary(cfg: Mapping[str, Any]) -> dict[str, int]:
    """Cell counts per method (used in notes and tests)."""
    counts: dict[str, int] = {}
    for c in cells(cfg):
        counts[c.method] = counts.get(c.method, 0) + 1
    return counts
