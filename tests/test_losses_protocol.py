"""The protocol in training (issue 8 items 6, 8, 10; PROTOCOL §8): `--protocol` and its knobs resolved
into the training config, the loss inputs (PG prompt on code tasks, BOS), the classifier expert's
generation length, and the protocol recorded in the resume identity."""

from __future__ import annotations

import os

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from t2eval import protocol as P
from t2eval.errors import T2EvalError
from t2eval.testing import tiny_model_dir
from t2eval.train import configs, loop, losses
from t2eval.train.rollout import Rollout

MBPP_DOC = {"prompt": 'def add(a, b):\n    """Add two numbers\nassert add(1, 2) == 3\n"""\n', "entry_point": "add",
            "task_id": "Mbpp/1", "canonical_solution": "def add(a, b):\n    return a + b\n"}
SYSTEM = ("You are an exceptionally intelligent coding assistant that  consistently delivers accurate and "
          "reliable responses to user instructions.")
INSTRUCTION = ("@@ Instruction:\nAdd two numbers. Your code should satisfy the following assertion:\n"
               "```python\nassert add(1, 2) == 3\n```\n\n")
COMPLETION = "\ndef add(a, b):\n    return a + b\n```"


@pytest.fixture(autouse=True)
def clean_protocol_env(monkeypatch):
    """Every test starts from the default protocol; whatever a test sets is undone after it."""
    monkeypatch.delenv(P.ENV_VAR, raising=False)
    monkeypatch.delenv(P.OVERRIDES_ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def tok():
    from t2eval.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir(0)))


@pytest.fixture(scope="module")
def llama_like():
    """A word-level tokenizer whose default call prepends <bos> (like Llama-3's; see test_tokens.py)."""
    vocab = {"<bos>": 0, "<eos>": 1, "hello": 2, "world": 3, "[UNK]": 4, "code": 5}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", unk_token="[UNK]")


class ChatTask:
    """A non-code task whose chat template starts with the BOS text (as Llama-3's does)."""

    key = "toy"

    def prompt(self, tokenizer, doc, family=None):
        return "<bos> hello"

    def reference(self, doc):
        return " world"


def _canned(task, tokenizer, docs, completions):
    prompts = [task.prompt(tokenizer, d) for d in docs]
    return lambda: Rollout(docs=list(docs), prompts=prompts, completions=list(completions),
                           n_tokens=[1] * len(docs), correct=[True] * len(docs), rewards=[1.0] * len(docs))


def _svf_cfg(**kw):
    return configs.SVFTrainConfig(**{"model": "m", "svd": "s", "task": "gsm8k", "out": "o", **kw})


# ------------------------------------------------------------------------------ PG prompt on code tasks
def test_pg_code_prompt_token_sequences(tok):
    """release (prefill_turn) scores the completion after "@@ Response:\\n```python"; corrected
    (sampling_prompt) after the sampling prompt "@@ Response:```python" — exact strings and tokens."""
    from t2eval.tasks import get_task

    task = get_task("mbpp")
    sampling = SYSTEM + "\n\n" + INSTRUCTION + "@@ Response:```python"
    turn = SYSTEM + "\n\n" + INSTRUCTION + "@@ Response:\n```python"
    assert task.prompt(tok, MBPP_DOC) == sampling  # what the rollout generated from
    assert losses.pg_prompt(task, tok, MBPP_DOC, sampling, None, "prefill_turn") == turn
    assert losses.pg_prompt(task, tok, MBPP_DOC, sampling, None, "sampling_prompt") == sampling

    roll = _canned(task, tok, [MBPP_DOC], [COMPLETION])
    got = {m: loop.training_batch("pg", tok, task, [MBPP_DOC], None, roll, bos="double", pg_code_prompt=m)
           for m in losses.PG_CODE_PROMPTS}
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731 (no BOS: SmolLM2)
    for mode, text in (("prefill_turn", turn), ("sampling_prompt", sampling)):
        p_ids, c_ids, weights, rewards, extra = got[mode]
        assert extra is None  # a text task: no images
        assert p_ids == [ids(text)]
        assert p_ids[0] + c_ids[0] == ids(text + COMPLETION)
        assert tok.decode(c_ids[0]) == COMPLETION and weights == [1.0] and rewards == [1.0]
    assert got["prefill_turn"][0] != got["sampling_prompt"][0]
    # the two differ by exactly the newline after "@@ Response:"
    assert tok.decode(got["prefill_turn"][0][0]) == tok.decode(got["sampling_prompt"][0][0]).replace(
        "@@ Response:```python", "@@ Response:\n```python")


