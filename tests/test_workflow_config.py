"""Workflow configuration validation and the cell plan (no model runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import snakemake_job_counts

from t2eval import plan as P
from t2eval.errors import T2EvalError
from t2eval.workflow_config import load

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {n: yaml.safe_load((REPO / "workflow" / "config" / f"{n}.yaml").read_text()) for n in ("default", "paper", "micro")}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_are_valid(name):
    cfg = load(CONFIGS[name], name)
    assert cfg["models"]


def test_unknown_key_is_reported_with_allowed_keys():
    bad = dict(CONFIGS["default"], train_svf={"iterationz": 3})
    with pytest.raises(T2EvalError) as e:
        load(bad, "default.yaml")
    msg = str(e.value)
    assert "train_svf" in msg and "iterationz" in msg and "allowed keys here" in msg and "iterations" in msg


def test_bad_value_is_reported_with_path():
    with pytest.raises(T2EvalError, match=r"train_svf\.iterations: -1 is less than the minimum of 1"):
        load(dict(CONFIGS["default"], train_svf={"iterations": -1}), "x")
    with pytest.raises(T2EvalError, match=r"svd\.targets: 'mlpp' is not one of"):
        load(dict(CONFIGS["default"], svd={"targets": "mlpp"}), "x")


def test_cross_model_needs_listed_models():
    with pytest.raises(T2EvalError, match="not listed in models"):
        load(dict(CONFIGS["default"], cross_model=[{"source": "llama3-8b", "target": "smollm2-135m"}]), "x")


def test_default_plan_covers_tables_1_to_3():
    cfg = load(CONFIGS["default"])
    counts = P.summary(cfg)
    assert counts == {"base": 6, "lora": 3, "lora-gsm8k": 3, "lora-mbpp": 3, "lora-arc_easy": 3, "svf": 3,
                      "t2-prompt": 3, "t2-cls": 3, "t2-fewshot": 3}


def test_paper_plan_has_ablations_cross_model_and_70b_prompt_only():
    cfg = load(CONFIGS["paper"])
    cells = P.cells(cfg)
    by_model = {m: {c.method for c in cells if c.model == m} for m in cfg["models"]}
    assert {"svf-attn", "svf-mlp+attn", "svf-ntp", "lora-pg", "lora-mlp+attn"} <= by_model["llama3-8b"]
    assert {"xfer-svf", "xfer-svf-shuffled", "xfer-fewshot"} <= by_model["mistral-7b"]
    assert "t2-cls" not in by_model["llama3-70b"] and "t2-prompt" in by_model["llama3-70b"]
    assert P.Cell("llama3-8b", "svf", "math") in cells  # Table 4 row #1 on MATH


def test_cell_specs():
    cfg = load(CONFIGS["paper"])
    s = P.cell_spec(cfg, "llama3-8b", "t2-cls", "math")
    assert s.inputs["cls_expert"] == "experts/llama3-8b/svf/cls/z.safetensors"
    assert s.model_args["strategy"] == "cls" and s.split == "test"
    s = P.cell_spec(cfg, "llama3-8b", "t2-fewshot", "humaneval")
    assert s.split == "fewshot_test" and s.inputs["alpha"].endswith("fewshot/humaneval/alpha.json")
    s = P.cell_spec(cfg, "mistral-7b", "xfer-svf", "gsm8k")
    assert s.model_args["adapter"] == "svf:experts/llama3-8b/svf/gsm8k/z.safetensors"
    s = P.cell_spec(cfg, "mistral-7b", "xfer-svf-shuffled", "math")
    assert s.model_args["strategy"] == "prompt" and s.model_args["shuffle_sigma"] == "42"
    s = P.cell_spec(cfg, "llama3-8b", "svf-ntp", "gsm8k")
    assert s.inputs["svd"] == "svd/llama3-8b-attn.safetensors"
    assert s.inputs["expert"] == "experts/llama3-8b/svf-ntp/gsm8k/z.safetensors"
    s = P.cell_spec(cfg, "llama3-8b", "lora-mbpp", "humaneval")
    assert s.model_args["adapter"] == "lora:experts/llama3-8b/lora/mbpp"


def _dry_run(*args):
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


def test_paper_dag_plans_without_the_hub():
    r = _dry_run("--configfile", "workflow/config/paper.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    c = snakemake_job_counts(r.stdout)
    # 3 LLMs + llava-next-8b (the vlm: block, Figure 5)
    assert c["prepare_model"] == 4 and c["evaluate"] + c["evaluate_seed"] == len(P.cells(load(CONFIGS["paper"])))
    assert c["vlm_report"] == 1
    assert c["fit_fewshot"] == 9 and c["fit_fewshot_cross_model"] == 3
    # as released: λ = 0, one run per expert (11 = 3 models × 3 tasks + cls for the 8B models) + Table 4 variants;
    # seeds [42, 43, 44]: the two further seeds re-run every trained or searched artefact
    # (+ 1: the VLM's TextVQA expert)
    assert "train_svf_kl" not in c and c["train_svf"] == 15 and c["train_svf_seed"] == 2 * 15
    assert c["fit_fewshot_seed"] == 2 * 9 and c["train_lora_seed"] == 2 * c["train_lora"]
    # the paper's λ sweep {0, .1, .2, .3} is the named overlay: 4 runs per (model, task) expert + one selection each
    r = _dry_run("--configfile", "workflow/config/paper.yaml", "workflow/config/paper-kl-sweep.yaml")
    assert r.returncode == 0, r.stderr[-3000:]
    c = snakemake_job_counts(r.stdout)
    # (12 = the 11 LLM experts + the VLM's, swept like them under the overlay)
    assert c["train_svf_kl"] == 4 * c["select_kl"] and c["select_kl"] == 12 and c["train_svf"] == 3


def test_bad_config_stops_snakemake_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(CONFIGS["default"], evaluate={"limit": 0})))
    r = _dry_run("--configfile", str(bad))
    assert r.returncode != 0
    assert "evaluate.limit" in (r.stdout + r.stderr) or "limit" in (r.stdout + r.stderr)


def test_schema_ships_in_the_package_without_defaults():
    import t2eval
    from t2eval.constants import TRAIN_TASKS, UNSEEN_TASKS
    from t2eval.workflow_config import SCHEMA

    assert SCHEMA.is_file() and Path(t2eval.__file__).parent in SCHEMA.resolve().parents
    assert (REPO / "workflow" / "schemas" / "config.schema.yaml").resolve() == SCHEMA.resolve()
    text = SCHEMA.read_text()
    assert "default:" not in text  # defaults live in DEFAULTS or the stage dataclasses, never here
    schema = yaml.safe_load(text)
    assert tuple(schema["definitions"]["task_train"]["enum"]) == TRAIN_TASKS
    assert tuple(schema["definitions"]["task_unseen"]["enum"]) == UNSEEN_TASKS


def test_workflow_defaults_hold_no_stage_options():
    """Stage options (lr, iterations, ...) have one default: the stage's dataclass."""
    from t2eval.workflow_config import DEFAULTS

    for section in ("train_svf", "train_lora", "fewshot"):
        assert set(DEFAULTS[section]) <= P.WORKFLOW_KEYS[section], section
    cfg = load(CONFIGS["micro"])
    assert "lr" not in cfg["train_svf"] and "--lr" not in P.stage_argv(cfg, "train-svf", model="tiny-llama",
                                                                        task="gsm8k", svf_variant="svf")


