"""The protocol's data splits, in one deterministic module (PROTOCOL §3 and §6).

`task_split(task, split, data_dir=None)` returns fresh copies of the canonical rows written by
`t2eval prepare-data`, each with a stable ``"doc_id"``:

==============  =====================================================  ==========================
task            train / valid                                          test
==============  =====================================================  ==========================
gsm8k           GSM8K train, even / odd indices                        GSM8K test (1319)
arc_easy        ARC-Easy train, even / odd indices                     ARC-Easy test (2376)
mbpp            MBPP+ (evalplus, listed order) first 300, shuffled     MBPP+ rows 300.. (78 in
                with random.Random(16): 200 train / 100 valid          v0.2.0, 99 in v0.1.0)
math            -- (unseen task)                                       MATH test (5000)
humaneval       -- (unseen task)                                       HumanEval (164)
arc_challenge   -- (unseen task)                                       ARC-Challenge test (1172)
cls             dispatcher classifier, code release (see below)        its 1-in-5 test part
cls_leakfree    the same without any evaluation test question          its 1-in-5 test part
==============  =====================================================  ==========================

doc_ids: ``gsm8k/<split>/<index>`` for GSM8K (index in the source file), the ``id`` for ARC, the
``task_id`` for MBPP+/HumanEval (``Mbpp/2``, ``HumanEval/0``), the ``unique_id`` for MATH
(``test/algebra/1.json``; ``math/test/<index>`` when the source has none). Train/valid rows of
mbpp are returned in the shuffled order; everything else in source order.

Unseen tasks (math, humaneval, arc_challenge) also have ``fewshot_heldout`` / ``fewshot_test``:
the test indices shuffled with ``random.Random(27)``; the first 10 are the held-out prompts the
few-shot α search (CEM) may see, the rest (in source order) are the reported few-shot test set
(`fewshot_partition`).

Classifier data (PROTOCOL §6.2). ``cls`` = the code release's construction: the first 399
questions (listed order) of each source, or all of them when a source has fewer (MBPP+ v0.2.0 has
378, recorded by `split_sizes`):

- math      ← GSM8K **test**          (label "math")
- code      ← MBPP+ (all problems, incl. the MBPP test problems)   (label "code")
- reasoning ← ARC-Challenge **test**  (label "reasoning")

Per source, index i with i % 5 < 4 goes to the train pool, the others to ``test``; the pool is
split by position within the pool, even → ``train``, odd → ``valid``. This uses test questions
of evaluation tasks (GSM8K, MBPP, ARC-Challenge), so ``cls_leakfree`` builds the same thing from
data no evaluation task tests on:

- math      ← GSM8K **train**
- code      ← MBPP+ first 300 (the mbpp train/valid part; 300 < 399, so all 300)
- reasoning ← ARC-Easy **train**

and, in each source, drops any row whose question text (whitespace/case-normalised) equals a
test question of an evaluation task (one ARC-Easy train item, NYSEDREGENTS_2009_4_25, repeats the
stem of ARC-Easy test item NYSEDREGENTS_2012_4_20) before taking the first 399.

cls rows are copies of the source rows plus ``doc_id`` (the source's doc_id), ``label``,
``source_task`` and ``question`` = the text the classifier sees: the GSM8K question; the MBPP+
prompt without its docstring quotes (task text + example assertion); the ARC question followed by
``"\\nOptions:\\n"`` and lettered ``"A. …"`` lines (PROTOCOL §5). An ARC row's original
``question`` is kept as ``source_question``.
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Sequence

from ..errors import T2EvalError
from . import load_jsonl

TRAINING_TASKS = ("gsm8k", "mbpp", "arc_easy")
UNSEEN_TASKS = ("math", "humaneval", "arc_challenge")
CLS_TASKS = ("cls", "cls_leakfree")
TASKS = TRAINING_TASKS + UNSEEN_TASKS + CLS_TASKS
BASE_SPLITS = ("train", "valid", "test")
FEWSHOT_SPLITS = ("fewshot_heldout", "fewshot_test")

MBPP_SEED, MBPP_TRAINVALID, MBPP_TRAIN = 16, 300, 200
FEWSHOT_SEED, FEWSHOT_N = 27, 10
CLS_PER_SOURCE = 399
CLS_LABELS = ("math", "code", "reasoning")

DataDir = str | os.PathLike | None


def splits_for(task: str) -> tuple[str, ...]:
    _check_task(task)
    if task in UNSEEN_TASKS:
        return ("test",) + FEWSHOT_SPLITS
    return BASE_SPLITS


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise T2EvalError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def _with_id(row: dict, doc_id: str) -> dict:
    out = dict(row)
    out["doc_id"] = str(doc_id)
    return out


_MEMO: dict | None = None  # set only inside split_sizes(), whose callers never see the rows


def _load(dataset: str, split: str, data_dir: DataDir) -> list[dict]:
    if _MEMO is None:
        return load_jsonl(dataset, split, data_dir)
    key = (dataset, split, str(data_dir))
    if key not in _MEMO:
        _MEMO[key] = load_jsonl(dataset, split, data_dir)
    return _MEMO[key]


def _indexed(dataset: str, split: str, data_dir: DataDir, id_field: str | None) -> list[dict]:
    rows = _load(dataset, split, data_dir)
    return [_with_id(r, r[id_field] if id_field and r.get(id_field) is not None else f"{dataset}/{split}/{i}")
            for i, r in enumerate(rows)]


# ------------------------------------------------------------------ per-task sources

def _gsm8k(split: str, d: DataDir) -> list[dict]:
    return _indexed("gsm8k", split, d, None)


def _arc(name: str, split: str, d: DataDir) -> list[dict]:
    return _indexed(name, split, d, "id")


def _mbppplus(d: DataDir) -> list[dict]:
    return _indexed("mbppplus", "test", d, "task_id")


def _even_odd(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    return list(rows[0::2]), list(rows[1::2])


def mbpp_partition(rows: Sequence[dict], seed: int = MBPP_SEED) -> dict[str, list[dict]]:
    """MBPP-Pro: first 300 shuffled with random.Random(seed) → 200 train, 100 valid; the rest test."""
    if len(rows) < MBPP_TRAINVALID:
        raise T2EvalError(f"MBPP+ has {len(rows)} problems, fewer than the {MBPP_TRAINVALID} the protocol's "
                          "train/valid split needs; re-run `t2eval prepare-data --datasets mbppplus`")
    idx = list(range(MBPP_TRAINVALID))
    random.Random(seed).shuffle(idx)
    return {"train": [rows[i] for i in idx[:MBPP_TRAIN]],
            "valid": [rows[i] for i in idx[MBPP_TRAIN:]],
            "test": list(rows[MBPP_TRAINVALID:])}


def fewshot_partition(rows: Sequence[dict], n: int = FEWSHOT_N, seed: int = FEWSHOT_SEED
                      ) -> tuple[list[dict], list[dict]]:
    """(held-out, test): indices shuffled with random.Random(seed); first n held out (shuffled
    order), the rest are the reported test set, in source order."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    return [rows[i] for i in idx[:n]], [rows[i] for i in sorted(idx[n:])]


