# What the rules share: the validated config, the stage source files, the shard and run lists.
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/params.schema.yaml")

SRC = "src/cola_audio"
SHARDS = [f"{k:03d}" for k in range(config["features"]["n_shards"])]
RUNS = config["finetune"]["runs"]
SCRATCH_RUNS = sorted(r for r, spec in RUNS.items() if spec["init"] == "scratch")
PRETRAINED_RUNS = sorted(r for r, spec in RUNS.items() if spec["init"] == "pretrained")


wildcard_constraints:
    shard=r"\d{3}",
    run=r"[a-z0-9]+(-[a-z0-9]+)*",


def code(*modules):
    """The stage's own source files: editing them reruns the stage (as DVC deps do)."""
    return [f"{SRC}/{m}.py" for m in modules]


def shard_outputs(suffix):
    return expand("data/features/shards/{shard}.{suffix}", shard=SHARDS, suffix=suffix)


def finetune_outputs(run):
    return [
        f"models/finetune/{run}/metrics.json",
        f"models/finetune/{run}/predictions.csv",
        f"models/finetune/{run}/curve.csv",
    ]


def get_final_output():
    return ["reports/report.md", "reports/report.html"]


onsuccess:
    # Record what Snakemake built in dvc.lock, so `dvc status` is clean and `dvc push` shares it.
    if Path(".dvc").is_dir():
        shell("cola dvc-commit")
