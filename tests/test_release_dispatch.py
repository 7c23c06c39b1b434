"""Protocol release vs corrected in the `t2` model and `t2eval evaluate` (issue 8 items 5 and 8,
issue 13 item 3), on the tiny random Llama:

* `protocol=` model_arg / `--protocol`: the process default, recorded in the cell;
* the dispatch first pass rendered with the task's own template and budget (release) or the chat
  template (corrected);
* questions classed "other" answered with the last expert loaded (release) or the base weights;
* the BOS rule (double vs single) in the t2 wrapper and the rollout backend;
* the SVD cache and the experts checked against the model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from t2eval import protocol as proto
from t2eval.errors import T2EvalError

EXPERTS = ("math", "code", "reasoning")


@pytest.fixture(autouse=True)
def _restore_protocol_env(monkeypatch):
    """`protocol.use` writes $T2EVAL_PROTOCOL(_OVERRIDES): restore them after each test."""
    monkeypatch.setenv(proto.ENV_VAR, "release")
    monkeypatch.delenv(proto.OVERRIDES_ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def tiny() -> str:
    from t2eval.testing import tiny_model_dir

    return str(tiny_model_dir(0))


def _svd(model: str, out: Path) -> str:
    from t2eval.svd import decompose

    decompose(model, "mlp", out=out)
    return str(out)


def _experts(svd_path: str, root: Path, seed: int = 100) -> dict[str, str]:
    import torch

    from t2eval.svd import load_svd
    from t2eval.svf import ExpertVector

    svd = load_svd(svd_path)
    out = {}
    for i, name in enumerate(EXPERTS):
        g = torch.Generator().manual_seed(seed + i)
        z = {n: 3.0 * torch.randn(svd.rank(n), generator=g) for n in svd.names}
        p = root / name / "z.safetensors"
        ExpertVector.from_svd(z, svd, param="code", task=name).save(p)
        out[name] = str(p.parent)
    return out


@pytest.fixture(scope="module")
def svd_path(tiny, tmp_path_factory) -> str:
    return _svd(tiny, tmp_path_factory.mktemp("svd") / "tiny-mlp.safetensors")


@pytest.fixture(scope="module")
def experts(svd_path, tmp_path_factory) -> dict[str, str]:
    return _experts(svd_path, tmp_path_factory.mktemp("experts"))


def _lm(tiny, svd_path, experts, **kw):
    from t2eval.lm import T2LM

    return T2LM(pretrained=tiny, strategy="prompt", svd=svd_path, batch_size=8,
                experts=";".join(f"{n}:{experts[n]}" for n in EXPERTS), **kw)


# ------------------------------------------------------------------------------- protocol= / --protocol

def test_protocol_model_arg_sets_the_process_default(tiny, monkeypatch):
    from t2eval.lm import T2Config, split_t2_kwargs

    assert T2Config.from_kwargs({}).protocol == "release"  # $T2EVAL_PROTOCOL=release (fixture)
    monkeypatch.setenv(proto.ENV_VAR, "corrected")
    assert T2Config.from_kwargs({}).protocol == "corrected"  # default: $T2EVAL_PROTOCOL
    cfg, _, rest = split_t2_kwargs({"protocol": "release", "protocol_overrides": '{"dispatch_other": "base"}',
                                    "dtype": "float32"})
    assert rest == {"dtype": "float32"}
    assert cfg.protocol == "release" and cfg.knobs["dispatch_other"] == "base" and cfg.knobs["bos"] == "double"
    # the task layer now reads the same protocol and overrides
    assert os.environ[proto.ENV_VAR] == "release"
    assert proto.settings()["dispatch_other"] == "base"
    # without protocol_overrides= the model keeps $T2EVAL_PROTOCOL_OVERRIDES (the workflow's overrides)
    cfg, _, _ = split_t2_kwargs({"protocol": "corrected"})
    assert proto.default_protocol() == "corrected" and cfg.knobs["dispatch_other"] == "base"
    cfg, _, _ = split_t2_kwargs({"protocol": "corrected", "protocol_overrides": "{}"})  # {} clears them
    assert proto.OVERRIDES_ENV_VAR not in os.environ and cfg.knobs == proto.settings("corrected") == proto.settings()
    with pytest.raises(T2EvalError, match="protocol='paper'"):
        T2Config.from_kwargs({"protocol": "paper"})
    with pytest.raises(T2EvalError, match="unknown protocol knob"):
        T2Config.from_kwargs({"protocol_overrides": '{"nope": 1}'})
    with pytest.raises(T2EvalError, match="JSON object"):
        T2Config.from_kwargs({"protocol_overrides": "bos=single"})


def test_alpha_selection_is_read_from_alpha_json(tmp_path):
    from t2eval.evaluate import alpha_selection

    a = tmp_path / "alpha.json"
    a.write_text(json.dumps({"alpha": [0.3, 0.3, 0.4], "experts": list(EXPERTS),
                             "alpha_selection": "α selected on the reported set"}))
    assert alpha_selection(tmp_path) == "α selected on the reported set"
    a.write_text(json.dumps({"alpha": [0.3, 0.3, 0.4], "experts": list(EXPERTS)}))
    assert alpha_selection(a) is None


# ------------------------------------------------------------------------------- dispatch first pass

def test_first_pass_render_release_vs_corrected(tiny):
    from transformers import AutoTokenizer

    from t2eval.adapt import dispatch as dsp
    from t2eval.tasks import get_task
    from t2eval.tasks.arc import LLAMA3_PREFILL

    tok = AutoTokenizer.from_pretrained(tiny)
    he = dsp.first_pass_render("humaneval", "task")
    assert he.chat_template == get_task("humaneval").chat_template and he.prefill == "" and he.max_new_tokens == 512
    assert dsp.first_pass_render("math", "task").max_new_tokens == 1024
    assert dsp.first_pass_render("math", "task").chat_template is None
    assert dsp.first_pass_render("arc_challenge", "task", "llama3").prefill == LLAMA3_PREFILL
    assert dsp.first_pass_render("arc_challenge", "task", None).prefill == ""
    assert dsp.first_pass_render("humaneval", "chat") == dsp.CHAT
    assert dsp.first_pass_render(None, "task") == dsp.CHAT  # a stock lm-eval task: the chat template
    with pytest.raises(T2EvalError, match="dispatch_template='x'"):
        dsp.first_pass_render("math", "x")
    q = "Write a function that adds two numbers."
    code = dsp.classification_prompt(tok, q, he)
    chat = dsp.classification_prompt(tok, q, dsp.CHAT)
    assert "@@ Instruction" in code and "<|im_start|>" not in code and q in code
    assert chat == dsp.classification_prompt(tok, q) and chat.startswith("<|im_start|>system")
    arc = dsp.classification_prompt(tok, q, dsp.first_pass_render("arc_challenge", "task", "llama3"))
    assert arc == chat + LLAMA3_PREFILL


class _Spy:
    """Calls the real `_t2_generate` of the model and remembers the prompts and budget it got."""

    def __init__(self, lm):
        self.real, self.calls = lm._t2_generate, []

    def __call__(self, prompts, gk):
        self.calls.append((list(prompts), gk["max_gen_toks"]))
        return self.real(prompts, gk)


@pytest.mark.parametrize("protocol", ["release", "corrected"])
def test_first_pass_uses_the_task_template_in_release(tiny, svd_path, experts, protocol):
    from lm_eval.api.instance import Instance

    from t2eval.adapt import dispatch as dsp

    lm = _lm(tiny, svd_path, experts, protocol=protocol)
    spy = _Spy(lm)
    lm._t2_generate = spy
    docs = [{"prompt": 'def add(a, b):\n    """Add two numbers."""\n', "task_id": "HumanEval/0",
             "entry_point": "add"}, {"prompt": 'def neg(a):\n    """Negate."""\n', "task_id": "HumanEval/1",
                                     "entry_point": "neg"}]
    gk = {"until": ["X"], "max_gen_toks": 2, "do_sample": False}
    reqs = [Instance("generate_until", d, ("ctx", dict(gk)), i, ("t2_humaneval", i, 1), task_name="t2_humaneval")
            for i, d in enumerate(docs)]
    rec = lm._t2_record("t2_humaneval")
    lm._t2_first_pass(reqs, rec)
    (prompts, budget), = spy.calls
    questions = [dsp.question_of(lm.tokenizer, "t2_humaneval", d, "ctx") for d in docs]
    if protocol == "release":
        render = dsp.first_pass_render("humaneval", "task")
        assert all("@@ Instruction" in p and "<|im_start|>" not in p for p in prompts) and budget == 512
    else:
        render = dsp.CHAT
        assert all(p.startswith("<|im_start|>system") for p in prompts) and budget == 1024
    assert prompts == [dsp.classification_prompt(lm.tokenizer, q, render) for q in questions]
    # the logprob dispatch scores the labels after the same rendered prefix
    lm.t2.dispatch = "logprob"
    seen = []
    real = lm._t2_next_token_logprobs
    lm._t2_next_token_logprobs = lambda ps: seen.extend(ps) or real(ps)
    lm.t2_strategy.choose(lm, questions, "humaneval")
    assert seen == [dsp.classification_prompt(lm.tokenizer, q, render) + dsp.ANSWER_PREFIX for q in questions]


# ------------------------------------------------------------------------------- "other" at dispatch

def test_other_expert_rule():
    from t2eval.lm import answering_order, other_expert

    ex = {"math": "M", "code": "C", "reasoning": "R"}
    assert other_expert(ex, "last_expert") == "R"
    assert other_expert({"math": "M", "code": "C"}, "last_expert") == "M"  # the last one the loop loaded
    assert other_expert({}, "last_expert") is None
    assert other_expert(ex, "base") is None
    assert answering_order({"other", "reasoning", "code", "math"}, "last_expert") == ["code", "math", "reasoning", "other"]
    with pytest.raises(T2EvalError, match="dispatch_other"):
        other_expert(ex, "first")


@pytest.mark.parametrize("protocol", ["release", "corrected"])
def test_other_is_answered_by_last_expert_in_release(tiny, svd_path, experts, protocol):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = _lm(tiny, svd_path, experts, protocol=protocol)
    qs = ["What is 2+2?", "Name a colour.", "Sort a list.", "Why is the sky blue?"]
    prompts = [lm.apply_chat_template([{"role": "user", "content": q}]) for q in qs]
    reqs = [Instance("loglikelihood", {"q": q}, (p, " The answer is 4."), i, ("toy", i, 1))
            for i, (q, p) in enumerate(zip(qs, prompts))]
    chosen = {0: "other", 1: "math", 2: "other", 3: "code"}
    rec = lm._t2_record("toy")
    out = lm._t2_second_pass("loglikelihood", reqs, chosen, True, rec)
    other = experts["reasoning"] if protocol == "release" else None
    assert rec["other_answered_by"] == ("reasoning" if protocol == "release" else "base")
    assert list(rec["groups"]) == ["code", "math", "other"]  # the release's loop order
    expected = []
    for i, r in enumerate(reqs):
        path = other if chosen[i] == "other" else experts[chosen[i]]
        lm._t2_set_scales(lm.t2_bank.scales(path) if path else None)
        expected.append(HFLM.loglikelihood(lm, [r], disable_tqdm=True)[0][0])
    lm._t2_set_scales(None)
    base = HFLM.loglikelihood(lm, [reqs[0]], disable_tqdm=True)[0][0]
    assert [lp for lp, _ in out] == pytest.approx(expected, abs=1e-4)
    assert (abs(out[0][0] - base) < 1e-4) == (protocol == "corrected")  # the reasoning expert changes it


# ------------------------------------------------------------------------------- BOS

@pytest.fixture(scope="module")
def bos_tiny(tiny, tmp_path_factory) -> str:
    """The tiny Llama with a tokenizer that prepends its BOS (<|im_start|>, which also starts every
    chat prompt of its template: the Llama-3 situation)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("bos_tiny") / "tiny-bos"
    shutil.copytree(tiny, d)
    tok = AutoTokenizer.from_pretrained(tiny)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.save_pretrained(d)
    t2 = AutoTokenizer.from_pretrained(d)
    assert t2("a")["input_ids"][0] == t2.bos_token_id
    return str(d)


