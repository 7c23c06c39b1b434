"""The two named protocols, `release` and `corrected`: every knob that differs, in one table.

`release` reproduces the authors' code release, bugs included: it is what produced the published
numbers (PROTOCOL.md §8), and it is the default everywhere (workflow config, `t2` model_args,
`t2eval` CLI, stock `lm_eval --tasks t2_*`). `corrected` fixes what the audit found to be release
bugs and otherwise keeps the release's choice. Individual knobs stay overridable
(`settings("release", arc_numeric_keys="position")`); every result cell records the protocol name
and every knob's value, and tables refuse to mix protocols.

    t2eval protocol                 # the table: knob | release | corrected | paper text | where used
    t2eval protocol --format md     # the Markdown table the README embeds
"""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from .errors import T2EvalError

PROTOCOLS: tuple[str, ...] = ("release", "corrected")
DEFAULT = "release"
ENV_VAR = "T2EVAL_PROTOCOL"  # how stock `lm_eval --tasks t2_*` picks the protocol (default: release)


@dataclass(frozen=True)
class Knob:
    name: str
    release: Any
    corrected: Any
    paper: str      # what the paper's text says (or "—" where it is silent)
    where: str      # where the knob is used
    spec: str       # PROTOCOL.md section / issue item

    def value(self, protocol: str) -> Any:
        return self.release if protocol == "release" else self.corrected


KNOBS: tuple[Knob, ...] = (
    Knob("arc_numeric_keys", "code", "position",
         "— (answer letter equals the key)",
         "tasks/arc.py score; ARC-Easy reward; ARC-Challenge original labels (data/splits.py)",
         "§5, §8 ARC numeric answer keys; #8.1"),
    Knob("mbppplus_version", "v0.1.0", "v0.1.0", "MBPP+ (399 problems, test = last 99)",
         "data/datasets.py, data/splits.py (MBPP-Pro train/valid/test)", "§3, §8 evalplus data versions; #8.2"),
    Knob("humanevalplus_version", "v0.1.9", "v0.1.9", "HumanEval (164)",
         "data/datasets.py, tasks/code.py (HumanEval)", "§8 evalplus data versions; #8.2"),
    Knob("code_scoring", "release", "corrected",
         "pass@1 on the base tests",
         "tasks/code.py + tasks/sandbox.py: release sanitiser on prompt+\"\\n\"+completion, evalplus 1895d2f6 "
         "comparison, time limit max(0.2 s, 4×canonical), cut at first ```",
         "§8 evalplus; #8.3"),
    Knob("math_order", "hf", "hf", "MATH test (5000)",
         "data/splits.py: MATH test rows sorted by unique_id as a string (HF order)", "§8 MATH row order; #8.4"),
    Knob("fewshot_seeds", "release", "release",
         "10 held-out prompts", "data/splits.py fewshot_heldout / fewshot_test: random.seed(s); shuffle(range(n)); "
         "s = 27 MATH, 38 ARC-Challenge, 16 HumanEval (\"uniform\": 27 for all)", "§6.3; #8.4"),
    Knob("dispatch_template", "task", "chat",
         "a classification prompt",
         "adapt/dispatch.py first pass (prompt, cls; generate and logprob; HF and vLLM): task = the task's own "
         "template + token budget (code template, Llama-3 ARC pre-fill, 1024 for MATH); chat = the model's chat "
         "template", "§8 dispatch first pass; #8.5"),
    Knob("dispatch_other", "last_expert", "base",
         "\"other\" uses the base model",
         "lm.py second pass (other_expert): questions classed \"other\" (release: the last expert "
         "loaded in the order code, math, reasoning)", "§8 \"other\" at dispatch; #8.5"),
    Knob("cls_split", "concatenated", "concatenated",
         "split 4:1 by index",
         "data/splits.py cls: i % 5 < 4 over the concatenated GSM8K-test + MBPP + ARC-Challenge list "
         "(train 479 → even/odd, test 239); MBPP+ instruction text for code", "§6.2, §8; #8.6"),
    Knob("cls_code_text", "instruction", "instruction", "questions of each task",
         "data/splits.py cls: the MBPP+ `instruction` text the dispatcher sees (\"prompt\": the MBPP prompt)",
         "§8 classifier-expert data; #8.6"),
    Knob("cls_max_new_tokens", 1024, 1024, "—", "train-svf on cls (classifier expert training)", "§8; #8.6"),
    Knob("fewshot_mix", "raw_z", "raw_z", "z′ = Σ α_k z_k",
         "svf.py mixture: Σ α_k z_k used directly as the multiplier, then the σ-mass rescale",
         "§6.3 (corrected 2026-12), §8; #8.7"),
    Knob("fewshot_select", "reported_set", "final_incumbent",
         "CEM on the 10 held-out prompts",
         "adapt/cem.py final α: release = best of the incumbents scored every 10 iterations on the reported set "
         "(\"α selected on the reported set\"); corrected = the final incumbent, chosen on the shots only",
         "§8 few-shot CEM; #8.7"),
    Knob("bos", "double", "single", "—",
         "tokenisation in generation, PG loss and CEM scoring: release adds the tokenizer's BOS to prompts that "
         "already start with one (two on Llama-3 chat prompts, one on code prompts)", "§8 tokenisation; #8.8"),
    Knob("pg_code_prompt", "prefill_turn", "sampling_prompt", "—",
         "train/losses.py PG loss on code tasks: release scores \"@@ Response:\\n```python\" + completion "
         "(pre-fill as an assistant turn), one newline off the sampling prompt", "§8 PG loss on code tasks; #8.10"),
    Knob("gsm8k_extractor", "code", "signed", "the final number",
         "tasks/gsm8k.py: last match of \\d*\\.?\\d+ (drops minus signs) vs a signed number", "§5 scoring details"),
    Knob("arc_no_answer", "random", "wrong", "—",
         "tasks/arc.py: an answer with no letter draws a random letter (seed 42) vs counts as wrong",
         "§5 scoring details"),
)
KNOB_NAMES: tuple[str, ...] = tuple(k.name for k in KNOBS)
_BY_NAME = {k.name: k for k in KNOBS}


