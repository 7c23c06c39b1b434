"""The paper's figures from raw artefacts: `t2eval figures --raw results/raw --experts experts --out results/figures`.

Each figure is one PNG (a row of panels per model) plus the CSV of the numbers behind it —
`fig4_learning_curves`, `fig6_dispatch_confusion`, `fig7_alpha` — always written (a placeholder
image naming the missing input when a figure has none yet, so the DAG's outputs exist);
`<out>/README.md` indexes them with their captions (`caption(figure, model)` gives the same strings
to `snakemake --report`).

* Figure 4 — SVF learning curves, one panel per task, from `experts/<model>/svf/<task>/log.jsonl`:
  one JSON object per line; rows with a validation score are plotted. Agreed row format:
  `{"iteration": int, "split_scores": {"train": x, "valid": y, "test": z}, ...}` (`split_scores`
  absent on iterations without evaluation; a top-level "valid" key is accepted too). Scores are
  fractions (values > 1 are taken as percentages). The best-validation iteration is marked (first
  maximum = the checkpoint the trainer keeps); the base model's test score (from the base cell in
  `results/raw/<model>/base/<task>.json`) is a dashed line. With seed replicates (the workflow's `seeds`;
  further seeds' logs in `experts/<model>/svf/<task>/seed<k>/log.jsonl`) each seed is one thin curve
  and their mean (over the iterations every seed evaluated) a thick one; the CSV's `seed` column says
  which (`first`, the seed k, or `mean`).
* Figure 6 — dispatch confusion matrices (true task × chosen expert, row-normalised) from the
  `dispatch` field of the t2-prompt / t2-cls cells; the paper's fractions are in the CSV beside ours.
* Figure 7 — few-shot α from `experts/<model>/fewshot/<task>/alpha.json`
  (`{"alpha": [...], "experts": ["math", "code", "reasoning"], "normalised": bool, ...}`; alpha is a
  K-vector, `[[K per vector]]` (1×K) or `[K × n_matrices]`): per matrix the K weights are
  normalised to sum 1 (negative values clipped to 0), then averaged over matrices; bars beside the
  published Figure 7 values where the model has them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..adapt.strategies import two_pass_methods
from ..constants import EXPERT_NAMES as EXPERTS
from ..constants import OTHER, TRAIN_TASKS, UNSEEN_TASKS, VLM_TASKS
from ..errors import CorruptArtifactError, T2EvalError
from ..results import MODELS, collect, index
from .cli import FiguresConfig, add_config_arguments, select_models, write_text_atomic
from .tables import MODEL_LABELS, TASK_LABELS

log = logging.getLogger(__name__)

def dispatch_methods() -> dict[str, str]:
    """{method: panel title} of the registered two-pass strategies (t2-prompt, t2-cls, ...)."""
    return two_pass_methods("evaluate")


def caption(figure: str, model: str | None = None) -> str:
    """Caption text for figure "4", "6" or "7" (optionally naming the model)."""
    who = f" ({MODEL_LABELS.get(model, model)})" if model else ""
    return {
        "4": f"Figure 4{who}: SVF training curves — validation score per iteration for each training task; "
             "the star marks the best-validation checkpoint (the one kept), the dashed line is the base "
             "model's test score. With several seeds: one thin curve per seed and their mean (thick; the "
             "star marks the mean's best iteration).",
        "6": f"Figure 6{who}: confusion matrices of the first-pass dispatcher — rows are the true task, "
             "columns the chosen expert (row fractions); 'other' means the base model answered.",
        "7": f"Figure 7{who}: few-shot adaptation weights α — normalised weight of each expert (math = GSM8K, "
             "code = MBPP, reasoning = ARC-Easy) per unseen task; hatched bars are the published values.",
    }[str(figure)]


# ----------------------------------------------------------------------------- readers
def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a training log that carry a validation score:
    [{"iteration", "valid", "train", "test"}] (scores as fractions; train/test None when absent)."""
    from ..data.datasets import read_jsonl_rows

    p = Path(path)
    try:
        lines = read_jsonl_rows(p)
    except T2EvalError as e:
        raise CorruptArtifactError(f"{e} (the training log must hold one JSON object per line)") from None
    rows = []
    for _, r in lines:
        ss = r.get("split_scores") or {}
        valid = ss.get("valid", r.get("valid"))
        if valid is None:
            continue
        rows.append({"iteration": r.get("iteration", len(rows)), "valid": float(valid),
                     "train": ss.get("train", r.get("train")), "test": ss.get("test", r.get("test"))})
    if rows and max(r["valid"] for r in rows) > 1.0:  # percentages
        for r in rows:
            for k in ("valid", "train", "test"):
                if r[k] is not None:
                    r[k] = float(r[k]) / 100
    return rows


