# One result cell = one file: results/raw/{model}/{method}/{task}.json


def cell_inputs(wildcards):
    return P.cell_spec(CFG, wildcards.model, wildcards.method, wildcards.task).inputs


rule evaluate:
    input:
        unpack(cell_inputs),
    output:
        "results/raw/{model}/{method}/{task}.json",
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
