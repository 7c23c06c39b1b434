# t2eval: the Transformer² reproduction DAG.
#   laptop (embedded default): snakemake --cores all
#   GPU machines:              snakemake --cores all --use-conda --configfile workflow/config/paper.yaml
#   SLURM:                     snakemake --workflow-profile workflow/profiles/slurm --configfile workflow/config/paper.yaml
#   one cell:                  snakemake results/raw/<model>/<method>/<task>.json
#   interrupted:               the same command again (profiles/default, loaded by Snakemake itself, sets
#                              --rerun-incomplete; trainers resume from their checkpoints); after a hard
#                              kill (SIGKILL, power loss) first: snakemake --unlock
from snakemake.utils import min_version

min_version("9.0")

# the embedded default only when no --configfile is given: Snakemake would otherwise merge paper.yaml over it, and
# the paper DAG would inherit the laptop budgets (several --configfile files still merge with each other, e.g.
# paper.yaml + paper-kl-sweep.yaml)
if not workflow.overwrite_configfiles:

    configfile: "workflow/config/default.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/decompose.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/adapt.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/vlm.smk"


# the cells are listed too: a deleted cell is then rebuilt (with the tables and figures made from it)
# instead of being treated as a removable intermediate of up-to-date tables
rule all:
    input:
        [c.path for c in CELLS],
        TABLES if CFG["models"] else [],
        FIGURES if CFG["models"] else [],
        VLM_OUTPUTS,