def normalised_alpha(alpha: Any, experts: Sequence[str], where: str = "alpha") -> list[float]:
    """Per-expert weights summing to 1 from a K-vector, 1×K or K×n_matrices array (see module doc)."""
    import numpy as np

    k = len(experts)
    try:
        a = np.asarray(alpha, dtype=float)
    except (TypeError, ValueError):
        raise CorruptArtifactError(f"{where}: alpha is not a numeric array") from None
    if a.ndim == 1 and a.size == k:
        a = a[:, None]
    elif a.ndim == 2 and a.shape[0] == k:
        pass
    elif a.ndim == 2 and a.shape[1] == k:
        a = a.T
    else:
        raise CorruptArtifactError(f"{where}: alpha has shape {list(a.shape)} but there are {k} experts "
                                   f"{list(experts)}; expected [{k}], [1, {k}] or [{k}, n_matrices]")
    a = np.clip(a, 0, None)
    sums = a.sum(axis=0, keepdims=True)
    a = np.where(sums > 0, a / np.where(sums > 0, sums, 1), 1.0 / k)
    return [float(x) for x in a.mean(axis=1)]


def _task_order(tasks: Iterable[str]) -> list[str]:
    ts = set(tasks)
    known = [t for t in TRAIN_TASKS + UNSEEN_TASKS if t in ts]
    return known + sorted(ts - set(known))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- figures
FILES = {"4": "fig4_learning_curves", "6": "fig6_dispatch_confusion", "7": "fig7_alpha"}


def _finish(fig, plt, out_dir, figure: str, table: list[dict[str, Any]], columns: list[str]) -> list[Path]:
    out = Path(out_dir)
    png, csv = out / f"{FILES[figure]}.png", out / f"{FILES[figure]}.csv"
    _save(fig, png)
    plt.close(fig)
    import pandas as pd

    tmp = csv.with_name(f".{csv.name}.tmp{os.getpid()}")
    pd.DataFrame(table, columns=columns).to_csv(tmp, index=False, float_format="%.10g")
    os.replace(tmp, csv)
    return [png, csv]


def _placeholder(plt, figure: str, looked_for: str):
    """A figure saying what input is missing: the output exists (the DAG needs it) but shows no data."""
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, f"Figure {figure}: no inputs yet\n(looked for {looked_for})", ha="center", va="center",
            fontsize=9, wrap=True)
    return fig


def learning_curves(model: str, experts_dir: str | os.PathLike) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{task: {seed: read_log rows}} for the model's SVF logs that have validation scores; seed "first"
    is `svf/<task>/log.jsonl`, seed "k" is `svf/<task>/seed<k>/log.jsonl`."""
    root = Path(experts_dir) / model / "svf"
    curves: dict[str, dict[str, list[dict[str, Any]]]] = {}
    if root.is_dir():
        for p in sorted(root.glob("*/log.jsonl")):
            curves.setdefault(p.parent.name, {})["first"] = read_log(p)
        for p in sorted(root.glob("*/seed*/log.jsonl"), key=lambda q: (q.parent.parent.name, _seed_num(q.parent.name))):
            if _seed_num(p.parent.name) is not None:
                curves.setdefault(p.parent.parent.name, {})[p.parent.name[4:]] = read_log(p)
    curves = {t: {k: v for k, v in by.items() if v} for t, by in curves.items()}
    return {t: curves[t] for t in _task_order(curves) if curves[t]}


def _seed_num(name: str) -> int | None:
    return int(name[4:]) if name.startswith("seed") and name[4:].isdigit() else None


def mean_curve(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The mean validation score over seeds at each iteration that every seed evaluated."""
    its = set.intersection(*({r["iteration"] for r in rows} for rows in runs))
    by = [{r["iteration"]: r for r in rows} for rows in runs]
    return [{"iteration": i, "valid": sum(b[i]["valid"] for b in by) / len(by), "train": None, "test": None}
            for i in sorted(its)]


