rule decompose:
    input:
        model=P.model_marker("{model}"),
    output:
        P.svd_path("{model}", "{targets}"),
    params:
        model=lambda wc: P.model_dir(wc.model),
        layers=lambda wc: model_opt(wc.model, "svd_layers"),
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
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} {T2} decompose --model {params.model} --targets {wildcards.targets} --layers {params.layers}"
        " --out {output} 2> {log}"
