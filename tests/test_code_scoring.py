"""Release-exact code scoring (issue 8 item 3, PROTOCOL §8) next to the corrected one: the release's
sanitiser, evalplus 1895d2f6's comparison rules, the time-limit formula and the ``` cut."""

from __future__ import annotations

import pytest

from t2eval.tasks import get_task
from t2eval.tasks.code import release_sanitize
from t2eval.tasks.sandbox import RULES, Limits, Program, compare_outputs, run_programs, time_limits

REL, COR = RULES["release"], RULES["corrected"]

MBPP_DOC = {"task_id": "Mbpp/999", "entry_point": "add_one",
            "prompt": '"""\nWrite a function to add one.\nassert add_one(1) == 2\n"""\n',
            "canonical_solution": "\ndef add_one(x):\n    return x + 1\n", "base_input": [[1], [5]],
            "atol": 0}
HE_DOC = {"task_id": "HumanEval/999", "entry_point": "f",
          "prompt": 'def f(x):\n    """Double x."""\n', "canonical_solution": "    return 2 * x\n",
          "base_input": [[1], [4]], "atol": 0, "test": "def check(c):\n    assert c(2) == 4\n"}


# ----------------------------------------------------------------------------------- sanitiser
def test_release_sanitizer_on_canned_outputs():
    # chat text around a fenced block: the block with the entry point is taken; trailing test code
    # (top-level calls, print, if __name__) is dropped; imports before the def are kept
    out = ("Sure! Here it is:\n```python\nimport math\n\ndef area(r):\n    return math.pi * r ** 2\n\n"
           "print(area(2))\n```\nHope this helps.")
    assert release_sanitize(out, "area") == "import math\n\ndef area(r):\n    return math.pi * r ** 2"
    # helper defined after the entry point is kept; an unindented statement after it is dropped
    code = ("def f(x):\n    return g(x)\nresult = f(3)\ndef g(x):\n    return x + 1\n"
            "assert f(1) == 2\n")
    assert release_sanitize(code, "f") == "def f(x):\n    return g(x)\ndef g(x):\n    return x + 1"
    # 3-space indentation is widened to 4
    assert release_sanitize("def f(x):\n   y = x\n    return y\n", "f") == "def f(x):\n    y = x\n    return y"
    # no "    return " in the entry point's text -> the definition is dropped (one-liners, 2 spaces)
    assert release_sanitize("def f(x): return x\n", "f") == ""
    assert release_sanitize("import os\ndef f(x):\n  return x\n", "f") == "import os"
    # `if __name__` / `if` / print / a docstring at top level end the program
    assert release_sanitize("def f(x):\n    return x\nif __name__ == '__main__':\n    f(1)\n", "f") == \
        "def f(x):\n    return x"
    # a non-entry-point function that does not parse is cut
    assert release_sanitize("def f(x):\n    return h(x)\ndef h(x:\n    return 1\n", "f") == \
        "def f(x):\n    return h(x)"


def test_postprocess_release_vs_corrected():
    rel, cor = get_task("mbpp"), get_task("mbpp", scoring="corrected")
    assert rel.options["scoring"] == "release" and cor.options["scoring"] == "corrected"
    completion = "\nK = 1\ndef add_one(x):\n    return x + K\nprint(add_one(1))\n```\nExplanation: ..."
    # release: prompt + "\n" + completion, sanitised (the docstring prompt and K stay: they precede the def)
    assert rel.postprocess(MBPP_DOC, completion) == (MBPP_DOC["prompt"].strip() + "\n\n\nK = 1\n"
                                                     "def add_one(x):\n    return x + K")
    # corrected: evalplus's tree-sitter sanitiser on the completion only
    assert cor.postprocess(MBPP_DOC, completion) == "K = 1\ndef add_one(x):\n    return x + K"
    he_rel, he_cor = get_task("humaneval"), get_task("humaneval", scoring="corrected")
    body = "\n    return 2 * x\n```\ntext"
    assert he_cor.postprocess(HE_DOC, body) == HE_DOC["prompt"] + "\n    return 2 * x\n"
    assert he_rel.postprocess(HE_DOC, body) == 'def f(x):\n    """Double x."""\n\n\n    return 2 * x'
    with pytest.raises(Exception, match="scoring"):
        get_task("mbpp", scoring="exact")


