# SVF experts (REINFORCE; Table 4 variants: t2eval.plan.SVF_VARIANTS) and the LoRA baseline
# (t2eval.plan.LORA_VARIANTS). Options not set in the config take the stage's defaults.
# *_seed: the same job for each further seed ({seed}; the first seed keeps the single-seed layout).
KL_SWEEP = CFG["train_svf"]["kl_sweep"]


def svf_svd(wildcards):
    targets = P.SVF_VARIANTS[wildcards.get("svf_variant", "svf")][0] or CFG["svd"]["targets"]
    return P.svd_path(wildcards.model, targets)


rule train_svf:
    input:
        model=P.model_marker("{model}"),
        svd=svf_svd,
        data=DATA_MANIFEST,
    output:
        z=P.svf_expert("{model}", "{task}", "{svf_variant}"),
        log=P.svf_log("{model}", "{task}", "{svf_variant}"),
    params:
        cmd=stage_cmd("train-svf"),
    log:
        "logs/train_svf/{model}/{svf_variant}/{task}.log",
    benchmark:
        "logs/bench/train_svf/{model}/{svf_variant}/{task}.tsv",
    threads: res("train", "threads", 1)
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        gpu=lambda wc: gpus("train", wc.model),
    conda:
        ENV
    shell:
        THREADS + " " + CODE_OPT_IN + "{params.cmd} 2> {log}"


use rule train_svf as train_svf_seed with:
    output:
        z=P.svf_expert("{model}", "{task}", "{svf_variant}", "{seed}"),
        log=P.svf_log("{model}", "{task}", "{svf_variant}", "{seed}"),
    log:
        "logs/train_svf/{model}/{svf_variant}/{task}.seed{seed}.log",
    benchmark:
        "logs/bench/train_svf/{model}/{svf_variant}/{task}.seed{seed}.tsv",


rule train_lora:
    input:
        model=P.model_marker("{model}"),
        data=DATA_MANIFEST,
    output:
        P.lora_marker("{model}", "{task}", "{lora_variant}"),
    params:
        cmd=stage_cmd("train-lora"),
    log:
        "logs/train_lora/{model}/{lora_variant}/{task}.log",
    benchmark:
        "logs/bench/train_lora/{model}/{lora_variant}/{task}.tsv",
    threads: res("train", "threads", 1)
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        gpu=lambda wc: gpus("train", wc.model),
    conda:
        ENV
    shell:
        THREADS + " " + CODE_OPT_IN + "{params.cmd} 2> {log}"


use rule train_lora as train_lora_seed with:
    output:
        P.lora_marker("{model}", "{task}", "{lora_variant}", "{seed}"),
    log:
        "logs/train_lora/{model}/{lora_variant}/{task}.seed{seed}.log",
    benchmark:
        "logs/bench/train_lora/{model}/{lora_variant}/{task}.seed{seed}.tsv",


# The paper's KL sweep (train_svf.kl_sweep, e.g. [0, 0.1, 0.2, 0.3]): one run per λ into
# experts/<model>/svf-kl<λ>/<task>/, then the best validation score becomes experts/<model>/svf/<task>/.
if KL_SWEEP:

    ruleorder: select_kl > train_svf
    ruleorder: select_kl_seed > train_svf_seed

    use rule train_svf as train_svf_kl with:
        output:
            z=P.svf_kl_dir("{model}", "{task}", "{kl}") + "/z.safetensors",
            log=P.svf_kl_dir("{model}", "{task}", "{kl}") + "/log.jsonl",
        wildcard_constraints:
            kl="[0-9.]+",
        log:
            "logs/train_svf/{model}/svf-kl{kl}/{task}.log",
        benchmark:
            "logs/bench/train_svf/{model}/svf-kl{kl}/{task}.tsv",

    rule select_kl:
        input:
            z=lambda wc: [f"{P.svf_kl_dir(wc.model, wc.task, k)}/z.safetensors" for k in KL_SWEEP],
            log=lambda wc: [f"{P.svf_kl_dir(wc.model, wc.task, k)}/log.jsonl" for k in KL_SWEEP],
        output:
            z=P.svf_expert("{model}", "{task}", "svf"),
            log=P.svf_log("{model}", "{task}", "svf"),
        params:
            cmd=stage_cmd("select-expert"),
        log:
            "logs/select_kl/{model}/{task}.log",
        conda:
            ENV
        shell:
            "{params.cmd} 2> {log}"

    use rule train_svf_kl as train_svf_kl_seed with:
        output:
            z=P.svf_kl_dir("{model}", "{task}", "{kl}", "{seed}") + "/z.safetensors",
            log=P.svf_kl_dir("{model}", "{task}", "{kl}", "{seed}") + "/log.jsonl",
        log:
            "logs/train_svf/{model}/svf-kl{kl}/{task}.seed{seed}.log",
        benchmark:
            "logs/bench/train_svf/{model}/svf-kl{kl}/{task}.seed{seed}.tsv",

    use rule select_kl as select_kl_seed with:
        input:
            z=lambda wc: [f"{P.svf_kl_dir(wc.model, wc.task, k, wc.seed)}/z.safetensors" for k in KL_SWEEP],
            log=lambda wc: [f"{P.svf_kl_dir(wc.model, wc.task, k, wc.seed)}/log.jsonl" for k in KL_SWEEP],
        output:
            z=P.svf_expert("{model}", "{task}", "svf", "{seed}"),
            log=P.svf_log("{model}", "{task}", "svf", "{seed}"),
        log:
            "logs/select_kl/{model}/{task}.seed{seed}.log",
