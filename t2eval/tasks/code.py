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
Scoring: completion cut at the first "```"; MBPP: evalplus-sanitised; HumanEval: the original
prompt + body. Tests (tests="evalplus", default, what evalplus reports as base pass@1): the
canonical solution's outputs on `base_input`, compared with evalplus's oracle; tests="original":
MBPP+ "assertion" / HumanEval `test` + `check(entry_point)`.
"""

from __future__ import annotations

from .base import Task, check_option
from .registry import register_task

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


class _CodeTask(Task):
    metric = "pass@1"
    system = SYSTEM
    extra_stop = ("```",)
    dataset = ""

    def __init__(self, template: str = "release", tests: str = "evalplus",
                 allow_code_execution: bool | None = None, workers: int = 2) -> None:
        check_option(self.key, "template", template, tuple(_TEMPLATES))
        self.tests = check_option(self.key, "tests", tests, ("evalplus", "original"))
        self.chat_template = _TEMPLATES[template]
        self.allow_code_execution = allow_code_execution
        self.workers = workers
        self.options = {"template": template, "tests": tests}

    def program(self, doc: dict, completion: str):
        from .sandbox import Program

        code = self.postprocess(doc, completion)
        if self.tests == "original" or "base_input" not in doc:
            return Program(code=code + "\n\n" + self.original_tests(doc))
        return Program(code=code, mode="evalplus", entry_point=doc["entry_point"],
                       inputs=self.base_inputs(doc),
                       canonical=doc["prompt"] + doc["canonical_solution"],
                       atol=float(doc.get("atol") or 0), dataset=self.dataset,
                       output_not_none=self.output_not_none(doc))

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

    def postprocess(self, doc: dict, completion: str) -> str:
        from evalplus.sanitize import sanitize

        body = cut_at_fence(completion)
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
        return list(task_split(self.key, split, data_dir, humaneval_dataset=ds))

    def user_message(self, doc: dict) -> str:
        return humaneval_instruction(doc["prompt"])

    def prefill(self, doc: dict, family: str | None = None) -> str:
        return "```python\n" + doc["prompt"].strip()

    def reference(self, doc: dict) -> str:
        return "\n" + doc["canonical_solution"].strip("\n") + "\n```"

    def postprocess(self, doc: dict, completion: str) -> str:
        return doc["prompt"] + cut_at_fence(completion)

    def original_tests(self, doc: dict) -> str:
        return doc["test"] + f"\n\ncheck({doc['entry_point']})\n"
