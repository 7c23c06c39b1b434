# Tables and figures from raw results only; wired into `snakemake --report`.
localrules:
    tables,
    figures,


rule tables:
    input:
        [c.path for c in CELLS if not P.is_vlm(CFG, c.model)],
    output:
        [report(f, category="Tables", caption="../report/tables.rst") if f.endswith(".md") else f for f in TABLES],
    params:
        cmd=stage_cmd("tables"),
    log:
        "logs/tables.log",
    benchmark:
        "logs/bench/tables.tsv",
    conda:
        ENV
    shell:
        THREADS + " {params.cmd} 2> {log}"


def figure_inputs(wildcards):
    # every seed's α and SVF training logs (Figure 4: one learning curve per seed plus the mean)
    tags = [P.seed_tag(CFG, k) for k in P.seeds(CFG)]
    alphas = [P.fewshot_alpha(m, t, seed=s) for s in tags for m in CFG["models"] for t in CFG["fewshot"]["tasks"]
              if "t2-fewshot" in CFG["evaluate"]["methods"]]
    experts = [P.svf_expert(m, t, seed=s) for s in tags for m in CFG["models"] for t in CFG["train_svf"]["tasks"]]
    return {"cells": [c.path for c in CELLS if not P.is_vlm(CFG, c.model)], "experts": experts, "alphas": alphas}


rule figures:
    input:
        unpack(figure_inputs),
    output:
        report(FIGURES[0], category="Figures", caption="../report/fig4.rst"),
        report(FIGURES[1], category="Figures", caption="../report/fig6.rst"),
        report(FIGURES[2], category="Figures", caption="../report/fig7.rst"),
    params:
        cmd=stage_cmd("figures"),
    log:
        "logs/figures.log",
    benchmark:
        "logs/bench/figures.tsv",
    conda:
        ENV
    shell:
        THREADS + " {params.cmd} 2> {log}"
