# What the rules share: the validated config, the stage source files, the shard and run lists.
from pathlib import Path

from snakemake.utils import validate

from cola_audio.params import finetune_runs

validate(config, schema="../schemas/params.schema.yaml")

SRC = "src/cola_audio"
SHARDS = [f"{k:03d}" for k in range(config["features"]["n_shards"])]
RUNS = finetune_runs(config["finetune"])
SEEDS = config["finetune"]["seeds"]
SCRATCH_RUNS = sorted(config["finetune"]["runs"]["scratch"])
PRETRAINED_RUNS = sorted(config["finetune"]["runs"]["pretrained"])


wildcard_constraints:
    shard=r"\d{3}",
    run=r"[a-z0-9]+(-[a-z0-9]+)*",
    seed=r"\d+",


def code(*modules):
    """The stage's own source files: editing them reruns the stage (as DVC deps do)."""
    return [f"{SRC}/{m}.py" for m in modules]


def shard_outputs(suffix):
    return expand("data/features/shards/{shard}.{suffix}", shard=SHARDS, suffix=suffix)


def finetune_outputs(run, seed):
    folder = f"models/finetune/{run}/seed-{seed}"
    return [
        f"{folder}/metrics.json",
        f"{folder}/predictions.csv",
        f"{folder}/curve.csv",
    ]


def finetune_params():
    """The finetune keys a run's result depends on, each declared on its own (as dvc.yaml does):
    the seed list and num_workers are left out, so adding a seed runs only the new jobs.
    """
    skip = ("seeds", "num_workers")
    return {f"finetune.{k}": v for k, v in config["finetune"].items() if k not in skip}


def all_predictions():
    """Every run × seed's test predictions: what the report's statistics are computed from."""
    return [
        finetune_outputs(run, seed)[1] for run in sorted(RUNS) for seed in sorted(SEEDS)
    ]


def get_final_output():
    return ["reports/report.md", "reports/report.html"]


onsuccess:
    # Record what Snakemake built in dvc.lock, so `dvc status` is clean and `dvc push` shares it.
    if Path(".dvc").is_dir():
        shell("cola dvc-commit")
