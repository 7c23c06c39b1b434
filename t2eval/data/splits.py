"""The protocol's data splits, in one deterministic module (PROTOCOL §3, §6 and §8).

`task_split(task, split, data_dir=None, **options)` returns fresh copies of the canonical rows
written by `t2eval prepare-data`, each with a stable ``"doc_id"``:

==============  =====================================================  ==========================
task            train / valid                                          test
==============  =====================================================  ==========================
gsm8k           GSM8K train, even / odd indices                        GSM8K test (1319)
arc_easy        ARC-Easy train, even / odd indices                     ARC-Easy test (2376)
mbpp            MBPP+ (evalplus, listed order) first 300, shuffled     MBPP+ rows 300.. (99 in
                with random.Random(16): 200 train / 100 valid          v0.1.0, 78 in v0.2.0)
math            -- (unseen task)                                       MATH test (5000)
humaneval       -- (unseen task)                                       HumanEval (164)
arc_challenge   -- (unseen task)                                       ARC-Challenge test (1172)
cls             dispatcher classifier, code release (see below)        its 1-in-5 test part
cls_leakfree    the same without any evaluation test question          its 1-in-5 test part
textvqa         TextVQA train (34,602), even / odd indices             TextVQA validation (5000)
okvqa           -- (evaluation only)                                   OK-VQA val2014 (5046)
synth_textvqa   the generated train / valid                            the generated test
==============  =====================================================  ==========================

(The VQA tasks, `constants.VLM_TASKS`, are not in `TASKS`: `split_sizes` and the LLM tables skip them.)

Options (`OPTIONS`; every default is the code release's behaviour, PROTOCOL §8):

- ``mbppplus_version`` ("v0.1.0": 399 problems → 99 MBPP-Pro test; "v0.2.0": 378 → 78) and
  ``humanevalplus_version`` ("v0.1.9" | "v0.1.10"): the prepared release (`prepare-data` writes
  every release the mirror has as ``<dataset>/test-<version>.jsonl``); one that was not prepared
  is a `MissingDatasetError` naming the file.
- ``math_order``: "hf" = the Hugging Face ``competition_math`` order the release iterates, i.e. the
  rows sorted by ``unique_id`` as a plain string ("test/algebra/1.json" < "test/algebra/10.json");
  "mirror" = the prepared file's order (subject, then problem number).
- ``fewshot_seeds``: "release" = seed 27 for MATH, 38 for ARC-Challenge, 16 for HumanEval;
  "uniform" = 27 for all three.
- ``cls_split``: "concatenated" = the release's i % 5 over the three sources concatenated;
  "per_source" = i % 5 within each source.
- ``cls_code_text``: "instruction" = the MBPP instruction the code tasks render (what the
  dispatcher sees); "prompt" = the MBPP+ prompt without its docstring quotes.
- ``math_test`` ("test" | "math500") and ``humaneval_dataset`` ("humaneval" | "humanevalplus").

doc_ids: ``gsm8k/<split>/<index>`` for GSM8K (index in the source file), the ``id`` for ARC, the
``task_id`` for MBPP+/HumanEval (``Mbpp/2``, ``HumanEval/0``), the ``unique_id`` for MATH
(``test/algebra/1.json``; ``math/test/<index>`` when the source has none). Train/valid rows of
mbpp are returned in the shuffled order; everything else in source order (MATH: see math_order).
ARC rows keep their original labels (ARC-Challenge's restored by `prepare-data`); whether a
numeric answerKey can be right is the ARC task's ``numeric_keys`` option.

Unseen tasks (math, humaneval, arc_challenge) also have ``fewshot_heldout`` / ``fewshot_test``
(`fewshot_partition`), as the release builds them: ``random.seed(s); idx = list(range(n));
random.shuffle(idx)`` over the test rows; the first 10 indices (in shuffled order) are the
held-out prompts the few-shot α search (CEM) may see, the rest (in source order) is the reported
few-shot test set.

Classifier data (PROTOCOL §6.2, §8). ``cls`` = the code release's construction: the first 399
questions (listed order) of each source, or all of them when a source has fewer (MBPP+ v0.2.0 has
378, recorded by `split_sizes`), concatenated in this order:

- math      ← GSM8K **test**          (label "math")
- code      ← MBPP+ (all problems, incl. the MBPP test problems)   (label "code")
- reasoning ← ARC-Challenge **test**  (label "reasoning")

Index i (over the concatenated list; per source with cls_split="per_source") with i % 5 < 4 goes
to the train pool, the others to ``test``; the pool is split by position within the pool, even →
``train``, odd → ``valid``: 1197 rows → pool 958 → train 479, valid 479; test 239. This uses test
questions of evaluation tasks (GSM8K, MBPP, ARC-Challenge), so ``cls_leakfree`` builds the same
thing from data no evaluation task tests on:

- math      ← GSM8K **train**
- code      ← MBPP+ first 300 (the mbpp train/valid part; 300 < 399, so all 300)
- reasoning ← ARC-Easy **train**

and, in each source, drops any row whose question text (whitespace/case-normalised) equals a
test question of an evaluation task (one ARC-Easy train item, NYSEDREGENTS_2009_4_25, repeats the
stem of ARC-Easy test item NYSEDREGENTS_2012_4_20) before taking the first 399.

cls rows are copies of the source rows plus ``doc_id`` (the source's doc_id), ``label``,
``source_task`` and ``question`` = the text the classifier sees: the GSM8K question; the MBPP
instruction (cls_code_text); the ARC question followed by ``"\\nOptions:\\n"`` and lettered
``"A. …"`` lines (PROTOCOL §5). An ARC row's original ``question`` is kept as ``source_question``.
"""

