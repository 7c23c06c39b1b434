rule prepare_data:
    output:
        DATA_MANIFEST,
    params:
        mirror=f"--mirror {q(CFG['data']['mirror'])}" if CFG["data"]["mirror"] else "",
        out=DATA_DIR,
    log:
        "logs/prepare_data.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        ENV
    shell:
        "{T2} prepare-data {params.mirror} --out {params.out} 2> {log}"
