"""The raw result cell: one JSON file per (model, method, task[, seed]) at
`results/raw/<model>/<method>/<task>.json` (the first or only seed) and
`results/raw/<model>/<method>/<task>.seed<k>.json` (each further seed k of the workflow's `seeds`).

A cell holds everything the tables and figures need, so reports are recomputed from raw numbers:

```
{
  "schema": "t2eval.cell/1",
  "model": "llama3-8b", "method": "t2-prompt", "task": "math",
  "metric": "acc",                    # "acc" | "pass@1" | "vqa_acc" (VQA tasks)
  "score": 0.2522, "correct": 1261, "total": 5000,    # score == correct / total (vqa_acc: mean accuracy)
  "per_sample": [{"doc_id": 0, "correct": 1, "chosen": "math"}, ...],   # doc order, one per doc
                                      # vqa_acc: + "accuracy" (0/.3/.6/.9/1), correct = accuracy > 0
  "timing": {"first_pass_s", "second_pass_s", "swap_s", "tokens_first", "tokens_second",
             "total_s", "hardware"} | null,      # first-pass fields null when the method has no first pass
  "dispatch": [{"doc_id", "true_task", "chosen"}, ...] | null,   # two-pass methods only
  "lm_eval": {...} | null,            # lm-eval's results + config blob
  "split": "test" | "fewshot_test",
  "expert_model": "llama3-8b" | null, # optional: whose experts were used (cross-model rows)
  "note": "..."                       # optional: a caveat every report must show (the embedded VLM's random vision)
  "provenance": {...}                 # t2eval.provenance.record(...)
}
```

Method names: the registered strategies' (`t2eval.adapt.strategies.known_methods()`): base, lora,
svf, t2-prompt, t2-cls, t2-fewshot, the Table 4 ablations (svf-attn, svf-mlp+attn, svf-ntp, lora-pg,
lora-mlp+attn), the cross-model rows (xfer-svf, xfer-svf-shuffled, xfer-fewshot) and one
`lora-<task>` per task-LoRA (lora-gsm8k, lora-mbpp, lora-arc_easy). Other lowercase names are
accepted (user variants) and simply not placed in tables.
Which cell each table row reads is documented in `t2eval.report.tables`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .constants import METRIC_OF_TASK as TASK_METRIC
from .constants import TRAIN_TASKS as TRAINING_TASKS
from .constants import UNSEEN_TASKS, VQA_METRIC
from .errors import CorruptArtifactError, T2EvalError

SCHEMA = "t2eval.cell/1"
MODELS = ("llama3-8b", "mistral-7b", "llama3-70b", "smollm2-135m")
SPLITS = ("test", "fewshot_test")
TIMING_FIELDS = ("first_pass_s", "second_pass_s", "swap_s", "tokens_first", "tokens_second", "total_s")

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+@-]*$"
_NUM_OR_NULL = {"type": ["number", "null"], "minimum": 0}

CELL_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "t2eval raw result cell",
    "type": "object",
    "required": ["schema", "model", "method", "task", "metric", "score", "correct", "total",
                 "per_sample", "timing", "dispatch", "lm_eval", "split", "provenance"],
    "properties": {
        "schema": {"const": SCHEMA},
        "model": {"type": "string", "pattern": _NAME},
        "method": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_.+-]*$"},
        "task": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_]*$"},
        "metric": {"enum": ["acc", "pass@1", VQA_METRIC]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "correct": {"type": "integer", "minimum": 0},
        "total": {"type": "integer", "minimum": 1},
        "per_sample": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["doc_id", "correct"],
                "properties": {
                    "doc_id": {"type": ["integer", "string"]},
                    "correct": {"enum": [0, 1]},
                    "accuracy": {"type": "number", "minimum": 0, "maximum": 1},
                    "chosen": {"type": ["string", "null"]},
                },
            },
        },
        "timing": {
            "type": ["object", "null"],
            "properties": {**{k: _NUM_OR_NULL for k in TIMING_FIELDS},
                           "hardware": {"type": ["string", "null"]}},
        },
        "dispatch": {
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "required": ["doc_id", "true_task", "chosen"],
                "properties": {"doc_id": {"type": ["integer", "string"]},
                               "true_task": {"type": "string"},
                               "chosen": {"type": "string"}},
            },
        },
        "lm_eval": {"type": ["object", "null"]},
        "split": {"enum": list(SPLITS)},
        "expert_model": {"type": ["string", "null"]},
        "note": {"type": ["string", "null"]},
        "provenance": {"type": "object"},
    },
}


def _fail(where: str, msg: str) -> None:
    raise CorruptArtifactError(
        f"invalid result cell {where}: {msg}. The cell format is described in t2eval/results.py "
        f"(schema {SCHEMA!r}); re-create the cell with `t2eval evaluate` or fix the file by hand.")


def validate_cell(cell: Any, where: str = "<cell>") -> dict[str, Any]:
    """Check `cell` against `CELL_SCHEMA` plus the arithmetic (score = correct/total, per_sample
    counts); raise `CorruptArtifactError` naming `where` and the offending field. Returns the cell."""
    import jsonschema

    if not isinstance(cell, Mapping):
        _fail(where, f"expected a JSON object, got {type(cell).__name__}")
    validator = jsonschema.Draft202012Validator(CELL_SCHEMA)
    errors = sorted(validator.iter_errors(cell), key=lambda e: list(e.absolute_path))
    if errors:
        msgs = []
        for e in errors[:5]:
            loc = "/".join(str(p) for p in e.absolute_path) or "(top level)"
            msgs.append(f"field {loc}: {e.message}")
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        _fail(where, "; ".join(msgs) + more)
    c, n = cell["correct"], cell["total"]
    ps = cell["per_sample"]
    if c > n:
        _fail(where, f"correct ({c}) is larger than total ({n})")
    if cell["metric"] == VQA_METRIC:
        if any("accuracy" not in s for s in ps):
            _fail(where, f"metric {VQA_METRIC}: every per_sample entry needs its VQA 'accuracy'")
        if any(s["correct"] != int(s["accuracy"] > 0) for s in ps):
            _fail(where, "per_sample 'correct' must be 1 exactly where the VQA accuracy is > 0")
        mean = sum(s["accuracy"] for s in ps) / len(ps) if ps else 0.0
        if not math.isclose(cell["score"], mean, rel_tol=0, abs_tol=1e-9):
            _fail(where, f"score {cell['score']} is not the mean VQA accuracy {mean:.6f}")
    elif not math.isclose(cell["score"], c / n, rel_tol=0, abs_tol=1e-9):
        _fail(where, f"score {cell['score']} is not correct/total = {c}/{n} = {c / n:.6f}")
    if len(ps) != n:
        _fail(where, f"per_sample has {len(ps)} entries but total is {n} (one entry per document)")
    if sum(s["correct"] for s in ps) != c:
        _fail(where, f"per_sample has {sum(s['correct'] for s in ps)} correct entries but correct is {c}")
    ids = [s["doc_id"] for s in ps]
    if len(set(ids)) != len(ids):
        _fail(where, "per_sample has duplicate doc_id values")
    expected = TASK_METRIC.get(cell["task"])
    if expected and cell["metric"] != expected:
        _fail(where, f"task {cell['task']!r} is scored with {expected!r}, not {cell['metric']!r}")
    return dict(cell)


def make_cell(model: str, method: str, task: str, per_sample: Iterable[Mapping[str, Any]], *,
              metric: str | None = None, timing: Mapping[str, Any] | None = None,
              dispatch: Iterable[Mapping[str, Any]] | None = None, lm_eval: Mapping[str, Any] | None = None,
              split: str = "test", provenance: Mapping[str, Any] | None = None,
              expert_model: str | None = None, note: str | None = None) -> dict[str, Any]:
    """Build a valid cell from per-sample outcomes (`{"doc_id", "correct": 0/1 or bool, ["chosen"]}`;
    VQA tasks: `{"doc_id", "accuracy"}`, correct = accuracy > 0); correct/total/score are computed from
    them (score = correct/total, or the mean VQA accuracy for metric vqa_acc)."""
    metric = metric or TASK_METRIC.get(task, "acc")
    rows = []
    for s in per_sample:
        r = dict(s)
        if metric == VQA_METRIC:
            r["accuracy"] = float(r["accuracy"])
            r["correct"] = int(r["accuracy"] > 0)
        r["correct"] = int(bool(r["correct"]))
        rows.append(r)
    correct, total = sum(r["correct"] for r in rows), len(rows)
    if total == 0:
        raise T2EvalError(f"cannot make a result cell for {model}/{method}/{task}: no samples were scored")
    score = sum(r["accuracy"] for r in rows) / total if metric == VQA_METRIC else correct / total
    cell = {
        "schema": SCHEMA, "model": model, "method": method, "task": task,
        "metric": metric,
        "score": score, "correct": correct, "total": total,
        "per_sample": rows,
        "timing": dict(timing) if timing is not None else None,
        "dispatch": [dict(d) for d in dispatch] if dispatch is not None else None,
        "lm_eval": dict(lm_eval) if lm_eval is not None else None,
        "split": split,
        "expert_model": expert_model,
        "provenance": dict(provenance or {}),
    }
    if note:
        cell["note"] = note
    return validate_cell(cell, f"{model}/{method}/{task}")


def cell_path(raw_dir: str | os.PathLike, model: str, method: str, task: str, seed: int | None = None) -> Path:
    return Path(raw_dir) / model / method / (f"{task}.json" if seed is None else f"{task}.seed{seed}.json")


def parse_cell_name(name: str) -> tuple[str, int | None] | None:
    """(task, seed tag) of a cell file name: `<task>.json` -> (task, None), `<task>.seed<k>.json` -> (task, k);
    None for anything else (sidecars, temp files)."""
    import re

    m = re.fullmatch(r"([a-z0-9][a-z0-9_]*)(?:\.seed([0-9]+))?\.json", name)
    if not m:
        return None
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def write_cell(path: str | os.PathLike, cell: Mapping[str, Any]) -> Path:
    """Validate, then write atomically (temp file + rename). Returns the path."""
    p = Path(path)
    validate_cell(cell, str(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(cell, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, p)
    return p


def read_cell(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate one cell; errors name the file."""
    p = Path(path)
    if not p.exists():
        raise T2EvalError(f"result cell not found: {p}; run `t2eval evaluate` for it first")
    try:
        cell = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"result cell {p} is not valid JSON (line {e.lineno}, column {e.colno}: "
                                   f"{e.msg}); delete it and re-run `t2eval evaluate`") from None
    return validate_cell(cell, str(p))


