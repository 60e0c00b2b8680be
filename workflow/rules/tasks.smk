# Downstream tasks (params `tasks`), each a job per task in every stage: its clips and split,
# one vector per clip from each encoder, linear probes per label fraction × seed.


rule task_data:
    """One task's labelled clips and split; validation/test audio pretraining saw left out."""
    input:
        **stage_input("task_data"),
    output:
        **stage_output("task_data"),
    log:
        "logs/tasks/{task}/data.log",
    benchmark:
        "logs/benchmarks/task_data_{task}.tsv"
    wildcard_constraints:
        task=task_names(),
    threads: 1
    resources:
        mem_mb=node_mem_mb(2000),
    params:
        declared=stage_params("task_data"),
        folder_files=task_listing,  # a folder task's files themselves
    shell:
        stage_shell("task_data")


for stage in (STAGES["embed_pretrained"], STAGES["embed_random"]):

    rule:
        name:
            stage.name
        input:
            **stage_input(stage.name),
        output:
            **stage_output(stage.name),
        log:
            f"logs/tasks/{{task}}/{stage.name}.log",
        benchmark:
            f"logs/benchmarks/{stage.name}_{{task}}.tsv"
        wildcard_constraints:
            task=task_names(),
        threads: node_threads(config["probe"]["threads"])
        resources:
            mem_mb=node_mem_mb(4000),
        params:
            declared=stage_params(stage.name),
            command=job_command(stage.name),
        shell:
            "{params.command} > {log} 2>&1"


rule probe:
    """Linear probes per encoder × label fraction × seed on one task's embeddings."""
    input:
        **stage_input("probe"),
    output:
        **stage_output("probe"),
    log:
        "logs/tasks/{task}/probe.log",
    benchmark:
        "logs/benchmarks/probe_{task}.tsv"
    wildcard_constraints:
        task=task_names(),
    threads: 1
    resources:
        mem_mb=node_mem_mb(2000),
    params:
        declared=stage_params("probe"),
    shell:
        stage_shell("probe")
