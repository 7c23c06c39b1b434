# One result cell = one file: results/raw/{model}/{method}/{task}.json (the first seed),
# results/raw/{model}/{method}/{task}.seed{seed}.json (each further seed, evaluate_seed)


def cell_inputs(wildcards):
    return P.cell_spec(CFG, wildcards.model, wildcards.method, wildcards.task, wildcards.get("seed")).inputs


rule evaluate:
    input:
        unpack(cell_inputs),
    output:
        P.cell_path("{model}", "{method}", "{task}"),
    params:
        cmd=stage_cmd("evaluate"),
    log:
        "logs/evaluate/{model}/{method}/{task}.log",
    benchmark:
        "logs/bench/evaluate/{model}/{method}/{task}.tsv",
    threads: res("evaluate", "threads", 1)
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=lambda wc: gpus("evaluate", wc.model),
    conda:
        ENV
    shell:
        THREADS + " {params.cmd} 2> {log}"


use rule evaluate as evaluate_seed with:
    output:
        P.cell_path("{model}", "{method}", "{task}", "{seed}"),
    log:
        "logs/evaluate/{model}/{method}/{task}.seed{seed}.log",
    benchmark:
        "logs/bench/evaluate/{model}/{method}/{task}.seed{seed}.tsv",
