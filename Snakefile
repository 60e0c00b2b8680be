# cola-audio: COLA pretraining on FMA and genre fine-tuning, as one reproducible workflow.
# Reads as a table of contents; every rule calls the `cola` CLI, every knob is in params.yaml.
from snakemake.utils import min_version

min_version("9.0")


configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        get_final_output(),
