"""The strategy registry (t2eval.adapt.strategies): what it knows equals what the schema accepts,
its validation, and that a new strategy is one class + one registry line — a toy "oracle"
strategy defined here runs through the real `t2` model, `t2eval evaluate` and the plan."""

from __future__ import annotations

import pytest

from t2eval.adapt import strategies as S
from t2eval.errors import T2EvalError


# ----------------------------------------------------------------------------- registry facts

def _schema_enums() -> dict[str, set[str]]:
    from t2eval import workflow_config
    from t2eval.config import load_yaml

    props = load_yaml(workflow_config.SCHEMA)["properties"]
    return {"evaluate": set(props["evaluate"]["properties"]["methods"]["items"]["enum"]),
            "ablations": set(props["ablations"]["properties"]["methods"]["items"]["enum"]),
            "cross_model": set(props["cross_model"]["items"]["properties"]["methods"]["items"]["enum"])}


def test_schema_method_enums_equal_the_registry():
    enums = _schema_enums()
    for section in S.SECTIONS:
        assert enums[section] == set(S.methods_of(section)), section
    # every cell method is a config method or derived from one (the task-LoRAs of Table 2)
    assert set(S.known_methods()) == set().union(*enums.values()) | {"lora-gsm8k", "lora-mbpp", "lora-arc_easy"}


def test_registry_names_flags_and_errors():
    from t2eval.lm import T2Config

    assert S.strategy_names() == ["none", "prompt", "cls", "fewshot"]
    assert S.adapter_kinds() == ["svf", "lora"]
    assert {n for n, c in S.registered().items() if c.two_pass} == {"prompt", "cls"}
    assert S.two_pass_methods() == {"t2-prompt": "Prompt", "t2-cls": "Cls-expert"}
    assert S.strategy_of_method("lora-mbpp") is S.LoRAAdapter and S.strategy_of_method("xfer-fewshot") is S.FewShot
    with pytest.raises(ValueError, match="unknown method"):
        S.strategy_of_method("t2-nothing")
    with pytest.raises(T2EvalError, match="use one of none, prompt, cls, fewshot"):
        T2Config.from_kwargs({"strategy": "svf"})
    with pytest.raises(T2EvalError, match="use none, svf:PATH or lora:PATH"):
        T2Config.from_kwargs({"adapter": "ia3:x"})
    with pytest.raises(T2EvalError, match="cannot be combined"):
        T2Config.from_kwargs({"adapter": "svf:x", "strategy": "prompt"})
    ex = {"experts": "math:a;code:b;reasoning:c"}
    with pytest.raises(T2EvalError, match="needs cls_expert"):
        T2Config.from_kwargs({"strategy": "cls", **ex})
    with pytest.raises(T2EvalError, match="needs alpha"):
        T2Config.from_kwargs({"strategy": "fewshot", **ex})
    assert type(T2Config.from_kwargs({"adapter": "lora:x"}).validate()) is S.LoRAAdapter
    with pytest.raises(T2EvalError, match="already registered"):
        S.register_strategy("prompt")(type("Other", (S.Strategy,), {}))
    with pytest.raises(T2EvalError, match="already belongs"):
        S.register_strategy("other")(type("Other", (S.Strategy,), {"methods": {"t2-cls": "evaluate"}}))
    assert "other" not in S.registered()


def test_vllm_engine_kwargs_come_from_the_strategy():
    """What each strategy asks of lm-eval's VLLM (checked without starting an engine)."""
    from t2eval.backends.vllm_worker import EXTENSION
    from t2eval.lm import T2Config

    ex = "math:a;code:b;reasoning:c"
    kw: dict = {}
    T2Config.from_kwargs({"strategy": "prompt", "svd": "s", "experts": ex}).validate().vllm_kwargs(kw)
    assert kw == {"worker_extension_cls": EXTENSION, "enforce_eager": True, "max_logprobs": -1}
    kw = {"enforce_eager": False}
    T2Config.from_kwargs({"strategy": "fewshot", "svd": "s", "experts": ex, "alpha": "a"}).validate().vllm_kwargs(kw)
    assert kw == {"worker_extension_cls": EXTENSION, "enforce_eager": False}
    kw = {}
    T2Config.from_kwargs({}).validate().vllm_kwargs(kw)
    assert kw == {}
    with pytest.raises(T2EvalError, match="svd="):  # before the engine starts
        T2Config.from_kwargs({"strategy": "prompt", "experts": ex}).validate().vllm_kwargs({})


# ----------------------------------------------------------------------------- a new strategy

class Oracle(S.Strategy):
    """Two passes whose first pass knows the answer: each document goes to its true task's expert."""

    title = "Oracle"
    two_pass = True
    uses_svf = True
    needs_experts = True
    methods = {"t2-oracle": "evaluate"}

    @property
    def dispatch_mode(self):
        return "oracle"

    def choose(self, lm, questions, true_task):
        from t2eval.adapt.dispatch import DispatchResult
        from t2eval.constants import CATEGORY_OF_TASK

        cat = CATEGORY_OF_TASK[true_task]
        return DispatchResult([cat] * len(questions), [cat] * len(questions), raw=["oracle"] * len(questions))

    @classmethod
    def cell_spec(cls, cfg, model, method, task, spec):
        from t2eval import plan as P
        from t2eval.constants import TRAIN_TASKS

        svd = P.svd_path(model, cfg["svd"]["targets"])
        spec.inputs.update(svd=svd, **{f"expert_{t}": P.svf_expert(model, t) for t in TRAIN_TASKS})
        spec.model_args.update(svd=svd, experts=P.experts_arg(model), strategy=cls.name)


