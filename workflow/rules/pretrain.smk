rule pretrain:
    """COLA contrastive pretraining; on a GPU when the executor grants one."""
    input:
        code(
            "pretrain",
            "training",
            "optim",
            "checkpoints",
            "digest",
            "curves",
            "data",
            "store",
            "params",
            "meta",
            "models/cola",
            "models/encoder",
            "models/batchnorm",
        ),
        shard_outputs("npy"),
        shard_outputs("json"),
        "data/features/index.csv",
        "data/features/summary.json",
        "data/meta/pretrain.json",
    output:
        "models/pretrain/encoder.safetensors",
        report(
            "models/pretrain/curve.csv",
            caption="../report/pretrain_curve.rst",
            category="Pretraining",
        ),
        "models/pretrain/summary.json",
    log:
        "logs/pretrain.log",
    benchmark:
        "logs/benchmarks/pretrain.tsv"
    threads: node_threads(config["pretrain"]["threads"])
    resources:
        gpu=1,  # the plugin's form: sbatch --gpus=1; 0 on a site without GPUs
        mem_mb=node_mem_mb(16000),
        runtime=720,
    params:
        **declared_params(config, "pretrain"),
    shell:
        "cola --params params.yaml pretrain > {log} 2>&1"
