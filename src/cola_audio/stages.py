"""The pipeline's stages, written once: what each one runs, reads, writes and depends on.

Both orchestrators derive their pipeline from this table. The Snakemake rules
(workflow/rules/*.smk) read each stage's command, inputs, outputs and declared params from it;
dvc.yaml is rendered from it by `cola dvc-yaml` (CI runs `cola dvc-yaml --check`). A stage's code
dependencies are computed (codedeps.closure), never listed. `cola <stage>` itself gets from here
the params it may read (its declared keys plus its speed knobs, nothing else: a key a stage reads
without declaring it is a KeyError in every test that runs it) and what it records of each build
(buildrecord.py), so the same facts serve both tools, the job and the bookkeeping.

Paths may hold the wildcards {shard}, {run}, {seed} and {task}; a param key may hold
${data.source}, which DVC resolves from params.yaml as Snakemake does from its config, and
${item.task}, a job's own wildcard (DVC's matrix item).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cola_audio import codedeps

Params = dict[str, Any]

RAW, META, FEATURES, SHARDS = "data/raw", "data/meta", "data/features", "data/features/shards"
# The SHA1 of every file in RAW, written by download (download.manifest_path): the dependency of
# the stages that read the audio. A folder dependency is hashed anew for each stage declaring it
# (DVC walks all its files every time), one file is not: `dvc status` stays one walk of RAW.
RAW_SUMS = f"{RAW}.sha1sums"
PRETRAIN, FINETUNE, REPORTS = "models/pretrain", "models/finetune", "reports"
TASK, PROBES = "data/tasks/{task}", "models/probe"
ENCODER = f"{PRETRAIN}/encoder.safetensors"
CLI = "cola --params params.yaml"

# How a fine-tuning run trains (its mode) and the encoder it starts from (its init): one stage per
# pair, because their params differ (lr or linear_lr; a frozen encoder's BatchNorm never moves)
# and DVC has no optional dependency (only pretrained runs depend on the encoder).
MODES, INITS = ("finetune", "linear"), ("scratch", "pretrained")


@dataclass(frozen=True)
class Folder:
    """A dependency DVC sees as one folder while Snakemake lists the files the pipeline writes
    into it (DVC cannot iterate a params list in `deps`)."""

    path: str
    files: Callable[[Params], list[str]]


@dataclass(frozen=True)
class Out:
    path: str
    folder: bool = False  # a directory output (Snakemake's directory())
    dvc: str = "outs"  # outs | metrics | plots: where dvc.yaml lists it
    plot: dict[str, Any] | None = None  # DVC plot properties (template, x, y)


@dataclass(frozen=True)
class Stage:
    """One stage: rule name = DVC stage name, one `cola` command, one job per matrix item."""

    name: str
    entry: str  # the module `cola` runs: its import closure is the stage's code
    cmd: str  # after `cola --params params.yaml `; may hold wildcards
    deps: dict[str, str | Folder]  # data inputs and non-Python files it reads
    outs: dict[str, Out]
    params: tuple[str, ...]  # declared keys: an edit to any of them reruns the stage
    speed: tuple[str, ...] = ()  # keys it reads that change only how fast or from where
    matrix: dict[str, str] = field(default_factory=dict)  # wildcard → params list it iterates
    summary: str = ""

    def command(self) -> str:
        return f"{CLI} {self.cmd}"

    def code(self) -> list[str]:
        return codedeps.closure(self.entry)

    def keys(self, params: Params, item: dict[str, str] | None = None) -> list[str]:
        """The declared keys, with ${...} resolved from params and ${item.w} from one job's
        wildcards (a key naming a wildcard the job does not give is left out)."""
        item = item or {}
        return [
            _resolve_key(k, params, item)
            for k in self.params
            if all(w in item for w in re.findall(r"\$\{item\.(\w+)\}", k))
        ]

    def declared(self, params: Params, item: dict[str, str] | None = None) -> dict[str, Any]:
        """key → value for every declared key: what both tools compare, key by key."""
        return {k: lookup(params, k) for k in self.keys(params, item)}

    def readable(self, params: Params, item: dict[str, str] | None = None) -> Params:
        """The params `cola <stage>` runs with: its declared keys and speed knobs only."""
        view: Params = Declared(self.name, "")
        for key in [*self.keys(params, item), *self.speed]:
            _place(view, key, lookup(params, key))
        return view

    def items(self, params: Params) -> list[dict[str, str]]:
        """One wildcard assignment per job (one empty one for a stage without matrix)."""
        combos: list[dict[str, str]] = [{}]
        for wildcard, key in self.matrix.items():
            combos = [{**c, wildcard: str(v)} for c in combos for v in lookup(params, key)]
        return combos

    def addressing(self, item: dict[str, str]) -> str:
        """DVC's name of one job: stage@values joined by '-' (Snakemake's rule + wildcards)."""
        values = [item[w] for w in self.matrix]
        return self.name + (f"@{'-'.join(values)}" if values else "")

    def dep_paths(self, params: Params) -> list[str]:
        """Data dependencies as Snakemake lists them (every file of a Folder)."""
        paths: list[str] = []
        for dep in self.deps.values():
            paths += dep.files(params) if isinstance(dep, Folder) else [dep]
        return paths

    def dvc_deps(self) -> list[str]:
        return [dep.path if isinstance(dep, Folder) else dep for dep in self.deps.values()]

    def out_paths(self, item: dict[str, str]) -> list[str]:
        return [fill(o.path, item) for o in self.outs.values()]


def lookup(params: Params, key: str) -> Any:
    value: Any = params
    for part in key.split("."):
        value = value[part]
    return value


class Declared(dict):
    """A stage's view of params.yaml: reading a key it does not declare is a bug in the table (or
    the stage), named as such instead of a bare KeyError."""

    def __init__(self, stage: str, prefix: str) -> None:
        super().__init__()
        self.stage, self.prefix = stage, prefix

    def __missing__(self, key: str) -> Any:
        raise KeyError(
            f"stage {self.stage} read params key {self.prefix}{key}, which it does not declare: "
            "add it to the stage's params (or speed keys) in src/cola_audio/stages.py"
        )

    def get(self, key: str, default: Any = None) -> Any:
        """No silent default for a key the stage does not declare."""
        return self[key]


def _place(view: Declared, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        if part not in view:
            dict.__setitem__(view, part, Declared(view.stage, f"{view.prefix}{part}."))
        view = view[part]
    view[last] = value


def _resolve_key(key: str, params: Params, item: dict[str, str] | None = None) -> str:
    """${item.w} from the job's wildcards (DVC's matrix item), any other ${a.b} from params."""
    item = item or {}
    key = re.sub(r"\$\{item\.(\w+)\}", lambda m: item[m.group(1)], key)
    return re.sub(r"\$\{([^}]+)\}", lambda m: str(lookup(params, m.group(1))), key)


def fill(template: str, item: dict[str, str]) -> str:
    """A path or command with its wildcards replaced by one job's values."""
    return re.sub(r"\{(\w+)\}", lambda m: item[m.group(1)], template)


