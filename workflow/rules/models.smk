rule prepare_model:
    output:
        P.model_marker("{model}"),
    params:
        src=lambda wc: CFG["model_paths"].get(wc.model, wc.model),
        dtype=lambda wc: model_opt(wc.model, "dtype"),
        out=lambda wc: P.model_dir(wc.model),
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
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} {T2} prepare-model {params.src} --out {params.out} --dtype {params.dtype} 2> {log}"