FIG4_COLUMNS = ["model", "task", "seed", "iteration", "valid", "train", "test", "is_best", "base_test"]


def figure4(models: Sequence[str], experts_dir: str | os.PathLike, cells: Sequence[Mapping[str, Any]],
            out_dir: str | os.PathLike) -> list[Path]:
    """Learning curves: one row of panels per model, one panel per task -> [png, csv]."""
    plt = _plt()
    data = {m: c for m in models if (c := learning_curves(m, experts_dir))}
    table: list[dict[str, Any]] = []
    if not data:
        fig = _placeholder(plt, "4", f"{experts_dir}/<model>/svf/<task>/log.jsonl with split_scores.valid")
        return _finish(fig, plt, out_dir, "4", table, FIG4_COLUMNS)
    idx = index(cells)
    ncols = max(len(c) for c in data.values())
    fig, axes = plt.subplots(len(data), ncols, figsize=(4.2 * ncols, 3.3 * len(data)), squeeze=False,
                             layout="constrained")
    for r, (model, curves) in enumerate(data.items()):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(curves):
                ax.axis("off")
                continue
            task = list(curves)[c]
            runs = curves[task]
            base = idx.get((model, "base", task))
            many = len(runs) > 1
            series = dict(runs)
            if many:
                series["mean"] = mean_curve(list(runs.values()))
            for seed, rows in series.items():
                if not rows:
                    continue
                its = [x["iteration"] for x in rows]
                vals = [100 * x["valid"] for x in rows]
                best = max(range(len(rows)), key=lambda i: (rows[i]["valid"], -i))  # first maximum
                if not many:
                    ax.plot(its, vals, marker="o", ms=3, label="SVF validation")
                elif seed == "mean":
                    ax.plot(its, vals, marker="o", ms=3, lw=2.2, color="C0", label=f"mean of {len(runs)} seeds")
                else:
                    ax.plot(its, vals, lw=0.9, alpha=0.6, label=f"seed {seed}")
                if seed == ("mean" if many else "first"):
                    ax.plot([its[best]], [vals[best]], marker="*", ms=14, color="C3", ls="none",
                            label=f"best valid{' (mean)' if many else ''} (it {its[best]})")
                for i, x in enumerate(rows):
                    table.append({"model": model, "task": task, "seed": seed, "iteration": x["iteration"],
                                  "valid": x["valid"], "train": x["train"], "test": x["test"], "is_best": i == best,
                                  "base_test": base["score"] if base else None})
            if base is not None:
                ax.axhline(100 * base["score"], ls="--", color="gray", label="base test")
            ax.set_title(f"{MODEL_LABELS.get(model, model)} — {TASK_LABELS.get(task, task)}", fontsize=9)
            ax.set_xlabel("iteration")
            ax.set_ylabel("score (%)")
            ax.legend(fontsize=7)
    fig.suptitle("SVF learning curves")
    return _finish(fig, plt, out_dir, "4", table, FIG4_COLUMNS)


def dispatch_matrix(cells: Sequence[Mapping[str, Any]], model: str, method: str):
    """(true tasks, chosen labels, counts[true][chosen]) from the dispatch fields of a model's cells."""
    counts: dict[str, dict[str, int]] = {}
    for c in cells:
        if c["model"] != model or c["method"] != method or not c.get("dispatch"):
            continue
        for d in c["dispatch"]:
            row = counts.setdefault(d["true_task"], {})
            row[d["chosen"]] = row.get(d["chosen"], 0) + 1
    chosen = {ch for row in counts.values() for ch in row}
    cols = list(EXPERTS) + [OTHER] + sorted(chosen - set(EXPERTS) - {OTHER})
    return _task_order(counts), cols, counts


FIG6_COLUMNS = ["model", "method", "true_task", "chosen", "count", "row_total", "fraction", "published_fraction"]


