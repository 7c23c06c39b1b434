rule prepare_data:
    output:
        DATA_MANIFEST,
    params:
        mirror=f"--mirror {q(CFG['data']['mirror'])}" if CFG["data"]["mirror"] else "",
        out=DATA_DIR,
    log:
        "logs/prepare_data.log",
    benchmark:
        "logs/bench/prepare_data.tsv",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} {T2} prepare-data {params.mirror} --out {params.out} 2> {log}"