def test_pg_code_prompt_leaves_other_tasks_and_ntp_alone(tok):
    from t2eval.tasks import get_task

    gsm = get_task("gsm8k")
    doc = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}
    roll = _canned(gsm, tok, [doc], [" 5"])
    a = loop.training_batch("pg", tok, gsm, [doc], None, roll, pg_code_prompt="prefill_turn")
    b = loop.training_batch("pg", tok, gsm, [doc], None, roll, pg_code_prompt="sampling_prompt")
    assert a == b and a[0] == [tok(gsm.prompt(tok, doc), add_special_tokens=False)["input_ids"]]
    mbpp = get_task("mbpp")  # next-token prediction scores the references after the sampling prompt
    for mode in losses.PG_CODE_PROMPTS:
        p_ids, _, _, _, _ = loop.training_batch("ntp", tok, mbpp, [MBPP_DOC], None, None, pg_code_prompt=mode)
        assert tok.decode(p_ids[0]).endswith("@@ Response:```python")


def test_pg_code_prompt_refuses_unknown_mode_and_model_template(tok):
    from t2eval.tasks import get_task

    with pytest.raises(T2EvalError, match="pg_code_prompt='newline'"):
        losses.pg_prompt(get_task("mbpp"), tok, MBPP_DOC, "x", None, "newline")
    model_tpl = get_task("mbpp", template="model")
    with pytest.raises(T2EvalError, match="sampling_prompt"):
        losses.pg_prompt(model_tpl, tok, MBPP_DOC, model_tpl.prompt(tok, MBPP_DOC), None, "prefill_turn")
    # the "protocol" template already samples after "@@ Response:\n": both modes agree
    proto = get_task("mbpp", template="protocol")
    s = proto.prompt(tok, MBPP_DOC)
    assert losses.pg_prompt(proto, tok, MBPP_DOC, s, None, "prefill_turn") == s


# ------------------------------------------------------------------------------ BOS in the loss inputs
def test_loss_inputs_bos_double_under_release_single_under_corrected(llama_like):
    task = ChatTask()
    docs = [{"doc_id": 0}]
    for name, n_bos in (("release", 2), ("corrected", 1)):
        cfg = loop.resolve_protocol(_svf_cfg(protocol=name))
        for objective in ("pg", "ntp"):
            p_ids, c_ids, _, _, _ = loop.training_batch(objective, llama_like, task, docs, None,
                                                        _canned(task, llama_like, docs, [" world"]),
                                                        bos=cfg.bos, pg_code_prompt=cfg.pg_code_prompt)
            assert p_ids == [[0] * n_bos + [2]], (name, objective)
            assert c_ids == [[3] + ([1] if objective == "ntp" else [])]  # + EOS for ntp
    # a prompt without the BOS text (the code template) gets one BOS under both
    for mode in ("double", "single"):
        assert losses.loss_inputs(llama_like, ["code hello"], [" world"], bos=mode) == ([[0, 5, 2]], [[3]])


# ------------------------------------------------------------------------------ --protocol and its knobs
def test_protocol_resolution_env_fields_and_overrides(monkeypatch):
    rel = loop.resolve_protocol(_svf_cfg())
    assert (rel.protocol, rel.bos, rel.pg_code_prompt, rel.cls_max_new_tokens) == ("release", "double",
                                                                                    "prefill_turn", 1024)
    assert rel.protocol_overrides == {}
    monkeypatch.setenv(P.ENV_VAR, "corrected")
    cor = loop.resolve_protocol(_svf_cfg())
    assert (cor.protocol, cor.bos, cor.pg_code_prompt) == ("corrected", "single", "sampling_prompt")
    assert rel.identity() != cor.identity()  # a release run never resumes under corrected
    # an explicit knob is an override (recorded); one equal to the protocol's value is not
    mixed = loop.resolve_protocol(_svf_cfg(protocol="release", bos="single", pg_code_prompt="prefill_turn"))
    assert mixed.protocol == "release" and mixed.bos == "single"
    assert mixed.protocol_overrides == {"bos": "single"}
    assert loop.resolve_protocol(mixed) == mixed  # idempotent
    assert loop.protocol_record(mixed)["knobs"]["bos"] == "single"
    # the workflow's $T2EVAL_PROTOCOL_OVERRIDES are in force too (and in the identity)
    monkeypatch.setenv(P.OVERRIDES_ENV_VAR, '{"arc_numeric_keys": "position"}')
    env = loop.resolve_protocol(_svf_cfg(protocol="release"))
    assert env.protocol_overrides == {"arc_numeric_keys": "position"} and env.identity() != rel.identity()
    monkeypatch.setenv(P.OVERRIDES_ENV_VAR, '{"no_such_knob": 1}')
    with pytest.raises(T2EvalError, match="no_such_knob"):
        loop.resolve_protocol(_svf_cfg())
    with pytest.raises(T2EvalError, match="protocol='paper'"):
        loop.resolve_protocol(_svf_cfg(protocol="paper"))


