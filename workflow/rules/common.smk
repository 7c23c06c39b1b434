# Configuration (validated with a clear message per bad key), the cell plan, shared helpers.
import os
import re

from snakemake.utils import validate

from t2eval import plan as P
from t2eval import resources_plan as _RP
from t2eval.errors import T2EvalError
from t2eval.workflow_config import SCHEMA, load as _load_config

validate(config, str(SCHEMA), set_default=False)
try:
    CFG = _load_config(config, source="workflow config")
except T2EvalError as e:
    raise WorkflowError(str(e)) from None

CELLS = P.cells(CFG)
DATA_DIR = CFG["data"]["dir"]
DATA_MANIFEST = f"{DATA_DIR}/manifest.json"
# Every shell sets OMP_NUM_THREADS/MKL_NUM_THREADS from the rule's `threads`: one BLAS/OpenMP pool per
# job (oversubscribed CPU threads made generation ~4x slower here).
THREADS = "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
# MBPP/HumanEval rewards and scores run model-written code (sandboxed); only with the config's opt-in
CODE_OPT_IN = "HF_ALLOW_CODE_EVAL=1 " if CFG["allow_code_execution"] else ""
ENV = "../envs/t2eval.yaml"
# the paper's LLM tables and figures (`rule all` asks for them only when models lists an LLM) ...
TABLES = expand("results/tables/table{n}.{ext}", n=[1, 2, 3, 4, 5], ext=["md", "csv", "tex"])
FIGURES = [
    "results/figures/fig4_learning_curves.png",
    "results/figures/fig6_dispatch_confusion.png",
    "results/figures/fig7_alpha.png",
]
# ... and the VLM experiment's (Figure 5, workflow/rules/vlm.smk) when vlm.models lists a model
VLM_OUTPUTS = ([f"results/tables/table_vlm.{ext}" for ext in ("md", "csv", "tex")]
               + ["results/figures/fig5_vlm.png", "results/figures/fig5_vlm.csv"]) if CFG["vlm"]["models"] else []

# '+' appears in method names (svf-mlp+attn); models never contain '/'; task keys are [a-z0-9_]
# (so <task>.json and <task>.seed<k>.json never match each other's rule); {seed}: a further seed's
# artefacts and cells (t2eval.plan: the first seed keeps the single-seed layout)
wildcard_constraints:
    model="[^/]+",
    method="[^/]+",
    task="[a-z0-9_]+",
    seed="[0-9]+",
    targets="mlp|attn|mlp\\+attn",
    svf_variant="|".join(map(re.escape, P.SVF_VARIANTS)),
    lora_variant="|".join(map(re.escape, P.LORA_VARIANTS)),


def res(stage, key, default=None):
    """The config's resources.<stage>.<key>. mem_mb the config does not set (the schema's default does not
    count) is the `t2eval plan --resources` estimate for the job's model (t2eval.resources_plan.mem_mb)."""
    if key == "mem_mb" and "mem_mb" not in (config.get("resources") or {}).get(stage, {}):

        def mem_mb(wildcards):
            return _RP.mem_mb(CFG, stage, wildcards.get("model"), wildcards.get("targets"))

        return mem_mb
    return CFG["resources"].get(stage, {}).get(key, default)


def gpus(stage, model=None):
    # no GPUs on the CPU device; a model override (e.g. llama3-70b: 4) wins over the stage default
    if CFG["device"] == "cpu":
        return 0
    over = CFG["models_overrides"].get(model, {}).get("gpus") if model else None
    return over if over is not None else res(stage, "gpus", 0)


def model_opt(model, key):
    return P.model_setting(CFG, model, key)


def stage_cmd(stage):
    """Input function of params.cmd: the job's `T2EVAL_PROTOCOL=<p> t2eval <stage> ...` line, built by
    t2eval.plan from the config and the job's wildcards (flags rendered by the stage's own option
    dataclass; the protocol prefix from the config's protocol/protocol_overrides)."""

    def cmd(wildcards):
        return P.stage_shell(CFG, stage, **dict(wildcards.items()))

    cmd.__name__ = f"{stage.replace('-', '_')}_cmd"
    return cmd
