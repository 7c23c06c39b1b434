"""The paper's published numbers as a tidy table, keyed by our model/method/task names.

The repository's own `results/published/paper_numbers.csv` (committed) is the source every table and
figure reads by default. It was generated from a reference transcription of the paper (a CSV with the
columns table, model, method, task, metric, value, source) by `make_published(source, out)` — run
`python -m t2eval.report.published REFERENCE_CSV [--out CSV]` to regenerate it. Columns:

  table, model, model_label, method, method_label, task, task_label, category, metric, metric_label,
  unit, value, value_text, source, note

* model / method / task: our keys where one maps (empty otherwise); *_label: the original text.
* category: the chosen expert for Figure 6 rows (math/code/reasoning), the expert for Figure 7 rows.
* value: a number (percentages as numbers: "13%" -> 13); value_text: the original text whenever it
  is not a plain number (ranges, inequalities, "~11 minutes", sweeps "0.0|0.1").
* Table 3 does not name its model; its rows carry model "llama3-8b" (presumed) and a note.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import T2EvalError

COLUMNS = ["table", "model", "model_label", "method", "method_label", "task", "task_label", "category",
           "metric", "metric_label", "unit", "value", "value_text", "source", "note"]
PUBLISHED_ENV = "T2EVAL_PUBLISHED_CSV"
# the committed published numbers, relative to the repository this package lives in
REPO_PUBLISHED = Path(__file__).resolve().parents[2] / "results" / "published" / "paper_numbers.csv"

MODEL_MAP = {"L3-8B": "llama3-8b", "M-7B": "mistral-7b", "L3-70B": "llama3-70b", "L3-LLaVA-NeXT-8B": "llava-next-8b"}
TASK_MAP = {"GSM8K": "gsm8k", "MBPP-Pro": "mbpp", "MBPP": "mbpp", "ARC-Easy": "arc_easy", "MATH": "math",
            "MATH(zero-shot transfer)": "math", "HumanEval": "humaneval", "ARC-Challenge": "arc_challenge",
            "TextVQA": "textvqa", "OKVQA": "okvqa"}
EXPERT_OF_TASK = {"gsm8k": "math", "mbpp": "code", "arc_easy": "reasoning"}
TABLE_METHODS = {
    "base": "base", "LoRA": "lora", "SVF": "svf", "LoRA(best ckpt)": "lora",
    "T2-Prompt": "t2-prompt", "T2-Cls-expert": "t2-cls", "T2-Few-shot": "t2-fewshot",
    "+Llama SVF (ordered sigma)": "xfer-svf", "+Llama SVF (shuffled sigma)": "xfer-svf-shuffled",
    "+Few-shot adaptation (cross-model)": "xfer-fewshot",
    "T2 10-shot CEM": "t2-fewshot", "CEM 10-shot": "t2-fewshot",
    "Prompt": "t2-prompt", "Cls-expert": "t2-cls",
}
# Table 4 rows by number (#0..#7) -> our method names; see t2eval.report.tables for the cells they read.
ABLATION_METHODS = {0: "base", 1: "svf", 2: "svf-attn", 3: "svf-mlp+attn", 4: "svf-ntp",
                    5: "lora-pg", 6: "lora", 7: "lora-mlp+attn"}
T3_METRICS = {"1st pass": ("first_pass_s", "s"), "2nd pass": ("second_pass_s", "s"),
              "1st/2nd ratio": ("first_second_ratio_pct", "%")}


def _number(text: str) -> tuple[float | None, str]:
    """(numeric value or None, value_text): value_text is empty when the text is a plain number."""
    t = text.strip()
    m = re.fullmatch(r"([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)(%?)", t)
    if m:
        return float(m.group(1)), ("" if not m.group(2) else t)
    return None, t


def _convert(row: dict[str, str]) -> dict[str, Any]:
    table, mlabel, meth, tlabel, metric_label = (row["table"], row["model"], row["method"], row["task"],
                                                 row["metric"])
    out: dict[str, Any] = {c: "" for c in COLUMNS}
    value, value_text = _number(row["value"])
    out.update(table=table, model_label=mlabel, method_label=meth, task_label=tlabel, metric_label=metric_label,
               value=value, value_text=value_text, source=row["source"])
    out["model"] = MODEL_MAP.get(mlabel, "")
    task = TASK_MAP.get(tlabel, "")
    if table == "T3":
        out["model"] = "llama3-8b"
        out["note"] = "Table 3 does not name its model; presumed llama3-8b"
        out["method"] = "t2-prompt"
        for key, (metric, unit) in T3_METRICS.items():
            if key in meth:
                out["metric"], out["unit"] = metric, unit
    elif table == "T4":
        num = int(re.match(r"#(\d+)", meth).group(1))
        out["method"] = ABLATION_METHODS[num]
        params = re.search(r"params=([^|]+)$", meth)
        if params and params.group(1).strip() != "-":
            out["note"] = f"params {params.group(1).strip()}"
    elif table == "F6":
        out["method"] = TABLE_METHODS.get(meth, "")
        true, _, pred = tlabel.partition("->pred:")
        task = TASK_MAP.get(true, "")
        out["category"] = pred
        out["metric"], out["unit"] = "dispatch_fraction", "fraction"
    elif table == "F7":
        out["method"] = "t2-fewshot"
        src = re.fullmatch(r"alpha\[(.+)\]", meth).group(1)
        out["category"] = EXPERT_OF_TASK[TASK_MAP[src]]
        out["metric"], out["unit"] = "alpha_normalised_pct", "%"
    elif table == "T6":
        out["metric"], out["unit"] = "hyperparameter", ""
    elif table == "textD":
        out["metric"], out["unit"] = "wall_clock", ""
    elif table == "text4.2":  # Figure 5's text claim: SVF's relative gain over the base VLM
        out["method"] = "svf"
        out["metric"], out["unit"] = "relative_gain", "%"
    else:
        out["method"] = TABLE_METHODS.get(meth, "")
    if table == "text4.3":
        out["note"] = "few-shot with uniform alpha (1/3 each)"
    if table == "T3" and out["value_text"].endswith("%"):
        out["note"] += "; printed ratio first/second"
    out["task"] = task
    if not out["metric"]:
        if "%" in metric_label:
            out["metric"] = ("pass@1" if task in ("mbpp", "humaneval") else "acc") if task else "acc"
            out["unit"] = "%"
        else:
            out["metric"], out["unit"] = metric_label, ""
    if out["model"] == "" and mlabel not in ("all",) and table != "T3":
        out["note"] = (out["note"] + "; " if out["note"] else "") + "model not in our registry"
    return out


def make_published(source: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Transcribe the reference CSV into the tidy published CSV (deterministic; atomic write)."""
    src = Path(source)
    if not src.exists():
        raise T2EvalError(f"reference numbers not found: {src}; pass the path of paper_numbers.csv")
    with open(src, newline="") as f:
        rows = [_convert(r) for r in csv.DictReader(f)]
    dst = Path(out) if out else default_published_path()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            r = dict(r)
            r["value"] = "" if r["value"] is None else f"{r['value']:g}"
            w.writerow(r)
    os.replace(tmp, dst)
    return dst


