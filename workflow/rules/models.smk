rule prepare_model:
    input:
        lambda wc: P.model_requires(wc.model),
    output:
        P.model_marker("{model}"),
    params:
        cmd=stage_cmd("prepare-model"),
    log:
        "logs/prepare_model/{model}.log",
    benchmark:
        "logs/bench/prepare_model/{model}.tsv",
    threads: res("prepare", "threads", 1)
    resources:
        mem_mb=res("prepare", "mem_mb"),
        runtime=res("prepare", "runtime"),
    conda:
        ENV
    shell:
        THREADS + " {params.cmd} 2> {log}"