def figure6(models: Sequence[str], cells: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike,
            pub=None) -> list[Path]:
    """Dispatch confusion matrices: one row per model, one panel per dispatch method -> [png, csv]."""
    import numpy as np

    from .published import published_value

    plt = _plt()
    methods = dispatch_methods()
    panels = [(model, method, mat) for model in models for method in methods
              if (mat := dispatch_matrix(cells, model, method))[0]]
    table: list[dict[str, Any]] = []
    if not panels:
        fig = _placeholder(plt, "6", "the dispatch field of t2-prompt / t2-cls result cells")
        return _finish(fig, plt, out_dir, "6", table, FIG6_COLUMNS)
    pmodels = list(dict.fromkeys(p[0] for p in panels))
    pmethods = [m for m in methods if any(p[1] == m for p in panels)]
    n_rows = max(len(p[2][0]) for p in panels)
    fig, axes = plt.subplots(len(pmodels), len(pmethods), squeeze=False, layout="constrained",
                             figsize=(5.2 * len(pmethods), (1.4 + 0.6 * n_rows) * len(pmodels)))
    for ax in axes.flat:
        ax.axis("off")
    for model, method, (rows, cols, counts) in panels:
        ax = axes[pmodels.index(model)][pmethods.index(method)]
        ax.axis("on")
        m = np.array([[counts[r].get(c, 0) for c in cols] for r in rows], dtype=float)
        frac = m / m.sum(axis=1, keepdims=True)
        ax.imshow(frac, vmin=0, vmax=1, cmap="Blues", aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(j, i, f"{frac[i, j]:.2f}", ha="center", va="center",
                        color="white" if frac[i, j] > 0.5 else "black", fontsize=8)
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), [TASK_LABELS.get(r, r) for r in rows])
        ax.set_xlabel("chosen expert")
        ax.set_ylabel("true task")
        ax.set_title(f"{MODEL_LABELS.get(model, model)} — {methods[method]}", fontsize=9)
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                pv = published_value("F6", model, method, r, category=c, df=pub) if pub is not None else None
                table.append({"model": model, "method": method, "true_task": r, "chosen": c,
                              "count": int(m[i, j]), "row_total": int(m[i].sum()), "fraction": frac[i, j],
                              "published_fraction": pv})
    fig.suptitle("Dispatch confusion (true task × chosen expert)")
    return _finish(fig, plt, out_dir, "6", table, FIG6_COLUMNS)


def read_alpha(path: str | os.PathLike) -> tuple[list[str], list[float], dict[str, Any]]:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"{p} is not valid JSON (line {e.lineno}: {e.msg}); re-run `t2eval fit-fewshot`") from None
    if not isinstance(d, dict) or "alpha" not in d:
        raise CorruptArtifactError(f"{p} has no 'alpha' field; expected {{\"alpha\": [...], \"experts\": [...]}}")
    experts = list(d.get("experts") or EXPERTS)
    return experts, normalised_alpha(d["alpha"], experts, str(p)), d


FIG7_COLUMNS = ["model", "task", "expert", "alpha_norm_pct", "published_pct", "stored_normalised"]


def alpha_rows(model: str, experts_dir: str | os.PathLike, pub=None) -> list[dict[str, Any]]:
    from .published import published_value

    root = Path(experts_dir) / model / "fewshot"
    files = {p.parent.name: p for p in root.glob("*/alpha.json")} if root.is_dir() else {}
    table = []
    for task in _task_order(files):
        experts, w, meta = read_alpha(files[task])
        for e, x in zip(experts, w):
            pv = published_value("F7", model, "t2-fewshot", task, category=e, df=pub) if pub is not None else None
            table.append({"model": model, "task": task, "expert": e, "alpha_norm_pct": 100 * x,
                          "published_pct": pv, "stored_normalised": meta.get("normalised")})
    return table