def _unseen_test(task: str, d: DataDir, options: dict) -> list[dict]:
    if task == "math":
        which = options.get("math_test", "test")
        if which not in ("test", "math500"):
            raise T2EvalError(f"math_test must be 'test' (5000) or 'math500', not {which!r}")
        rows = _load("math", which, d)
        return [_with_id(r, r.get("unique_id") or f"math/{which}/{i}") for i, r in enumerate(rows)]
    if task == "humaneval":
        ds = options.get("humaneval_dataset", "humaneval")
        if ds not in ("humaneval", "humanevalplus"):
            raise T2EvalError(f"humaneval_dataset must be 'humaneval' or 'humanevalplus', not {ds!r}")
        return _indexed(ds, "test", d, "task_id")
    return _arc("arc_challenge", "test", d)


# ------------------------------------------------------------------ classifier data

def _strip_docstring(prompt: str) -> str:
    s = prompt.strip()
    for q in ('"""', "'''"):
        if s.startswith(q) and s.endswith(q) and len(s) >= 6:
            return s[3:-3].strip()
    return s


def arc_question_text(row: dict) -> str:
    """question + "\\nOptions:\\n" + "A. …" lines, letters by position (PROTOCOL §5)."""
    lines = [f"{chr(ord('A') + k)}. {t}" for k, t in enumerate(row["choices"]["text"])]
    return row["question"] + "\nOptions:\n" + "\n".join(lines) + "\n"


def _cls_row(row: dict, label: str, source_task: str) -> dict:
    out = dict(row)
    if source_task.startswith("arc"):
        out["source_question"] = row["question"]
        out["question"] = arc_question_text(row)
    elif source_task == "mbpp":
        out["question"] = _strip_docstring(row["prompt"])
    out["label"] = label
    out["source_task"] = source_task
    return out


def cls_sources(variant: str, d: DataDir) -> list[tuple[str, str, list[dict]]]:
    """[(label, source_task, rows)] in label order, before the 399 cap."""
    mbpp = _mbppplus(d)
    if variant == "cls":
        return [("math", "gsm8k", _gsm8k("test", d)), ("code", "mbpp", mbpp),
                ("reasoning", "arc_challenge", _arc("arc_challenge", "test", d))]
    banned = eval_test_texts(d)
    return [(label, src, [r for r in rows if normalise_text(question_of(r)) not in banned])
            for label, src, rows in (("math", "gsm8k", _gsm8k("train", d)),
                                     ("code", "mbpp", mbpp[:MBPP_TRAINVALID]),
                                     ("reasoning", "arc_easy", _arc("arc_easy", "train", d)))]


def normalise_text(text: str) -> str:
    return " ".join(text.split()).lower()


def question_of(row: dict) -> str:
    """The raw question text of a source row (GSM8K/ARC question, MATH problem, code prompt)."""
    for k in ("question", "problem", "prompt", "text"):
        if isinstance(row.get(k), str):
            return row[k]
    return ""


_TEXTS_CACHE: dict[tuple, frozenset[str]] = {}


