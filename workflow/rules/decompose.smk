rule decompose:
    input:
        model=P.model_marker("{model}"),
    output:
        P.svd_path("{model}", "{targets}"),
    params:
        cmd=stage_cmd("decompose"),
    log:
        "logs/decompose/{model}-{targets}.log",
    benchmark:
        "logs/bench/decompose/{model}-{targets}.tsv",
    threads: res("decompose", "threads", 1)
    resources:
        mem_mb=res("decompose", "mem_mb"),
        runtime=res("decompose", "runtime"),
    conda:
        ENV
    shell:
        THREADS + " {params.cmd} 2> {log}"
