rule featurize_shard:
    """One shard of the log-mel store; shards run as parallel jobs (or cluster jobs)."""
    input:
        code("featurize", "frontend", "meta", "digest"),
        "data/raw",
        "data/meta/finetune.json",
        "data/meta/pretrain.json",
    output:
        "data/features/shards/{shard}.npy",
        "data/features/shards/{shard}.json",
    log:
        "logs/featurize/{shard}.log",
    benchmark:
        "logs/benchmarks/featurize_{shard}.tsv"
    threads: node_threads(config["features"]["workers"] or JOB_THREADS)  # 0: all it may have
    resources:
        mem_mb=node_mem_mb(4000),
    params:
        **declared_params(config, "features"),
    shell:
        "cola --params params.yaml featurize --shard {wildcards.shard} > {log} 2>&1"


rule featurize_gather:
    """Join shard indexes; fail past the skipped-clip threshold, naming the files."""
    input:
        code("featurize"),
        shard_outputs("npy"),
        shard_outputs("json"),
    output:
        "data/features/index.csv",
        "data/features/skipped.csv",
        "data/features/summary.json",
    log:
        "logs/featurize/gather.log",
    benchmark:
        "logs/benchmarks/featurize_gather.tsv"
    threads: 1
    resources:
        mem_mb=node_mem_mb(1000),
    params:
        **declared_params(config, "features"),
    shell:
        "cola --params params.yaml featurize --gather > {log} 2>&1"