def test_stop_list_and_fence_cut():
    for key in ("mbpp", "humaneval"):
        assert "```" not in get_task(key).gen_kwargs["stop"]  # release: generation runs past ```
        assert "```" in get_task(key, scoring="corrected").gen_kwargs["stop"]
        assert "Response" in get_task(key).gen_kwargs["stop"]
    # both cut at the first ``` when scoring: what follows never reaches the program
    tail = "\n```\n```python\ndef add_one(x):\n    return 0\n```"
    for t in (get_task("mbpp"), get_task("mbpp", scoring="corrected")):
        prog = t.postprocess(MBPP_DOC, "\ndef add_one(x):\n    return x + 1" + tail)
        assert "return 0" not in prog and "return x + 1" in prog


# ----------------------------------------------------------------------------------- comparison
def _cmp(rules, out, exp, atol=0.0, dataset="humaneval", entry="f", inp=((1,),)):
    outs = [("ok", o) for o in out]
    return compare_outputs(rules, dataset, entry, list(inp) * len(out), outs, exp, atol)[0]


@pytest.mark.parametrize("rules", [REL, COR], ids=["release", "corrected"])
def test_float_tolerance_common_rules(rules):
    assert _cmp(rules, [0.1 + 0.2], [0.3])  # floats: atol 1e-6, rtol 1e-7
    assert _cmp(rules, [1.0 + 5e-7], [1.0]) and not _cmp(rules, [1.0 + 5e-6], [1.0])
    assert _cmp(rules, [[0.5, 1.0 + 5e-7]], [[0.5, 1.0]])
    assert not _cmp(rules, [[0.5]], [[0.5, 1.0]])  # length differs
    assert _cmp(rules, [3], [3.0])  # exact match (3 == 3.0) needs no tolerance
    assert not _cmp(rules, [3.0000001], [3])  # int expected: no tolerance
    assert not _cmp(rules, [(0.3,)], [[0.3]])  # evalplus checks the exact type
    assert _cmp(rules, [1.0 + 5e-5], [1.0], atol=1e-4)  # the problem's own atol
    assert not _cmp(rules, [None], [0.0]) and not _cmp(rules, ["0.0"], [0.0])


def test_comparison_rules_release_vs_corrected():
    # atol is sticky in evalplus 1895d2f6's loop: after a float output, int lists get a tolerance
    out, exp = [0.5, [1, 2 + 1e-9]], [0.5, [1, 2]]
    assert _cmp(REL, out, exp) and not _cmp(COR, out, exp)
    # is_floats([]) is True before evalplus PR #196: an empty expected list switches the (sticky)
    # tolerance on for the inputs after it
    out, exp = [[], [1, 2 + 1e-9]], [[], [1, 2]]
    assert _cmp(REL, out, exp) and not _cmp(COR, out, exp)
    # find_zero: release requires the canonical's root (poly <= atol, then the generic check);
    # corrected accepts any root |poly| <= atol
    poly = [-6.0, 11.0, -6.0, 1.0]  # roots 1, 2, 3
    args = dict(dataset="humaneval", entry="find_zero", inp=[(poly,)], atol=1e-4)
    assert _cmp(COR, [3.0], [1.0], **args) and not _cmp(REL, [3.0], [1.0], **args)
    assert _cmp(COR, [1.0], [1.0], **args) and _cmp(REL, [1.0], [1.0], **args)
    # MBPP+ v0.2.0's set-equality oracle (similar_elements) is not in the release
    args = dict(dataset="mbpp", entry="similar_elements", inp=[((3, 4, 5), (5, 4))])
    assert _cmp(COR, [(5, 4)], [(4, 5)], **args) and not _cmp(REL, [(5, 4)], [(4, 5)], **args)
    # oracles both have: Mbpp/164 always true, Mbpp/295 zero accepted, not-None tasks
    for r in (REL, COR):
        assert _cmp(r, [False], [True], dataset="mbpp", entry="are_equivalent")
        assert _cmp(r, [0], [7], dataset="mbpp", entry="sum_div")
        assert _cmp(r, [object()], [True], dataset="mbpp", entry="check_str")
        assert not _cmp(r, [None], [True], dataset="mbpp", entry="check_str")


