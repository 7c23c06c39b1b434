rule prepare_data:
    output:
        DATA_MANIFEST,
    params:
        cmd=stage_cmd("prepare-data"),
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
        THREADS + " {params.cmd} 2> {log}"