@pytest.mark.parametrize("protocol,n_bos", [("release", 2), ("corrected", 1)])
def test_bos_in_t2_wrapper_and_backend(bos_tiny, protocol, n_bos):
    from t2eval.backends import make_backend
    from t2eval.lm import T2LM

    lm = T2LM(pretrained=bos_tiny, protocol=protocol, batch_size=2)
    bos = lm.tokenizer.bos_token_id
    chat = lm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.startswith(lm.tokenizer.bos_token)

    def lead(ids):
        return next(i for i, t in enumerate(list(ids)) if t != bos)

    assert lead(lm.tok_encode(chat)) == n_bos  # loglikelihood / generation contexts
    x, mask = lm.tok_batch_encode([chat, "@@ Instruction\nhi"])
    rows = [r[m.bool()].tolist() for r, m in zip(x, mask)]
    assert lead(rows[0]) == n_bos and lead(rows[1]) == 1  # the code template: one BOS either way
    # generation and scoring run on those ids
    from lm_eval.api.instance import Instance

    out = lm.generate_until([Instance("generate_until", {}, (chat, {"until": ["X"], "max_gen_toks": 2}), 0)],
                            disable_tqdm=True)
    assert len(out) == 1
    be = make_backend("hf", bos_tiny)  # the rollout / CEM backend follows the process default protocol
    assert be.bos == ("double" if protocol == "release" else "single")
    assert lead(be.encode(chat)) == n_bos and lead(be.encode("@@ Instruction\nhi")) == 1
    assert be.encode("hi", prompt=False)[0] != bos
    assert lead(make_backend("hf", bos_tiny, bos="single").encode(chat)) == 1