TEMPLATES = "src/cola_audio/templates"


def template_files(params: Params) -> list[str]:
    return sorted(
        p.relative_to(codedeps.REPO).as_posix() for p in codedeps.REPO.joinpath(TEMPLATES).glob("*")
    )


def shard_files(params: Params) -> list[str]:
    return [f"{SHARDS}/{k}.{ext}" for k in params["features"]["shards"] for ext in ("npy", "json")]


def run_outputs(params: Params) -> list[str]:
    """What the report reads of every fine-tuning job: its metrics and test predictions."""
    return [
        fill(path, item)
        for stage in training_stages()
        for item in stage.items(params)
        for path in (stage.outs["metrics"].path, stage.outs["predictions"].path)
    ]


def section_keys(section: str, leave_out: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every key the schema defines for a params section, as `section.key`, but `leave_out`."""
    return tuple(f"{section}.{k}" for k in schema_keys(section) if k not in leave_out)


def schema_keys(section: str) -> list[str]:
    from cola_audio.params import load_schema

    spec = load_schema()["properties"][section]
    keys: list[str] = []
    for part in [spec, *spec.get("allOf", [])]:
        if "$ref" in part:
            part = load_schema()["$defs"][part["$ref"].rsplit("/", 1)[-1]]
        keys += [k for k in part.get("properties", {}) if k not in keys]
    return keys


# Keys each fine-tuning stage leaves out of the finetune section: the job lists (a new seed or run
# must not rerun the others) and what its mode never uses.
NOT_FOR_MODE = {
    ("finetune", "scratch"): ("linear_lr",),
    ("finetune", "pretrained"): ("linear_lr",),
    # a frozen encoder: no gradient (lr), BatchNorm statistics fixed (bn_momentum); a pretrained
    # one brings its statistics, so no batches recompute them either
    ("linear", "scratch"): ("lr", "bn_momentum"),
    ("linear", "pretrained"): ("lr", "bn_momentum", "precise_bn_batches"),
}


def training_stage(mode: str, init: str) -> Stage:
    """Fine-tuning (mode finetune) or linear evaluation (mode linear) of runs starting from a
    random (init scratch) or the pretrained encoder, one job per run × seed."""
    encoder = {"encoder": ENCODER} if init == "pretrained" else {}
    folder = f"{FINETUNE}/{{run}}/seed-{{seed}}"
    return Stage(
        name=f"{mode}_{init}",
        entry="finetune",
        cmd=f"finetune --mode {mode} --run {{run}} --seed {{seed}} --features {FEATURES} "
        f"--meta {META}" + (f" --encoder {ENCODER}" if encoder else "") + f" --out {FINETUNE}",
        deps={
            "shards": Folder(SHARDS, shard_files),
            "index": f"{FEATURES}/index.csv",
            "features": f"{FEATURES}/summary.json",
            "split": f"{META}/finetune.json",
            "labels": f"{META}/labels.json",
            **encoder,
        },
        outs={
            "metrics": Out(f"{folder}/metrics.json"),
            "predictions": Out(
                f"{folder}/predictions.csv",
                dvc="plots",
                plot={"template": "confusion", "x": "actual", "y": "predicted"},
            ),
            "curve": Out(f"{folder}/curve.csv", dvc="plots", plot={"x": "epoch", "y": "val_acc"}),
        },
        params=section_keys("finetune", ("seeds", "runs", *NOT_FOR_MODE[mode, init])),
        matrix={"run": f"finetune.runs.{mode}.{init}", "seed": "finetune.seeds"},
        summary=f"{mode} from the {init} encoder, one job per run × seed",
    )


def training_stages() -> list[Stage]:
    return [training_stage(mode, init) for mode in MODES for init in INITS]


FEATURES_KEYS = section_keys("features", ("workers",))
# The log-mel front-end's keys: what the random-init encoder's features depend on (the rest say
# which clips are kept and how the store is cut)
FRONT_END = section_keys(
    "features",
    ("workers", "shards", "min_seconds", "min_decoded_fraction", "max_skipped_fraction"),
)
# What embedding a task's clips reads of the probe section (the probes' own keys are the probe
# stage's): how many threads sum, how many windows a batch holds (BatchNorm statistics of the
# random encoder are batch means)
EMBED_KEYS = ("tasks.${item.task}", "probe.batch_size", "probe.threads")


def embed_stage(init: str) -> Stage:
    """One vector per clip of a task from the pretrained or the random-init encoder: one stage
    per encoder, because only the pretrained one depends on `cola pretrain`."""
    pretrained = init == "pretrained"
    random_keys = (
        *FRONT_END,
        "pretrain.crop_frames",
        "pretrain.pooling",
        "pretrain.input_norm",
        "probe.random_init_seed",
        "probe.precise_bn_batches",
    )
    return Stage(
        name=f"embed_{init}",
        entry="task_embed",
        cmd=f"task-embed --task {{task}} --init {init} --data {TASK}/data"
        + (f" --encoder {ENCODER}" if pretrained else "")
        + f" --out {TASK}/embeddings/{init}",
        deps={"data": f"{TASK}/data", **({"encoder": ENCODER} if pretrained else {})},
        outs={"embeddings": Out(f"{TASK}/embeddings/{init}", folder=True)},
        params=EMBED_KEYS + (() if pretrained else random_keys),
        matrix={"task": "tasks"},
        summary=f"a vector per clip of each task from the {init} encoder",
    )


def probe_outputs(params: Params) -> list[str]:
    return [
        f"{PROBES}/{t}/{name}"
        for t in params["tasks"]
        for name in ("scores.json", "predictions.csv")
    ]


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            name="download",
            entry="download",
            cmd=f"download --out {RAW}",
            deps={},
            outs={"raw": Out(RAW, folder=True), "sums": Out(RAW_SUMS)},
            # only what changes the audio: never the other source's section, nor `download`
            params=(
                "data.source",
                "data.finetune_subset",
                "data.pretrain_subset",
                "data.${data.source}",
            ),
            speed=("download", "features.workers"),
            summary="FMA archives (verified) or the embedded dataset, in the release's layout",
        ),
        Stage(
            name="prepare",
            entry="prepare",
            cmd=f"prepare --raw {RAW} --out {META}",
            deps={"schema": "workflow/schemas/meta.schema.yaml", "raw": RAW_SUMS},
            outs={name: Out(f"{META}/{name}.json") for name in ("labels", "finetune", "pretrain")},
            params=("data.source", "data.finetune_subset", "data.pretrain_subset", "prepare"),
            summary="metadata JSON: official split, stable label ids, leakage-free pretraining set",
        ),
        Stage(
            name="featurize_shard",
            entry="featurize",
            cmd=f"featurize --shard {{shard}} --meta {META} --out {FEATURES}",
            deps={
                "raw": RAW_SUMS,
                "finetune": f"{META}/finetune.json",
                "pretrain": f"{META}/pretrain.json",
            },
            outs={
                "npy": Out(f"{SHARDS}/{{shard}}.npy"),
                "json": Out(f"{SHARDS}/{{shard}}.json"),
            },
            params=FEATURES_KEYS,
            speed=("features.workers",),
            matrix={"shard": "features.shards"},
            summary="one shard of the log-mel store; shards are parallel (or cluster) jobs",
        ),
        Stage(
            name="featurize_gather",
            entry="featurize",
            cmd=f"featurize --gather --out {FEATURES}",
            deps={"shards": Folder(SHARDS, shard_files)},
            outs={
                name: Out(f"{FEATURES}/{name}")
                for name in ("index.csv", "skipped.csv", "summary.json")
            },
            params=FEATURES_KEYS,
            summary="join the shard indexes; fail past the skipped-clip threshold, naming files",
        ),
        Stage(
            name="pretrain",
            entry="pretrain",
            cmd=f"pretrain --features {FEATURES} --meta {META} --out {PRETRAIN}",
            deps={
                "shards": Folder(SHARDS, shard_files),
                "index": f"{FEATURES}/index.csv",
                "features": f"{FEATURES}/summary.json",
                "split": f"{META}/pretrain.json",
            },
            outs={
                "encoder": Out(ENCODER),
                "curve": Out(f"{PRETRAIN}/curve.csv"),
                "summary": Out(f"{PRETRAIN}/summary.json"),
            },
            params=section_keys("pretrain"),
            summary="COLA contrastive pretraining; on a GPU when the executor grants one",
        ),
        *training_stages(),
        Stage(
            name="task_data",
            entry="tasks",
            cmd=f"task-data --task {{task}} --raw {RAW} --meta {META} --out {TASK}/data",
            deps={
                "raw": RAW_SUMS,
                "finetune": f"{META}/finetune.json",
                "pretrain": f"{META}/pretrain.json",
            },
            outs={"data": Out(f"{TASK}/data", folder=True)},
            params=("data.source", "prepare.exclude_eval_from_pretrain", "tasks.${item.task}"),
            matrix={"task": "tasks"},
            summary="one downstream task's clips and split; audio pretraining saw left out",
        ),
        embed_stage("pretrained"),
        embed_stage("random"),
        Stage(
            name="probe",
            entry="probe",
            cmd=f"probe --task {{task}} --data {TASK}/data --embeddings {TASK}/embeddings "
            f"--out {PROBES}/{{task}}",
            deps={
                "data": f"{TASK}/data",
                "pretrained": f"{TASK}/embeddings/pretrained",
                "random": f"{TASK}/embeddings/random",
            },
            outs={
                "scores": Out(f"{PROBES}/{{task}}/scores.json"),
                "predictions": Out(f"{PROBES}/{{task}}/predictions.csv"),
            },
            params=("probe.pooling", "probe.label_fractions", "probe.seeds", "probe.C_grid"),
            matrix={"task": "tasks"},
            summary="linear probes per encoder × label fraction × seed on a task's embeddings",
        ),
        Stage(
            name="report",
            entry="report",
            cmd=f"report --models models --features {FEATURES} --meta {META} --out {REPORTS}",
            deps={
                "templates": Folder(TEMPLATES, template_files),  # Jinja2 may include any
                "runs": Folder(FINETUNE, run_outputs),
                "probes": Folder(PROBES, probe_outputs),
                "shards": Folder(SHARDS, shard_files),  # the provenance table lists their md5s
                "index": f"{FEATURES}/index.csv",
                "features": f"{FEATURES}/summary.json",
                "skipped": f"{FEATURES}/skipped.csv",
                "curve": f"{PRETRAIN}/curve.csv",
                "pretraining": f"{PRETRAIN}/summary.json",
                "encoder": ENCODER,
                "labels": f"{META}/labels.json",
            },
            outs={
                "markdown": Out(f"{REPORTS}/report.md"),
                "html": Out(f"{REPORTS}/report.html"),
                "results": Out(f"{REPORTS}/results.json"),
                "metrics": Out(f"{REPORTS}/metrics.json", dvc="metrics"),
                "figures": Out(f"{REPORTS}/figures", folder=True),
            },
            # what the report reads; upstream params are traced by each run's identity
            params=(
                "report",
                "tasks",
                "probe.pooling",
                "probe.label_fractions",
                "probe.seeds",
                "finetune.runs",
                "finetune.seeds",
                "finetune.crop_frames",
                "data.source",
                "data.finetune_subset",
                "data.pretrain_subset",
            ),
            summary="results table with CIs and the published numbers, curves, provenance",
        ),
    ]
}


def by_command(argv: list[str], params: Params) -> tuple[Stage, dict[str, str]] | None:
    """The stage and job whose exact command `argv` (after `cola`) is, or None: `cola` records a
    build only when it ran a pipeline job as both tools run it."""
    line = " ".join(["cola", *argv])
    for stage in STAGES.values():
        for item in stage.items(params):
            if line == fill(stage.command(), item):
                return stage, item
    return None


def all_outputs(params: Params) -> list[str]:
    """Every job's outputs: what `rule all` asks for (a missing intermediate is rebuilt)."""
    return [p for s in STAGES.values() for item in s.items(params) for p in s.out_paths(item)]


def unwatched_by_dvc(params: Params) -> set[str]:
    """Jobs reading files outside the repository, which only Snakemake fingerprints (a folder
    source's audio, a folder task's): the sync never restores or adopts them from DVC, and
    `cola dvc-commit` puts no DVC run-cache entry for them (its key would miss those files)."""
    jobs = {"download"} if params["data"]["source"] == "folder" else set()
    return jobs | {
        f"task_data@{name}"
        for name, task in params["tasks"].items()
        if task["source"] == "folder" and not task["demo"]
    }


def repo_root() -> Path:
    return codedeps.REPO