def collect(raw_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every cell under `raw_dir/<model>/<method>/<task>[.seed<k>].json`, validated, sorted by
    (model, method, task, seed). Each cell's model/method/task must match its path; `cell["_seed"]` is
    the seed tag from the file name (None: the first/only seed). Sidecars (`*.provenance.json`) and temp
    files are skipped."""
    root = Path(raw_dir)
    if not root.is_dir():
        raise T2EvalError(f"raw results directory {root} does not exist; run `t2eval evaluate` to create "
                          f"cells there or pass the right --raw directory")
    cells = []
    for p in sorted(root.glob("*/*/*.json")):
        if p.name.startswith(".") or p.name.endswith(".provenance.json"):
            continue
        parsed = parse_cell_name(p.name)
        if parsed is None:
            raise CorruptArtifactError(f"{p} is not a result cell name (<task>.json or <task>.seed<k>.json); "
                                       f"move it out of {root}")
        cell = read_cell(p)
        (model, method), (task, seed) = (p.parent.parent.name, p.parent.name), parsed
        if (cell["model"], cell["method"], cell["task"]) != (model, method, task):
            raise CorruptArtifactError(
                f"result cell {p} says model/method/task = {cell['model']}/{cell['method']}/{cell['task']} "
                f"but its path says {model}/{method}/{task}; move the file or fix its fields")
        cell["_path"] = str(p)
        cell["_seed"] = seed
        cells.append(cell)
    cells.sort(key=lambda c: (c["model"], c["method"], c["task"], -1 if c["_seed"] is None else c["_seed"]))
    return cells


def index(cells: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str], Mapping[str, Any]]:
    """{(model, method, task): cell} of the first-seed cells (`<task>.json`; a cell without `_seed` counts
    as one). `replicates` gives every seed's cell."""
    return {(c["model"], c["method"], c["task"]): c for c in cells if c.get("_seed") is None}


def replicates(cells: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str], list[Mapping[str, Any]]]:
    """{(model, method, task): [cell of each seed, the first seed first]}."""
    out: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for c in cells:
        out.setdefault((c["model"], c["method"], c["task"]), []).append(c)
    for v in out.values():
        v.sort(key=lambda c: -1 if c.get("_seed") is None else c["_seed"])
    return out