def test_apply_protocol_sets_the_task_reward_and_restores_the_environment(monkeypatch):
    monkeypatch.setenv(P.ENV_VAR, "release")
    with loop.apply_protocol(_svf_cfg(task="arc_easy", protocol="corrected", bos="double")) as cfg:
        assert os.environ[P.ENV_VAR] == "corrected" and cfg.protocol == "corrected"
        assert loop.load_task("arc_easy").options["numeric_keys"] == "corrected"  # key → letter
        assert P.settings()["bos"] == "double"  # the override is the process's too (backends read it)
    assert os.environ[P.ENV_VAR] == "release" and P.OVERRIDES_ENV_VAR not in os.environ
    with loop.apply_protocol(_svf_cfg(task="arc_easy")):
        assert loop.load_task("arc_easy").options["numeric_keys"] == "release"  # numeric keys never match


# ------------------------------------------------------------------------------ classifier expert length
class _Task:
    gen_kwargs = {"max_new_tokens": 512}


def test_cls_generation_length_is_the_protocols_1024():
    for task in configs.CLS_TASKS:
        cfg = loop.resolve_protocol(_svf_cfg(task=task, max_new_tokens=512))
        assert loop.generation_length(cfg, _Task()) == 1024
        assert loop.generation_length(loop.resolve_protocol(_svf_cfg(task=task, cls_max_new_tokens=96)), _Task()) == 96
    assert loop.generation_length(loop.resolve_protocol(_svf_cfg(max_new_tokens=96)), _Task()) == 96
    assert loop.generation_length(loop.resolve_protocol(_svf_cfg()), _Task()) == 512
    from t2eval.tasks import get_task

    assert get_task("cls").gen_kwargs["max_new_tokens"] == 1024  # the task's own budget agrees


def test_paper_dag_trains_the_classifier_expert_with_1024_tokens():
    """paper.yaml sets train_svf.max_new_tokens: 512 for every trained task; the cls run still gets 1024."""
    import argparse
    from pathlib import Path

    import yaml

    from t2eval import plan, stage_config, workflow_config
    from t2eval.train import svf_cli

    paper = yaml.safe_load((Path(__file__).parents[1] / "workflow" / "config" / "paper.yaml").read_text())
    cfg = workflow_config.load(paper, "paper.yaml")
    argv = plan.stage_argv(cfg, "train-svf", model=cfg["models"][0], task=plan.cls_task(cfg))
    p = argparse.ArgumentParser()
    svf_cli.add_arguments(p)
    run = loop.resolve_protocol(stage_config.from_args(configs.SVFTrainConfig, p.parse_args(argv)))
    assert run.task == "cls" and run.max_new_tokens == 512
    assert loop.generation_length(run, _Task()) == 1024


# ------------------------------------------------------------------------------ one fact, one place
def test_config_choices_are_the_modules_constants():
    from t2eval import svf, tokens

    assert configs.PROTOCOLS == P.PROTOCOLS
    assert configs.BOS_MODES == tokens.BOS_MODES
    assert configs.PG_CODE_PROMPTS == losses.PG_CODE_PROMPTS
    assert configs.SVF_PRECISIONS == svf.PRECISIONS
    assert set(configs.KNOB_FIELDS) <= set(P.KNOB_NAMES)


def test_cli_protocol_options_round_trip():
    import argparse

    from t2eval import stage_config
    from t2eval.train import lora_cli, svf_cli

    for mod, Cfg, extra in ((svf_cli, configs.SVFTrainConfig, {"svd": "s", "svf_precision": "bf16"}),
                            (lora_cli, configs.LoRATrainConfig, {})):
        p = argparse.ArgumentParser()
        mod.add_arguments(p)
        want = Cfg(model="m", task="cls", out="o", protocol="corrected", bos="double",
                   pg_code_prompt="prefill_turn", cls_max_new_tokens=96, **extra)
        argv = stage_config.argv(want, Cfg)
        assert argv[argv.index("--protocol") + 1] == "corrected"
        assert stage_config.from_args(Cfg, p.parse_args(argv)) == want
        with pytest.raises(SystemExit):
            p.parse_args(["--model", "m", "--task", "cls", "--out", "o", "--protocol", "paper"])