def check(protocol: str | None) -> str:
    p = protocol or DEFAULT
    if p not in PROTOCOLS:
        raise T2EvalError(f"protocol={p!r}: use one of {', '.join(PROTOCOLS)}")
    return p


OVERRIDES_ENV_VAR = "T2EVAL_PROTOCOL_OVERRIDES"  # JSON object of knob -> value (the workflow's protocol_overrides)


def default_protocol() -> str:
    """The protocol when none is given: $T2EVAL_PROTOCOL, else release."""
    return check(os.environ.get(ENV_VAR) or DEFAULT)


def env_overrides() -> dict[str, Any]:
    raw = os.environ.get(OVERRIDES_ENV_VAR)
    if not raw:
        return {}
    from .config import json_object

    return json_object(raw, f"${OVERRIDES_ENV_VAR} (knob values)", '\'{"arc_no_answer": "wrong"}\'')


@contextlib.contextmanager
def using(protocol: str | None, overrides: Mapping[str, Any] | None = None) -> Iterator[str]:
    """`use(protocol, overrides)` for the duration of a block (one training run, one search), then the caller's
    environment back. Overrides replace, not extend, any set in the environment."""
    saved = {k: os.environ.get(k) for k in (ENV_VAR, OVERRIDES_ENV_VAR)}
    try:
        os.environ.pop(OVERRIDES_ENV_VAR, None) if overrides is not None else None
        yield use(protocol, overrides)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def use(protocol: str | None, overrides: Mapping[str, Any] | None = None) -> str:
    """Make `protocol` (and knob overrides) the default of this process and its children (CLI --protocol,
    `t2` protocol=): every layer that does not get the protocol explicitly reads it from the environment."""
    import json

    p = check(protocol) if protocol else default_protocol()
    settings(p, overrides)  # validates the overrides
    os.environ[ENV_VAR] = p
    if overrides:
        os.environ[OVERRIDES_ENV_VAR] = json.dumps(dict(overrides), sort_keys=True)
    return p


