"""The lm-eval model `t2`: equivalence with stock `hf`, SVF experts, two-pass grouping/order, timing,
the stock-CLI plugin, and `t2eval evaluate` (tiny model, greedy, fp32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOCS = [{"q": f"What is {a} plus {b}?", "a": str(a + b), "choices": [str(a + b), str(a + b + 1), str(a * b)],
         "label": 0} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]

GEN_YAML = """task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["NEVER-STOP-HERE"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""
MC_YAML = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def toy_tasks(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toy_tasks")
    data = d / "toy.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    (d / "toy_gen.yaml").write_text(GEN_YAML.format(data=data))
    (d / "toy_mc.yaml").write_text(MC_YAML.format(data=data))
    return d


@pytest.fixture(scope="module")
def experts(svd_path, tmp_path_factory) -> dict[str, str]:
    """const: constant z (= base weights under the code parameterisation); math/code/reasoning: random z."""
    import torch

    from t2eval.svd import load_svd
    from t2eval.svf import ExpertVector

    svd = load_svd(svd_path)
    root = tmp_path_factory.mktemp("experts")
    out = {}
    for i, name in enumerate(["const", "math", "code", "reasoning"]):
        g = torch.Generator().manual_seed(100 + i)
        z = {n: (torch.full((svd.rank(n),), 0.7) if name == "const"
                 else 3.0 * torch.randn(svd.rank(n), generator=g)) for n in svd.names}
        p = root / name / "z.safetensors"
        ExpertVector.from_svd(z, svd, param="code", task=name).save(p)
        out[name] = str(p.parent)
    return out


def _run(model, tasks_dir, tasks, limit=6, **model_args):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import t2eval.lm  # noqa: F401  registers "t2"

    tm = TaskManager(include_path=str(tasks_dir))
    if isinstance(model, str):
        res = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=tm,
                                      limit=limit, apply_chat_template=True, log_samples=True, device="cpu",
                                      batch_size=8)
    else:
        res = lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=tm, limit=limit,
                                      apply_chat_template=True, log_samples=True)
    return res


