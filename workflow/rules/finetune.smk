FINETUNE_CODE = code(
    "finetune", "training", "data", "store", "models/classifier", "models/encoder"
)
FINETUNE_DATA = [
    *shard_outputs("npy"),
    "data/features/index.csv",
    "data/features/summary.json",
    "data/meta/finetune.json",
    "data/meta/labels.json",
]


rule finetune_scratch:
    """Genre classification from a randomly initialised encoder."""
    input:
        FINETUNE_CODE,
        FINETUNE_DATA,
    output:
        finetune_outputs("{run}"),
    log:
        "logs/finetune/{run}.log",
    benchmark:
        "logs/benchmarks/finetune_{run}.tsv"
    wildcard_constraints:
        run="|".join(SCRATCH_RUNS) or "no-run",
    threads: 8  # Snakemake caps this at --cores
    resources:
        gpu=1,
        mem_mb=8000,
    params:
        finetune=config["finetune"],
    shell:
        "cola --params params.yaml finetune --run {wildcards.run} > {log} 2>&1"


rule finetune_pretrained:
    """Fine-tuning or linear evaluation from the COLA encoder."""
    input:
        FINETUNE_CODE,
        FINETUNE_DATA,
        "models/pretrain/encoder.safetensors",
    output:
        finetune_outputs("{run}"),
    log:
        "logs/finetune/{run}.log",
    benchmark:
        "logs/benchmarks/finetune_{run}.tsv"
    wildcard_constraints:
        run="|".join(PRETRAINED_RUNS) or "no-run",
    threads: 8  # Snakemake caps this at --cores
    resources:
        gpu=1,
        mem_mb=8000,
    params:
        finetune=config["finetune"],
    shell:
        "cola --params params.yaml finetune --run {wildcards.run} > {log} 2>&1"
