FINETUNE_INPUTS = [
    *code(
        "finetune",
        "training",
        "optim",
        "checkpoints",
        "digest",
        "curves",
        "data",
        "store",
        "stats",
        "params",
        "meta",
        "models/classifier",
        "models/encoder",
        "models/batchnorm",
    ),
    *shard_outputs("npy"),
    *shard_outputs("json"),
    "data/features/index.csv",
    "data/features/summary.json",
    "data/meta/finetune.json",
    "data/meta/labels.json",
]


rule finetune_scratch:
    """Genre classification from a randomly initialised encoder, one job per run × seed."""
    input:
        FINETUNE_INPUTS,
    output:
        finetune_outputs("{run}", "{seed}"),
    log:
        "logs/finetune/{run}/seed-{seed}.log",
    benchmark:
        "logs/benchmarks/finetune_{run}_seed-{seed}.tsv"
    wildcard_constraints:
        run="|".join(SCRATCH_RUNS) or "no-run",
    threads: node_threads(config["finetune"]["threads"])
    resources:
        gpu=1,  # the plugin's form: sbatch --gpus=1; 0 on a site without GPUs
        mem_mb=node_mem_mb(8000),
    params:
        **finetune_params(),
    shell:
        "cola --params params.yaml finetune --run {wildcards.run} --seed {wildcards.seed} "
        "> {log} 2>&1"


use rule finetune_scratch as finetune_pretrained with:
    input:
        FINETUNE_INPUTS,
        "models/pretrain/encoder.safetensors",
    wildcard_constraints:
        run="|".join(PRETRAINED_RUNS) or "no-run",