def test_time_limit_formula():
    assert time_limits(REL, [0.0, 0.01, 0.1]) == [0.2, 0.2, 0.4]
    assert time_limits(COR, [0.0, 0.01, 0.5]) == [1.0, 1.0, 2.0]
    assert time_limits(REL, [0.1], Limits(min_time_limit=0.5, time_factor=2.0)) == [0.5]


def test_time_limit_and_main_block_in_the_sandbox():
    """A 0.5 s answer to an instant canonical: a timeout under release (0.2 s), a pass when
    corrected (1 s). An `if __name__ == "__main__"` block runs only when corrected (evalplus
    exec()s the program with empty globals)."""
    slow = "import time\ndef f(x):\n    time.sleep(0.5)\n    return 2 * x\n"
    main = "def f(x):\n    return 2 * x\nif __name__ == '__main__':\n    raise SystemExit('main ran')\n"
    progs = [Program(code=c, mode="evalplus", entry_point="f", inputs=[[1]], canonical=HE_DOC["prompt"]
                     + HE_DOC["canonical_solution"], dataset="humaneval", rules=r)
             for c in (slow, main) for r in ("release", "corrected")]
    slow_rel, slow_cor, main_rel, main_cor = run_programs(progs, allow_code_execution=True, workers=2)
    assert not slow_rel.passed and "timeout on base input 0" in slow_rel.reason, slow_rel
    assert slow_cor.passed, slow_cor
    assert main_rel.passed, main_rel
    assert not main_cor.passed and "main ran" in main_cor.reason, main_cor


def test_scoring_option_end_to_end(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    good = "\ndef add_one(x):\n    return x + 1\n```"
    one_liner = "\ndef add_one(x): return x + 1\n```"  # the release's sanitiser drops it
    late_const = "\ndef add_one(x):\n    return x + K\nK = 1\n```"  # release drops `K = 1`
    docs = [MBPP_DOC] * 3
    assert get_task("mbpp").score_batch(docs, [good, one_liner, late_const]) == [True, False, False]
    assert get_task("mbpp", scoring="corrected").score_batch(docs, [good, one_liner, late_const]) == [True] * 3
    he = get_task("humaneval")
    assert he.score_batch([HE_DOC, HE_DOC], ["\n    return 2 * x\n```", "\n    return x\n```"]) == [True, False]


def test_release_sanitizer_matches_evalplus_legacy_sanitizer(data_mirror):
    """Differential check against evalplus's own copy of the legacy text-based sanitiser (installed
    as evalplus.lecacy_sanitize), which the release's fishfarm `sanitize_code` follows; on every
    release problem with the canonical answer and model-like variants of it."""
    import gzip
    import json

    legacy = pytest.importorskip("evalplus.lecacy_sanitize")
    n = 0
    for name, f in (("mbpp", "mbppplus/MbppPlus-v0.1.0.jsonl.gz"),
                    ("humaneval", "humanevalplus/HumanEvalPlus-v0.1.9.jsonl.gz")):
        with gzip.open(data_mirror / f, "rt") as fh:
            rows = [json.loads(line) for line in fh]
        for r in rows:
            sol = r["canonical_solution"]
            four = "\n".join(("  " + l if l.startswith("  ") and not l.startswith("    ") else l)
                             for l in sol.splitlines())
            three = "\n".join(("   " + l.lstrip() if l.startswith("    ") else l) for l in four.splitlines())
            for completion in (sol, four, three, four + "\n\nprint(1)\nassert True\n",
                               "Here you go:\n```python\n" + four + "\n```\nDone.",
                               four + "\nx = 1\nif x:\n    pass\n", "no code at all"):
                code = r["prompt"] + "\n" + completion
                want = legacy.sanitize(code.strip(), r["entry_point"]).strip()
                assert release_sanitize(code, r["entry_point"]) == want, (r["task_id"], completion)
                n += 1
    assert n == 7 * (399 + 164)