def _resps(res, task):
    return [(s["doc_id"], s["resps"]) for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def stock(tiny, toy_tasks):
    return _run("hf", toy_tasks, ["toy_gen", "toy_mc"], pretrained=str(tiny), dtype="float32")


def test_t2_adapter_none_equals_stock_hf(stock, tiny, toy_tasks):
    res = _run("t2", toy_tasks, ["toy_gen", "toy_mc"], pretrained=str(tiny), dtype="float32")
    for task in ("toy_gen", "toy_mc"):
        assert _resps(res, task) == _resps(stock, task)
        assert res["results"][task] == stock["results"][task]
    # the generations are not trivially empty, so equality means something
    assert any(r[0][0] for _, r in _resps(res, "toy_gen"))


def test_constant_z_expert_gives_base_outputs(stock, tiny, toy_tasks, svd_path, experts):
    from t2eval.lm import T2LM

    lm = T2LM(pretrained=str(tiny), adapter=f"svf:{experts['const']}", svd=str(svd_path), batch_size=8)
    res = _run(lm, toy_tasks, ["toy_gen", "toy_mc"])
    assert _resps(res, "toy_gen") == _resps(stock, "toy_gen")
    # loglikelihoods: W' = U diag(σ) Vᵀ reconstructs W up to fp32 rounding
    for (_, a), (_, b) in zip(_resps(res, "toy_mc"), _resps(stock, "toy_mc")):
        for x, y in zip(a, b):
            assert x[0][0] == pytest.approx(y[0][0], abs=1e-4) and x[0][1] == y[0][1]
    rec = lm.t2_records["toy_gen"]
    assert rec["first_pass_s"] is None and rec["second_pass_s"] > 0 and rec["tokens_second"] > 0
    assert {d["chosen"] for d in rec["dispatch"]} == {"svf"}


def test_random_expert_changes_outputs(stock, tiny, toy_tasks, svd_path, experts):
    from t2eval.lm import T2LM

    lm = T2LM(pretrained=str(tiny), adapter=f"svf:{experts['math']}", svd=str(svd_path), batch_size=8)
    res = _run(lm, toy_tasks, ["toy_mc"])
    assert [r for _, r in _resps(res, "toy_mc")] != [r for _, r in _resps(stock, "toy_mc")]


def test_second_pass_groups_interleaved_and_keeps_order(tiny, svd_path, experts):
    """Documents dispatched to interleaved experts come back in request order, each answered with
    its own expert: compare with answering every request alone under that expert."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from t2eval.lm import T2LM

    # protocol corrected: "other" → base weights (the release's "last expert loaded": test_release_dispatch.py)
    lm = T2LM(pretrained=str(tiny), strategy="prompt", svd=str(svd_path), batch_size=8, protocol="corrected",
              experts=";".join(f"{n}:{experts[n]}" for n in ("math", "code", "reasoning")))
    gk = {"until": ["NEVER-STOP-HERE"], "max_gen_toks": 5, "do_sample": False}
    prompts = [lm.apply_chat_template([{"role": "user", "content": d["q"]}]) for d in DOCS]
    reqs = [Instance("generate_until", DOCS[i], (prompts[i], dict(gk)), i, ("toy", i, 1)) for i in range(6)]
    chosen = {0: "math", 1: "other", 2: "code", 3: "math", 4: "reasoning", 5: "code"}
    rec = lm._t2_record("toy")
    out = lm._t2_second_pass("generate_until", reqs, chosen, True, rec)
    assert rec["groups"] == {"math": 2, "other": 1, "code": 2, "reasoning": 1}
    expected = []
    for i, r in enumerate(reqs):
        e = chosen[i]
        lm._t2_set_scales(lm.t2_bank.scales(experts[e]) if e != "other" else None)
        expected.append(HFLM.generate_until(lm, [r], disable_tqdm=True)[0])
    lm._t2_set_scales(None)
    assert out == expected
    assert len(set(expected)) > 1  # the experts really differ
    assert rec["second_pass_s"] > 0 and rec["swap_s"] > 0


def test_two_pass_prompt_strategy_records(tiny, toy_tasks, svd_path, experts):
    pytest.importorskip("t2eval.tasks.cls")
    from t2eval.lm import T2LM

    lm = T2LM(pretrained=str(tiny), strategy="prompt", svd=str(svd_path), cls_max_new_tokens=8, batch_size=8,
              experts=";".join(f"{n}:{experts[n]}" for n in ("math", "code", "reasoning")))
    res = _run(lm, toy_tasks, ["toy_gen", "toy_mc"], limit=4)
    for task in ("toy_gen", "toy_mc"):
        rec = lm.t2_records[task]
        for k in ("first_pass_s", "second_pass_s", "tokens_first", "tokens_second"):
            assert rec[k] > 0, (task, k)
        assert rec["swap_s"] >= 0
        assert [d["doc_id"] for d in rec["dispatch"]] == [0, 1, 2, 3]  # one dispatch per document
        assert all(d["true_task"] == task and d["chosen"] in ("math", "code", "reasoning", "other")
                   for d in rec["dispatch"])
    assert len(res["samples"]["toy_mc"]) == 4


def test_bad_model_args_are_actionable(tiny, experts):
    from t2eval.errors import T2EvalError
    from t2eval.lm import T2LM

    with pytest.raises(T2EvalError, match="needs the three experts"):
        T2LM(pretrained=str(tiny), strategy="prompt")
    with pytest.raises(T2EvalError, match="adapter="):
        T2LM(pretrained=str(tiny), adapter="svf")
    with pytest.raises(T2EvalError, match="expert vector not found"):
        T2LM(pretrained=str(tiny), adapter="svf:/nonexistent")
    with pytest.raises(T2EvalError, match="svd="):
        T2LM(pretrained=str(tiny), adapter=f"svf:{experts['math']}")


def test_stock_lm_eval_cli_finds_t2(tiny, toy_tasks, tmp_path):
    """`lm_eval run --model t2` (stock console script) via the .pth hook, or `t2eval-lm-eval`."""
    from t2eval import lm_eval_plugin

    exe = Path(sys.executable).parent / ("lm_eval" if lm_eval_plugin.pth_path().exists() else "t2eval-lm-eval")
    r = subprocess.run([str(exe), "run", "--model", "t2", "--model_args", f"pretrained={tiny}", "--device", "cpu",
                        "--tasks", "toy_mc", "--include_path", str(toy_tasks), "--limit", "2",
                        "--apply_chat_template", "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "toy_mc" in r.stdout and "acc" in r.stdout


def test_evaluate_writes_cell(tiny, toy_tasks, tmp_path):
    from t2eval.evaluate import evaluate
    from t2eval.results import read_cell

    out = tmp_path / "raw" / "tiny" / "base" / "toy_mc.json"
    cell = evaluate(tiny, "base", "toy_mc", out, "", lm_eval_task="toy_mc", include_path=str(toy_tasks),
                    limit=5, device="cpu", batch_size=8)
    back = read_cell(out)
    assert back["total"] == 5 and back["correct"] == sum(s["correct"] for s in back["per_sample"])
    assert [s["doc_id"] for s in back["per_sample"]] == [0, 1, 2, 3, 4]
    assert back["timing"]["second_pass_s"] > 0 and back["timing"]["first_pass_s"] is None
    assert back["dispatch"] is None and back["lm_eval"]["results"]["toy_mc"]
    assert cell["provenance"]["inputs"]["model_config_sha256"]
    side = out.with_name("toy_mc.lm_eval")
    assert (side / "results.json").exists() and len((side / "samples.jsonl").read_text().splitlines()) == 5


def test_parse_model_args_keeps_comma_lists():
    from t2eval.evaluate import parse_model_args

    a = parse_model_args("strategy=prompt,experts=math:a/b,code:c,reasoning:d,svd=s.safetensors")
    assert a == {"strategy": "prompt", "experts": "math:a/b,code:c,reasoning:d", "svd": "s.safetensors"}
    from t2eval.adapt.experts import parse_experts

    assert parse_experts(a["experts"]) == {"math": "a/b", "code": "c", "reasoning": "d"}
    assert parse_experts("math:a;code:c") == {"math": "a", "code": "c"}


def test_plugin_hook_keeps_stock_models_visible():
    """The .pth hook (scripts/setup.sh installs it) registers t2 without hiding lm-eval's own models."""
    import subprocess
    import sys

    code = "from lm_eval.api.registry import get_model; print(get_model('hf').__name__, get_model('t2').__name__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "HFLM" in r.stdout and "T2LM" in r.stdout
