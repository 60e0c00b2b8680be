"""The whole pipeline, small, in a temporary copy of the repository, through both orchestrators.

Order matters: each test continues from the state the previous one left (a user's session).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from dag import dvc_stages, snakemake_stages, with_downstream

from cola_audio import digest
from cola_audio.params import finetune_runs, validate
from cola_audio.stages import MODES, STAGES, lookup
from conftest import PIPELINE_RULES, sh, tiny_checkout

pytestmark = pytest.mark.slow


def stages_run(dvc_output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", dvc_output))


def finetune_stages(params: dict, modes: tuple[str, ...] = MODES) -> set[str]:
    """<mode>_<init>@<run>-<seed> for every run × seed in params (of `modes`)."""
    ft = params["finetune"]
    return {
        f"{spec['mode']}_{spec['init']}@{run}-{seed}"
        for run, spec in finetune_runs(ft).items()
        if spec["mode"] in modes
        for seed in ft["seeds"]
    }


def dvc_changed(repo: Path) -> set[str]:
    return set(json.loads(sh("dvc status --json", repo).stdout or "{}"))


TASK_EVALUATION = ("embed_pretrained", "embed_random", "probe")  # per task, after task_data
RUNS = ("scratch-finetune", "random-linear", "pretrained-finetune", "pretrained-linear")


def write_params(repo: Path, params: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@contextlib.contextmanager
def edited_params(repo: Path, edit: Callable[[dict], None]) -> Iterator[dict]:
    """params.yaml with `edit` applied for the block (yielded, to edit further with
    `write_params`), put back byte for byte afterwards: later tests continue from the build."""
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    edit(params)
    write_params(repo, params)
    try:
        yield params
    finally:
        (repo / "params.yaml").write_text(original)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("e2e")
    repo, remote = tiny_checkout(base / "repo"), base / "remote"
    sh(f"dvc remote add -f -d local {remote}", repo)
    return {"base": base, "repo": repo, "remote": remote}


def test_snakemake_builds_the_report_with_every_row(work):
    repo = work["repo"]
    sh("snakemake --cores 2", repo)
    report = (repo / "reports" / "report.md").read_text()
    for row in ("random guess", *RUNS):
        assert f"| {row} |" in report or f"| {row} " in report, row
    assert "embedded synthetic dataset" in report
    assert "pretrained-finetune** vs **scratch-finetune" in report or (
        "**pretrained-finetune** is" in report
    )
    html = (repo / "reports" / "report.html").read_text()
    # results, pretraining curves, four confusion matrices, the tasks' learning curves
    assert html.count("data:image/png;base64,") == 7
    results = json.loads((repo / "reports" / "results.json").read_text())
    assert len(results["rows"]) == 5 and len(results["comparisons"]) == 2
    # every task: a row, its probes' gain (genre: and fine-tuning's), the average over tasks
    tasks = yaml.safe_load((repo / "params.yaml").read_text())["tasks"]
    assert [t["task"] for t in results["tasks"]["tasks"]] == list(tasks)
    for name in tasks:
        assert f"| {name} |" in report
        assert f"- {name}: **pretrained probe**" in report
    assert "- genre: **pretrained-finetune**" in report
    assert "Average over the 3 tasks" in report
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert {f"{name}: pretrained probe gain" for name in tasks} < set(metrics)
    seeds = yaml.safe_load((repo / "params.yaml").read_text())["finetune"]["seeds"]
    assert all(r["seeds"] == len(seeds) for r in results["rows"][1:])
    for run in RUNS:
        for seed in seeds:
            assert (repo / "logs" / "finetune" / run / f"seed-{seed}.log").is_file()
            assert not (
                repo / "models" / "finetune" / run / f"seed-{seed}" / "checkpoints"
            ).exists()


def test_dvc_status_is_clean_after_snakemake(work):
    repo = work["repo"]
    assert json.loads(sh("dvc status --json", repo).stdout or "{}") == {}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    # The report's artifact table says "md5 (as in dvc.lock)": it must be.
    locked = {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}
    reported = json.loads((repo / "reports" / "results.json").read_text())["provenance"]["hashes"]
    assert reported and all(locked[path] == md5 for path, md5 in reported.items())


def test_second_snakemake_run_has_nothing_to_do(work):
    out = sh("snakemake --cores 2", work["repo"])
    assert "Nothing to be done" in out.stdout + out.stderr


def test_snakemake_report_bundles_the_results(work):
    """`snakemake --report`: the captions in workflow/report/ and the outputs marked report()."""
    repo = work["repo"]
    sh("snakemake --report workflow-report.zip", repo)
    with zipfile.ZipFile(repo / "workflow-report.zip") as bundle:
        names = bundle.namelist()
    assert any(n.endswith("report.html") for n in names), names
    assert any(n.endswith("curve.csv") for n in names), names
    (repo / "workflow-report.zip").unlink()


def test_speed_and_transport_knobs_rerun_nothing_in_either_tool(work):
    """Featurization workers, retries, timeouts, the mirror and (in synthetic mode) the real
    archives' SHA1s change how fast or from where, never what is computed: nothing may rerun."""
    repo = work["repo"]

    def speed_and_transport(params):
        params["features"]["workers"] = 2
        params["download"].update(retries=1, timeout_s=5, backoff_s=0.5, base_url="http://mirror/")
        params["data"]["fma"]["sha1"]["fma_large.zip"] = "0" * 40

    with edited_params(repo, speed_and_transport) as params:
        dry = sh("snakemake --cores 2 -n", repo)
        assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
        assert json.loads(sh("dvc status --json", repo).stdout or "{}") == {}
        params["data"]["synthetic"]["seed"] += 1  # the control: this one changes the audio
        write_params(repo, params)
        assert "download" in json.loads(sh("dvc status --json", repo).stdout)
        assert "rule download:" in sh("snakemake --cores 2 -n", repo).stdout