def figure7(models: Sequence[str], experts_dir: str | os.PathLike, out_dir: str | os.PathLike,
            pub=None) -> list[Path]:
    """α bars: one panel per model, grouped by task, published values hatched beside -> [png, csv]."""
    plt = _plt()
    data = {m: rows for m in models if (rows := alpha_rows(m, experts_dir, pub))}
    table = [r for rows in data.values() for r in rows]
    if not data:
        fig = _placeholder(plt, "7", f"{experts_dir}/<model>/fewshot/<task>/alpha.json")
        return _finish(fig, plt, out_dir, "7", table, FIG7_COLUMNS)
    ntask = max(len({r["task"] for r in rows}) for rows in data.values())
    fig, axes = plt.subplots(len(data), 1, figsize=(2.0 * ntask + 2.5, 3.2 * len(data)), squeeze=False,
                             layout="constrained")
    for ax, (model, rows) in zip(axes[:, 0], data.items()):
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        experts = list(dict.fromkeys(r["expert"] for r in rows))
        width = 0.8 / (2 * len(experts))
        for j, e in enumerate(experts):
            get = lambda t, k: next((r[k] for r in rows if r["task"] == t and r["expert"] == e), None)  # noqa: E731
            ours = [get(t, "alpha_norm_pct") or 0 for t in tasks]
            pubs = [get(t, "published_pct") for t in tasks]
            xs = [i + 2 * j * width - 0.4 + width / 2 for i in range(len(tasks))]
            ax.bar(xs, ours, width, color=f"C{j}", label=f"{e} (ours)")
            if any(v is not None for v in pubs):
                ax.bar([x + width for x in xs], [v or 0 for v in pubs], width, color=f"C{j}", alpha=0.45,
                       hatch="//", label=f"{e} (paper)")
        ax.set_xticks(range(len(tasks)), [TASK_LABELS.get(t, t) for t in tasks])
        ax.set_ylabel("normalised α (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"Few-shot α — {MODEL_LABELS.get(model, model)}", fontsize=9)
    return _finish(fig, plt, out_dir, "7", table, FIG7_COLUMNS)


def write_figures(cells: Sequence[Mapping[str, Any]], experts_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  models: Sequence[str] | None = None, published_csv: str | os.PathLike | None = None) -> list[Path]:
    """fig4_learning_curves, fig6_dispatch_confusion, fig7_alpha (.png + .csv; a placeholder PNG when a
    figure has no inputs yet) and `<out>/README.md`; returns the written paths."""
    from .published import load_published

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pub = load_published(published_csv)
    cells = [c for c in cells if c["task"] not in VLM_TASKS]  # VQA cells: `t2eval vlm-report` (Figure 5)
    if not models:
        ed = Path(experts_dir)
        on_disk = [p.name for p in sorted(ed.iterdir()) if p.is_dir()] if ed.is_dir() else []
        have = set(select_models(cells)) | set(on_disk)
        models = [m for m in MODELS if m in have] + sorted(have - set(MODELS))
    written: list[Path] = []
    lines = ["# Figures", "", "Generated by `t2eval figures`; each PNG has the CSV of its numbers beside it.", ""]
    for fig, paths in (("4", figure4(models, experts_dir, cells, out)), ("6", figure6(models, cells, out, pub)),
                       ("7", figure7(models, experts_dir, out, pub))):
        written += paths
        lines += [f"## Figure {fig}", "", f"![Figure {fig}]({paths[0].name})", "", caption(fig), "",
                  f"Data: [{paths[1].name}]({paths[1].name})", ""]
    written.append(write_text_atomic(out / "README.md", "\n".join(lines)))
    return written


# ----------------------------------------------------------------------------- CLI
CONFIG = FiguresConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, FiguresConfig)


def run(args: argparse.Namespace) -> int:
    from ..provenance import record, write_sidecar

    if Path(args.raw).is_dir():
        cells = collect(args.raw)
    else:
        log.warning("no raw results directory %s: figures 4 (base line) and 6 use no cells", args.raw)
        cells = []
    if not Path(args.experts).is_dir() and not cells:
        raise T2EvalError(f"neither {args.raw} nor {args.experts} exists; train experts / evaluate first or "
                          f"pass the right --raw / --experts directories")
    written = write_figures(cells, args.experts, args.out, args.models, args.published)
    write_sidecar(Path(args.out), record("figures", {"raw": str(args.raw), "experts": str(args.experts),
                                                     "models": args.models},
                                         inputs={c["_path"]: f"{c['correct']}/{c['total']}" for c in cells}))
    print(f"wrote {len(written)} files (figures 4, 6, 7 as PNG + CSV, README.md) to {args.out}")
    return 0
