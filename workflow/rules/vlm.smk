# The vision-language experiment (the paper's Figure 5; config block `vlm:`). Its jobs are the ordinary
# rules: prepare_model (smollm2-llava after smollm2-135m), prepare_data (+ the VQA datasets), decompose
# (the language model's MLPs of vlm.svd_layers), train_svf on vlm.train_task, evaluate per cell
# (results/raw/<vlm>/<method>/<task>.json, the t2 model in multimodal mode); this file adds the report.
if VLM_OUTPUTS:

    localrules:
        vlm_report,


    def vlm_cells():
        return [c.path for c in CELLS if P.is_vlm(CFG, c.model)]


    rule vlm_report:
        input:
            cells=vlm_cells(),
        output:
            [report(f, category="VLM (Figure 5)", caption="../report/fig5.rst") if f.endswith((".md", ".png")) else f
             for f in VLM_OUTPUTS],
        params:
            cmd=stage_cmd("vlm-report"),
        log:
            "logs/vlm_report.log",
        benchmark:
            "logs/bench/vlm_report.tsv",
        conda:
            ENV
        shell:
            THREADS + " {params.cmd} 2> {log}"