def settings(protocol: str | None = None, overrides: Mapping[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """Every knob's value under `protocol` (None: the default), with individual overrides applied."""
    p = check(protocol) if protocol else default_protocol()
    over = {**(env_overrides() if overrides is None and not protocol else {}), **(overrides or {}), **kw}
    unknown = sorted(set(over) - set(KNOB_NAMES))
    if unknown:
        raise T2EvalError(f"unknown protocol knob(s) {', '.join(unknown)}; known: {', '.join(KNOB_NAMES)}")
    return {k.name: over.get(k.name, k.value(p)) for k in KNOBS}


def value(name: str, protocol: str | None = None, overrides: Mapping[str, Any] | None = None) -> Any:
    if name not in _BY_NAME:
        raise T2EvalError(f"unknown protocol knob {name!r}; known: {', '.join(KNOB_NAMES)}")
    return settings(protocol, overrides)[name]


def record(protocol: str | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a result cell stores: the protocol name, the overridden knobs and every knob's value."""
    p = check(protocol) if protocol else default_protocol()
    if overrides is None and not protocol:
        overrides = env_overrides()
    return {"name": p, "overrides": dict(overrides or {}), "knobs": settings(p, overrides)}


# knob -> the option it sets: ("data", option of data.splits.task_split) or ("task", {task keys}, option of
# the task class). One table, so a task or the data layer never has to know the protocol itself.
DATA_KNOBS: dict[str, str] = {"mbppplus_version": "mbppplus_version", "humanevalplus_version": "humanevalplus_version",
                              "math_order": "math_order", "fewshot_seeds": "fewshot_seeds", "cls_split": "cls_split",
                              "cls_code_text": "cls_code_text"}
TASK_KNOBS: dict[str, tuple[tuple[str, ...], str]] = {
    "arc_numeric_keys": (("arc_easy", "arc_challenge"), "numeric_keys"),
    "arc_no_answer": (("arc_easy", "arc_challenge"), "no_answer"),
    "gsm8k_extractor": (("gsm8k",), "extractor"),
    "code_scoring": (("mbpp", "humaneval"), "scoring"),
}


def data_options(protocol: str | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `task_split` options of the protocol (MBPP+/HumanEval+ versions, MATH order, few-shot seeds, cls data)."""
    s = settings(protocol, overrides)
    return {opt: s[k] for k, opt in DATA_KNOBS.items()}


def task_options(task: str, protocol: str | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The constructor options of task `task` under the protocol (e.g. ARC numeric keys, code scoring)."""
    s = settings(protocol, overrides)
    return {opt: s[k] for k, (tasks, opt) in TASK_KNOBS.items() if task in tasks}


def fewshot_seed(task: str, protocol: str | None = None) -> int:
    from .data.splits import fewshot_seed as _seed

    return _seed(task, value("fewshot_seeds", protocol))


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|")


def table(fmt: str = "md") -> str:
    """The knob table (Markdown, or plain text columns)."""
    head = ("knob", "release", "corrected", "paper text", "where it is used")
    rows = [(k.name, k.release, k.corrected, k.paper, f"{k.where} ({k.spec})") for k in KNOBS]
    if fmt == "md":
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(f"`{_cell(r[0])}`" if i == 0 else _cell(x) for i, x in enumerate(r)) + " |"
                  for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(3)]
    out = []
    for r in [head, *rows]:
        out.append("  ".join(str(r[i]).ljust(widths[i]) for i in range(3)) + f"  {r[3]} — {r[4]}")
    return "\n".join(out)


# -- `t2eval protocol` ---------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("text", "md"), default="text", help="plain columns or the README's Markdown")


def run(args: argparse.Namespace) -> int:
    print(table(args.format))
    return 0
