# Asclepius-R from MIMIC-III NOTEEVENTS.csv to the PhysioNet release, stage by stage.
#   snakemake --cores all --resources gpu=8                       (the paper run, config.yaml)
#   snakemake --configfile demo/config.yaml --cores all           (the embedded demo)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/notes.smk"
include: "rules/instructions.smk"
include: "rules/base_model.smk"
include: "rules/pretrain.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/plan.smk"
include: "rules/release.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