from __future__ import annotations

import os
import random
from typing import Any, Sequence

from ..constants import CLS_TASKS, EXPERT_NAMES, TRAIN_TASKS, UNSEEN_TASKS, VLM_TASKS, VLM_TRAIN_TASKS, check_task
from ..errors import T2EvalError
from . import load_jsonl

TRAINING_TASKS = TRAIN_TASKS
TASKS = TRAINING_TASKS + UNSEEN_TASKS + CLS_TASKS
BASE_SPLITS = ("train", "valid", "test")
FEWSHOT_SPLITS = ("fewshot_heldout", "fewshot_test")

MBPP_SEED, MBPP_TRAINVALID, MBPP_TRAIN = 16, 300, 200
FEWSHOT_N = 10
FEWSHOT_SEED = 27  # "uniform" seed (and MATH's in the release)
RELEASE_FEWSHOT_SEEDS = {"math": 27, "arc_challenge": 38, "humaneval": 16}
CLS_PER_SOURCE = 399
CLS_LABELS = ("math", "code", "reasoning")
assert set(CLS_LABELS) == set(EXPERT_NAMES)

# option -> (release default, allowed values or None for any string); PROTOCOL §8
OPTIONS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "mbppplus_version": ("v0.1.0", None),
    "humanevalplus_version": ("v0.1.9", None),
    "math_order": ("hf", ("hf", "mirror")),
    "fewshot_seeds": ("release", ("release", "uniform")),
    "cls_split": ("concatenated", ("concatenated", "per_source")),
    "cls_code_text": ("instruction", ("instruction", "prompt")),
    "math_test": ("test", ("test", "math500")),
    "humaneval_dataset": ("humaneval", ("humaneval", "humanevalplus")),
}
RELEASE_OPTIONS = {k: v for k, (v, _) in OPTIONS.items()}

DataDir = str | os.PathLike | None


def resolve_options(options: dict[str, Any] | None = None) -> dict[str, str]:
    """All data options with the release defaults filled in; unknown names/values are errors."""
    options = dict(options or {})
    bad = sorted(set(options) - set(OPTIONS))
    if bad:
        raise T2EvalError(f"unknown data option(s) {', '.join(bad)}; choose from {', '.join(OPTIONS)}")
    out = {}
    for name, (default, allowed) in OPTIONS.items():
        v = options.get(name)
        v = default if v is None else v
        if allowed is not None and v not in allowed:
            raise T2EvalError(f"data option {name}={v!r} is not one of {', '.join(allowed)}")
        if not isinstance(v, str) or not v:
            raise T2EvalError(f"data option {name} must be a non-empty string, not {v!r}")
        out[name] = v
    return out