def test_stage_argv():
    from t2eval.workflow_config import deep_merge

    sweep = yaml.safe_load((REPO / "workflow" / "config" / "paper-kl-sweep.yaml").read_text())
    cfg = load(deep_merge(CONFIGS["paper"], sweep))  # Snakemake merges several --configfile files the same way
    xfer = P.stage_argv(cfg, "fit-fewshot", model="mistral-7b", task="math", source="llama3-8b")
    own = P.stage_argv(cfg, "fit-fewshot", model="mistral-7b", task="math")
    assert "--allow-cross-model" in xfer and "--allow-cross-model" not in own
    assert xfer[xfer.index("--experts") + 1].startswith("math:experts/llama3-8b/svf/gsm8k/")
    assert xfer[xfer.index("--out") + 1] == "experts/mistral-7b/fewshot-from-llama3-8b/math"
    kl = P.stage_argv(cfg, "train-svf", model="llama3-8b", task="mbpp", kl="0.2")
    assert kl[kl.index("--kl-coef") + 1] == "0.2" and kl[kl.index("--out") + 1] == "experts/llama3-8b/svf-kl0.2/mbpp"
    ntp = P.stage_argv(cfg, "train-svf", model="llama3-8b", task="gsm8k", svf_variant="svf-ntp")
    assert ntp[ntp.index("--svd") + 1] == "svd/llama3-8b-attn.safetensors" and "ntp" in ntp
    sel = P.stage_argv(cfg, "select-expert", model="llama3-8b", task="gsm8k")
    assert sel[sel.index("--candidates") + 1:sel.index("--candidates") + 5] == [
        f"experts/llama3-8b/svf-kl{k}/gsm8k" for k in (0.0, 0.1, 0.2, 0.3)]
    ev = P.stage_argv(cfg, "evaluate", model="llama3-70b", method="t2-prompt", task="math")
    assert "tensor_parallel_size=4" in ev[ev.index("--model-args") + 1]
    assert P.stage_shell(cfg, "tables") == "T2EVAL_PROTOCOL=release t2eval tables"  # the default protocol
    with pytest.raises(ValueError, match="unknown t2eval subcommand"):
        P.stage_argv(cfg, "nonsense")


