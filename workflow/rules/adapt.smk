# Few-shot adaptation: CEM search of the expert mixture α on the 10 held-out prompts (PROTOCOL §6.3).
FS = CFG["fewshot"]


def _fewshot_inputs(wc):
    source = wc.get("source", wc.model)
    return {
        "model": P.model_marker(wc.model),
        "svd": P.svd_path(wc.model, CFG["svd"]["targets"]),
        "data": DATA_MANIFEST,
        **{f"expert_{t}": P.svf_expert(source, t) for t in P.TRAIN_TASKS},
    }


FIT_FEWSHOT_SHELL = (
    "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} {CODE_OPT_IN}{T2} fit-fewshot --model {params.model} --svd {input.svd} --experts {params.experts} --task {wildcards.task}"
    " --out {params.out} --data-dir {DATA_DIR} --iterations {FS[iterations]} --population {FS[population]}"
    " --elite {FS[elite]} --init-std {FS[init_std]} --per {FS[per]} {params.normalise}"
    " --max-new-tokens {FS[max_new_tokens]} --seed {CFG[seed]} --backend {params.backend} {params.cross} 2> {log}"
)


rule fit_fewshot:
    input:
        unpack(_fewshot_inputs),
    output:
        P.fewshot_alpha("{model}", "{task}"),
    params:
        model=lambda wc: P.model_dir(wc.model),
        out=lambda wc, output: os.path.dirname(output[0]),
        experts=lambda wc: P._experts_arg(wc.model),
        normalise="--normalise" if FS["normalise"] else "",
        backend=lambda wc: model_opt(wc.model, "backend"),
        cross="",
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
        FIT_FEWSHOT_SHELL


use rule fit_fewshot as fit_fewshot_cross_model with:
    output:
        P.fewshot_alpha("{model}", "{task}", "{source}"),
    params:
        model=lambda wc: P.model_dir(wc.model),
        out=lambda wc, output: os.path.dirname(output[0]),
        experts=lambda wc: P._experts_arg(wc.source),
        normalise="--normalise" if FS["normalise"] else "",
        backend=lambda wc: model_opt(wc.model, "backend"),
        cross="--allow-cross-model",
    log:
        "logs/fit_fewshot/{model}/from-{source}/{task}.log",
    benchmark:
        "logs/bench/fit_fewshot/{model}/from-{source}/{task}.tsv",
