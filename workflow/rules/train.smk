# SVF experts (REINFORCE; Table 4 variants) and the LoRA baseline.
SVF_VARIANT = {  # variant -> (svd targets, objective)
    "svf": (CFG["svd"]["targets"], "pg"),
    "svf-attn": ("attn", "pg"),
    "svf-mlp+attn": ("mlp+attn", "pg"),
    "svf-ntp": ("attn", "ntp"),
}
LORA_VARIANT = {  # variant -> (targets, objective)
    "lora": ("attn", "ntp"),
    "lora-pg": ("attn", "pg"),
    "lora-mlp+attn": ("mlp+attn", "ntp"),
}
TS = CFG["train_svf"]
TL = CFG["train_lora"]


def _limit(flag, value):
    return f"{flag} {value}" if value is not None else ""


rule train_svf:
    input:
        model=P.model_marker("{model}"),
        svd=lambda wc: P.svd_path(wc.model, SVF_VARIANT[wc.svf_variant][0]),
        data=DATA_MANIFEST,
    output:
        z=P.svf_expert("{model}", "{task}", "{svf_variant}"),
        log=P.svf_log("{model}", "{task}", "{svf_variant}"),
    params:
        model=lambda wc: P.model_dir(wc.model),
        out=lambda wc, output: os.path.dirname(output[0]),
        objective=lambda wc: SVF_VARIANT[wc.svf_variant][1],
        backend=lambda wc: model_opt(wc.model, "backend"),
        eval_limit=_limit("--eval-limit", TS["eval_limit"]),
        kl=TS["kl_coef"],
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
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} {CODE_OPT_IN}{T2} train-svf --model {params.model} --svd {input.svd} --task {wildcards.task} --out {params.out}"
        " --data-dir {DATA_DIR} --objective {params.objective} --iterations {TS[iterations]}"
        " --batch-size {TS[batch_size]} --micro-batch {TS[micro_batch]} --max-new-tokens {TS[max_new_tokens]}"
        " --eval-every {TS[eval_every]} {params.eval_limit} --eval-splits {TS[eval_splits]} --kl-coef {params.kl}"
        " --optimizer {TS[optimizer]}"
        " --param {TS[param]} --lr {TS[lr]} --seed {CFG[seed]} --backend {params.backend} 2> {log}"


rule train_lora:
    input:
        model=P.model_marker("{model}"),
        data=DATA_MANIFEST,
    output:
        P.lora_marker("{model}", "{task}", "{lora_variant}"),
    params:
        model=lambda wc: P.model_dir(wc.model),
        out=lambda wc: P.lora_adapter(wc.model, wc.task, wc.lora_variant),
        targets=lambda wc: LORA_VARIANT[wc.lora_variant][0],
        objective=lambda wc: LORA_VARIANT[wc.lora_variant][1],
        eval_limit=_limit("--eval-limit", TL["eval_limit"]),
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
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} {CODE_OPT_IN}{T2} train-lora --model {params.model} --task {wildcards.task} --out {params.out} --data-dir {DATA_DIR}"
        " --targets {params.targets} --objective {params.objective} --iterations {TL[iterations]}"
        " --batch-size {TL[batch_size]} --micro-batch {TL[micro_batch]} --lr {TL[lr]} --eval-every {TL[eval_every]}"
        " {params.eval_limit} --eval-splits {TL[eval_splits]} --max-new-tokens {TL[max_new_tokens]} --seed {CFG[seed]}"
        " 2> {log}"


# The paper's KL sweep (train_svf.kl_sweep, e.g. [0, 0.1, 0.2, 0.3]): one run per λ into
# experts/<model>/svf-kl<λ>/<task>/, then the best validation score becomes experts/<model>/svf/<task>/.
if TS["kl_sweep"]:

    ruleorder: select_kl > train_svf

    use rule train_svf as train_svf_kl with:
        input:
            model=P.model_marker("{model}"),
            svd=lambda wc: P.svd_path(wc.model, CFG["svd"]["targets"]),
            data=DATA_MANIFEST,
        output:
            z="experts/{model}/svf-kl{kl}/{task}/z.safetensors",
            log="experts/{model}/svf-kl{kl}/{task}/log.jsonl",
        params:
            model=lambda wc: P.model_dir(wc.model),
            out=lambda wc, output: os.path.dirname(output[0]),
            objective="pg",
            backend=lambda wc: model_opt(wc.model, "backend"),
            eval_limit=_limit("--eval-limit", TS["eval_limit"]),
            kl=lambda wc: wc.kl,
        wildcard_constraints:
            kl="[0-9.]+",
        log:
            "logs/train_svf/{model}/svf-kl{kl}/{task}.log",
        benchmark:
            "logs/bench/train_svf/{model}/svf-kl{kl}/{task}.tsv",

    rule select_kl:
        input:
            z=lambda wc: [f"experts/{wc.model}/svf-kl{k}/{wc.task}/z.safetensors" for k in TS["kl_sweep"]],
            log=lambda wc: [f"experts/{wc.model}/svf-kl{k}/{wc.task}/log.jsonl" for k in TS["kl_sweep"]],
        output:
            z=P.svf_expert("{model}", "{task}", "svf"),
            log=P.svf_log("{model}", "{task}", "svf"),
        params:
            dirs=lambda wc, input: " ".join(os.path.dirname(z) for z in input.z),
            out=lambda wc, output: os.path.dirname(output.z),
        log:
            "logs/select_kl/{model}/{task}.log",
        conda:
            ENV
        shell:
            "{T2} select-expert --candidates {params.dirs} --out {params.out} 2> {log}"
