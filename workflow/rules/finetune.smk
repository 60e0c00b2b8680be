# Four stages, one per mode × init (stages.training_stage): fine-tuning or linear evaluation, from
# a random or the pretrained encoder; each a job per run × seed of its list in finetune.runs.
# Snakemake evaluates a rule's shell command again when the job runs, after this loop has moved
# on, so the command travels as a param bound to its stage (job_command), not as `stage.…`.
for stage in training_stages():

    rule:
        name:
            stage.name
        input:
            **stage_input(stage.name),
        output:
            **stage_output(stage.name),
        log:
            "logs/finetune/{run}/seed-{seed}.log",
        benchmark:
            "logs/benchmarks/finetune_{run}_seed-{seed}.tsv"
        wildcard_constraints:
            run=run_names(stage.name),
        threads: node_threads(config["finetune"]["threads"])
        resources:
            gpu=1,  # the plugin's form: sbatch --gpus=1; 0 on a site without GPUs
            mem_mb=node_mem_mb(8000),
        params:
            declared=stage_params(stage.name),
            command=job_command(stage.name),
        shell:
            "{params.command} > {log} 2>&1"
