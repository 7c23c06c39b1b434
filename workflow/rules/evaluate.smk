# One result cell = one file: results/raw/{model}/{method}/{task}.json
EV = CFG["evaluate"]


def _cell_inputs(wc):
    return P.cell_spec(CFG, wc.model, wc.method, wc.task).inputs


def _cell_args(wc):
    spec = P.cell_spec(CFG, wc.model, wc.method, wc.task)
    args = {"backend": model_opt(wc.model, "backend"), "dtype": model_opt(wc.model, "dtype"),
            "device": CFG["device"], "batch_size": EV["batch_size"], **spec.model_args}
    if EV["max_new_tokens"] is not None and "dispatch" in spec.model_args:
        args["cls_max_new_tokens"] = EV["max_new_tokens"]  # the first pass gets the same cap
    if model_opt(wc.model, "tensor_parallel_size") > 1:
        args["tensor_parallel_size"] = model_opt(wc.model, "tensor_parallel_size")
    opts = [f"--split {spec.split}", f"--model-args {q(P.format_model_args(args))}"]
    if EV["limit"] is not None:
        opts.append(f"--limit {EV['limit']}")
    if EV["max_new_tokens"] is not None:
        opts.append(f"--gen-kwargs max_gen_toks={EV['max_new_tokens']}")
    if CFG["allow_code_execution"]:
        opts.append("--allow-code-execution")
    return " ".join(opts)


rule evaluate:
    input:
        unpack(_cell_inputs),
    output:
        "results/raw/{model}/{method}/{task}.json",
    params:
        model=lambda wc: P.model_dir(wc.model),
        opts=_cell_args,
    log:
        "logs/evaluate/{model}/{method}/{task}.log",
    benchmark:
        "logs/bench/evaluate/{model}/{method}/{task}.tsv",
    threads: res("evaluate", "threads", 1)
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=lambda wc: gpus("evaluate", wc.model),
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} {T2} evaluate --model {params.model} --method {wildcards.method} --task {wildcards.task}"
        " --data-dir {DATA_DIR} --out {output} {params.opts} 2> {log}"
