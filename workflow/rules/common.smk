# Configuration (validated with a clear message per bad key), the cell plan, shared helpers.
import os
import shlex

from snakemake.utils import validate

from t2eval import plan as P
from t2eval.errors import T2EvalError
from t2eval.workflow_config import load as _load_config

validate(config, workflow.source_path("../schemas/config.schema.yaml"), set_default=False)
try:
    CFG = _load_config(config, source="workflow config")
except T2EvalError as e:
    raise WorkflowError(str(e)) from None

CELLS = P.cells(CFG)
DATA_DIR = CFG["data"]["dir"]
DATA_MANIFEST = f"{DATA_DIR}/manifest.json"
T2 = "t2eval"
# Every shell sets OMP_NUM_THREADS/MKL_NUM_THREADS from the rule's `threads`: one BLAS/OpenMP pool per
# job (oversubscribed CPU threads made generation ~4x slower here).
# MBPP/HumanEval rewards and scores run model-written code (sandboxed); only with the config's opt-in
CODE_OPT_IN = "HF_ALLOW_CODE_EVAL=1 " if CFG["allow_code_execution"] else ""
ENV = "../envs/t2eval.yaml"
TABLES = expand("results/tables/table{n}.{ext}", n=[1, 2, 3, 4, 5], ext=["md", "csv", "tex"])
FIGURES = [
    "results/figures/fig4_learning_curves.png",
    "results/figures/fig6_dispatch_confusion.png",
    "results/figures/fig7_alpha.png",
]

# '+' appears in method names (svf-mlp+attn); tasks and models never contain '/'
wildcard_constraints:
    model="[^/]+",
    method="[^/]+",
    task="[^/]+",
    targets="mlp|attn|mlp\\+attn",
    svf_variant="svf|svf-attn|svf-mlp\\+attn|svf-ntp",
    lora_variant="lora|lora-pg|lora-mlp\\+attn",


def res(stage, key, default=None):
    return CFG["resources"].get(stage, {}).get(key, default)


def gpus(stage, model=None):
    # no GPUs on the CPU device; a model override (e.g. llama3-70b: 4) wins over the stage default
    if CFG["device"] == "cpu":
        return 0
    over = CFG["models_overrides"].get(model, {}).get("gpus") if model else None
    return over if over is not None else res(stage, "gpus", 0)


def model_opt(model, key):
    return P.model_setting(CFG, model, key)


def q(s):
    return shlex.quote(str(s))