def test_published_numbers_default_to_the_repos_csv(monkeypatch):
    from t2eval.report import published

    monkeypatch.delenv(published.PUBLISHED_ENV, raising=False)
    path = published.default_published_path()
    assert path.resolve() == (REPO / "results" / "published" / "paper_numbers.csv").resolve() and path.is_file()
    assert "/work/shared" not in Path(published.__file__).read_text()


def test_protocol_and_overrides_prefix_every_command():
    import json
    import shlex

    cfg = load(dict(CONFIGS["micro"], protocol="corrected", protocol_overrides={"bos": "double"}))
    line = P.stage_shell(cfg, "train-svf", model="tiny-llama", svf_variant="svf", task="gsm8k")
    tokens = shlex.split(line)
    assert tokens[0] == "T2EVAL_PROTOCOL=corrected" and tokens[2:4] == ["t2eval", "train-svf"]
    assert tokens[1].startswith("T2EVAL_PROTOCOL_OVERRIDES=")
    assert json.loads(tokens[1].split("=", 1)[1]) == {"bos": "double"}
    assert load(CONFIGS["micro"])["protocol"] == "release"  # the default: what produced the published numbers
    from t2eval.protocol import PROTOCOLS
    from t2eval.workflow_config import SCHEMA

    assert tuple(yaml.safe_load(SCHEMA.read_text())["properties"]["protocol"]["enum"]) == PROTOCOLS
    with pytest.raises(T2EvalError, match=r"protocol_overrides: unknown knob\(s\) boss"):
        load(dict(CONFIGS["micro"], protocol_overrides={"boss": "single"}))
    with pytest.raises(T2EvalError, match=r"protocol: 'fixed' is not one of"):
        load(dict(CONFIGS["micro"], protocol="fixed"))


def test_seeds_default_to_the_one_seed_and_replicate_seeded_cells_only():
    one = load(CONFIGS["micro"])
    assert one["seeds"] == [one["seed"]]
    first = P.cells(one)
    assert all(c.seed is None for c in first) and all(".seed" not in c.path for c in first)
    two = load(dict(CONFIGS["micro"], seeds=[42, 7]))
    cells = P.cells(two)
    assert cells[:len(first)] == first  # the first seed keeps the single-seed layout
    extra = cells[len(first):]
    assert {c.method for c in extra} == {c.method for c in first} - {"base"}  # base cells are not seeded
    assert len(extra) == len(first) - sum(c.method == "base" for c in first)
    assert "results/raw/tiny-llama/svf/gsm8k.seed7.json" in {c.path for c in extra}
    spec = P.cell_spec(two, "tiny-llama", "t2-cls", "math", 7)
    assert spec.inputs["cls_expert"] == "experts/tiny-llama/svf/cls/seed7/z.safetensors"
    assert spec.inputs["expert_gsm8k"] == "experts/tiny-llama/svf/gsm8k/seed7/z.safetensors"
    svf = P.stage_argv(two, "train-svf", model="tiny-llama", svf_variant="svf", task="gsm8k", seed="7")
    assert svf[svf.index("--out") + 1] == "experts/tiny-llama/svf/gsm8k/seed7" and svf[svf.index("--seed") + 1] == "7"
    few = P.stage_argv(two, "fit-fewshot", model="tiny-llama", task="math", seed="7")
    assert few[few.index("--out") + 1] == "experts/tiny-llama/fewshot/math/seed7"
    assert "gsm8k/seed7/z.safetensors" in few[few.index("--experts") + 1]
    ev = P.stage_argv(two, "evaluate", model="tiny-llama", method="t2-fewshot", task="math", seed="7")
    assert ev[ev.index("--out") + 1] == "results/raw/tiny-llama/t2-fewshot/math.seed7.json"
    assert "alpha=experts/tiny-llama/fewshot/math/seed7/alpha.json" in ev[ev.index("--model-args") + 1]
    # the first seed's jobs are exactly the single-seed jobs
    assert P.stage_argv(two, "train-lora", model="tiny-llama", lora_variant="lora", task="mbpp") == \
        P.stage_argv(one, "train-lora", model="tiny-llama", lora_variant="lora", task="mbpp")
    with pytest.raises(T2EvalError, match="seeds"):
        load(dict(CONFIGS["micro"], seeds=[1, 1]))