# ------------------------------------------------------------------------------- integrity (issue 13.3)

@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second tiny model with the same shapes (seed 1), its SVD cache and its experts."""
    from t2eval.testing import tiny_model_dir

    d = str(tiny_model_dir(seed=1))
    root = tmp_path_factory.mktemp("other")
    svd = _svd(d, root / "tiny1-mlp.safetensors")
    return d, svd, _experts(svd, root / "experts", seed=200)


def test_foreign_svd_cache_and_experts_are_refused(tiny, svd_path, other_model):
    from t2eval.lm import T2LM
    from t2eval.svd import StaleCacheError

    _, svd1, ex1 = other_model
    with pytest.raises(StaleCacheError, match="decomposed from"):
        T2LM(pretrained=tiny, adapter=f"svf:{ex1['math']}", svd=svd1)
    args = dict(pretrained=tiny, strategy="prompt", svd=svd_path, experts=";".join(f"{n}:{ex1[n]}" for n in EXPERTS))
    with pytest.raises(T2EvalError, match="trained on"):
        T2LM(**args)  # at construction, before any request
    lm = T2LM(**args, cross_model="true")  # Table 5 transfer: allowed when asked for
    assert lm.t2.cross_model


def test_evaluate_cli_refuses_a_foreign_svd_cache(tiny, other_model, tmp_path):
    _, svd1, ex1 = other_model
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "t2eval.cli", "evaluate", "--model", tiny, "--method", "svf",
                        "--task", "gsm8k", "--out", str(tmp_path / "c.json"),
                        "--model-args", f"adapter=svf:{ex1['math']},svd={svd1}"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "decomposed from" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_records_the_protocol(tiny, tmp_path):
    from t2eval.evaluate import evaluate
    from t2eval.results import read_cell

    d = tmp_path / "tasks"
    d.mkdir()
    data = d / "toy.jsonl"
    data.write_text("".join(json.dumps({"q": f"Is {i} even?", "choices": ["yes", "no"], "label": i % 2}) + "\n"
                            for i in range(3)))
    (d / "toy_mc.yaml").write_text(f"task: toy_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                   f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
                                   "doc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                                   "doc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n")
    out = tmp_path / "cell.json"
    evaluate(tiny, "base", "toy_mc", out, "", lm_eval_task="toy_mc", include_path=str(d), limit=3,
             device="cpu", batch_size=4, protocol="corrected")
    p = read_cell(out)["provenance"]["protocol"]
    assert p["name"] == "corrected" and p["knobs"] == proto.settings("corrected") and p["overrides"] == {}
    assert proto.default_protocol() == "corrected"  # the task layer saw it too
