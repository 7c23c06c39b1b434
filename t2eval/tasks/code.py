"""MBPP+ ("MBPP-Pro") and HumanEval: code generation scored by base-test pass@1 (PROTOCOL §5).

Rendering (release): the code tasks do NOT use the model's chat template but the release's own
"@@ Instruction / @@ Response" template; with the generation prompt it ends in "@@ Response:" and
the pre-fill is appended directly ("@@ Response:```python" -- no newline, as the release's
evaluator renders it). Options: template="release" (default), "protocol" (a newline after
"@@ Response:", the PROTOCOL's wording and the release's training-time rendering) or "model"
(the model's own chat template with the same system/user messages). `Task.chat_template` holds
the jinja template to pass to the tokenizer (and to lm-eval's HFLM via chat_template_args).

Instruction (MBPP): the MBPP+ prompt's docstring text before the first "assert" (ending with "."),
" Your code should satisfy the following assertion:" and the assertion in a ```python block;
pre-fill "```python". HumanEval: "Write a solution to the following problem:" + the stripped
prompt in a ```python block; pre-fill "```python\\n" + stripped prompt.
Scoring (option `scoring`, PROTOCOL §8):
- "release" (default; what produced the published numbers): no "```" in the stop list, the
  completion is cut at the first "```" when scoring; the program is the release's sanitiser
  (fishfarm's `sanitize_code`, `release_sanitize` below) applied to prompt + "\n" + completion, for
  MBPP and HumanEval alike; outputs compared with evalplus's rules at the pinned commit 1895d2f6
  (`sandbox.RULES["release"]`); per-input time limit max(0.2 s, 4 x canonical time).
- "corrected": "```" is a stop string; MBPP: today's evalplus (tree-sitter) sanitiser on the
  completion; HumanEval: the original prompt + body; evalplus 0.3's comparison rules; time limit
  max(1 s, 4 x canonical time).
Tests (tests="evalplus", default, what evalplus reports as base pass@1): the canonical solution's
outputs on `base_input`, compared in trusted code with the rules above; tests="original":
MBPP+ "assertion" / HumanEval `test` + `check(entry_point)` (run as a script).
"""

from __future__ import annotations

import ast
import re

from .base import Task, check_option
from .registry import register_task

SCORINGS = ("release", "corrected")

SYSTEM = ("You are an exceptionally intelligent coding assistant that  consistently delivers "
          "accurate and reliable responses to user instructions.")

_TEMPLATE_HEAD = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'].strip() + '\\n\\n' %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = '' %}{% endif %}"
    "{{ system_message }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '@@ Instruction:\\n' + message['content'].strip() + '\\n\\n' }}"
)
# "release": a final assistant message is a pre-fill glued to "@@ Response:" (as the release's
# evaluator renders it); earlier assistant turns keep the newline.
CODE_CHAT_TEMPLATE = _TEMPLATE_HEAD + (
    "{% elif message['role'] == 'assistant' %}"
    "{% if loop.last %}{{ '@@ Response:' + message['content'] }}"
    "{% else %}{{ '@@ Response:\\n' + message['content'].strip() }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and message['role'] == 'user' and add_generation_prompt %}{{ '@@ Response:' }}{% endif %}"
    "{% endfor %}")
CODE_CHAT_TEMPLATE_PROTOCOL = _TEMPLATE_HEAD + (
    "{% elif message['role'] == 'assistant' %}{{ '@@ Response:\\n' + message['content'] }}"
    "{% endif %}"
    "{% if loop.last and message['role'] == 'user' and add_generation_prompt %}{{ '@@ Response:\\n' }}{% endif %}"
    "{% endfor %}")
_TEMPLATES = {"release": CODE_CHAT_TEMPLATE, "protocol": CODE_CHAT_TEMPLATE_PROTOCOL, "model": None}


