"""First pass of Transformer² self-adaptation (PROTOCOL §6): pick an expert for every question.

The classification prompt and its parser live in `t2eval.tasks.cls` (shared with the cls-expert's
RL training); this module only runs them over a batch, in one of two modes:

- `generate`: greedy generation of the classification answer, parsed with `parse_category`
  (unparsable → "others"); used by the Prompt strategy (base weights) and the Cls strategy (cls
  expert loaded by the caller).
- `logprob`: one forward pass scoring each category label after the classification prompt
  followed by the answer prefix the prompt asks for (`Classification: \\boxed{`, so a model that
  follows the format is scored exactly where its greedy answer would put the label); the label with
  the highest log-probability wins. Unlike `generate`, it always yields one of the labels, also
  for models that ignore the requested format (whose generated answers parse to "other").

Both take backend-neutral callables so lm-eval's HFLM / VLLM and the t2eval backends can be used.

How the classification request is rendered is the protocol knob `dispatch_template` (PROTOCOL §8
"Dispatch first pass"): `task` (release) renders the classification system prompt + question with the
task's own template and token budget (`first_pass_render`: the code tasks' "@@ Instruction" template,
the Llama-3 ARC pre-fill, 1024 new tokens for MATH, 512 otherwise); `chat` (corrected) uses the
model's chat template and the cls task's budget. Both modes (generate, logprob) use the same rendering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..constants import EXPERT_NAMES, TASK_KEYS

# category -> expert name (None = base weights). PROTOCOL §6: "other" uses the base model.
EXPERT_OF = {e: e for e in EXPERT_NAMES}
ANSWER_PREFIX = "Classification: \\boxed{"  # the format the classification prompt asks for


def _cls():
    from ..tasks import cls as cls_task

    return cls_task


def categories() -> tuple[str, ...]:
    return tuple(_cls().CATEGORIES)


def expert_for(category: str) -> str | None:
    """Expert name for a parsed category; "other(s)"/anything else → None (base weights)."""
    return EXPERT_OF.get(category)


DISPATCH_TEMPLATES = ("task", "chat")


@dataclass(frozen=True)
class FirstPassRender:
    """How a first-pass request is rendered: a chat template replacing the model's (None: the
    model's own), a pre-fill appended after the generation prompt, and the generation budget
    (None: the cls task's)."""

    chat_template: str | None = None
    prefill: str = ""
    max_new_tokens: int | None = None


CHAT = FirstPassRender()


def first_pass_render(task: str | None, mode: str = "task", family: str | None = None) -> FirstPassRender:
    """The first-pass rendering for questions of protocol task `task` (None / a non-t2 task: the
    model's chat template). mode="task" (release): the task's own chat template, its pre-fill where it
    does not depend on the document (the Llama-3 ARC "Let's think step by step"; the code tasks' pre-fill
    is not used: only their template) and its token budget; mode="chat" (corrected): `CHAT`."""
    from ..constants import CODE_TASKS
    from ..errors import T2EvalError

    if mode not in DISPATCH_TEMPLATES:
        raise T2EvalError(f"dispatch_template={mode!r}: use task (the release) or chat (corrected)")
    if mode == "chat" or not task or task not in TASK_KEYS or task == "cls":
        return CHAT
    from ..tasks import get_task

    t = get_task(task)
    prefill = "" if task in CODE_TASKS else t.prefill({}, family)
    return FirstPassRender(chat_template=t.chat_template, prefill=prefill, max_new_tokens=int(t.max_new_tokens))


def classification_prompt(tokenizer, question: str, render: FirstPassRender | None = None) -> str:
    """The rendered first-pass prompt (chat template + generation prompt + pre-fill) for one question."""
    r = render or CHAT
    if r.chat_template is None:
        return _cls().dispatch_prompt(tokenizer, question) + r.prefill
    return tokenizer.apply_chat_template(_cls().dispatch_messages(question), tokenize=False,
                                         add_generation_prompt=True, chat_template=r.chat_template) + r.prefill


def parse_category(text: str) -> str:
    return _cls().parse_category(text)


@dataclass
class DispatchResult:
    categories: list[str]
    experts: list[str | None]
    tokens: int = 0               # generated (generate) or scored label tokens (logprob)
    prompt_tokens: int = 0
    raw: list[str] = field(default_factory=list)   # generated text, or label log-probs as text


def dispatch_generate(questions: Sequence[str], tokenizer,
                      generate: Callable[[list[str], dict], list[str]],
                      max_new_tokens: int | None = None, render: FirstPassRender | None = None) -> DispatchResult:
    """Generate a classification answer per question (greedy) and parse it. `max_new_tokens`
    (cls_max_new_tokens=) overrides the rendering's budget."""
    from ..tasks.base import STOP

    prompts = [classification_prompt(tokenizer, q, render) for q in questions]
    budget = max_new_tokens or (render.max_new_tokens if render else None) or _cls().Cls.max_new_tokens
    gk = {"until": list(STOP), "max_gen_toks": int(budget),
          "do_sample": False, "temperature": 0.0}
    outs = generate(prompts, gk) if prompts else []
    cats = [parse_category(o) for o in outs]
    return DispatchResult(cats, [expert_for(c) for c in cats],
                          tokens=sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outs),
                          prompt_tokens=sum(len(tokenizer(p, add_special_tokens=False)["input_ids"])
                                            for p in prompts),
                          raw=list(outs))


