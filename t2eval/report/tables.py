"""The paper's tables recomputed from raw result cells: `t2eval tables --raw results/raw --out results/tables`.

Writes table{1,2,3,4,5}.{md,csv,tex} (and table9 when cross-model cells on the training tasks exist).
Every score cell shows our score %, correct/total, a 95% CI (Wilson by default), the published
score, the difference in percentage points and a flag (⚑ / $^\\dagger$) when the published value lies
outside our CI. With seed replicates (`results/raw/<model>/<method>/<task>.seed<k>.json`, the
workflow's `seeds`) correct/total are pooled over the seeds and the mean ± sd over seeds sits beside
them. Every row but Base carries a paired comparison with the base model on the same documents
(`t2eval.report.stats`): Δbase with a paired bootstrap 95% CI (documents resampled; a document's
outcome averaged over seeds) and the exact McNemar p (with several seeds: the largest per-seed p);
`*` marks a difference significant at 5% (in every seed). Cells scored on other documents than the
base cell (e.g. few-shot rows on `fewshot_test`) get no paired test and say so. Normalised scores (score / base score of the same model and task) are recomputed
from the raw counts — never copied from the paper's printed ratios (PROTOCOL §7). Cells not run yet
are shown as missing ("—"), never as 0.

Which raw cell (`results/raw/<model>/<method>/<task>.json`) each row reads:
  Table 1 (gsm8k, mbpp, arc_easy):  Base = base; LoRA = lora (else lora-<task>); SVF = svf
  Table 2 (math, humaneval, arc_challenge): Base = base; LoRA = best of lora-gsm8k / lora-mbpp /
          lora-arc_easy on that task (the chosen one is named); T2-Prompt = t2-prompt;
          T2-Cls-expert = t2-cls; T2-Few-shot = t2-fewshot
  Table 3: timing of the t2-prompt cells on the unseen tasks
  Table 4 (gsm8k, math; experts trained on GSM8K, MATH = zero-shot transfer):
          #0 base, #1 svf, #2 svf-attn, #3 svf-mlp+attn, #4 svf-ntp, #5 lora-pg,
          #6 lora on gsm8k (else lora-gsm8k) and lora-gsm8k on math (else lora), #7 lora-mlp+attn
  Table 5 (unseen tasks): base, xfer-svf, xfer-svf-shuffled, xfer-fewshot of the target model
  Table 9 (training tasks): base, xfer-svf, xfer-svf-shuffled
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..constants import TASK_LABELS, TRAIN_TASKS, UNSEEN_TASKS, VLM_TASKS
from ..errors import T2EvalError
from ..results import collect, index, replicates
from . import stats
from .cli import TablesConfig, add_config_arguments, select_models, write_text_atomic

log = logging.getLogger(__name__)
Z95 = 1.959963984540054
MISSING = "—"
MODEL_LABELS = {"llama3-8b": "Llama3-8B-Instruct", "mistral-7b": "Mistral-7B-Instruct-v0.3",
                "llama3-70b": "Llama3-70B-Instruct", "smollm2-135m": "SmolLM2-135M-Instruct"}


# ----------------------------------------------------------------------------- statistics
def wilson_ci(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion, as fractions."""
    if total <= 0:
        raise ValueError("total must be positive")
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == total else min(1.0, centre + half)
    return lo, hi