def mbpp_instruction(prompt: str) -> str:
    body = prompt[prompt.index('"""') + 3:prompt.rindex('"""')]
    at = body.index("assert")
    nl = body[:at].strip()
    if not nl.endswith("."):
        nl += "."
    return (f"{nl} Your code should satisfy the following assertion:\n"
            f"```python\n{body[at:].strip()}\n```")


def humaneval_instruction(prompt: str) -> str:
    return f"Write a solution to the following problem:\n```python\n{prompt.strip()}\n```"


def cut_at_fence(text: str) -> str:
    i = text.find("```")
    return text if i < 0 else text[:i]


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, MemoryError, ValueError, RecursionError):
        return False


def _fix_three_space_indents(code: str) -> str:
    """Lines indented by exactly 3 spaces get a 4th; every line ends with a newline."""
    return "".join((" " if len(line) - len(line.lstrip()) == 3 else "") + line + "\n"
                   for line in code.splitlines())


def _drop_top_level_lines(code: str, first: str) -> str:
    """After the first line starting with `first`: drop non-blank lines with no indentation unless
    they start a def or an import; an unindented line starting with '\"\"\"', "if" or
    "print" ends the code there."""
    lines = code.splitlines()
    keep = [True] * len(lines)
    seen_first = False
    for i, line in enumerate(lines):
        if not seen_first and line.startswith(first):
            seen_first = True
            continue
        if not line.strip() or line.startswith(("def ", "import ", "from ")):
            continue
        if not line[:1].isspace():
            keep[i] = False
        if line.rstrip().startswith(('"""', "if", "print")):
            keep[i:] = [False] * (len(lines) - i)
            break
    return "\n".join(line for line, k in zip(lines, keep) if k)


def release_sanitize(code: str, entry_point: str) -> str:
    """The code release's sanitiser (fishfarm `sanitize_code`, evalplus's legacy text-based one),
    re-implemented from its behaviour: on "\n" + code, take the first ```-fenced block that mentions
    "def <entry_point>"; keep what precedes the first "def <entry_point>(" as is; keep the
    "def <entry_point>(" definitions whose text (up to the next "\ndef") contains "    return ",
    with 3-space indents widened to 4 and top-level non-def/import lines after them dropped (up to
    a top-level '\"\"\"', "if" or "print" line, which ends the code); finally drop functions other
    than the entry point that do not parse on their own."""
    text = ("\n" + code.strip()).replace("\n```python\n", "\n```\n")
    head = "def " + entry_point
    for block in text.split("\n```\n"):
        if head in block:
            text = block
            break
    pieces = re.split(re.escape(head) + r"\s*\(", text)
    bodies = [p for p in pieces[1:] if "    return " in p.split("\ndef")[0]]
    funcs = (head + "(") + (head + "(").join(bodies) if bodies else ""
    funcs = _drop_top_level_lines(_fix_three_space_indents(funcs), head + "(")
    parts = (pieces[0] + funcs).split("\ndef ")
    kept = [parts[0]] + [fn for fn in parts[1:]
                         if fn.strip().startswith((entry_point + " ", entry_point + "("))
                         or _parses("\ndef " + fn)]
    return "\ndef ".join(kept).strip()


