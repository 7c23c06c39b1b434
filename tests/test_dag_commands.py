"""Every command the workflow would run parses with the real `t2eval <subcommand>` parser.

Dry-runs the DAG of each shipped config (`snakemake -n -p`), takes each job's shell command,
splits it like the shell does and parses the `t2eval <sub> ...` part with `t2eval.cli`'s own
parser for that subcommand: a flag a rule passes but the subcommand lacks (argparse exit) fails
here, naming the rule and the command, instead of hours into a GPU run."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import snakemake_shell_commands

from t2eval.cli import COMMANDS, subcommand_parser

REPO = Path(__file__).resolve().parent.parent
ENV_PREFIX = ("OMP_NUM_THREADS=", "MKL_NUM_THREADS=", "HF_ALLOW_CODE_EVAL=", "T2EVAL_PROTOCOL=", "T2EVAL_PROTOCOL_OVERRIDES=")


def dry_run_commands(config: str, workdir: Path) -> list[tuple[str, str]]:
    """(rule, shell command) of every job `snakemake -n -p` plans for `config`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    files = ["paper", "paper-kl-sweep"] if config == "paper-kl-sweep" else [config]  # the sweep is an overlay
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "2", "-s", str(REPO / "Snakefile"),
                        "-d", str(workdir), "--configfile",
                        *[str(REPO / "workflow" / "config" / f"{f}.yaml") for f in files]],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return snakemake_shell_commands(r.stdout)


def t2eval_argv(rule: str, cmd: str) -> tuple[str, list[str]]:
    """(subcommand, its arguments) of a rule's command: env settings, `t2eval SUB ARGS`, `2> LOG`."""
    tokens = shlex.split(cmd)
    if "2>" in tokens:
        tokens = tokens[:tokens.index("2>")]
    assert "t2eval" in tokens, f"rule {rule} runs no t2eval subcommand: {cmd}"
    i = tokens.index("t2eval")
    assert all(t.startswith(ENV_PREFIX) for t in tokens[:i]), f"rule {rule}: unexpected shell before t2eval: {cmd}"
    assert tokens[i + 1] in COMMANDS, f"rule {rule}: unknown subcommand {tokens[i + 1]!r} in {cmd}"
    return tokens[i + 1], tokens[i + 2:]


def parse_or_fail(rule: str, cmd: str):
    sub, args = t2eval_argv(rule, cmd)
    try:
        return sub, subcommand_parser(sub).parse_args(args)
    except SystemExit as e:
        pytest.fail(f"rule {rule}: `t2eval {sub}` rejects its arguments (argparse exit {e.code}; see stderr above):\n"
                    f"  {cmd}")


@pytest.mark.parametrize("config", ["paper", "paper-kl-sweep", "default", "micro", "cpu-study", "vlm-demo"])
def test_every_dag_command_parses(config, tmp_path):
    jobs = dry_run_commands(config, tmp_path)
    assert jobs
    parsed = [(rule, *parse_or_fail(rule, cmd)) for rule, cmd in jobs]
    rules = {rule for rule, _, _ in parsed}
    if config == "cpu-study":  # one expert (ARC-Easy), 3 seeds; ARC-Challenge scored with that expert
        assert rules == {"prepare_model", "prepare_data", "decompose", "train_svf", "train_svf_seed", "evaluate",
                         "evaluate_seed", "tables", "figures"}
        evals = [ns for rule, _, ns in parsed if rule.startswith("evaluate")]
        assert sorted((ns.method, ns.task) for ns in evals) == sorted(
            [("base", "arc_easy"), ("base", "arc_challenge")] + 3 * [("svf", "arc_easy"), ("svf-domain", "arc_challenge")])
        domain = sorted(ns.model_args for ns in evals if ns.method == "svf-domain")
        assert [a.count("svf/arc_easy") for a in domain] == [1, 1, 1] and len(set(domain)) == 3  # one per seed
        assert all(ns.limit == 400 for ns in evals)
        return
    if config == "vlm-demo":  # the embedded VLM only: its model after SmolLM2's, VQA data, half the layers
        assert rules == {"prepare_model", "prepare_data", "decompose", "train_svf", "train_lora", "evaluate", "vlm_report"}
        assert {ns.model for rule, _, ns in parsed if rule == "prepare_model"} == {"smollm2-135m", "smollm2-llava"}
        prep = next(ns for rule, _, ns in parsed if rule == "prepare_data")
        assert prep.datasets == "synth_textvqa" and prep.synth_textvqa_sizes == "train=400,valid=48,test=200"
        dec = next(ns for rule, _, ns in parsed if rule == "decompose")
        assert dec.layers == "half" and dec.model == "models/smollm2-llava"
        train = next(ns for rule, _, ns in parsed if rule == "train_svf")
        assert train.task == "synth_textvqa" and train.svd == "svd/smollm2-llava-mlp.safetensors"
        evals = {ns.method: ns for rule, _, ns in parsed if rule == "evaluate"}
        assert set(evals) == {"base", "svf", "lora"} and all(ns.task == "synth_textvqa" for ns in evals.values())
        assert "experts/smollm2-llava/svf/synth_textvqa/z.safetensors" in evals["svf"].model_args
        lora = next(ns for rule, _, ns in parsed if rule == "train_lora")  # vlm.train_lora's options, not train_lora's
        assert (lora.task, lora.iterations, lora.lr, lora.eval_limit) == ("synth_textvqa", 16, 5e-4, 48)
        assert "adapter=lora:experts/smollm2-llava/lora/synth_textvqa" in evals["lora"].model_args
        return
    assert {"prepare_model", "prepare_data", "decompose", "train_svf", "train_lora", "fit_fewshot", "evaluate",
            "tables", "figures"} <= rules
    if config == "paper-kl-sweep":
        assert {"train_svf_kl", "select_kl"} <= rules
    if config == "paper":  # Table 5: few-shot α of Mistral over Llama's experts
        xfer = [ns for rule, _, ns in parsed if rule == "fit_fewshot_cross_model"]
        assert len(xfer) == 3 and all(ns.allow_cross_model and "llama3-8b/svf" in ns.experts for ns in xfer)
        own = [ns for rule, _, ns in parsed if rule == "fit_fewshot"]
        assert own and not any(ns.allow_cross_model for ns in own)
        assert "train_svf_kl" not in rules  # as released: λ = 0, one run (the sweep is paper-kl-sweep.yaml)
        assert {"train_svf_seed", "fit_fewshot_seed", "evaluate_seed"} <= rules  # seeds [42, 43, 44]
        vlm = [(rule, ns) for rule, _, ns in parsed if "llava-next-8b" in str(getattr(ns, "model", ""))]
        assert {r for r, _ in vlm} >= {"prepare_model", "decompose", "train_svf", "train_svf_seed", "evaluate",
                                       "evaluate_seed"}
        assert {(ns.method, ns.task) for r, ns in vlm if r.startswith("evaluate")} == {
            (m, t) for m in ("base", "svf") for t in ("textvqa", "okvqa")}
        assert all("backend=hf" in ns.model_args for r, ns in vlm if r.startswith("evaluate"))
        assert next(ns for r, ns in vlm if r == "decompose").layers == "half"


def test_a_flag_the_subcommand_lacks_fails_naming_the_rule():
    cmd = "OMP_NUM_THREADS=1 t2eval fit-fewshot --model m --svd s --experts e --task math --out o --no-such-flag 2> x"
    with pytest.raises(pytest.fail.Exception, match="rule fit_fewshot_cross_model"):
        parse_or_fail("fit_fewshot_cross_model", cmd)