def bootstrap_ci(outcomes: Sequence[int], n_boot: int = 10000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of 0/1 outcomes, as fractions."""
    import numpy as np

    x = np.asarray(outcomes, dtype=float)
    if x.size == 0:
        raise ValueError("no outcomes")
    rng = np.random.default_rng(seed)
    # resampling 0/1 outcomes = drawing the number of successes from a binomial
    means = rng.binomial(x.size, x.mean(), size=n_boot) / x.size
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


# ----------------------------------------------------------------------------- row specifications
Resolver = Callable[[Mapping, str, str], "tuple[Mapping | None, str]"]


def first_of(*methods: str) -> Resolver:
    def resolve(idx, model, task):
        for m in methods:
            m = m.format(task=task)
            if (model, m, task) in idx:
                return idx[(model, m, task)], m
        return None, methods[0].format(task=task)
    return resolve


def best_of(*methods: str) -> Resolver:
    def resolve(idx, model, task):
        found = [(idx[(model, m, task)], m) for m in methods if (model, m, task) in idx]
        if not found:
            return None, "best of " + "/".join(methods)
        return max(found, key=lambda cm: cm[0]["score"])  # ties: the first listed
    return resolve


def _lora6(idx, model, task):
    return (first_of("lora", "lora-gsm8k") if task == "gsm8k" else first_of("lora-gsm8k", "lora"))(idx, model, task)


# (row label, published method key, resolver)
TABLES: dict[str, dict[str, Any]] = {
    "1": {"title": "Table 1 — fine-tuning on the training tasks", "published": "T1", "tasks": TRAIN_TASKS,
          "rows": [("Base", "base", first_of("base")), ("LoRA", "lora", first_of("lora", "lora-{task}")),
                   ("SVF", "svf", first_of("svf"))]},
    "2": {"title": "Table 2 — self-adaptation on unseen tasks", "published": "T2", "tasks": UNSEEN_TASKS,
          "rows": [("Base", "base", first_of("base")),
                   ("LoRA (best of task-LoRAs)", "lora", best_of(*(f"lora-{t}" for t in TRAIN_TASKS))),
                   ("T2-Prompt", "t2-prompt", first_of("t2-prompt")),
                   ("T2-Cls-expert", "t2-cls", first_of("t2-cls")),
                   ("T2-Few-shot", "t2-fewshot", first_of("t2-fewshot")),
                   ("SVF, the task's domain expert (oracle dispatch; not in the paper)", "svf-domain",
                    first_of("svf-domain"))],
          "optional": ("svf-domain",)},  # rows shown only for models that have their cells
    "4": {"title": "Table 4 — ablations (experts trained on GSM8K; MATH = zero-shot transfer)", "published": "T4",
          "tasks": ("gsm8k", "math"),
          "rows": [("#0 base", "base", first_of("base")),
                   ("#1 SVF | policy gradient | MLP", "svf", first_of("svf")),
                   ("#2 SVF | policy gradient | attention", "svf-attn", first_of("svf-attn")),
                   ("#3 SVF | policy gradient | MLP+attention", "svf-mlp+attn", first_of("svf-mlp+attn")),
                   ("#4 SVF | next-token pred | attention", "svf-ntp", first_of("svf-ntp")),
                   ("#5 LoRA | policy gradient | attention", "lora-pg", first_of("lora-pg")),
                   ("#6 LoRA | next-token pred | attention", "lora", _lora6),
                   ("#7 LoRA | next-token pred | MLP+attention", "lora-mlp+attn", first_of("lora-mlp+attn"))],
          "only_models_with": ("svf-attn", "svf-mlp+attn", "svf-ntp", "lora-pg", "lora-mlp+attn")},
    "5": {"title": "Table 5 — cross-model transfer (experts of another model)", "published": "T5",
          "tasks": UNSEEN_TASKS,
          "rows": [("Base", "base", first_of("base")),
                   ("+ transferred SVF (σ ordered)", "xfer-svf", first_of("xfer-svf")),
                   ("+ transferred SVF (σ shuffled)", "xfer-svf-shuffled", first_of("xfer-svf-shuffled")),
                   ("+ few-shot adaptation (cross-model)", "xfer-fewshot", first_of("xfer-fewshot"))],
          "only_models_with": ("xfer-svf", "xfer-svf-shuffled", "xfer-fewshot")},
    "9": {"title": "Table 9 — cross-model transfer on the training tasks", "published": "T9",
          "tasks": TRAIN_TASKS,
          "rows": [("Base", "base", first_of("base")),
                   ("+ transferred SVF (σ ordered)", "xfer-svf", first_of("xfer-svf")),
                   ("+ transferred SVF (σ shuffled)", "xfer-svf-shuffled", first_of("xfer-svf-shuffled"))],
          "only_models_with": ("xfer-svf", "xfer-svf-shuffled")},
}


# ----------------------------------------------------------------------------- building entries
def _published(pub, table, model, method, task, metric=None):
    from .published import published_value

    if pub is None:
        return None
    return published_value(table, model, method, task, metric=metric, df=pub)


REPORTED_SET = "reported_set"


def alpha_selected_on_reported_set(cell: Mapping[str, Any]) -> bool:
    """Whether a few-shot cell's α was chosen on the set it reports (`provenance.alpha_selection`, the
    label or the rule name of t2eval.adapt.cem; the release protocol does so)."""
    from ..adapt.cem import SELECTION_LABELS

    sel = (cell.get("provenance") or {}).get("alpha_selection")
    return sel in (REPORTED_SET, SELECTION_LABELS[REPORTED_SET])


def _seed_tag(cell: Mapping[str, Any]) -> str:
    return "first" if cell.get("_seed") is None else str(cell["_seed"])


def seed_fields(reps: Sequence[Mapping[str, Any]], base: Mapping[str, Any] | None,
                is_base: bool) -> dict[str, Any]:
    """Seed statistics of one table entry (its cell of every seed) and the paired comparison with the
    base cell on the same documents."""
    scores = [100 * c["correct"] / c["total"] for c in reps]
    mean, sd = stats.seed_mean_sd(scores)
    out: dict[str, Any] = {"n_seeds": len(reps), "seeds": ";".join(_seed_tag(c) for c in reps),
                           "seed_scores_pct": ";".join(f"{x:.6g}" for x in scores),
                           "seed_mean_pct": mean, "seed_sd_pct": sd,
                           "alpha_selection": next(((c.get("provenance") or {}).get("alpha_selection")
                                                    for c in reps if (c.get("provenance") or {}).get("alpha_selection")),
                                                   None)}
    if is_base or base is None:
        return out
    if any(c["split"] != base["split"] for c in reps):
        out["paired_note"] = f"no paired test: scored on {reps[0]['split']}, base on {base['split']}"
        return out
    try:
        pairs = [stats.paired(base, c) for c in reps]
    except ValueError:
        out["paired_note"] = "no paired test: not the base cell's documents"
        return out
    tests = [stats.mcnemar_exact(a, b) for a, b, _ in pairs]
    base_outcomes = pairs[0][0]
    ours = [sum(p[1][i] for p in pairs) / len(pairs) for i in range(len(base_outcomes))]
    diff, lo, hi = stats.paired_bootstrap_ci(base_outcomes, ours)
    out.update(base_n01=sum(t.n01 for t in tests), base_n10=sum(t.n10 for t in tests),
               mcnemar_p=max(t.p_value for t in tests), mcnemar_p_seeds=";".join(f"{t.p_value:.6g}" for t in tests),
               diff_base_pp=100 * diff, diff_base_ci_low_pp=100 * lo, diff_base_ci_high_pp=100 * hi,
               significant=all(t.significant for t in tests))
    return out


SEED_FIELDS = ("n_seeds", "seeds", "seed_scores_pct", "seed_mean_pct", "seed_sd_pct", "alpha_selection",
               "base_n01", "base_n10", "mcnemar_p", "mcnemar_p_seeds", "diff_base_pp", "diff_base_ci_low_pp",
               "diff_base_ci_high_pp", "significant", "paired_note")


def score_entries(table: str, cells: Iterable[Mapping[str, Any]], models: Sequence[str], pub=None,
                  ci: str = "wilson") -> list[dict[str, Any]]:
    """One dict per (model, row, task) of a score table ("1", "2", "4", "5", "9"); a row's correct/total
    are pooled over its seed replicates (the first seed's cell decides which cell a row reads)."""
    spec = TABLES[table]
    cells = list(cells)
    idx = index(cells)
    reps_of = replicates(cells)
    out = []
    for model in models:
        base_rows = {t: idx.get((model, "base", t)) for t in spec["tasks"]}
        for label, pmethod, resolve in spec["rows"]:
            if pmethod in spec.get("optional", ()) and all(resolve(idx, model, t)[0] is None for t in spec["tasks"]):
                continue
            for task in spec["tasks"]:
                cell, source = resolve(idx, model, task)
                e: dict[str, Any] = {"table": f"T{table}", "model": model, "row": label, "method": pmethod,
                                     "task": task, "source_method": source, "status": "missing",
                                     "metric": None, "split": None, "correct": None, "total": None,
                                     "score_pct": None, "ci_low_pct": None, "ci_high_pct": None, "ci": ci,
                                     "published_pct": None, "diff_pp": None, "outside_ci": None,
                                     "published_implied_correct": None, "norm": None, "published_norm": None,
                                     "base_correct": None, "base_total": None, "path": None,
                                     **{f: None for f in SEED_FIELDS}}
                pubv = _published(pub, spec["published"], model, pmethod, task)
                pub_base = _published(pub, spec["published"], model, "base", task)
                if pub_base is None and pub is not None:  # e.g. Table 9 has no base row: use Table 1's
                    pub_base = _published(pub, "T1" if task in TRAIN_TASKS else "T2", model, "base", task)
                e["published_pct"] = pubv
                if pubv is not None and pub_base:
                    e["published_norm"] = pubv / pub_base
                if cell is not None:
                    reps = reps_of.get((model, cell["method"], task)) or [cell]
                    k, n = sum(c["correct"] for c in reps), sum(c["total"] for c in reps)
                    e.update(seed_fields(reps, base_rows.get(task), pmethod == "base"))
                    if ci == "bootstrap":
                        lo, hi = bootstrap_ci([s["correct"] for c in reps for s in c["per_sample"]])
                    else:
                        lo, hi = wilson_ci(k, n)
                    e.update(status="ok", metric=cell["metric"], split=cell["split"], correct=k, total=n,
                             score_pct=100 * k / n, ci_low_pct=100 * lo, ci_high_pct=100 * hi,
                             path=cell.get("_path"))
                    if pubv is not None:
                        e["diff_pp"] = e["score_pct"] - pubv
                        e["outside_ci"] = not (e["ci_low_pct"] <= pubv <= e["ci_high_pct"])
                        e["published_implied_correct"] = round(pubv / 100 * n)
                    b = base_rows.get(task)
                    if b is not None:
                        e["base_correct"], e["base_total"] = b["correct"], b["total"]
                        if b["correct"] > 0:
                            e["norm"] = (k / n) / (b["correct"] / b["total"])
                out.append(e)
    return out


def timing_entries(cells: Iterable[Mapping[str, Any]], models: Sequence[str], pub=None) -> list[dict[str, Any]]:
    """Table 3: first/second pass seconds and their ratio for t2-prompt on the unseen tasks."""
    idx = index(cells)
    out = []
    for model in models:
        for task in UNSEEN_TASKS:
            cell = idx.get((model, "t2-prompt", task))
            t = (cell or {}).get("timing") or {}
            first, second = t.get("first_pass_s"), t.get("second_pass_s")
            pf = _published(pub, "T3", "llama3-8b", "t2-prompt", task, "first_pass_s")
            ps = _published(pub, "T3", "llama3-8b", "t2-prompt", task, "second_pass_s")
            e = {"table": "T3", "model": model, "task": task, "method": "t2-prompt",
                 "status": "ok" if first is not None and second is not None else "missing",
                 "first_pass_s": first, "second_pass_s": second,
                 "ratio_pct": 100 * first / second if first is not None and second else None,
                 "swap_s": t.get("swap_s"), "total_s": t.get("total_s"), "tokens_first": t.get("tokens_first"),
                 "tokens_second": t.get("tokens_second"), "hardware": t.get("hardware"),
                 "total": (cell or {}).get("total"),
                 "published_first_pass_s": pf, "published_second_pass_s": ps,
                 "published_ratio_pct": 100 * pf / ps if pf is not None and ps else None,
                 "published_ratio_printed_pct": _published(pub, "T3", "llama3-8b", "t2-prompt", task,
                                                           "first_second_ratio_pct"),
                 "published_model": "not stated (presumably llama3-8b)" if pf is not None else None,
                 "path": (cell or {}).get("_path")}
            out.append(e)
    return out


def models_for(table: str, cells: Sequence[Mapping[str, Any]], models: Sequence[str], pub=None) -> list[str]:
    """Rows of the ablation/cross-model tables: the models that have such cells; else the models the paper
    reports in that table; else all models."""
    want = TABLES[table].get("only_models_with")
    if not want:
        return list(models)
    tasks = TABLES[table]["tasks"]
    have = [m for m in models if any(c["model"] == m and c["method"] in want and c["task"] in tasks for c in cells)]
    if not have and pub is not None:
        published = set(pub.loc[pub["table"] == TABLES[table]["published"], "model"])
        have = [m for m in models if m in published]
    return have or list(models)


# ----------------------------------------------------------------------------- protocol
UNRECORDED = "unrecorded"


def cell_protocol(cell: Mapping[str, Any]) -> str:
    """The protocol a cell was made with (`provenance.protocol.name`; cells made before the switch existed
    say "unrecorded")."""
    p = (cell.get("provenance") or {}).get("protocol") or cell.get("protocol") or {}
    return p.get("name", UNRECORDED) if isinstance(p, Mapping) else str(p)


def table_protocol(table: str, cells: Sequence[Mapping[str, Any]]) -> str | None:
    """The one protocol of the cells a table shows; a clear error naming the cells when they differ
    (release and corrected numbers never sit in one table)."""
    by: dict[str, list[str]] = {}
    for c in cells:
        by.setdefault(cell_protocol(c), []).append(str(c.get("_path") or f"{c['model']}/{c['method']}/{c['task']}"))
    if len(by) > 1:
        detail = "; ".join(f"{p}: {', '.join(sorted(v)[:6])}{' …' if len(v) > 6 else ''}" for p, v in sorted(by.items()))
        raise T2EvalError(f"table {table} would mix cells of different protocols ({detail}); re-run the cells of "
                          f"one protocol (`protocol:` in the workflow config) or tabulate them separately")
    return next(iter(by), None)


def _protocol_line(protocol: str | None) -> str:
    if protocol is None:
        return "Protocol: — (no cells yet)."
    return (f"Protocol: `{protocol}` (every cell of this table; `t2eval protocol` lists what it sets"
            + ("; `release` reproduces the code release, bugs included)." if protocol == "release" else ")."))


# ----------------------------------------------------------------------------- rendering
def _f(x, nd=2, sign=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    x = round(x, nd) + 0.0  # no "-0.00"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _ours(e) -> str:
    if e["status"] != "ok":
        return MISSING
    s = f"{e['score_pct']:.2f} ({e['correct']}/{e['total']}) [{e['ci_low_pct']:.1f}, {e['ci_high_pct']:.1f}]"
    if e.get("n_seeds") and e["n_seeds"] > 1:
        s += f" {e['seed_mean_pct']:.2f}±{e['seed_sd_pct']:.2f} ({e['n_seeds']} seeds)"
    if e["norm"] is not None and e["method"] != "base":
        s += f" ×{e['norm']:.2f}"
    if e.get("mcnemar_p") is not None:
        s += (f" Δbase {_f(e['diff_base_pp'], sign=True)} [{_f(e['diff_base_ci_low_pp'], 1, True)}, "
              f"{_f(e['diff_base_ci_high_pp'], 1, True)}] p={_p(e['mcnemar_p'])}" + (" *" if e["significant"] else ""))
    if e["source_method"] != e["method"] and e["method"] != "base":
        s += f" ({e['source_method']})"
    if e["split"] and e["split"] != "test":
        s += f" [{e['split']}]"
    return s


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


REPORTED_SET_MARK = "‡"
REPORTED_SET_NOTE = (f"{REPORTED_SET_MARK} α selected on the reported set (the release's few-shot rule: the "
                     f"reported score also chose α, so it is optimistic).")


def row_label(label: str, entries: Sequence[Mapping[str, Any]]) -> str:
    """The row label, marked when a cell of the row had its α selected on the reported set."""
    from ..adapt.cem import SELECTION_LABELS

    on_reported = any(e.get("alpha_selection") in (REPORTED_SET, SELECTION_LABELS[REPORTED_SET]) for e in entries)
    return f"{label} {REPORTED_SET_MARK} (α selected on the reported set)" if on_reported else label


def _paper(e) -> str:
    if e["published_pct"] is None:
        return ""
    s = f"{e['published_pct']:.2f}"
    if e["published_norm"] is not None and e["method"] != "base":
        s += f" ×{e['published_norm']:.2f}"
    if e["diff_pp"] is not None:
        s += f" Δ{_f(e['diff_pp'], sign=True)}"
    if e["outside_ci"]:
        s += " ⚑"
    return s


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


LEGEND = ("Each cell: ours = score % (correct/total) [95% CI] ×normalised (score / base score of the same "
          "model and task, recomputed from the raw counts); paper = published score ×normalised "
          "(recomputed from published scores) Δ ours − paper in points; ⚑ = published value outside our CI; "
          f"{MISSING} = not run yet. With several seeds: correct/total pooled over the seeds, then mean±sd of the "
          "seeds' scores. Δbase = ours − base on the same documents in points [paired bootstrap 95% CI] "
          f"p = {stats.TEST_NAME} (several seeds: the largest p over seeds); * = significant at 5% "
          "(in every seed).")


def render_score_md(table: str, entries: list[dict[str, Any]], models: Sequence[str], protocol: str | None = None) -> str:
    spec = TABLES[table]
    parts = [f"# {spec['title']}", "", _protocol_line(protocol), "", LEGEND, ""]
    for model in models:
        ents = [e for e in entries if e["model"] == model]
        parts += [f"## {MODEL_LABELS.get(model, model)} (`{model}`)", ""]
        header = ["Method"]
        for t in spec["tasks"]:
            header += [f"{TASK_LABELS.get(t, t)} ours", f"{TASK_LABELS.get(t, t)} paper"]
        rows = []
        for label, _, _ in spec["rows"]:
            row_ents = [x for x in ents if x["row"] == label]
            if not row_ents:  # an optional row this model has no cells for
                continue
            r = [row_label(label, row_ents)]
            for t in spec["tasks"]:
                e = next(x for x in row_ents if x["task"] == t)
                r += [_ours(e), _paper(e)]
            rows.append(r)
        parts += [_md_table(header, rows), ""]
        if any(r[0].endswith("(α selected on the reported set)") for r in rows):
            parts += [REPORTED_SET_NOTE, ""]
        if not any(e["published_pct"] is not None for e in ents):
            parts += ["(no published numbers for this model)", ""]
    return "\n".join(parts)


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"),
                 ("σ", r"$\sigma$"), ("—", "--"), ("Δ", r"$\Delta$"), ("×", r"$\times$"), ("⚑", r"$^\dagger$")):
        s = s.replace(a, b)
    return s


def render_score_tex(table: str, entries: list[dict[str, Any]], models: Sequence[str], protocol: str | None = None) -> str:
    spec = TABLES[table]
    tasks = spec["tasks"]
    lines = [r"% generated by `t2eval tables`; needs \usepackage{booktabs}",
             r"\begin{table}[t]", r"\centering", r"\small",
             r"\caption{" + _tex_escape(spec["title"]) + f" (protocol: {protocol or '--'})" + r". Ours: score \% (95\% CI); in parentheses the "
             r"published score; $^\dagger$: published value outside our CI; -- : not run. With several seeds: "
             r"pooled over seeds, mean$\pm$sd of the seeds' scores. $^*$: differs from the base model on the same "
             r"documents at 5\% (" + _tex_escape(stats.TEST_NAME) + r"; several seeds: in every seed); "
             r"$^\ddagger$: $\alpha$ selected on the reported set.}",
             r"\label{tab:t2eval-" + table + "}",
             r"\begin{tabular}{l" + "c" * len(tasks) + "}", r"\toprule",
             "Method & " + " & ".join(_tex_escape(TASK_LABELS.get(t, t)) for t in tasks) + r" \\"]
    for model in models:
        lines += [r"\midrule", r"\multicolumn{" + str(len(tasks) + 1) + "}{l}{\\textit{"
                  + _tex_escape(MODEL_LABELS.get(model, model)) + r"}} \\"]
        for label, _, _ in spec["rows"]:
            if not any(x["model"] == model and x["row"] == label for x in entries):
                continue  # an optional row this model has no cells for
            cells = []
            for t in tasks:
                e = next(x for x in entries if x["model"] == model and x["row"] == label and x["task"] == t)
                if e["status"] == "ok":
                    c = f"{e['score_pct']:.2f} {{\\scriptsize[{e['ci_low_pct']:.1f}, {e['ci_high_pct']:.1f}]}}"
                    if e.get("n_seeds") and e["n_seeds"] > 1:
                        c += f" {{\\scriptsize {e['seed_mean_pct']:.2f}$\\pm${e['seed_sd_pct']:.2f}}}"
                    if e.get("significant"):
                        c += r"$^*$"
                else:
                    c = "--"
                if e["published_pct"] is not None:
                    c += f" ({e['published_pct']:.2f})" + (r"$^\dagger$" if e["outside_ci"] else "")
                cells.append(c)
            mark = r"$^\ddagger$" if row_label(label, [x for x in entries if x["model"] == model and x["row"] == label]) != label else ""
            lines.append(_tex_escape(label) + mark + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def render_timing_md(entries: list[dict[str, Any]], models: Sequence[str], protocol: str | None = None) -> str:
    parts = ["# Table 3 — two-pass inference time (T2-Prompt), whole test set", "", _protocol_line(protocol), "",
             "first/second = wall seconds of the dispatch pass and of the answering pass; ratio = first / "
             "second. The paper does not name the model or hardware of its Table 3 (presumably "
             f"Llama3-8B); its ratio is recomputed from its seconds (printed ratio in parentheses). "
             f"{MISSING} = not run yet.", ""]
    header = ["Model", "Task", "first pass s", "second pass s", "ratio %", "swap s", "n", "hardware"]
    rows = [[e["model"], TASK_LABELS[e["task"]], _f(e["first_pass_s"]), _f(e["second_pass_s"]),
             _f(e["ratio_pct"], 1), _f(e["swap_s"]), str(e["total"] or MISSING), e["hardware"] or MISSING]
            for e in entries]
    seen = set()
    for e in entries:  # the paper's rows once per task
        if e["task"] in seen or e["published_first_pass_s"] is None:
            continue
        seen.add(e["task"])
        pr = _f(e["published_ratio_pct"], 1) + f" (printed {_f(e['published_ratio_printed_pct'], 0)})"
        rows.append(["paper (model not stated)", TASK_LABELS[e["task"]], _f(e["published_first_pass_s"]),
                     _f(e["published_second_pass_s"]), pr, "", "", "not stated"])
    parts += [_md_table(header, rows), ""]
    return "\n".join(parts)


def render_timing_tex(entries: list[dict[str, Any]], protocol: str | None = None) -> str:
    lines = [r"% generated by `t2eval tables`; needs \usepackage{booktabs}", r"\begin{table}[t]", r"\centering",
             r"\small", r"\caption{" + f"(protocol: {protocol or '--'}) " + r"Two-pass inference time of T2-Prompt over the whole test set: first pass "
             r"(dispatch) and second pass (answering) in seconds, ratio first/second in parentheses; "
             r"published numbers (model not stated) in the last column.}", r"\label{tab:t2eval-3}",
             r"\begin{tabular}{llccl}", r"\toprule",
             r"Model & Task & 1st pass (s) & 2nd pass (s) & published 1st / 2nd (s) \\", r"\midrule"]
    for e in entries:
        first = "--" if e["first_pass_s"] is None else f"{e['first_pass_s']:.2f} ({e['ratio_pct']:.0f}\\%)"
        second = "--" if e["second_pass_s"] is None else f"{e['second_pass_s']:.2f}"
        pub = "" if e["published_first_pass_s"] is None else (
            f"{e['published_first_pass_s']:.2f} ({e['published_ratio_pct']:.0f}\\%) / {e['published_second_pass_s']:.2f}")
        lines.append(f"{_tex_escape(e['model'])} & {_tex_escape(TASK_LABELS[e['task']])} & {first} & {second} & {pub} \\\\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def _write_csv(path: Path, entries: list[dict[str, Any]]) -> None:
    import pandas as pd

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pd.DataFrame(entries).to_csv(tmp, index=False, float_format="%.10g")
    os.replace(tmp, path)


def write_tables(cells: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, models: Sequence[str] | None = None,
                 published_csv: str | os.PathLike | None = None, ci: str = "wilson") -> list[Path]:
    """Render every table from `cells` into `out_dir`; returns the written paths."""
    from .published import load_published

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pub = load_published(published_csv)
    cells = [c for c in cells if c["task"] not in VLM_TASKS]  # VQA cells: `t2eval vlm-report` (Figure 5)
    models = select_models(cells, models)
    written: list[Path] = []
    names = ["1", "2", "3", "4", "5"]
    if any(c["method"] in ("xfer-svf", "xfer-svf-shuffled") and c["task"] in TRAIN_TASKS for c in cells):
        names.append("9")
    by_path = {c.get("_path"): c for c in cells}
    for name in names:
        stem = out / f"table{name}"
        if name == "3":
            ents = timing_entries(cells, models, pub)
        else:
            ms = models_for(name, cells, models, pub)
            ents = score_entries(name, cells, ms, pub, ci=ci)
        reps_of = replicates(cells)
        proto = table_protocol(name, [c for e in ents if e.get("path") in by_path
                                      for c in reps_of.get((e["model"], by_path[e["path"]]["method"], e["task"]), [])])
        for e in ents:
            e["protocol"] = cell_protocol(by_path[e["path"]]) if e.get("path") in by_path else None
        if name == "3":
            md, tex = render_timing_md(ents, models, proto), render_timing_tex(ents, proto)
        else:
            md, tex = render_score_md(name, ents, ms, proto), render_score_tex(name, ents, ms, proto)
        write_text_atomic(stem.with_suffix(".md"), md)
        write_text_atomic(stem.with_suffix(".tex"), tex)
        _write_csv(stem.with_suffix(".csv"), ents)
        written += [stem.with_suffix(s) for s in (".md", ".csv", ".tex")]
    return written


# ----------------------------------------------------------------------------- CLI
CONFIG = TablesConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, TablesConfig)


def run(args: argparse.Namespace) -> int:
    from ..provenance import record, write_sidecar

    cells = collect(args.raw)
    if not cells and not args.models:
        raise T2EvalError(f"no result cells under {args.raw}; run `t2eval evaluate` first, or pass --models "
                          f"to write empty tables beside the published numbers")
    written = write_tables(cells, args.out, args.models, args.published, ci=args.ci)
    write_sidecar(Path(args.out), record("tables", {"raw": str(args.raw), "models": args.models, "ci": args.ci},
                                         inputs={c["_path"]: f"{c['correct']}/{c['total']}" for c in cells}))
    for p in written:
        log.info("wrote %s", p)
    print(f"wrote {len(written)} files to {args.out} from {len(cells)} result cells")
    return 0