def fewshot_seed(task: str, fewshot_seeds: str = "release") -> int:
    """The shuffle seed of `task`'s few-shot partition (release: 27 MATH, 38 ARC-Challenge, 16 HumanEval)."""
    check_task(task, UNSEEN_TASKS, "unseen task")
    return RELEASE_FEWSHOT_SEEDS[task] if fewshot_seeds == "release" else FEWSHOT_SEED


def splits_for(task: str) -> tuple[str, ...]:
    _check_task(task)
    if task in UNSEEN_TASKS:
        return ("test",) + FEWSHOT_SPLITS
    if task in VLM_TASKS and task not in VLM_TRAIN_TASKS:
        return ("test",)
    return BASE_SPLITS


def _check_task(task: str) -> None:
    check_task(task, TASKS + VLM_TASKS)


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


def _versioned(dataset: str, version: str, d: DataDir) -> list[dict]:
    """The prepared release `version` of an evalplus dataset (`<dataset>/test-<version>.jsonl`)."""
    from . import dataset_path
    from .datasets import version_split

    split = version_split(version)
    if not dataset_path(dataset, split, d).is_file():
        from ..errors import MissingDatasetError
        from . import _data_dir

        stem = "MbppPlus" if dataset == "mbppplus" else "HumanEvalPlus"
        raise MissingDatasetError(
            f"{dataset_path(dataset, split, d)} does not exist: {dataset} release {version} has not been prepared "
            f"in {_data_dir(d)}. Put {stem}-{version}.jsonl.gz in the mirror's {dataset}/ folder and run "
            f"`t2eval prepare-data --out {_data_dir(d)} --datasets {dataset}` (or allow network access), "
            f"or choose a prepared release with {dataset}_version=")
    return _indexed(dataset, split, d, "task_id")


def _mbppplus(d: DataDir, opts: dict) -> list[dict]:
    return _versioned("mbppplus", opts["mbppplus_version"], d)


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
    """(held-out, test) as the release builds them: random.seed(seed); idx = list(range(len(rows)));
    random.shuffle(idx) (= random.Random(seed).shuffle); the first n held out (shuffled order), the
    rest are the reported test set, in source order."""
    if len(rows) < n:
        raise T2EvalError(f"the few-shot partition needs at least {n} rows, got {len(rows)}; re-run "
                          "`t2eval prepare-data --force` with a complete source")
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    return [rows[i] for i in idx[:n]], [rows[i] for i in sorted(idx[n:])]


def _math_test(which: str, d: DataDir, order: str) -> list[dict]:
    rows = _load("math", which, d)
    out = [_with_id(r, r.get("unique_id") or f"math/{which}/{i}") for i, r in enumerate(rows)]
    if which != "test" or order == "mirror":
        return out
    missing = sum(not isinstance(r.get("unique_id"), str) for r in rows)
    if missing:
        raise T2EvalError(f"math_order='hf' sorts the MATH test rows by unique_id, but {missing} prepared rows "
                          "have none (MATH prepared from the hub has no unique_id); prepare MATH from a mirror "
                          "(math/test.jsonl with unique_id) or pass math_order='mirror'")
    return sorted(out, key=lambda r: r["unique_id"])  # plain string order = Hugging Face's


def _unseen_test(task: str, d: DataDir, opts: dict) -> list[dict]:
    if task == "math":
        return _math_test(opts["math_test"], d, opts["math_order"])
    if task == "humaneval":
        if opts["humaneval_dataset"] == "humanevalplus":
            return _versioned("humanevalplus", opts["humanevalplus_version"], d)
        return _indexed("humaneval", "test", d, "task_id")
    if task == "arc_challenge":
        return _arc("arc_challenge", "test", d)
    raise T2EvalError(f"{task!r} is not an unseen task; unseen tasks: {', '.join(UNSEEN_TASKS)}")


def _vqa(task: str, split: str, d: DataDir) -> list[dict]:
    """VQA rows (issue 10): textvqa train/valid = even/odd of TextVQA train, test = TextVQA validation;
    okvqa test = OK-VQA val2014; synth_textvqa = its generated splits. doc_id = str(question_id);
    `image_path` = the image file (the row's `image` is relative to the split file)."""
    from . import _data_dir

    source = "train" if task == "textvqa" and split != "test" else split
    root = _data_dir(d) / task
    rows = [dict(_with_id(r, str(r["question_id"])), image_path=str(root / r["image"]))
            for r in _load(task, source, d)]
    if task == "textvqa" and split != "test":
        return _even_odd(rows)[split == "valid"]
    return rows


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


