"""Prompts and scorers of the tasks (PROTOCOL §5, §6.1): extractors on tricky outputs, prompt text."""

from __future__ import annotations

import pytest

from t2eval.errors import T2EvalError
from t2eval.tasks import get_task, lm_eval_task_name
from t2eval.tasks import arc, cls, gsm8k
from t2eval.tasks import math as tmath


@pytest.fixture(scope="module")
def data_dir(data_mirror, tmp_path_factory):
    from t2eval.cli import main

    d = tmp_path_factory.mktemp("data")
    assert main(["prepare-data", "--mirror", str(data_mirror), "--out", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


# ----------------------------------------------------------------------------- GSM8K
def test_gsm8k_code_extractor_quirks():
    assert gsm8k.extract_number_code("so 3 + 4 = 7 apples") == 7.0
    assert gsm8k.extract_number_code("The total is $1,000.") == 0.0  # comma splits: last group "000"
    assert gsm8k.extract_number_code("it is -5") == 5.0  # sign ignored
    assert gsm8k.extract_number_code("costs .5 dollars") == 0.5
    assert gsm8k.extract_number_code("no digits") is None
    assert gsm8k.gold_answer("a\n#### 1,000") == 0.0
    assert gsm8k.gold_answer("x = <<2*3=6>>6\n#### 6") == 6.0


def test_gsm8k_signed_extractor():
    assert gsm8k.extract_number_signed("The total is $1,000.") == 1000.0
    assert gsm8k.extract_number_signed("it is -5") == -5.0
    assert gsm8k.extract_number_signed("list 1,2 then 7") == 7.0
    assert gsm8k.gold_answer("steps 3 4\n#### -3", "signed") == -3.0


def test_gsm8k_scoring_code_vs_signed():
    doc = {"question": "q", "answer": "work\n#### -3"}
    code, signed = get_task("gsm8k"), get_task("gsm8k", extractor="signed")
    assert code.score_batch([doc, doc], ["the answer is 3", "the answer is -3"]) == [True, True]
    assert signed.score_batch([doc, doc], ["the answer is 3", "the answer is -3"]) == [False, True]
    doc = {"question": "q", "answer": "work\n#### 1,200"}
    assert code.score_one(doc, "1200") is False and code.score_one(doc, "$1,200") is True
    assert signed.score_one(doc, "1200") is True and signed.score_one(doc, "1,200.") is True


# ------------------------------------------------------------------------------- ARC
def test_arc_extraction_stages():
    assert arc.extract_letter("blah. So the answer is (C).") == "C"
    assert arc.extract_letter("the answer is B, not (C)") == "B"  # first "answer is"
    assert arc.extract_letter("Answer: D\nAnswer: A") == "D"  # first line with "Answer:"
    assert arc.extract_letter("I think B is wrong and D is right") == "D"  # last standalone letter
    assert arc.extract_letter("ABCD are all wrong") is None
    assert arc.extract_letter("no letters here") is None


def test_arc_numeric_keys_and_no_answer():
    doc = {"question": "Q?", "answerKey": "2",
           "choices": {"text": ["w", "x", "y", "z"], "label": ["1", "2", "3", "4"]}}
    # release (the default): a numeric key is never correct; corrected maps it to its letter
    assert get_task("arc_easy", numeric_keys="corrected").score_one(doc, "the answer is (B)") is True
    assert get_task("arc_easy", numeric_keys="code").score_one(doc, "the answer is (B)") is False
    assert get_task("arc_easy").score_one(doc, "the answer is (B)") is False
    # the release's fallback letter is fixed per option count (random.seed(42))
    import random

    random.seed(42)
    fallback = "ABCDE"[random.randint(0, 3)]
    assert arc.random_letter(4) == fallback
    letter_doc = {"question": "Q?", "answerKey": fallback,
                  "choices": {"text": ["w", "x", "y", "z"], "label": list("ABCD")}}
    assert get_task("arc_easy").score_one(letter_doc, "???") is True
    assert get_task("arc_easy", no_answer="wrong").score_one(letter_doc, "???") is False


def test_arc_prompt_and_llama3_prefill(tokenizer):
    doc = {"question": "Which is a gas?", "answerKey": "B",
           "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]}}
    t = get_task("arc_challenge")
    msgs, prefill = t.messages(doc, "smollm2")
    assert msgs[1]["content"] == "Which is a gas?\nOptions:\nA. ice\nB. steam\nC. rock\n"
    assert msgs[0]["content"].startswith("The following are multiple choice questions (with answers).")
    assert prefill == "" and t.messages(doc, "llama3")[1] == "Let's think step by step"
    assert t.prompt(tokenizer, doc, "llama3").endswith("assistant\nLet's think step by step")
    assert t.reference(doc) == "the answer is (B)"


# ------------------------------------------------------------------------------ MATH
def test_math_extraction():
    assert tmath.extract_answer("so \\boxed{\\frac{1}{2}} and \\boxed{3}") == "3"
    assert tmath.extract_answer("x = \\boxed{\\{1, \\{2\\}\\}}") == "\\{1, \\{2\\}\\}"
    assert tmath.extract_answer("nested \\boxed{\\sqrt{x^{2}}}.") == "\\sqrt{x^{2}}"
    assert tmath.extract_answer("The answer is: 42.\nMore text \\boxed{7}") == "42"
    assert tmath.extract_answer("\\fbox{5}") is None  # the release's remove_boxed only knows \boxed{
    assert tmath.extract_answer("unclosed \\boxed{3") is None
    assert tmath.gold_answer("... so $\\boxed{2}$ asymptotes.") == "2"


@pytest.mark.parametrize("gold,pred,ok", [
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{1}{2}", ".5", True),
    ("\\frac12", "\\dfrac{1}{2}", True),
    ("3/4", "\\frac{3}{4}", True),
    ("2\\sqrt{3}", "2\\sqrt3", True),
    ("10", "10\\text{ cm}", True),
    ("(1,2)", "\\left(1,2\\right)", True),
    ("5", "5.", True),
    ("1000", "1,000", True),
    ("50", "50\\%", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("3", "4", False),
    ("\\pi", "3", False),
])
def test_math_equivalence_code(gold, pred, ok):
    assert tmath.is_equiv(gold, pred) is ok


def test_math_parse_expr_is_not_fed_code():
    assert tmath.symbolic_equal("__import__('os').getcwd()", "1") is False


def test_math_task_variants():
    doc = {"problem": "p", "solution": "thus $\\boxed{\\frac{1}{2}}$"}
    for eq in ("code", "math_verify"):
        t = get_task("math", equivalence=eq)
        assert t.score_batch([doc, doc], ["so \\boxed{0.5}", "so \\boxed{1/3}"]) == [True, False]
    assert get_task("math").gen_kwargs["max_new_tokens"] == 1024
    assert get_task("math").system == ("Solve the question below by reasoning step by step,and put "
                                       "the final answer within \\boxed{}.")


# ------------------------------------------------------------------------------- cls
def test_parse_category():
    assert cls.parse_category("Classification: \\boxed{math}") == "math"
    assert cls.parse_category("\\boxed{code} then \\boxed{math}") == "code"  # the first box
    assert cls.parse_category("\\boxed{Math}") == "other"
    assert cls.parse_category("\\boxed{ Math }", strict=False) == "math"
    assert cls.parse_category("I think it is code") == "other"
    assert cls.parse_category("\\boxed{poetry}") == "other"
    assert cls.CATEGORIES == ("code", "math", "reasoning", "other")


def test_dispatch_prompt(tokenizer):
    p = cls.dispatch_prompt(tokenizer, "What is 2+2?")
    assert "\\boxed{category}" in p and "What is 2+2?" in p and "'reasoning' or 'other'" in p
    t = get_task("cls")
    assert t.score_batch([{"question": "q", "label": "code"}] * 2,
                         ["\\boxed{code}", "\\boxed{math}"]) == [True, False]


# -------------------------------------------------------------------------- code prompts
MBPP_DOC = {"task_id": "Mbpp/2", "entry_point": "similar_elements",
            "prompt": '"""\nWrite a function to find the shared elements from the given two lists\n'
                      'assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"""\n',
            "canonical_solution": "\ndef similar_elements(a, b):\n  return tuple(set(a) & set(b))\n"}


def test_mbpp_prompt(tokenizer):
    t = get_task("mbpp")
    msgs, prefill = t.messages(MBPP_DOC)
    assert msgs[0]["content"] == ("You are an exceptionally intelligent coding assistant that  consistently "
                                  "delivers accurate and reliable responses to user instructions.")
    assert msgs[1]["content"] == (
        "Write a function to find the shared elements from the given two lists. Your code should satisfy "
        "the following assertion:\n```python\nassert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == "
        "set((4, 5))\n```")
    assert prefill == "```python"
    p = t.prompt(tokenizer, MBPP_DOC)
    assert p == msgs[0]["content"] + "\n\n@@ Instruction:\n" + msgs[1]["content"] + "\n\n@@ Response:```python"
    assert get_task("mbpp", template="protocol").prompt(tokenizer, MBPP_DOC).endswith("@@ Response:\n```python")
    assert "<|im_start|>assistant\n```python" in get_task("mbpp", template="model").prompt(tokenizer, MBPP_DOC)
    # release (the default) has no "```" stop (the completion is cut there when scoring); corrected stops at it
    assert "```" not in t.gen_kwargs["stop"] and "Response" in t.gen_kwargs["stop"]
    assert "```" in get_task("mbpp", scoring="corrected").gen_kwargs["stop"]
    code = t.postprocess(MBPP_DOC, "\nimport math\ndef similar_elements(a, b):\n    return 1\nprint('x')\n```\nExplain")
    assert "def similar_elements" in code and "print" not in code and "Explain" not in code


def test_humaneval_prompt(tokenizer):
    doc = {"task_id": "HumanEval/0", "entry_point": "f", "prompt": "def f(x):\n    \"\"\"Double x.\"\"\"\n",
           "canonical_solution": "    return 2 * x\n"}
    t = get_task("humaneval")
    msgs, prefill = t.messages(doc)
    assert msgs[1]["content"] == ("Write a solution to the following problem:\n```python\n"
                                  "def f(x):\n    \"\"\"Double x.\"\"\"\n```")
    assert prefill == "```python\ndef f(x):\n    \"\"\"Double x.\"\"\""
    tc = get_task("humaneval", scoring="corrected")
    assert tc.postprocess(doc, "\n    return 2 * x\n```\ntext") == doc["prompt"] + "\n    return 2 * x\n"
    assert t.reference(doc) == "\n    return 2 * x\n```"


# ----------------------------------------------------------------- registry + real data
def test_registry_errors():
    with pytest.raises(T2EvalError, match="unknown task"):
        get_task("mmlu")
    with pytest.raises(T2EvalError, match="extractor"):
        get_task("gsm8k", extractor="magic")
    assert lm_eval_task_name("arc_challenge", family="llama3") == "t2_arc_challenge_llama3"
    assert lm_eval_task_name("gsm8k", "valid") == "t2_gsm8k_valid"
    assert lm_eval_task_name("math", fewshot_excluded=True) == "t2_math_fewshot_test"
    with pytest.raises(T2EvalError):
        lm_eval_task_name("gsm8k", fewshot_excluded=True)


def test_registry_holds_exactly_the_protocol_tasks():
    from t2eval import constants
    from t2eval.tasks import known_tasks, registry

    # the protocol's tasks in their order, then the vision-language ones (their own tuple, issue 10)
    assert known_tasks() == constants.TASK_KEYS + constants.VLM_TASKS
    with pytest.raises(T2EvalError, match="unknown task 'mmlu'; known: " + ", ".join(known_tasks())):
        get_task("mmlu")
    for key in constants.TASK_KEYS + constants.VLM_TASKS:
        t = get_task(key)
        assert t.key == key and registry.task_class(key) is type(t)
        assert t.metric == constants.METRIC_OF_TASK[key]
    assert get_task("gsm8k") is not get_task("gsm8k")  # a fresh object each time
    assert set(cls.CATEGORIES) == set(constants.CATEGORIES)  # in the prompt's order: test_parse_category
    # lm-eval family variants exist only where a YAML defines them (the Llama-3 ARC pre-fill)
    assert lm_eval_task_name("arc_easy", "train", family="llama3") == "t2_arc_easy_train_llama3"
    assert lm_eval_task_name("gsm8k", family="llama3") == "t2_gsm8k"
    assert lm_eval_task_name("arc_easy", family="mistral") == "t2_arc_easy"


def test_register_task_decorator(monkeypatch):
    """A new task is one decorated class: get_task builds it; mistakes are clear errors."""
    from t2eval import constants
    from t2eval.tasks import base, known_tasks, register_task, registry

    known_tasks()  # import the real task modules first
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setitem(constants.METRIC_OF_TASK, "toy", "acc")

    @register_task("toy")
    class Toy(base.Task):
        def __init__(self, shout: bool = False) -> None:
            self.shout = shout
            self.options = {"shout": shout}

        def user_message(self, doc):
            return doc["q"].upper() if self.shout else doc["q"]

        def score_one(self, doc, completion):
            return completion == doc["a"]

    t = get_task("toy", shout=True)
    assert isinstance(t, Toy) and t.key == "toy" and t.metric == "acc"
    assert t.messages({"q": "hi"})[0] == [{"role": "user", "content": "HI"}]
    assert t.score_batch([{"a": "1"}, {"a": "2"}], ["1", "1"]) == [True, False]
    assert known_tasks() == constants.TASK_KEYS + constants.VLM_TASKS + ("toy",)

    @register_task("left", "right")  # several keys: built as cls(key, **options)
    class Pair(base.Task):
        def __init__(self, key: str) -> None:
            self.key, self.options = key, {}

    assert get_task("right").key == "right" and get_task("left").key == "left"
    with pytest.raises(T2EvalError, match="no metric"):
        get_task("left").metric
    with pytest.raises(T2EvalError, match="registered twice"):
        register_task("gsm8k")(type("OtherGSM8K", (base.Task,), {}))
    with pytest.raises(T2EvalError, match="registered as 'toy2'"):
        register_task("toy2")(type("Named", (base.Task,), {"key": "named"}))
    with pytest.raises(T2EvalError, match="task keys"):
        register_task()


def test_task_modules_load_lazily():
    """`import t2eval.tasks` imports no task module (they load on the first get_task)."""
    import subprocess
    import sys

    code = ("import sys, t2eval.tasks as T; mods = ('gsm8k', 'arc', 'math', 'code', 'cls'); "
            "assert not [m for m in mods if 't2eval.tasks.' + m in sys.modules]; T.get_task('gsm8k'); "
            "assert all('t2eval.tasks.' + m in sys.modules for m in mods)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docs_prompts_and_references_on_real_data(data_dir, tokenizer):
    sizes = {}
    for key in ("gsm8k", "arc_easy", "arc_challenge", "math", "mbpp", "humaneval", "cls"):
        t = get_task(key)
        docs = t.docs("test", data_dir)
        sizes[key] = len(docs)
        for d in docs[:3]:
            p = t.prompt(tokenizer, d, "smollm2")
            assert t.user_message(d).strip()[:40] in p
            assert isinstance(t.reference(d), str) and t.reference(d)
            assert cls.question_text(key, d)
    assert sizes["gsm8k"] == 1319 and sizes["arc_challenge"] == 1172 and sizes["humaneval"] == 164
    # the gold references score as correct with the release scorers (corrected ARC keys: the release
    # never scores the numeric-keyed items, e.g. ARC-Easy test rows 14 and 26, as correct)
    for key in ("gsm8k", "arc_easy", "math"):
        t = get_task(key, **({"numeric_keys": "corrected"} if key == "arc_easy" else {}))
        docs = t.docs("test", data_dir)[:40]
        refs = [t.reference(d) for d in docs]
        assert all(t.score_batch(docs, refs)), key
    release = get_task("arc_easy")
    docs = release.docs("test", data_dir)[:40]
    ok = release.score_batch(docs, [release.reference(d) for d in docs])
    assert [i for i, x in enumerate(ok) if not x] == [i for i, d in enumerate(docs) if d["answerKey"].isdigit()]
    he = get_task("humaneval").docs("test", data_dir)
    assert "base_input" in he[0]  # evalplus tests need HumanEval+ rows