class _CodeTask(Task):
    metric = "pass@1"
    system = SYSTEM
    dataset = ""

    def __init__(self, template: str = "release", tests: str = "evalplus", scoring: str = "release",
                 allow_code_execution: bool | None = None, workers: int = 2) -> None:
        check_option(self.key, "template", template, tuple(_TEMPLATES))
        self.tests = check_option(self.key, "tests", tests, ("evalplus", "original"))
        self.scoring = check_option(self.key, "scoring", scoring, SCORINGS)
        self.chat_template = _TEMPLATES[template]
        # release: "```" is not a stop string (the completion is cut at it when scoring)
        self.extra_stop = () if scoring == "release" else ("```",)
        self.allow_code_execution = allow_code_execution
        self.workers = workers
        self.options = {"template": template, "tests": tests, "scoring": scoring}

    def program(self, doc: dict, completion: str):
        from .sandbox import Program

        code = self.postprocess(doc, completion)
        if self.tests == "original" or "base_input" not in doc:
            return Program(code=code + "\n\n" + self.original_tests(doc))
        return Program(code=code, mode="evalplus", entry_point=doc["entry_point"],
                       inputs=self.base_inputs(doc),
                       canonical=doc["prompt"] + doc["canonical_solution"],
                       atol=float(doc.get("atol") or 0), dataset=self.dataset,
                       output_not_none=self.output_not_none(doc), rules=self.scoring)

    def postprocess(self, doc: dict, completion: str) -> str:
        """The program that is run: cut at the first "```", then sanitised (see the module doc)."""
        body = cut_at_fence(completion)
        if self.scoring == "release":
            return release_sanitize(doc["prompt"] + "\n" + body, doc["entry_point"])
        return self.corrected_program(doc, body)

    def base_inputs(self, doc: dict) -> list:
        return doc["base_input"]

    def output_not_none(self, doc: dict) -> bool:
        return False

    def execute(self, docs, completions):
        """Per-doc sandbox results (ExecResult with passed/status/reason)."""
        from .sandbox import check_allowed, run_programs

        check_allowed(self.allow_code_execution)  # before touching any completion
        progs = [self.program(d, c) for d, c in zip(docs, completions)]
        return run_programs(progs, allow_code_execution=self.allow_code_execution, workers=self.workers)

    def score_batch(self, docs, completions) -> list[bool]:
        if len(docs) != len(completions):
            raise ValueError(f"{len(docs)} docs but {len(completions)} completions")
        return [r.passed for r in self.execute(docs, completions)]

    def score_one(self, doc: dict, completion: str) -> bool:
        return self.score_batch([doc], [completion])[0]


@register_task("mbpp")
class MBPP(_CodeTask):
    key = "mbpp"
    dataset = "mbpp"

    def user_message(self, doc: dict) -> str:
        return mbpp_instruction(doc["prompt"])

    def prefill(self, doc: dict, family: str | None = None) -> str:
        return "```python"

    def reference(self, doc: dict) -> str:
        return "\n" + doc["canonical_solution"].strip("\n") + "\n```"

    def corrected_program(self, doc: dict, body: str) -> str:
        from evalplus.sanitize import sanitize

        try:
            return sanitize(body, doc.get("entry_point"))
        except Exception:  # noqa: BLE001 - unparsable code: run as is (it will fail)
            return body

    def base_inputs(self, doc: dict) -> list:
        from evalplus.data.mbpp import mbpp_deserialize_inputs

        return mbpp_deserialize_inputs(doc["task_id"], doc["base_input"])

    def output_not_none(self, doc: dict) -> bool:
        from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS

        return doc["entry_point"] in MBPP_OUTPUT_NOT_NONE_TASKS

    def original_tests(self, doc: dict) -> str:
        return doc["assertion"]


@register_task("humaneval")
class HumanEval(_CodeTask):
    key = "humaneval"
    dataset = "humaneval"

    def docs(self, split: str, data_dir=None) -> list[dict]:
        """HumanEval+ rows (same 164 problems, plus base_input) when scoring the evalplus way."""
        from ..data.splits import task_split

        ds = "humanevalplus" if self.tests == "evalplus" else "humaneval"
        return list(task_split(self.key, split, data_dir, **{**self.data_options, "humaneval_dataset": ds}))

    def user_message(self, doc: dict) -> str:
        return humaneval_instruction(doc["prompt"])

    def prefill(self, doc: dict, family: str | None = None) -> str:
        return "```python\n" + doc["prompt"].strip()

    def reference(self, doc: dict) -> str:
        return "\n" + doc["canonical_solution"].strip("\n") + "\n```"

    def corrected_program(self, doc: dict, body: str) -> str:
        return doc["prompt"] + body

    def original_tests(self, doc: dict) -> str:
        return doc["test"] + f"\n\ncheck({doc['entry_point']})\n"