def _other_values(value, candidates: list, collide: bool) -> list:
    """Other values for a key: those another declared key holds (`collide`: the edits a set of
    values without keys cannot see), or else plain alternatives of the same type."""
    if collide:
        return [c for c in candidates if type(c) is type(value) and c != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int | float):
        return [value + 1, value * 2, value / 2, value + 0.05, value - 0.05, abs(value) + 2]
    if isinstance(value, list):
        if not value or not isinstance(value[-1], int | float):
            return [value[:-1], [*value, f"{value[-1]}-2"]]  # a run less, or one more
        return [value[:-1], [*value[:-1], value[-1] + 1], [*value, value[-1] + 1]]
    if isinstance(value, str):  # enum values: validation keeps the ones allowed for the key
        return ["avg", "none", "constant", "cosine", "fma", "cpu", "ddp", "32", "medium", "max", 1]
    return []


def _leaves(prefix: str, value) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(f"{prefix}.{k}", v)]
    return [(prefix, value)]


def _set(params: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[last] = value


Edit = tuple[str, object, set[str], bool]


def collision_edits(params: dict) -> dict[str, Edit]:
    """For every key any stage declares: (the leaf to edit, itself or a section's first leaf
    that can change; a new value Snakemake's schema check accepts, preferring one another
    declared key of the stage holds; the jobs declaring the leaf; whether the value collides)."""
    edits: dict[str, Edit] = {}
    declaring: dict[str, set[str]] = {}  # key → the jobs (stage@item) declaring it
    keys_of: dict[str, list[str]] = {}  # job → its declared keys (a task's own: tasks.<name>)
    for stage in STAGES.values():
        for item in stage.items(params):
            job = stage.addressing(item)
            keys_of[job] = stage.keys(params, item)
            for key in keys_of[job]:
                declaring.setdefault(key, set()).add(job)
    for key, jobs in declaring.items():
        values = [lv for j in jobs for k in keys_of[j] for lv in _leaves(k, lookup(params, k))]
        tries = [
            (leaf, new, collides)
            for collides in (True, False)  # a colliding value first, on any leaf of the key
            for leaf, value in _leaves(key, lookup(params, key))
            for new in _other_values(value, [v for lf, v in values if lf != leaf], collides)
        ]
        leaf, new, collides = next(
            (leaf, new, collides) for leaf, new, collides in tries if _valid(params, leaf, new)
        )
        # every job declaring the edited leaf, itself or a section above it (`prepare` and
        # `prepare.exclude_eval_from_pretrain` are two stages' keys for one leaf)
        covering = {
            j for j, ks in keys_of.items() if any(leaf == k or leaf.startswith(f"{k}.") for k in ks)
        }
        edits[key] = (leaf, new, covering, collides)
    return edits


def _valid(params: dict, leaf: str, new) -> bool:
    edited = json.loads(json.dumps(params))
    _set(edited, leaf, new)
    try:  # what Snakemake (and every `cola` command) checks before any job
        validate(edited)
    except ValueError:
        return False
    return True


def rounds(edits: dict[str, Edit]) -> list[list[str]]:
    """Keys grouped so that no job has two of its keys edited in one round."""
    out: list[tuple[set[str], list[str]]] = []
    for key, (_, _, jobs, _) in edits.items():
        for busy, keys in out:
            if not busy & jobs:
                busy |= jobs
                keys.append(key)
                break
        else:
            out.append((set(jobs), [key]))
    return [keys for _, keys in out]


RERUN_STATUSES = {"params changed", "set of input files changed"}


def snakemake_changes(repo: Path, summary: subprocess.CompletedProcess) -> dict[str, set[str]]:
    """Job (rule@wildcards) → the statuses `snakemake --summary` gives its outputs where not "ok":
    "params changed", or "set of input files changed" where an edit adds or removes a job's
    inputs (a shard, a run). Unlike the plan column, the status does not follow the DAG.
    (`--list-params-changes` would do, but Snakemake 9.27 also lists one output of every job
    whose params did not change: its ParamsChange keeps the last file it compared.) `summary` is
    that command's finished run (started beside DVC's check, which it does not disturb)."""
    rows = [line.split("\t") for line in summary.stdout.splitlines()]
    status = {row[0]: row[rows[0].index("status")] for row in rows[1:]}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    changes: dict[str, set[str]] = {}
    for stage in STAGES.values():
        for item in stage.items(params):
            seen = {status.get(p, "ok") for p in stage.out_paths(item)} - {"ok"}
            if seen:
                changes[stage.addressing(item)] = seen
    return changes


def dvc_params_changed(repo: Path) -> set[str]:
    """The stages whose declared params DVC finds changed against dvc.lock (the params part of
    `dvc status`, through DVC's own ParamsDependency, without hashing any file)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return {
            stage.name
            for stage in dvc_repo.index.stages
            if any(d.status() for d in stage.deps if isinstance(d, ParamsDependency))
        }


def test_every_declared_key_edited_to_another_keys_value_reruns_its_stage_in_both_tools(work):
    """Issue 18.1: Snakemake compares a rule's params as a set of values without keys; each stage
    holds them as one keyed mapping, so an edit is seen whatever value it collides with. For
    every key of every stage (a leaf of a section key), edited to a value another key of the
    stage holds where one is valid: Snakemake reruns every declaring stage for a change of its
    own and finds no other stage's params changed, DVC finds exactly the declaring stages'
    params changed (rounds edit one key per stage at a time)."""
    repo = work["repo"]
    original = (repo / "params.yaml").read_text()
    base = yaml.safe_load(original)
    edits = collision_edits(base)
    collided = {k for k, (_, _, _, hit) in edits.items() if hit}
    # the edits the issue measured as invisible to Snakemake (tiny config) are among them
    assert {"pretrain.seed", "finetune.threads", "finetune.max_epochs", "pretrain.dropout"} <= (
        collided
    )
    before = {s.addressing(i) for s in STAGES.values() for i in s.items(base)}
    assert snakemake_changes(repo, sh("snakemake --summary", repo)) == {}  # the baseline
    try:
        for keys in rounds(edits):
            params = json.loads(json.dumps(base))
            for key in keys:
                leaf, new, _, _ = edits[key]
                _set(params, leaf, new)
            write_params(repo, params)
            now = {s.addressing(i) for s in STAGES.values() for i in s.items(params)}
            # jobs of the edit's params only: a seed or shard list edit may remove some
            expected = set().union(*(edits[k][2] for k in keys)) & before & now
            summary = subprocess.Popen(
                ["snakemake", "--summary"], cwd=repo, stdout=subprocess.PIPE, text=True
            )
            dvc = dvc_params_changed(repo)
            out, _ = summary.communicate()
            done = subprocess.CompletedProcess(summary.args, summary.returncode, out)
            assert done.returncode == 0, keys
            snakemake = snakemake_changes(repo, done)
            params_changed = {job for job, seen in snakemake.items() if "params changed" in seen}
            assert params_changed & before <= expected <= set(snakemake), keys
            # a job the edit creates (a renamed run) is "missing"; every existing one reruns
            assert set().union(*(snakemake.get(job, set()) for job in before)) <= (
                RERUN_STATUSES
            ), keys
            assert dvc & before == expected, keys
    finally:
        (repo / "params.yaml").write_text(original)
    assert dvc_changed(repo) == set()


@pytest.mark.parametrize("addition", ["seed", "run"])
def test_a_new_seed_or_run_schedules_only_its_own_jobs_in_both_tools(work, addition):
    """Training jobs declare neither the seed list nor the run lists: a new seed, or a new run
    line, runs only its own jobs (and the report, which lists them) in both tools."""
    repo = work["repo"]

    def add(params):
        ft = params["finetune"]
        if addition == "seed":
            ft["seeds"].append(max(ft["seeds"]) + 1)
        else:
            ft["runs"]["linear"]["pretrained"].append("pretrained-linear-2")

    before = yaml.safe_load((repo / "params.yaml").read_text())
    with edited_params(repo, add) as params:
        new = finetune_stages(params) - finetune_stages(before)
        assert len(new) == (len(RUNS) if addition == "seed" else len(params["finetune"]["seeds"]))
        assert set(snakemake_stages(repo, forceall=False)) == new | {"report"}
        assert dvc_changed(repo) == new | {"report"}


def test_a_shard_count_and_a_new_run_in_one_edit_schedule_the_same_stages_in_both_tools(work):
    """Issue 10: one params.yaml edit (three shards instead of four, one run more) and, on the
    built pipeline, `snakemake -n` schedules exactly the stages `dvc status` finds changed plus
    everything downstream of them (DVC lists only the stages whose own inputs changed)."""
    repo = work["repo"]

    def three_shards_and_a_run(params):
        params["features"]["shards"] = [0, 1, 2]
        params["finetune"]["runs"]["linear"]["pretrained"].append("pretrained-linear-2")

    with edited_params(repo, three_shards_and_a_run):
        changed = dvc_changed(repo)
        assert {
            "featurize_shard@0",
            "featurize_shard@2",
            "linear_pretrained@pretrained-linear-2-0",
        } <= changed
        scheduled = set(snakemake_stages(repo, forceall=False))
        assert scheduled == with_downstream(changed, dvc_stages(repo))
        assert "pretrain" in scheduled and "featurize_shard@3" not in scheduled


def run_cache(repo: Path) -> list[dict]:
    """Every entry of DVC's run cache (.dvc/cache/runs): a stage's cmd, deps, params and outs."""
    return [
        yaml.safe_load(p.read_text()) for p in (repo / ".dvc/cache/runs").rglob("*") if p.is_file()
    ]


def test_dvc_commit_never_pairs_outputs_with_params_they_were_not_built_from(work):
    """Issue 18.2, with Snakemake's own view wrong on purpose (`--rerun-triggers mtime`: it
    ignores params): pretrain.seed is edited, only the report reruns (--forcerun), and the
    commit hook must neither record the old encoder against seed 1 in dvc.lock nor put that pair
    into DVC's run cache; the report, rebuilt from the same encoder, is committed."""
    repo = work["repo"]
    encoder = repo / "models/pretrain/encoder.safetensors"
    old_md5 = digest.file_digest(encoder, "md5")

    def new_seed_and_resamples(params):
        params["pretrain"]["seed"] += 1
        params["report"]["bootstrap_resamples"] += 1

    with edited_params(repo, new_seed_and_resamples) as params:
        run = sh("snakemake --cores 2 --rerun-triggers mtime --forcerun report", repo)
        assert "rule pretrain:" not in run.stdout + run.stderr  # Snakemake did not see the seed
        assert "pretrain (built with other values of pretrain.seed)" in run.stderr
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        assert (
            lock["pretrain"]["params"]["params.yaml"]["pretrain.seed"] != params["pretrain"]["seed"]
        )
        assert lock["report"]["params"]["params.yaml"]["report"] == params["report"]
        assert dvc_changed(repo) == {"pretrain"}
        pretrain_runs = [e for e in run_cache(repo) if e["cmd"].split()[3] == "pretrain"]
        seeds = {e["params"]["params.yaml"]["pretrain.seed"]: e for e in pretrain_runs}
        assert any(o["md5"] == old_md5 for o in seeds[params["pretrain"]["seed"] - 1]["outs"])
        assert params["pretrain"]["seed"] not in seeds  # no entry pairs seed + 1 with anything
    run = sh("snakemake --cores 2", repo)  # params back: only the report is redone
    assert set(re.findall(r"^rule (\w+):", run.stdout, re.M)) <= {"report", "all"}
    assert dvc_changed(repo) == set()


