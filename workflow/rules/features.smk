rule featurize_shard:
    """One shard of the log-mel store; shards run as parallel jobs (or cluster jobs)."""
    input:
        **stage_input("featurize_shard"),
    output:
        **stage_output("featurize_shard"),
    log:
        "logs/featurize/{shard}.log",
    benchmark:
        "logs/benchmarks/featurize_{shard}.tsv"
    threads: node_threads(config["features"]["workers"] or JOB_THREADS)  # 0: all it may have
    resources:
        mem_mb=node_mem_mb(4000),
    params:
        declared=stage_params("featurize_shard"),
    shell:
        stage_shell("featurize_shard")


rule featurize_gather:
    """Join shard indexes; fail past the skipped-clip threshold, naming the files."""
    input:
        **stage_input("featurize_gather"),
    output:
        **stage_output("featurize_gather"),
    log:
        "logs/featurize/gather.log",
    benchmark:
        "logs/benchmarks/featurize_gather.tsv"
    threads: 1
    resources:
        mem_mb=node_mem_mb(1000),
    params:
        declared=stage_params("featurize_gather"),
    shell:
        stage_shell("featurize_gather")
