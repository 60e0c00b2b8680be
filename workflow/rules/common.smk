# What the rules share: the validated config, the stage table they read, the DVC hooks.
import functools
import re
import subprocess
from pathlib import Path

from snakemake.exceptions import WorkflowError

from cola_audio import guard, interrupt, sync
from cola_audio.params import ParamsError, refuse_overrides, validate
from cola_audio.stages import (
    STAGES,
    Folder,
    all_outputs,
    fill,
    lookup,
    training_stages,
    unwatched_by_dvc,
)

try:  # a --config/--configfile value would reach Snakemake's records but no job: refuse it,
    refuse_overrides(config, "params.yaml")
    # then the checks every `cola` command runs: the schema, relations between values
    validate(config, "params.yaml")
except ParamsError as exc:
    raise WorkflowError(str(exc))


wildcard_constraints:
    shard=r"\d+",
    seed=r"\d+",


def dvc_sync(wildcards):
    """The first input of every rule: before the first job is planned, a real run takes in what
    DVC did since the last run (restore from its cache, adopt what it verified; milliseconds
    when nothing changed: src/cola_audio/sync.py). A dry run (-n, --summary, --report, ...)
    only says so: the executor, known once jobs are planned, tells the two apart."""
    if not DVC_SYNC["done"] and workflow.is_main_process:
        DVC_SYNC["done"] = True
        plugin = workflow.executor_plugin
        real_run = plugin is not None and not workflow.dryrun and not workflow.touch
        if real_run:  # one real run per checkout (src/cola_audio/guard.py)
            try:
                guard.hold_checkout()
            except guard.Busy as exc:
                raise WorkflowError(str(exc))
        sync.before_planning(unwatched_by_dvc(config), real_run)
        # the sync's nested Snakemake calls delete .snakemake/locks when they end;
        # this one made it before planning and writes its own locks there next
        if real_run:
            Path(".snakemake", "locks").mkdir(parents=True, exist_ok=True)
    return []


DVC_SYNC = {"done": False}


def stage_input(name):
    """The stage's code (its module's import closure) and data inputs, by name."""
    stage = STAGES[name]
    deps = {
        key: dep.files(config) if isinstance(dep, Folder) else dep
        for key, dep in stage.deps.items()
    }
    return {"dvc_sync": dvc_sync, "code": stage.code(), **deps}


def stage_output(name, **in_report):
    """The stage's outputs, by name; `in_report` marks some for `snakemake --report`."""
    outputs = {}
    for key, out in STAGES[name].outs.items():
        path = directory(out.path) if out.folder else out.path
        outputs[key] = report(path, **in_report[key]) if key in in_report else path
    return outputs


def stage_params(name):
    """One param holding every declared key with its value: Snakemake compares a rule's params
    as a set of values, so only a keyed mapping makes every edit of every key visible. Per job:
    a key may name the job's own wildcard (tasks.${item.task})."""
    return lambda wildcards: STAGES[name].declared(config, dict(wildcards))


def stage_shell(name):
    """The stage's command as DVC runs it, with Snakemake's wildcards, logged."""
    command = re.sub(r"\{(\w+)\}", r"{wildcards.\1}", STAGES[name].command())
    return f"{command} > {{log}} 2>&1"


def job_command(name):
    """The stage's command for one job, as a param function bound to `name` (for rules made in
    a loop, whose shell text is evaluated when the job runs)."""
    return lambda wildcards: fill(STAGES[name].command(), wildcards)


def run_names(name):
    """The wildcard constraint of a training stage: exactly the runs its params list names."""
    names = lookup(config, STAGES[name].matrix["run"])
    return "|".join(re.escape(n) for n in names) or "no-run"


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


def task_names():
    """The wildcard constraint of the task stages: exactly the tasks params.yaml names."""
    return "|".join(re.escape(n) for n in config["tasks"])


def task_listing(wildcards):
    """A folder task's files outside the repository, fingerprinted as folder_listing's."""
    task = config["tasks"][wildcards.task]
    if task["source"] != "folder" or task["demo"]:
        return ""
    from cola_audio.folder import listing

    return listing({**task, "demo": False, "unlabelled_path": None})


def folder_listing():
    """For data.source: folder, a fingerprint of the files (path, size, mtime) outside the
    repository: an edited folder reruns download. DVC cannot see them: `dvc repro -f download`.
    """
    if config["data"]["source"] != "folder":
        return ""
    from cola_audio.folder import listing

    return listing(config["data"]["folder"])


onstart:
    # Ctrl-C or SIGTERM to Snakemake stops the running jobs too (src/cola_audio/interrupt.py)
    interrupt.stop_jobs_first()
    # DVC refuses to touch the outputs while the jobs run (src/cola_audio/guard.py)
    if Path(".dvc").is_dir():
        try:
            DVC_KEPT_OFF.append(guard.keep_dvc_off(all_outputs(config)))
        except guard.Busy as exc:
            raise WorkflowError(str(exc))


DVC_KEPT_OFF = []  # the release of DVC's path lock, once taken


def let_dvc_in():
    while DVC_KEPT_OFF:
        DVC_KEPT_OFF.pop()()


onsuccess:
    # Record what Snakemake built in dvc.lock, so `dvc status` is clean and `dvc push` shares it:
    # only stages whose build records match DVC's view (src/cola_audio/buildrecord.py).
    let_dvc_in()
    if Path(".dvc").is_dir():
        shell("cola dvc-commit")


onerror:
    # The jobs that did finish are recorded too.
    let_dvc_in()
    if Path(".dvc").is_dir():
        shell("cola dvc-commit")