def test_a_partial_snakemake_run_never_vouches_for_stages_it_did_not_rebuild(work):
    """Edit a fine-tuning param, rebuild only `prepare`: dvc.lock must not record the old
    fine-tuning outputs against the new value."""
    repo = work["repo"]

    def new_dropout(params):
        params["finetune"]["dropout"] = 0.25

    with edited_params(repo, new_dropout) as params:
        sh("snakemake --cores 2 --until prepare --forcerun prepare", repo)
        changed = dvc_changed(repo)
        assert finetune_stages(params) <= changed
        assert "prepare" not in changed  # what did run is recorded


def test_finetune_lr_reruns_only_the_fine_tuning_runs_and_report(work):
    """Linear evaluation trains at linear_lr and declares no lr: it does not rerun."""
    repo = work["repo"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    metrics = repo / "models" / "finetune" / "scratch-finetune" / "seed-0" / "metrics.json"
    before = json.loads(metrics.read_text())
    params["finetune"]["lr"] = 5e-4
    write_params(repo, params)
    out = sh("dvc repro", repo).stdout
    assert stages_run(out) == {*finetune_stages(params, ("finetune",)), "report"}
    after = json.loads(metrics.read_text())  # retrained from scratch, not a resumed old run
    assert after["run_identity"] != before["run_identity"]
    assert after["steps"] == before["steps"]


def test_after_dvc_repro_snakemake_has_nothing_to_do(work):
    """Issue 8.3: Snakemake's next real run adopts what `dvc repro` just verified (sync.py)."""
    run = sh("snakemake --cores 2", work["repo"])
    assert "Nothing to be done" in run.stdout + run.stderr, run.stdout[-3000:]
    assert "Snakemake adopts what DVC verified" in run.stderr


def checkout_state(repo: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file in the checkout but Snakemake's logs, its file-state cache and
    DVC's tmp folder. Snakemake itself saves that cache (.snakemake/iocache/latest.pkl) at every
    `-n` and deletes it at `--summary`, `--dag`, `--list-params-changes` and real runs; only
    `--trust-io-cache` reads it. Left in, a test starting after a `-n` saw `--summary` delete it."""
    skip = (".snakemake/log/", ".dvc/tmp/", ".snakemake/auxiliary/", ".snakemake/iocache/")
    return {
        str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in repo.rglob("*")
        if p.is_file() and not str(p.relative_to(repo)).startswith(skip)
    }


DRY_RUNS = ("-n", "--summary", "--detailed-summary", "--list-params-changes", "--dag")


def test_dry_runs_change_nothing_where_the_sync_has_work_and_a_real_run_syncs(work, tmp_path):
    """Issue 18.3: with a shard lost (DVC's cache holds it: the sync would restore it), every
    read-only Snakemake mode leaves every file as it was (sizes, mtimes, dvc.lock, Snakemake's
    metadata) and says a real run syncs first; the real run then restores it."""
    repo = work["repo"]
    shard = repo / "data" / "features" / "shards" / "1.npy"
    before = shard.read_bytes()
    shard.unlink()
    state = checkout_state(repo)
    for mode in DRY_RUNS:
        dry = sh(f"snakemake --cores 2 {mode}", repo)
        assert "this dry run changes nothing" in dry.stderr, (mode, dry.stderr[-2000:])
    sh(f"snakemake --report {tmp_path / 'report.zip'}", repo)
    assert checkout_state(repo) == state
    run = sh("snakemake --cores 2", repo)
    assert "restored from DVC's cache, nothing retrained: featurize_shard@1" in run.stderr
    assert "Nothing to be done" in run.stdout + run.stderr, run.stderr[-3000:]
    assert shard.read_bytes() == before


def test_a_shard_lost_after_a_kill_is_rebuilt_or_restored_identically(work):
    """A killed featurize job (then `--unlock`) can leave a shard missing while everything after
    it looks up to date. Snakemake alone must rebuild it, not say "Nothing to be done"; with
    DVC beside it, the next start checks it out of DVC's cache instead of recomputing it."""
    repo = work["repo"]
    shard = repo / "data" / "features" / "shards" / "1.npy"
    before = shard.read_bytes()
    shard.unlink()
    assert "featurize_shard@1" in json.loads(sh("dvc status --json", repo).stdout)
    alone = "COLA_DVC_SYNC=off snakemake --cores 2"
    dry = sh(f"{alone} -n", repo).stdout
    assert re.search(r"rule featurize_shard:.*?wildcards: shard=1", dry, re.S), dry[-3000:]
    sh(f"{alone} --until featurize_shard", repo)
    assert shard.read_bytes() == before

    shard.unlink()
    run = sh("snakemake --cores 2", repo)
    assert "restored from DVC's cache, nothing retrained: featurize_shard@1" in run.stderr
    assert "Nothing to be done" in run.stdout + run.stderr, run.stderr[-3000:]
    assert shard.read_bytes() == before
    assert json.loads(sh("dvc status --json", repo).stdout or "{}") == {}


def test_featurize_param_edit_reruns_featurize_and_everything_after(work):
    repo = work["repo"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["features"]["fmin_hz"] = 80.0
    write_params(repo, params)
    out = sh("dvc repro", repo).stdout
    ran = stages_run(out)
    assert "download" not in ran and "prepare" not in ran
    assert ran == {
        *(f"featurize_shard@{k}" for k in params["features"]["shards"]),
        "featurize_gather",
        "pretrain",
        *finetune_stages(params),
        # each task's embeddings (the control's front-end reads features.*, the pretrained
        # one the new encoder) and so its probe; not task_data, which reads no features
        *(f"{s}@{t}" for s in TASK_EVALUATION for t in params["tasks"]),
        "report",
    }
    # New shards, so pretraining trains every step again (it once "resumed" a finished run).
    summary = json.loads((repo / "models" / "pretrain" / "summary.json").read_text())
    assert summary["resumed_from"] is None
    assert summary["steps"] == params["pretrain"]["max_steps"]


def test_push_clone_pull_retrains_nothing(work):
    repo, base = work["repo"], work["base"]
    sh("git add -A && git commit -qm 'results' && dvc push -q", repo)
    clone = base / "clone"
    sh(f"git clone -q {repo} {clone}", base)
    sh("dvc pull -q", clone)
    assert json.loads(sh("dvc status --json", clone).stdout or "{}") == {}
    encoder = clone / "models" / "pretrain" / "encoder.safetensors"
    encoder_bytes = encoder.read_bytes()
    run = sh("snakemake --cores 2", clone)  # adopts what DVC verified, by itself
    assert "Nothing to be done" in run.stdout + run.stderr, run.stdout[-3000:]
    assert encoder.read_bytes() == encoder_bytes
    assert json.loads(sh("dvc status --json", clone).stdout or "{}") == {}
    assert "Stage 'pretrain' didn't change" in sh("dvc repro", clone).stdout
    # A later parameter edit is still noticed by Snakemake after adoption.
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["finetune"]["dropout"] = 0.3
    write_params(clone, params)
    dry = sh("snakemake --cores 2 -n", clone).stdout
    assert "finetune_scratch" in dry and "rule pretrain:" not in dry


def test_going_back_to_earlier_params_restores_instead_of_retraining_in_both_tools(work):
    """Issue 8.3: DVC's cache holds the outputs of every params.yaml either tool has built;
    going back to one checks them out (DVC's run cache in `dvc repro`, `cola sync-dvc` at
    Snakemake's start) instead of training again: Snakemake restores a `dvc repro` build, DVC
    a Snakemake build."""
    repo = work["repo"]
    metrics = sorted((repo / "models" / "finetune").glob("*/seed-*/metrics.json"))
    committed = {p: p.read_bytes() for p in metrics}  # built by `dvc repro` (featurize edit)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"]["lr"] = 2e-3
    write_params(repo, params)
    built = sh("snakemake --cores 2", repo)
    assert "rule finetune_scratch:" in built.stdout + built.stderr  # this one trains
    edited = {p: p.read_bytes() for p in metrics}
    assert edited != committed

    # `dvc exp show` stays readable: the report's gains, the edited param, the runs' folder.
    shown = sh("dvc exp show --only-changed --csv", repo).stdout.splitlines()[0].split(",")
    fixed = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}
    gains = set(json.loads((repo / "reports" / "metrics.json").read_text()))
    assert set(shown) - fixed <= gains | {"finetune.lr", "models/finetune"}, shown
    table = sh("COLUMNS=120 dvc exp show --only-changed --no-pager", repo).stdout
    assert max(len(line) for line in table.splitlines()) <= 120

    sh("git checkout params.yaml", repo)  # DVC restores the committed run...
    assert stages_run(sh("dvc repro", repo).stdout) == set()
    assert {p: p.read_bytes() for p in metrics} == committed
    write_params(repo, params)
    assert stages_run(sh("dvc repro", repo).stdout) == set()  # ...and the Snakemake one
    assert {p: p.read_bytes() for p in metrics} == edited

    sh("git checkout params.yaml", repo)  # Snakemake restores what `dvc repro` built
    run = sh("snakemake --cores 2", repo)
    assert "restored from DVC's cache" in run.stderr
    assert "Nothing to be done" in run.stdout + run.stderr, run.stderr[-3000:]
    assert {p: p.read_bytes() for p in metrics} == committed
    assert json.loads(sh("dvc status --json", repo).stdout or "{}") == {}
    dry = sh("snakemake --cores 2 -n", repo)
    assert "Nothing to be done" in dry.stdout + dry.stderr


UPSTREAM_EDITS = {  # param → (stages declaring it, every rule downstream of them)
    ("data", "synthetic", "seed"): ({"download"}, set(PIPELINE_RULES)),
    ("features", "n_mels"): (
        {"featurize_shard", "featurize_gather", "embed_random"},  # the control's front-end
        set(PIPELINE_RULES) - {"download", "prepare", "task_data"},
    ),
}


def test_after_a_pull_an_upstream_edit_schedules_exactly_what_follows_it(work):
    """In the pulled and adopted clone, an upstream edit is seen by both tools: DVC flags the
    stages that declare the param (the rest follow by hashes when they run), Snakemake schedules
    exactly everything downstream; the run then ends with both tools clean."""
    clone = work["base"] / "clone"
    sh("git checkout params.yaml", clone)
    original = (clone / "params.yaml").read_text()
    for (section, *path), (declaring, downstream) in UPSTREAM_EDITS.items():
        params = yaml.safe_load(original)
        target = params[section]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] += 7 if path[-1] == "seed" else -16
        write_params(clone, params)
        dry = sh("snakemake --cores 2 -n", clone).stdout
        scheduled = set(re.findall(r"^rule (\w+):", dry, re.M)) - {"all"}
        assert scheduled == downstream, dry[-2000:]
        changed = {s.split("@")[0] for s in json.loads(sh("dvc status --json", clone).stdout)}
        assert changed == declaring
    sh("snakemake --cores 2", clone)  # the n_mels edit, run: 48 mel bands end to end
    assert json.loads(sh("dvc status --json", clone).stdout or "{}") == {}
    dry = sh("snakemake --cores 2 -n", clone)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    summary = json.loads((clone / "data" / "features" / "summary.json").read_text())
    assert summary["frontend"]["n_mels"] == 48


def test_appending_to_a_module_deep_in_pretrainings_imports_reruns_it_in_both_tools(work):
    """Issue 18.5: a stage's code dependencies are its module's import closure, computed: here
    frontend.py, which pretraining reaches only through store → featurize. DVC lists pretrain as
    changed by that file, and Snakemake names it among pretrain's updated inputs."""
    repo = work["repo"]
    module = repo / "src" / "cola_audio" / "frontend.py"
    assert "src/cola_audio/frontend.py" in STAGES["pretrain"].code()
    original, mtime = module.read_bytes(), module.stat().st_mtime_ns
    try:
        module.write_bytes(original + b"# appended\n")
        status = json.loads(sh("dvc status --json", repo).stdout)
        assert "src/cola_audio/frontend.py" in json.dumps(status["pretrain"])
        dry = sh("snakemake --cores 2 -n", repo).stdout
        job = dry[dry.index("rule pretrain:") :].split("\n\n")[0]
        assert "src/cola_audio/frontend.py" in job.split("reason:")[1], job
    finally:
        module.write_bytes(original)
        os.utime(module, ns=(mtime, mtime))
    assert dvc_changed(repo) == set()


def longer_pretraining(p: dict, seed_offset: int) -> None:
    """Several epochs of another seed: a fresh pretraining that a test can catch mid-way."""
    p["pretrain"].update(max_epochs=3, max_steps=-1, seed=p["pretrain"]["seed"] + seed_offset)


@contextlib.contextmanager
def snakemake_in_background(repo: Path, *args: str) -> Iterator[subprocess.Popen]:
    """A real Snakemake run in its own session (signals reach it alone, as from `kill`), killed
    with its jobs if the block leaves it running."""
    started = subprocess.Popen(
        ["snakemake", "--cores", "2", *args],
        cwd=repo,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield started
    finally:
        if started.poll() is None:
            os.killpg(started.pid, signal.SIGKILL)
            started.wait()


def wait_for(path: Path, run: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert path.exists(), f"{path} never appeared (Snakemake exit code {run.poll()})"


def test_while_snakemake_runs_a_second_run_and_dvc_are_refused_and_its_outputs_untouched(work):
    """Issue 20.7: `dvc repro` beside a running Snakemake deleted and rebuilt data/raw under its
    jobs; a second `snakemake` ended on advice to --rerun-incomplete. Both are refused now, in
    one line naming the running one, and the run finishes and commits as if alone."""
    repo = work["repo"]
    raw = repo / "data" / "raw"
    before = {p: p.stat().st_mtime_ns for p in raw.rglob("*")}
    last = repo / "models" / "pretrain" / "checkpoints" / "last.ckpt"
    with (
        edited_params(repo, lambda p: longer_pretraining(p, 5)),
        snakemake_in_background(repo, "--until", "pretrain") as running,
    ):
        wait_for(last, running)
        second = sh("snakemake --cores 1", repo, check=False)
        assert second.returncode != 0
        said = (second.stdout + second.stderr).strip().splitlines()
        assert any("another Snakemake run works in this checkout (pid" in line for line in said)
        assert "rerun-incomplete" not in said[-1] or "Do not" in said[-1]
        repro = sh("dvc repro", repo, check=False)
        assert repro.returncode != 0
        assert "is busy, it is being blocked by" in repro.stderr and "snakemake" in repro.stderr
        assert {p: p.stat().st_mtime_ns for p in raw.rglob("*")} == before
        assert running.wait(timeout=600) == 0
        assert "pretrain" not in dvc_changed(repo)  # its commit hook ran with DVC let back in
    sh("snakemake --cores 2 --until pretrain", repo)  # the committed encoder, from DVC's cache
    assert "pretrain" not in dvc_changed(repo)


def test_snakemake_started_while_a_dvc_command_holds_the_checkout_stops_before_any_job(work):
    from dvc.repo import Repo

    repo = work["repo"]
    with edited_params(repo, lambda p: p["report"].update(confidence=0.9)):
        dvc_repo = Repo(str(repo))
        try:
            with dvc_repo.lock:  # as `dvc repro` holds it while it works
                started = sh("snakemake --cores 1", repo, check=False)
        finally:
            dvc_repo.close()
        assert started.returncode != 0
        assert "a DVC command works in this checkout" in started.stdout + started.stderr
        assert "report" in dvc_changed(repo)  # nothing ran
    assert dvc_changed(repo) == set()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_snakemake_stops_its_jobs_and_the_next_plain_run_resumes(work, signum):
    """Issue 20.8: SIGINT or SIGTERM sent to Snakemake alone (`kill`, a wrapper, a scheduler)
    left its pretraining job training after Snakemake had exited, and the next plain run
    stopped at Snakemake's incomplete-files check. Now the job stops with Snakemake, and a plain
    rerun continues from the epoch checkpoint the stopped run left."""
    repo = work["repo"]
    last = repo / "models" / "pretrain" / "checkpoints" / "last.ckpt"
    with edited_params(repo, lambda p: longer_pretraining(p, signum)):
        with snakemake_in_background(repo, "--until", "pretrain") as running:
            wait_for(last, running)
            running.send_signal(signum)
            assert running.wait(timeout=120) != 0
        with open(repo / "models" / "pretrain" / ".lock") as fh:  # no trainer holds the run
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert last.exists()  # the resume point stays: no output of either tool
        sh("snakemake --cores 2 --until pretrain", repo)
        assert "resuming the interrupted run" in (repo / "logs" / "pretrain.log").read_text()
    sh("snakemake --cores 2 --until pretrain", repo)  # the committed encoder, from DVC's cache
    assert "pretrain" not in dvc_changed(repo)


def test_shards_built_from_hand_edited_audio_are_not_committed_against_the_sums(work):
    """The stages reading the audio depend on data/raw.sha1sums, which describe data/raw only as
    download wrote it. A clip edited by hand (Snakemake does not look inside data/raw), then a
    features edit: Snakemake rebuilds the shards from the edited clip, and dvc.lock must keep
    their old entries until download reruns, never pair the sums with shards of other audio."""
    repo = work["repo"]
    sh("snakemake --cores 2", repo)  # the built pipeline (a no-op after the tests above)
    clips = sorted((repo / "data" / "raw" / "fma_large").rglob("*.mp3"))
    clips[0].write_bytes(clips[1].read_bytes())
    before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]

    def other_floor(params):
        params["features"]["log_floor"] = 2.0e-5

    with edited_params(repo, other_floor):
        run = sh("snakemake --cores 2 --until featurize_gather", repo)
        out = run.stdout + run.stderr
        assert "rule featurize_shard:" in out
        assert "does not describe the audio it read" in out, out[-3000:]
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        shards = [name for name in lock if name.startswith("featurize_shard@")]
        assert shards and all(lock[name] == before[name] for name in shards)
        assert {"download", *shards} <= dvc_changed(repo)