def mbpp_question_text(row: dict, cls_code_text: str = "instruction") -> str:
    """The classifier's text of an MBPP+ row: the code task's instruction (release) or the prompt
    without its docstring quotes."""
    if cls_code_text == "instruction":
        from ..tasks.code import mbpp_instruction

        return mbpp_instruction(row["prompt"])
    return _strip_docstring(row["prompt"])


def _cls_row(row: dict, label: str, source_task: str, opts: dict) -> dict:
    out = dict(row)
    if source_task.startswith("arc"):
        out["source_question"] = row["question"]
        out["question"] = arc_question_text(row)
    elif source_task == "mbpp":
        out["question"] = mbpp_question_text(row, opts["cls_code_text"])
    out["label"] = label
    out["source_task"] = source_task
    return out


def cls_sources(variant: str, d: DataDir, **options: Any) -> list[tuple[str, str, list[dict]]]:
    """[(label, source_task, rows)] in label order, before the 399 cap."""
    opts = resolve_options(options)
    check_task(variant, CLS_TASKS, "classifier task")
    mbpp = _mbppplus(d, opts)
    if variant == "cls":
        return [("math", "gsm8k", _gsm8k("test", d)), ("code", "mbpp", mbpp),
                ("reasoning", "arc_challenge", _arc("arc_challenge", "test", d))]
    banned = eval_test_texts(d, **opts)
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


def eval_test_texts(d: DataDir, **options: Any) -> frozenset[str]:
    """Normalised question texts of every evaluation task's test set (training + unseen tasks).

    Cached per data directory and options while its manifest is unchanged."""
    from . import _data_dir

    opts = resolve_options(options)
    m = _data_dir(d) / "manifest.json"
    key = (str(m.resolve()), m.stat().st_mtime_ns if m.exists() else None, tuple(sorted(opts.items())))
    if key not in _TEXTS_CACHE:
        out: set[str] = set()
        for t in TRAINING_TASKS + UNSEEN_TASKS:
            out.update(normalise_text(question_of(r)) for r in task_split(t, "test", d, **opts))
        _TEXTS_CACHE[key] = frozenset(out)
    return _TEXTS_CACHE[key]


