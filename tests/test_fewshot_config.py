"""The shipped workflow configs' few-shot, precision, λ and protocol settings (issue 8.7, 8.9, 8.11):
paper.yaml runs CEM as the code release (per-layer α, not normalised, 50 iterations), bf16 SVF
arithmetic and a single λ = 0 run; the λ sweep is the named overlay paper-kl-sweep.yaml; the embedded
default stays fp32; every config names its protocol."""

from __future__ import annotations

from pathlib import Path

import yaml

from t2eval import plan as P
from t2eval.workflow_config import deep_merge, load

CONFIG_DIR = Path(__file__).resolve().parent.parent / "workflow" / "config"


def _yaml(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())


def test_every_shipped_config_names_the_release_protocol():
    for name in ("default", "paper", "micro"):
        raw = _yaml(name)
        assert raw["protocol"] == "release" and raw["protocol_overrides"] == {}, name


def test_paper_runs_fewshot_precision_and_lambda_as_released():
    raw = _yaml("paper")
    assert {k: raw["fewshot"][k] for k in ("per", "normalise", "iterations")} == {
        "per": "matrix", "normalise": False, "iterations": 50}
    assert raw["svf_precision"] == "bf16" and _yaml("default")["svf_precision"] == "fp32"
    assert raw["train_svf"]["kl_coef"] == 0 and "kl_sweep" not in raw["train_svf"]
    cfg = load(raw, "paper.yaml")
    argv = P.stage_argv(cfg, "fit-fewshot", model="llama3-8b", task="math")
    assert argv[argv.index("--per") + 1] == "matrix" and argv[argv.index("--iterations") + 1] == "50"
    assert "--normalise" not in argv
    # λ = 0, one run: no sweep jobs, no selection among λ
    assert cfg["train_svf"]["kl_sweep"] == []
    svf = P.stage_argv(cfg, "train-svf", model="llama3-8b", task="gsm8k", svf_variant="svf")
    assert "--kl-coef" not in svf or svf[svf.index("--kl-coef") + 1] in ("0", "0.0")


def test_the_kl_sweep_is_a_named_overlay_of_paper():
    sweep = _yaml("paper-kl-sweep")
    assert "models" not in sweep  # an overlay: everything else comes from paper.yaml
    cfg = load(deep_merge(_yaml("paper"), sweep), "paper.yaml + paper-kl-sweep.yaml")
    assert cfg["name"] == "paper-kl-sweep" and cfg["train_svf"]["kl_sweep"] == [0.0, 0.1, 0.2, 0.3]
    assert cfg["fewshot"]["per"] == "matrix" and cfg["svf_precision"] == "bf16"
    sel = P.stage_argv(cfg, "select-expert", model="llama3-8b", task="gsm8k")
    assert sel[sel.index("--candidates") + 1:sel.index("--candidates") + 5] == [
        f"experts/llama3-8b/svf-kl{k}/gsm8k" for k in (0.0, 0.1, 0.2, 0.3)]
