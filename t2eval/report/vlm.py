"""The vision-language experiment's outputs (the paper's Figure 5): `table_vlm.{md,csv,tex}` and
`fig5_vlm.{png,csv}` from raw result cells of VQA tasks, `t2eval vlm-report`.

Per VLM model, method (base, svf, lora) and VQA task: the mean VQA accuracy (%) over the scored questions
(per question the 10-annotator accuracy, 0/.3/.6/.9/1 — `t2eval.tasks.vqa`), pooled over seed replicates,
with a percentile-bootstrap 95% CI over questions; the seeds' mean±sd; and, against the base model on the
same questions, the difference in points (paired bootstrap 95% CI), a paired sign-flip permutation p
(VQA accuracy is not 0/1, so McNemar does not apply; with several seeds the largest p) and the relative
gain (score / base − 1) — the quantity the paper states for Figure 5 (">39%" on TextVQA for
Llama3-LLaVA-NeXT-8B; its bars carry no printed values, so the text claim is what `results/published/`
holds). A cell's per-question outcome is `per_sample[i]["accuracy"]` (else its `correct`).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..constants import VLM_TASK_LABELS, VLM_TASKS
from ..errors import T2EvalError
from ..results import collect, replicates
from . import stats
from ..stage_config import opt
from .cli import ReportConfig, add_config_arguments, write_text_atomic

log = logging.getLogger(__name__)

VLM_METHODS: dict[str, str] = {"base": "Base", "svf": "SVF", "lora": "LoRA"}
VQA_TASK_LABELS: dict[str, str] = {t: VLM_TASK_LABELS[t] for t in VLM_TASKS}
FILES = {"table": "table_vlm", "figure": "fig5_vlm"}
PUBLISHED_TABLE = "text4.2"  # the paper's sentence on Figure 5 (relative gain over the base VLM)
COLUMNS = ["model", "method", "task", "status", "n_docs", "n_seeds", "seeds", "score_pct", "ci_low_pct",
           "ci_high_pct", "seed_scores_pct", "seed_mean_pct", "seed_sd_pct", "base_pct", "rel_gain_pct",
           "diff_base_pp", "diff_base_ci_low_pp", "diff_base_ci_high_pp", "perm_p", "perm_p_seeds", "significant",
           "published_rel_gain", "note", "paths"]


def outcomes(cell: Mapping[str, Any]) -> dict[Any, float]:
    """{doc_id: outcome in [0, 1]} of one cell: the VQA accuracy where recorded, else 0/1 correctness."""
    return {s["doc_id"]: float(s["accuracy"] if s.get("accuracy") is not None else s["correct"])
            for s in cell["per_sample"]}


def _pooled(reps: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[float], list[float]]:
    """(doc ids, per-document outcome averaged over seeds, each seed's mean score in %)."""
    outs = [outcomes(c) for c in reps]
    ids = list(outs[0])
    for o, c in zip(outs[1:], reps[1:]):
        if set(o) != set(ids):
            raise T2EvalError(f"seed replicates of {c['model']}/{c['method']}/{c['task']} were scored on "
                              f"different questions ({len(o)} vs {len(ids)}); re-run them with the same --limit")
    per_doc = [sum(o[i] for o in outs) / len(outs) for i in ids]
    return ids, per_doc, [100 * sum(o.values()) / len(o) for o in outs]


def _note(reps: Sequence[Mapping[str, Any]]) -> str:
    notes = {n for c in reps for n in [(c.get("provenance") or {}).get("vlm_note") or c.get("note")] if n}
    return "; ".join(sorted(notes))


def vlm_entries(cells: Sequence[Mapping[str, Any]], models: Sequence[str] | None = None, pub=None,
                n_boot: int = 10000) -> list[dict[str, Any]]:
    """One dict per (VLM model, method, VQA task) that has cells (see the module docstring)."""
    reps_of = replicates([c for c in cells if c["task"] in VQA_TASK_LABELS and c["method"] in VLM_METHODS])
    have = sorted({m for m, _, _ in reps_of})
    models = [m for m in (models or have) if m in have]
    out = []
    for model in models:
        for task in VQA_TASK_LABELS:
            base = reps_of.get((model, "base", task))
            base_ids, base_doc, _ = _pooled(base) if base else (None, None, None)
            for method in VLM_METHODS:
                reps = reps_of.get((model, method, task))
                if not reps:
                    continue
                ids, per_doc, seed_scores = _pooled(reps)
                mean_sd = stats.seed_mean_sd(seed_scores)
                score = sum(per_doc) / len(per_doc)
                # bootstrap CI of the mean accuracy: the paired bootstrap against a zero baseline
                _, lo, hi = stats.paired_bootstrap_ci([0.0] * len(per_doc), per_doc, n_boot=n_boot)
                e: dict[str, Any] = {c: None for c in COLUMNS}
                e.update(model=model, method=method, task=task, status="ok", n_docs=len(ids), n_seeds=len(reps),
                         seeds=";".join("first" if c.get("_seed") is None else str(c["_seed"]) for c in reps),
                         score_pct=100 * score, ci_low_pct=100 * lo, ci_high_pct=100 * hi,
                         seed_scores_pct=";".join(f"{x:.6g}" for x in seed_scores), seed_mean_pct=mean_sd[0],
                         seed_sd_pct=mean_sd[1], note=_note(reps), paths=";".join(str(c.get("_path", "")) for c in reps))
                if base and method != "base":
                    if set(ids) != set(base_ids):
                        e["note"] = "; ".join(x for x in (e["note"], "no paired test: not the base cell's questions") if x)
                    else:
                        b = dict(zip(base_ids, base_doc))
                        a_aligned = [b[i] for i in ids]
                        base_score = sum(a_aligned) / len(a_aligned)
                        diff, dlo, dhi = stats.paired_bootstrap_ci(a_aligned, per_doc, n_boot=n_boot)
                        base_one = outcomes(base[0])
                        seed_outs = [outcomes(c) for c in reps]
                        ps = [stats.paired_permutation_p([base_one[i] for i in ids], [o[i] for i in ids])
                              for o in seed_outs]
                        e.update(base_pct=100 * base_score, diff_base_pp=100 * diff, diff_base_ci_low_pp=100 * dlo,
                                 diff_base_ci_high_pp=100 * dhi, perm_p=max(ps),
                                 perm_p_seeds=";".join(f"{p:.6g}" for p in ps),
                                 significant=all(p < stats.ALPHA for p in ps),
                                 rel_gain_pct=100 * (score / base_score - 1) if base_score > 0 else None)
                elif method == "base":
                    e["base_pct"] = 100 * score
                e["published_rel_gain"] = _published_gain(pub, model, method, task)
                out.append(e)
    return out


def _published_gain(pub, model: str, method: str, task: str) -> str | None:
    if pub is None:
        return None
    sel = pub[(pub["table"] == PUBLISHED_TABLE) & (pub["model"] == model) & (pub["method"] == method)
              & (pub["task"] == task)]
    if sel.empty:
        return None
    row = sel.iloc[0]
    return row["value_text"] or f"{row['value']:g}%"


def published_claims(pub) -> list[str]:
    """The paper's Figure 5 statements (for captions): '>39% relative gain (L3-LLaVA-NeXT-8B, TextVQA)'."""
    if pub is None:
        return []
    sel = pub[pub["table"] == PUBLISHED_TABLE]
    return [f"{r['value_text'] or r['value']} {r['metric_label']} of {r['method_label']} "
            f"({r['model_label']}, {r['task_label']})" for _, r in sel.iterrows()]


# ----------------------------------------------------------------------------- rendering
def _f(x, nd=2, sign=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _ours(e: Mapping[str, Any]) -> str:
    s = f"{_f(e['score_pct'])} [{_f(e['ci_low_pct'], 1)}, {_f(e['ci_high_pct'], 1)}] (n={e['n_docs']})"
    if e["n_seeds"] > 1:
        s += f" {_f(e['seed_mean_pct'])}±{_f(e['seed_sd_pct'])} ({e['n_seeds']} seeds)"
    return s


def _vs_base(e: Mapping[str, Any]) -> str:
    if e["method"] == "base" or e["diff_base_pp"] is None:
        return ""
    star = "*" if e["significant"] else ""
    gain = f"{_f(e['rel_gain_pct'], 1, sign=True)}%" if e["rel_gain_pct"] is not None else "—"
    return (f"Δ {_f(e['diff_base_pp'], sign=True)} [{_f(e['diff_base_ci_low_pp'], 1, sign=True)}, "
            f"{_f(e['diff_base_ci_high_pp'], 1, sign=True)}] p={e['perm_p']:.3g}{star}; relative {gain}")


CAPTION = ("Mean VQA accuracy % over the scored questions [95% bootstrap CI] (n questions); several seeds: pooled, "
           "then mean±sd of the seeds. Versus base on the same questions: Δ in points [paired bootstrap 95% CI], "
           f"p = {stats.PERMUTATION_TEST_NAME} (several seeds: the largest p); * = significant at 5% (in every seed); "
           "relative = score / base − 1 (the paper's Figure 5 quantity).")


def render_md(entries: Sequence[Mapping[str, Any]], pub=None) -> str:
    parts = ["# Figure 5 / VLM table — SVF on a vision-language model (VQA accuracy)", "", CAPTION, ""]
    claims = published_claims(pub)
    if claims:
        parts += ["Paper: " + "; ".join(claims) + " (its bars print no values).", ""]
    if not entries:
        return "\n".join(parts + ["(no VQA result cells yet)", ""])
    for model in dict.fromkeys(e["model"] for e in entries):
        ents = [e for e in entries if e["model"] == model]
        parts += [f"## `{model}`", "", "| Task | Method | ours | vs base | paper |", "|---|---|---|---|---|"]
        for e in ents:
            parts.append(f"| {VQA_TASK_LABELS[e['task']]} | {VLM_METHODS[e['method']]} | {_ours(e)} | {_vs_base(e)} | "
                         f"{e['published_rel_gain'] or ''} |")
        notes = sorted({e["note"] for e in ents if e["note"]})
        parts += [""] + [f"Note: {n}." for n in notes] + ([""] if notes else [])
    return "\n".join(parts)


def _tex(s: str) -> str:
    return s.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def render_tex(entries: Sequence[Mapping[str, Any]], pub=None) -> str:
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\caption{" + _tex("SVF on a vision-language model. " + CAPTION
                                 + (" Paper: " + "; ".join(published_claims(pub)) + "." if pub is not None else ""))
             + "}", r"\label{tab:t2eval-vlm}", r"\begin{tabular}{llcc}", r"\toprule",
             r"Task & Method & VQA acc. \% & $\Delta$ vs base (rel.) \\", r"\midrule"]
    for e in entries:
        ours = f"{e['score_pct']:.2f} {{\\scriptsize[{e['ci_low_pct']:.1f}, {e['ci_high_pct']:.1f}]}}"
        vs = "--"
        if e["method"] != "base" and e["diff_base_pp"] is not None:
            vs = f"{e['diff_base_pp']:+.2f}" + (r"$^*$" if e["significant"] else "")
            if e["rel_gain_pct"] is not None:
                vs += f" ({e['rel_gain_pct']:+.1f}\\%)"
        lines.append(f"{_tex(VQA_TASK_LABELS[e['task']])} ({_tex(e['model'])}) & {VLM_METHODS[e['method']]} & "
                     f"{ours} & {vs} \\\\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def _write_csv(path: Path, entries: Sequence[Mapping[str, Any]]) -> Path:
    import pandas as pd

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pd.DataFrame(list(entries), columns=COLUMNS).to_csv(tmp, index=False, float_format="%.10g")
    os.replace(tmp, path)
    return path


def figure5(entries: Sequence[Mapping[str, Any]], out_dir: Path, pub=None) -> list[Path]:
    """Grouped bars per (model, task): base / SVF / LoRA with 95% CIs, the relative gain over the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((e["model"], e["task"]) for e in entries))
    fig, ax = plt.subplots(figsize=(max(4.0, 2.2 * len(groups) + 1), 3.4))
    if not groups:
        ax.axis("off")
        ax.text(0.5, 0.5, "Figure 5: no VQA result cells yet", ha="center", va="center")
    width = 0.8 / len(VLM_METHODS)
    for j, method in enumerate(VLM_METHODS):
        xs, ys, err = [], [], [[], []]
        for i, g in enumerate(groups):
            e = next((x for x in entries if (x["model"], x["task"]) == g and x["method"] == method), None)
            if e is None:
                continue
            x = i + (j - (len(VLM_METHODS) - 1) / 2) * width
            xs.append(x)
            ys.append(e["score_pct"])
            err[0].append(e["score_pct"] - e["ci_low_pct"])
            err[1].append(e["ci_high_pct"] - e["score_pct"])
            if e["rel_gain_pct"] is not None:
                label = f"{e['rel_gain_pct']:+.0f}%" + ("*" if e["significant"] else "")
                ax.text(x, e["ci_high_pct"] + 1, label, ha="center", va="bottom", fontsize=7)
        if xs:
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=VLM_METHODS[method])
    if groups:
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{VQA_TASK_LABELS[t]}\n{m}" for m, t in groups], fontsize=7)
        ax.set_ylabel("VQA accuracy (%)")
        ax.legend(fontsize=7)
        claims = published_claims(pub)
        ax.set_title("Figure 5: SVF on a VLM" + (f" (paper: {claims[0]})" if claims else ""), fontsize=8)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{FILES['figure']}.png"
    tmp = png.with_name(f".{png.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    os.replace(tmp, png)
    plt.close(fig)
    return [png, _write_csv(out_dir / f"{FILES['figure']}.csv", entries)]


def write_vlm(cells: Sequence[Mapping[str, Any]], tables_dir: str | os.PathLike, figures_dir: str | os.PathLike,
              models: Sequence[str] | None = None, published_csv: str | os.PathLike | None = None) -> list[Path]:
    from .published import load_published

    pub = load_published(published_csv)
    entries = vlm_entries(cells, models, pub)
    t = Path(tables_dir)
    t.mkdir(parents=True, exist_ok=True)
    stem = t / FILES["table"]
    written = [write_text_atomic(stem.with_suffix(".md"), render_md(entries, pub)),
               write_text_atomic(stem.with_suffix(".tex"), render_tex(entries, pub)),
               _write_csv(stem.with_suffix(".csv"), entries)]
    return written + figure5(entries, Path(figures_dir), pub)


# ----------------------------------------------------------------------------- CLI
@dataclass
class VlmReportConfig(ReportConfig):
    """Options of `t2eval vlm-report`."""

    tables: str = opt("results/tables", help="where table_vlm.{md,csv,tex} go")
    figures: str = opt("results/figures", help="where fig5_vlm.{png,csv} go")


CONFIG = VlmReportConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, VlmReportConfig)


def run(args: argparse.Namespace) -> int:
    cells = collect(args.raw) if Path(args.raw).is_dir() else []
    if not any(c["task"] in VQA_TASK_LABELS for c in cells):
        log.warning("no VQA result cells under %s: Figure 5 and the VLM table are empty", args.raw)
    written = write_vlm(cells, args.tables, args.figures, args.models, args.published)
    print(f"wrote {len(written)} files ({', '.join(p.name for p in written)})")
    return 0