def cls_partition(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """i % 5 < 4 → pool, else test; pool even/odd (by position in the pool) → train/valid."""
    pool = [r for i, r in enumerate(rows) if i % 5 < 4]
    test = [r for i, r in enumerate(rows) if i % 5 >= 4]
    train, valid = _even_odd(pool)
    return {"train": train, "valid": valid, "test": test}


def _cls(variant: str, split: str, d: DataDir, opts: dict) -> list[dict]:
    parts = [[_cls_row(r, label, source_task, opts) for r in rows[:CLS_PER_SOURCE]]
             for label, source_task, rows in cls_sources(variant, d, **opts)]
    if opts["cls_split"] == "concatenated":
        return cls_partition([r for part in parts for r in part])[split]
    return [r for part in parts for r in cls_partition(part)[split]]


# ------------------------------------------------------------------ public entry points

def task_split(task: str, split: str, data_dir: DataDir = None, **options: Any) -> list[dict]:
    """The protocol's rows of `task`/`split` (copies with "doc_id"); see the module docstring for
    the options (`OPTIONS`; defaults = the code release). An empty result is a `T2EvalError`."""
    allowed = splits_for(task)
    if split not in allowed:
        raise T2EvalError(f"task {task!r} has no split {split!r} in the protocol; choose from {', '.join(allowed)}")
    opts = resolve_options(options)
    rows = _task_split(task, split, data_dir, opts)
    if not rows:
        from . import _data_dir

        raise T2EvalError(f"task {task!r} split {split!r} is empty in {_data_dir(data_dir)}: its prepared data has "
                          "no rows; re-run `t2eval prepare-data --force` with a complete source")
    return rows


def _task_split(task: str, split: str, data_dir: DataDir, opts: dict) -> list[dict]:
    if task in UNSEEN_TASKS:
        rows = _unseen_test(task, data_dir, opts)
        if split == "test":
            return rows
        held, rest = fewshot_partition(rows, seed=fewshot_seed(task, opts["fewshot_seeds"]))
        return held if split == "fewshot_heldout" else rest
    if task == "gsm8k":
        return _gsm8k("test", data_dir) if split == "test" else _even_odd(_gsm8k("train", data_dir))[split == "valid"]
    if task == "arc_easy":
        if split == "test":
            return _arc("arc_easy", "test", data_dir)
        return _even_odd(_arc("arc_easy", "train", data_dir))[split == "valid"]
    if task == "mbpp":
        return mbpp_partition(_mbppplus(data_dir, opts))[split]
    if task in CLS_TASKS:
        return _cls(task, split, data_dir, opts)
    if task in VLM_TASKS:
        return _vqa(task, split, data_dir)
    raise T2EvalError(f"no split rule for task {task!r}")  # unreachable: splits_for checked it


def mbpp_version(data_dir: DataDir = None, mbppplus_version: str | None = None) -> str:
    """The MBPP+ release the mbpp task uses (default: the code release's v0.1.0), after checking that
    it is prepared (and matches the manifest); a `MissingDatasetError` names the missing file."""
    version = resolve_options({"mbppplus_version": mbppplus_version})["mbppplus_version"]
    _versioned("mbppplus", version, data_dir)
    return version


def split_sizes(data_dir: DataDir = None, tasks: Sequence[str] = TASKS, **options: Any) -> dict[str, Any]:
    """{task: {split: rows}} for every task and split, plus "mbpp_version" and per-source cls counts."""
    global _MEMO
    outer, _MEMO = _MEMO, {} if _MEMO is None else _MEMO
    try:
        return _split_sizes(data_dir, tasks, options)
    finally:
        _MEMO = outer


def _split_sizes(data_dir: DataDir, tasks: Sequence[str], options: dict) -> dict[str, Any]:
    opts = resolve_options(options)
    out: dict[str, Any] = {}
    for t in tasks:
        out[t] = {s: len(task_split(t, s, data_dir, **opts)) for s in splits_for(t)}
    out["mbpp_version"] = mbpp_version(data_dir, opts["mbppplus_version"])
    for variant in (v for v in CLS_TASKS if v in tasks):
        out[f"{variant}_per_source"] = {f"{label}<-{src}": min(len(rows), CLS_PER_SOURCE)
                                        for label, src, rows in cls_sources(variant, data_dir, **opts)}
    return out


def summary(data_dir: DataDir = None, **options: Any) -> str:
    """A short markdown note of the splits used (for the report's closing note)."""
    opts = resolve_options(options)
    sizes = split_sizes(data_dir, **opts)
    lines = ["| task | " + " | ".join(BASE_SPLITS + FEWSHOT_SPLITS) + " |",
             "|---" * (1 + len(BASE_SPLITS + FEWSHOT_SPLITS)) + "|"]
    for t in TASKS:
        cells = [str(sizes[t].get(s, "–")) for s in BASE_SPLITS + FEWSHOT_SPLITS]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("")
    seeds = ", ".join(f"{t} {fewshot_seed(t, opts['fewshot_seeds'])}" for t in UNSEEN_TASKS)
    lines.append(f"MBPP+ release {sizes['mbpp_version']}: first {MBPP_TRAINVALID} shuffled with seed {MBPP_SEED} "
                 f"→ {MBPP_TRAIN}/{MBPP_TRAINVALID - MBPP_TRAIN} train/valid, {sizes['mbpp']['test']} test. "
                 f"Few-shot: {FEWSHOT_N} held-out prompts per unseen task, seeds {seeds}; "
                 f"MATH order {opts['math_order']}.")
    how = ("i%5<4 over the three sources concatenated" if opts["cls_split"] == "concatenated"
           else "i%5<4 within each source")
    for v in CLS_TASKS:
        per = ", ".join(f"{k} {n}" for k, n in sizes[f"{v}_per_source"].items())
        lines.append(f"{v}: {per} ({how} → train pool, even/odd → train/valid; code text: {opts['cls_code_text']}).")
    return "\n".join(lines)