@pytest.fixture
def oracle():
    S.register_strategy("oracle")(Oracle)
    try:
        yield Oracle
    finally:
        S.unregister_strategy("oracle")
    assert "oracle" not in S.registered()


@pytest.fixture(scope="module")
def experts(svd_path, tmp_path_factory) -> dict[str, str]:
    """math: constant z (= base weights under the code parameterisation); code/reasoning: random z."""
    import torch

    from t2eval.svd import load_svd
    from t2eval.svf import ExpertVector

    svd = load_svd(svd_path)
    root = tmp_path_factory.mktemp("experts")
    out = {}
    for i, name in enumerate(["math", "code", "reasoning"]):
        g = torch.Generator().manual_seed(200 + i)
        z = {n: (torch.full((svd.rank(n),), 0.7) if name == "math" else 3.0 * torch.randn(svd.rank(n), generator=g))
             for n in svd.names}
        p = root / name / "z.safetensors"
        ExpertVector.from_svd(z, svd, param="code", task=name).save(p)
        out[name] = str(p.parent)
    return out


@pytest.fixture(scope="module")
def data_dir(data_mirror, tmp_path_factory):
    from t2eval.cli import main

    d = tmp_path_factory.mktemp("data")
    assert main(["prepare-data", "--mirror", str(data_mirror), "--out", str(d), "--datasets", "gsm8k"]) == 0
    return d


def _cell(tiny, data_dir, tmp_path, method, **t2):
    from t2eval.evaluate import build_lm, evaluate

    tiny = str(tiny)
    lm = build_lm(tiny, {**t2}, batch_size=4, device="cpu")
    cell = evaluate(tiny, method, "gsm8k", tmp_path / method / "gsm8k.json", t2, limit=3, data_dir=str(data_dir),
                    lm=lm, gen_kwargs="max_gen_toks=4")
    return lm, cell


def test_oracle_strategy_is_one_class_and_one_registry_line(oracle, tiny, svd_path, experts, data_dir, tmp_path,
                                                           monkeypatch):
    """Registered only here: the real `t2` HF model runs its first pass, groups by expert, and
    `evaluate` keeps its dispatch rows and first-pass timing in the cell exactly as for Prompt."""
    monkeypatch.setenv("T2EVAL_DATA_DIR", str(data_dir))
    args = {"svd": str(svd_path), "experts": ";".join(f"{n}:{p}" for n, p in experts.items())}
    lm, cell = _cell(tiny, data_dir, tmp_path, "t2-oracle", strategy="oracle", **args)
    assert type(lm.t2_strategy) is Oracle
    (rec,) = lm.t2_records.values()
    assert rec["strategy"] == "oracle" and rec["dispatch_mode"] == "oracle"
    assert [(d["doc_id"], d["true_task"], d["chosen"]) for d in rec["dispatch"]] == [(i, "gsm8k", "math") for i in range(3)]
    assert rec["groups"] == {"math": 3}
    assert rec["first_pass_s"] >= 0 and rec["second_pass_s"] > 0 and rec["tokens_first"] == 0
    assert cell["dispatch"] == [{"doc_id": i, "true_task": "gsm8k", "chosen": "math", "category": "math"}
                                for i in range(3)]
    assert [s["chosen"] for s in cell["per_sample"]] == ["math"] * 3
    assert cell["timing"]["first_pass_s"] is not None and cell["timing"]["dispatch_mode"] == "oracle"

    # the same cell fields as the Prompt strategy's
    _, ref = _cell(tiny, data_dir, tmp_path, "t2-prompt", strategy="prompt", cls_max_new_tokens=4, **args)
    assert ref["dispatch"] is not None and [set(d) for d in ref["dispatch"]] == [set(d) for d in cell["dispatch"]]
    assert {k for k, v in ref["timing"].items() if v is None} == {k for k, v in cell["timing"].items() if v is None}
    # the math expert is constant z = base weights: the oracle's answers equal the base model's
    _, base = _cell(tiny, data_dir, tmp_path, "base")
    assert base["dispatch"] is None and base["timing"]["first_pass_s"] is None
    assert cell["per_sample"] == [{**s, "chosen": "math"} for s in base["per_sample"]]

    # the workflow plan knows it too: its method's cells and model_args
    from t2eval import plan as P

    cfg = {"models": ["m"], "evaluate": {"methods": ["base", "t2-oracle"], "train_tasks": ["gsm8k"],
                                         "unseen_tasks": ["math", "humaneval"], "dispatch": "generate"},
           "ablations": {"models": [], "methods": [], "tasks": []}, "cross_model": [],
           "svd": {"targets": "mlp"}, "data": {"dir": "data"}, "seed": 42}
    assert [(c.method, c.task) for c in P.cells(cfg)] == [("base", "gsm8k"), ("base", "math"), ("base", "humaneval"),
                                                         ("t2-oracle", "math"), ("t2-oracle", "humaneval")]
    spec = P.cell_spec(cfg, "m", "t2-oracle", "math")
    assert P.format_model_args(spec.model_args) == f"svd=svd/m-mlp.safetensors,experts={P.experts_arg('m')},strategy=oracle"
    assert set(spec.inputs) == {"model", "data", "svd", "expert_gsm8k", "expert_mbpp", "expert_arc_easy"}
