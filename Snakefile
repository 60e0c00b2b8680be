# cola-audio: COLA pretraining on FMA and genre fine-tuning, as one reproducible workflow.
# Reads as a table of contents: every rule runs one stage of the table in src/cola_audio/stages.py
# (which dvc.yaml is rendered from), every knob is in params.yaml.
from snakemake.utils import min_version

min_version("9.0")


configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/tasks.smk"
include: "workflow/rules/report.smk"


rule all:
    """Every stage's outputs, not just the report's: Snakemake lets an intermediate file be
    missing while everything after it is up to date (as if it were temp()), so a lost shard would
    never be rebuilt; as targets, missing ones are (as `dvc repro` does)."""
    input:
        dvc_sync,
        all_outputs(config),