def default_published_path() -> Path:
    """$T2EVAL_PUBLISHED_CSV if set, else the repository's results/published/paper_numbers.csv (found
    beside the package for a source checkout, else under the working directory)."""
    env = os.environ.get(PUBLISHED_ENV)
    if env:
        return Path(env)
    if REPO_PUBLISHED.exists():
        return REPO_PUBLISHED
    return Path("results") / "published" / "paper_numbers.csv"


_CACHE: dict[str, Any] = {}


def load_published(path: str | os.PathLike | None = None):
    """The published numbers as a pandas DataFrame (columns `COLUMNS`; value is float/NaN, other
    columns strings with "" for empty)."""
    import pandas as pd

    p = Path(path) if path else default_published_path()
    key = str(p.resolve()) if p.exists() else str(p)
    if key not in _CACHE:
        if not p.exists():
            raise T2EvalError(f"published numbers not found at {p}; regenerate them with "
                              f"`python -m t2eval.report.published REFERENCE_CSV --out {p}` "
                              f"or set {PUBLISHED_ENV}")
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
        missing = [c for c in COLUMNS if c not in df.columns]
        if missing:
            raise T2EvalError(f"{p} lacks columns {missing}; regenerate it with make_published")
        df["value"] = pd.to_numeric(df["value"].replace("", None), errors="coerce").astype(float)
        _CACHE[key] = df
    return _CACHE[key].copy()


def normalise_table(table: str | int) -> str:
    """'T1' from 1, '1', 't1', 'table1', 'T1'; figures stay 'F6'/'F7'."""
    t = str(table).strip()
    m = re.fullmatch(r"(?i)(?:table\s*|t)?(\d+)", t)
    if m:
        return f"T{int(m.group(1))}"
    m = re.fullmatch(r"(?i)(?:figure\s*|fig\.?\s*|f)(\d+)", t)
    if m:
        return f"F{int(m.group(1))}"
    return t


def published_value(table: str | int, model: str, method: str, task: str, *, metric: str | None = None,
                    category: str | None = None, df=None) -> float | None:
    """The published number (percent for scores) or None when the paper has none. `metric` /
    `category` disambiguate Table 3 and Figure 6/7 rows; an ambiguous query raises T2EvalError."""
    d = load_published() if df is None else df
    sel = d[(d["table"] == normalise_table(table)) & (d["model"] == model) & (d["method"] == method)
            & (d["task"] == task)]
    if metric is not None:
        sel = sel[sel["metric"] == metric]
    if category is not None:
        sel = sel[sel["category"] == category]
    sel = sel[sel["value"].notna()]
    if sel.empty:
        return None
    if len(sel) > 1:
        raise T2EvalError(f"published_value({table!r}, {model!r}, {method!r}, {task!r}) matches {len(sel)} "
                          f"rows ({sorted(set(sel['metric']))}, categories {sorted(set(sel['category']))}); "
                          f"pass metric= or category=")
    return float(sel["value"].iloc[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m t2eval.report.published",
                                 description="regenerate results/published/paper_numbers.csv")
    ap.add_argument("source", help="reference transcription CSV (table, model, method, task, metric, value, source)")
    ap.add_argument("--out", default=None, help="output CSV (default: results/published/paper_numbers.csv)")
    a = ap.parse_args(argv)
    try:
        print(make_published(a.source, a.out))
    except T2EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