def eval_test_texts(d: DataDir) -> frozenset[str]:
    """Normalised question texts of every evaluation task's test set (training + unseen tasks).

    Cached per data directory while its manifest is unchanged."""
    from . import _data_dir

    m = _data_dir(d) / "manifest.json"
    key = (str(m.resolve()), m.stat().st_mtime_ns if m.exists() else None)
    if key not in _TEXTS_CACHE:
        out: set[str] = set()
        for t in TRAINING_TASKS + UNSEEN_TASKS:
            out.update(normalise_text(question_of(r)) for r in task_split(t, "test", d))
        _TEXTS_CACHE[key] = frozenset(out)
    return _TEXTS_CACHE[key]


def cls_partition(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """i % 5 < 4 → pool, else test; pool even/odd (by position in the pool) → train/valid."""
    pool = [r for i, r in enumerate(rows) if i % 5 < 4]
    test = [r for i, r in enumerate(rows) if i % 5 >= 4]
    train, valid = _even_odd(pool)
    return {"train": train, "valid": valid, "test": test}


def _cls(variant: str, split: str, d: DataDir) -> list[dict]:
    out: list[dict] = []
    for label, source_task, rows in cls_sources(variant, d):
        chosen = [_cls_row(r, label, source_task) for r in rows[:CLS_PER_SOURCE]]
        out.extend(cls_partition(chosen)[split])
    return out


# ------------------------------------------------------------------ public entry points

def task_split(task: str, split: str, data_dir: DataDir = None, **options: Any) -> list[dict]:
    """The protocol's rows of `task`/`split` (copies with "doc_id"); see the module docstring.

    options: math_test="test"|"math500" (default "test", 5000 problems);
    humaneval_dataset="humaneval"|"humanevalplus" (default "humaneval"; same 164 task_ids)."""
    allowed = splits_for(task)
    if split not in allowed:
        raise T2EvalError(f"task {task!r} has no split {split!r} in the protocol; choose from {', '.join(allowed)}")
    if task in UNSEEN_TASKS:
        rows = _unseen_test(task, data_dir, options)
        if split == "test":
            return rows
        held, rest = fewshot_partition(rows)
        return held if split == "fewshot_heldout" else rest
    if task == "gsm8k":
        return _gsm8k("test", data_dir) if split == "test" else _even_odd(_gsm8k("train", data_dir))[split == "valid"]
    if task == "arc_easy":
        if split == "test":
            return _arc("arc_easy", "test", data_dir)
        return _even_odd(_arc("arc_easy", "train", data_dir))[split == "valid"]
    if task == "mbpp":
        return mbpp_partition(_mbppplus(data_dir))[split]
    return _cls(task, split, data_dir)


def mbpp_version(data_dir: DataDir = None) -> str:
    """The MBPP+ release the mbpp task uses (from the data manifest), e.g. "v0.2.0"."""
    from . import manifest

    try:
        entry = manifest(data_dir)["datasets"]["mbppplus"]["test"]
    except KeyError:
        return "unknown"
    return str(entry.get("version") or "unknown")


def split_sizes(data_dir: DataDir = None, tasks: Sequence[str] = TASKS) -> dict[str, Any]:
    """{task: {split: rows}} for every task and split, plus "mbpp_version" and per-source cls counts."""
    global _MEMO
    outer, _MEMO = _MEMO, {} if _MEMO is None else _MEMO
    try:
        return _split_sizes(data_dir, tasks)
    finally:
        _MEMO = outer


def _split_sizes(data_dir: DataDir, tasks: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in tasks:
        out[t] = {s: len(task_split(t, s, data_dir)) for s in splits_for(t)}
    out["mbpp_version"] = mbpp_version(data_dir)
    for variant in (v for v in CLS_TASKS if v in tasks):
        out[f"{variant}_per_source"] = {f"{label}<-{src}": min(len(rows), CLS_PER_SOURCE)
                                        for label, src, rows in cls_sources(variant, data_dir)}
    return out


def summary(data_dir: DataDir = None) -> str:
    """A short markdown note of the splits used (for the report's closing note)."""
    sizes = split_sizes(data_dir)
    lines = ["| task | " + " | ".join(BASE_SPLITS + FEWSHOT_SPLITS) + " |",
             "|---" * (1 + len(BASE_SPLITS + FEWSHOT_SPLITS)) + "|"]
    for t in TASKS:
        cells = [str(sizes[t].get(s, "–")) for s in BASE_SPLITS + FEWSHOT_SPLITS]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"MBPP+ release {sizes['mbpp_version']}: first {MBPP_TRAINVALID} shuffled with seed {MBPP_SEED} "
                 f"→ {MBPP_TRAIN}/{MBPP_TRAINVALID - MBPP_TRAIN} train/valid, {sizes['mbpp']['test']} test. "
                 f"Few-shot: seed {FEWSHOT_SEED}, {FEWSHOT_N} held-out prompts per unseen task.")
    for v in CLS_TASKS:
        per = ", ".join(f"{k} {n}" for k, n in sizes[f"{v}_per_source"].items())
        lines.append(f"{v}: {per} (i%5<4 → train pool, even/odd → train/valid).")
    return "\n".join(lines)

