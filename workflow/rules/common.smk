# What the rules share: the validated config, the stage source files, the shard and run lists.
import functools
import subprocess
from pathlib import Path

from snakemake.exceptions import WorkflowError

from snakemake.utils import validate

from cola_audio.sync import at_snakemake_start as sync_with_dvc
from cola_audio.params import (
    data_params,
    declared_params,
    finetune_runs,
    pick,
    report_params,
)

validate(config, schema="../schemas/params.schema.yaml")

if workflow.is_main_process:
    # Take in what DVC did since the last run (restore from its cache, adopt what it verified)
    # before Snakemake plans; milliseconds when nothing changed (src/cola_audio/sync.py).
    sync_with_dvc(config["data"]["source"])

SRC = "src/cola_audio"
SHARDS = [str(k) for k in config["features"]["shards"]]
RUNS = finetune_runs(config["finetune"])
SEEDS = config["finetune"]["seeds"]
SCRATCH_RUNS = sorted(config["finetune"]["runs"]["scratch"])
PRETRAINED_RUNS = sorted(config["finetune"]["runs"]["pretrained"])


wildcard_constraints:
    shard=r"\d+",
    run=r"[a-z0-9]+(-[a-z0-9]+)*",
    seed=r"\d+",


# What download and featurize (process pools; their bytes do not depend on the count) ask for:
# Snakemake caps it at --cores locally, node_threads() at the smallest node on SLURM. Training
# jobs ask for pretrain.threads / finetune.threads, the count their weights depend on.
JOB_THREADS = 8


@functools.cache
def slurm_node_size():
    """(CPUs, MB) of the smallest usable node SLURM lists (any partition; down, drained and
    failed nodes left out). A request above it is not refused: the job sits PENDING (reason
    PartitionConfig) for ever, so requests are capped to it instead."""
    cmd = ["sinfo", "-h", "-N", "-o", "%c %m %t"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise WorkflowError(
            f"`{' '.join(cmd)}` failed ({exc}); is SLURM reachable here?"
        )
    sizes = [
        (int(cpus.rstrip("+")), int(mem.rstrip("+")))
        for cpus, mem, state in (
            line.split() for line in out.splitlines() if line.strip()
        )
        if not state.startswith(("down", "drain", "drng", "fail", "inval"))
    ]
    if not sizes:
        raise WorkflowError(f"`{' '.join(cmd)}` lists no usable node:\n{out}")
    cpus, mem = min(c for c, _ in sizes), min(m for _, m in sizes)
    print(
        f"SLURM: thread and memory requests capped at the smallest node: {cpus} CPUs, {mem} MB"
    )
    return cpus, mem


def on_slurm():
    plugin = workflow.executor_plugin  # known when jobs are made, not while parsing
    return plugin is not None and plugin.name == "slurm"


def node_threads(wanted):
    """`wanted` threads, or as many as a SLURM node has if that is fewer."""
    return lambda wildcards: min(wanted, slurm_node_size()[0]) if on_slurm() else wanted


def node_mem_mb(wanted):
    """`wanted` MB of memory, or as much as a SLURM node has if that is less."""
    return lambda wildcards: min(wanted, slurm_node_size()[1]) if on_slurm() else wanted


def folder_listing():
    """For data.source: folder, a fingerprint of the files (path, size, mtime) outside the
    repository: an edited folder reruns download. DVC cannot see them: `dvc repro -f download`.
    """
    if config["data"]["source"] != "folder":
        return ""
    from cola_audio.folder import listing

    return listing(config["data"]["folder"])


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
    """Every finetune key a run's result depends on, one entry each (as dvc.yaml declares them):
    the seed list is left out, so adding a seed runs only the new jobs."""
    return declared_params(config, "finetune", skip=("seeds",))


def all_predictions():
    """Every run × seed's test predictions: what the report's statistics are computed from."""
    return [
        finetune_outputs(run, seed)[1] for run in sorted(RUNS) for seed in sorted(SEEDS)
    ]


def get_final_output():
    """Every stage's outputs, not just the report's: Snakemake lets an intermediate file be
    missing while everything after it is up to date (as if it were temp()), so a shard deleted
    or lost to a kill would never be rebuilt. As targets, missing ones are (as `dvc repro` does).
    """
    return [
        *rules.download.output,
        *rules.prepare.output,
        *expand(rules.featurize_shard.output, shard=SHARDS),
        *rules.featurize_gather.output,
        *rules.pretrain.output,
        *(
            f
            for run in sorted(RUNS)
            for seed in sorted(SEEDS)
            for f in finetune_outputs(run, seed)
        ),
        *rules.report.output,
    ]


onsuccess:
    # Record what Snakemake built in dvc.lock, so `dvc status` is clean and `dvc push` shares it.
    if Path(".dvc").is_dir():
        shell("cola dvc-commit")


onerror:
    # The jobs that did finish are recorded too (only stages Snakemake holds up to date).
    if Path(".dvc").is_dir():
        shell("cola dvc-commit")