def label_first_tokens(tokenizer, prompt: str, labels: Sequence[str]) -> list[int] | None:
    """Token id that starts each label right after `prompt`, or None when the first token does not
    decide between the labels (two labels share it, or the label merges with the prompt's last token)."""
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    firsts = []
    for lab in labels:
        ids = tokenizer(prompt + lab + "}", add_special_tokens=False)["input_ids"]
        if len(ids) <= len(base) or ids[:len(base)] != base:
            return None
        firsts.append(ids[len(base)])
    return firsts if len(set(firsts)) == len(firsts) else None


def dispatch_logprob(questions: Sequence[str], tokenizer,
                     score: Callable[[list[tuple[str, str]]], list[float]],
                     next_token_logprobs: Callable[[list[str]], Sequence[Sequence[float]]] | None = None,
                     render: FirstPassRender | None = None) -> DispatchResult:
    """Score every category label after `prompt + ANSWER_PREFIX`; choose the most likely label.

    `score(pairs)` returns sum log p(continuation | context) for (context, continuation) pairs; the
    label is scored with its closing brace ("math}") so labels that are prefixes of others compete fairly.
    With `next_token_logprobs(prompts)` (one forward pass per prompt, returning the log-probabilities
    of the next token) and labels whose first tokens differ, the first token alone decides: the
    remaining tokens of a label are then fixed by its first one, so this is one forward pass per
    question instead of one per (question, label) pair.
    """
    labels = categories()
    prompts = [classification_prompt(tokenizer, q, render) + ANSWER_PREFIX for q in questions]
    firsts = label_first_tokens(tokenizer, prompts[0], labels) if prompts and next_token_logprobs else None
    if firsts is not None:
        rows = next_token_logprobs(prompts)
        cats, raw = [], []
        for row in rows:
            lp = [float(row[t]) for t in firsts]
            best = max(range(len(labels)), key=lambda j: (lp[j], -j))
            cats.append(labels[best])
            raw.append(" ".join(f"{lab}:{v:.3f}" for lab, v in zip(labels, lp)))
        return DispatchResult(cats, [expert_for(c) for c in cats], tokens=len(prompts),
                              prompt_tokens=sum(len(tokenizer(p, add_special_tokens=False)["input_ids"])
                                                for p in prompts), raw=raw)
    pairs = [(p, lab + "}") for p in prompts for lab in labels]
    lps = score(pairs) if pairs else []
    cats, raw = [], []
    for i in range(len(prompts)):
        row = lps[i * len(labels):(i + 1) * len(labels)]
        best = max(range(len(labels)), key=lambda j: (row[j], -j))
        cats.append(labels[best])
        raw.append(" ".join(f"{lab}:{lp:.3f}" for lab, lp in zip(labels, row)))
    label_toks = sum(len(tokenizer(lab + "}", add_special_tokens=False)["input_ids"]) for lab in labels)
    return DispatchResult(cats, [expert_for(c) for c in cats], tokens=label_toks * len(prompts),
                          prompt_tokens=sum(len(tokenizer(p, add_special_tokens=False)["input_ids"])
                                            for p in prompts), raw=raw)


def question_of(tokenizer, task_name: str | None, doc: dict | None, rendered: str) -> str:
    """What the first pass classifies for one request: the t2 task's user message for `t2_<task>`
    requests (`tasks.cls.question_text`), else the last user turn of the rendered context."""
    key = (task_name or "")[3:] if (task_name or "").startswith("t2_") else None
    if key and doc:
        base = next((k for k in sorted(TASK_KEYS, key=len, reverse=True) if key == k or key.startswith(k + "_")), None)
        if base:
            try:
                return _cls().question_text(base, doc)
            except (KeyError, TypeError):
                pass
    return user_text(tokenizer, rendered)


def user_text(tokenizer, rendered: str) -> str:
    """The last user message inside a chat-rendered request (what the first pass classifies).

    Found by rendering a sentinel message with the tokenizer's chat template and locating the
    template's user prefix/suffix in `rendered`; a plain (non-chat) context is returned unchanged.
    """
    sentinel = "\x00T2SENTINEL\x00"
    try:
        tpl = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False,
                                            add_generation_prompt=True)
    except Exception:
        return rendered
    i = tpl.find(sentinel)
    if i < 0:
        return rendered
    head, tail = tpl[:i], tpl[i + len(sentinel):]
    u = head.rfind("user")
    start_marker = head[head.rfind("<|", 0, u) if u >= 0 and head.rfind("<|", 0, u) >= 0 else max(0, len(head) - 8):]
    end_marker = tail.split("\n", 1)[0] or tail[:8]
    s = rendered.rfind(start_marker)
    if not start_marker or s < 0:
        return rendered
    s += len(start_marker)
    e = rendered.find(end_marker, s) if end_marker else -1
    return rendered[s:e] if e >= 0 else rendered[s:]
