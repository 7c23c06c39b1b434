# Few-shot adaptation: CEM search of the expert mixture α on the 10 held-out prompts (PROTOCOL §6.3).
# fit_fewshot_cross_model (Table 5) mixes the experts of another model ({source}): --allow-cross-model.
# *_seed: the same for each further seed ({seed}), over that seed's experts.


def fewshot_inputs(wildcards):
    source = wildcards.get("source", wildcards.model)
    return {
        "model": P.model_marker(wildcards.model),
        "svd": P.svd_path(wildcards.model, CFG["svd"]["targets"]),
        "data": DATA_MANIFEST,
        **{f"expert_{t}": P.svf_expert(source, t, seed=wildcards.get("seed")) for t in P.TRAIN_TASKS},
    }


rule fit_fewshot:
    input:
        unpack(fewshot_inputs),
    output:
        P.fewshot_alpha("{model}", "{task}"),
    params:
        cmd=stage_cmd("fit-fewshot"),
    log:
        "logs/fit_fewshot/{model}/{task}.log",
    benchmark:
        "logs/bench/fit_fewshot/{model}/{task}.tsv",
    threads: res("fewshot", "threads", 1)
    resources:
        mem_mb=res("fewshot", "mem_mb"),
        runtime=res("fewshot", "runtime"),
        gpu=lambda wc: gpus("fewshot", wc.model),
    conda:
        ENV
    shell:
        THREADS + " {params.cmd} 2> {log}"


use rule fit_fewshot as fit_fewshot_cross_model with:
    output:
        P.fewshot_alpha("{model}", "{task}", "{source}"),
    log:
        "logs/fit_fewshot/{model}/from-{source}/{task}.log",
    benchmark:
        "logs/bench/fit_fewshot/{model}/from-{source}/{task}.tsv",


use rule fit_fewshot as fit_fewshot_seed with:
    output:
        P.fewshot_alpha("{model}", "{task}", seed="{seed}"),
    log:
        "logs/fit_fewshot/{model}/{task}.seed{seed}.log",
    benchmark:
        "logs/bench/fit_fewshot/{model}/{task}.seed{seed}.tsv",


use rule fit_fewshot as fit_fewshot_cross_model_seed with:
    output:
        P.fewshot_alpha("{model}", "{task}", "{source}", "{seed}"),
    log:
        "logs/fit_fewshot/{model}/from-{source}/{task}.seed{seed}.log",
    benchmark:
        "logs/bench/fit_fewshot/{model}/from-{source}/{task}.seed{seed}.tsv",
