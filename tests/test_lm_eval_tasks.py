"""lm-eval task YAMLs: they load our splits, render exactly `task.prompt(...)` and run end to end."""

from __future__ import annotations

import json

import pytest

from t2eval.constants import CLS_TASKS, CODE_TASKS, METRIC_OF_TASK, TRAIN_TASKS, UNSEEN_TASKS, VLM_TASKS, task_key_of
from t2eval.tasks import get_task, lm_eval_task_dir, lm_eval_task_name
from t2eval.tasks.code import CODE_CHAT_TEMPLATE


@pytest.fixture(scope="module")
def data_dir(data_mirror, tmp_path_factory):
    from t2eval.cli import main

    d = tmp_path_factory.mktemp("data")
    assert main(["prepare-data", "--mirror", str(data_mirror), "--out", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def env(data_dir, monkeypatch_module):
    monkeypatch_module.setenv("T2EVAL_DATA_DIR", str(data_dir))
    monkeypatch_module.setenv("HF_ALLOW_CODE_EVAL", "1")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    return data_dir


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _evaluate(model_dir, tasks, chat_template=None, limit=2):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    kw = {"chat_template_args": {"chat_template": chat_template}} if chat_template else {}
    lm = HFLM(pretrained=str(model_dir), device="cpu", max_length=2048, batch_size=2, **kw)
    tm = TaskManager(include_path=str(lm_eval_task_dir()))
    return lm, lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, apply_chat_template=True,
                                       task_manager=tm, confirm_run_unsafe_code=True,
                                       gen_kwargs="max_gen_toks=8", log_samples=True)


def _check(lm, out, names):
    for name, (key, family) in names.items():
        res = out["results"][name]
        metric = "pass@1,none" if get_task(key).metric == "pass@1" else "acc,none"
        assert 0.0 <= res[metric] <= 1.0, (name, res)
        samples = out["samples"][name]
        assert len(samples) == 2
        for s in samples:
            row = s["doc"]
            t = get_task(row["t2_task"], **json.loads(row["t2_options"]))
            doc = json.loads(row["t2_doc"])
            ctx = s["arguments"]["gen_args_0"]["arg_0"] if isinstance(s["arguments"], dict) else s["arguments"][0][0]
            assert ctx == t.prompt(lm.tokenizer, doc, family), name
            # the logged metric equals our scorer on the logged completion
            assert s[metric.split(",")[0]] == float(t.score_batch([doc], [s["resps"][0][0]])[0])


def test_yaml_names_match_helper():
    names = {p.stem for p in lm_eval_task_dir().glob("t2_*.yaml")}
    expected = set()
    for key in TRAIN_TASKS + CLS_TASKS[:1]:  # gsm8k, mbpp, arc_easy, cls
        expected |= {lm_eval_task_name(key, s) for s in ("test", "train", "valid")}
    for key in UNSEEN_TASKS:  # math, humaneval, arc_challenge
        expected |= {lm_eval_task_name(key), lm_eval_task_name(key, fewshot_excluded=True)}
    expected |= {n + "_llama3" for n in expected if n.startswith("t2_arc_")}
    expected |= {lm_eval_task_name(key) for key in VLM_TASKS}  # t2_textvqa, t2_okvqa, t2_synth_textvqa (test only)
    assert names == expected


def _check_task_config(name, cfg):
    """One t2_* task's lm-eval config against the task object and the protocol constants."""
    key = task_key_of(name)
    t = get_task(key)
    assert cfg["generation_kwargs"] == {"until": t.gen_kwargs["stop"], "max_gen_toks": t.gen_kwargs["max_new_tokens"],
                                        "do_sample": False, "temperature": 0.0}, name
    assert [m["metric"] for m in cfg["metric_list"]] == [METRIC_OF_TASK[key]] == [t.metric], name
    assert bool(cfg.get("unsafe_code")) == (key in CODE_TASKS), name
    kw = cfg["dataset_kwargs"]
    assert kw["task"] == key, name
    fewshot = kw["split"] == "fewshot_test"
    assert lm_eval_task_name(key, "test" if fewshot else kw["split"], fewshot, kw.get("family")) == name


def test_yaml_settings_equal_the_task_objects(env):
    """Every t2_* task as lm-eval's TaskManager sees it (includes resolved): the generation kwargs are
    the task object's own (greedy), the metric is constants.METRIC_OF_TASK, and its dataset_kwargs name
    the task and split that lm_eval_task_name maps to this name. One task of each YAML shape is also
    built (data loaded) to check that lm-eval runs it with those settings."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(lm_eval_task_dir()), include_defaults=False)
    names = sorted(n for n in tm.all_subtasks if n.startswith("t2_"))
    assert names == sorted(p.stem for p in lm_eval_task_dir().glob("t2_*.yaml"))  # templates are no tasks
    for name in names:
        _check_task_config(name, tm.task_index[name].cfg)
    # the code template, the 1024-token override, a split and a family variant (small splits: fast)
    built = tm.load(["t2_mbpp_valid", "t2_cls", "t2_humaneval_fewshot_test", "t2_arc_challenge_fewshot_test_llama3"])
    for name, task in built["tasks"].items():
        cfg = task.config
        _check_task_config(name, {k: getattr(cfg, k) for k in ("generation_kwargs", "metric_list", "unsafe_code",
                                                                "dataset_kwargs")})
        assert len(task.eval_docs) > 0 and set(task.eval_docs["t2_task"]) == {task_key_of(name)}


def test_fewshot_test_excludes_heldout(env):
    import importlib.util

    spec = importlib.util.spec_from_file_location("t2_utils", lm_eval_task_dir() / "t2_utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    full = mod.load(task="arc_challenge", split="test")["test"]
    rest = mod.load(task="arc_challenge", split="fewshot_test")["test"]
    held = get_task("arc_challenge").docs("fewshot_heldout", env)
    assert len(full) == 1172 and len(rest) == 1162 and len(held) == 10
    assert not {json.loads(r)["id"] for r in rest["t2_doc"]} & {d["id"] for d in held}


def test_model_template_tasks_end_to_end(env, tiny_model):
    names = {"t2_gsm8k": ("gsm8k", None), "t2_arc_easy_valid": ("arc_easy", None),
             "t2_arc_challenge_llama3": ("arc_challenge", "llama3"),
             "t2_math_fewshot_test": ("math", None), "t2_cls": ("cls", None)}
    lm, out = _evaluate(tiny_model, list(names))
    _check(lm, out, names)


def test_code_tasks_end_to_end(env, tiny_model):
    names = {"t2_mbpp": ("mbpp", None), "t2_humaneval": ("humaneval", None)}
    lm, out = _evaluate(tiny_model, list(names), chat_template=CODE_CHAT_TEMPLATE)
    _check(lm, out, names)
    ctx = out["samples"]["t2_mbpp"][0]["arguments"]
    assert "@@ Response:```python" in json.dumps(ctx)
